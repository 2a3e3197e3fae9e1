"""Fine-tune InternVL 1.5 (2B / 4B / 26B): full, LoRA or QLoRA, under DeepSpeed ZeRO-1 or ZeRO-3.

    python train.py                             # the embedded CPU demo: a tiny random model, synthetic data
    torchrun --nproc_per_node 8 train.py --size 4b --mode lora --model-path DIR --data train.jsonl,images/

Top to bottom: the model, the data, the engine, the loop, and `main`, which runs them in that order after
options.py's checks. checkpoint.py writes the checkpoints and checks a resume.

The loss of an optimizer step is the mean cross-entropy over ALL its supervised tokens, every rank and
micro-batch together: sum(CE) / N_step. Each micro-batch backpropagates sum(CE_micro) * world / N_step
(DeepSpeed averages over the ranks and does not divide by the accumulation steps), so the gradient is that of
the logged loss whatever the split. (The official trainer averages per-micro-batch means instead.)
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import resource
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

import checkpoint
import lora
import memory
import options

GRAD_CLIP = 1.0  # official max_grad_norm
RUN = {"output_dir": None}  # the run in progress, for the Ctrl-C message
COUNTERS = ("skipped_steps", "nonfinite_steps", "overflow_steps", "all_masked_steps",
            "all_masked_micro_batches", "samples_seen", "replaced_samples", "image_failures",
            "over_budget_packs",
            "truncated_samples", "gpt_first_dropped", "wide_images")  # the last three: changed, as official


# ------------------------------------------------------------------------------------------------ model

def load_model(args, config, lora_cfg, ds_config, zero_stage, device, dtype):
    """The base checkpoint (ZeRO-3: partitioned while it is built; QLoRA: NF4 while it is read), LoRA injected
    and the freeze options applied."""
    import deepspeed
    from model import load_pretrained
    from model.weights import checkpoint_fingerprint
    args.base_fingerprint = checkpoint_fingerprint(args.model_path)  # convert.py refuses a base changed since
    t0 = time.time()
    qlora = args.mode == "qlora"
    prepare = partial(lora.prepare_qlora, device=device, compute_dtype=dtype) if qlora else None
    model = load_pretrained(args.model_path, dtype=dtype, device=device, prepare=prepare,
                            zero3=ds_config if zero_stage == 3 else None)
    if lora_cfg is not None:
        torch.manual_seed(args.seed)  # the same adapters on every rank and for every world size
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
            lora.inject_lora(model, lora_cfg)
    report = lora.mark_trainable(model, args.mode, **options.freeze_options(args))
    model.vit.set_drop_path_rate(args.drop_path_rate)  # active even in a frozen ViT, as official
    model.set_gradient_checkpointing(vit=args.activation_checkpointing, llm=args.activation_checkpointing)
    llm, vit = config.llm, config.vision
    log(f"{args.size} recipe ({llm.family} LLM {llm.num_layers}x{llm.hidden_size}, ViT "
        f"{vit.num_layers}x{vit.hidden_size}) from {args.model_path}, loaded in {time.time() - t0:.1f}s")
    adapters = lora_cfg and f", LoRA r={lora_cfg.r} alpha={lora_cfg.alpha:g} dropout={lora_cfg.dropout:g}"
    log(f"mode {args.mode}, ZeRO-{zero_stage}, {str(dtype)[6:]}, {torch.distributed.get_world_size()} "
        f"process(es) on {'GPU' if device.type == 'cuda' else 'CPU'}{adapters or ''}")
    log(lora.format_report(report, args.mode))
    return model


# ------------------------------------------------------------------------------------------------ data

def shared_dataset(args, config, tokenizer, sources, what=""):
    """A data set of the run's settings, indexed and checked (every record, every image file; the index cache)
    on rank 0 before the model loads, and handed to the other ranks. A data problem is one `error:` message
    (`what` in front)."""
    import torch.distributed as dist
    from data import DataError, SupervisedDataset
    from data.dataset import default_cache_dir
    make = partial(SupervisedDataset, sources, tokenizer, config.template, config.system_message,
                   max_num=args.max_tiles, min_num=args.min_tiles, use_thumbnail=args.thumbnail,
                   image_size=config.force_image_size, tile_tokens=config.num_image_token,
                   max_length=args.max_length, seed=args.seed,
                   skip_bad_samples=args.skip_bad_samples, cache_dir=default_cache_dir(),
                   index_workers=args.index_workers)
    master, payload = dist.get_rank() == 0, [None]
    if master:
        try:
            dataset = make()
            payload = [dataset.source_index]
        except DataError as e:
            payload = [str(e)]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        dist.destroy_process_group()
        raise SystemExit(f"error: {what}{payload[0]}" if master else 1)  # the other ranks exit quietly
    return dataset if master else make(index=payload[0])


def build_dataset(args, config, sources, tokenizer):
    """The training set (shared_dataset), its counts logged."""
    dataset = shared_dataset(args, config, tokenizer, sources)
    dataset.log_problems = False  # the loop reports them from each batch's meta, capped per run
    log("data (after repeat ratios):")
    for name, c in dataset.source_counts.items():
        log(f"  {name:<20} {c['sampled']:>9,} samples ({c['valid']:,} valid of {c['records']:,} records, "
            f"{c['bad']} bad)")
    log(f"  {'total':<20} {len(dataset):>9,} samples, {sum(dataset.is_image):,} with images; template "
        f"{config.template}")
    for name, a in dataset.adjusted.items():  # named once here; counted per step in metrics.jsonl
        if a["too_long"]:
            log(f"  {name}: {a['too_long']} samples left out: they cannot fit --max-length {args.max_length}")
        if a["cut"]:
            log(f"  {name}: {a['cut']} samples have answers cut at --max-length {args.max_length} (first: "
                f"{a['first_cut']}); they train on what is left (truncated_samples)")
        if a["gpt_first"]:
            log(f"  {name}: {a['gpt_first']} conversations start with a gpt turn, dropped as the official "
                f"code does (first: {a['first_gpt_first']}; gpt_first_dropped)")
    return dataset


def plan_batches(args, dataset, rank, world):
    """(batch sampler, collate function, total steps): length-grouped batches of one modality, or packs."""
    from data import LengthGroupedSampler, collate
    from data.packing import PackedBatchSampler, collate_packed, packed_total_steps
    if args.max_packed_tokens:  # one pack per micro-batch; the packs of an epoch are planned in advance
        check_packable(args, dataset)
        sampler = PackedBatchSampler(dataset.lengths, args.max_packed_tokens, tiles=dataset.tiles,
                                     max_tiles=args.max_packed_tiles, world_size=world, rank=rank,
                                     seed=args.seed)
        collate_fn = partial(collate_packed, max_tokens=args.max_packed_tokens,
                             max_tiles=args.max_packed_tiles)
        steps_per_epoch = sampler.micro_batches(0) // args.grad_accum
        epoch_steps = packed_total_steps(sampler, args.epochs, args.grad_accum)
        log(f"packing: one pack of <= {args.max_packed_tokens} tokens and <= {args.max_packed_tiles} tiles "
            f"per micro-batch; {sampler.micro_batches(0) * world} packs in epoch 0 for {len(dataset)} "
            f"samples")
    else:
        sampler = LengthGroupedSampler(dataset.lengths, dataset.is_image, batch_size=args.batch_size,
                                       world_size=world, rank=rank, seed=args.seed)
        collate_fn = collate
        steps_per_epoch = len(sampler) // args.grad_accum  # micro-batches per rank: equal on every rank
        epoch_steps = math.ceil(args.epochs * steps_per_epoch)
        if any(sampler.left_out.values()):  # batches never mix modalities, nor repeat a sample to fill
            log(f"  each epoch leaves out {sampler.left_out['image']} image and "
                f"{sampler.left_out['text-only']} text-only samples that do not fill a batch of "
                f"{args.batch_size} x {world} (a different seeded set each epoch)")
    step_batch = args.batch_size * args.grad_accum * world
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} samples make no full step of {step_batch}")
    log(f"effective batch {args.batch_size} x {args.grad_accum} accum x {world} = {step_batch}; "
        f"{steps_per_epoch} steps/epoch")
    return sampler, collate_fn, args.max_steps if args.max_steps is not None else epoch_steps


def check_packable(args, dataset):
    """Every sample must fit a pack alone (tokens and tiles): else one `error:` line naming the first."""
    import numpy as np
    for what, values, budget, option in ((" tokens", dataset.lengths, args.max_packed_tokens,
                                          "--max-packed-tokens"),
                                         (" image tiles", dataset.tiles, args.max_packed_tiles,
                                          "--max-packed-tiles")):
        over = np.flatnonzero(np.asarray(values) > budget)
        if len(over):
            i = int(over[np.argmax(np.asarray(values)[over])])
            raise SystemExit(f"error: {option} {budget} is below the {int(values[i])}{what} of sample "
                             f"{dataset.sample_id(i)} ({len(over)} sample(s) over it): a sample must fit a "
                             f"pack alone; raise {option} to at least {int(values[i])}")


@dataclass
class Progress:
    """Where the run is; saved with every checkpoint and restored on resume."""
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already drawn
    counters: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


def batches(dataset, sampler, collate_fn, args, pos: Progress, device):
    """This rank's micro-batches from (pos.epoch, pos.micro_in_epoch) on, epoch after epoch."""
    while True:
        sampler.set_epoch(pos.epoch, pos.micro_in_epoch)
        dataset.set_epoch(pos.epoch)  # before the workers fork: the JPEG augmentation follows the epoch
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(args.seed + pos.epoch))
        gc.freeze()  # the workers fork frozen: their collector leaves the parent's objects (and pages) alone
        try:
            micro_batches = iter(loader)  # forks the workers
        finally:
            gc.unfreeze()  # the parent's own garbage stays collectable
        for b in micro_batches:
            pos.micro_in_epoch += 1
            yield b
        pos.epoch, pos.micro_in_epoch = pos.epoch + 1, 0


