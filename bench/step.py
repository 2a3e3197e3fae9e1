"""Training-step figures: forward, backward and optimizer time, tokens/s, images/s and peak memory of one step, for
full fine-tuning (LLM + projector) and LoRA (adapters + projector), ViT frozen as in the official recipes.

Default size: a mid-size model that steps in seconds on a CPU (ViT 4 layers x 256, LLM 4 layers x 512 with GQA,
vocab 92553, 448 px tiles) and a 1024-token sample with 2 tiles. Random weights, synthetic data.

--packing instead compares padded, length-grouped batches (data/sampler.py + data/collate.py) with packs
(data/packing.py) on a LLaVA-like length mix: padding fraction at the real scale (4096 tokens, 1-13 tiles) and
measured real-token throughput on this model at a scaled-down mix.

    python3 bench/step.py                          # full and LoRA, median of 3 after 1 warm-up
    python3 bench/step.py --mode full --json step.json
    python3 bench/step.py --packing --json packing.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PeakMemory, environment, gib, sync, write_json  # noqa: E402
from data.collate import collate  # noqa: E402
from data.packing import PackedBatchSampler, collate_packed  # noqa: E402
from data.sampler import LengthGroupedSampler  # noqa: E402
from model import build_model, preset  # noqa: E402
from model.config import VisionConfig  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--vit-width", type=int, default=256)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--llm-width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=92553)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sample (image tokens included)")
    p.add_argument("--tiles", type=int, default=2, help="image tiles per sample")
    p.add_argument("--batch", type=int, default=None, help="samples per micro-batch (default 1; 4 with --packing)")
    p.add_argument("--supervised", type=float, default=0.5, help="fraction of the text after the image with labels")
    p.add_argument("--text-only", type=int, default=0,
                   help="how many of the batch's samples are text-only (one dummy tile each)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off (on by default)")
    p.add_argument("--packing", action="store_true", help="padded vs packed batches on a LLaVA-like mix")
    p.add_argument("--samples", type=int, default=24, help="--packing: samples timed through the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def mid_config(args):
    """The 2B's wiring (InternViT-300M style ViT, InternLM2 decoder with GQA) at the bench's sizes."""
    v, w = args.vit_width, args.llm_width
    vision = VisionConfig(hidden_size=v, num_layers=args.vit_layers, num_heads=max(1, v // 64),
                          intermediate_size=4 * v, image_size=args.image_size)
    llm = dataclasses.replace(preset("2b").llm, vocab_size=args.vocab, hidden_size=w, num_layers=args.llm_layers,
                              num_heads=max(2, w // 64), num_kv_heads=max(1, w // 128), intermediate_size=4 * w)
    # <img>, </img>, <IMG_CONTEXT> are the 1st-3rd of the 9 added tokens at the end of the vocabulary
    return preset("2b", vision=vision, llm=llm, img_context_token_id=args.vocab - 7)


def image_tokens(cfg) -> tuple[int, int, int]:
    """(<img>, </img>, <IMG_CONTEXT>) ids."""
    ctx = cfg.img_context_token_id
    return ctx - 2, ctx - 1, ctx


def prepare(cfg, mode: str, device, dtype, grad_ckpt: bool, lora_r: int = 16, qlora: bool = False):
    """A random-weight model set up for `mode` (full / lora / qlora), ViT frozen; returns (model, optimizer)."""
    model = build_model(cfg, device=device, dtype=dtype)
    if qlora:
        from lora import quantize_llm
        quantize_llm(model, compute_dtype=dtype)
    if mode in ("lora", "qlora"):
        from lora import LoRAConfig, inject_lora
        inject_lora(model, LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.05))
    from lora import mark_trainable
    mark_trainable(model, mode)
    model.set_gradient_checkpointing(vit=grad_ckpt, llm=grad_ckpt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fp32 master weights are DeepSpeed's business; here AdamW runs on the parameters as they are
    return model, torch.optim.AdamW(params, lr=1e-5, foreach=True)


def synthetic_sample(cfg, text_tokens: int, tiles: int, supervised: float, g: torch.Generator) -> dict:
    """BOS + prompt text + <img> ctx*256*tiles </img> + answer text; labels on the last `supervised` of the text.
    tiles = 0 makes a text-only sample with one dummy tile (image_flags 0)."""
    size = cfg.vision.image_size
    img_start, img_end, img_context = image_tokens(cfg)
    words = lambda n: torch.randint(3, img_start, (n,), generator=g)  # noqa: E731
    prompt = max(1, text_tokens // 4)
    answer = max(1, text_tokens - prompt - 1)
    if tiles:
        ids = torch.cat([torch.tensor([1]), words(prompt), torch.tensor([img_start]),
                         torch.full((cfg.num_image_token * tiles,), img_context), torch.tensor([img_end]),
                         words(answer)])
    else:
        ids = torch.cat([torch.tensor([1]), words(prompt + answer)])
    n_sup = max(1, int(supervised * answer))
    labels = torch.where(torch.arange(len(ids)) >= len(ids) - n_sup, ids, -100)
    return dict(input_ids=ids, labels=labels, pixel_values=torch.randn(max(tiles, 1), 3, size, size, generator=g),
                image_flags=torch.full((max(tiles, 1),), int(tiles > 0)))


def to_device(batch, device, dtype):
    out = {k: v.to(device) for k, v in batch.items() if k != "meta"}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def train_step(model, opt, batch) -> tuple[float, float, float]:
    """(forward, backward, optimizer) seconds of one step."""
    device = batch["input_ids"].device
    t0 = time.perf_counter()
    loss = model(**batch).loss
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def bench_mode(args, cfg, mode) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model, opt = prepare(cfg, mode, device, dtype, not args.no_grad_ckpt, args.lora_r)
    g = torch.Generator().manual_seed(args.seed)
    text = args.tokens - args.tiles * cfg.num_image_token - 2
    if text < 4:
        raise SystemExit(f"--tokens {args.tokens} leaves no room for text next to {args.tiles} tiles")
    if not 0 <= args.text_only <= args.batch:
        raise SystemExit(f"--text-only {args.text_only} is not between 0 and --batch {args.batch}")
    kinds = [(text, args.tiles)] * (args.batch - args.text_only) + [(args.tokens - 1, 0)] * args.text_only
    batch = to_device(collate([synthetic_sample(cfg, t, k, args.supervised, g) for t, k in kinds]), device, dtype)
    for _ in range(args.warmup):
        train_step(model, opt, batch)
    runs = [train_step(model, opt, batch) for _ in range(args.repeats)]
    with PeakMemory(device) as mem:
        train_step(model, opt, batch)
    step = median([sum(r) for r in runs])
    tokens = int(batch["input_ids"].numel())
    return {"mode": mode, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "forward_s": median([r[0] for r in runs]), "backward_s": median([r[1] for r in runs]),
            "optimizer_s": median([r[2] for r in runs]), "step_s": step, "tokens_per_s": tokens / step,
            "images_per_s": (args.batch - args.text_only) * args.tiles / step, "peak_gib": gib(mem.peak_bytes),
            "tokens_per_step": tokens, "step_runs_s": [sum(r) for r in runs]}


# ---------------------------------------------------------------- packing

def llava_mix(n: int, max_tokens: int = 4096, max_tiles: int = 13, text_only: float = 0.15, text_scale: float = 1.0,
              seed: int = 0) -> list[tuple[int, int]]:
    """(text tokens, tiles) per sample, LLaVA-like: most samples 300-900 text tokens with 1-13 tiles (256 tokens
    each), some text-only (100-2000 tokens); every sample fits max_tokens. `text_scale` shrinks the text for
    smaller models."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < text_only:
            out.append((int(rng.randint(100, 2000) * text_scale), 0))
        else:
            tiles = rng.randint(1, max_tiles)
            text = min(int(rng.randint(300, 900) * text_scale), max_tokens - 256 * tiles - 2)
            out.append((text, tiles))
    return out


