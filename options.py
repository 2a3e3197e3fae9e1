"""train.py's command line: the options, their defaults (the official recipes) and the checks they need before
any heavy work. Every check raises ValueError with the message train.py prints as `error: ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from dataclasses import dataclass

import torch

import lora
from model.config import REFUSED, SIZE_ALIASES, identify_release

DESCRIPTION = ("Fine-tune InternVL 1.5 / 2 / 2.5 (1B to 78B): full, LoRA or QLoRA, under DeepSpeed ZeRO-1 or "
               "ZeRO-3.")


@dataclass(frozen=True)
class Recipe:
    """An official 2nd-stage fine-tune script's settings (internvl_chat/shell/*/2nd_finetune/*.sh).
    Accumulation is BATCH_SIZE / PER_DEVICE_BATCH_SIZE / GPUS at the script's default GPUS; QLoRA uses the
    LoRA script."""
    lr: float
    weight_decay: float
    full: tuple[int, int]  # (per-device batch, accumulation) of the full script
    lora: tuple[int, int]  # of the LoRA script
    drop_path_rate: float  # full; the LoRA scripts use 0
    max_tiles: int | None  # --max_dynamic_patch (None: the checkpoint's; the 1.5 scripts say 12, as it does)
    max_length: int
    zero3: bool  # the scripts' ZeRO stage (3 for the 6B-ViT models, else 1)

    def defaults(self, mode: str) -> dict:
        batch, accum = self.full if mode == "full" else self.lora
        return dict(lr=self.lr, weight_decay=self.weight_decay, batch_size=batch, grad_accum=accum,
                    drop_path_rate=self.drop_path_rate if mode == "full" else 0.0, max_length=self.max_length)


_SMALL_V15 = dict(full=(4, 4), lora=(4, 2), drop_path_rate=0.1, max_tiles=None, max_length=4096, zero3=False)
_SMALL = dict(_SMALL_V15, max_tiles=6)  # InternVL 2: 1B-8B
_BIG = dict(full=(2, 8), lora=(2, 4), drop_path_rate=0.4, max_tiles=6, max_length=4096, zero3=True)  # 26B
# The one recipe table: a released checkpoint -> its official recipe (the names of model.config.RELEASES).
RECIPES = {
    "Mini-InternVL-Chat-2B-V1-5": Recipe(4e-5, 0.01, **_SMALL_V15),
    "Mini-InternVL-Chat-4B-V1-5": Recipe(4e-5, 0.05, **_SMALL_V15),
    "InternVL-Chat-V1-5": Recipe(2e-5, 0.05, **dict(_BIG, max_tiles=None)),
    "InternVL2-1B": Recipe(4e-5, 0.01, **_SMALL),
    "InternVL2-2B": Recipe(4e-5, 0.01, **_SMALL),
    "InternVL2-4B": Recipe(4e-5, 0.01, **_SMALL),
    "InternVL2-8B": Recipe(4e-5, 0.05, **_SMALL),
    "InternVL2-26B": Recipe(2e-5, 0.05, **_BIG),
    "InternVL2-40B": Recipe(2e-5, 0.05, **dict(_BIG, full=(2, 4))),  # 16 GPUs
    "InternVL2_5-1B": Recipe(4e-5, 0.01, **dict(_SMALL, max_length=8192)),
    "InternVL2_5-2B": Recipe(4e-5, 0.01, **dict(_SMALL, max_length=8192)),
    "InternVL2_5-4B": Recipe(4e-5, 0.01, **dict(_SMALL, max_length=8192)),
    "InternVL2_5-8B": Recipe(4e-5, 0.05, **dict(_SMALL, max_length=8192)),
    "InternVL2_5-26B": Recipe(2e-5, 0.05, **dict(_BIG, max_length=8192)),
    "InternVL2_5-38B": Recipe(2e-5, 0.05, **dict(_BIG, full=(2, 4), max_length=8192)),  # 16 GPUs
    "InternVL2_5-78B": Recipe(2e-5, 0.05, **dict(_BIG, full=(1, 4), lora=(1, 2), max_length=8192)),  # 32 / 8
}
COMMON = dict(warmup_ratio=0.03, epochs=1, save_steps=200, log_interval=1, save_total_limit=3)
# The demo: a tiny random 2B-like model on synthetic shapes (bench/demo_score.py scores its answers).
DEMO = dict(lr=2e-3, weight_decay=0.0, batch_size=4, grad_accum=1, max_steps=800, warmup_ratio=0.05,
            max_length=512, max_tiles=1, save_steps=200, lora_dropout=0.0, drop_path_rate=0.0, num_workers=0,
            activation_checkpointing=False)
SIZES = sorted(RECIPES) + sorted(SIZE_ALIASES)  # --size: a released checkpoint, or a 1.5-era alias


def build_parser():
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=lambda prog: (
        argparse.RawDescriptionHelpFormatter(prog, width=100, max_help_position=36)))
    g = p.add_argument_group("model")
    g.add_argument("--model-path", help="official InternVL 1.5 / 2 / 2.5 directory (default: none; with no "
                                        "data either: the demo)")
    g.add_argument("--size", metavar="NAME", help="the released checkpoint whose recipe to use (e.g. "
                   "InternVL2_5-8B; 2b / 4b / 26b: the 1.5 ones); checked against the checkpoint "
                   "(default: the checkpoint's, from its architecture, template and directory name)")
    g.add_argument("--mode", choices=["full", "lora", "qlora"], help="full: LLM + projector; lora / qlora: "
                   "adapters + projector, qlora on an NF4 LLM (default lora)")
    g = p.add_argument_group("data")
    spec = "ANNOTATION[,IMAGE_FOLDER[,REPEAT[,MAX_TILES]]]"
    g.add_argument("--data", action="append", default=[], metavar=spec, help="a LLaVA-format .json/.jsonl, "
                   "its image folder, repeat ratio (< 1: a seeded fraction; > 1: floor(r) copies + a seeded "
                   "fraction; default 1) and tile cap (default --max-tiles); repeatable")
    g.add_argument("--eval-data", action="append", default=[], metavar=spec, help="held-out data (as "
                   "--data): eval_loss every --eval-steps and at the end (default: none)")
    g.add_argument("--eval-benchmark", metavar="NAME=FILE[,IMAGE_FOLDER[,ANNOTATION]]", help="an official "
                   "benchmark (chat.py --benchmark) scored at each evaluation of --eval-data, beside "
                   "eval_loss: eval_NAME_SCORE in metrics.jsonl and TensorBoard, answers to "
                   "OUTPUT/NAME-stepN.jsonl (default: none)")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: --save-steps)")
    g.add_argument("--eval-samples", type=int, default=0, metavar="K", help="greedy answers to the first K "
                   "held-out prompts at each evaluation -> OUTPUT/samples.jsonl (default 0)")
    g.add_argument("--meta-path", help="official meta file {name: {root, annotation, repeat_time, "
                                       "max_dynamic_patch}} (default: none)")
    g.add_argument("--system-message", help="system prompt of every sample; convert.py exports it "
                                            "(default: config.json's, else the template's)")
    g.add_argument("--skip-bad-samples", action="store_true", help="skip and count bad records instead of "
                                                                   "refusing to start (default off)")
    g.add_argument("--max-length", type=int, help="max tokens per sample, image ones included (default: the "
                                                  "recipe's, 4096; 8192 for 2.5)")
    g.add_argument("--max-tiles", type=int, help="max tiles per image, thumbnail aside (default: the "
                                                 "recipe's, 6 for 2 / 2.5; 1.5: max_dynamic_patch)")
    g.add_argument("--min-tiles", type=int, help="min tiles per image (default: min_dynamic_patch)")
    g.add_argument("--thumbnail", action=argparse.BooleanOptionalAction, help="a thumbnail after "
                   "multi-tile images (default: use_thumbnail)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers per rank (default: min(4, cores))")
    g.add_argument("--index-workers", type=int, help="processes rank 0 checks the records with while the "
                   "other ranks wait (default: one per core, up to 16, for files of 16 MiB and more)")
    g.add_argument("--max-packed-tokens", type=int, metavar="N", help="pack whole samples into one row of <= "
                   "N tokens per micro-batch, batch 1 (official 8192; default: no packing)")
    g.add_argument("--max-packed-tiles", type=int, default=40, metavar="T", help="with packing: <= T tiles "
                   "per pack (official num_images_expected; default 40)")
    g = p.add_argument_group("optimisation (defaults: the official 2nd-finetune recipe of --size and --mode)")
    g.add_argument("--deepspeed", help="DeepSpeed config (default: the recipe's stage, ds_zero3.json for the "
                                       "6B-ViT models' full/lora, else ds_zero1.json)")
    g.add_argument("--batch-size", type=int, help="micro-batch per device (default: the recipe's)")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: the recipe's)")
    g.add_argument("--lr", type=float, help="peak LR; AdamW, betas 0.9/0.999, eps 1e-8, clip 1.0 (default: "
                                            "the recipe's)")
    g.add_argument("--weight-decay", type=float, help="on every trainable tensor (default: the recipe's)")
    g.add_argument("--warmup-ratio", type=float, help="linear warmup, then cosine to 0 (default 0.03)")
    g.add_argument("--epochs", type=float, help="epochs (default 1); ignored when --max-steps is given")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: from --epochs); 0 = a dry run: "
                                                 "load, build the engine, print the summary, exit")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU; fp16 (GPUs without bf16: V100, T4) trains with "
                        "DeepSpeed's dynamic loss scaling (default auto)")
    g.add_argument("--seed", type=int, default=42, help="data order, sampling, LoRA init, dropout (default "
                                                        "42)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="abort after N NaN/inf steps in a row, each "
                                                                "skipped (default 5)")
    add_lora_and_output_options(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # `deepspeed` passes it
    return p


def add_lora_and_output_options(p):
    g = p.add_argument_group("LoRA / freezing")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank (default {lora.LoRAConfig.r})")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2r, as official)")
    g.add_argument("--lora-dropout", type=float, help=f"LoRA dropout (default {lora.LoRAConfig.dropout})")
    g.add_argument("--lora-targets", help="official module names, comma-separated (default: every LLM linear "
                                          "but the head)")
    g.add_argument("--lora-vit", action="store_true", help="also adapt the ViT linears (default off)")
    g.add_argument("--lora-rslora", action="store_true", help="scale alpha / sqrt(r), not / r (default off)")
    g.add_argument("--train-vit", action="store_true", help="train the whole ViT (default off, as official)")
    g.add_argument("--unfreeze-vit-layers", type=int, metavar="K", help="train ViT layers K.. (official; "
                                                                        "-K: the last K; default 0: none)")
    g.add_argument("--freeze-projector", action="store_true", help="freeze the mlp1 projector (default off)")
    g.add_argument("--freeze-llm", action="store_true", help="full mode: train the projector only (default "
                                                             "off)")
    g.add_argument("--drop-path-rate", type=float, help="ViT drop path (default: full 0.1, 6B-ViT full 0.4, "
                                                        "LoRA 0)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   help="per-layer activation checkpointing of ViT and LLM (default on)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="run directory (default runs/demo or runs/{size}_{mode})")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps and at the end (default 200)")
    g.add_argument("--save-total-limit", type=int, help="checkpoints to keep (default 3)")
    g.add_argument("--resume", help="'auto' (the newest complete checkpoint in --output-dir) or an iter_* "
                                    "path (default: start at step 0)")
    g.add_argument("--log-interval", type=int, help="progress-bar refresh every N steps (default 1)")
    g.add_argument("--dist-timeout-minutes", type=float, default=120.0,
                   help="time any collective may wait, e.g. ranks 1.. while rank 0 indexes a large "
                        "annotation (default 120)")
    g = p.add_argument_group("memory")
    g.add_argument("--estimate-memory", action="store_true", help="print the per-GPU memory estimate, exit "
                                                                  "(default off)")
    g.add_argument("--gpus", type=int, help="with --estimate-memory: GPUs (default: WORLD_SIZE or 8)")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="with --estimate-memory: GiB per GPU "
                                                                  "(default 80)")
    g.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="start even when the estimate exceeds a GPU's free memory (default: refuse)")


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def fill_defaults(args):
    """Recipe defaults for the options not given: the demo's, then those of (size, mode), then the common
    ones."""
    args.mode = args.mode or "lora"
    recipe = RECIPES[args.size]
    for defaults in (DEMO if args.demo else {}, recipe.defaults(args.mode), COMMON):
        for k, v in defaults.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    if args.num_workers is None:  # up to 4, never more than this rank's cores (PyTorch warns past them)
        cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.num_workers = min(4, max(1, cores))
    args.activation_checkpointing = args.activation_checkpointing is not False
    if args.deepspeed is None:
        zero3 = recipe.zero3 and args.mode != "qlora"
        args.deepspeed = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "ds_zero3.json" if zero3 else "ds_zero1.json")
    return args


def use_demo(args):
    """No model and no data: rank 0 writes the demo base and data, and the options point at them."""
    from demo import make_demo
    args.output_dir = args.output_dir or os.path.join("runs", "demo")
    check_output_dir(args.output_dir)  # the demo writes its base and data there first
    root = os.path.join(args.output_dir, "demo")
    if int(os.environ.get("RANK", "0")) == 0:
        make_demo(root)
    data = os.path.join(root, "data")
    args.model_path = os.path.join(root, "base")
    args.data = [f"{os.path.join(data, 'train.jsonl')},{data}"]
    args.eval_data = args.eval_data or [f"{os.path.join(data, 'eval.jsonl')},{data}"]
    args.eval_steps, args.eval_samples = args.eval_steps or 100, args.eval_samples or 4


def read_model_config(args):
    """The checkpoint's config.json, its architecture checked against --size; then the options it fills."""
    from model import load_config
    if args.model_path is None:
        raise ValueError("--model-path is missing: give an official InternVL directory (or run `python "
                         "train.py` with no model and no data for the demo)")
    if not args.data and not args.meta_path:
        raise ValueError("no training data: give --data ANNOTATION[,IMAGE_FOLDER[,REPEAT]] or --meta-path")
    if not args.demo and not os.path.isfile(os.path.join(args.model_path, "config.json")):
        raise ValueError(f"--model-path {args.model_path}: no config.json there (expected an official "
                         f"InternVL 1.5 / 2 / 2.5 directory)")
    if args.demo:
        config = _wait_for(lambda: load_config(args.model_path))
    else:
        config = load_config(args.model_path)
    from data.templates import resolve_system_message
    config.system_message = resolve_system_message(config, args.system_message)
    args.size = checkpoint_size(config, args.size, os.path.basename(os.path.normpath(args.model_path)))
    packing_batch_rule(args)
    fill_defaults(args)
    resolve_tiling(args, config)
    if args.max_packed_tokens is not None and args.max_packed_tokens < args.max_length:
        raise ValueError(f"--max-packed-tokens {args.max_packed_tokens} is below --max-length "
                         f"{args.max_length}: the longest sample must fit a pack")
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.size}_{args.mode}")
    return config


