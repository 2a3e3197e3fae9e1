"""A train.py checkpoint -> an official InternVL (1.5, 2, 2.5) directory: merged, bf16, key-exact, verified.

    python convert.py runs/demo/iter_800 runs/demo/converted   # an iter_* directory
    python convert.py runs/2b_lora exports/2b_lora              # a run directory: its newest checkpoint

The export is written into a temporary sibling of OUT and renamed at the end, so a failure leaves no
half-written OUT. Exit status 2: a refusal or bad input; 1: the self-check failed (the export is then left at
OUT.rejected for inspection). README.md's "Export and chat" describes each step.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import io
import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import chat
from checkpoint import FORMAT, complete_checkpoints
from data import build_sample, load_tokenizer
from lora import LoRAConfig, inject_lora, merge_checkpoint, prepare_qlora
from model import load_config, load_pretrained
from model.loss import OutputHead, target_mask
from model.weights import (DTYPES, SAFETENSORS_CODES, SafetensorsWriter, checkpoint_files,
                           checkpoint_fingerprint, iter_checkpoint, mismatch_message, read_headers,
                           to_official_name, to_official_tensor, trim_heap)

# The weight files of a checkpoint directory: written anew, never copied from the base.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# Self-check tolerance, relative to the largest |logit| of the trained model: K_TOL x the unit roundoff u of
# the coarsest dtype involved (the output weights, or the self-check's compute dtype). Rounding every weight
# to bf16 (u = 2^-8) moves the logits of the demo models by 0.6-1.5 u of their scale (measured); K_TOL = 8
# leaves room for deeper models. A missing merge, a wrong layout or a swapped tensor moves them by as much as
# training did, or by O(1): the check prints how far training moved the logits next to the difference.
K_TOL = 8.0
FLOOR = 1e-4  # float32 compute noise (the fixtures' cross-implementation agreement)


class ConvertError(RuntimeError):
    """A refusal or a bad input: printed as `error: ...` with exit status 2."""


class SelfCheckFailed(RuntimeError):
    """The export does not reproduce the trained model: exit status 1."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the checkpoint ---

