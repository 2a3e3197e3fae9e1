"""LLaVA-format annotations -> training samples, token-exact with the official InternVL 1.5 pipeline.

`build_sample` turns one record into input_ids, labels, pixel_values and image_flags. `SupervisedDataset`
checks every record and image file up front (all problems reported together, with file:line), keeps only an
index of the records (byte offsets, lines, length estimates; cached on disk) and reads a record when it is
needed. A missing or corrupt image or an over-long sample then becomes a counted, logged skip: a seeded
replacement of the same modality takes its slot, so batches keep their shape reproducibly.
"""
import codecs
import collections
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from model.loss import target_mask
from model.weights import sampled_sha1

from .images import (IMAGE_SIZE, ImageLoadError, dummy_pixel_values, header_size, images_to_pixel_values,
                     jpeg_degrade, load_image, num_tiles, per_image_cap)
from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from .templates import (NUM_IMAGE_TOKENS, get_template, image_tokens, make_labels, render,
                        resolve_system_message)

log = logging.getLogger("data")

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")


class SampleError(ValueError):
    """A record that cannot become a training sample (bad annotation)."""


class SampleTooLong(SampleError):
    """The image tokens do not fit in max_length, or truncation leaves no supervised token."""


class DataError(ValueError):
    """Problems found while building the dataset (all of them, with file:line)."""


@dataclass
class Conversation:
    images: list  # image paths as written in the record; [] for text-only
    turns: list  # [(human value, gpt value)]
    system: str = None  # a leading system turn's value: the sample's system message; None: the run's
    gpt_first: bool = False  # a leading gpt turn (after the system turn) was dropped (not a by_role template)
    lead: str = None  # that turn's value where the template keeps it (by_role): an answer before the question


def parse_record(record, template):
    """Check one LLaVA record and return its Conversation under `template` (whose official code keeps or drops
    a leading gpt turn, and reads image tags in every turn or in human turns only); raise SampleError saying
    what is wrong."""
    t = get_template(template)
    if not isinstance(record, dict):
        raise SampleError(f"record is a {type(record).__name__}, expected a JSON object")
    image = record.get("image")
    if image is None or image == "" or image == []:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) and p for p in image):
        images = list(image)
    else:
        raise SampleError(f"'image' must be a path or a list of paths, got {image!r:.80}")
    convs = record.get("conversations")
    if convs is None:
        raise SampleError("missing 'conversations'")
    if not isinstance(convs, list) or not convs:
        raise SampleError("'conversations' must be a non-empty list")
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(f"conversations[{k}] must be an object with 'from' and 'value'")
        if turn["from"] == "system" and k:
            raise SampleError(f"conversations[{k}]: a 'system' turn may only come first")
        if turn["from"] not in ROLES + ("system",):
            raise SampleError(f"conversations[{k}]: unknown role {turn['from']!r} "
                              "(expected 'human' or 'gpt', or 'system' first)")
        if not isinstance(turn["value"], str):
            raise SampleError(f"conversations[{k}]: 'value' must be a string")
        if not turn["value"].strip() and turn["from"] != "system":  # an empty system message is one
            raise SampleError(f"conversations[{k}] ({turn['from']}) is empty")
        if turn["from"] == "system" and IMAGE_TAG in turn["value"]:
            raise SampleError(f"conversations[{k}] (system) holds {IMAGE_TAG}: images go in human turns")
        for token in (IMG_CONTEXT, IMG_START, IMG_END):  # the tokenizer would make it the image token itself
            if token in turn["value"]:
                raise SampleError(f"conversations[{k}] ({turn['from']}) holds {token} literally: only the "
                                  f"image's own tokens may be {token} (write {IMAGE_TAG} for an image)")
    system = convs[0]["value"] if convs[0]["from"] == "system" else None
    first = 0 if system is None else 1
    leading = first < len(convs) and convs[first]["from"] == "gpt"
    lead = convs[first]["value"] if leading and t.by_role else None  # official: kept as an answer, or skipped
    first += leading
    rest = convs[first:]
    for k, turn in enumerate(rest):
        if turn["from"] != ROLES[k % 2]:
            raise SampleError(f"conversations[{first + k}]: expected role {ROLES[k % 2]!r}, got "
                              f"{turn['from']!r} (turns must alternate human/gpt)")
    if not any(t["from"] == "gpt" for t in rest):
        raise SampleError("no answer turn ('gpt') after a 'human' turn")
    if len(rest) % 2:
        raise SampleError(f"conversations[{len(convs) - 1}] (human) has no answer")
    turns = [(rest[k]["value"], rest[k + 1]["value"]) for k in range(0, len(rest), 2)]
    tags = sum(pair[side].count(IMAGE_TAG) for pair in turns for side in _image_sides(t))
    if tags > len(images):
        raise SampleError(f"{tags} {IMAGE_TAG} tags but {len(images)} image(s)")
    if len(images) > 1 and tags != len(images):
        in_answers = sum(a.count(IMAGE_TAG) for _, a in turns) + (lead or "").count(IMAGE_TAG)
        why = (f"; under {t.name} only human turns' tags are images (a gpt turn's {in_answers} stay text, "
               "and the official code drops the sample)" if t.by_role and in_answers else "")
        raise SampleError(f"{len(images)} images but {tags} {IMAGE_TAG} tags "
                          f"(multi-image samples need one each){why}")
    return Conversation(images, turns, system, leading and not t.by_role, lead)