def checkpoint_size(config, size: str | None = None, hint: str = "") -> str:
    """The released checkpoint whose recipe a run of this config uses: its architecture (LLM class, ViT,
    hidden sizes, layers) and template decide (model.config.identify_release; the directory name `hint` tells
    apart releases of one architecture); a --size `size` must have the same architecture."""
    if size is not None:
        size = SIZE_ALIASES.get(size, size)
        if size in REFUSED:
            raise ValueError(f"--size {size}: not supported, {REFUSED[size]}")
        if size not in RECIPES:
            raise ValueError(f"--size {size}: unknown; choose from {', '.join(SIZES)}")
    found, _ = identify_release(config, size or hint)
    if size is not None and size != found:
        raise ValueError(f"--size {size} but the checkpoint has the {found} architecture (LLM "
                         f"{config.llm.architecture} {config.llm.num_layers}x{config.llm.hidden_size}, ViT "
                         f"{config.vision.norm_type} {config.vision.num_layers}x{config.vision.hidden_size}, "
                         f"template {config.template}); pass --size {found}")
    return found


def resolve_tiling(args, config):
    """Tiling follows the recipe's tile cap (1.5: the checkpoint's config.json, as chat.py and convert.py do)
    and the checkpoint's other settings; flags override them."""
    if args.max_tiles is None:  # dynamic_image_size false: one S x S tile, i.e. a cap of 1
        cap = RECIPES[args.size].max_tiles or config.max_dynamic_patch
        args.max_tiles = cap if config.dynamic_image_size else 1
    args.min_tiles = config.min_dynamic_patch if args.min_tiles is None else args.min_tiles
    args.thumbnail = config.use_thumbnail if args.thumbnail is None else args.thumbnail
    if not 1 <= args.min_tiles <= args.max_tiles:
        raise ValueError(f"tiles per image must satisfy 1 <= min ({args.min_tiles}) <= max "
                         f"({args.max_tiles})")


