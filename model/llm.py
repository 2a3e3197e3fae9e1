"""One Llama-style decoder for InternLM2, Phi-3, Qwen2 and Llama (their differences: config.FAMILIES).

They differ in parameter layout (names: model/weights.py), in q/k/v being one matrix (InternLM2, Phi-3)
or three (Qwen2 and Llama; Qwen2's with biases), in the FFN's gate/up being fused (Phi-3) or separate, and in
RoPE scaling: InternLM2's dynamic NTK and Phi-3's 'su' LongRoPE. A fused attention projection is always
Q|K|V here, head-major.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LLMConfig
from .loss import OutputHead
from .norm import RMSNorm

# torch's variable-length flash attention (torch >= 2.10, CUDA; SDPA per run is the fallback), imported on
# first CUDA use by varlen_available: importing it loads torch._dynamo, seconds at every command's start.
varlen_attn = None
_varlen_imported = False


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def causal_varlen_attn(q, k, v, cu_seqlens, max_len):
    """varlen_attn, causal within each run, through whichever signature the installed torch has (read from the
    signature, not the version): 2.10 `is_causal=`; 2.11 `window_size=`, no GQA; 2.12+ also `enable_gqa=`.
    q [T, heads, hd], k and v [T, kv_heads, hd]."""
    params = _parameters(varlen_attn)
    if "window_size" in params:
        kwargs = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kwargs = {"is_causal": True}
    else:
        raise RuntimeError(f"torch's varlen_attn{inspect.signature(varlen_attn)} has neither is_causal nor "
                           "window_size: no causal option this code knows")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # expand the kv heads as SDPA's enable_gqa does (query head i reads kv head i // group)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def rope_cos_sin(cfg: LLMConfig, position_ids: torch.Tensor, kv_len: int, dtype: torch.dtype):
    """cos, sin [B, L, head_dim] for `position_ids` [B, L]; angles in float32, cast to the activation dtype.

    kv_len is the length InternLM2's dynamic NTK scaling keys on (see Decoder.forward).
    """
    hd = cfg.head_dim
    exponents = torch.arange(0, hd, 2, device=position_ids.device).float() / hd
    base, scale, positions = cfg.rope_theta, 1.0, position_ids.float()
    kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    if cfg.family == "phi3" and kind in ("su", "longrope"):
        # Factors switch on the largest position of the whole batch, recomputed every call.
        orig = cfg.original_max_position_embeddings
        long = int(position_ids.max()) + 1 > orig
        factors = torch.tensor(cfg.rope_scaling["long_factor" if long else "short_factor"],
                               dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (factors * base ** exponents)
        ratio = cfg.max_position_embeddings / orig
        scale = math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1.0 else 1.0
    else:
        if kind == "dynamic" and kv_len > cfg.max_position_embeddings:
            f = cfg.rope_scaling["factor"]
            base = base * ((f * kv_len / cfg.max_position_embeddings) - (f - 1)) ** (hd / (hd - 2))
        elif kind == "linear":
            positions = positions / cfg.rope_scaling["factor"]
        inv_freq = 1.0 / (base ** exponents)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation; x [B, heads, L, hd], cos/sin [B, L, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values per layer, grown by concatenation (generation only)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        else:  # own copies: v is a view into the layer's whole fused q|k|v output, which it would keep alive
            k, v = k.contiguous(), v.contiguous()
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.spec.qkv_bias
        if cfg.spec.fused_qkv:
            self.qkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=bias)
        else:
            self.q = nn.Linear(cfg.hidden_size, q_size, bias=bias)
            self.k = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
            self.v = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.out = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def project(self, x):
        if hasattr(self, "qkv"):
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, n, _ = x.shape
        q_size = self.num_heads * self.head_dim
        q, k, v = self.project(x)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.num_kv_heads != self.num_heads
        if isinstance(mask, Varlen) and varlen_available(x):  # flat [B*n, heads, hd], causal within each run
            flat = [z.transpose(1, 2).reshape(b * n, -1, self.head_dim) for z in (q, k, v)]
            out = causal_varlen_attn(*flat, mask.cu_seqlens, mask.max_len)
            return self.out(out.reshape(b, n, q_size))
        if isinstance(mask, Varlen):  # elsewhere the same per run: the cost follows the runs, not the row
            rows = [[] for _ in range(b)]
            for r, s, e in mask.runs:
                qr, kr, vr = (z[r:r + 1, :, s:e] for z in (q, k, v))
                rows[r].append(F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=gqa))
            out = torch.cat([torch.cat(pieces, dim=2) for pieces in rows])
            return self.out(out.transpose(1, 2).reshape(b, n, q_size))
        if mask is None:  # causal, nothing padded; a single new token attends to the whole cache
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(out.transpose(1, 2).reshape(b, n, q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). Phi-3 fuses gate|up into one matrix (gate first)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.fused = cfg.spec.fused_gate_up
        if self.fused:
            self.gate_up = nn.Linear(d, 2 * i, bias=False)
        else:
            self.gate = nn.Linear(d, i, bias=False)
            self.up = nn.Linear(d, i, bias=False)
        self.down = nn.Linear(i, d, bias=False)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, cache)
        return h + self.mlp(self.mlp_norm(h))


def attention_mask_4d(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Boolean [B, 1, q_len, kv_len]: causal AND same segment AND not padding; None when nothing is padded or
    packed (the is_causal path).

    `attention_mask` [B, kv_len] holds segment ids: 0 = padding, 1..k = the packed sub-samples of a row
    (data/packing.py), so no token sees another sub-sample. A plain 0/1 padding mask is the case k = 1.
    """
    if attention_mask is None or bool((attention_mask == 1).all()):
        return None
    seg = attention_mask.long()[:, :kv_len]
    keys = seg[:, None, None, :]
    queries = seg[:, None, kv_len - q_len:, None]  # queries are the last q_len positions
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=seg.device).tril(kv_len - q_len)
    mask = causal[None, None] & (keys != 0) & (keys == queries)
    # A padding query sees no key and would give NaN: let it see all keys (its output is never used).
    return mask | ~mask.any(-1, keepdim=True)


