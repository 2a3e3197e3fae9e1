"""InternViT, both released variants.

300M: LayerNorm, qkv bias, no q/k norm. 6B: RMSNorm, q/k RMSNorm over all heads jointly, no qkv bias.
Parameter names below the layer level are the official ones, so ViT LoRA targets read the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig
from .norm import RMSNorm


def vit_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, eps=cfg.eps)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth (timm semantics: survivors are rescaled by 1 / keep)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _linspace(end: float, n: int) -> list[float]:
    return torch.linspace(0, end, n, device="cpu").tolist()  # plain floats, also while building on "meta"


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        if cfg.qk_normalization:  # over the flat [heads * head_dim] vector, before the head split
            self.q_norm = RMSNorm(c, cfg.eps)
            self.k_norm = RMSNorm(c, cfg.eps)
        self.qk_normalization = cfg.qk_normalization
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(t, n, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(t, n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = vit_norm(cfg, c)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((c,), float(cfg.initializer_factor)))
        self.norm2 = vit_norm(cfg, c)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((c,), float(cfg.initializer_factor)))
        self.drop_path_rate = drop_path_rate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + drop_path(self.attn(self.norm1(h).to(h.dtype)) * self.ls1, self.drop_path_rate, self.training)
        h = h + drop_path(self.mlp(self.norm2(h).to(h.dtype)) * self.ls2, self.drop_path_rate, self.training)
        return h


def _randn(*shape: int) -> torch.Tensor:
    """torch.randn, except that nothing is drawn on the meta device (every load builds there): torch.randn on
    meta runs through torch._refs, which imports sympy (0.04 GiB of every load's RSS)."""
    t = torch.empty(*shape)
    return t if t.is_meta else t.normal_()


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path_rate: float | None = None):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(_randn(1, 1, c))
        self.patch_embed = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(_randn(1, cfg.grid ** 2 + 1, c))
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.layers = nn.ModuleList(VisionLayer(cfg, r) for r in _linspace(rate, cfg.num_layers))
        self.gradient_checkpointing = False

    def set_drop_path_rate(self, rate: float) -> None:
        """Training option; linearly increasing over depth as in the official model."""
        for layer, r in zip(self.layers, _linspace(rate, len(self.layers))):
            layer.drop_path_rate = r

    def position_embedding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.cfg.grid
        if (h, w) != (g, g):  # bicubic resize of the stored grid in float32 (an exact identity at h = w = g)
            c = patch_pos.shape[-1]
            grid = patch_pos.float().reshape(1, g, g, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = grid.reshape(1, c, h * w).permute(0, 2, 1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1).to(dtype)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [T, C, h, w]
        t, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # row-major patches
        cls = self.class_embedding.expand(t, 1, c).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding(h, w, x.dtype)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states after `select_layer` layers (official hidden_states[select_layer]; -1 = last layer).

        Index 0 is the embedding output, so only the layers that are needed are run.
        """
        n = select_layer if select_layer >= 0 else len(self.layers) + 1 + select_layer
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"select_layer {select_layer} is outside a {len(self.layers)}-layer ViT")
        h = self.embed(pixel_values)
        for layer in self.layers[:n]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h