def read_sources(args):
    from data import Source, read_meta_file
    if args.meta_path and not os.path.isfile(args.meta_path):
        raise ValueError(f"--meta-path {args.meta_path}: no such file")
    sources = [Source.parse(s) for s in args.data]
    sources += read_meta_file(args.meta_path) if args.meta_path else []
    for s in sources:
        if os.path.isdir(s.annotation):
            raise ValueError(f"data file {s.annotation} is a directory (source {s.name}): give the "
                             f"annotation file (.json/.jsonl), then its image folder: --data FILE,IMAGE_FOLDER")
        if not os.path.isfile(s.annotation):
            raise ValueError(f"data file {s.annotation} does not exist (source {s.name})")
        if s.image_folder is not None and not os.path.isdir(s.image_folder):
            raise ValueError(f"image folder {s.image_folder} does not exist (source {s.name}: "
                             f"{s.annotation})")
    return sources


def check_values(args):
    """Values that parse but cannot run (an error), or surely are not meant (a warning)."""
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "eval_steps", "save_total_limit",
                 "log_interval", "max_tiles"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps {args.max_steps}: must be 0 (a dry run: load, no step) or more")
    if args.max_steps is None and not args.epochs > 0:
        raise ValueError(f"--epochs {args.epochs:g}: must be above 0")
    if not args.lr >= 0:
        raise ValueError(f"--lr {args.lr:g}: must be 0 or more")
    if args.lr == 0 and int(os.environ.get("RANK", "0")) == 0:
        print("warning: --lr 0: the optimizer will not change the weights (the run trains nothing)",
              file=sys.stderr)


