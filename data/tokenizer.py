"""Tokenizers with the semantics of the official *slow* HF tokenizers, chosen by `tokenizer_class` in
tokenizer_config.json: sentencepiece ones here, Qwen2's byte-level BPE in data/bpe.py.

- InternLM2Tokenizer (remote code): every text chunk between added tokens is encoded by the
  sentencepiece model as shipped (its own add_dummy_prefix), BOS in front. Its decoding always applies
  transformers' clean_up_tokenization (no space before . ? ! , and English contractions).
- LlamaTokenizer with legacy=True (InternVL2-40B's Nous-Hermes-2-Yi): encoded as InternLM2's, so every
  chunk after an added token gets the dummy prefix ('<|im_start|>user' -> '<|im_start|>', '▁user').
- LlamaTokenizer with legacy=False (Phi-3): the model is loaded with add_dummy_prefix switched off,
  the whole text gets one leading '▁' (add_prefix_space), a chunk that starts with a space is
  encoded behind '<unk>' and the '<unk>' pieces are dropped, and the leading '▁' is removed only
  when the next token is in `all_special_tokens` (bos/eos/unk/pad/additional_special_tokens).
  Phi-3's chat tokens are added but not "special" in that sense, so a prompt that starts with
  `<|system|>` keeps a lone '▁' after BOS.

Shared by all (transformers' PreTrainedTokenizer.tokenize and _decode, class `Tokenizer`): the text is first
split on every added token (leftmost, longest match), an added token with rstrip/lstrip eats the whitespace
on that side, and added tokens map to their ids whole; decoding converts the runs between verbatim added
tokens separately and applies clean_up_tokenization to the whole text where tokenizer_config.json's
clean_up_tokenization_spaces says so (transformers' default: yes).
"""
import functools
import itertools
import os
import re

import sentencepiece as spm

from model.tokens import IMG_CONTEXT, IMG_END, IMG_START, AddedToken, read_added_tokens
from model.tokens import read_json as _read_json

SPIECE_UNDERLINE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WORD = re.compile(f"{SPIECE_UNDERLINE}*[^{SPIECE_UNDERLINE}]+|{SPIECE_UNDERLINE}+")  # '▁'-led words
# A second normalizer_spec (field 3) holding add_dummy_prefix (field 3) = 0, appended to a model proto,
# switches the dummy prefix off as transformers does for legacy=False: protobuf merges repeated fields.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"



class CountCache(dict):
    """text -> count(text), each distinct text counted once: the token counts of words (sentencepiece) or
    space-led pieces (Qwen2 BPE), which repeat across a data set."""

    def __init__(self, count):
        super().__init__()
        self.count = count

    def __missing__(self, text):
        if len(self) > 2_000_000:  # unbounded vocabularies (text without spaces): start over
            self.clear()
        n = self[text] = self.count(text)
        return n


def _word_length(sp, word):
    """Pieces of one '▁'-led word, by a processor without dummy prefix."""
    return len(sp.encode(word.replace(SPIECE_UNDERLINE, " ")))


def _content(tok):
    return tok["content"] if isinstance(tok, dict) else tok


def _split_pattern(tokens):
    """One regex that finds the added tokens the way transformers' Trie does: leftmost match, longest first
    among matches at the same position. A run of one token (256 <IMG_CONTEXT> per tile) is matched at once,
    unless the token is a prefix of another one (then the run could hide a longer match). One group around
    the match: re.split returns [text, match, text, ..., text]."""
    if not tokens:
        return None
    first = "".join(sorted({re.escape(t[0]) for t in tokens}))  # a fast skip over text no token starts in
    alternatives = [re.escape(t) if any(o != t and o.startswith(t) for o in tokens)
                    else f"(?:{re.escape(t)})+" for t in tokens]
    return re.compile(f"(?=[{first}])(" + "|".join(alternatives) + ")")