def _image_sides(template):
    """Which side of a (question, answer) pair holds image tags: preprocess_internvl2_5 replaces the human
    turns' only (a gpt turn's tag stays text), the others replace the tags anywhere in the text."""
    return (0,) if template.by_role else (0, 1)


def conversation_text(conv, template, tiles_per_image, system_message, tile_tokens=NUM_IMAGE_TOKENS):
    """Rendered prompt with image tokens (`tile_tokens` <IMG_CONTEXT> per tile: the model's num_image_token),
    and the char spans of the supervised answers. The record's system turn, where it has one, replaces
    system_message (as preprocess_internvl2_5 does; for the other templates as their official code would with
    that system message set: it stops at the unknown role)."""
    t = get_template(template)
    turns, sides = [list(pair) for pair in conv.turns], _image_sides(t)
    if len(conv.images) == 1 and not any(IMAGE_TAG in pair[side] for pair in turns for side in sides):
        # official: in front of conversations[0]; where that is a system or (internvl2_5) a leading gpt turn,
        # the official tag becomes literal text there (or, with no tag in a human turn, fails an assertion):
        # here it goes before the question
        turns[0][0] = IMAGE_TAG + "\n" + turns[0][0]
    if conv.system is not None:
        system_message = conv.system.strip() if t.strip_messages else conv.system
    if t.strip_messages:
        turns = [[v.strip() for v in pair] for pair in turns]
    k = 0
    for pair in turns:  # each <image>, in order, becomes the tokens of the next image
        for side in sides:
            while IMAGE_TAG in pair[side]:
                pair[side] = pair[side].replace(IMAGE_TAG, image_tokens(tiles_per_image[k], tile_tokens), 1)
                k += 1
    return render(t, [tuple(p) for p in turns], system_message, conv.lead)