# ------------------------------------------------------------------------------------------------ engine

def init_distributed(timeout_minutes: float):
    """(rank, world, device). Plain `python train.py` is a world of one; CPU: DeepSpeed's CPU accelerator.
    `timeout_minutes` bounds every collective, including ranks 1.. waiting while rank 0 indexes the data."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed calls two renamed torch.distributed functions: a FutureWarning per call, nothing to act on.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                      r"is deprecated", FutureWarning)
    import deepspeed
    if not on_gpu:  # plain gloo: DeepSpeed would JIT-compile its shared-memory allreduce op at first start
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def fill_deepspeed_config(ds_config, args, world, dtype):
    """The values the command line owns; anything else left "auto" is an error."""
    ds_config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_clipping=GRAD_CLIP,
                     gradient_accumulation_steps=args.grad_accum,
                     train_batch_size=args.batch_size * args.grad_accum * world)
    ds_config.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds_config.setdefault("fp16", {})["enabled"] = dtype == torch.float16  # the config's dynamic loss scaling
    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8}})
    ds_config["optimizer"]["params"].update(lr=args.lr, weight_decay=args.weight_decay)
    if ds_config["optimizer"]["type"].lower() in ("adam", "adamw"):  # torch's AdamW: no op JIT-built at start
        ds_config["optimizer"]["params"].setdefault("torch_adam", True)
        if ds_config["optimizer"]["params"]["torch_adam"] and torch.cuda.is_available():  # one fused kernel
            ds_config["optimizer"]["params"].setdefault("fused", True)
    if not torch.cuda.is_available():  # CPU: no overlapping communication streams
        ds_config["zero_optimization"]["overlap_comm"] = False
    left = [k for k, v in _flatten(ds_config).items() if v == "auto"]
    if left:
        raise SystemExit(f"error: {args.deepspeed} leaves {left} as 'auto'; train.py fills only the batch, "
                         f"accumulation, clipping, precision, lr and weight decay")


def build_engine(model, ds_config, args, total_steps):
    """The DeepSpeed engine (AdamW over the trainable tensors) and the LR schedule: linear warmup, then cosine
    to 0 at the run's last step (HF get_cosine_schedule_with_warmup, as the official trainer)."""
    import deepspeed
    warmup = math.ceil(args.warmup_ratio * total_steps)

    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    log(f"{total_steps} steps (warmup {warmup}), lr {args.lr:g}, wd {args.weight_decay:g}; checkpoints every "
        f"{args.save_steps} in {args.output_dir}")
    return engine, scheduler


