"""Chunked loss vs the plain one: time and peak memory, forward and forward+backward.

plain:   logits = head(hidden) for every position -> float32 -> cross-entropy (the official path)
chunked: model/loss.py: only positions whose next token is supervised, `--chunk` rows at a time, with the
         gradients formed in the same pass, so [tokens, vocab] float32 logits never exist at once

Peak memory is what the loss adds on top of its inputs (hidden states and head weight). With a trainable head
it includes the head's float32 weight gradient, which grows with the hidden size: use --hidden 2048 for the
2B figures (the CPU default is smaller to keep the matmuls short for timing).

    python3 bench/loss.py                                   # 4096 tokens, vocab 92553 and 32020, all supervised
    python3 bench/loss.py --supervised 0.25 --json out.json
    python3 bench/loss.py --device cuda --dtype bfloat16    # GPU (hidden 2048 there)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PeakMemory, environment, gib, time_median, write_json  # noqa: E402
from model.loss import IGNORE_INDEX, OutputHead, chunked_cross_entropy  # noqa: E402


def plain_cross_entropy(logits, labels):
    """The official reduction: full logits, then the mean CE over the supervised tokens."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, nargs="+", default=[92553, 32020], help="2B/26B and 4B vocabularies")
    p.add_argument("--hidden", type=int, default=None, help="default: 2048 on cuda, 256 on cpu")
    p.add_argument("--supervised", type=float, default=1.0, help="fraction of positions with a label")
    p.add_argument("--chunk", type=int, default=None, help="chunk rows (default: model/loss.py's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="hidden/head dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--frozen-head", action="store_true", help="head weight without gradient (LoRA / QLoRA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def make_inputs(tokens, vocab, hidden, supervised, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    head = OutputHead(hidden, vocab, bias=False).to(device=device, dtype=dtype)
    h = (torch.randn(1, tokens, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=dtype)
    h.requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[torch.rand(1, tokens, generator=g) >= supervised] = -100
    return head, h, labels.to(device)


def bench_vocab(args, vocab) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    head, h, labels = make_inputs(args.tokens, vocab, args.hidden, args.supervised, device, dtype, args.seed)
    head.weight.requires_grad_(not args.frozen_head)
    if args.chunk is not None:
        head.chunk_size = args.chunk
    losses = {"plain": lambda: plain_cross_entropy(head(h), labels),
              "chunked": lambda: chunked_cross_entropy(h, labels, head)[0]}
    out = {"vocab": vocab, "supervised_tokens": int((labels[:, 1:] != -100).sum())}
    for name, loss_fn in losses.items():
        def forward():
            with torch.no_grad():
                loss_fn()

        def forward_backward():
            head.weight.grad = h.grad = None
            loss_fn().backward()

        with PeakMemory(device) as fwd_mem:  # autograd on, as in training: what forward keeps for backward counts
            loss = loss_fn()
        del loss
        head.weight.grad = h.grad = None
        with PeakMemory(device) as step_mem:
            loss_fn().backward()
        with torch.no_grad():
            value = loss_fn().item()
        out[name] = {"loss": value, "peak_forward_gib": gib(fwd_mem.peak_bytes),
                     "peak_forward_backward_gib": gib(step_mem.peak_bytes)}
        if args.repeats:  # --repeats 0: memory only (large hidden sizes on a CPU)
            out[name]["forward_s"] = time_median(forward, args.repeats, args.warmup, device)["median_s"]
            out[name]["forward_backward_s"] = time_median(forward_backward, args.repeats, args.warmup,
                                                          device)["median_s"]
    p, c = out["plain"], out["chunked"]
    out["loss_abs_diff"] = abs(p["loss"] - c["loss"])
    out["ratio_chunked_over_plain"] = {k: c[k] / p[k] for k in p if k != "loss"}
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    args.hidden = args.hidden or (2048 if cuda else 256)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    result = {"bench": "loss", "tokens": args.tokens, "hidden": args.hidden, "dtype": args.dtype,
              "frozen_head": args.frozen_head,
              "supervised_fraction": args.supervised, "chunk": args.chunk, "repeats": args.repeats,
              "environment": environment(args.device), "results": [bench_vocab(args, v) for v in args.vocab]}
    write_json(args.json, result)
    for r in result["results"]:
        ratio = r["ratio_chunked_over_plain"]
        print(f"vocab {r['vocab']}: peak fwd+bwd plain {r['plain']['peak_forward_backward_gib']:.3f} GiB, chunked "
              f"{r['chunked']['peak_forward_backward_gib']:.3f} GiB (x{ratio['peak_forward_backward_gib']:.3f}); "
              f"fwd+bwd time x{ratio.get('forward_backward_s', float('nan')):.2f}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
