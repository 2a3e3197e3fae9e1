import json
import os
import shutil
import unicodedata

import pytest
import sentencepiece as spm
from safetensors.torch import load_file

from data import get_template, load_tokenizer
from data.tokenizer import clean_up_tokenization
from model import load_config
from model.config import TEMPLATES

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ["internlm2", "phi3", "qwen2", "llama"]
SP_CASES = ["internlm2", "phi3"]  # the tests below that look inside sentencepiece tokenizers


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
    assert tok.convert_tokens_to_ids(get_template(ref["template"]).stop) == ref["chat"]["eos_token_id"]
    assert tok.bos_id == (None if case == "qwen2" else 1)
    assert (tok.eos_id, tok.pad_id, tok.convert_tokens_to_ids("<|im_start|>" if case != "phi3" else "<|user|>")) \
        == {"internlm2": (2, 2, 511), "phi3": (500, 500, 510), "qwen2": (858, 856, 857), "llama": (513, 0, 512)}[case]


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
    assert tok.encode("x", add_bos=False) == tok.encode("x", add_bos=True)[int(tok.add_bos):]


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
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
    shutil.copy(os.path.join(FIX, "phi3", "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(str(tmp_path))
    for name in ["tokenizer.model", "added_tokens.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(FIX, "phi3", name), tmp_path / name)
    cfg = json.load(open(os.path.join(FIX, "phi3", "tokenizer_config.json")))
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_class 'GPT2Tokenizer' is not supported"):
        load_tokenizer(str(tmp_path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # InternVL2-Llama3-76B's Llama-3 tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer.json-only tokenizer .* is not supported"):
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


@pytest.mark.parametrize("case", SP_CASES)
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


# ---- decoding: the official batch_decode(skip_special_tokens=True), as the official chat decodes answers

@pytest.mark.parametrize("case", CASES)
def test_decode_cases_match_official(case):
    tok = load_tokenizer(os.path.join(FIX, case))
    cases = json.load(open(os.path.join(FIX, case, "decode_cases.json"), encoding="utf-8"))["cases"]
    assert len(cases) == 50
    for c in cases:
        assert tok.encode(c["text"], add_bos=False) == c["ids"], c["text"]
        assert tok.decode(c["ids"]) == c["decoded"], c["text"]


def test_internlm2_decoding_cleans_up_spaces_before_punctuation_and_contractions():
    """InternLM2Tokenizer.convert_tokens_to_string applies transformers' clean_up_tokenization to every run it
    decodes; the rule, not the fixture's strings: also ' 've' and ' 'm', which the decode cases lack."""
    tok = load_tokenizer(os.path.join(FIX, "internlm2"))
    for text, want in [("I 've seen it , I 'm sure !", "I've seen it, I'm sure!"), ("a ' b", "a'b"),
                       ("keep : ; ( ) 't", "keep : ; ( ) 't")]:
        assert clean_up_tokenization(text) == want
        assert tok.decode(tok.encode(text, add_bos=False)) == want
    # the Llama-class tokenizers here do not clean up (their clean_up_tokenization_spaces is false)
    for case in ("phi3", "llama", "qwen2"):
        other = load_tokenizer(os.path.join(FIX, case))
        assert other.decode(other.encode("I 've seen it , I 'm sure !", add_bos=False)) == "I 've seen it , I 'm sure !"


def test_clean_up_tokenization_spaces_follows_the_config(tmp_path):
    """transformers 4.44's _decode cleans up the whole text when tokenizer_config.json says so, and by default
    (the key absent)."""
    for name in ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(FIX, "qwen2", name), tmp_path / name)
    cfg = json.load(open(os.path.join(FIX, "qwen2", "tokenizer_config.json")))
    del cfg["clean_up_tokenization_spaces"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(tmp_path))
    assert tok.decode(tok.encode("Yes , it is red .")) == "Yes, it is red."


# ---- Qwen2 byte-level BPE

def test_qwen2_ids_equal_official_on_every_tokenizer_case():
    tok = load_tokenizer(os.path.join(FIX, "qwen2"))
    cases = json.load(open(os.path.join(FIX, "qwen2", "tokenizer_cases.json"), encoding="utf-8"))["cases"]
    assert len(cases) == 370
    wrong = [c["text"] for c in cases if tok.encode(c["text"]) != c["ids"]]
    assert not wrong, wrong[:5]
    for c in cases:  # offsets are monotonic and the lengths agree with the ids
        ids, starts = tok.encode_with_offsets(c["text"])
        assert ids == c["ids"] and starts == sorted(starts) and tok.count_tokens(c["text"]) == len(ids)


def test_qwen2_normalises_to_nfc_and_offsets_point_into_the_original_text():
    tok = load_tokenizer(os.path.join(FIX, "qwen2"))
    text = "Cafe\u0301 <|im_end|>A\u030a!"
    assert unicodedata.normalize("NFC", text) != text
    assert tok.encode(text) == tok.encode(unicodedata.normalize("NFC", text))
    ids, starts = tok.encode_with_offsets(text)
    # C a f é(2 bytes) ' ' <|im_end|> Å(2 bytes) !: a token inside a character points at that character
    assert starts == [0, 1, 2, 3, 3, 5, 6, 16, 16, 18]
    assert text[starts[-1]] == "!" and text[starts[6]:].startswith("<|im_end|>")


def test_qwen2_has_no_bos_and_exclamation_mark_is_id_0():
    tok = load_tokenizer(os.path.join(FIX, "qwen2"))
    assert tok.bos_id is None and tok.encode("!x") == tok.encode("!x", add_bos=False)
    assert tok.encode("!")[0] == 0 and tok.decode([0, 861, 0]) == "!!"
    assert tok.decode([0, 861, 0], skip_special_tokens=False) == "!<IMG_CONTEXT>!"  # no spaces (Qwen2's)
    assert tok.decode([127]) == "\ufffd"  # a lone UTF-8 lead byte: errors="replace"


def _qwen2_copy(tmp_path, merges=None, vocab=None):
    for name in ["tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(FIX, "qwen2", name), tmp_path / name)
    v = json.load(open(os.path.join(FIX, "qwen2", "vocab.json"), encoding="utf-8"))
    m = open(os.path.join(FIX, "qwen2", "merges.txt"), encoding="utf-8").read().splitlines()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab(v) if vocab else v), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges(m) if merges else m) + "\n", encoding="utf-8")
    return str(tmp_path)


def test_qwen2_merges_that_ranked_bpe_cannot_reproduce_are_refused(tmp_path):
    """tiktoken ranks by the id of the merged token: merges out of id order, a token made by another split than
    ranked BPE builds it, or a token no merge makes would give other ids than the official tokenizer."""
    load_tokenizer(_qwen2_copy(tmp_path))  # the fixture's own files load
    with pytest.raises(ValueError, match=r"merges.txt:3: the ids of vocab.json are not in merge order"):
        load_tokenizer(_qwen2_copy(tmp_path, merges=lambda m: [m[0], m[2], m[1]] + m[3:]))
    # 'ack' is listed as 'a' + 'ck'; listed as 'ac' + 'k' instead, ranked BPE still builds it from 'a' + 'ck'
    line = next(i for i, x in enumerate(open(os.path.join(FIX, "qwen2", "merges.txt"), encoding="utf-8"))
                if x.strip() == "a ck")
    with pytest.raises(ValueError, match=r"token b'ack' is listed as b'ac' \+ b'k'"):
        load_tokenizer(_qwen2_copy(tmp_path, merges=lambda m: m[:line] + ["ac k"] + m[line + 1:]))
    with pytest.raises(ValueError, match="1 tokens are neither a byte nor made by a merge"):
        load_tokenizer(_qwen2_copy(tmp_path, vocab=lambda v: {**v, "zzqq": 856}))
    with pytest.raises(ValueError, match=r"merges.txt:2: a merge is two tokens"):
        load_tokenizer(_qwen2_copy(tmp_path, merges=lambda m: [m[0], "h e x"] + m[2:]))
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match="merges.txt: missing"):
        load_tokenizer(str(tmp_path))


# ---- Llama (legacy) sentencepiece

def test_llama_legacy_dummy_prefix_after_every_special_token():
    tok = load_tokenizer(os.path.join(FIX, "llama"))
    ids = tok.encode("<|im_start|>user\n</img>\nx")
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "<|im_start|>", "\u2581", "u", "s", "er",
                                              "<0x0A>", "</img>", "\u2581", "<0x0A>", "x"]


