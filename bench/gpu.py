"""One-GPU training figures at the released architectures (random weights, nothing to download).

For each size (2b, 4b, 26b) and mode (full, lora, qlora): one training step on a sample of --tokens tokens with
--tiles image tiles (default 4096 and 13 = 12 tiles + thumbnail), bf16, gradient checkpointing on (ViT and LLM),
ViT frozen as in the official recipes. Reports step time (median of --repeats after --warmup), tokens/s,
images/s (tiles/s), MFU and peak memory, and writes JSON. A configuration whose estimated memory exceeds the GPU
is skipped with the reason printed (26B full needs ZeRO-3 over several GPUs).

Memory is that of a DeepSpeed bf16 run on one GPU: bf16 weights and gradients, fp32 master copies and fp32 AdamW
states of the trainable parameters (`MasterAdamW`).

MFU = model FLOPs of the step / step time / the chip's dense bf16 peak (--peak-tflops, default from the GPU
name: H100/H200 989, A100 312). Model FLOPs (`step_flops`), per sample:
  * a matmul of n rows by an [in, out] weight costs 2*n*in*out forward; backward costs the same again for the
    input gradient (when anything before it trains) and again for the weight gradient (when the weight trains);
  * ViT (frozen, nothing trains before it): forward only. Per tile, n = 1025 tokens, per layer
    2n(4C^2 + 2CI) + 4n^2 C (scores and weighted sum, non-causal); patch embedding 2 * 1024 * 3*14^2 * C;
  * projector (trains): 2 * 256 * (4C*D + D*D) per tile forward, x3 with backward;
  * LLM: per layer 2L * (linear weights) + causal attention 2 * L^2 * H*hd (half of the 4 L^2 H hd of full
    attention: flash attention skips the masked half). full: x3 (input and weight gradients); lora/qlora: x2
    (input gradients only, the projector upstream trains) plus the adapters, x3;
  * output head: only the supervised positions (`--supervised` of the text tokens), 2 * D * V per position,
    x3 in full (head trains), x2 otherwise;
  * not counted: recomputation by gradient checkpointing, norms, RoPE, softmax, the optimizer, NF4 dequantisation.

    python3 bench/gpu.py                                       # 2b, 4b, 26b x full, lora, qlora; ~5 min on an H200
    python3 bench/gpu.py --sizes 2b --modes lora --json out.json
    python3 bench/gpu.py --sizes tiny --device cpu --tokens 600 --tiles 2   # plumbing check without a GPU
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import environment, gib, sync, write_json  # noqa: E402
from data.collate import collate  # noqa: E402
from data.packing import collate_packed  # noqa: E402
from bench.step import llava_mix, padded_batches, synthetic_sample  # noqa: E402
from model import build_model, preset  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2b", "4b", "26b"])
    p.add_argument("--modes", nargs="+", default=["lora", "qlora", "full"], choices=["full", "lora", "qlora"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--tiles", type=int, default=13)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--supervised", type=float, default=0.5, help="fraction of the answer text with labels")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the chip (for MFU)")
    p.add_argument("--no-varlen-check", action="store_true", help="skip the varlen == masked-SDPA check (cuda)")
    p.add_argument("--packing", default="2b:lora", help="SIZE:MODE for padded-vs-packed throughput ('' = off)")
    p.add_argument("--packing-samples", type=int, default=24)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


# ---------------------------------------------------------------- FLOPs (see the module docstring)

def llm_linear_shapes(llm) -> list[tuple[int, int]]:
    """(in, out) of every decoder-layer linear of one layer."""
    d, hd, i = llm.hidden_size, llm.head_dim, llm.intermediate_size
    attn = [(d, (llm.num_heads + 2 * llm.num_kv_heads) * hd), (llm.num_heads * hd, d)]
    mlp = [(d, 2 * i), (i, d)] if llm.family == "phi3" else [(d, i), (d, i), (i, d)]
    return attn + mlp


def step_flops(cfg, mode: str, tokens: int, tiles: int, supervised_tokens: int, lora_r: int) -> dict:
    """Model FLOPs of one training step on one sample, by part."""
    v, llm = cfg.vision, cfg.llm
    n = v.grid ** 2 + 1
    vit_layer = 2 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size
    vit = tiles * (v.num_layers * vit_layer + 2 * (n - 1) * 3 * v.patch_size ** 2 * v.hidden_size)
    c4 = v.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    projector = 3 * tiles * 2 * cfg.num_image_token * (c4 * llm.hidden_size + llm.hidden_size ** 2)
    shapes = llm_linear_shapes(llm)
    linear_fwd = 2 * tokens * sum(a * b for a, b in shapes)
    attn_fwd = 2 * tokens * tokens * llm.num_heads * llm.head_dim  # causal half of 4 L^2 H hd
    full = mode == "full"
    llm_flops = llm.num_layers * ((3 if full else 2) * linear_fwd + 3 * attn_fwd)
    if not full:  # adapters: x = A x (r rows), B (A x); forward + input and weight gradients
        llm_flops += llm.num_layers * 3 * 2 * tokens * sum(lora_r * (a + b) for a, b in shapes)
    head = (3 if full else 2) * 2 * supervised_tokens * llm.hidden_size * llm.vocab_size
    parts = {"vit": vit, "projector": projector, "llm": llm_flops, "head": head}
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------- model and optimizer

def random_init(model, std: float = 0.02) -> None:
    """Finite, plausible random weights: norms 1, layer scales 0.1, biases 0, matrices N(0, std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith(("ls1", "ls2")):
                p.fill_(0.1)
            elif p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


class MasterAdamW:
    """bf16 weights and gradients, fp32 master copies and fp32 AdamW states (DeepSpeed's bf16 memory layout)."""

    def __init__(self, params, lr: float = 1e-5):
        self.params = list(params)
        self.master = [p.detach().float().clone() for p in self.params]
        fused = all(p.is_cuda for p in self.params)
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=fused or None, foreach=None if fused else True)

    def step(self):
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)
                m.grad = None


