"""Fine-tune InternVL 1.5 (2B / 4B / 26B): full, LoRA or QLoRA, under DeepSpeed ZeRO-1 or ZeRO-3.

    python train.py                                     # the embedded CPU demo (tiny random model, synthetic data)
    torchrun --nproc_per_node 8 train.py --size 4b --mode lora --model-path DIR --data train.jsonl,images/

One flat loop, top to bottom: options -> checks -> data -> model -> deepspeed.initialize -> steps -> checkpoints.

Loss reduction (SPEC §8). The loss of an optimizer step is the mean cross-entropy over ALL supervised tokens of
that step, on every rank and micro-batch together: sum(CE) / N_step. Each micro-batch backpropagates
sum(CE_micro) * world / N_step (DeepSpeed averages gradients over ranks, and is told not to divide by the
accumulation steps), so the gradient is exactly that of the step's token mean, whatever the split over ranks and
micro-batches. The logged `loss` is that same number. (The official trainer instead averages per-micro-batch
token means, which weights short answers more and changes with the batch split.)

Checkpoints: OUTPUT/iter_{step}/ = DeepSpeed's files (frozen parameters excluded: a LoRA checkpoint is adapters +
projector + optimizer state), rng_state_{rank}.pt and meta.json. Each is written as iter_{step}.tmp and renamed
when complete; OUTPUT/latest names the newest. `--resume auto` continues from the newest complete one.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import sys
import time
import types
import warnings
from functools import partial

import torch

# --- official 2nd-stage fine-tune recipes (SPEC §11.1); QLoRA uses the LoRA row ---
RECIPES = {
    ("2b", "full"): dict(lr=4e-5, weight_decay=0.01, batch_size=4, grad_accum=4, drop_path_rate=0.1),
    ("2b", "lora"): dict(lr=4e-5, weight_decay=0.01, batch_size=4, grad_accum=2, drop_path_rate=0.0),
    ("4b", "full"): dict(lr=4e-5, weight_decay=0.05, batch_size=4, grad_accum=4, drop_path_rate=0.1),
    ("4b", "lora"): dict(lr=4e-5, weight_decay=0.05, batch_size=4, grad_accum=2, drop_path_rate=0.0),
    ("26b", "full"): dict(lr=2e-5, weight_decay=0.05, batch_size=2, grad_accum=8, drop_path_rate=0.4),
    ("26b", "lora"): dict(lr=2e-5, weight_decay=0.05, batch_size=2, grad_accum=4, drop_path_rate=0.0),
}
COMMON = dict(warmup_ratio=0.03, epochs=1, max_length=4096, save_steps=200, lora_r=16, lora_dropout=0.05,
              log_interval=1, save_total_limit=3)  # LoRA alpha: 2r; tiles: config.json; workers: the cores
# The demo: a tiny random 2B-like model on synthetic shapes, 800 steps; bench/demo_score.py measures how often its
# answers name the colour and the shape of freshly drawn images.
DEMO = dict(mode="lora", lr=2e-3, weight_decay=0.0, batch_size=4, grad_accum=1, max_steps=800, warmup_ratio=0.05,
            max_length=512, max_tiles=1, save_steps=200, lora_r=16, lora_dropout=0.0,
            drop_path_rate=0.0, num_workers=0, activation_checkpointing=False)
# What tells the three released architectures apart (checked against --size before anything heavy is loaded).
ARCHITECTURES = {"2b": ("internlm2", "layer_norm"), "4b": ("phi3", "layer_norm"), "26b": ("internlm2", "rms_norm")}
GRAD_CLIP = 1.0  # official max_grad_norm
FORMAT = "internvl-train-checkpoint/1"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=lambda prog: (
        argparse.RawDescriptionHelpFormatter(prog, width=100, max_help_position=36)))
    g = p.add_argument_group("model")
    g.add_argument("--model-path", help="official InternVL 1.5 directory (config.json, safetensors, tokenizer). "
                                        "Default: none; without it and without data: the embedded demo")
    g.add_argument("--size", choices=["2b", "4b", "26b"],
                   help="model size: picks the recipe defaults and is checked against the checkpoint's "
                        "architecture (default: read from the checkpoint)")
    g.add_argument("--mode", choices=["full", "lora", "qlora"], help="what trains (default lora): full = LLM + "
                   "projector; lora / qlora = adapters + projector (qlora: the LLM base is NF4)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[], metavar="ANNOTATION[,IMAGE_FOLDER[,REPEAT[,MAX_TILES]]]",
                   help="a .json/.jsonl LLaVA-format annotation file with its image folder, repeat ratio "
                        "(r < 1: seeded fraction; r > 1: floor(r) copies + a seeded fraction; default 1) and tile cap "
                        "(default --max-tiles); repeatable")
    g.add_argument("--eval-data", action="append", default=[], metavar="ANNOTATION[,IMAGE_FOLDER[,REPEAT[,MAX_TILES]]]",
                   help="held-out data (the --data syntax, repeatable): eval_loss every --eval-steps and at the end "
                        "(default: none)")
    g.add_argument("--eval-steps", type=int, help="evaluate every N optimizer steps (default: --save-steps)")
    g.add_argument("--eval-samples", type=int, default=0, metavar="K",
                   help="at each evaluation, greedy answers to the first K held-out prompts -> OUTPUT/samples.jsonl "
                        "(default 0)")
    g.add_argument("--meta-path", help="official meta file {name: {root, annotation, repeat_time, "
                                             "max_dynamic_patch}} (default: none)")
    g.add_argument("--system-message", help="the system prompt of every training sample (default: config.json's "
                                            "system_message, else the official template default); convert.py "
                                            "writes it into the exported config.json")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="turn annotation problems into counted skips instead of an error before training "
                        "(default off)")
    g.add_argument("--max-length", type=int, help="max tokens per sample, image tokens included (default 4096); "
                                                  "image spans are never cut")
    g.add_argument("--max-tiles", type=int, help="max dynamic tiles per image, thumbnail aside (default: "
                                                 "config.json's max_dynamic_patch)")
    g.add_argument("--min-tiles", type=int, help="min dynamic tiles per image (default: min_dynamic_patch)")
    g.add_argument("--thumbnail", action=argparse.BooleanOptionalAction, default=None,
                   help="append a thumbnail tile to multi-tile images (default: config.json's use_thumbnail)")
    g.add_argument("--num-workers", type=int,
                   help="DataLoader workers per rank (default: min(4, CPU cores of this rank); demo 0)")
    g.add_argument("--max-packed-tokens", type=int, metavar="N",
                   help="sequence packing: each micro-batch is one row of whole samples up to N tokens (official "
                        "8192), attention isolated between them; the per-device batch is then 1 "
                        "(default: no packing)")
    g.add_argument("--max-packed-tiles", type=int, default=40, metavar="T",
                   help="with packing: at most T image tiles per pack (official num_images_expected, default 40)")
    g = p.add_argument_group("optimisation (defaults: the official 2nd-finetune recipe of --size and --mode)")
    g.add_argument("--deepspeed", help="DeepSpeed config (default ds_zero3.json for 26b full/lora, else "
                                         "ds_zero1.json)")
    g.add_argument("--batch-size", type=int, help="micro-batch per device (default: the recipe's, demo 4)")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: the recipe's, demo 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW, betas 0.9/0.999, eps 1e-8, clip 1.0; "
                                                 "default: the recipe's)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (on every trainable tensor, as "
                                                             "official; default: the recipe's)")
    g.add_argument("--warmup-ratio", type=float, help="linear warmup fraction of the steps, then cosine to 0 "
                                                      "(default 0.03)")
    g.add_argument("--epochs", type=float, help="epochs (default 1); ignored when --max-steps is given")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs; default: from --epochs; "
                                                 "demo 800); 0 = a dry run: load the data and the model, build "
                                                 "the engine, print the summary, exit")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU (default auto)")
    g.add_argument("--seed", type=int, default=42,
                   help="seeds the data order, repeat-ratio sampling, LoRA init and dropout (default 42)")
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="abort after this many optimizer steps in a row with a NaN/inf loss (each is skipped; "
                        "default 5)")
    g = p.add_argument_group("LoRA / freezing")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default 16, official)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2r, as official)")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    g.add_argument("--lora-targets", help="comma-separated official module names (default: every LLM linear but "
                                          "the head: wqkv,wo,w1,w2,w3 / qkv_proj,o_proj,gate_up_proj,down_proj)")
    g.add_argument("--lora-vit", action="store_true", help="also put adapters on the ViT linears (default off)")
    g.add_argument("--lora-rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r) instead of alpha / r "
                                                                          "(default off)")
    g.add_argument("--train-vit", action="store_true", help="train the whole ViT (default off: frozen, as official)")
    g.add_argument("--unfreeze-vit-layers", type=int, metavar="K",
                   help="train ViT layers K.. (official unfreeze_vit_layers: 0 = off, -K = the last K; default off)")
    g.add_argument("--freeze-projector", action="store_true", help="freeze the mlp1 projector (default off)")
    g.add_argument("--freeze-llm", action="store_true", help="full mode: freeze the LLM (train the projector "
                                                                            "only; default off)")
    g.add_argument("--drop-path-rate", type=float, help="ViT drop path (default 0.1 2b/4b full, 0.4 26b full, 0 LoRA)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer activation checkpointing of ViT and LLM (default on)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="run directory (default runs/demo or runs/{size}_{mode})")
    g.add_argument("--save-steps", type=int, help="checkpoint every N optimizer steps (default 200) and at the end")
    g.add_argument("--save-total-limit", type=int, help="checkpoints to keep (default 3)")
    g.add_argument("--resume", help="'auto' (newest complete checkpoint of --output-dir, if any) or an iter_* path "
                                  "(default: start from step 0)")
    g.add_argument("--log-interval", type=int, help="progress-bar refresh every N steps (metrics.jsonl: every step; "
                                                       "default 1)")
    g = p.add_argument_group("memory")
    g.add_argument("--estimate-memory", action="store_true",
                   help="print the per-GPU memory estimate of this run (weights, gradients, optimizer, activations) "
                        "and exit; loads no weights (--size alone is enough; default off)")
    g.add_argument("--gpus", type=int, help="with --estimate-memory: data-parallel GPUs (default: WORLD_SIZE or 8)")
    g.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="start even when the estimate exceeds the free memory of a GPU (default: refuse)")
    g.add_argument("--gpu-memory", type=float, default=80.0,
                   help="with --estimate-memory: GiB per GPU to check the estimate against (default 80)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the `deepspeed` launcher's
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def fill_defaults(args):
    """Recipe defaults for the options not given: the demo's, then those of (size, mode), then the common ones."""
    if args.demo:
        for k, v in DEMO.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    args.mode = args.mode or "lora"
    for k, v in RECIPES[(args.size, "full" if args.mode == "full" else "lora")].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in COMMON.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_workers is None:  # up to 4, but never more than this rank's cores (PyTorch warns past them)
        cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.num_workers = min(4, max(1, cores))
    if args.activation_checkpointing is None:
        args.activation_checkpointing = True
    if args.deepspeed is None:
        here = os.path.dirname(os.path.abspath(__file__))
        zero3 = args.size == "26b" and args.mode != "qlora"
        args.deepspeed = os.path.join(here, "ds_zero3.json" if zero3 else "ds_zero1.json")
    return args