class _Runs(dict):
    """A match of the split pattern -> (its token, how many times it repeats): one token, or a run of one."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens  # longest first, as the pattern tries them

    def __missing__(self, match):
        tok = next(t for t in self.tokens if len(match) % len(t) == 0 and match == t * (len(match) // len(t)))
        self[match] = tok, len(match) // len(tok)
        return self[match]


def clean_up_tokenization(text):
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization: no space before . ? ! , and English
    contractions, in this order."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class Tokenizer:
    """What every slow tokenizer shares: added and special tokens, the split on them, ids, and the decoding
    frame. Load with `load_tokenizer(dir)`. Ids the toolkit needs: bos_id (None without BOS), eos_id, pad_id,
    img_start_id, img_end_id, img_context_id. A subclass loads its model in _load_model (setting
    base_vocab_size) and gives _base_id, _base_token and _ids_to_string."""

    unk_default = None  # the class's unk_token when the files name none

    def __init__(self, path):
        self.path = path
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        self.add_bos = bool(config.get("add_bos_token", True))
        # transformers' slow _decode joins with " " unless the call says otherwise (4.44 does not read the
        # config's spaces_between_special_tokens); Qwen2Tokenizer's own _decode says no.
        self.spaces_between_special_tokens = True
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", True))
        self._load_model(path, config)
        self.added = read_added_tokens(path)
        self._read_special_tokens(config, _read_json(os.path.join(path, "special_tokens_map.json")))
        self.id_to_added = {tok.id: tok for tok in self.added.values()}
        split_tokens = sorted(self.added, key=len, reverse=True)
        self._split_re, self._runs = _split_pattern(split_tokens), _Runs(split_tokens)
        self.vocab_size = max([self.base_vocab_size] + [t.id + 1 for t in self.added.values()])
        self.bos_id = self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None
        self.add_bos = self.add_bos and self.bos_id is not None
        self.eos_id = self.convert_tokens_to_ids(self.eos_token)
        self.unk_id = self.convert_tokens_to_ids(self.unk_token) if self.unk_token else None
        self.pad_id = self.convert_tokens_to_ids(self.pad_token) if self.pad_token else self.eos_id
        for name in (IMG_START, IMG_END, IMG_CONTEXT):
            if name not in self.added:
                raise ValueError(f"{path}: the InternVL token {name!r} is missing from the added tokens")
        self.img_start_id = self.added[IMG_START].id
        self.img_end_id = self.added[IMG_END].id
        self.img_context_id = self.added[IMG_CONTEXT].id
        # transformers' _decode emits these whole, between separately converted runs: added tokens that are
        # not special, and additional special tokens past the model's own vocabulary.
        self._verbatim = {t for t in self.added if t not in self.all_special_tokens}
        self._verbatim |= {t for t in self.additional_special_tokens
                           if self.added[t].id >= self.base_vocab_size}

    def _read_special_tokens(self, config, special_map):
        """bos/eos/unk/pad and the additional special tokens (tokenizer_config wins over special_tokens_map);
        a special token that is a piece of the model (e.g. <s>) but not listed as added is added here."""
        def special(name):
            tok = config.get(name, special_map.get(name))
            return None if tok is None else _content(tok)

        self.bos_token, self.eos_token = special("bos_token"), special("eos_token")
        self.unk_token, self.pad_token = special("unk_token") or self.unk_default, special("pad_token")
        extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens", []))
        self.additional_special_tokens = [_content(t) for t in extra]
        named = [self.bos_token, self.eos_token, self.unk_token, self.pad_token]
        named += self.additional_special_tokens
        self.all_special_tokens = list(dict.fromkeys(t for t in named if t is not None))
        for t in self.all_special_tokens:
            if t not in self.added:
                pid = self._base_id(t)
                if pid is None or self._base_token(pid) != t:
                    raise ValueError(f"{self.path}: special token {t!r} is neither an added token nor a "
                                     "token of the model")
                self.added[t] = AddedToken(t, pid)
        self.all_special_ids = {self.convert_tokens_to_ids(t) for t in self.all_special_tokens}

    # ---- ids <-> tokens
    def convert_tokens_to_ids(self, token):
        if isinstance(token, (list, tuple)):
            return [self.convert_tokens_to_ids(t) for t in token]
        if token in self.added:
            return self.added[token].id
        return self._base_id(token)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.id_to_added[ids].content if ids in self.id_to_added else self._base_token(ids)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def _split(self, text):
        """Split on added tokens and apply their strip flags: (chunks, starts, runs). chunks[i], starting at
        char starts[i] (possibly empty), is the text before runs[i] = (token, repeats, start): one token or a
        run of one. The last chunk follows the last run."""
        pieces = self._split_re.split(text) if self._split_re is not None else [text]
        at = list(itertools.accumulate(map(len, pieces[:-1]), initial=0))  # where each piece starts
        chunks, starts = pieces[0::2], at[0::2]
        runs = [(*self._runs[m], start) for m, start in zip(pieces[1::2], at[1::2])]
        for i, (tok, _, _) in enumerate(runs):
            if self.added[tok].rstrip:
                stripped = chunks[i + 1].lstrip()
                starts[i + 1] += len(chunks[i + 1]) - len(stripped)
                chunks[i + 1] = stripped
            if self.added[tok].lstrip:
                chunks[i] = chunks[i].rstrip()
        return chunks, starts, runs

    # ---- decoding (transformers' _decode; the class's convert_tokens_to_string is _ids_to_string)
    def decode(self, ids, skip_special_tokens=True):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.all_special_ids)]
        texts, run = [], []
        for i in ids + [None]:
            tok = self.id_to_added.get(i)
            if i is not None and (tok is None or tok.content not in self._verbatim):
                run.append(i)
                continue
            if run:
                text = self._ids_to_string(run)
                if text or i is None:
                    texts.append(text)
                run = []
            if i is not None:
                texts.append(tok.content)
        text = (" " if self.spaces_between_special_tokens else "").join(texts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text


class SentencePieceTokenizer(Tokenizer):
    """InternLM2Tokenizer and LlamaTokenizer (legacy or not) on a sentencepiece tokenizer.model."""

    unk_default = "<unk>"

    def _load_model(self, path, config):
        model_file = os.path.join(path, "tokenizer.model")
        if not os.path.exists(model_file):
            raise FileNotFoundError(f"{model_file}: no sentencepiece model (tokenizer.model) in {path}")
        cls = config.get("tokenizer_class", "")
        if cls.startswith("InternLM2Tokenizer"):
            self.style, self.legacy = "internlm2", True
        else:
            self.style, self.legacy = "llama", bool(config.get("legacy", True))
        self.prefix_space = self.style == "llama" and not self.legacy  # Phi-3's way, see the module docstring
        self.add_prefix_space = bool(config.get("add_prefix_space", True))
        with open(model_file, "rb") as f:
            proto = f.read()
        if self.prefix_space:
            proto += _NO_DUMMY_PREFIX
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.base_vocab_size = self.sp_vocab_size = self.sp.get_piece_size()
        # count_tokens: when no piece joins a character to a following '▁', the pieces of a text are those
        # of its '▁'-led words taken one at a time, so each distinct word needs encoding only once.
        self._dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith(SPIECE_UNDERLINE)
        joins = re.compile(f"[^{SPIECE_UNDERLINE}]{SPIECE_UNDERLINE}")
        self._separable = not any(joins.search(self.sp.id_to_piece(i)) for i in range(self.sp_vocab_size))
        raw = spm.SentencePieceProcessor(model_proto=proto + _NO_DUMMY_PREFIX) if self._dummy_prefix else None
        self._piece_counts = CountCache(functools.partial(_word_length, raw or self.sp))  # picklable

    def _read_special_tokens(self, config, special_map):
        super()._read_special_tokens(config, special_map)
        if self.prefix_space:
            self._unk_len = len(self.sp.encode(self.unk_token, out_type=str))

    def _base_id(self, token):
        return self.sp.piece_to_id(token)

    def _base_token(self, i):
        return self.sp.id_to_piece(i)

    def _with_prefix_space(self, text):
        text = text.replace(SPIECE_UNDERLINE, " ")  # a '▁' in the text is a space to the Llama tokenizer
        return SPIECE_UNDERLINE + text if self.add_prefix_space else text

    def _sp_pieces(self, chunk):
        """Pieces of one text chunk, as the slow tokenizer's _tokenize gives them."""
        if self.prefix_space and chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(self.unk_token + chunk, out_type=str)[self._unk_len:]
        return self.sp.encode(chunk, out_type=str)

    def tokenize(self, text, with_offsets=False):
        """Token strings (and, with_offsets, the char offset in `text` where each starts)."""
        shift = 0
        if self.prefix_space and text:
            text, shift = self._with_prefix_space(text), int(self.add_prefix_space)
        tokens, starts = [], []
        chunks, chunk_starts, runs = self._split(text)
        for i, chunk in enumerate(chunks):
            if chunk:
                pieces = self._sp_pieces(chunk)
                tokens.extend(pieces)
                if with_offsets:
                    starts.extend(chunk_starts[i] + o for o in self._piece_offsets(pieces, chunk))
            if i < len(runs):
                tok, repeats, start = runs[i]
                tokens += [tok] * repeats
                starts += range(start, start + repeats * len(tok), len(tok))
        if (self.prefix_space and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE
                and tokens[1] in self.all_special_tokens):
            tokens, starts = tokens[1:], starts[1:]
        if with_offsets:
            return tokens, [max(s - shift, 0) for s in starts]
        return tokens

    def _piece_offsets(self, pieces, chunk):
        """Char offset in `chunk` where each piece starts. The models use identity normalisation, so
        the pieces spell the chunk (plus a dummy-prefix '▁'); byte-fallback pieces count one byte."""
        chunk = chunk.replace(SPIECE_UNDERLINE, " ")  # same length in chars; '▁' pieces count as ' '
        raw = chunk.encode("utf-8")
        lens = [1 if _BYTE_PIECE.fullmatch(p) else len(p.replace(SPIECE_UNDERLINE, " ").encode("utf-8"))
                for p in pieces]
        extra = sum(lens) - len(raw)  # the dummy prefix, when the model adds one
        if extra not in (0, 1):
            raise ValueError(f"cannot align sentencepiece pieces with the text {chunk[:40]!r}")
        # byte offset -> char offset
        char_at = [ci for ci, ch in enumerate(chunk) for _ in range(len(ch.encode("utf-8")))] + [len(chunk)]
        offsets, pos = [], -extra
        for n in lens:
            offsets.append(char_at[max(pos, 0)])
            pos += n
        return offsets

    def encode(self, text, add_bos=True):
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return ([self.bos_id] if add_bos and self.add_bos else []) + ids

    def count_tokens(self, text, add_bos=True):
        """len(self.encode(text, add_bos)), exactly, at a fraction of the cost (dataset length estimates)."""
        if not self._separable:
            return len(self.encode(text, add_bos))
        if self.prefix_space and text:
            text = self._with_prefix_space(text)
        chunks, _, runs = self._split(text)
        n = (1 if add_bos and self.add_bos else 0) + sum(repeats for _, repeats, _ in runs)
        prefix = SPIECE_UNDERLINE if self._dummy_prefix else ""
        for chunk in chunks:
            if chunk:
                words = _WORD.findall(prefix + chunk.replace(" ", SPIECE_UNDERLINE))
                n += sum(map(self._piece_counts.__getitem__, words))
        if self.prefix_space and chunks[0] and runs:  # tokenize() drops a '▁' before specials
            first = self._sp_pieces(chunks[0])
            nxt = first[1] if len(first) > 1 else runs[0][0]
            n -= first[0] == SPIECE_UNDERLINE and nxt in self.all_special_tokens
        return n

    def encode_with_offsets(self, text, add_bos=True):
        """(ids, starts): starts[k] is the char offset in `text` where token k begins (-1 for BOS)."""
        tokens, starts = self.tokenize(text, with_offsets=True)
        ids = self.convert_tokens_to_ids(tokens)
        if add_bos and self.add_bos:
            return [self.bos_id] + ids, [-1] + starts
        return ids, starts

    def _ids_to_string(self, ids):
        """The class's convert_tokens_to_string: sentencepiece decodes the runs between special tokens; the
        spaces around those follow each class. InternLM2's then applies clean_up_tokenization, always (its
        _maybe_add_prefix_space always prepends " ", comparing a string to a set of ints, and it returns
        out_string[1:]: the two cancel). Llama's drops the '▁' of the first token where add_prefix_space."""
        llama, tokens = self.style == "llama", self.convert_ids_to_tokens(ids)
        if llama and self.add_prefix_space and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, run, prev_special = "", [], False
        for i, tok in enumerate(tokens):
            if tok in self.all_special_tokens:
                if not prev_special and self.legacy and (i != 0 or not llama):
                    out += " "
                out += self.sp.decode(run) + tok
                prev_special, run = True, []
            else:
                if (llama and prev_special and i == 1 and self.add_prefix_space
                        and not tok.startswith(SPIECE_UNDERLINE)):
                    out += " "
                run.append(tok)
                prev_special = False
        out += self.sp.decode(run)
        return out if llama else clean_up_tokenization(out)


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory, by tokenizer_config.json's tokenizer_class: tokenizer.model
    (InternLM2Tokenizer, LlamaTokenizer) or vocab.json + merges.txt (Qwen2Tokenizer), with added_tokens.json
    and special_tokens_map.json."""
    config_file = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file}: no tokenizer_config.json in {path}")
    cls = _read_json(config_file).get("tokenizer_class") or ""
    if cls.startswith(("InternLM2Tokenizer", "LlamaTokenizer")):
        return SentencePieceTokenizer(path)
    if cls.startswith("Qwen2Tokenizer"):
        from .bpe import Qwen2Tokenizer  # data/bpe.py builds on this module
        return Qwen2Tokenizer(path)
    if cls.startswith("PreTrainedTokenizerFast"):
        raise ValueError(f"{config_file}: tokenizer_class {cls!r}: a tokenizer.json-only tokenizer (such as "
                         "InternVL2-Llama3-76B's Llama-3 one) is not supported")
    raise ValueError(f"{config_file}: tokenizer_class {cls!r} is not supported (expected InternLM2Tokenizer, "
                     "LlamaTokenizer or Qwen2Tokenizer)")