def check_output_dir(path):
    """The output directory must take files; checked without creating it (an error leaves nothing behind)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path} exists and is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output-dir {path}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"--output-dir {path} cannot be written ({e.strerror}: {parent}); choose another "
                         f"--output-dir") from None


def read_deepspeed_config(args):
    """(the DeepSpeed config, its ZeRO stage); an unsupported (mode, stage) pair is refused here."""
    if not os.path.isfile(args.deepspeed):
        raise ValueError(f"--deepspeed {args.deepspeed}: no such file")
    with open(args.deepspeed) as f:
        ds_config = json.load(f)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    lora.check_supported(args.mode, zero_stage)
    return ds_config, zero_stage


def lora_config(args):
    given = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                 targets=args.lora_targets.split(",") if args.lora_targets else None)
    return None if args.mode == "full" else lora.LoRAConfig(
        vit=args.lora_vit, rslora=args.lora_rslora, **{k: v for k, v in given.items() if v is not None})


def freeze_options(args) -> dict:
    """The freeze flags as lora.mark_trainable's keyword arguments."""
    return dict(train_vit=args.train_vit, freeze_projector=args.freeze_projector,
                unfreeze_vit_layers=args.unfreeze_vit_layers or 0, freeze_llm=args.freeze_llm)


def packing_batch_rule(args):
    """A pack is one row per micro-batch: --batch-size 1 (given or not)."""
    if args.max_packed_tokens is not None:
        if args.batch_size not in (None, 1):
            raise ValueError(f"--max-packed-tokens packs samples into one row per micro-batch: --batch-size "
                             f"must be 1, not {args.batch_size}")
        args.batch_size = 1