def checkpoint_size(config) -> str:
    """The released size whose architecture this checkpoint has (LLM class and ViT variant), or an error."""
    found = (config.llm.family, config.vision.norm_type)
    for size, arch in ARCHITECTURES.items():
        if arch == found:
            return size
    raise ValueError(f"the checkpoint's architecture (LLM {config.llm.family}, ViT {config.vision.norm_type}) is "
                     f"none of InternVL 1.5's: {ARCHITECTURES}")


def complete_checkpoints(out_dir):
    """[(step, path)] of the complete iter_* checkpoints (renamed, with meta.json), oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "iter_*")):
        m = re.fullmatch(r"iter_(\d+)", os.path.basename(path))
        if m and os.path.exists(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(args):
    if args.resume is None:
        return None
    if args.resume == "auto":
        found = complete_checkpoints(args.output_dir)
        return found[-1][1] if found else None
    path = args.resume.rstrip("/")
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise SystemExit(f"error: --resume {args.resume}: not a complete checkpoint (no meta.json); "
                         f"give an iter_* directory or 'auto'")
    return path


def resolve_tiling(args, config):
    """Tiling follows the checkpoint's config.json, as chat.py and convert.py do; flags override it."""
    if args.max_tiles is None:  # dynamic_image_size false: one S x S tile, i.e. a cap of 1
        args.max_tiles = config.max_dynamic_patch if config.dynamic_image_size else 1
    args.min_tiles = config.min_dynamic_patch if args.min_tiles is None else args.min_tiles
    args.thumbnail = config.use_thumbnail if args.thumbnail is None else args.thumbnail
    if not 1 <= args.min_tiles <= args.max_tiles:
        raise SystemExit(f"error: tiles per image must satisfy 1 <= min ({args.min_tiles}) <= max "
                         f"({args.max_tiles})")