@pytest.mark.parametrize("case", ["phi3", "llama"])
def test_sentencepiece_decoding_puts_spaces_around_verbatim_added_tokens(case):
    """transformers 4.44's slow _decode joins the runs with " " whatever the config's
    spaces_between_special_tokens says (false in both fixtures; only Qwen2Tokenizer's _decode joins with "")."""
    tok = load_tokenizer(os.path.join(FIX, case))
    ids = tok.encode("A <ref>cat</ref>", add_bos=False)
    assert tok.decode(ids, skip_special_tokens=False) == "A  <ref> cat </ref>"
    text = {"phi3": "yes<|end|><|assistant|>no", "llama": "yes<|im_end|><img>no"}[case]
    assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text.replace("><", "> <") \
        .replace("s<", "s <").replace(">n", "> n")


def test_qwen2_count_tokens_is_the_length_of_encode():
    """Qwen2's count_tokens adds cached counts of the pieces that start at a space before a non-space; it must
    agree with encode on any text: spaces before whitespace of every kind (Python's \\s and Unicode's differ on
    \\x1c-\\x1f), contractions, digits, punctuation, combining marks (NFC), CJK, added tokens."""
    import random
    tok = load_tokenizer(os.path.join(FIX, "qwen2"))
    rng = random.Random(0)
    pieces = ["hello", " world", "  ", " ", "\n", "\n\n", " \n", "\t", " \t", "你好", " 你好", "\U0001f600", " 12", "3",
              " .", ".", "'s", " 's", " '", "'", "e\u0301", " \u0301", "\x1c", " \x1c", "\x85", " \x85", "\u00a0",
              " \u00a0", "\u3000", " \u3000", " \u2028", "!", " !", "\r\n", " \r", "<|im_end|>", "<IMG_CONTEXT>" * 3]
    for n in range(3000):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 14)))
        assert tok.count_tokens(text) == len(tok.encode(text)), text
