"""chat.py against the official chat() outputs stored in the fixtures: prompt ids, generated ids, decoded answer."""
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import chat
from data import get_template, load_tokenizer
from data.images import load_image
from model import load_pretrained
from tests.fixture_inputs import FIXTURES, fixture_pixels

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["internlm2", "phi3", "qwen2", "llama"])
def case(request):
    d = os.path.join(FIXTURES, request.param)
    with open(os.path.join(d, "reference.json")) as f:
        info = json.load(f)
    return dict(dir=d, info=info, ref=load_file(os.path.join(d, "reference.safetensors")),
                model=load_pretrained(d, dtype=torch.float32), tokenizer=load_tokenizer(d))


def test_pixels_use_the_directory_tiling(case):
    m = case["model"]
    pv = chat.image_to_pixel_values(load_image(os.path.join(case["dir"], "image.png")), m.config)
    assert m.config.max_dynamic_patch == 6
    assert pv.shape[0] == case["info"]["chat"]["num_tiles"] == 7
    assert torch.equal(pv, fixture_pixels(os.path.basename(case["dir"])))


def test_prompt_ids_equal_official(case):
    m, tok, ref = case["model"], case["tokenizer"], case["ref"]
    q = case["info"]["chat"]["question"]
    kept, ids = chat.build_prompt(tok, m.config, q, [], [7])
    assert kept == "<image>\n" + q  # the official chat prepends the tag and keeps it in the history
    assert ids == ref["chat_input_ids"][0].tolist()
    # the image string collapsed back to <image> is the official prompt string
    text = tok.decode(ids, skip_special_tokens=False)
    assert "<IMG_CONTEXT>" in text and case["info"]["chat"]["prompt"].split("<image>")[0].split("\n")[-1] in text


def test_chat_answer_equals_official(case):
    m, tok, ref, info = case["model"], case["tokenizer"], case["ref"], case["info"]["chat"]
    pv = chat.image_to_pixel_values(load_image(os.path.join(case["dir"], "image.png")), m.config)
    out = io.StringIO()
    printer = chat.StreamPrinter(tok, get_template(m.config.template).stop, out)
    response, history, ids = chat.chat(m, tok, pv, info["question"], max_new_tokens=8, streamer=printer)
    printer.finish(response)
    assert ids.tolist() == ref["chat_output_ids"][0].tolist()
    assert response == info["response"]
    assert out.getvalue() == response + "\n"  # the streamed text is the answer, nothing more
    assert history == [("<image>\n" + info["question"], response)]


def test_greedy_from_our_prompt_equals_official(case):
    """The 8 greedy ids of the official generate (no eos) from the prompt our chat builds, token for token."""
    m, tok, ref = case["model"], case["tokenizer"], case["ref"]
    pv = chat.image_to_pixel_values(load_image(os.path.join(case["dir"], "image.png")), m.config)
    _, ids = chat.build_prompt(tok, m.config, case["info"]["chat"]["question"], [], [pv.shape[0]])
    out = m.generate(torch.tensor([ids]), pv, max_new_tokens=8)
    assert out.tolist() == ref["greedy_ids"].tolist()


def test_second_turn_replays_history(case):
    m, tok = case["model"], case["tokenizer"]
    q1 = case["info"]["chat"]["question"]
    _, ids = chat.build_prompt(tok, m.config, "And the colours?", [("<image>\n" + q1, "A1")], [7])
    text = tok.decode(ids, skip_special_tokens=False)
    assert ids.count(tok.img_context_id) == 7 * 256 and ids.count(tok.img_start_id) == 1
    text = text.replace(" ", "").rstrip()  # the slow tokenizers' decoding puts spaces around special tokens
    assert text.endswith(("colours?<|im_end|><|im_start|>assistant", "colours?<|end|><|assistant|>",
                          "colours?<|im_end|>\n<|im_start|>assistant"))
    assert "A1" in text


def test_text_only_chat_has_no_image_tokens(case):
    m, tok = case["model"], case["tokenizer"]
    response, _, ids = chat.chat(m, tok, None, "Hello", max_new_tokens=4)
    _, prompt = chat.build_prompt(tok, m.config, "Hello")
    assert tok.img_context_id not in prompt and len(ids) <= 4 and isinstance(response, str)


def test_image_tag_without_image_is_an_error(case):
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 0 image\(s\).*--image"):
        chat.build_prompt(case["tokenizer"], case["model"].config, "<image>\nWhat?")