def build_sample(record, tokenizer, template, image_folder=None, max_num=12, max_length=None,
                 system_message=None, *, min_num=1, image_size=IMAGE_SIZE, tile_tokens=NUM_IMAGE_TOKENS,
                 use_thumbnail=True, images=None):
    """One LLaVA record -> dict(input_ids, labels, pixel_values, image_flags, truncated). `images` (PIL)
    replaces loading from disk. Raises SampleError (bad record), SampleTooLong, ImageLoadError."""
    conv = parse_record(record, template)
    if conv.images:
        if images is None:
            images = [load_image(os.path.join(image_folder or "", p)) for p in conv.images]
        pixel_values, tiles = images_to_pixel_values(images, max_num, min_num, image_size, use_thumbnail)
        image_flags = torch.ones(len(pixel_values), dtype=torch.long)
    else:
        pixel_values, tiles = dummy_pixel_values(image_size), []
        image_flags = torch.zeros(1, dtype=torch.long)
    system_message = resolve_system_message(override=system_message, template=get_template(template).name)
    text, spans = conversation_text(conv, template, tiles, system_message, tile_tokens)
    ids, starts = tokenizer.encode_with_offsets(text)
    labels = make_labels(template, tokenizer, ids, starts, spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        image_end = max((i + 1 for i, t in enumerate(ids) if t == tokenizer.img_end_id), default=0)
        if image_end > max_length:
            raise SampleTooLong(f"image tokens end at position {image_end} > max_length {max_length} "
                                f"({sum(tiles)} tiles, {len(ids)} tokens); lower max_num or raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    if not target_mask(torch.tensor(labels)).any():
        raise SampleTooLong(f"no supervised token left ({len(ids)} tokens, max_length {max_length})")
    wide = [p for p, im in zip(conv.images, images or []) if "wide_mode" in im.info]
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                pixel_values=pixel_values, image_flags=image_flags, truncated=truncated,
                gpt_first=conv.gpt_first, wide_images=wide)


@dataclass
class Source:
    """One annotation file. repeat: r < 1 keeps a seeded random fraction r; r >= 1 floor(r) full copies
    plus a seeded random fraction r - floor(r). max_num overrides the run's tile cap for this source."""
    annotation: str
    image_folder: str = None
    repeat: float = 1.0
    max_num: int = None
    data_augment: bool = False
    name: str = None

    def __post_init__(self):
        if self.name is None:
            self.name = os.path.splitext(os.path.basename(self.annotation))[0]
        if not (isinstance(self.repeat, (int, float)) and self.repeat > 0 and math.isfinite(self.repeat)):
            raise ValueError(f"source {self.name}: repeat must be a positive number, got {self.repeat!r}")

    @classmethod
    def parse(cls, spec):
        """CLI form 'annotation.jsonl[,image_folder[,repeat[,max_num]]]' (empty fields keep defaults)."""
        parts = spec.split(",")
        if len(parts) > 4 or not parts[0]:
            raise ValueError(f"bad source {spec!r}: expected annotation[,image_folder[,repeat[,max_num]]]")
        parts += [""] * (4 - len(parts))
        return cls(parts[0], parts[1] or None, float(parts[2]) if parts[2] else 1.0,
                   int(parts[3]) if parts[3] else None)


def read_meta_file(path):
    """The official meta JSON: {name: {root, annotation, repeat_time, max_dynamic_patch, data_augment}}."""
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: the meta file must map dataset names to settings")
    known = {"root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length"}
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    for name, ds in meta.items():
        if not isinstance(ds, dict) or "annotation" not in ds:
            raise DataError(f"{path}: dataset {name!r} needs an 'annotation' path")
        unknown = set(ds) - known
        if unknown:
            raise DataError(f"{path}: dataset {name!r} has unknown keys {sorted(unknown)} "
                            f"(known: {sorted(known)})")
        root = ds.get("root") or None
        sources.append(Source(os.path.join(base, ds["annotation"]), root and os.path.join(base, root),
                              float(ds.get("repeat_time", 1)), ds.get("max_dynamic_patch"),
                              bool(ds.get("data_augment", False)), name))
    return sources


def read_annotation(path, parse=True):
    """Yield (line, byte offset, byte length, record or SampleError) for every record of a .jsonl file or a
    .json array; line = where the record starts. A .json array that cannot be read on is a DataError.
    parse=False leaves a .jsonl line as bytes, for parse_line to read elsewhere."""
    if not path.endswith(".jsonl"):
        yield from _read_json_array(path)
        return
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, offset, len(raw), parse_line(raw) if parse else raw
            offset += len(raw)


def parse_line(raw):
    """One .jsonl line -> its record, or the SampleError that says why it is not one."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        return SampleError(f"malformed JSON line: {e.msg} (column {e.colno})")
    except UnicodeDecodeError as e:
        return SampleError(f"not UTF-8: {e.reason}")


_WS = re.compile(r"[ \t\r\n]*")  # JSON whitespace
_JSON_BLOCK = 8 << 20  # bytes of a .json array decoded at a time


class _Blocks:
    """A file's UTF-8 text, decoded a block at a time. Positions index self.text; `line` and `byte` are those
    of position `at`. drop() forgets the text before `at` (also mid-line: a one-line array has no other place
    to cut), so the text held stays within a few blocks; `column` is that of text[0] in its line."""

    def __init__(self, f, path, block):
        self.f, self.path, self.block = f, path, block
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.eof, self.line, self.byte, self.at, self.column = "", False, 1, 0, 0, 0

    def more(self):
        """Decode the next block onto the text; False at the end of the file."""
        if self.eof:
            return False
        raw = self.f.read(self.block)
        self.eof = not raw
        try:
            self.text += self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:  # e.object: the undecoded bytes, from the start of this block on
            line = self.line + self.text.count("\n", self.at) + e.object.count(b"\n", 0, e.start)
            raise DataError(f"{self.path}:{line}: not UTF-8: {e.reason}") from None
        return True

    def ahead(self, pos):
        """At least a block of text after pos, or the rest of the file."""
        while len(self.text) - pos < self.block and self.more():
            pass

    def skip_ws(self, pos):
        """The position after the JSON whitespace at pos, reading on while it runs to the end of the text."""
        while (end := _WS.match(self.text, pos).end()) == len(self.text) and self.more():
            pass
        return end

    def seek(self, pos):
        """(line, byte offset) of pos; positions only move forward."""
        chunk = self.text[self.at:pos]
        self.line += chunk.count("\n")
        self.byte += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
        self.at = pos
        return self.line, self.byte

    def drop(self):
        """Forget the text before `at`; returns by how much positions move back."""
        cut, newline = self.at, self.text.rfind("\n", 0, self.at)
        self.column = cut - newline - 1 if newline >= 0 else self.column + cut
        self.text, self.at = self.text[cut:], 0
        return cut

    def where(self, e):
        """(line, column) in the file of a JSONDecodeError raised on self.text."""
        line = self.line - self.text.count("\n", 0, self.at) + e.lineno - 1
        return line, e.colno + (self.column if e.lineno == 1 else 0)


def _read_json_array(path):
    """json.load, one element at a time (raw_decode), so that each record keeps its line and byte range. The
    file is decoded a block at a time (_JSON_BLOCK): memory holds a block or two, not the file (a record that
    cannot be parsed is retried with more text, up to the whole rest of the file, before it is reported)."""
    with open(path, "rb") as f:
        src = _Blocks(f, path, _JSON_BLOCK)
        pos = src.skip_ws(0)
        if not src.text.startswith("[", pos):
            raise DataError(f"{path}:{src.seek(pos)[0]}: a .json annotation must be an array of records "
                            "(or use .jsonl)")
        pos = src.skip_ws(pos + 1)
        decoder, done = json.JSONDecoder(), src.text.startswith("]", pos)
        while not done:
            first, start = src.seek(pos)
            if src.at > src.block:
                pos -= src.drop()
            src.ahead(pos)
            while True:
                try:
                    obj, end = decoder.raw_decode(src.text, pos)
                    break
                except json.JSONDecodeError as e:  # the rest of the array cannot be read: not skippable
                    if not src.more():  # (else the record ran past the text read so far)
                        line, col = src.where(e)
                        raise DataError(f"{path}:{line}: malformed JSON: {e.msg} (column {col})") from None
            yield first, start, src.seek(end)[1] - start, obj
            sep = src.skip_ws(end)
            if not src.text.startswith((",", "]"), sep):
                line = src.seek(sep)[0]
                raise DataError(f"{path}:{line}: malformed JSON: expected ',' or ']' after a record")
            pos, done = src.skip_ws(sep + 1), src.text.startswith("]", sep)


def repeat_indices(n, ratio, rng):
    """floor(ratio) full passes over range(n) plus a seeded random int(frac * n) of them, sorted."""
    whole = int(math.floor(ratio))
    extra = int((ratio - whole) * n + 1e-9)  # guard 0.3 * 10 = 2.9999999999999996
    return list(range(n)) * whole + sorted(rng.sample(range(n), extra))


def file_fingerprint(path, chunks=64, chunk=4096):
    """Size, mtime and a hash of `chunks` evenly spread `chunk`-byte pieces (the whole file when it is small):
    cheap on a multi-GB annotation. The index cache is keyed by it; resume compares size and hash."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha1": sampled_sha1(path, chunks, chunk)}