def build(cfg, mode, device, dtype, lora_r):
    """Random-weight model for `mode`, built on meta and materialised once in `dtype` (no fp32 copy of the 26B)."""
    model = build_model(cfg, "meta").to(dtype).to_empty(device=device)
    random_init(model)
    if mode == "qlora":
        from lora import quantize_llm
        quantize_llm(model, compute_dtype=dtype)
    from lora import LoRAConfig, inject_lora, mark_trainable
    if mode in ("lora", "qlora"):
        inject_lora(model, LoRAConfig(r=lora_r, alpha=2 * lora_r, dropout=0.05))
    mark_trainable(model, mode)
    model.set_gradient_checkpointing(vit=True, llm=True)
    return model.train()


def memory_estimate_gib(cfg, mode, tokens, tiles, batch, lora_r) -> tuple[float, float]:
    """train.py --estimate-memory's figure for this one-GPU step (no DeepSpeed bucket: MasterAdamW): the total,
    and the total less the CUDA context and allocator slack (what torch.cuda.max_memory_allocated sees)."""
    import memory
    from lora import LoRAConfig, inject_lora, mark_trainable
    model = build_model(cfg, "meta")
    if mode != "full":
        inject_lora(model, LoRAConfig(r=lora_r, alpha=2 * lora_r))
    mark_trainable(model, "full" if mode == "full" else "lora")
    run = memory.RunShape(mode=mode, zero_stage=1, gpus=1, batch_size=batch, max_length=tokens,
                          tiles=batch * tiles, reduce_bucket=0)
    est = memory.estimate(model, cfg, run)
    return gib(est["total"]), gib(est["total"] - est["overhead"])


# ---------------------------------------------------------------- one configuration

def make_sample(cfg, tokens, tiles, supervised, g):
    """A sample of exactly `tokens` tokens with `tiles` image tiles (bench/step.py's synthetic layout)."""
    text = tokens - cfg.num_image_token * tiles - 2
    if text < 4:
        raise SystemExit(f"--tokens {tokens} leaves no text next to {tiles} tiles")
    return synthetic_sample(cfg, text, tiles, supervised, g)


