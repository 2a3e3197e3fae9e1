"""The training checkpoint layout: what train.py writes, what a resume checks and what convert.py reads.

    OUTPUT/iter_{step}/   DeepSpeed's files without the frozen tensors (a LoRA checkpoint is adapters +
                          projector + optimizer state), rng_state_{rank}.pt, and meta.json, written last
    OUTPUT/latest         the tag of the newest one

Each is written as iter_{step}.tmp and renamed when complete: a crash mid-save leaves the previous one valid.
"""
from __future__ import annotations

import glob
import json
import math
import os
import platform
import random
import re
import shutil
import time

import torch

FORMAT = "internvl-train-checkpoint/1"


def complete_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete iter_* checkpoints (renamed, with meta.json), oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "iter_*")):
        m = re.fullmatch(r"iter_(\d+)", os.path.basename(path))
        if m and os.path.exists(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "meta.json")) as f:
        return json.load(f)


# --- writing ------------------------------------------------------------------------------------------------

def save(engine, out_dir: str, step: int, meta: dict, keep: int) -> None:
    """iter_{step}.tmp/ (DeepSpeed's files, each rank's RNG, then meta.json), renamed to iter_{step}/;
    `latest` updated; only the newest `keep` checkpoints kept. Every rank calls it."""
    import torch.distributed as dist
    tag, rank = f"iter_{step}", dist.get_rank()
    tmp = os.path.join(out_dir, tag + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(out_dir, tag=tag + ".tmp", save_latest=False, exclude_frozen_parameters=True)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda},
               os.path.join(tmp, f"rng_state_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        write_meta(tmp, dict(meta, format=FORMAT, step=step, tag=tag, versions=versions(),
                             time=time.strftime("%Y-%m-%d %H:%M:%S")))
        final = os.path.join(out_dir, tag)
        shutil.rmtree(final, ignore_errors=True)  # a stale one from a run this one resumed before
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        for _, old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in glob.glob(os.path.join(out_dir, "iter_*.tmp")):  # left by a crash in an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