def sample_lengths(mix) -> list[int]:
    return [t + (256 * k + 2 if k else 1) for t, k in mix]  # +<img>/</img> or BOS, as synthetic_sample builds


def padded_batches(lengths, is_image, batch, seed=0) -> list[list[int]]:
    return list(LengthGroupedSampler(lengths, is_image, batch_size=batch, seed=seed))


def padding_figures(mix, batch: int, max_tokens: int, seed: int = 0) -> dict:
    """Padding at a given scale: random batches, length-grouped batches (the official default), and packs."""
    lengths, tiles = sample_lengths(mix), [k for _, k in mix]
    is_image = [k > 0 for k in tiles]
    order = list(range(len(mix)))
    random.Random(seed).shuffle(order)
    rand = [order[i:i + batch] for i in range(0, len(order), batch)]
    grouped = padded_batches(lengths, is_image, batch, seed)
    # a pack of batch x max_tokens tokens and at most 13 x batch tiles: the padded batch's worst-case memory
    packs = PackedBatchSampler(lengths, batch * max_tokens, tiles, 13 * batch, seed=seed).packs(0)
    real = sum(lengths)

    def padded(batches):  # the sampler leaves out the samples that do not fill a batch: count those it batches
        slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return {"micro_batches": len(batches), "padding_fraction": 1 - sum(lengths[i] for b in batches for i in b)
                / slots}

    return {"samples": len(mix), "real_tokens": real, "batch": batch, "max_length": max_tokens,
            "random_batches": padded(rand), "length_grouped_batches": padded(grouped),
            "packed": {"micro_batches": len(packs), "pack_budget_tokens": batch * max_tokens,
                       "padding_fraction": 0.0,  # a pack is one row of exactly its samples
                       "budget_fill": real / (len(packs) * batch * max_tokens)}}