def to_device(batch, device, dtype):
    out = {k: v.to(device) for k, v in batch.items() if k != "meta"}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def run_config(args, size, mode, device, dtype, total_gib) -> dict:
    cfg = preset(size)
    if cfg.img_context_token_id is None:  # the tiny preset: the 3rd of the 9 added tokens at the end
        cfg.img_context_token_id = cfg.llm.vocab_size - 7
    row = {"size": size, "mode": mode}
    need, need_allocated = memory_estimate_gib(cfg, mode, args.tokens, args.tiles, args.batch, args.lora_r)
    if total_gib is not None and need > total_gib:
        row["skipped"] = (f"{size} {mode} needs about {need:.0f} GiB (bf16 weights and grads, fp32 master weights "
                          f"and AdamW states) but this GPU has {total_gib:.0f} GiB: train it with ZeRO-3 over "
                          f"several GPUs (train.py --deepspeed ds_zero3.json)")
        print(f"skip: {row['skipped']}", file=sys.stderr)
        return row
    t0 = time.perf_counter()
    model = build(cfg, mode, device, dtype, args.lora_r)
    opt = MasterAdamW([p for p in model.parameters() if p.requires_grad])
    row["build_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    batch = to_device(collate([make_sample(cfg, args.tokens, args.tiles, args.supervised, g)
                               for _ in range(args.batch)]), device, dtype)
    supervised = int((batch["labels"][:, 1:] != -100).sum())

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    flops = step_flops(cfg, mode, args.tokens, args.tiles, supervised // args.batch, args.lora_r)
    tokens = args.batch * args.tokens
    row.update({"step_s": step_s, "step_runs_s": times, "tokens_per_s": tokens / step_s,
                "images_per_s": args.batch * args.tiles / step_s, "loss": loss.item(),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "model_tflops_per_step": args.batch * flops["total"] / 1e12,
                "flops_by_part": {k: args.batch * v for k, v in flops.items()},
                "achieved_tflops": args.batch * flops["total"] / step_s / 1e12})
    if args.peak_tflops:
        row["mfu"] = row["achieved_tflops"] / args.peak_tflops
    if device.type == "cuda":
        row["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    row["memory_estimate_gib"], row["memory_estimate_allocated_gib"] = need, need_allocated
    del model, opt, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def varlen_check(device, dtype) -> dict:
    """On the GPU: a packed batch's loss and gradients with varlen flash attention equal the masked-SDPA ones."""
    cfg = preset("tiny")
    cfg.img_context_token_id = cfg.llm.vocab_size - 7
    model = build(cfg, "full", device, dtype, 16)
    g = torch.Generator().manual_seed(1)
    samples = [make_sample(cfg, n, 1, 0.5, g) for n in (300, 700, 420)]
    batch = to_device(collate_packed(samples), device, dtype)
    out = {}
    for use in (True, False):
        model.llm.use_varlen = use
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        out[use] = (loss.item(), model.llm.layers[0].attn.qkv.weight.grad.float().clone())
    return {"loss_varlen": out[True][0], "loss_sdpa_mask": out[False][0],
            "loss_abs_diff": abs(out[True][0] - out[False][0]),
            "grad_max_abs_diff": (out[True][1] - out[False][1]).abs().max().item(),
            "grad_max_abs": out[False][1].abs().max().item()}


def packing_ab(args, size, mode, device, dtype) -> dict:
    """Real-token throughput of the same LLaVA-like samples (bench/step.py's mix, scaled to --tokens) as padded
    length-grouped batches of 4 samples and as packs of 4 x --tokens tokens (varlen attention on CUDA)."""
    cfg = preset(size)
    if cfg.img_context_token_id is None:
        cfg.img_context_token_id = cfg.llm.vocab_size - 7
    batch, scale = 4, args.tokens / 4096
    max_tiles = max(1, min(13, (args.tokens - 64) // cfg.num_image_token))
    mix = llava_mix(args.packing_samples, args.tokens, max_tiles, text_scale=scale, seed=0)
    g = torch.Generator().manual_seed(0)
    samples = [synthetic_sample(cfg, t, k, args.supervised, g) for t, k in mix]
    lengths, tiles = [len(s["input_ids"]) for s in samples], [k for _, k in mix]
    from data.packing import PackedBatchSampler
    packs = PackedBatchSampler(lengths, batch * args.tokens, tiles, max_tiles * batch).packs(0)
    grouped = padded_batches(lengths, [k > 0 for k in tiles], batch)
    ways = {"padded": [to_device(collate([samples[i] for i in b]), device, dtype) for b in grouped],
            "packed": [to_device(collate_packed([samples[i] for i in p]), device, dtype) for p in packs]}
    model = build(cfg, mode, device, dtype, args.lora_r)
    opt = MasterAdamW([p for p in model.parameters() if p.requires_grad])
    out = {"size": size, "mode": mode, "samples": len(samples), "real_tokens": sum(lengths)}
    for name, mbs in ways.items():
        model(**mbs[0]).loss.backward()  # warm-up
        opt.step()
        sync(device)
        t = time.perf_counter()
        for b in mbs:
            model(**b).loss.backward()
            opt.step()
        sync(device)
        seconds = time.perf_counter() - t
        slots = sum(int(b["input_ids"].numel()) for b in mbs)
        out[name] = {"micro_batches": len(mbs), "padding_fraction": 1 - sum(lengths) / slots,
                     "epoch_s": seconds, "real_tokens_per_s": sum(lengths) / seconds}
    out["tokens_per_s_gain"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    out["varlen"] = device.type == "cuda"
    del model, opt, ways
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    total_gib = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total_gib = gib(torch.cuda.get_device_properties(device).total_memory)
        if args.peak_tflops is None:
            args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    result = {"bench": "gpu", "tokens": args.tokens, "tiles": args.tiles, "batch": args.batch,
              "dtype": str(dtype).replace("torch.", ""), "peak_tflops": args.peak_tflops,
              "environment": environment(device), "results": []}
    if device.type == "cuda" and not args.no_varlen_check:  # a failure here is a failure of the run: no catch
        result["varlen_check"] = varlen_check(device, dtype)
    for size in args.sizes:
        for mode in args.modes:
            try:
                row = run_config(args, size, mode, device, dtype, total_gib)
            except torch.OutOfMemoryError as e:  # a measured limit, reported; any other error stops the bench
                row = {"size": size, "mode": mode, "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["results"].append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                   if k not in ("flops_by_part", "step_runs_s")}, file=sys.stderr, flush=True)
    if args.packing:
        size, mode = args.packing.split(":")
        result["packing"] = packing_ab(args, size, mode, device, dtype)
        print(result["packing"], file=sys.stderr, flush=True)
    result["wall_s"] = time.perf_counter() - t_start
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
