"""build_sample: token-exact, label-exact and pixel-exact against the official pipeline."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data import DEFAULT_SYSTEM_MESSAGE, SampleError, SampleTooLong, build_sample, load_tokenizer
from data.images import dummy_pixel_values
from data.templates import INTERNVL2_5_SYSTEM_MESSAGE, RELEASE_SYSTEM_MESSAGES, get_template, render
from model.config import TEMPLATES
from tests.official_labels import (matches_official, official_image_tag, official_internvl2_5, official_labels,
                                   official_prompt, sample_official_labels)

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ["internlm2", "phi3", "qwen2", "llama"]
V15 = ["internlm2", "phi3"]  # the InternVL 1.5 templates' own tests
TOK = {c: load_tokenizer(os.path.join(FIX, c)) for c in CASES}
TERM = {"internlm2": "<|im_end|>", "phi3": "<|end|>", "qwen2": "<|im_end|>", "llama": "<|im_end|>"}


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


def supervised_text(tok, sample):
    lab = sample["labels"]
    return tok.decode(lab[lab != -100].tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("case", CASES)
def test_fixture_sample_is_official(case):
    tok = TOK[case]
    ref = json.load(open(os.path.join(FIX, case, "reference.json"), encoding="utf-8"))
    t = load_file(os.path.join(FIX, case, "reference.safetensors"))
    record = json.load(open(os.path.join(FIX, case, "conversation.json"), encoding="utf-8"))
    s = build_sample(record, tok, ref["template"], os.path.join(FIX, case), max_num=6)  # default system message
    assert ref["system_message"] == get_template(ref["template"]).system_message
    assert ref["system_message"] == (INTERNVL2_5_SYSTEM_MESSAGE if case == "qwen2" else DEFAULT_SYSTEM_MESSAGE)
    assert torch.equal(s["input_ids"], t["input_ids"][0])
    assert torch.equal(s["labels"], t["labels"][0])
    assert int((s["labels"] != -100).sum()) == ref["samples"][0]["num_supervised_labels"]
    assert torch.equal(s["pixel_values"][:, :, ::7, ::7], t["pixel_values_sub"])
    assert torch.allclose(s["pixel_values"].double().sum((1, 2, 3)), t["pixel_values_tile_sum"], rtol=0, atol=1e-9)
    assert torch.equal(s["image_flags"], t["image_flags"])
    assert matches_official(record, s, tok, ref["template"]) and not s["truncated"]


MULTI_TURN = [human("<image>\nDescribe the picture."), gpt("A gradient."),
              human("你好吗？ What's <this> & \"that\"\t{x}\\n ?"), gpt("ok 中文回答！\n第二行 <tag> & 100%"),
              human("again"), gpt("A smooth gradient.")]


@pytest.mark.parametrize("case", CASES)
def test_multi_turn_chinese_special_characters(case):
    tok = TOK[case]
    rec = {"image": "image.png", "conversations": MULTI_TURN}
    s = build_sample(rec, tok, TEMPLATES[case], os.path.join(FIX, case), max_num=6)
    term = TERM[case]
    assert supervised_text(tok, s).replace(" ", "") == (
        f"A gradient.{term}ok 中文回答！\n第二行 <tag> & 100%{term}A smooth gradient.{term}").replace(" ", "")
    # the official procedure gives the same labels for these answers (preprocess_mpt once it counts one BOS)
    assert matches_official(rec, s, tok, TEMPLATES[case], bos_per_round=case != "llama")
    # exactly the answers + terminators are supervised: three terminators, no role tokens
    lab = s["labels"][s["labels"] != -100].tolist()
    assert lab.count(tok.convert_tokens_to_ids(term)) == 3 and tok.img_context_id not in lab
    assert int((s["input_ids"] == tok.img_context_id).sum()) == 256 * 7


@pytest.mark.parametrize("case", V15)
def test_prompt_layout_is_official_mpt(case):
    tok = TOK[case]
    rec = {"conversations": [human("Q1"), gpt("A1"), human("Q2"), gpt("A2")]}
    s = build_sample(rec, tok, TEMPLATES[case], system_message="SYS")
    if case == "internlm2":
        text = ("<|im_start|>system\nSYS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
                "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>")
    else:
        text = "<|system|>\nSYS<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\nA2<|end|>"
    assert s["input_ids"].tolist() == tok.encode(text)
    assert render(case + "-chat", [("Q1", "A1"), ("Q2", "A2")], "SYS")[0] == text


def test_phi3_lone_underline_and_label_start():
    tok = TOK["phi3"]
    rec = {"conversations": [human("Q"), gpt("A1"), human("Q2"), gpt("A2")]}
    s = build_sample(rec, tok, "phi3-chat")
    assert s["input_ids"][:3].tolist() == [1, 443, tok.convert_tokens_to_ids("<|system|>")]
    assert s["labels"][:3].tolist() == [-100, -100, -100]
    assert matches_official(rec, s, tok, "phi3-chat")


def test_internlm2_strips_values_phi3_does_not():
    rec = {"conversations": [human("  Q  "), gpt(" A gradient.  ")]}
    a = build_sample(rec, TOK["internlm2"], "internlm2-chat")
    b = build_sample({"conversations": [human("Q"), gpt("A gradient.")]}, TOK["internlm2"], "internlm2-chat")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    tok = TOK["phi3"]
    c = build_sample(rec, tok, "phi3-chat")  # trailing spaces stay (leading ones are eaten by <|user|>/<|assistant|> rstrip)
    assert supervised_text(tok, c) == "A gradient.   <|end|>"  # + the " " decoding puts before <|end|>


def test_internlm2_official_mismatch_keeps_the_net_labels():
    # behind the dummy prefix 'Hello' tokenizes as '▁', 'H', 'e', 'll', 'o' but inside the prompt (after '\n')
    # as 'H', 'e', 'll', 'o': the official fragment count is off by one and it masks the whole sample
    tok = TOK["internlm2"]
    rec = {"conversations": [human("Hi"), gpt("Hello there")]}
    s = build_sample(rec, tok, "internlm2-chat")
    assert not matches_official(rec, s, tok, "internlm2-chat")
    assert supervised_text(tok, s).strip() == "Hello there<|im_end|>"
    text = render("internlm2-chat", [("Hi", "Hello there")], DEFAULT_SYSTEM_MESSAGE)[0]
    official, consistent = official_labels("internlm2-chat", tok, text, s["input_ids"].tolist())
    assert not consistent and all(x == -100 for x in official)  # the official labels leave nothing to learn


@pytest.mark.parametrize("case", CASES)
def test_text_only_sample(case):
    tok = TOK[case]
    s = build_sample({"conversations": [human("Hello"), gpt("A gradient.")]}, tok, TEMPLATES[case])
    assert s["image_flags"].tolist() == [0]
    assert torch.equal(s["pixel_values"], dummy_pixel_values())
    assert not any(i in s["input_ids"].tolist() for i in (tok.img_start_id, tok.img_end_id, tok.img_context_id))
    assert supervised_text(tok, s).replace(" ", "") == f"A gradient.{TERM[case]}".replace(" ", "")


@pytest.mark.parametrize("case", CASES)
def test_image_tag_prepended_to_first_human_turn(case):
    tok = TOK[case]
    img = Image.open(os.path.join(FIX, case, "image.png"))
    with_tag = {"image": "x.png", "conversations": [human("<image>\nDescribe the picture."), gpt("A gradient.")]}
    without = {"image": "x.png", "conversations": [human("Describe the picture."), gpt("A gradient.")]}
    a = build_sample(with_tag, tok, TEMPLATES[case], images=[img], max_num=6)
    b = build_sample(without, tok, TEMPLATES[case], images=[img], max_num=6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("case,template", [(c, TEMPLATES[c]) for c in CASES if TEMPLATES[c] != "internvl2_5"]
                         + [("qwen2", "Hermes-2")])
def test_leading_gpt_turn_is_dropped_and_counted(case, template):
    """preprocess_internlm / _phi3 / _mpt skip a first turn that is not the human's: the sample without it."""
    tok, img = TOK[case], Image.open(os.path.join(FIX, case, "image.png"))
    convs = [human("<image>\nDescribe the picture."), gpt("A gradient.")]
    a = build_sample({"image": "x.png", "conversations": convs}, tok, template, images=[img], max_num=6)
    b = build_sample({"image": "x.png", "conversations": [gpt("(dropped)")] + convs}, tok, template,
                     images=[img], max_num=6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert b["gpt_first"] and not a["gpt_first"]
    text = official_prompt(template, official_image_tag([gpt("(dropped)")] + convs), [256 * len(a["pixel_values"])],
                           get_template(template).system_message)
    assert b["input_ids"].tolist() == tok.encode(text)


@pytest.mark.parametrize("case", ["qwen2", "internlm2"])
def test_leading_gpt_turn_internvl2_5_is_an_answer(case):
    """preprocess_internvl2_5 renders a leading gpt turn (after an optional system turn) as an assistant turn and
    supervises it like the others: ids and labels equal the official ones token for token; nothing is dropped."""
    tok = TOK[case]
    for convs in ([gpt("Hi! Ask me."), human("Q1 !"), gpt("\nA1!\n"), human(" Q2"), gpt(" A2  ")],
                  [system("Be brief."), gpt(" Hello "), human("Q"), gpt("A gradient.")]):
        s = build_sample({"conversations": convs}, tok, "internvl2_5")
        ids, labels = official_internvl2_5(convs, tok, [], INTERNVL2_5_SYSTEM_MESSAGE, text_only=True)
        assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels and not s["gpt_first"]
        lead = next(c["value"] for c in convs if c["from"] == "gpt")
        assert supervised_text(tok, s).replace(" ", "").startswith((lead + "<|im_end|>").replace(" ", ""))
    img = Image.open(os.path.join(FIX, case, "image.png"))
    convs = [gpt("Hello."), human("<image>\nDescribe the picture."), gpt("A gradient.")]
    s = build_sample({"image": "x.png", "conversations": convs}, tok, "internvl2_5", images=[img], max_num=6)
    ids, labels = official_internvl2_5(convs, tok, [256 * len(s["pixel_values"])], INTERNVL2_5_SYSTEM_MESSAGE)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels and not s["gpt_first"]


@pytest.mark.parametrize("case", ["qwen2", "internlm2"])
@pytest.mark.parametrize("lead", ["system", "gpt"])
def test_untagged_single_image_goes_before_the_question_after_a_leading_turn(case, lead):
    """One image without a tag: the official code puts '<image>\n' in front of conversations[0], here a system
    turn or (internvl2_5 keeps it) a leading gpt turn, so it becomes literal text there, and with no tag in a
    human turn it fails its image-count assertion (the sample is lost). Here it goes in front of the first
    question, as without that turn: the official labels of the record tagged so."""
    tok, img = TOK[case], Image.open(os.path.join(FIX, case, "image.png"))
    convs = [system("Look closely.") if lead == "system" else gpt("Hello."), human("Describe the picture."),
             gpt("A gradient.")]
    with pytest.raises(AssertionError, match="0 != 1"):
        official_internvl2_5(official_image_tag(convs), tok, [256 * 7], INTERNVL2_5_SYSTEM_MESSAGE)
    s = build_sample({"image": "x.png", "conversations": convs}, tok, "internvl2_5", images=[img], max_num=6)
    tagged = [convs[0], human("<image>\nDescribe the picture."), convs[2]]
    ids, labels = official_internvl2_5(tagged, tok, [256 * 7], INTERNVL2_5_SYSTEM_MESSAGE)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
    if lead == "system":  # the official placement, where a human turn has the tag: literal system text
        literal, _ = official_internvl2_5(official_image_tag(tagged), tok, [256 * 7], INTERNVL2_5_SYSTEM_MESSAGE)
        assert literal != ids and "<image>" in tok.decode(literal[:20], skip_special_tokens=False)


@pytest.mark.parametrize("case", ["qwen2", "internlm2"])
def test_image_tag_in_a_gpt_turn_internvl2_5(case):
    """preprocess_internvl2_5 replaces the human turns' tags only: with a human tag per image, a gpt turn's
    <image> stays text (official, token for token); where the images need it, the official assertion drops the
    sample, so here it is a SampleError naming it. The other templates replace tags anywhere, as before."""
    tok, img = TOK[case], Image.open(os.path.join(FIX, case, "image.png"))
    convs = [human("<image>\nWhat tag?"), gpt("It reads <image> here.")]
    s = build_sample({"image": "x.png", "conversations": convs}, tok, "internvl2_5", images=[img], max_num=6)
    ids, labels = official_internvl2_5(convs, tok, [256 * 7], INTERNVL2_5_SYSTEM_MESSAGE)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
    assert "<image>" in supervised_text(tok, s)
    untagged = [human("What tag?"), convs[1]]  # the tag goes in front of the question, as official
    s = build_sample({"image": "x.png", "conversations": untagged}, tok, "internvl2_5", images=[img], max_num=6)
    ids, labels = official_internvl2_5(official_image_tag(untagged), tok, [256 * 7], INTERNVL2_5_SYSTEM_MESSAGE)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
    two = {"image": ["a.png", "b.png"], "conversations": [human("<image>\nsame?"), gpt("No, <image> differs.")]}
    with pytest.raises(AssertionError, match="1 != 2"):
        official_internvl2_5(two["conversations"], tok, [256, 256], INTERNVL2_5_SYSTEM_MESSAGE)
    with pytest.raises(SampleError, match="2 images but 1 <image> tags.*only human turns' tags are images"):
        build_sample(two, tok, "internvl2_5", images=[img, img], max_num=2)
    s = build_sample(two, tok, "Hermes-2", images=[img, img], max_num=2)  # preprocess_mpt: both are images
    assert (s["input_ids"] == tok.img_end_id).sum() == 2


@pytest.mark.parametrize("case", CASES)
def test_multi_image_sample(case):
    tok = TOK[case]
    imgs = [Image.new("RGB", (896, 448), (200, 10, 10)), Image.new("RGB", (300, 300), (0, 0, 255))]
    rec = {"image": ["a.png", "b.png"],
           "conversations": [human("First <image>\nsecond <image>\nsame?"), gpt("No.")]}
    s = build_sample(rec, tok, TEMPLATES[case], images=imgs, max_num=6)  # cap 3 each: (2,1)+thumb = 3 tiles, (1,1) = 1 tile
    assert s["pixel_values"].shape[0] == 4 and s["image_flags"].tolist() == [1, 1, 1, 1]
    ids = s["input_ids"].tolist()
    starts = [k for k, i in enumerate(ids) if i == tok.img_start_id]
    ends = [k for k, i in enumerate(ids) if i == tok.img_end_id]
    assert [e - st - 1 for st, e in zip(starts, ends)] == [256 * 3, 256 * 1]
    assert all(i == tok.img_context_id for i in ids[starts[0] + 1:ends[0]])


@pytest.mark.parametrize("case", V15)
def test_system_message_override_and_release_default(case):
    tok = TOK[case]
    rec = {"conversations": [human("Q"), gpt("A gradient.")]}
    default = build_sample(rec, tok, TEMPLATES[case])
    release = build_sample(rec, tok, TEMPLATES[case], system_message=RELEASE_SYSTEM_MESSAGES[case + "-chat"])
    empty = build_sample(rec, tok, TEMPLATES[case], system_message="")
    assert len({len(default["input_ids"]), len(release["input_ids"]), len(empty["input_ids"])}) == 3
    sys_text = tok.decode(release["input_ids"].tolist(), skip_special_tokens=False)
    assert RELEASE_SYSTEM_MESSAGES[case + "-chat"].replace(" ", "") in sys_text.replace(" ", "")


@pytest.mark.parametrize("case", CASES)
def test_max_length_never_cuts_an_image_span(case):
    tok = TOK[case]
    img = Image.new("RGB", (896, 448), (1, 2, 3))  # 3 tiles = 768 image tokens
    rec = {"image": "x.png", "conversations": [human("Describe."), gpt("A gradient. " * 40)]}
    full = build_sample(rec, tok, TEMPLATES[case], images=[img], max_num=6)
    n, img_end = len(full["input_ids"]), full["input_ids"].tolist().index(tok.img_end_id) + 1
    cut = build_sample(rec, tok, TEMPLATES[case], images=[img], max_num=6, max_length=n - 10)  # the text tail may go
    assert cut["truncated"] and torch.equal(cut["input_ids"], full["input_ids"][:n - 10])
    assert torch.equal(cut["labels"], full["labels"][:n - 10]) and (cut["labels"] != -100).any()
    with pytest.raises(SampleTooLong, match=r"image tokens end at position \d+ > max_length"):
        build_sample(rec, tok, TEMPLATES[case], images=[img], max_num=6, max_length=img_end - 1)
    with pytest.raises(SampleTooLong, match="no supervised token left"):
        build_sample(rec, tok, TEMPLATES[case], images=[img], max_num=6, max_length=img_end + 1)
    same = build_sample(rec, tok, TEMPLATES[case], images=[img], max_num=6, max_length=n)
    assert not same["truncated"] and torch.equal(same["input_ids"], full["input_ids"])


@pytest.mark.parametrize("record,message", [
    ({"image": "x.png"}, "missing 'conversations'"),
    ({"conversations": [human("Q"), {"from": "system", "value": "S"}]}, r"conversations\[1\]: a 'system' turn may "
                                                                        "only come first"),
    ({"conversations": [{"from": "user", "value": "Q"}, gpt("A")]}, "unknown role 'user'"),
    ({"conversations": [{"from": "system", "value": "<image>\nS"}, human("Q"), gpt("A")], "image": "x.png"},
     r"conversations\[0\] \(system\) holds <image>: images go in human turns"),
    ({"conversations": [{"from": "system", "value": "S"}]}, "no answer turn"),
    ({"conversations": [{"from": "system", "value": 3}, human("Q"), gpt("A")]}, "'value' must be a string"),
    ({"conversations": [human("Q")]}, "no answer turn"),
    ({"conversations": [human("Q"), gpt("A"), human("Q2")]}, r"conversations\[2\] \(human\) has no answer"),
    ({"conversations": [human("Q"), human("Q2"), gpt("A")]}, "turns must alternate"),
    ({"conversations": [human("<image> and <image>"), gpt("A")], "image": "x.png"}, "2 <image> tags but 1 image"),
    ({"conversations": [human("<image>"), gpt("A")]}, "1 <image> tags but 0 image"),
    ({"conversations": [human("<image>"), gpt("A")], "image": ["a.png", "b.png"]}, "2 images but 1 <image> tags"),
    ({"conversations": [human("Q"), gpt("  ")]}, r"conversations\[1\] \(gpt\) is empty"),
    ({"conversations": [human("Q"), gpt("A")], "image": 3}, "'image' must be a path"),
])
def test_bad_records(record, message):
    with pytest.raises(SampleError, match=message):
        build_sample(record, TOK["phi3"], "phi3-chat")


# ---- InternVL 2 / 2.5 templates: Hermes-2 (preprocess_mpt) and internvl2_5 (preprocess_internvl2_5)

def test_hermes2_multi_round_with_a_bos_tokenizer_supervises_every_answer():
    """preprocess_mpt counts a BOS in every round's own tokenisation; with a BOS-adding tokenizer (InternVL2-40B's)
    a sample of two or more rounds then fails the official length check and ALL its labels become -100. We give
    the labels the procedure means: every answer and its <|im_end|>, the same as the official count with one BOS."""
    tok = TOK["llama"]
    rec = {"conversations": [human("Q1"), gpt("First answer."), human("Q2"), gpt("Second answer.")]}
    s = build_sample(rec, tok, "Hermes-2")
    official, consistent = sample_official_labels(rec, s, tok, "Hermes-2")
    assert not consistent and official == [-100] * len(official)  # the official labels leave nothing to learn
    assert matches_official(rec, s, tok, "Hermes-2", bos_per_round=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    lab = s["labels"][s["labels"] != -100].tolist()
    assert lab.count(end) == 2 and supervised_text(tok, s).replace(" ", "") == \
        "Firstanswer.<|im_end|>Secondanswer.<|im_end|>"
    one = {"conversations": rec["conversations"][:2]}  # one round: official and ours agree as they are
    assert matches_official(one, build_sample(one, tok, "Hermes-2"), tok, "Hermes-2")


def test_hermes2_with_qwen2_tokenizer_is_official():
    """InternVL2-1B: Hermes-2 with Qwen2's tokenizer (no BOS): the official count holds for every round."""
    tok = TOK["qwen2"]
    rec = {"conversations": [human("Q1 !"), gpt("\nA1!\n"), human(" Q2"), gpt(" A2  ")]}
    s = build_sample(rec, tok, "Hermes-2")
    assert s["input_ids"].tolist() == tok.encode(
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\nQ1 !<|im_end|><|im_start|>assistant"
        "\n\nA1!\n<|im_end|><|im_start|>user\n Q2<|im_end|><|im_start|>assistant\n A2  <|im_end|>")
    assert matches_official(rec, s, tok, "Hermes-2")


@pytest.mark.parametrize("case", ["qwen2", "internlm2"])
def test_internvl2_5_labels_are_the_official_per_turn_ones(case):
    """preprocess_internvl2_5 (InternVL2.5-1B/4B/38B/78B with Qwen2, 2B/8B/26B with InternLM2): turns tokenised
    alone and concatenated, the role and the last id (the newline after <|im_end|>) of each answer -100. Values are
    not stripped; answers that start or end in whitespace or newlines keep the official counts."""
    tok = TOK[case]
    rec = {"image": "image.png", "conversations": [
        human("<image>\nDescribe!"), gpt("\nA gradient !\n"), human("  more?  "), gpt(" 中文回答！ "),
        human("again"), gpt("Done.")]}
    s = build_sample(rec, tok, "internvl2_5", os.path.join(FIX, case), max_num=6)
    assert matches_official(rec, s, tok, "internvl2_5")
    text = supervised_text(tok, s)
    assert "Done." in text and "中文回答" in text and "assistant" not in text and "user" not in text
    ids = s["input_ids"].tolist()
    if case == "qwen2":  # each turn ends <|im_end|> (supervised), '\n' (not)
        ends = [k for k, i in enumerate(ids) if i == tok.convert_tokens_to_ids("<|im_end|>")]
        assert [s["labels"][k].item() != -100 for k in ends] == [False, False, True, False, True, False, True]
        assert all(s["labels"][k + 1].item() == -100 and ids[k + 1] == 198 for k in ends)
    else:  # InternLM2 encodes that '\n' as '▁', <0x0A>: officially the '▁' stays supervised
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        ends = [k for k, i in enumerate(ids) if i == tok.convert_tokens_to_ids("<|im_end|>")]
        assert tok.convert_ids_to_tokens(ids[ends[-1] + 1:]) == ["\u2581", "<0x0A>"]
        assert s["labels"][-2].item() == ids[-2] and s["labels"][-1].item() == -100


def test_qwen2_exclamation_marks_are_attended():
    """The official collator's attention_mask = input_ids != 0 would mask every '!' of a Qwen2 sample (id 0); ours
    masks padding only, by length, in padded batches and in packs."""
    from data import collate
    from data.packing import collate_packed
    tok = TOK["qwen2"]
    a = build_sample({"conversations": [human("Hi!"), gpt("Hello!! Nice!")]}, tok, "internvl2_5")
    b = build_sample({"conversations": [human("Q"), gpt("A")]}, tok, "internvl2_5")
    assert (a["input_ids"] == 0).sum() == 4 and (a["labels"] == 0).sum() == 3  # the '!' of the answer are learnt
    batch = collate([b, a])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * n_a
    assert batch["attention_mask"][0].tolist() == [1] * n_b + [0] * (n_a - n_b)
    assert (batch["input_ids"][1] == 0).sum() == 4
    packed = collate_packed([a, b])
    assert packed["attention_mask"][0].tolist() == [1] * n_a + [2] * n_b


# ---- a leading system turn: the sample's own system message

def system(v):
    return {"from": "system", "value": v}


@pytest.mark.parametrize("case", ["qwen2", "internlm2"])
def test_system_turn_internvl2_5_is_official(case):
    """preprocess_internvl2_5 takes a leading system turn's value as the system message, unstripped, all of it
    -100: ids and labels equal the official ones token for token, text-only and with several images."""
    tok = TOK[case]
    text_only = {"conversations": [system("  Be brief!\n"), human("Q1 !"), gpt("\nA1!\n"), human(" Q2"), gpt(" A2  ")]}
    s = build_sample(text_only, tok, "internvl2_5")
    ids, labels = official_internvl2_5(text_only["conversations"], tok, [], INTERNVL2_5_SYSTEM_MESSAGE, text_only=True)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
    assert s["input_ids"].tolist() == tok.encode("<|im_start|>system\n  Be brief!\n<|im_end|>\n<|im_start|>user\nQ1 !"
                                                 "<|im_end|>\n<|im_start|>assistant\n\nA1!\n<|im_end|>\n<|im_start|>user"
                                                 "\n Q2<|im_end|>\n<|im_start|>assistant\n A2  <|im_end|>\n")
    plain = build_sample({"conversations": text_only["conversations"][1:]}, tok, "internvl2_5")
    assert len(plain["input_ids"]) != len(s["input_ids"])  # not the template's system message
    assert torch.equal(s["labels"][s["labels"] != -100], plain["labels"][plain["labels"] != -100])
    imgs = [Image.new("RGB", (896, 448), (200, 10, 10)), Image.new("RGB", (300, 300), (0, 0, 255))]
    multi = {"image": ["a.png", "b.png"],
             "conversations": [system("你是一个助手。"), human("First <image>\nsecond <image>\nsame?"), gpt("No.")]}
    s = build_sample(multi, tok, "internvl2_5", images=imgs, max_num=6)  # 3 + 1 tiles
    ids, labels = official_internvl2_5(multi["conversations"], tok, [256 * 3, 256], INTERNVL2_5_SYSTEM_MESSAGE)
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels


@pytest.mark.parametrize("case,template", [(c, TEMPLATES[c]) for c in CASES] + [("qwen2", "Hermes-2"),
                                                                             ("internlm2", "internvl2_5")])
def test_system_turn_replaces_the_system_message_in_every_template(case, template):
    """preprocess_internlm / _phi3 / _mpt raise KeyError on a 'system' role. Here the turn is the sample's system
    message (stripped where the template strips values): the official prompt and labels with that message set."""
    tok = TOK[case]
    convs = [system(" You are terse. "), human("Q1"), gpt("A gradient."), human("again"), gpt("A smooth gradient.")]
    rec = {"conversations": convs}
    s = build_sample(rec, tok, template, system_message="ignored")
    if template == "internvl2_5":
        ids, labels = official_internvl2_5(convs, tok, [], INTERNVL2_5_SYSTEM_MESSAGE, text_only=True)
        assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
        return
    with pytest.raises(KeyError, match="system"):
        official_prompt(template, convs, [], DEFAULT_SYSTEM_MESSAGE)
    value = convs[0]["value"].strip() if get_template(template).strip_messages else convs[0]["value"]
    text = official_prompt(template, convs[1:], [], value)
    assert s["input_ids"].tolist() == tok.encode(text)
    labels, consistent = official_labels(template, tok, text, s["input_ids"].tolist(), bos_per_round=case != "llama")
    assert consistent and s["labels"].tolist() == labels
    as_option = build_sample({"conversations": convs[1:]}, tok, template, system_message=value)
    assert torch.equal(s["input_ids"], as_option["input_ids"]) and torch.equal(s["labels"], as_option["labels"])


def test_system_turn_then_a_leading_gpt_turn_is_dropped_and_counted():
    tok = TOK["phi3"]
    rec = {"conversations": [system("S"), gpt("(dropped)"), human("Q"), gpt("A gradient.")]}
    s = build_sample(rec, tok, "phi3-chat")
    t = build_sample({"conversations": [system("S"), human("Q"), gpt("A gradient.")]}, tok, "phi3-chat")
    assert s["gpt_first"] and not t["gpt_first"] and torch.equal(s["input_ids"], t["input_ids"])