def resume(engine, path, meta, rank):
    """Model, optimizer and scheduler from the checkpoint, then the run's position and this rank's RNG."""
    out_dir, tag = os.path.split(path)
    engine.load_checkpoint(out_dir, tag=tag, load_module_strict=False,  # without the frozen tensors; the
                           load_optimizer_states=True, load_lr_scheduler_states=True)  # trained ones: checked
    checkpoint.restore_rng(path, rank)  # nothing draws from the generators before the first step
    log(f"resumed from {path} at step {meta['step']}")
    return Progress(meta["step"], meta["data"]["epoch"], meta["data"]["micro_batches_in_epoch"],
                    {k: meta["counters"].get(k, 0) for k in COUNTERS})


# ------------------------------------------------------------------------------------------------ the loop

def train_step(engine, scheduler, micro, step, counters, device, dtype):
    """One optimizer step over this rank's micro-batches; returns its figures (loss None: none supervised)."""
    # What the step sees, agreed by every rank in one all-reduce; n_step (supervised tokens) divides the loss.
    meta = [b["meta"] for b in micro]
    local = [sum(m[k] for m in meta) for k in ("num_supervised", "num_tokens", "num_samples",
                                               "image_failures")]
    local += [sum(m["replaced"] for m in meta), sum(m["num_supervised"] == 0 for m in meta),
              sum(int(b["image_flags"].sum()) for b in micro), sum(m.get("over_budget", 0) for m in meta)]
    local += [sum(m.get("truncated", 0) for m in meta), sum(m.get("gpt_first", 0) for m in meta),
              sum(len(m.get("wide_images", ())) for m in meta)]
    n_step, tokens, samples, failures, replaced, all_masked, tiles, over, cut, gpt_first, wide = map(
        int, all_reduce_sum(local, device))
    for k, n in [("samples_seen", samples), ("replaced_samples", replaced), ("image_failures", failures),
                 ("all_masked_micro_batches", all_masked), ("over_budget_packs", over),
                 ("truncated_samples", cut), ("gpt_first_dropped", gpt_first), ("wide_images", wide)]:
        counters[k] += n
    out = dict(loss=None, lr=scheduler.get_last_lr()[0], grad_norm=None, tokens=tokens,  # lr: this update's
               supervised_tokens=n_step, samples=samples, image_tiles=tiles)
    applied = False
    if n_step == 0:  # nothing to learn on any rank: no forward, no update, counted
        counters["all_masked_steps"] += 1
    else:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once per step: one sync
        for b in micro:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != "meta"}
            b["pixel_values"] = b["pixel_values"].to(dtype)
            result = engine(**b)
            micro_sum = result.loss.float() * result.n_supervised  # this micro-batch's summed CE
            loss_sum += micro_sum.detach().double()
            engine.backward(micro_sum * (torch.distributed.get_world_size() / n_step), scale_wrt_gas=False)
            engine.step()
        loss_sum = loss_sum.item()
        loss_total, nonfinite = all_reduce_sum([loss_sum, float(not math.isfinite(loss_sum))], device)
        applied = engine.was_step_applied()  # DeepSpeed skips an update whose gradient norm is not finite
        if nonfinite and applied:
            raise RuntimeError(f"step {step + 1}: the loss is not finite but DeepSpeed applied the update; "
                               f"this DeepSpeed version does not skip non-finite steps")
        counters["nonfinite_steps"] += int(nonfinite > 0)
        # A finite loss whose update DeepSpeed skipped: the gradient overflowed (fp16: the loss scale was too
        # high for it, and DeepSpeed lowers it)
        counters["overflow_steps"] += int(not nonfinite and not applied)
        if dtype == torch.float16:
            out["loss_scale"] = float(engine.optimizer.loss_scale)
        grad_norm = engine.get_global_grad_norm()
        out.update(loss=loss_total / n_step, grad_norm=float(grad_norm) if grad_norm is not None
                   and math.isfinite(float(grad_norm)) else None)
    if not applied:  # DeepSpeed advances the schedule only with an update: here it follows the loop step
        counters["skipped_steps"] += 1
        scheduler.step()
    return out


