import json
import os
import shutil

import pytest
import sentencepiece as spm
from safetensors.torch import load_file

from data import get_template, load_tokenizer
from model import load_config
from model.config import TEMPLATES

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ["internlm2", "phi3"]


def fixture(case):
    ref = json.load(open(os.path.join(FIX, case, "reference.json"), encoding="utf-8"))
    return load_tokenizer(os.path.join(FIX, case)), ref, load_file(os.path.join(FIX, case, "reference.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_text_and_chat_prompt_ids_match_official(case):
    tok, ref, t = fixture(case)
    assert tok.encode(ref["text_prompt"]) == t["text_input_ids"][0].tolist()
    n_tiles = ref["chat"]["num_tiles"]
    prompt = ref["chat"]["prompt"].replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * n_tiles + "</img>")
    assert tok.encode(prompt) == t["chat_input_ids"][0].tolist()


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_official_chat_response(case):
    tok, ref, t = fixture(case)
    text = tok.decode(t["chat_output_ids"][0].tolist(), skip_special_tokens=True)
    assert text.split(ref["chat"]["eos_token"])[0].strip() == ref["chat"]["response"]


@pytest.mark.parametrize("case", CASES)
def test_ids_the_toolkit_needs(case):
    tok, ref, _ = fixture(case)
    assert tok.img_context_id == ref["img_context_token_id"]
    assert tok.img_start_id == ref["img_start_token_id"]
    assert tok.img_end_id == ref["img_end_token_id"]
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == ref["img_context_token_id"]
    assert TEMPLATES[case] == ref["template"]  # the family's template; the tokenizer decides nothing
    assert tok.convert_tokens_to_ids(get_template(TEMPLATES[case]).sep) == ref["chat"]["eos_token_id"]
    assert tok.bos_id == 1
    if case == "internlm2":
        assert (tok.eos_id, tok.pad_id, tok.convert_tokens_to_ids("<|im_start|>")) == (2, 2, 511)
    else:
        assert (tok.eos_id, tok.pad_id, tok.convert_tokens_to_ids("<|user|>")) == (500, 500, 510)


def test_phi3_lone_underline_after_bos_only_before_non_special_added_token():
    tok, _, _ = fixture("phi3")
    underline = tok.sp.piece_to_id("\u2581")
    assert underline == 443
    # <|user|> is an added token but not in all_special_tokens: the '▁' of add_prefix_space stays
    assert tok.encode("<|user|>\nhi")[:3] == [1, 443, 510]
    # <img> is an additional special token: the '▁' is dropped
    assert tok.encode("<img>hi")[:2] == [1, 511]
    # plain text: '▁' merges into the first word as sentencepiece would with a dummy prefix
    assert tok.encode("hello world") == [1] + spm.SentencePieceProcessor(
        model_file=os.path.join(FIX, "phi3", "tokenizer.model")).encode("hello world")


def test_phi3_rstrip_tokens_swallow_following_whitespace():
    tok, _, _ = fixture("phi3")
    a = tok.encode("<|user|>\n  \n Describe<|end|><|assistant|>\nOK")
    b = tok.encode("<|user|>Describe<|end|><|assistant|>OK")
    assert a == b
    # <img> has no rstrip: its newline stays a token (byte 0x0A = id 13)
    assert tok.encode("<img>\nx")[:3] == [1, 511, 13]


def test_internlm2_chunks_get_the_models_dummy_prefix():
    tok, _, _ = fixture("internlm2")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(FIX, "internlm2", "tokenizer.model"))
    text = "user\nA gradient. 你好"
    assert tok.encode("<|im_start|>" + text + "<|im_end|>") == [1, 511] + sp.encode(text) + [510]
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@pytest.mark.parametrize("case", CASES)
def test_added_tokens_are_kept_whole_and_longest_match_wins(case):
    tok, _, _ = fixture(case)
    ctx = tok.img_context_id
    ids = tok.encode("<img>" + "<IMG_CONTEXT>" * 3 + "</img>", add_bos=False)
    assert ids == [tok.img_start_id, ctx, ctx, ctx, tok.img_end_id]
    assert tok.encode("x", add_bos=False) == tok.encode("x", add_bos=True)[1:]


@pytest.mark.parametrize("case", CASES)
def test_decode_skips_special_tokens_and_round_trips_text(case):
    tok, _, _ = fixture(case)
    text = "The picture shows a smooth gradient."
    ids = tok.encode("<img><IMG_CONTEXT></img>" + text)
    assert tok.decode(ids, skip_special_tokens=True).strip() == text
    assert "<IMG_CONTEXT>" in tok.decode(ids, skip_special_tokens=False)


def test_offsets_point_at_token_starts():
    tok, _, _ = fixture("internlm2")
    text = "<|im_start|>assistant\nA gradient.<|im_end|>"
    ids, starts = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert starts[0] == -1 and starts[1] == 0 and starts[-1] == text.index("<|im_end|>")
    k = starts.index(text.index("A gradient."))
    assert tok.decode(ids[k:-1]) == "A gradient."


def test_bad_tokenizer_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(str(tmp_path))
    for name in ["tokenizer.model", "added_tokens.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(FIX, "phi3", name), tmp_path / name)
    cfg = json.load(open(os.path.join(FIX, "phi3", "tokenizer_config.json")))
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_class 'GPT2Tokenizer' is not supported"):
        load_tokenizer(str(tmp_path))


def test_config_and_tokenizer_read_the_same_img_context_id(tmp_path):
    """load_config takes <IMG_CONTEXT> from the tokenizer files the way the tokenizer does:
    tokenizer_config.json's added_tokens_decoder wins over added_tokens.json; no such token is an error."""
    for name in ["config.json", "tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                 "tokenizer_config.json"]:
        shutil.copy(os.path.join(FIX, "phi3", name), tmp_path / name)
    added = json.load(open(tmp_path / "added_tokens.json"))
    added["<IMG_CONTEXT>"] = 519  # disagrees with added_tokens_decoder (513)
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    tok = load_tokenizer(str(tmp_path))
    assert load_config(str(tmp_path)).img_context_token_id == tok.img_context_id == 513
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if v["content"] != "<IMG_CONTEXT>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    del added["<IMG_CONTEXT>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ValueError, match="no <IMG_CONTEXT> token in added_tokens.json or tokenizer_config"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("case", CASES)
def test_count_tokens_is_the_length_of_encode(case):
    """count_tokens (the dataset's length estimates) counts without encoding: it must agree with encode on
    any text. Random mixes of words, spaces, newlines, '▁', CJK, byte-fallback characters, every added token
    (with strip flags, Phi-3's) alone and in runs, at the start, the end and next to each other."""
    import random
    tok, _, _ = fixture(case)
    assert tok._separable  # else count_tokens is encode itself and this test would prove nothing
    rng = random.Random(0)
    pieces = ["hello", " world", "  ", " ", "\n", "\n\n", "\u2581", "\u2581\u2581x", "你好", "\U0001f600",
              "a.b", "Describe", " the", "image", "?", "\t", "x"] + list(tok.added) + ["<IMG_CONTEXT>" * 3]
    for n in range(600):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 12)))
        for add_bos in (True, False):
            assert tok.count_tokens(text, add_bos) == len(tok.encode(text, add_bos)), (text, add_bos)