def bench_packing(args, cfg) -> dict:
    """Real-token throughput of the same samples as padded length-grouped batches and as packs."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scale = args.tokens / 4096
    max_tiles = max(1, min(13, (args.tokens - 64) // cfg.num_image_token))
    mix = llava_mix(args.samples, args.tokens, max_tiles, text_scale=scale, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    samples = [synthetic_sample(cfg, t, k, args.supervised, g) for t, k in mix]
    lengths, tiles = [len(s["input_ids"]) for s in samples], [k for _, k in mix]
    batches = padded_batches(lengths, [k > 0 for k in tiles], args.batch, args.seed)
    packs = PackedBatchSampler(lengths, args.batch * args.tokens, tiles, max_tiles * args.batch,
                               seed=args.seed).packs(0)
    ways = {"padded": [to_device(collate([samples[i] for i in b]), device, dtype) for b in batches],
            "packed": [to_device(collate_packed([samples[i] for i in p]), device, dtype) for p in packs]}
    model, opt = prepare(cfg, args.mode[0], device, dtype, not args.no_grad_ckpt, args.lora_r)
    out = {"mode": args.mode[0], "samples": len(samples), "real_tokens": sum(lengths), "batch": args.batch,
           "max_length": args.tokens, "pack_budget_tokens": args.batch * args.tokens}
    for _ in range(args.warmup):
        train_step(model, opt, ways["padded"][0])
        train_step(model, opt, ways["packed"][0])
    for name, mbs in ways.items():
        real = int(sum((b["attention_mask"] > 0).sum() for b in mbs))  # padded batches leave out the remainder
        epochs = []
        for _ in range(args.repeats):
            epochs.append(sum(sum(train_step(model, opt, b)) for b in mbs))
        slots = sum(int(b["input_ids"].numel()) for b in mbs)
        out[name] = {"micro_batches": len(mbs), "slots": slots, "padding_fraction": 1 - real / slots,
                     "epoch_s": median(epochs), "real_tokens_per_s": real / median(epochs), "epoch_runs_s": epochs}
    out["tokens_per_s_gain"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (4 if args.packing else 1)
    cfg = mid_config(args)
    result = {"bench": "step", "config": {"vit": dataclasses.asdict(cfg.vision),
                                          "llm": {k: v for k, v in dataclasses.asdict(cfg.llm).items()
                                                  if k != "rope_scaling"}},
              "tokens": args.tokens, "tiles": args.tiles, "batch": args.batch, "dtype": args.dtype,
              "grad_ckpt": not args.no_grad_ckpt, "repeats": args.repeats, "environment": environment(args.device)}
    if args.packing:
        result["padding_at_4096"] = padding_figures(llava_mix(2000, seed=args.seed), 4, 4096, args.seed)
        result["packing"] = bench_packing(args, cfg)
    else:
        result["results"] = [bench_mode(args, cfg, m) for m in args.mode]
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
