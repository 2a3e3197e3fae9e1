"""Qwen2's byte-level BPE (vocab.json + merges.txt) with the semantics of the official slow Qwen2Tokenizer.

The slow tokenizer NFC-normalises the text, splits it on the added tokens (as every slow tokenizer does,
data/tokenizer.py), cuts each piece between them with Qwen2's pre-tokenizer regex, spells every UTF-8 byte
as a printable character (GPT-2's bytes_to_unicode) and applies the merges of merges.txt to each word, lowest
merge first. No BOS, no UNK; decoding joins the bytes and decodes them as UTF-8 with errors="replace".

tiktoken runs the same regex and BPE in Rust, but it ranks a pair by the id of the token the two parts
make, not by the pair itself: it would also join two parts that make a vocabulary token by another split than
the one merges.txt lists. Loading proves that it never does, or refuses the files: the ids of the merge
results rise in merge order, the vocabulary is the 256 bytes and the merge results, and for every token that
can be split into two vocabulary tokens in more than one way, tiktoken's own way of building it (ranks below
its own) ends in the listed merge. Then the two agree on every text: inside the span of a token, the merges
before it are those of encoding the token alone.
"""
import functools
import json
import os
import re
import unicodedata

import tiktoken

from .tokenizer import CountCache, Tokenizer

# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (the pattern of Qwen's own tiktoken tokenizer)
PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
_ASCII_LED = re.compile(r"[\x00-\x7f][^\x00-\x7f]*|[^\x00-\x7f]+")
# A space before a non-space character always starts a pre-token of PRETOKENIZE: no pattern ends in a space
# that a non-space follows, and none holds one in its middle. The pieces between such spaces tokenise alone.
_SPACE_WORDS = re.compile(r"(?= \S)")


def _piece_length(enc, piece):
    return len(enc.encode_ordinary(piece))


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, in which vocab.json and merges.txt spell
    tokens: printable Latin-1 bytes stand for themselves, the others for chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(shifted)}}


def _read_merges(path):
    """[(line number, left, right)] of merges.txt, without its '#version' header."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{path}:{line_no}: a merge is two tokens separated by one space, "
                                 f"got {line!r}")
            merges.append((line_no, *parts))
    return merges


def _rank_split(token, ranks):
    """The parts that tiktoken joins last when it builds `token` from its bytes, using only ranks below the
    token's own (lowest rank first, leftmost on a tie); more than two parts where it cannot build it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def nfc_origins(text):
    """NFC(text), and for each of its characters the offset in `text` it comes from. The text is cut before
    every ASCII character (no ASCII character composes with what precedes it, and a starter stops reordering),
    so each piece normalises on its own; inside a piece that changes, characters keep their order."""
    nfc, origins = [], []
    for m in _ASCII_LED.finditer(text):
        piece = unicodedata.normalize("NFC", m.group())
        nfc.append(piece)
        origins += [m.start() + min(k, len(m.group()) - 1) for k in range(len(piece))]
    return "".join(nfc), origins