def train(args, engine, scheduler, sampler, batches, pos, total_steps, evaluator, run_meta, device, dtype):
    """The loop: a step and its metrics row, then an evaluation and a checkpoint when due."""
    from tqdm import tqdm
    master = torch.distributed.get_rank() == 0
    os.makedirs(args.output_dir, exist_ok=True)
    if master:
        checkpoint.truncate_logs(args.output_dir, pos.step)
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if master else None
    tb = _tensorboard(args.output_dir) if master else None
    bar = tqdm(total=total_steps, initial=pos.step, disable=not master, dynamic_ncols=True,
               bar_format=BAR_FORMAT)
    warn = Warnings(torch.distributed.get_rank())
    engine.train()
    bad_in_a_row, saved = 0, pos.step or None
    _peak_memory_gb(device)  # the first step's peak starts here, not at loading
    while pos.step < total_steps:
        t0 = time.time()
        micro = [next(batches) for _ in range(args.grad_accum)]
        for problem in (p for b in micro for p in b["meta"]["skipped"]):  # DataLoader workers log nothing
            warn("replaced sample", f"replaced sample {problem}")
        for path in (p for b in micro for p in b["meta"].get("wide_images", ())):
            warn("16-bit image", f"{path} is a 16-bit image: converted to 8-bit RGB as the official loader "
                                 f"does, which clips it to nearly white; counted in wide_images", cap=1)
        row = train_step(engine, scheduler, micro, pos.step, pos.counters, device, dtype)
        if row["loss"] is not None:
            bad_in_a_row = 0 if math.isfinite(row["loss"]) else bad_in_a_row + 1
            if bad_in_a_row and bad_in_a_row >= args.max_bad_steps:
                raise RuntimeError(f"aborting: {bad_in_a_row} optimizer steps in a row had a NaN/inf loss "
                                   f"(last: step {pos.step + 1}, loss {row['loss']}); lower the lr or check "
                                   f"the data")
        pos.step, seconds = pos.step + 1, time.time() - t0
        row = dict(step=pos.step, epoch=pos.epoch, **row, seconds=seconds,
                   tokens_per_s=row["tokens"] / seconds, samples_per_s=row["samples"] / seconds,
                   peak_mem_gb=_peak_memory_gb(device), **pos.counters)
        if evaluator and (pos.step % args.eval_steps == 0 or pos.step == total_steps):
            row.update(evaluator.run(engine, pos.step, device, dtype))
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens", "peak_mem_gb",
                      "eval_loss", *(evaluator.score_keys if evaluator else ())):
                if tb is not None and row.get(k) is not None and math.isfinite(row[k]):
                    tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                    tb.add_scalar(tag, row[k], pos.step)
        if pos.step % args.log_interval == 0 or pos.step == total_steps:
            bar.set_postfix_str(progress(row, evaluator and evaluator.last), refresh=False)
        bar.update(1)
        if pos.step % args.save_steps == 0 or pos.step == total_steps:
            data = dict(epoch=pos.epoch, micro_batches_in_epoch=pos.micro_in_epoch, seed=args.seed,
                        samples_seen=pos.counters["samples_seen"],
                        sampler=sampler.state_dict(pos.micro_in_epoch))  # its checks run on resume
            checkpoint.save(engine, args.output_dir, pos.step, dict(run_meta, data=data,
                                                                    counters=dict(pos.counters)),
                            keep=args.save_total_limit)
            saved = pos.step
    bar.close()
    for f in (metrics, tb):
        if f is not None:
            f.close()
    c, final = pos.counters, saved and os.path.join(args.output_dir, f"iter_{saved}")
    log(f"done: {pos.step} steps; skipped {c['skipped_steps']} (non-finite {c['nonfinite_steps']}, overflow "
        f"{c['overflow_steps']}, all-masked {c['all_masked_steps']}); replaced {c['replaced_samples']} "
        f"samples ({c['image_failures']} unreadable images among the failed attempts, the others too long)"
        + (f"; {c['over_budget_packs']} packs over their budget" if c["over_budget_packs"] else "")
        + f"; changed as the official code does: {c['truncated_samples']} answers cut at --max-length, "
          f"{c['gpt_first_dropped']} leading gpt turns dropped, {c['wide_images']} 16-bit images clipped"
        + (f"; eval_loss {evaluator.last:.4f}" if evaluator and evaluator.last is not None else "")
        + f"; checkpoint {final}")
    if final:
        log(f"convert it to an official InternVL directory with:\n  python convert.py {final} "
            f"{os.path.join(args.output_dir, 'converted')}")


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = options.parse_args(argv)
    args.demo = not (args.model_path or args.data or args.meta_path or args.estimate_memory)
    if args.demo and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # two threads ran 6x slower than one on a busy 2-core machine
        # (bench/demo_threads.py): the tiny demo's threads wait for each other beside other work
    try:  # every check before heavy work: one `error:` line, no traceback
        if args.estimate_memory:
            return options.print_memory_estimate(args)
        if args.demo:
            options.use_demo(args)
        config = options.read_model_config(args)
        options.check_values(args)
        options.check_output_dir(args.output_dir)
        RUN["output_dir"] = args.output_dir
        sources = options.read_sources(args)
        ds_config, zero_stage = options.read_deepspeed_config(args)
        options.compute_dtype(args, torch.cuda.is_available())  # refuses fp16 without a GPU, before loading
        lora_cfg = options.lora_config(args)
        shape = memory.meta_model(config, args.mode, lora_cfg, options.freeze_options(args))  # no memory
        trainable = [n for n, p in shape.named_parameters() if p.requires_grad]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        run = checkpoint.run_settings(args, sources, world, lora_cfg, trainable, config.system_message)
        resume_from, meta = checkpoint.resume_point(args, run)
    except ValueError as e:
        raise SystemExit(f"error: {e}")

    rank, world, device = init_distributed(args.dist_timeout_minutes)
    dtype = options.compute_dtype(args, device.type == "cuda")
    fill_deepspeed_config(ds_config, args, world, dtype)
    from data import load_tokenizer
    tokenizer = load_tokenizer(args.model_path)
    dataset = build_dataset(args, config, sources, tokenizer)
    sampler, collate_fn, total_steps = plan_batches(args, dataset, rank, world)
    if meta and "sampler" in meta["data"]:  # the same samples in the same order, or an error before the model
        try:
            sampler.load_state_dict(meta["data"]["sampler"])
        except ValueError as e:
            raise SystemExit(f"error: {resume_from}: {e}")
    import evaluate
    args.eval_steps = args.eval_steps or args.save_steps
    evaluator = evaluate.setup(args, config, tokenizer, world, rank, zero_stage, log,
                               sum_over_ranks=lambda values: all_reduce_sum(values, device),
                               build=partial(shared_dataset, args, config, tokenizer,
                                             what="held-out data (--eval-data): "))
    if device.type == "cuda":  # before loading anything: refuse a run that cannot fit
        est, table = memory.for_run(shape, config, args, ds_config, zero_stage, world, dtype)
        log(table)
        problem = memory.check_fits(est, [smallest_over_ranks(torch.cuda.mem_get_info(device)[0], device)])
        if problem and args.memory_check:
            raise SystemExit(f"error: {problem}. The estimate can be off by about 15%: --no-memory-check "
                             f"tries anyway")

    model = load_model(args, config, lora_cfg, ds_config, zero_stage, device, dtype)
    engine, scheduler = build_engine(model, ds_config, args, total_steps)
    pos = resume(engine, resume_from, meta, rank) if resume_from else Progress()
    train(args, engine, scheduler, sampler, batches(dataset, sampler, collate_fn, args, pos, device), pos,
          total_steps, evaluator, checkpoint.describe(args, config, engine, run), device, dtype)
    engine.destroy()  # release ZeRO-3's hooks and helper threads before the interpreter tears down
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ helpers