def resolve_checkpoint(path: str) -> str:
    """An iter_* directory (it has meta.json), or a run directory -> its newest complete iter_* checkpoint."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    found = complete_checkpoints(path)
    if not found:
        partial = sorted(p for p in os.listdir(path) if p.startswith("iter_"))
        raise ConvertError(f"{path}: neither a checkpoint (no meta.json) nor a run directory with a complete "
                           f"iter_* checkpoint{f' (incomplete: {partial})' if partial else ''}")
    return found[-1][1]


def read_meta(ckpt_dir: str) -> dict:
    meta_file = os.path.join(ckpt_dir, "meta.json")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("base_model_path", "mode", "lora", "step"):
        if key not in meta:
            raise ConvertError(f"{meta_file}: no {key!r}")
    if meta["mode"] not in ("full", "lora", "qlora"):
        raise ConvertError(f"{meta_file}: unknown mode {meta['mode']!r}")
    if (meta["mode"] == "full") != (meta["lora"] is None):
        raise ConvertError(f"{meta_file}: mode {meta['mode']!r} with lora settings {meta['lora']!r}")
    return meta


def resolve_base(meta: dict, override: str | None, ckpt_dir: str) -> str:
    if override is not None:
        base = os.path.abspath(override)
        if not os.path.isfile(os.path.join(base, "config.json")):
            raise ConvertError(f"--base-model {override}: no config.json there (expected the official "
                               f"InternVL directory the run was trained from)")
        return base
    base = meta["base_model_path"]
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ConvertError(f"the base model {base} named in {os.path.join(ckpt_dir, 'meta.json')} is missing "
                           f"(no config.json); if it moved, pass its new location with --base-model DIR")
    return os.path.abspath(base)


def check_base_unchanged(meta: dict, base: str, allow: bool, log=print) -> None:
    """The base's weights must be those training started from (meta.json's fingerprint of them)."""
    recorded = meta.get("base_fingerprint")
    if recorded is None:
        return log("note: this checkpoint records no fingerprint of its base; the base is not verified")
    now = checkpoint_fingerprint(base)
    if now != recorded:
        msg = (f"the base model {base} is not the one this run trained from: its weight files' fingerprint "
               f"is {now}, meta.json recorded {recorded}. Merging onto other base weights gives a wrong "
               f"model")
        if not allow:
            raise ConvertError(msg + "; pass --allow-base-change if you know the difference does not matter")
        log(f"warning: {msg} (--allow-base-change given)")


def trained_tensors(ckpt_dir: str, meta: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Exactly the parameters meta.json lists as trainable, consolidated from the ZeRO partitions by
    DeepSpeed's zero_to_fp32, one tensor at a time (lazy mode). LoRA factors and the weights under them stay
    float32 (the merge adds to them: one rounding only); every other tensor is held in the export's `dtype`,
    in which it is written anyway (a 26B full run's LLM is then 40 GB, not 80 GB)."""
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "*.pt"))):  # torch.save files are zip archives
        if not zipfile.is_zipfile(path):
            raise ConvertError(f"{path}: not a readable torch.save file (truncated or damaged: no zip "
                               f"directory at its end); use an earlier checkpoint")
    if not torch.cuda.is_available():  # else DeepSpeed warns on every import that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    run_dir, tag = os.path.split(ckpt_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step
            state = get_fp32_state_dict_from_zero_checkpoint(run_dir, tag=tag, exclude_frozen_parameters=True,
                                                             lazy_mode=True)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(f"{ckpt_dir}: cannot consolidate the DeepSpeed files: {e}") from e
    expected = meta.get("run", {}).get("trainable")
    if expected is not None:
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConvertError(mismatch_message(f"{ckpt_dir}: the DeepSpeed files do not hold the trainable "
                                                f"parameters meta.json lists:", missing, unexpected))
    return {k: v.contiguous().to(torch.float32 if k.endswith((".lora_A", ".lora_B")) or ".base." in k
                                 else dtype) for k, v in state.items()}


def lora_settings(meta: dict) -> LoRAConfig | None:
    return None if meta["lora"] is None else LoRAConfig.from_dict(meta["lora"])


# --- the output directory ---