class Qwen2Tokenizer(Tokenizer):
    """Qwen2Tokenizer (slow) on tiktoken; see the module docstring."""

    def __init__(self, path):
        super().__init__(path)
        self.add_bos = False  # the class adds no special tokens, whatever the config says

    def _load_model(self, path, config):
        vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for f in (vocab_file, merges_file):
            if not os.path.exists(f):
                raise FileNotFoundError(f"{f}: missing (a Qwen2Tokenizer needs vocab.json and merges.txt)")
        self.errors = config.get("errors", "replace")
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        try:
            ranks = {bytes(byte_of[c] for c in tok): i for tok, i in self.vocab.items()}
        except KeyError as e:
            raise ValueError(f"{vocab_file}: a token with the character {e.args[0]!r}, which is no byte of "
                             "the byte-level alphabet") from None
        if len(ranks) != len(self.vocab) or len(set(ranks.values())) != len(ranks):
            raise ValueError(f"{vocab_file}: two tokens share an id or spell the same bytes")
        self._check_merges(merges_file, _read_merges(merges_file), ranks, vocab_file)
        self.base_vocab_size = len(self.vocab)
        self._tokens = {i: tok for tok, i in self.vocab.items()}
        self._token_len = {i: len(b) for b, i in ranks.items()}
        self.enc = tiktoken.Encoding(f"qwen2:{os.path.abspath(path)}", pat_str=PRETOKENIZE,
                                     mergeable_ranks=ranks, special_tokens={})
        self._word_counts = CountCache(functools.partial(_piece_length, self.enc))  # picklable

    @staticmethod
    def _check_merges(merges_file, merges, ranks, vocab_file):
        """The conditions under which tiktoken's ranks give the ids of merges.txt (module docstring)."""
        singles = [b for b in ranks if len(b) == 1]
        if len(singles) != 256:
            raise ValueError(f"{vocab_file}: {len(singles)} single-byte tokens, expected all 256")
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        made, last = {}, -1
        for line_no, left, right in merges:
            try:
                a, b = bytes(byte_of[c] for c in left), bytes(byte_of[c] for c in right)
            except KeyError:
                raise ValueError(f"{merges_file}:{line_no}: {left!r} {right!r} is not spelled in the "
                                 "byte-level alphabet") from None
            if a not in ranks or b not in ranks or a + b not in ranks:
                raise ValueError(f"{merges_file}:{line_no}: {left!r} + {right!r}: a part or the result is "
                                 "not in vocab.json")
            if a + b in made or ranks[a + b] <= last:
                raise ValueError(f"{merges_file}:{line_no}: the ids of vocab.json are not in merge order (or "
                                 "a token is made twice); ranked BPE cannot reproduce these merges")
            made[a + b], last = (a, b), ranks[a + b]
        extra = len(ranks) - 256 - len(made)
        if extra:
            raise ValueError(f"{vocab_file}: {extra} tokens are neither a byte nor made by a merge of "
                             f"{merges_file}")
        for token, (a, b) in made.items():
            splits = sum(token[:k] in ranks and token[k:] in ranks for k in range(1, len(token)))
            if splits > 1 and _rank_split(token, ranks) != [a, b]:
                raise ValueError(f"{merges_file}: token {token!r} is listed as {a!r} + {b!r}, but ranked BPE "
                                 f"builds it as {_rank_split(token, ranks)}: these merges are not supported")

    def _read_special_tokens(self, config, special_map):
        super()._read_special_tokens(config, special_map)
        self.spaces_between_special_tokens = False  # Qwen2Tokenizer._decode's own default

    def _base_id(self, token):
        return self.vocab.get(token)

    def _base_token(self, i):
        return self._tokens.get(i)

    def encode(self, text, add_bos=True):
        return self._encode(text, False)[0]

    def count_tokens(self, text, add_bos=True):
        """len(self.encode(text)), exactly, from cached counts of its space-led pieces (dataset lengths)."""
        chunks, _, runs = self._split(unicodedata.normalize("NFC", text))
        n = sum(repeats for _, repeats, _ in runs)
        for chunk in chunks:
            if chunk:
                n += sum(map(self._word_counts.__getitem__, _SPACE_WORDS.split(chunk)))
        return n

    def encode_with_offsets(self, text, add_bos=True):
        """(ids, starts): starts[k] is the char offset in `text` where token k begins."""
        return self._encode(text, True)

    def _encode(self, text, with_offsets):
        normal = unicodedata.normalize("NFC", text)
        chunks, chunk_starts, runs = self._split(normal)
        ids, starts = [], []
        for i, chunk in enumerate(chunks):
            if chunk:
                piece = self.enc.encode_ordinary(chunk)
                ids += piece
                if with_offsets:
                    starts += self._offsets(piece, chunk, chunk_starts[i])
            if i < len(runs):
                tok, repeats, start = runs[i]
                ids += [self.added[tok].id] * repeats
                if with_offsets:
                    starts += range(start, start + repeats * len(tok), len(tok))
        if with_offsets and normal != text:
            pieces, origins = nfc_origins(text)
            if pieces != normal:  # not expected (see nfc_origins); keep the offsets in range and in order
                origins = [min(k, len(text) - 1) for k in range(len(normal))]
            starts = [origins[s] for s in starts]
        return ids, starts

    def _offsets(self, ids, chunk, at):
        """Char offset where each token starts (a token that starts inside a character: that character)."""
        byte_starts, pos = [], 0
        for i in ids:
            byte_starts.append(pos)
            pos += self._token_len[i]
        if chunk.isascii():
            return [at + p for p in byte_starts]
        char_at = [ci for ci, ch in enumerate(chunk) for _ in range(len(ch.encode("utf-8")))]
        return [at + char_at[p] for p in byte_starts]

    def _ids_to_string(self, ids):
        """Qwen2Tokenizer.convert_tokens_to_string: the bytes of the run, decoded with errors='replace'."""
        data = b"".join(self.id_to_added[i].content.encode("utf-8") if i in self.id_to_added
                        else self.enc.decode_single_token_bytes(i) for i in ids)
        return data.decode("utf-8", errors=self.errors)