@dataclass
class Varlen:
    """A batch cut into runs of equal segment id for variable-length flash attention: the [B, n] tokens are
    one flat sequence and run i is tokens cu_seqlens[i]:cu_seqlens[i+1]. Padding runs attend among themselves
    (their outputs are unused). Segments must be contiguous within a row, as packing and padding make them."""
    cu_seqlens: torch.Tensor  # int32 [runs + 1], starting at 0
    max_len: int
    runs: list[tuple[int, int, int]]  # (row, start, end) of each run, for the per-run SDPA fallback

    @classmethod
    def from_segments(cls, attention_mask: torch.Tensor) -> "Varlen":
        seg = attention_mask.long()
        start = torch.ones_like(seg, dtype=torch.bool)
        start[:, 1:] = seg[:, 1:] != seg[:, :-1]  # a run starts at each row start and at each segment change
        starts = start.reshape(-1).nonzero().squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([seg.numel()])]).to(torch.int32)
        bounds, n = cu.tolist(), seg.shape[1]
        runs = [(a // n, a % n, b - a // n * n) for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(cu, max(e - s for _, s, e in runs), runs)


def varlen_available(x: torch.Tensor) -> bool:
    """torch's varlen flash attention: CUDA, fp16/bf16 (imported here, once)."""
    global varlen_attn, _varlen_imported
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not _varlen_imported:
        _varlen_imported = True
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch < 2.10
            varlen_attn = None
    return varlen_attn is not None


class Decoder(nn.Module):
    """Embeddings, decoder layers and final norm; the output head is applied by the caller (see loss.py)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        # Built on the meta device (every load), the embedding is given its (empty) weight, so it runs no
        # normal_: on meta that goes through torch._refs, which imports torch._dynamo (0.07 GiB, seconds).
        on_meta = torch.empty(0).is_meta  # the device the model is being built on (build_model's context)
        weight = {"_weight": torch.empty(cfg.vocab_size, cfg.hidden_size)} if on_meta else {}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id, **weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = OutputHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # Longest attended length seen so far. The official dynamic-NTK module recomputes its base only when a
        # call is longer than any before and keeps it afterwards; only beyond max_position_embeddings.
        self.rope_len = 0
        # Padded/packed training batches attend per run (varlen flash attention on CUDA, else SDPA per run);
        # False: SDPA with the block-diagonal mask over whole rows.
        self.use_varlen = True

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache: KVCache | None = None):
        b, n, _ = inputs_embeds.shape
        kv_len = n + (cache.length if cache is not None else 0)
        self.rope_len = max(self.rope_len, kv_len)
        cos, sin = rope_cos_sin(self.cfg, position_ids, self.rope_len, inputs_embeds.dtype)
        masked = attention_mask is not None and not bool((attention_mask == 1).all())
        if masked and cache is None and self.use_varlen:
            mask = Varlen.from_segments(attention_mask)
        else:
            mask = attention_mask_4d(attention_mask, n, kv_len)
        h = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        return self.norm(h)