def read_deepspeed_config(args):
    """(the DeepSpeed config, its ZeRO stage); an unsupported (mode, stage) pair is refused here."""
    import lora
    if not os.path.isfile(args.deepspeed):
        raise SystemExit(f"error: --deepspeed {args.deepspeed}: no such file")
    with open(args.deepspeed) as f:
        ds_config = json.load(f)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    try:
        lora.check_supported(args.mode, zero_stage)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return ds_config, zero_stage


def lora_config(args):
    import lora
    return None if args.mode == "full" else lora.LoRAConfig(
        r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, vit=args.lora_vit, rslora=args.lora_rslora,
        targets=args.lora_targets.split(",") if args.lora_targets else None)


def set_trainable(model, args, mode):
    """requires_grad for the run's mode and freeze options (lora.mark_trainable, then --freeze-llm and the
    official --unfreeze-vit-layers: layers[K:] train, 0 = none, -K = the last K)."""
    import lora
    lora.mark_trainable(model, mode, train_vit=args.train_vit, freeze_projector=args.freeze_projector)
    if args.freeze_llm:
        for p in model.llm.parameters():
            p.requires_grad_(False)
    if args.unfreeze_vit_layers:
        for layer in model.vit.layers[args.unfreeze_vit_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)


def meta_model(config, args, lora_cfg):
    """The run's model on the meta device (no memory): LoRA injected and requires_grad set as training sets it."""
    import lora
    from model import build_model
    model = build_model(config, "meta")
    if lora_cfg is not None:
        lora.inject_lora(model, lora_cfg)
    set_trainable(model, args, "lora" if args.mode == "qlora" else args.mode)  # no 4-bit layers on meta
    return model


def memory_estimate(config, args, lora_cfg, zero_stage, ds_config, gpus, on_gpu):
    import memory
    zero = ds_config.get("zero_optimization", {})
    run = memory.RunShape(mode=args.mode, zero_stage=zero_stage, gpus=gpus,
                          batch_size=args.batch_size, max_length=args.max_packed_tokens or args.max_length,
                          tiles=args.max_tiles + (1 if args.thumbnail and args.max_tiles > 1 else 0),
                          activation_checkpointing=args.activation_checkpointing,
                          dtype_bytes=4 if args.dtype == "fp32" or (args.dtype == "auto" and not on_gpu) else 2,
                          reduce_bucket=float(zero.get("reduce_bucket_size", 5e8)),
                          zero3_gathered=float(zero.get("stage3_max_live_parameters", 1e9))
                          + float(zero.get("stage3_prefetch_bucket_size", 5e7)),
                          zero3_persistence=float(zero.get("stage3_param_persistence_threshold", 1e5)))
    est = memory.estimate(meta_model(config, args, lora_cfg), config, run, on_gpu=on_gpu)
    return est, memory.format_table(est, run, f"InternVL 1.5 {args.size}")


def print_memory_estimate(args):
    """--estimate-memory: the table for --model-path's config.json or the --size preset, and a verdict."""
    import memory
    from model import load_config, preset
    if args.model_path is None and args.size is None:
        raise SystemExit("error: --estimate-memory needs --size or --model-path")
    config = load_config(args.model_path) if args.model_path else preset(args.size)
    args.size = args.size or checkpoint_size(config)
    args.demo = False
    args = fill_defaults(args)
    resolve_tiling(args, config)
    ds_config, zero_stage = read_deepspeed_config(args)
    lora_cfg = lora_config(args)
    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "8"))
    est, table = memory_estimate(config, args, lora_cfg, zero_stage, ds_config, gpus, on_gpu=True)
    print(table)
    problem = memory.check_fits(est, [int(args.gpu_memory * memory.GIB)])
    print(f"verdict: {'does NOT fit' if problem else 'fits'} on {gpus} GPU(s) of {args.gpu_memory:g} GiB"
          + (f": {problem}" if problem else ""))
    return est