def write_meta(ckpt_dir: str, meta: dict) -> None:
    with open(os.path.join(ckpt_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def describe(args, config, engine, run: dict) -> dict:
    """meta.json's fields that hold for the whole run (save() adds the step's)."""
    return {"base_model_path": os.path.abspath(args.model_path), "base_fingerprint": args.base_fingerprint,
            "size": args.size, "mode": args.mode, "lora": run["lora"], "template": config.template,
            "system_message": config.system_message,
            "tiling": {"min_dynamic_patch": args.min_tiles, "max_dynamic_patch": args.max_tiles,
                       "use_thumbnail": args.thumbnail, "force_image_size": config.force_image_size},
            "zero_stage": engine.zero_optimization_stage(), "world_size": engine.world_size,
            "dtype": "bf16" if engine.bfloat16_enabled() else "fp32", "run": run, "args": dict(vars(args))}


def versions() -> dict:
    from importlib import metadata  # reads the installed versions without importing the packages
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("deepspeed", "bitsandbytes", "safetensors", "sentencepiece", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- resuming -----------------------------------------------------------------------------------------------

def run_settings(args, sources, world: int, lora_cfg, trainable: list[str], system_message: str) -> dict:
    """What a resume must share with the checkpoint: the data order, the schedule (the checkpoint's optimizer
    and scheduler state would silently override another lr, weight decay or warmup) and the trained tensors
    follow it. `system_message`: the resolved one (every sample's tokens, so the lengths and the order)."""
    return dict(size=args.size, mode=args.mode, model_path=os.path.abspath(args.model_path),
                data=data_identity(sources), system_message=system_message, batch_size=args.batch_size,
                grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
                warmup_ratio=args.warmup_ratio,
                world_size=world, seed=args.seed, max_length=args.max_length, max_tiles=args.max_tiles,
                min_tiles=args.min_tiles, thumbnail=args.thumbnail, max_packed_tokens=args.max_packed_tokens,
                max_packed_tiles=args.max_packed_tiles, lora=lora_cfg.to_dict() if lora_cfg else None,
                train_vit=args.train_vit, unfreeze_vit_layers=args.unfreeze_vit_layers,
                freeze_projector=args.freeze_projector, freeze_llm=args.freeze_llm, trainable=trainable)


def data_identity(sources) -> list[dict]:
    """Each source as a resume must find it again: resolved paths, settings, and the annotation's size and
    sampled content hash (no mtime: a copy changes it)."""
    from data.dataset import file_fingerprint
    out = []
    for s in sources:
        fp = file_fingerprint(s.annotation)
        out.append(dict(name=s.name, annotation=os.path.realpath(s.annotation), size=fp["size"],
                        sample_sha1=fp["sample_sha1"],
                        image_folder=s.image_folder and os.path.realpath(s.image_folder), repeat=s.repeat,
                        max_num=s.max_num, data_augment=s.data_augment))
    return out


def resume_point(args, run: dict) -> tuple[str | None, dict | None]:
    """(the checkpoint --resume names, its meta.json), or (None, None) for a fresh start. Refused: a resume
    that would not continue that run exactly (`run`: run_settings()), and a fresh start over a run's
    checkpoints."""
    found = complete_checkpoints(args.output_dir)
    if args.resume is None and found:
        raise ValueError(f"{args.output_dir} already holds checkpoints ({os.path.basename(found[-1][1])}): "
                         f"pass --resume auto to continue that run, or choose another --output-dir (or "
                         f"remove it) to start over")
    if args.resume is None or (args.resume == "auto" and not found):
        if args.resume == "auto":
            print(f"--resume auto: no complete checkpoint in {args.output_dir} yet, starting from step 0")
        return None, None
    path = found[-1][1] if args.resume == "auto" else args.resume.rstrip("/")
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise ValueError(f"--resume {args.resume}: not a complete checkpoint (no meta.json); give an iter_* "
                         f"directory or 'auto'")
    meta = read_meta(path)
    check_resume(path, meta, run, vars(args))
    return path, meta


def check_resume(path: str, meta: dict, run: dict, args: dict) -> None:
    """Refuse to resume `path` unless this run (`run`: run_settings(); `args`: all options) continues it
    exactly."""
    # checkpoints from before these settings were in "run" recorded them elsewhere in meta.json
    recorded = {k: meta.get("args", {}).get(k) for k in ("lr", "weight_decay", "warmup_ratio")}
    old = {**recorded, "system_message": meta.get("system_message"), **meta["run"]}
    if old.get("data") != run["data"]:
        raise ValueError(f"cannot resume {path}: {_data_change(old.get('data'), run['data'])}")
    diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v and k != "trainable"}
    if diff:
        raise ValueError(f"cannot resume {path}: these settings differ (checkpoint, now): {diff}")
    planned, asked = schedule_length(meta["args"]), schedule_length(args)
    if planned != asked:  # changing the schedule's length moves the LR of the steps already taken
        raise ValueError(f"cannot resume {path} with {asked}: its learning-rate schedule (warmup, then "
                         f"cosine to 0) was planned for {planned}, and another length would move the "
                         f"learning rate back up mid-run. Resume with {planned}, or, to train further, "
                         f"convert the checkpoint and start a new run from it")
    if old["trainable"] != run["trainable"]:  # DeepSpeed loads the saved tensors non-strictly
        changed = sorted(set(old["trainable"]) ^ set(run["trainable"]))[:10]
        raise ValueError(f"cannot resume {path}: it trained other tensors than this run would (freeze "
                         f"options?): {changed}")


def schedule_length(args: dict) -> str:
    """What fixes the length of the LR schedule: --max-steps when given, else --epochs."""
    return f"--max-steps {args['max_steps']}" if args["max_steps"] else f"--epochs {args['epochs']:g}"


def _data_change(old, new) -> str:
    if not isinstance(old, list) or [d.get("annotation") for d in old] != [d["annotation"] for d in new]:
        return f"the data sources differ (checkpoint: {old}; now: {new})"
    for a, b in zip(old, new):
        if (a.get("size"), a.get("sample_sha1")) != (b["size"], b["sample_sha1"]):
            return (f"{b['annotation']} changed since the checkpoint (size {a.get('size')} -> {b['size']} "
                    f"bytes, content fingerprint {a.get('sample_sha1')} -> {b['sample_sha1']}); the data "
                    f"order and position would not mean the same samples: start a new run (another "
                    f"--output-dir)")
        if a != b:
            return f"source {b['name']} has other settings (checkpoint: {a}; now: {b})"
    return "the data differs"


def restore_rng(ckpt_dir: str, rank: int) -> None:
    state = torch.load(os.path.join(ckpt_dir, f"rng_state_{rank}.pt"), weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


def truncate_logs(out_dir: str, step: int) -> None:
    """On resume: drop the rows that the interrupted run logged after its checkpoint, and a line that a kill
    cut short (it does not read as JSON): the run resumes from before it, so its row is written again."""
    for path in (os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "samples.jsonl")):
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                rows = [line for line in f if line.strip() and _row_step(line) <= step]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(rows)
            os.replace(tmp, path)


def _row_step(line: str) -> float:
    """The step of a log row; inf (dropped) for a torn one."""
    try:
        row = json.loads(line)
        return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else math.inf
    except ValueError:
        return math.inf
