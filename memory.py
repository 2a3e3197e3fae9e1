"""Per-GPU memory of a training run, estimated from the architecture alone (no weights are loaded).

    python train.py --size InternVL2_5-8B --mode lora --gpus 8 --estimate-memory   # prints the table, exits

The model is built on the meta device with the run's LoRA and freezing, so parameter counts are exact; the
bytes follow from how DeepSpeed keeps each kind of state (mixed precision, AdamW):

  weights      every parameter in the compute dtype (QLoRA: the LLM linears as NF4); ZeRO-3 partitions them
               over the GPUs, except those under stage3_param_persistence_threshold elements (kept whole on
               every GPU), and holds at most stage3_max_live_parameters + stage3_prefetch_bucket_size
               gathered ones (the DeepSpeed config's bounds)
  gradients    trainable parameters in the compute dtype (ZeRO-3: partitioned), plus the float32 gradient
               partition the optimizer reads, plus DeepSpeed's reduce buckets of reduce_bucket_size elements
               whatever the trainable count (contiguous_gradients: one; ZeRO-1/2 with overlap_comm: two)
  optimizer    float32 master weights + AdamW's two moments, partitioned over the GPUs (ZeRO-1 and ZeRO-3)
  activations  with per-layer checkpointing, each layer's input for the backward, plus one layer recomputed;
               the ViT only when it trains; the output head's 512-row float32 chunks and, when the head
               trains, its float32 [vocab, hidden] weight gradient and that gradient's cast; the micro-batch's
               pixels: the most tiles it can carry (tiles_per_micro_batch)
  overhead     CUDA context and allocator slack (a fixed 1.5 GiB; 0 on CPU)

Estimates, not measurements: bench/realsize.py compares the parameter and optimizer bytes with what a real
step holds, and bench/gpu.py measures peaks on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30
CUDA_OVERHEAD = 1.5 * GIB  # context (~0.5 GiB) + caching-allocator fragmentation, a rough constant
HEAD_CHUNK = 512  # rows of the fused output-head loss (model/loss.py)


@dataclass
class RunShape:
    mode: str  # full | lora | qlora
    zero_stage: int
    gpus: int
    batch_size: int  # micro-batch per GPU
    max_length: int  # tokens per sample, image tokens included
    tiles: int  # tiles per micro-batch (tiles_per_micro_batch)
    activation_checkpointing: bool = True
    dtype_bytes: int = 2  # bf16 on GPU
    reduce_bucket: float = 1e9  # elements, from the DeepSpeed config
    zero3_gathered: float = 2e9  # elements: stage3_max_live_parameters + stage3_prefetch_bucket_size
    zero3_persistence: float = 1e7  # elements: stage3_param_persistence_threshold
    contiguous_gradients: bool = True
    overlap_comm: bool = True


def reduce_buckets(run: RunShape) -> float:
    """Bytes of DeepSpeed's gradient reduce buckets: allocated at full reduce_bucket_size however few
    parameters train, double-buffered by ZeRO-1/2 when communication overlaps the backward."""
    if not run.contiguous_gradients or run.zero_stage == 0:
        return 0.0
    count = 2 if run.overlap_comm and run.zero_stage < 3 else 1
    return count * run.reduce_bucket * run.dtype_bytes


def tiles_per_micro_batch(max_length: int, num_image_token: int, batch_size: int,
                          max_packed_tiles: int | None = None) -> int:
    """The most image tiles a micro-batch can carry: a sample, as many as its max_length tokens hold (each
    tile is num_image_token of them; samples of several images reach it, one tile per image and up, beyond
    one image's max_tiles + thumbnail); a pack (batch 1): --max-packed-tiles at most."""
    most = max(1, max_length // num_image_token)
    return min(max_packed_tiles, most) if max_packed_tiles is not None else batch_size * most


def _bytes(params, nbytes) -> int:
    return sum(p.numel() for p in params) * nbytes


def estimate(model, config, run: RunShape, on_gpu: bool = True) -> dict[str, float]:
    """{component: bytes per GPU} for `model`, a meta-device InternVL set up as the run will train it."""
    from lora import NF4Linear, nf4_nbytes, quantizable_names
    w, n = run.dtype_bytes, max(1, run.gpus)
    quantized = set(quantizable_names(model)) if run.mode == "qlora" else set()
    params = dict(model.named_parameters())
    dense = [p for name, p in params.items() if name.rsplit(".", 1)[0] not in quantized]
    nf4 = sum(nf4_nbytes(m.out_features, m.in_features) for name, m in model.named_modules()
              if name in quantized and isinstance(m, (torch.nn.Linear, NF4Linear)))
    trainable = [p for p in params.values() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)

    if run.zero_stage == 3:
        dense_bytes = _bytes(dense, w)
        whole = _bytes([p for p in dense if p.numel() < run.zero3_persistence], w)
        weights = min(dense_bytes, whole + (dense_bytes - whole) / n + run.zero3_gathered * w) + nf4
        grads = n_train * w / n
    else:
        weights = _bytes(dense, w) + nf4
        grads = n_train * w  # every rank holds its full gradient before the reduce
    grads += n_train * 4 / n + reduce_buckets(run)
    optimizer = n_train * (4 + 8) / n

    c, v = config.llm, config.vision
    b, s = run.batch_size, run.max_length
    act = b * s * c.hidden_size * w  # input embeddings
    per_layer = b * s * (10 * c.hidden_size + 4 * c.intermediate_size) * w  # norms, qkv, attention, MLP
    act += (c.num_layers * b * s * c.hidden_size * w + per_layer) if run.activation_checkpointing \
        else c.num_layers * per_layer
    act += HEAD_CHUNK * c.vocab_size * 4 * 2  # one chunk of logits and its softmax gradient, float32
    head = model.llm.head.weight
    if head.requires_grad:  # the fused loss's float32 weight gradient, held to the backward, and its cast
        act += head.numel() * (4 + w)
    tokens_v = run.tiles * (config.vision.image_size // config.vision.patch_size) ** 2
    vit_layer = tokens_v * (8 * v.hidden_size + 2 * v.intermediate_size) * w
    vit_trains = any(p.requires_grad for p in model.vit.parameters())
    if vit_trains:
        act += (v.num_layers * tokens_v * v.hidden_size * w + vit_layer) if run.activation_checkpointing \
            else v.num_layers * vit_layer
    else:
        act += vit_layer  # transient: no autograd state is kept for a frozen ViT
    act += run.tiles * 3 * config.vision.image_size ** 2 * w
    out = dict(weights=weights, gradients=grads, optimizer=optimizer, activations=act,
               overhead=CUDA_OVERHEAD if on_gpu else 0.0)
    out["total"] = sum(out.values())
    return out


def meta_model(config, mode: str, lora_cfg=None, freeze: dict | None = None):
    """The run's model on the meta device (no memory), set up as training will: LoRA injected, the freeze
    options applied (and so checked)."""
    import lora
    from model import build_model
    model = build_model(config, "meta")
    if lora_cfg is not None:
        lora.inject_lora(model, lora_cfg)
    lora.mark_trainable(model, "lora" if mode == "qlora" else mode, **(freeze or {}))  # no NF4 on meta
    return model


def for_run(model, config, args, ds_config: dict, zero_stage: int, gpus: int, dtype: torch.dtype):
    """(estimate, printable table) per GPU of a train.py run: its options, DeepSpeed config and meta model."""
    zero = ds_config.get("zero_optimization", {})
    packed = args.max_packed_tokens is not None
    tokens = args.max_packed_tokens if packed else args.max_length
    run = RunShape(mode=args.mode, zero_stage=zero_stage, gpus=gpus, batch_size=args.batch_size,
                   max_length=tokens,
                   tiles=tiles_per_micro_batch(tokens, config.num_image_token, args.batch_size,
                                               args.max_packed_tiles if packed else None),
                   activation_checkpointing=args.activation_checkpointing, dtype_bytes=dtype.itemsize,
                   reduce_bucket=float(zero.get("reduce_bucket_size", 5e8)),
                   zero3_gathered=float(zero.get("stage3_max_live_parameters", 1e9))
                   + float(zero.get("stage3_prefetch_bucket_size", 5e7)),
                   zero3_persistence=float(zero.get("stage3_param_persistence_threshold", 1e5)),
                   contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                   overlap_comm=bool(zero.get("overlap_comm", zero_stage == 3)))
    est = estimate(model, config, run, on_gpu=True)
    return est, format_table(est, run, args.size)


def format_table(est: dict[str, float], run: RunShape, title: str) -> str:
    lines = [f"estimated memory per GPU: {title}, {run.mode}, ZeRO-{run.zero_stage}, {run.gpus} GPU(s), "
             f"micro-batch {run.batch_size} x {run.max_length} tokens, {run.tiles} tiles, activation "
             f"checkpointing {'on' if run.activation_checkpointing else 'off'}"]
    for k, v in est.items():
        lines.append(f"  {k:<12} {v / GIB:8.2f} GiB")
    return "\n".join(lines)


def check_fits(est: dict[str, float], free_bytes: list[int]) -> str | None:
    """An error message when the estimate exceeds the smallest visible GPU's free memory, else None."""
    if not free_bytes:
        return None
    free = min(free_bytes)
    if est["total"] <= free:
        return None
    return (f"the run needs about {est['total'] / GIB:.1f} GiB per GPU but the smallest visible GPU has "
            f"{free / GIB:.1f} GiB free; use more GPUs with ZeRO-3 (--deepspeed ds_zero3.json), LoRA or "
            f"QLoRA, a smaller --batch-size or --max-length, fewer --max-tiles, or "
            f"--activation-checkpointing")
