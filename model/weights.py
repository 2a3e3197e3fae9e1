"""THE official <-> internal parameter mapping, and safetensors IO.

One table (NAMES) maps internal module paths to official ones per LLM family; FUSED holds the only tensor that
changes layout (InternLM2's per-kv-group `wqkv`). The loader, the exporter (convert.py) and LoRA target
resolution all go through the functions below, in both directions.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator

import torch

from .config import InternVLConfig

_VIT_AND_PROJECTOR = [
    ("vit.class_embedding", "vision_model.embeddings.class_embedding"),
    ("vit.pos_embed", "vision_model.embeddings.position_embedding"),
    ("vit.patch_embed", "vision_model.embeddings.patch_embedding"),
    ("vit.layers.{i}", "vision_model.encoder.layers.{i}"),  # below a layer the names are the official ones
    ("projector.norm", "mlp1.0"),
    ("projector.fc1", "mlp1.1"),
    ("projector.fc2", "mlp1.3"),
]
_LM, _LL = "language_model.model", "language_model.model.layers.{i}"

# (internal module path, official module path); "{i}" is a layer index.
NAMES: dict[str, list[tuple[str, str]]] = {
    "internlm2": _VIT_AND_PROJECTOR + [
        ("llm.embed", f"{_LM}.tok_embeddings"),
        ("llm.layers.{i}.attn_norm", f"{_LL}.attention_norm"),
        ("llm.layers.{i}.attn.qkv", f"{_LL}.attention.wqkv"),
        ("llm.layers.{i}.attn.out", f"{_LL}.attention.wo"),
        ("llm.layers.{i}.mlp_norm", f"{_LL}.ffn_norm"),
        ("llm.layers.{i}.mlp.gate", f"{_LL}.feed_forward.w1"),
        ("llm.layers.{i}.mlp.up", f"{_LL}.feed_forward.w3"),
        ("llm.layers.{i}.mlp.down", f"{_LL}.feed_forward.w2"),
        ("llm.norm", f"{_LM}.norm"),
        ("llm.head", "language_model.output"),
    ],
    "phi3": _VIT_AND_PROJECTOR + [
        ("llm.embed", f"{_LM}.embed_tokens"),
        ("llm.layers.{i}.attn_norm", f"{_LL}.input_layernorm"),
        ("llm.layers.{i}.attn.qkv", f"{_LL}.self_attn.qkv_proj"),
        ("llm.layers.{i}.attn.out", f"{_LL}.self_attn.o_proj"),
        ("llm.layers.{i}.mlp_norm", f"{_LL}.post_attention_layernorm"),
        ("llm.layers.{i}.mlp.gate_up", f"{_LL}.mlp.gate_up_proj"),
        ("llm.layers.{i}.mlp.down", f"{_LL}.mlp.down_proj"),
        ("llm.norm", f"{_LM}.norm"),
        ("llm.head", "language_model.lm_head"),
    ],
}
# Qwen2 and Llama are transformers' own classes: the same names (Qwen2's q/k/v biases follow them).
NAMES["qwen2"] = NAMES["llama"] = _VIT_AND_PROJECTOR + [
    ("llm.embed", f"{_LM}.embed_tokens"),
    ("llm.layers.{i}.attn_norm", f"{_LL}.input_layernorm"),
    ("llm.layers.{i}.attn.q", f"{_LL}.self_attn.q_proj"),
    ("llm.layers.{i}.attn.k", f"{_LL}.self_attn.k_proj"),
    ("llm.layers.{i}.attn.v", f"{_LL}.self_attn.v_proj"),
    ("llm.layers.{i}.attn.out", f"{_LL}.self_attn.o_proj"),
    ("llm.layers.{i}.mlp_norm", f"{_LL}.post_attention_layernorm"),
    ("llm.layers.{i}.mlp.gate", f"{_LL}.mlp.gate_proj"),
    ("llm.layers.{i}.mlp.up", f"{_LL}.mlp.up_proj"),
    ("llm.layers.{i}.mlp.down", f"{_LL}.mlp.down_proj"),
    ("llm.norm", f"{_LM}.norm"),
    ("llm.head", "language_model.lm_head"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"(?=\.|$)")


_RULES = {family: [(_compile(a), a, _compile(b), b) for a, b in pairs] for family, pairs in NAMES.items()}


def _translate(name: str, family: str, to_official: bool) -> str | None:
    for internal_re, internal, official_re, official in _RULES[family]:
        src_re, dst = (internal_re, official) if to_official else (official_re, internal)
        m = src_re.match(name)
        if m:
            out = dst.replace("{i}", m.group(1)) if m.groups() else dst
            return out + name[m.end():]
    return None


def to_official_name(internal: str, family: str) -> str:
    """Internal parameter or module name -> official one (KeyError if the table has no rule for it)."""
    out = _translate(internal, family, to_official=True)
    if out is None:
        raise KeyError(f"no official name for internal {internal!r} ({family})")
    return out


def to_internal_name(official: str, family: str) -> str | None:
    """Official parameter or module name -> internal one, or None if the table does not know it."""
    return _translate(official, family, to_official=False)


# --- the one fused layout that differs: InternLM2's wqkv rows are [q x G, k, v] per kv head, ours Q|K|V ---

def _wqkv_to_internal(w: torch.Tensor, cfg: InternVLConfig) -> torch.Tensor:
    h, kv, hd = cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim
    g = h // kv
    w = w.reshape(kv, g + 2, hd, *w.shape[1:])
    q, k, v = w[:, :g], w[:, g], w[:, g + 1]
    return torch.cat([q.reshape(h * hd, *w.shape[3:]), k.reshape(kv * hd, *w.shape[3:]),
                      v.reshape(kv * hd, *w.shape[3:])])


def _wqkv_to_official(w: torch.Tensor, cfg: InternVLConfig) -> torch.Tensor:
    h, kv, hd = cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim
    g = h // kv
    rest = w.shape[1:]
    q, k, v = w.split([h * hd, kv * hd, kv * hd])
    grouped = torch.cat([q.reshape(kv, g, hd, *rest), k.reshape(kv, 1, hd, *rest),
                         v.reshape(kv, 1, hd, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


# family -> internal parameter suffix -> (official -> internal, internal -> official)
FUSED: dict[str, dict[str, tuple[Callable, Callable]]] = {
    "internlm2": {"attn.qkv.weight": (_wqkv_to_internal, _wqkv_to_official)},
    "phi3": {},
    "qwen2": {},
    "llama": {},
}


def _fused(internal: str, family: str):
    if internal.startswith("llm."):
        for suffix, fns in FUSED[family].items():
            if internal.endswith("." + suffix):
                return fns
    return None


def to_internal_tensor(internal: str, tensor: torch.Tensor, cfg: InternVLConfig) -> torch.Tensor:
    fns = _fused(internal, cfg.llm.family)
    return fns[0](tensor, cfg) if fns else tensor


def to_official_tensor(internal: str, tensor: torch.Tensor, cfg: InternVLConfig) -> torch.Tensor:
    fns = _fused(internal, cfg.llm.family)
    return fns[1](tensor, cfg) if fns else tensor


def to_official_state_dict(state_dict: dict[str, torch.Tensor], cfg: InternVLConfig) -> dict:
    """Internal state dict -> official names and layouts (what convert.py writes)."""
    fam = cfg.llm.family
    return {to_official_name(k, fam): to_official_tensor(k, v, cfg) for k, v in state_dict.items()}


# --- dtypes, key errors ---

# The --dtype names of convert.py, chat.py and train.py.
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def mismatch_message(what: str, missing=(), unexpected=(), wrong=(), limit: int | None = 8) -> str:
    """The one format of every key-set error: `what`, then each non-empty list with its length and its first
    `limit` names (None: all of them)."""
    lines = [what]
    for label, names in [("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", wrong)]:
        if names:
            more = " ..." if limit is not None and len(names) > limit else ""
            lines.append(f"{label} ({len(names)}): {list(names)[:limit]}{more}")
    return "\n  ".join(lines)


# --- safetensors files ---


class SafetensorsWriter:
    """Streams tensors into one safetensors file whose names, shapes and dtypes are known in advance: the
    header first, then each tensor's bytes as it arrives, so a shard is never held in memory (safetensors'
    save_file holds the tensors and a bytes copy of each)."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata=None):
        header, offset = {}, 0
        for name, shape, dtype in entries:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.pending = [(n, tuple(s), d) for n, s, d in reversed(entries)]
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.pending.pop()
        if (name, tuple(tensor.shape), tensor.dtype) != expected:
            raise ValueError(f"{self.f.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, the header "
                             f"promised {expected}")
        self.f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self.pending:
            raise ValueError(f"{self.f.name}: {len(self.pending)} tensors never written, "
                             f"e.g. {self.pending[-1]}")
        self.f.close()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """A small dict of tensors as one safetensors file (the demo's weights)."""
    writer = SafetensorsWriter(path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                               metadata={"format": "pt"})
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed
    blocks under its mmap threshold (up to 32 MB: most weight matrices) for reuse, so a loader that reads,
    converts and frees tensor after tensor, or a process that loads models one after the other, would
    otherwise keep the freed memory resident: a 2B QLoRA load peaked at 3.16 GiB instead of 2.40."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_header(fname: str) -> dict[str, dict]:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} (offsets from the data start,
    stored as "_data_start" on each entry). Nothing else is read."""
    with open(fname, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["_data_start"] = 8 + size
    return header


def read_tensor(f, entry: dict) -> torch.Tensor:
    """One tensor of an open safetensors file, read into memory this process owns. (Not memory-mapped: mapped
    pages stay in the resident set until the file is closed, so a 4-bit load would peak at a shard's bf16
    size.)"""
    start, end = entry["data_offsets"]
    raw = torch.empty(end - start, dtype=torch.uint8)
    f.seek(entry["_data_start"] + start)
    if f.readinto(raw.numpy()) != raw.numel():
        raise ValueError(f"{f.name}: truncated file (tensor data ends past the end of the file)")
    return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def checkpoint_files(path: str) -> dict[str, str]:
    """Official tensor name -> safetensors file, from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        missing = sorted({f for f in files.values() if not os.path.exists(f)})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    if os.path.exists(single):
        return {k: single for k in read_header(single)}
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def read_headers(files: dict[str, str]) -> dict[str, dict]:
    """Official tensor name -> its header entry, for checkpoint_files' mapping; no tensor is read."""
    headers = {fname: read_header(fname) for fname in set(files.values())}
    for k, fname in files.items():
        if k not in headers[fname]:
            raise KeyError(f"{fname}: the index lists {k!r} but the shard does not hold it")
    return {k: headers[fname][k] for k, fname in files.items()}