def default_cache_dir():
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "internvl", "index")
    return os.environ.get("INTERNVL_DATA_CACHE") or home_cache


def _read_cached_index(path):
    """The index cached at path, or None where it is unreadable (truncated, corrupt: rebuilt and rewritten)
    or stale: an image folder it looked in has changed since (images added or removed)."""
    try:
        with np.load(path) as z:
            x = {c: z[c] for c in _COLUMNS}
            x.update(json.loads(z["info"].tobytes()))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("index cache %s is unreadable (%s: %s): rebuilding it", path, type(e).__name__, e)
        return None
    changed = [f for f, stamp in x["folders"].items() if isinstance(stamp, str) or folder_stamp(f) != stamp]
    if changed:
        log.info("index cache %s: %d image folder(s) changed since (first: %s): rebuilding it", path,
                 len(changed), changed[0])
        return None
    return x


def _exists(path, listings):
    """os.path.exists through one directory listing per folder (fast for 100k's of images). listings[folder]:
    (its names, its folder_stamp taken before the listing)."""
    folder, name = os.path.split(path)
    if folder not in listings:
        stamp = folder_stamp(folder)
        if stamp is not None and time.time_ns() - stamp < _RECENT_NS:  # it may change again within the
            stamp = "recent"  # same timestamp tick, unseen: an index that lists it now is never reused
        try:
            listings[folder] = set(os.listdir(folder or ".")), stamp
        except OSError:
            listings[folder] = set(), stamp
    return name in listings[folder][0]


def folder_stamp(folder):
    """What says that a folder's files changed: its mtime (a file added, removed or renamed into it changes
    it; an existing file rewritten in place does not), or None when it does not exist."""
    try:
        return os.stat(os.path.abspath(folder or ".")).st_mtime_ns
    except OSError:
        return None


def _image_sizes(rec, paths, headers):
    """(width, height) per image: the record's `image_wh` when it is valid, else read from each file's header
    (memoised by path in `headers`: LLaVA reuses images); None for an image whose header cannot be read."""
    wh = rec.get("image_wh")
    if isinstance(wh, list) and wh and isinstance(wh[0], (int, float)):
        wh = [wh]  # XTuner writes [W, H] for one image
    if isinstance(wh, list) and len(wh) == len(paths) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p) for p in wh):
        return [tuple(p) for p in wh]
    for path in paths:
        if path not in headers:
            try:
                headers[path] = header_size(path)
            except ImageLoadError:
                headers[path] = None
    return [headers[path] for path in paths]


# 2: tiles read from the image headers where a record has no image_wh (1 charged the cap)
# 3: literal image tokens in a record's text are bad samples
# 4: full_length, need and gpt_first: what --max-length cuts or cannot fit, and dropped leading gpt turns
# 5: the stamps of the image folders it looked in (a change makes it stale); keyed by the cwd too
# 6: a leading system turn is valid (its tokens counted), no longer a bad sample
INDEX_VERSION = 6
_COLUMNS = {"offset": np.int64, "nbytes": np.int64, "line": np.int64, "length": np.int32, "tiles": np.int32,
            "is_image": np.bool_, "full_length": np.int64, "need": np.int64, "gpt_first": np.bool_}
_SHOWN = 50  # problems listed in the error; the rest are counted
_PROBLEMS_KEPT = 1000  # problems kept per source (with file:line); the rest are counted
# Index workers: a source file of at least _PARALLEL_BYTES is checked and estimated by up to
# _MAX_INDEX_WORKERS forked processes (one per core), _SCAN_CHUNK records per task.
_PARALLEL_BYTES = 16 << 20
_MAX_INDEX_WORKERS = 16
_SCAN_CHUNK = 2000
_SCANNING = None  # (dataset, source index, memo) while forked index workers run
_RECENT_NS = 2 * 10**9  # a folder changed this recently when listed: its mtime does not prove it current