def log(*a):  # rank 0 only
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a)


def all_reduce_sum(values, device):
    """Sum a list of numbers over the ranks. Every collective of the loop goes through here, with its tensor
    on the training device: NCCL (on GPU) refuses CPU tensors."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def smallest_over_ranks(value, device):
    """The minimum of a number over the ranks (each rank's value in its own slot, summed), so that a decision
    taken from it is the same on every rank."""
    slots = [0.0] * torch.distributed.get_world_size()
    slots[torch.distributed.get_rank()] = float(value)
    return min(all_reduce_sum(slots, device))


class Warnings:
    """Run-time warnings, at most `cap` per kind and run, through tqdm so the progress bar stays whole."""

    def __init__(self, rank, cap=10):
        self.prefix = "warning: " if rank == 0 else f"warning (rank {rank}): "
        self.cap, self.counts = cap, {}

    def __call__(self, kind, message, cap=None):
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        cap = cap or self.cap
        if n <= cap:
            from tqdm import tqdm
            last = f" (the last '{kind}' warning shown; metrics.jsonl counts them all)"
            tqdm.write(self.prefix + message + (last if n == cap and cap > 1 else ""), file=sys.stderr)


# The bar fits 100 columns with evaluation on (tested): the rest of each step's figures are in metrics.jsonl.
BAR_FORMAT = "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


def progress(row, eval_loss=None):
    """The bar's figures: loss, last eval_loss, lr, tokens/s."""
    return (f"loss {_fmt(row['loss'], '.4f')}" + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
            + f" lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f}")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _peak_memory_gb(device):
    """GPU: the peak since the previous call (the step's, the counter reset here); CPU: the process's."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def interrupted():
    """Ctrl-C: one line saying where the run stands and how to continue it, not a traceback per rank."""
    if int(os.environ.get("RANK", "0")) == 0:
        out = RUN["output_dir"]
        found = checkpoint.complete_checkpoints(out) if out and os.path.isdir(out) else []
        where = (f"; the newest complete checkpoint is {found[-1][1]}: run the same command with --resume "
                 f"auto to continue exactly from step {found[-1][0]}" if found
                 else "; no checkpoint was written yet")
        print(f"\ninterrupted{where}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        interrupted()