def print_memory_estimate(args):
    """--estimate-memory: the table for --model-path's config.json or the --size preset, and a verdict."""
    import memory
    from model import load_config, preset
    if args.model_path is None and args.size is None:
        raise ValueError("--estimate-memory needs --size or --model-path")
    config = load_config(args.model_path) if args.model_path else preset(args.size)
    hint = os.path.basename(os.path.normpath(args.model_path or ""))
    args.size, args.demo = checkpoint_size(config, args.size, hint), False
    packing_batch_rule(args)
    fill_defaults(args)
    resolve_tiling(args, config)
    ds_config, zero_stage = read_deepspeed_config(args)
    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "8"))
    model = memory.meta_model(config, args.mode, lora_config(args), freeze_options(args))
    est, table = memory.for_run(model, config, args, ds_config, zero_stage, gpus,
                                compute_dtype(args, on_gpu=True))
    print(table)
    problem = memory.check_fits(est, [int(args.gpu_memory * memory.GIB)])
    print(f"verdict: {'does NOT fit' if problem else 'fits'} on {gpus} GPU(s) of {args.gpu_memory:g} GiB"
          + (f": {problem}" if problem else ""))
    return est


def compute_dtype(args, on_gpu):
    if args.dtype == "fp16":
        if not on_gpu:
            raise ValueError("--dtype fp16 needs a CUDA GPU (DeepSpeed has no fp16 training on CPU)")
        return torch.float16
    return torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and on_gpu) else torch.float32


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