def _scan_in_worker(chunk):
    dataset, si, memo = _SCANNING
    return dataset._scan_records(si, chunk, memo)


def _batched(items, n):
    """Lists of n items (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class SupervisedDataset(torch.utils.data.Dataset):
    """Samples from several sources. After construction:
      len(ds)            samples per epoch after repeat ratios
      ds.lengths[i]      tokens of sample i (numpy): the built sample's length (text counted, + tile_tokens
                         per tile, capped at max_length), or above it where an image header was unreadable
      ds.is_image[i]     modality for the sampler (True = has images)
      ds.tiles[i]        image tiles (0 for text-only), from `image_wh` or else each image file's header; the
                         cap (+ thumbnail) for an image whose header cannot be read (an upper bound)
      ds.source_counts   {name: {"records", "bad", "missing_images", "valid", "sampled"}}
      ds.adjusted        {name: {"too_long" (left out: they cannot fit max_length), "cut" (answers cut at
                         max_length), "gpt_first" (a leading gpt turn dropped, as official), "first_cut",
                         "first_gpt_first" (file:line or None)}}: valid records, before repeat ratios
      ds[i]              build_sample output + "meta" {"id", "skipped", "image_failures", "truncated",
                         "gpt_first", "wide_images" (paths of 16-bit images, clipped as official)}

    The index is built in one pass over each file, or read from `cache_dir` where a build with the same file
    content, image folder, tokenizer, template, system message and tile/length settings left it. `index`
    (ds.source_index of another process) skips both. `index_workers`: processes that check the records of a
    file while it is read (default: one per core, up to 16, for files of 16 MiB and more; 1: none).
    """

    def __init__(self, sources, tokenizer, template, system_message=None, max_num=12, max_length=None,
                 min_num=1, use_thumbnail=True, image_size=IMAGE_SIZE, tile_tokens=NUM_IMAGE_TOKENS, seed=0,
                 skip_bad_samples=False,
                 max_image_failure_rate=0.01, image_failure_grace=10, max_replacements=10, cache_dir=None,
                 index=None, index_workers=None):
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system_message = resolve_system_message(override=system_message, template=self.template.name)
        self.max_num, self.max_length, self.min_num = max_num, max_length, min_num
        self.use_thumbnail, self.image_size, self.seed = use_thumbnail, image_size, seed
        self.tile_tokens = tile_tokens  # <IMG_CONTEXT> per tile: the model's num_image_token
        self.max_image_failure_rate, self.image_failure_grace = max_image_failure_rate, image_failure_grace
        self.max_replacements = max_replacements
        self.index_workers = index_workers
        self.epoch, self._tiles_memo = 0, {}
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"source names must be unique, got {names}")
        self.source_index = index or [self._load_index(si, cache_dir) for si in range(len(self.sources))]
        self.source_counts = {s.name: {"records": x["records"], "bad": x["bad"],
                                       "missing_images": x["missing_images"], "valid": len(x["line"])}
                              for s, x in zip(self.sources, self.source_index)}
        self._report_problems(skip_bad_samples)
        self._fits = self._leave_out_too_long(skip_bad_samples)
        self._repeat()
        self.stats = {"seen": 0, "image_failures": 0, "too_long": 0}
        # Per-sample problems are logged here; train.py turns this off and reports them from the batch meta
        # in the main process with a per-run cap (DataLoader workers restart every epoch).
        self.log_problems = True

    def _leave_out_too_long(self, skip_bad_samples):
        """Records that cannot fit max_length even cut (an image past it, or no answer token left), found in
        the index and left out before training: up to max(10, 1 %) of the valid records, or any number with
        skip_bad_samples, counted and logged; more is a DataError saying what to change. Also counts the
        records whose answers max_length cuts, and those whose leading gpt turn is dropped (as official).
        Returns, per source, the positions of the records that train."""
        fits, unfit, valid, self.adjusted = [], [], 0, {}
        for s, x in zip(self.sources, self.source_index):
            too_long = x["need"] > self.max_length if self.max_length else np.zeros(len(x["line"]), bool)
            cut = (x["full_length"] > x["length"]) & ~too_long
            counts = self.adjusted[s.name] = {}
            counts.update(too_long=int(too_long.sum()), cut=int(cut.sum()),
                          gpt_first=int(x["gpt_first"].sum()))
            for name, mask in (("first_cut", cut), ("first_gpt_first", x["gpt_first"])):
                counts[name] = f"{s.annotation}:{x['line'][mask.argmax()]}" if mask.any() else None
            unfit += [(f"{s.annotation}:{x['line'][k]}", int(x["need"][k])) for k in np.flatnonzero(too_long)]
            fits.append(np.flatnonzero(~too_long))
            valid += len(x["line"])
        if not unfit:
            return fits
        n, (where, need) = len(unfit), unfit[0]
        message = (f"{n} of {valid} samples cannot fit --max-length {self.max_length} even cut: their image "
                   f"tokens or their first answer end past it (first: {where}, which needs {need}); "
                   f"--max-length {max(k for _, k in unfit)} fits them all, fewer tiles (--max-tiles) "
                   f"shorten image samples")
        if n == valid:
            raise DataError(f"{message}: no sample would be left")
        if n > max(10, 0.01 * valid) and not skip_bad_samples:
            raise DataError(f"{message}. Up to max(10, 1%) of the samples are left out and counted; "
                            f"--skip-bad-samples leaves out any number")
        log.warning("left out: %s", message)
        return fits

    def _repeat(self):
        """The epoch's samples: each source's records that fit, under its repeat ratio, seeded by its name."""
        picks = []
        for si, s in enumerate(self.sources):
            fits = self._fits[si]
            p = fits[np.array(repeat_indices(len(fits), s.repeat, random.Random(f"{self.seed}/{s.name}")),
                              dtype=np.int64)]
            picks.append(np.stack([np.full(len(p), si), p], 1))
            self.source_counts[s.name]["sampled"] = len(p)
        self.index = np.concatenate(picks)  # rows (source, valid record)
        if not len(self.index):
            raise DataError("no samples: every source is empty after validation and repeat ratios")
        cols = {c: np.concatenate([x[c][p[:, 1]] for x, p in zip(self.source_index, picks)])
                for c in ("length", "is_image", "tiles")}
        self.lengths, self.is_image, self.tiles = cols["length"], cols["is_image"], cols["tiles"]
        self._by_modality = {True: np.flatnonzero(self.is_image), False: np.flatnonzero(~self.is_image)}

    def _max_num(self, si):
        return self.sources[si].max_num or self.max_num

    def _cache_key(self, si):
        s, h = self.sources[si], hashlib.sha1()
        for name in ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                     "added_tokens.json", "special_tokens_map.json"):
            path = os.path.join(self.tokenizer.path, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    h.update(f.read())
        key = [INDEX_VERSION, file_fingerprint(s.annotation),  # image paths resolve against the folder or cwd
               os.path.abspath(s.image_folder or "."), h.hexdigest(), self.template.name,
               self.system_message, self._max_num(si), self.min_num,
               self.image_size, self.tile_tokens, self.use_thumbnail, self.max_length]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()

    def _load_index(self, si, cache_dir):
        s = self.sources[si]
        if not os.path.exists(s.annotation):
            raise DataError(f"{s.annotation}: annotation file not found (source {s.name})")
        path = cache_dir and os.path.join(cache_dir, f"{self._cache_key(si)}.npz")
        x = path and os.path.exists(path) and _read_cached_index(path)
        if x:
            log.info("index of %s read from %s", s.annotation, path)
            return x
        x = self._scan(si)
        if path:  # written whole and synced, then renamed: a reader never sees half a file
            info = {k: x[k] for k in ("records", "bad", "missing_images", "unread_headers", "problems",
                                      "folders")}
            info = np.frombuffer(json.dumps(info).encode(), np.uint8)
            tmp = f"{path}.{os.getpid()}.tmp.npz"
            try:
                os.makedirs(cache_dir, exist_ok=True)
                with open(tmp, "wb") as f:
                    np.savez(f, info=info, **{c: x[c] for c in _COLUMNS})
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:  # a read-only or full cache folder costs the next start time, nothing else
                log.warning("could not cache the index of %s in %s: %s", s.annotation, cache_dir, e)
        return x

    def _scan(self, si):
        """One pass over a source: validate each record, check that its images exist, estimate its length.
        The file is read here, in chunks of records; a big one is parsed, checked and estimated by
        `index_workers` forked processes, a chunk each at a time, the results kept in file order."""
        s = self.sources[si]
        chunks = _batched(read_annotation(s.annotation, parse=False), _SCAN_CHUNK)
        memo = {"listings": {}, "headers": {}}  # per process: folder listings, image sizes by path
        workers = self.index_workers
        if workers is None:
            workers = min(_MAX_INDEX_WORKERS, os.cpu_count() or 1)
            if os.path.getsize(s.annotation) < _PARALLEL_BYTES or multiprocessing.current_process().daemon:
                workers = 1  # a daemon process (a DataLoader worker, a Pool's) may not start processes
        if workers <= 1:
            parts = [self._scan_records(si, chunk, memo) for chunk in chunks]
        else:
            parts = self._scan_in_workers(si, chunks, memo, workers)
        cols = {c: np.concatenate([p[c] for p in parts] or [np.zeros(0, t)]) for c, t in _COLUMNS.items()}
        problems = [x for p in parts for x in p["problems"]][:_PROBLEMS_KEPT]
        unread = [line for p in parts for line in p["unread"]]
        if unread:
            log.warning("%s: %d record(s) with an image whose header cannot be read (first: line %d): their "
                        "tiles are estimated at the cap; the images are reported if they fail to load when "
                        "their samples are built", s.annotation, len(unread), unread[0])
        folders = {}
        for p in parts:
            for f, stamp in p["folders"].items():
                f = os.path.abspath(f or ".")  # two processes saw it change during the scan: never valid
                folders[f] = stamp if folders.get(f, stamp) == stamp else "changed"
        return cols | {"records": sum(p["records"] for p in parts), "bad": sum(p["bad"] for p in parts),
                       "missing_images": sum(p["missing"] for p in parts), "unread_headers": len(unread),
                       "problems": problems, "folders": folders}

    def _scan_in_workers(self, si, chunks, memo, workers):
        """_scan_records of each chunk in forked processes; the results in order. At most four chunks per
        worker are in flight, so the file is read only as fast as the workers go. A worker that dies (killed,
        out of memory) is an error, not a hang (multiprocessing.Pool would wait for it forever)."""
        global _SCANNING
        _SCANNING = self, si, memo  # what the forked workers inherit: only the chunks are pickled
        parts, pending = [], collections.deque()
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                for chunk in chunks:
                    pending.append(pool.submit(_scan_in_worker, chunk))
                    if len(pending) >= 4 * workers:
                        parts.append(pending.popleft().result())
                parts += [f.result() for f in pending]
        except BrokenProcessPool:
            raise RuntimeError(f"{self.sources[si].annotation}: an index worker died while checking the "
                               "records (killed, out of memory?); --index-workers 1 checks them in this "
                               "process") from None
        finally:
            _SCANNING = None
        return parts

    def _scan_records(self, si, chunk, memo):
        """_scan's work on a list of read_annotation items: index columns and counts of the valid records."""
        s, cols = self.sources[si], {c: [] for c in _COLUMNS}
        problems, bad, missing, unread = [], 0, 0, []  # unread: lines of records with an unreadable header
        folders = {}  # {image folder: its folder_stamp}
        for line, offset, nbytes, rec in chunk:
            if isinstance(rec, bytes):
                rec = parse_line(rec)
            try:
                if isinstance(rec, Exception):
                    raise rec
                conv = parse_record(rec, self.template)
                paths = [os.path.join(s.image_folder or "", p) for p in conv.images]
                lost = [p for p in paths if not _exists(p, memo["listings"])]
                folders.update((f, memo["listings"][f][1]) for f in {os.path.dirname(p) for p in paths})
                if lost:
                    missing += 1
                    raise SampleError(f"image file not found: {lost[0]}"
                                      + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""))
            except SampleError as e:
                bad += 1
                if len(problems) < _PROBLEMS_KEPT:  # the count is exact; the first ones are named
                    problems.append(f"{s.annotation}:{line}: {e}")
                continue
            sizes = _image_sizes(rec, paths, memo["headers"])
            if None in sizes:
                unread.append(line)
            length, tiles, full, need = self._estimate(si, conv, sizes)
            for c, v in zip(_COLUMNS, (offset, nbytes, line, length, tiles, bool(conv.images), full, need,
                                       conv.gpt_first)):
                cols[c].append(v)
        x = {c: np.array(v, dtype=t) for (c, t), v in zip(_COLUMNS.items(), cols.values())}
        return x | {"records": len(chunk), "bad": bad, "missing": missing, "unread": unread,
                    "problems": problems, "folders": folders}

    def _report_problems(self, skip_bad_samples):
        bad = sum(x["bad"] for x in self.source_index)
        if not bad:
            return
        problems = [p for x in self.source_index for p in x["problems"]]
        missing = {s.name: f"{x['missing_images']:,} of {x['records']:,} records under "
                           f"{os.path.abspath(s.image_folder or '.')}"
                   for s, x in zip(self.sources, self.source_index) if x["missing_images"]}
        summary = f"; missing image files: {missing}" if missing else ""
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {bad - _SHOWN} more" if bad > _SHOWN else ""
        if not skip_bad_samples:
            raise DataError(f"{bad} bad sample(s) (use --skip-bad-samples to skip them){summary}:\n  "
                            f"{shown}{more}")
        log.warning("skipping %d bad samples%s:\n  %s%s", bad, summary, shown, more)
        log.warning("skipped %d bad samples: %s", bad,
                    {n: c["bad"] for n, c in self.source_counts.items() if c["bad"]})

    def _estimate(self, si, conv, sizes):
        """(tokens capped at max_length, tiles, tokens, need): the exact token count of the text +
        tile_tokens per tile, where `sizes` holds each image's (width, height), or None where its header could
        not be read. need (0 when the sample fits): the smallest max_length that keeps its images whole and
        one answer token."""
        per_image = []
        cap = per_image_cap(self._max_num(si), len(sizes))
        for wh in sizes:
            if wh is None:  # header unreadable: the cap (+ thumbnail) is an upper bound, so packs keep their
                # budgets; the image itself is reported, like any unreadable image, when its sample is built
                per_image.append(cap + (1 if self.use_thumbnail and cap > 1 else 0))
                continue
            if (*wh, cap) not in self._tiles_memo:  # memoised: num_tiles builds the grid list on every call
                self._tiles_memo[(*wh, cap)] = num_tiles(*wh, self.min_num, cap, self.image_size,
                                                         self.use_thumbnail)
            per_image.append(self._tiles_memo[(*wh, cap)])
        tiles = sum(per_image)
        text, spans = conversation_text(conv, self.template, [0] * len(conv.images), self.system_message)
        n = self.tokenizer.count_tokens(text) + self.tile_tokens * tiles
        if self.max_length is None or n <= self.max_length:
            return n, tiles, n, 0

        def tokens_before(end):  # the prefix's tokens, its images' included
            return (self.tokenizer.count_tokens(text[:end])
                    + self.tile_tokens * sum(per_image[:text.count(IMG_END, 0, end)]))
        need = tokens_before(spans[0][0]) + 1  # the first answer token
        if per_image:
            need = max(need, tokens_before(text.rindex(IMG_END) + len(IMG_END)))
        return self.max_length, tiles, n, need

    def set_epoch(self, epoch):
        """The epoch seeds the JPEG augmentation (data_augment): call it before the DataLoader forks."""
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def sample_id(self, i):
        si, k = self.index[i]
        return f"{self.sources[si].name}:{self.source_index[si]['line'][k]}"

    def record(self, i):
        """The annotation record of sample i, read from its file."""
        si, k = self.index[i]
        s, x = self.sources[si], self.source_index[si]
        with open(s.annotation, "rb") as f:
            f.seek(x["offset"][k])
            raw = f.read(x["nbytes"][k])
        try:
            return json.loads(raw)
        except ValueError:
            raise DataError(f"{s.annotation}:{x['line'][k]}: the record no longer reads as JSON: the file "
                            f"changed after its index was built") from None

    def build(self, i):
        """build_sample for dataset index i (may raise ImageLoadError / SampleTooLong)."""
        si = self.index[i][0]
        s, rec = self.sources[si], self.record(i)
        images = None
        if s.data_augment and rec.get("image"):  # the official JPEG re-encode; seeded, new every epoch
            paths = [rec["image"]] if isinstance(rec["image"], str) else rec["image"]
            rng = random.Random(f"{self.seed}/augment/{self.epoch}/{i}")
            images = [jpeg_degrade(load_image(os.path.join(s.image_folder or "", p)), rng) for p in paths]
        return build_sample(rec, self.tokenizer, self.template, s.image_folder, self._max_num(si),
                            self.max_length, self.system_message, min_num=self.min_num,
                            image_size=self.image_size, tile_tokens=self.tile_tokens,
                            use_thumbnail=self.use_thumbnail, images=images)

    def _replacement(self, i, failed, attempt):
        """A seeded sample of the same modality, no longer and with no more tiles than sample i when there is
        one (a planned pack then stays within its budgets)."""
        pool = self._by_modality[bool(self.is_image[i])]
        fits = pool[(self.lengths[pool] <= self.lengths[i]) & (self.tiles[pool] <= self.tiles[i])]
        fits = fits[~np.isin(fits, list(failed))]
        if not len(fits):
            fits = pool[~np.isin(pool, list(failed))] if len(pool) > len(failed) else pool
        return int(random.Random(f"{self.seed}/replace/{i}/{attempt}").choice(fits))

    def __getitem__(self, i):
        skipped, j, failed, image_failures = [], i, {i}, 0
        for attempt in range(self.max_replacements + 1):
            self.stats["seen"] += 1
            try:
                sample = self.build(j)
                break
            except (ImageLoadError, SampleTooLong) as e:
                skipped.append(f"{self.sample_id(j)}: {e}")
                if self.log_problems:
                    log.warning("skipping sample %s: %s", self.sample_id(j), e)
                if isinstance(e, ImageLoadError):
                    image_failures += 1
                    self._count_image_failure(e)
                else:
                    self.stats["too_long"] += 1
            failed.add(j)  # a seeded replacement of the same modality keeps the batch's shape, reproducibly
            j = self._replacement(i, failed, attempt)
        else:
            raise RuntimeError(f"sample {self.sample_id(i)}: {self.max_replacements} replacements failed "
                               f"too; last problems: {skipped[-3:]}")
        sample["meta"] = {"id": self.sample_id(j), "skipped": skipped, "image_failures": image_failures,
                          "truncated": sample.pop("truncated"), "gpt_first": sample.pop("gpt_first"),
                          "wide_images": [os.path.join(self.sources[self.index[j][0]].image_folder or "", p)
                                          for p in sample.pop("wide_images")]}
        return sample

    def _count_image_failure(self, e):
        """A few unreadable images are skipped; past the grace count and the rate the data set is broken."""
        self.stats["image_failures"] += 1
        limit = max(self.image_failure_grace, self.max_image_failure_rate * self.stats["seen"])
        if self.stats["image_failures"] > limit:
            raise RuntimeError(f"too many unreadable images: {self.stats['image_failures']} of "
                               f"{self.stats['seen']} samples seen in this process (limit "
                               f"{self.max_image_failure_rate:.1%}, grace {self.image_failure_grace}); "
                               f"last: {e}") from e