def main(argv=None):
    args = parse_args(argv)
    if args.estimate_memory:
        return print_memory_estimate(args)

    # ---------------------------------------------------------------- checks before any heavy work
    args.demo = args.model_path is None and not args.data and not args.meta_path
    if args.demo and args.output_dir is None:
        args.output_dir = os.path.join("runs", "demo")
    if args.demo:
        from demo import make_demo
        demo_root = os.path.join(args.output_dir, "demo")
        if int(os.environ.get("RANK", "0")) == 0:
            make_demo(demo_root)
        args.model_path = os.path.join(demo_root, "base")
        args.data = [f"{os.path.join(demo_root, 'data', 'train.jsonl')},{os.path.join(demo_root, 'data')}"]
        args.eval_data = args.eval_data or [f"{os.path.join(demo_root, 'data', 'eval.jsonl')},"
                                            f"{os.path.join(demo_root, 'data')}"]
        args.eval_steps, args.eval_samples = args.eval_steps or 100, args.eval_samples or 4
    if args.model_path is None:
        raise SystemExit("error: --model-path is missing: give an official InternVL 1.5 directory "
                         "(or run `python train.py` with no model and no data for the demo)")
    if not args.data and not args.meta_path:
        raise SystemExit("error: no training data: give --data ANNOTATION[,IMAGE_FOLDER[,REPEAT]] or --meta-path")
    if not args.demo and not os.path.isfile(os.path.join(args.model_path, "config.json")):
        raise SystemExit(f"error: --model-path {args.model_path}: no config.json there "
                         f"(expected an official InternVL 1.5 directory)")
    from model import load_config
    config = _wait_for(lambda: load_config(args.model_path)) if args.demo else load_config(args.model_path)
    from data.templates import resolve_system_message
    config.system_message = resolve_system_message(config, args.system_message)
    found = checkpoint_size(config)
    if args.size is not None and args.size != found:
        raise SystemExit(f"error: --size {args.size} but {args.model_path} has the {found} architecture "
                         f"(LLM {config.llm.family}, ViT {config.vision.norm_type}); pass --size {found}")
    args.size = found
    if args.max_packed_tokens is not None:
        if args.batch_size not in (None, 1):
            raise SystemExit(f"error: --max-packed-tokens packs samples into one row per micro-batch: "
                             f"--batch-size must be 1, not {args.batch_size}")
        args.batch_size = 1
    args = fill_defaults(args)
    resolve_tiling(args, config)
    if args.max_packed_tokens is not None and args.max_packed_tokens < args.max_length:
        raise SystemExit(f"error: --max-packed-tokens {args.max_packed_tokens} is below --max-length "
                         f"{args.max_length}: the longest sample must fit a pack")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.size}_{args.mode}")
    from data import Source, read_meta_file
    if args.meta_path and not os.path.isfile(args.meta_path):
        raise SystemExit(f"error: --meta-path {args.meta_path}: no such file")
    try:
        sources = [Source.parse(s) for s in args.data] + (read_meta_file(args.meta_path) if args.meta_path else [])
    except ValueError as e:  # a malformed --data spec or meta file
        raise SystemExit(f"error: {e}")
    for s in sources:
        if not os.path.isfile(s.annotation):
            raise SystemExit(f"error: data file {s.annotation} does not exist (source {s.name})")
        if s.image_folder is not None and not os.path.isdir(s.image_folder):
            raise SystemExit(f"error: image folder {s.image_folder} does not exist (source {s.name}: {s.annotation})")
    ds_config, zero_stage = read_deepspeed_config(args)
    import lora
    if args.freeze_llm and args.mode != "full":
        raise SystemExit("error: --freeze-llm is for --mode full (LoRA modes already freeze the LLM base)")
    lora_cfg = lora_config(args)
    resume_from = resolve_resume(args)
    if args.resume is None and complete_checkpoints(args.output_dir):
        raise SystemExit(f"error: {args.output_dir} already holds checkpoints "
                         f"({os.path.basename(complete_checkpoints(args.output_dir)[-1][1])}): pass --resume auto to "
                         f"continue that run, or choose another --output-dir (or remove it) to start over")
    if args.resume == "auto" and resume_from is None:
        print(f"--resume auto: no complete checkpoint in {args.output_dir} yet, starting from step 0")
    meta_args = _meta_args(args, sources, int(os.environ.get("WORLD_SIZE", "1")), lora_cfg)
    if resume_from:
        with open(os.path.join(resume_from, "meta.json")) as f:
            meta = json.load(f)
        if meta["run"].get("data") != meta_args["data"]:
            change = _data_change(meta["run"].get("data"), meta_args["data"])
            raise SystemExit(f"error: cannot resume {resume_from}: {change}")
        diff = {k: (meta["run"].get(k), v) for k, v in meta_args.items() if meta["run"].get(k) != v}
        if diff:
            raise SystemExit(f"error: cannot resume {resume_from}: these settings differ (checkpoint, now): {diff}")
        planned, asked = _schedule_length(meta["args"]), _schedule_length(vars(args))
        if planned != asked:  # the LR schedule's length: changing it moves the LR of the steps already taken
            raise SystemExit(f"error: cannot resume {resume_from} with {asked}: its learning-rate schedule (warmup, "
                             f"then cosine to 0) was planned for {planned}, and another length would move the "
                             f"learning rate back up mid-run. Resume with {planned}, or, to train further, convert "
                             f"the checkpoint and start a new run from it")

    # ---------------------------------------------------------------- distributed setup
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo collectives
    # DeepSpeed calls two torch.distributed functions that torch has renamed; each call would print a FutureWarning
    # that nothing here can act on (34 per ZeRO-3 run).
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                      r"deprecated", FutureWarning)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and on_gpu) else torch.float32
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    # DeepSpeed config: fill the values the command line owns; anything else left "auto" is an error.
    ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
    ds_config["gradient_accumulation_steps"] = args.grad_accum
    ds_config["train_batch_size"] = args.batch_size * args.grad_accum * world
    ds_config["gradient_clipping"] = GRAD_CLIP
    ds_config.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds_config.setdefault("fp16", {})["enabled"] = False
    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8}})
    ds_config["optimizer"]["params"].update(lr=args.lr, weight_decay=args.weight_decay)
    if not on_gpu:  # CPU: no overlapping communication streams
        ds_config["zero_optimization"]["overlap_comm"] = False
    left = [k for k, v in _flatten(ds_config).items() if v == "auto"]
    if left:
        raise SystemExit(f"error: {args.deepspeed} leaves {left} as 'auto'; train.py fills only the batch, "
                         f"accumulation, clipping, precision, lr and weight decay")

    # ---------------------------------------------------------------- data
    # Before the model: every data problem is reported here. Rank 0 builds (or reads from the cache) the index of
    # the annotations, image files checked, and hands it to the other ranks.
    from data import DataError, LengthGroupedSampler, SupervisedDataset, collate, load_tokenizer
    from data.dataset import default_cache_dir
    from data.packing import PackedBatchSampler, collate_packed, packed_total_steps
    tokenizer = load_tokenizer(args.model_path)
    make = partial(SupervisedDataset, sources, tokenizer, config.template, config.system_message,
                   max_num=args.max_tiles, min_num=args.min_tiles, use_thumbnail=args.thumbnail,
                   image_size=config.force_image_size, max_length=args.max_length, seed=args.seed,
                   skip_bad_samples=args.skip_bad_samples, cache_dir=default_cache_dir())
    payload = [None]
    if master:
        try:
            dataset = make()
            payload = [dataset.source_index]
        except DataError as e:
            payload = [str(e)]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        dist.destroy_process_group()
        raise SystemExit(f"error: {payload[0]}" if master else 1)  # the other ranks exit quietly
    if not master:
        dataset = make(index=payload[0])
    dataset.log_problems = False  # reported below from each batch's meta, capped per run (workers restart)
    if args.max_packed_tokens:  # one pack per micro-batch; the number of packs per epoch is planned in advance
        sampler = PackedBatchSampler(dataset.lengths, args.max_packed_tokens, tiles=dataset.tiles,
                                     max_tiles=args.max_packed_tiles, world_size=world, rank=rank, seed=args.seed)
        collate_fn = partial(collate_packed, max_tokens=args.max_packed_tokens)
        steps_per_epoch = sampler.micro_batches(0) // args.grad_accum
        epoch_steps = packed_total_steps(sampler, args.epochs, args.grad_accum)
    else:
        sampler = LengthGroupedSampler(dataset.lengths, dataset.is_image, batch_size=args.batch_size,
                                       world_size=world, rank=rank, seed=args.seed)
        collate_fn = collate
        steps_per_epoch = len(sampler) // args.grad_accum  # micro-batches per rank and epoch: equal on every rank
        epoch_steps = math.ceil(args.epochs * steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} samples make no full step of "
                         f"{args.batch_size * args.grad_accum * world}")
    total_steps = args.max_steps if args.max_steps is not None else epoch_steps
    import evaluate
    args.eval_steps = args.eval_steps or args.save_steps
    evaluator = evaluate.setup(args, config, tokenizer, world, rank, zero_stage, log,
                               sum_over_ranks=lambda values: all_reduce_sum(values, device))

    # ---------------------------------------------------------------- memory: refuse before loading anything
    if on_gpu:
        import memory
        est, table = memory_estimate(config, args, lora_cfg, zero_stage, ds_config, world, on_gpu)
        log(table)
        problem = memory.check_fits(est, [torch.cuda.mem_get_info(device)[0]])
        if problem and args.memory_check:
            raise SystemExit(f"error: {problem}. The estimate can be off by about 15%: --no-memory-check tries "
                             f"anyway")

    # ---------------------------------------------------------------- model
    from model import InternVL
    from model.weights import checkpoint_fingerprint
    args.base_fingerprint = checkpoint_fingerprint(args.model_path)  # convert.py refuses a base changed since
    from model.weights import check_checkpoint, iter_checkpoint, trim_heap
    t0 = time.time()
    if zero_stage == 3:
        # Partitioned while it is built; each checkpoint tensor is read on rank 0 only and scattered, so no rank
        # ever holds the whole model.
        # (No dtype argument: deepspeed 0.19's Init ignores it on CPU and picks bf16; from the config it is right.)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = InternVL(config)
        params = dict(model.named_parameters())
        files = check_checkpoint(args.model_path, config, {n: p.ds_shape for n, p in params.items()})
        for name, tensor in iter_checkpoint(args.model_path, config, files, read=master):
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if master:
                    params[name].data.copy_(tensor)
            del tensor
            trim_heap()  # the gathered copy and the read buffer are freed: give them back
    else:
        from model import load_pretrained
        prepare = partial(lora.prepare_qlora, device=device, compute_dtype=dtype) if args.mode == "qlora" else None
        model = load_pretrained(args.model_path, dtype=dtype, device=device, prepare=prepare)
    if lora_cfg is not None:
        torch.manual_seed(args.seed)  # the same adapters on every rank and for every world size
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
            lora.inject_lora(model, lora_cfg)
    set_trainable(model, args, args.mode)
    report = lora.parameter_report(model)
    model.vit.set_drop_path_rate(args.drop_path_rate)  # stays active though the ViT is frozen (official, §10.3)
    model.set_gradient_checkpointing(vit=args.activation_checkpointing, llm=args.activation_checkpointing)
    # DeepSpeed starts its backward bookkeeping from hooks on the tensors a forward returns, and it looks only into
    # tensors, tuples, lists and dicts; InternVL returns a dataclass, so training calls it through this forward.
    model.forward = types.MethodType(_forward_returning_dict, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit("error: nothing to train with these freeze options")
    load_seconds = time.time() - t0

    warmup = math.ceil(args.warmup_ratio * total_steps)

    def lr_lambda(step):  # HF get_cosine_schedule_with_warmup, as the official trainer
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))

    # ---------------------------------------------------------------- resume
    step, epoch, micro_in_epoch = 0, 0, 0
    counters = dict(skipped_steps=0, nonfinite_steps=0, all_masked_steps=0, all_masked_micro_batches=0,
                    samples_seen=0, replaced_samples=0, image_failures=0)
    meta_args["trainable"] = trainable
    if resume_from:
        if meta["run"]["trainable"] != trainable:  # DeepSpeed loads the saved tensors non-strictly: check here
            raise SystemExit(f"error: cannot resume {resume_from}: it trained other tensors than this run would "
                             f"(freeze options?): {sorted(set(meta['run']['trainable']) ^ set(trainable))[:10]}")
        out_dir, tag = os.path.split(resume_from)
        engine.load_checkpoint(out_dir, tag=tag, load_module_strict=False,  # frozen tensors are not in it:
                               load_optimizer_states=True, load_lr_scheduler_states=True)  # checked via meta
        step, epoch, micro_in_epoch = meta["step"], meta["data"]["epoch"], meta["data"]["micro_batches_in_epoch"]
        counters.update(meta["counters"])

    def batches():  # this rank's micro-batches from (epoch, position) on, epoch after epoch
        nonlocal epoch, micro_in_epoch
        while True:
            sampler.set_epoch(epoch, micro_in_epoch)
            dataset.set_epoch(epoch)  # before the workers fork: the JPEG augmentation follows the epoch
            gc.freeze()  # the workers fork: the collector then leaves the parent's objects (and their pages) alone
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                                 num_workers=args.num_workers, pin_memory=on_gpu,
                                                 generator=torch.Generator().manual_seed(args.seed + epoch))
            for b in loader:
                micro_in_epoch += 1
                yield b
            epoch, micro_in_epoch = epoch + 1, 0

    data_iter = batches()
    if resume_from:  # after the loader exists, so nothing below draws from the restored generators first
        state = torch.load(os.path.join(resume_from, f"rng_state_{rank}.pt"), weights_only=False)
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if on_gpu and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"])

    # ---------------------------------------------------------------- summary
    os.makedirs(args.output_dir, exist_ok=True)
    if master:
        n_total = sum(t for _, t in report.values())
        log(f"InternVL 1.5 {args.size} ({config.llm.family} LLM {config.llm.num_layers}x{config.llm.hidden_size}, "
            f"ViT {config.vision.num_layers}x{config.vision.hidden_size}) from {args.model_path}: "
            f"{n_total / 1e6:.1f}M parameters, loaded in {load_seconds:.1f}s")
        log(f"mode {args.mode}, ZeRO-{zero_stage}, {str(dtype).replace('torch.', '')}, {world} process(es) on "
            f"{'GPU' if on_gpu else 'CPU'}" + (f", LoRA r={lora_cfg.r} alpha={lora_cfg.alpha:g} "
                                                 f"dropout={lora_cfg.dropout:g}" if lora_cfg else ""))
        log(lora.format_report(report, args.mode))
        log("data (after repeat ratios):")
        for name, c in dataset.source_counts.items():
            log(f"  {name:<20} {c['sampled']:>9,} samples ({c['valid']:,} valid of {c['records']:,} records, "
                f"{c['bad']} bad)")
        log(f"  {'total':<20} {len(dataset):>9,} samples, {sum(dataset.is_image):,} with images; template "
            f"{config.template}")
        left_out = getattr(sampler, "left_out", {})  # batches never mix modalities, nor repeat a sample to fill
        if any(left_out.values()):
            log(f"  each epoch leaves out {left_out['image']} image and {left_out['text-only']} text-only samples "
                f"that do not fill a batch of {args.batch_size} x {world} (a different seeded set each epoch)")
        log(f"effective batch {args.batch_size} x {args.grad_accum} accum x {world} = "
            f"{args.batch_size * args.grad_accum * world}; {steps_per_epoch} steps/epoch; {total_steps} steps "
            f"(warmup {warmup}), lr {args.lr:g}, wd {args.weight_decay:g}; checkpoints every {args.save_steps} "
            f"in {args.output_dir}" + (f"; resumed from {resume_from} at step {step}" if resume_from else ""))
        if args.max_packed_tokens:
            log(f"packing: one pack of <= {args.max_packed_tokens} tokens and <= {args.max_packed_tiles} tiles per "
                f"micro-batch; {sampler.micro_batches(0) * world} packs in epoch 0 for {len(dataset)} samples")
        _truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step)
        _truncate_metrics(os.path.join(args.output_dir, "samples.jsonl"), step)  # --eval-samples rows
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if master else None
    tb = _tensorboard(args.output_dir) if master else None
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train")
    warn = Warnings(rank)

    # ---------------------------------------------------------------- the loop
    engine.train()
    bad_in_a_row = 0
    last_saved = step if resume_from else None
    while step < total_steps:
        t_step = time.time()
        micro = [next(data_iter) for _ in range(args.grad_accum)]
        for b in micro:
            report_data_problems(b["meta"], warn)
        # What the step will see, agreed by every rank with one all-reduce: its supervised tokens (the loss
        # denominator), tokens, samples and image tiles.
        local = [sum(b["meta"]["num_supervised"] for b in micro), sum(b["meta"]["num_tokens"] for b in micro),
                 sum(b["meta"]["num_samples"] for b in micro),
                 sum(int(b["image_flags"].sum()) for b in micro),
                 sum(b["meta"]["num_supervised"] == 0 for b in micro),
                 *(sum(len(b["meta"][k]) if k == "skipped" else b["meta"][k] for b in micro)
                   for k in ("skipped", "image_failures"))]
        n_step, tokens, samples, tiles, all_masked, *problems = (int(x) for x in all_reduce_sum(local, device))
        for k, n in zip(("replaced_samples", "image_failures"), problems):
            counters[k] += n
        lr = scheduler.get_last_lr()[0]  # the lr this step's update uses
        counters["all_masked_micro_batches"] += all_masked
        counters["samples_seen"] += samples
        loss, grad_norm = None, None
        if n_step == 0:  # nothing to learn in this step on any rank: no forward, no update, counted
            counters["all_masked_steps"] += 1
            counters["skipped_steps"] += 1
        else:
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once per step: one sync
            for b in micro:
                b.pop("meta")
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                b["pixel_values"] = b["pixel_values"].to(dtype)
                out = engine(**b)
                micro_sum = out["loss"].float() * out["n_supervised"]  # this micro-batch's summed CE
                loss_sum += micro_sum.detach().double()
                engine.backward(micro_sum * (world / n_step), scale_wrt_gas=False)
                engine.step()
            loss_sum = loss_sum.item()
            loss_total, nonfinite = all_reduce_sum([loss_sum, float(not math.isfinite(loss_sum))], device)
            loss = loss_total / n_step
            applied = engine.was_step_applied()  # DeepSpeed skips an update whose gradient norm is not finite
            if nonfinite > 0:
                counters["nonfinite_steps"] += 1
                bad_in_a_row += 1
                if applied:
                    raise RuntimeError(f"step {step + 1}: the loss is not finite but DeepSpeed applied the update; "
                                       f"this DeepSpeed version does not skip non-finite steps")
                if bad_in_a_row >= args.max_bad_steps:
                    raise RuntimeError(f"aborting: {bad_in_a_row} optimizer steps in a row had a NaN/inf loss "
                                       f"(last: step {step + 1}, loss {loss}); lower the lr or check the data")
            else:
                bad_in_a_row = 0
            if not applied:
                counters["skipped_steps"] += 1
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None
        # The schedule follows the loop step, skipped or not, so the run, its checkpoints and its metrics
        # agree on where they are and the schedule ends with the run. DeepSpeed advances the scheduler only
        # with an applied update: advance it here for a skipped one (non-finite, or no supervised token).
        if n_step == 0 or not applied:
            scheduler.step()
        step += 1
        seconds = time.time() - t_step
        row = dict(step=step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm,
                   tokens=tokens, supervised_tokens=n_step, samples=samples, image_tiles=tiles, seconds=seconds,
                   tokens_per_s=tokens / seconds, samples_per_s=samples / seconds, peak_mem_gb=_peak_memory_gb(on_gpu),
                   **counters)
        if evaluator and (step % args.eval_steps == 0 or step == total_steps):
            row.update(evaluator.run(engine, step, device, dtype))
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if tb is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens", "peak_mem_gb"):
                    if row[k] is not None and math.isfinite(row[k]):
                        tb.add_scalar(f"train/{k}", row[k], step)
                if "eval_loss" in row:
                    tb.add_scalar("eval/loss", row["eval_loss"], step)
            if step % args.log_interval == 0 or step == total_steps:
                bar.set_postfix_str(f"loss {_fmt(loss, '.4f')} lr {row['lr']:.2e} gnorm {_fmt(grad_norm, '.3f')} "
                                    f"tok/s {row['tokens_per_s']:.0f} smp/s {row['samples_per_s']:.2f} "
                                    f"sup {n_step} mem {row['peak_mem_gb']:.1f}G" +
                                    (f" eval {evaluator.last:.4f}" if evaluator and evaluator.last else ""),
                                    refresh=False)
        bar.update(1)
        if step % args.save_steps == 0 or step == total_steps:
            save_checkpoint(engine, args, config, step, epoch, micro_in_epoch, counters, meta_args, lora_cfg,
                            rank, master, on_gpu)
            last_saved = step
    bar.close()
    if metrics is not None:
        metrics.close()
    if tb is not None:
        tb.close()
    final = os.path.join(args.output_dir, f"iter_{last_saved}") if last_saved is not None else None
    log(f"done: {step} steps; skipped {counters['skipped_steps']} (non-finite {counters['nonfinite_steps']}, "
        f"all-masked {counters['all_masked_steps']}); replaced {counters['replaced_samples']} samples "
        f"({counters['image_failures']} unreadable images, the rest too long); checkpoint {final}")
    if final:
        log(f"convert it to an official InternVL 1.5 directory with:\n  python convert.py {final} "
            f"{os.path.join(args.output_dir, 'converted')}")
    engine.destroy()  # release ZeRO-3's hooks and helper threads before the interpreter tears down
    dist.barrier()
    dist.destroy_process_group()