def check_checkpoint(path: str, cfg: InternVLConfig, expected: dict[str, torch.Size]) -> dict[str, str]:
    """Strict key/shape check from the file headers alone, before any tensor is read: one error listing every
    missing, unexpected and wrongly shaped tensor. `expected` maps internal names to shapes; returns official
    name -> file."""
    files = checkpoint_files(path)
    fam = cfg.llm.family
    seen, unexpected, wrong = set(), [], []
    for k, entry in read_headers(files).items():
        internal = to_internal_name(k, fam)
        if internal is None or internal not in expected:
            unexpected.append(k)
            continue
        seen.add(internal)
        if entry["shape"] != list(expected[internal]):
            wrong.append(f"{k}: checkpoint {entry['shape']} vs model {list(expected[internal])}")
    missing = [to_official_name(n, fam) for n in expected if n not in seen]
    if missing or unexpected or wrong:
        raise ValueError(mismatch_message(f"{path} does not match the model built from its config.json:",
                                          missing, unexpected, wrong, limit=None))
    return files


def iter_checkpoint(path: str, cfg: InternVLConfig, files: dict[str, str] | None = None, read: bool = True,
                    skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(internal name, tensor in the internal layout), one tensor at a time, in file order. Names in `skip`,
    and every name when read=False, come with None instead of a tensor (ZeRO-3: the ranks that do not read
    still walk the same sequence)."""
    files = files or checkpoint_files(path)
    by_file: dict[str, list[str]] = {}
    for k, fname in files.items():
        by_file.setdefault(fname, []).append(k)
    for fname, keys in by_file.items():
        header = read_header(fname) if read else None
        with open(fname, "rb") if read else contextlib.nullcontext() as f:
            for k in keys:
                internal = to_internal_name(k, cfg.llm.family)
                if not read or internal in skip:
                    yield internal, None
                else:
                    yield internal, to_internal_tensor(internal, read_tensor(f, header[k]), cfg)


def assign_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a loaded tensor in place. A module may take it itself (`assign_weight`: a 4-bit base layer)."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "assign_weight"):
        module.assign_weight(param_name, tensor)
        return
    old = getattr(module, param_name)
    setattr(module, param_name, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))


def sampled_sha1(path: str, samples: int, chunk: int) -> str:
    """sha1 of `samples` reads of `chunk` bytes at evenly spaced offsets, the first at 0 and the last ending
    at the end of the file (the whole file when it is no larger): a content fingerprint that reads little."""
    size = os.path.getsize(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        if size <= samples * chunk:
            h.update(f.read())
        else:
            for k in range(samples):
                f.seek(k * (size - chunk) // max(1, samples - 1))
                h.update(f.read(chunk))
    return h.hexdigest()


def checkpoint_fingerprint(path: str, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A fingerprint of a checkpoint's weights: each weight file's name, size and sampled_sha1. A re-saved,
    retrained or truncated base changes it; it reads about 1 MiB per file, not the whole 4-52 GB."""
    h = hashlib.sha256()
    for fname in sorted(set(checkpoint_files(path).values())):
        sampled = sampled_sha1(fname, samples, chunk)
        h.update(f"{os.path.basename(fname)}:{os.path.getsize(fname)}:{sampled}".encode())
    return h.hexdigest()[:16]