def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(out: str, ckpt_dir: str, base: str, overwrite: bool) -> str:
    """Refuse every OUT that would damage the inputs or mix with old files. OUT may sit in the run directory
    (what train.py suggests), but not in a checkpoint nor under a name the run's checkpoints take."""
    out, run_dir = os.path.abspath(out), os.path.dirname(os.path.abspath(ckpt_dir))
    if os.path.realpath(out) == os.path.realpath(run_dir):
        raise ConvertError(f"OUT {out} is the run directory; write the export somewhere else, for example "
                           f"{os.path.join(run_dir, 'converted')}")
    for name, path in (("the checkpoint", ckpt_dir), ("the base model", base)):
        if _inside(out, path):
            where = "" if os.path.realpath(out) == os.path.realpath(path) else "inside "
            raise ConvertError(f"OUT {out} is {where}{name} {os.path.abspath(path)}; "
                               f"write the export somewhere else")
    if _inside(out, run_dir):  # iter_N, iter_N.tmp and latest belong to the run's checkpoints
        top = os.path.relpath(os.path.realpath(out), os.path.realpath(run_dir)).split(os.sep)[0]
        if re.fullmatch(r"iter_\d+(\.tmp)?|latest", top):
            raise ConvertError(f"OUT {out}: {top} is a checkpoint name in the run directory {run_dir}; "
                               f"choose another name, for example {os.path.join(run_dir, 'converted')}")
    for name, path in (("the checkpoint", ckpt_dir), ("the base model", base)):
        if _inside(path, out):
            raise ConvertError(f"OUT {out} contains {name} {path}; replacing it would delete it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"OUT {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConvertError(f"OUT {out} is not empty; pass --overwrite to replace it")
    return out


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2^20, '1000' -> 1000 (the transformers convention)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB "
                                         f"or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r} must be positive")
    return size


def write_weights(out_dir: str, base: str, tensors: Iterable[tuple[str, torch.Tensor]], config,
                  dtype: torch.dtype, max_shard_bytes: int) -> dict[str, str]:
    """(internal name, tensor) stream, in the base checkpoint's order -> official names and layouts in
    `dtype`, in shards of at most max_shard_bytes (a larger tensor gets a shard of its own) + the index. The
    shards are planned from the base's headers and streamed tensor by tensor: no shard is held in memory."""
    family = config.llm.family
    shapes = {k: tuple(entry["shape"]) for k, entry in read_headers(checkpoint_files(base)).items()}
    plan, size = [[]], 0
    for internal, _ in iter_checkpoint(base, config, read=False):
        official = to_official_name(internal, family)
        nbytes = math.prod(shapes[official]) * dtype.itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((official, shapes[official], dtype))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    stream = iter(tensors)
    for fname, entries in zip(names, plan):
        writer = SafetensorsWriter(os.path.join(out_dir, fname), entries, metadata={"format": "pt"})
        for _ in entries:
            name, tensor = next(stream)
            writer.write(to_official_name(name, family), to_official_tensor(name, tensor, config).to(dtype))
        writer.close()
    if next(stream, None) is not None:
        raise RuntimeError("the merged model has more tensors than the base checkpoint")
    weight_map = {name: fname for fname, entries in zip(names, plan) for name, _, _ in entries}
    total = sum(math.prod(shape) * dtype.itemsize for entries in plan for _, shape, _ in entries)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
    return weight_map


def check_against_base(out_dir: str, base: str, dtype: torch.dtype) -> int:
    """The written key set and shapes must equal the base directory's exactly; every tensor in `dtype`."""
    got, want = read_headers(checkpoint_files(out_dir)), read_headers(checkpoint_files(base))
    code = SAFETENSORS_CODES[dtype]
    wrong = [f"{k}: {got[k]['shape']} {got[k]['dtype']} vs base {want[k]['shape']} {code}"
             for k in sorted(set(got) & set(want))
             if got[k]["shape"] != want[k]["shape"] or got[k]["dtype"] != code]
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected or wrong:
        raise RuntimeError(mismatch_message(f"the export does not match the base {base}:",
                                            missing, unexpected, wrong))
    return len(got)


def training_system_message(meta: dict) -> str:
    """The system message training rendered every sample with: the base config's, else the data default."""
    from data.templates import resolve_system_message
    return resolve_system_message(override=meta.get("system_message"))


def training_tiling(meta: dict) -> dict:
    """The tiling training used (--min-tiles, --max-tiles, --thumbnail, in meta.json) as config.json fields;
    {} for a checkpoint that did not record it."""
    t = meta.get("tiling") or {}
    if t.get("max_dynamic_patch") is None:
        return {}
    out = {k: t[k] for k in ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")}
    if out["max_dynamic_patch"] > 1:  # tiles were cut: dynamic_image_size false would mean one tile
        out["dynamic_image_size"] = True
    return out


def write_config(out_dir: str, base: str, dtype: torch.dtype, system_message: str, tiling: dict) -> None:
    """The base config.json with the LoRA flags reset (the adapters are merged), torch_dtype = the output's,
    and system_message and the tiling (training_tiling) = those training used: they win over the template
    default of whatever conversation.py the official code or a serving engine brings and over the base's
    tiling, so the model is prompted and its images cut as in training."""
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(use_llm_lora=0, use_backbone_lora=0, system_message=system_message,
               torch_dtype=dtype_name(dtype), **tiling)
    for sub in ("llm_config", "vision_config"):  # only where the base states one
        if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
            cfg[sub]["torch_dtype"] = dtype_name(dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def copy_base_files(base: str, out_dir: str) -> list[str]:
    """Every file of the base except its weights and config.json, unchanged (tokenizer, generation config,
    remote code *.py, README, ...)."""
    copied = []
    for name in sorted(os.listdir(base)):
        src, dst = os.path.join(base, name), os.path.join(out_dir, name)
        if name == "config.json" or WEIGHT_FILE.match(name):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        copied.append(name)
    return copied


# --- the self-check ---

def check_image():
    """A fixed 896x448 picture (2 tiles + thumbnail): gradients and a few shapes, nothing random."""
    x, y = np.meshgrid(np.arange(896), np.arange(448))
    img = Image.fromarray(np.stack([x * 255 // 895, y * 255 // 447, (x + y) % 256], -1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([100, 100, 300, 300], fill=(220, 30, 30))
    d.rectangle([520, 60, 760, 240], fill=(30, 60, 220))
    d.polygon([(600, 420), (820, 420), (710, 280)], fill=(235, 200, 20))
    return img


def check_sample(base: str, config) -> dict:
    """The fixed input, built by the data pipeline exactly as training builds samples. The tokenizer is
    dropped and its heap handed back before a model loads (at 151,674 ids it left 0.05-0.09 GiB resident)."""
    record = {"image": "self-check.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture in one sentence."},
        {"from": "gpt", "value": "A red circle, a blue rectangle and a yellow triangle on a colourful "
                                 "gradient."}]}
    sample = build_sample(record, load_tokenizer(base), config.template, max_num=config.max_dynamic_patch,
                          system_message=config.system_message, images=[check_image()],
                          image_size=config.force_image_size, tile_tokens=config.num_image_token,
                          use_thumbnail=config.use_thumbnail)
    release_memory()
    return sample


def trained_model(base: str, trained: dict[str, torch.Tensor], lora_cfg, dtype, device, nf4: bool = False,
                  compute_dtype: torch.dtype = torch.float32):
    """The trained model, from the base + the trained tensors, adapters NOT merged; weights held in `dtype`
    (the trained tensors in their own dtype).

    For QLoRA the reference puts the adapters on the unquantised base: the export merges onto that base, so
    this is the model the export must equal. nf4=True rebuilds the 4-bit model training ran instead; it
    differs from both by the base's quantisation error, which the self-check reports apart."""
    prepare = partial(prepare_qlora, device=device, compute_dtype=compute_dtype) if nf4 else None
    adapters = {k: v for k, v in trained.items() if k.endswith((".lora_A", ".lora_B"))}
    plain = {k.replace(".base.", "."): v for k, v in trained.items() if k not in adapters}
    model = load_pretrained(base, dtype=dtype, device=device, prepare=prepare, replace=plain)
    if lora_cfg is not None:
        inject_lora(model, lora_cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in adapters.items():
            if name not in params or params[name].shape != t.shape:
                raise RuntimeError(f"trained tensor {name} {tuple(t.shape)} does not fit the model")
            params[name].data = t.to(device)
    return model.eval()


def _blocks(module) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """(module, the parameters it casts) covering every parameter but the embedding's and the head's (see
    computing_in) once: every nn.Linear casts its own weights (the big tensors: one float32 copy at a time);
    any other module casts its direct parameters and those of its leaf children that are not Linear (norms,
    and the ViT's patch embedding, whose dtype InternViT.embed reads before calling it)."""
    if isinstance(module, (nn.Embedding, OutputHead)) or next(module.parameters(), None) is None:
        return []
    children = list(module.children())
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers are never called
        return [b for c in children for b in _blocks(c)]
    if isinstance(module, nn.Linear) or not children:
        return [(module, list(module.parameters()))]
    leaves = [c for c in children if not list(c.children())
              and not isinstance(c, (nn.Linear, nn.Embedding, OutputHead))]
    own = list(module.parameters(recurse=False)) + [p for c in leaves for p in c.parameters()]
    return ([(module, own)] if own else []) + [b for c in children if c not in leaves for b in _blocks(c)]


@contextlib.contextmanager
def computing_in(model, dtype: torch.dtype):
    """Run `model` in `dtype` while its weights stay in their storage dtype: each block (a linear layer, or a
    module's own small parameters: norms, scales, the ViT's embeddings) runs on `dtype` copies of its
    floating parameters and inputs, and gets its own tensors back on exit, so a bf16 model is checked in
    float32 with at most one linear layer's float32 copy at a time. The numbers equal those of the same
    weights held in `dtype`. (Casting back instead of keeping the originals would reallocate every weight
    once per forward: at 2B, 0.9 GiB of heap stayed fragmented per forward.) The two largest tensors are never
    copied whole: embeddings cast what they look up, and the output head casts its weight a slice at a time
    (OutputHead.compute_dtype)."""
    def enter(module, args, params):
        module._originals = [(p, p.data) for p in params if p.is_floating_point() and p.dtype != dtype]
        for p, original in module._originals:
            p.data = original.to(dtype)
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(module, args, output):
        for p, original in module._originals:
            p.data = original
        module._originals = []

    handles = []
    for m, params in _blocks(model):
        handles += [m.register_forward_pre_hook(lambda mod, args, ps=params: enter(mod, args, ps)),
                    m.register_forward_hook(leave)]
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            handles.append(m.register_forward_hook(lambda mod, args, out: out.to(dtype)))
        elif isinstance(m, OutputHead):
            m.compute_dtype = dtype
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            if isinstance(m, OutputHead):
                m.compute_dtype = None
        trim_heap()  # the float32 copies and activations are freed: give the heap back before the next step


def release_memory() -> None:
    """Give a freed model's memory back before the next one loads (see trim_heap)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


@torch.no_grad()
def _logits(model, sample, device, dtype):
    """The logits at the positions that predict the answer (whose hidden states depend on every layer, the
    image included): the head runs on those rows only, so no [tokens, vocab] logits are ever held."""
    ids = sample["input_ids"][None].to(device)
    rows = target_mask(sample["labels"][None])[0].nonzero().squeeze(1).to(device)
    with computing_in(model, dtype):
        embeds = model.embed_inputs(ids, sample["pixel_values"].to(device=device, dtype=dtype),
                                    sample["image_flags"].to(device))
        hidden = model.llm(embeds, torch.arange(ids.shape[1], device=device)[None])
        return model.llm.head(hidden[0, rows]).float().cpu()


def tolerance(out_dtype: torch.dtype, compute_dtype: torch.dtype, scale: float) -> float:
    u = max(torch.finfo(out_dtype).eps, torch.finfo(compute_dtype).eps) / 2  # unit roundoff
    return max(FLOOR, K_TOL * u * scale)


CHECK_QUESTION = "Describe the picture in one sentence."
CHECK_NEW_TOKENS = 16


def _answer(model, tokenizer, sample, dtype) -> str:
    """The official chat's greedy answer to CHECK_QUESTION about the check image."""
    with computing_in(model, dtype):
        return chat.chat(model, tokenizer, sample["pixel_values"], CHECK_QUESTION,
                         max_new_tokens=CHECK_NEW_TOKENS)[0]


def _run_and_free(load, sample, device, dtype, tokenizer_dir=None):
    """Load a model, compute its logits (and its chat answer when tokenizer_dir is given), free it."""
    model = load()
    logits = _logits(model, sample, device, dtype)
    answer = _answer(model, load_tokenizer(tokenizer_dir), sample, dtype) if tokenizer_dir else None
    del model
    release_memory()
    return logits, answer


def readable(text: str) -> str:
    """An answer for the log: control characters and undecodable bytes (U+FFFD) escaped, the rest as is."""
    return "".join(c if c.isprintable() and c != "\ufffd" else ascii(c)[1:-1] for c in text)


def self_check(out_dir: str, base: str, trained, lora_cfg, out_dtype, compute_dtype, device, tol=None,
               qlora=False, log=print) -> dict:
    """Logits (and the chat answer) of the export vs the trained model on the fixed input; the untrained base
    gives the scale of what training changed.

    The models are loaded one after the other, each with its weights in the export's dtype and computing in
    `compute_dtype` (see computing_in), so the check holds at most one model of the export's size at a time.
    `trained` is consumed: its tensors become the trained model's and are freed with it (a 26B full run's
    are 40 GB), before the base and the export load."""
    sample = check_sample(base, load_config(base))

    def load_trained(nf4=False):
        model = trained_model(base, trained, lora_cfg, out_dtype, device, nf4, compute_dtype)
        if not nf4:
            trained.clear()  # the model holds them now
        return model

    if qlora:  # the 4-bit model training ran, apart (see trained_model)
        nf4_logits, _ = _run_and_free(lambda: load_trained(nf4=True), sample, device, compute_dtype)
    ref, ref_answer = _run_and_free(load_trained, sample, device, compute_dtype, base)
    base_logits, _ = _run_and_free(lambda: load_pretrained(base, dtype=out_dtype, device=device), sample,
                                   device, compute_dtype)
    got, answer = _run_and_free(lambda: load_pretrained(out_dir, dtype=out_dtype, device=device), sample,
                                device, compute_dtype, out_dir)
    scale = ref.abs().max().item()
    result = dict(
        tokens=int(sample["input_ids"].numel()), tiles=int(sample["pixel_values"].shape[0]),
        positions=len(ref),
        max_abs_diff=(got - ref).abs().max().item(), logit_scale=scale,
        training_shift=(ref - base_logits).abs().max().item(),
        argmax_agreement=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        tolerance=tol if tol is not None else tolerance(out_dtype, compute_dtype, scale),
        answer=answer, trained_answer=ref_answer)
    result["ok"] = result["max_abs_diff"] <= result["tolerance"]
    if qlora:
        result["nf4_gap"] = (nf4_logits - ref).abs().max().item()
    log_check(result, tol is None, compute_dtype, device, log)
    return result


def log_check(result: dict, default_tol: bool, compute_dtype, device, log=print) -> None:
    how = (f" = max({FLOOR:g}, {K_TOL:g} x unit roundoff x largest |logit| {result['logit_scale']:.3g})"
           if default_tol else "")
    log(f"self-check: {result['tokens']} tokens, {result['tiles']} tiles, {dtype_name(compute_dtype)} on "
        f"{device}: at the {result['positions']} answer positions, largest |logit difference| export vs "
        f"trained "
        f"model = {result['max_abs_diff']:.3g} "
        f"(tolerance {result['tolerance']:.3g}{how}); training moved the logits by up to "
        f"{result['training_shift']:.3g}; same argmax at {100 * result['argmax_agreement']:.2f}% of "
        f"positions -> {'OK' if result['ok'] else 'FAILED'}")
    same = ("the same" if result["answer"] == result["trained_answer"] else
            "DIFFERENT (greedy decoding can part at a near-tie; the logit check above is the criterion)")
    log(f"self-check chat ({CHECK_NEW_TOKENS} greedy tokens, {CHECK_QUESTION!r}): export "
        f"\"{readable(result['answer'])}\", trained model \"{readable(result['trained_answer'])}\": {same}")
    if "nf4_gap" in result:
        log(f"self-check (QLoRA): the 4-bit model training ran differs from the bf16-base model by up to "
            f"{result['nf4_gap']:.3g} (the base's NF4 quantisation error; the export merges onto the bf16 "
            f"base)")


# --- main ---

def publish(tmp: str, out: str) -> None:
    """Put the finished export at OUT; an old OUT (only with --overwrite) is removed after the swap."""
    old = None
    if os.path.exists(out):
        old = tmp + ".old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old)


def convert(args, log=print) -> dict:
    ckpt_dir = resolve_checkpoint(args.ckpt)
    meta = read_meta(ckpt_dir)
    base = resolve_base(meta, args.base_model, ckpt_dir)
    out = check_output(args.out, ckpt_dir, base, args.overwrite)
    dtype = DTYPES[args.dtype]
    config = load_config(base)
    lora_cfg = lora_settings(meta)
    check_base_unchanged(meta, base, args.allow_base_change, log)
    log(f"checkpoint {ckpt_dir} (step {meta['step']}, mode {meta['mode']}, ZeRO-{meta.get('zero_stage')}, "
        f"{meta.get('world_size')} rank(s)); base {base}")
    trained = trained_tensors(ckpt_dir, meta, dtype)
    log(f"trained tensors: {len(trained)} ({sum(t.numel() for t in trained.values()):,} values)")

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        try:
            # float32: write_weights casts once, so a float32 export keeps the float32 merge
            merged = merge_checkpoint(base, trained, lora_cfg, config, dtype=torch.float32)
            weight_map = write_weights(tmp, base, merged, config, dtype, args.max_shard_size)
            release_memory()
        except ValueError as e:  # the trained tensors do not fit this base
            raise ConvertError(f"{e}\nIs {base} the base model the run was trained from?") from e
        n, shards = check_against_base(tmp, base, dtype), len(set(weight_map.values()))
        write_config(tmp, base, dtype, training_system_message(meta), training_tiling(meta))
        copied = copy_base_files(base, tmp)
        log(f"wrote {n} tensors ({dtype_name(dtype)}) in {shards} shard(s), key set and shapes equal to the "
            f"base; config.json (LoRA flags reset, the run's system message and tiling); copied "
            f"{', '.join(copied)}")
        result = dict(out=out, checkpoint=ckpt_dir, base=base, tensors=n, shards=shards)
        if args.verify:
            device = torch.device(args.verify_device or ("cuda" if torch.cuda.is_available() else "cpu"))
            result["check"] = self_check(tmp, base, trained, lora_cfg, dtype, DTYPES[args.verify_dtype],
                                         device, args.tolerance, meta["mode"] == "qlora", log)
            if not result["check"]["ok"]:
                rejected = out + ".rejected"
                shutil.rmtree(rejected, ignore_errors=True)
                os.replace(tmp, rejected)
                raise SelfCheckFailed(f"the self-check failed; the export was NOT written to {out}. It is "
                                      f"kept at {rejected} for inspection.")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"done: {out}")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=lambda prog: (
        argparse.HelpFormatter(prog, width=100, max_help_position=30)))
    p.add_argument("ckpt", metavar="CKPT", help="an iter_* checkpoint directory, or a run directory (its "
                                                "newest complete checkpoint)")
    p.add_argument("out", metavar="OUT", help="the official directory to write (absent or empty, unless "
                                              "--overwrite)")
    p.add_argument("--base-model", metavar="DIR", help="the base model, if it moved (default: meta.json's "
                                                       "base_model_path)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the written weights (default bfloat16, as released)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest safetensors shard, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (default off)")
    p.add_argument("--allow-base-change", action="store_true",
                   help="convert even when the base's weights differ from those training started from "
                        "(default off)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the self-check (default: run it)")
    p.add_argument("--verify-dtype", default="float32", choices=sorted(DTYPES),
                   help="compute dtype of the self-check (default float32: exact; bfloat16 halves memory)")
    p.add_argument("--verify-device", help="device of the self-check (default: cuda if available)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"largest accepted |logit difference| (default: {K_TOL:g} x the unit roundoff of the "
                        f"coarser of --dtype and --verify-dtype x the largest |logit|)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SelfCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