def save_checkpoint(engine, args, config, step, epoch, micro_in_epoch, counters, meta_args, lora_cfg, rank, master,
                    on_gpu):
    """iter_{step}.tmp/ (DeepSpeed files without frozen tensors, per-rank RNG, meta.json), then renamed to
    iter_{step}/, `latest` updated, and only the newest --save-total-limit kept."""
    import torch.distributed as dist
    out, tag = args.output_dir, f"iter_{step}"
    tmp = os.path.join(out, tag + ".tmp")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(out, tag=tag + ".tmp", save_latest=False, exclude_frozen_parameters=True)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if on_gpu else None},
               os.path.join(tmp, f"rng_state_{rank}.pt"))
    dist.barrier()
    if master:
        if os.environ.get("INTERNVL_TEST_KILL_IN_SAVE") == str(step):  # tests: a crash in the middle of a save
            os.kill(os.getpid(), 9)
        meta = {
            "format": FORMAT, "step": step, "tag": tag, "base_model_path": os.path.abspath(args.model_path),
            "base_fingerprint": args.base_fingerprint,
            "size": args.size, "mode": args.mode, "lora": lora_cfg.to_dict() if lora_cfg else None,
            "template": config.template, "system_message": config.system_message,
            "tiling": {"min_dynamic_patch": args.min_tiles, "max_dynamic_patch": args.max_tiles,
                       "use_thumbnail": args.thumbnail, "force_image_size": config.force_image_size},
            "zero_stage": engine.zero_optimization_stage(), "world_size": engine.world_size,
            "dtype": "bf16" if engine.bfloat16_enabled() else "fp32",
            "data": {"epoch": epoch, "micro_batches_in_epoch": micro_in_epoch, "seed": args.seed,
                     "samples_seen": counters["samples_seen"]},
            "counters": dict(counters), "run": meta_args, "args": {k: v for k, v in vars(args).items()},
            "versions": _versions(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(out, tag)
        shutil.rmtree(final, ignore_errors=True)  # a stale one from a run this one resumed before
        os.replace(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        for _, old in complete_checkpoints(out)[:-args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in glob.glob(os.path.join(out, "iter_*.tmp")):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


# --- small helpers ---

def all_reduce_sum(values, device):
    """Sum a list of numbers over the ranks. Every collective of the loop goes through here, with its tensor
    on the training device: NCCL (on GPU) refuses CPU tensors."""
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Warnings:
    """Run-time warnings, at most `cap` per kind and run, printed through tqdm so the progress bar stays whole."""

    def __init__(self, rank, cap=10):
        self.prefix = "warning: " if rank == 0 else f"warning (rank {rank}): "
        self.cap, self.counts = cap, {}

    def __call__(self, kind, message):
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.cap:
            from tqdm import tqdm
            last = f" (the last '{kind}' warning shown; metrics.jsonl counts them all)" if n == self.cap else ""
            tqdm.write(self.prefix + message + last, file=sys.stderr)


def report_data_problems(meta, warn):
    """The problems DataLoader workers met while building a batch (they log nothing themselves)."""
    for problem in meta["skipped"]:
        warn("replaced sample", f"replaced sample {problem}")


def _forward_returning_dict(self, **batch):
    out = type(self).forward(self, **batch)
    return {"loss": out.loss, "n_supervised": out.n_supervised}


def _meta_args(args, sources, world, lora_cfg):
    """The settings a resume must share with the checkpoint (the data order and the trained tensors follow them)."""
    return dict(size=args.size, mode=args.mode, model_path=os.path.abspath(args.model_path),
                data=_data_identity(sources), batch_size=args.batch_size,
                grad_accum=args.grad_accum, world_size=world, seed=args.seed, max_length=args.max_length,
                max_tiles=args.max_tiles, min_tiles=args.min_tiles, thumbnail=args.thumbnail,
                max_packed_tokens=args.max_packed_tokens,
                max_packed_tiles=args.max_packed_tiles, lora=lora_cfg.to_dict() if lora_cfg else None,
                train_vit=args.train_vit, unfreeze_vit_layers=args.unfreeze_vit_layers,
                freeze_projector=args.freeze_projector, freeze_llm=args.freeze_llm)


def _data_identity(sources):
    """Each source as a resume must find it again: resolved paths, settings, and the annotation's size and sampled
    content hash (data.dataset.file_fingerprint without the mtime, which a copy changes)."""
    from data.dataset import file_fingerprint
    out = []
    for s in sources:
        fp = file_fingerprint(s.annotation)
        out.append(dict(name=s.name, annotation=os.path.realpath(s.annotation), size=fp["size"],
                        sample_sha1=fp["sample_sha1"], image_folder=s.image_folder and os.path.realpath(s.image_folder),
                        repeat=s.repeat, max_num=s.max_num, data_augment=s.data_augment))
    return out


def _data_change(old, new):
    """What differs between the checkpoint's data and this run's, in words."""
    if not isinstance(old, list) or [d.get("annotation") for d in old] != [d["annotation"] for d in new]:
        return f"the data sources differ (checkpoint: {old}; now: {new})"
    for a, b in zip(old, new):
        if (a.get("size"), a.get("sample_sha1")) != (b["size"], b["sample_sha1"]):
            return (f"{b['annotation']} changed since the checkpoint (size {a.get('size')} -> {b['size']} bytes, "
                    f"content fingerprint {a.get('sample_sha1')} -> {b['sample_sha1']}); the data order and position "
                    f"would not mean the same samples: start a new run (another --output-dir)")
        if a != b:
            return f"source {b['name']} has other settings (checkpoint: {a}; now: {b})"
    return "the data differs"


def _schedule_length(args):
    """What fixes the length of the LR schedule: --max-steps when given, else --epochs."""
    return f"--max-steps {args['max_steps']}" if args["max_steps"] else f"--epochs {args['epochs']:g}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _wait_for(fn, seconds=600):
    """Other ranks wait for rank 0 to write the demo files."""
    deadline = time.time() + seconds
    while True:
        try:
            return fn()
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _truncate_metrics(path, step):
    """On resume, drop rows the interrupted run logged after its checkpoint."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def _tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _peak_memory_gb(on_gpu):
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _versions():
    from importlib import metadata  # reads the installed versions without importing the packages
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("deepspeed", "bitsandbytes", "safetensors", "sentencepiece", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