def test_system_message_resolution(case):
    cfg = case["model"].config
    assert chat.resolve_system_message(cfg) == case["info"]["system_message"]
    assert chat.resolve_system_message(cfg, "Be brief.") == "Be brief."
    _, ids = chat.build_prompt(case["tokenizer"], cfg, "Hi", system_message="Be brief.")
    assert "Be brief." in case["tokenizer"].decode(ids, skip_special_tokens=False)


def test_record_system_turn_is_the_prompt_system_message(case):
    """As in training: a test record's leading system turn is its prompt's system message."""
    cfg, tok = case["model"].config, case["tokenizer"]
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}]}
    question, reference, ids, pv = chat.record_prompt(rec, None, tok, cfg, system_message="other")
    assert (question, reference, pv) == ("Hi", "Hello.", None)
    assert ids == chat.build_prompt(tok, cfg, "Hi", system_message="Be brief.")[1]


def test_cli_once_and_interactive(monkeypatch, capsys):
    d = os.path.join(FIXTURES, "internlm2")
    info = json.load(open(os.path.join(d, "reference.json")))["chat"]
    img = os.path.join(d, "image.png")
    assert chat.main([d, "--image", img, "--question", info["question"], "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == info["response"] + "\n"
    # interactive: two questions then EOF; the first answer is the official one, the history carries over
    monkeypatch.setattr("sys.stdin", io.StringIO(info["question"] + "\n/reset\n" + info["question"] + "\n"))
    assert chat.main([d, "--image", img, "--max-new-tokens", "8", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert out.count(info["response"]) == 2


def test_system_message_from_the_directory_conversation_py(tmp_path):
    """A released checkpoint ships its own conversation.py: its template default is what its chat() uses."""
    d = tmp_path / "model"
    os.makedirs(d)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
        (d / name).write_bytes(open(os.path.join(FIXTURES, "internlm2", name), "rb").read())
    (d / "conversation.py").write_text(
        "register_conv_template(\n    Conversation(\n        name='phi3-chat',\n        system_message='no',\n    )\n)\n"
        "register_conv_template(\n    Conversation(\n        name='internlm2-chat',\n"
        "        system_template='<|im_start|>system\\n{system_message}',\n"
        "        system_message='You are an AI assistant whose name is InternLM (书生·浦语).',\n    )\n)\n")
    from model import load_config
    cfg = load_config(str(d))
    assert chat.directory_system_message(str(d), "internlm2-chat") == "You are an AI assistant whose name is " \
                                                                       "InternLM (书生·浦语)."
    assert chat.resolve_system_message(cfg, None, str(d)).startswith("You are an AI assistant whose name is InternLM")
    assert chat.resolve_system_message(cfg, "Be brief.", str(d)) == "Be brief."
    cfg.system_message = "From config."
    assert chat.resolve_system_message(cfg, None, str(d)) == "From config."
    assert chat.directory_system_message(os.path.join(FIXTURES, "internlm2"), "internlm2-chat") is None


# ------------------------------------------------------------------------------------------------ --data (batched)

def _test_set(case, tmp_path):
    q = case["info"]["chat"]["question"]
    records = [{"id": "img", "image": "image.png", "conversations": [
                   {"from": "human", "value": q}, {"from": "gpt", "value": "x"},
                   {"from": "human", "value": "And?"}, {"from": "gpt", "value": "y"}]},
               {"id": "short", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello"}]},
               {"id": "gone", "image": "missing.png", "conversations": [
                   {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "z"}]},
               {"id": "long", "conversations": [
                   {"from": "human", "value": "Tell me a long story about a cat and a dog. " * 3},
                   {"from": "gpt", "value": "Once"}]},
               {"id": "tagged", "image": "image.png", "conversations": [
                   {"from": "human", "value": "Look: <image>\nWhat is it?"}, {"from": "gpt", "value": "A"}]}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    return chat.read_test_set(f"{path},{case['dir']}")


def _answers(path):
    return [json.loads(line) for line in open(path)]


def test_batched_answers_equal_one_by_one(case, tmp_path):
    """Left-padded batches of 3 (image and text prompts mixed, different lengths) give the same new tokens as one
    prompt at a time, and the image record's answer equals the official chat's."""
    m, tok, info = case["model"], case["tokenizer"], case["info"]["chat"]
    records = _test_set(case, tmp_path)
    one = chat.answer_test_set(m, tok, records, tmp_path / "one.jsonl", batch_size=1, max_new_tokens=8)
    three = chat.answer_test_set(m, tok, records, tmp_path / "three.jsonl", batch_size=3, max_new_tokens=8)
    rows1, rows3 = _answers(tmp_path / "one.jsonl"), _answers(tmp_path / "three.jsonl")
    assert [r["id"] for r in rows1] == ["img", "short", "gone", "long", "tagged", f"{tmp_path}/test.jsonl:6"]
    for a, b in zip(rows1, rows3):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
    assert rows1[0]["question"] == info["question"] and rows1[0]["reference"] == "x"  # first turns only
    assert rows1[0]["answer"] == info["response"]  # the official chat() answer to that question and image
    assert "missing.png" in rows1[2]["error"] and "answer" not in rows1[2]
    assert "test.jsonl:6" in rows1[5]["error"] and "malformed JSON" in rows1[5]["error"]
    assert one["answered"] == three["answered"] == 4 and one["errors"] == 2 and one["scored"] == 4
    # token for token: re-generate the ids one by one and in one batch of 4
    eos = tok.convert_tokens_to_ids(get_template(m.config.template).stop)
    prompts = [chat.record_prompt(r, f, tok, m.config)[2:] for _, r, f in records
               if not isinstance(r, Exception) and r["id"] != "gone"]
    alone = [chat.generate_batch(m, [p], eos, 8)[0] for p in prompts]
    mixed = chat.generate_batch(m, prompts, eos, 8)
    if "phi3" not in case["dir"]:
        assert mixed == alone
    else:  # Phi-3 'su' RoPE: the image prompt (> 1024 tokens) switches the whole batch to the long factors;
        assert mixed != alone  # this is why plan_batches never mixes the two sides (rows above are equal)
    assert alone[0] == case["ref"]["chat_output_ids"][0].tolist()


def test_scores_exact_and_contained(tmp_path, monkeypatch):
    """exact match = stripped strings equal; contained = the stripped reference is a substring of the answer."""
    from types import SimpleNamespace as NS
    refs = {"a": " Purple.", "b": "Green.", "c": "Three.", "d": "Yes"}
    answers = iter(["Purple.", "It is Green.", "Four.", "Yes it is"])
    monkeypatch.setattr(chat, "record_prompt", lambda rec, *a: (rec["q"], rec["ref"], [1, 2], None))
    monkeypatch.setattr(chat, "generate_batch", lambda m, prompts, *a: [[7]] * len(prompts))
    monkeypatch.setattr(chat, "decode_answer", lambda *a: next(answers))
    model = NS(config=NS(template="internlm2-chat", system_message="s", llm=NS(family="internlm2")))
    tok = NS(convert_tokens_to_ids=lambda s: 7)
    records = [(k, {"q": k, "ref": ref}, None) for k, ref in refs.items()]
    scores = chat.answer_test_set(model, tok, records, tmp_path / "a.jsonl", batch_size=4)
    assert (scores["exact_match"], scores["contained"], scores["scored"]) == (0.25, 0.75, 4)


def test_batched_answers_equal_one_by_one_on_the_demo(tmp_path):
    """The demo base (random weights: long, varied answers) on 12 held-out records: batches of 5 == one by one,
    through the bench script, which reports the same."""
    from bench import chat as bench_chat
    from demo import make_demo
    base, _, folder = make_demo(str(tmp_path / "demo"), n_images=8, text_only=4)
    lines = open(os.path.join(folder, "eval.jsonl")).readlines()
    test = tmp_path / "test.jsonl"
    test.write_text("".join(lines[:12]))
    result = bench_chat.main([base, "--data", f"{test},{folder}", "--batch-sizes", "1", "5", "--repeats", "1",
                              "--max-new-tokens", "12", "--json", str(tmp_path / "b.json")])
    assert [r["identical"] for r in result["runs"]] == [True, True]
    assert result["runs"][0]["new_tokens"] == result["runs"][1]["new_tokens"] > 12
    assert json.loads((tmp_path / "b.json").read_text())["records"] == 12


def test_a_directory_chat_cannot_run_is_one_error_line(tmp_path, capsys):
    """No directory, no config.json, no weights, a train.py run or checkpoint: one `error:` line each, before any
    load."""
    import shutil
    src = os.path.join(FIXTURES, "internlm2")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copy(os.path.join(src, f), no_weights)
    run_dir = tmp_path / "run"
    (run_dir / "iter_4").mkdir(parents=True)
    (run_dir / "iter_4" / "meta.json").write_text("{}")
    for path, match in [(tmp_path / "nowhere", r"nowhere: no such directory"),
                        (tmp_path, r": no config.json \(expected an official InternVL directory\)"),
                        (no_weights, r"neither model.safetensors nor model.safetensors.index.json \(no weights"),
                        (run_dir, r"run is a train.py checkpoint or run directory .* python convert.py .*run OUT"),
                        (run_dir / "iter_4", r"iter_4 is a train.py checkpoint")]:
        with pytest.raises(SystemExit, match="^error: .*" + match):
            chat.main([str(path), "--question", "hi"])
