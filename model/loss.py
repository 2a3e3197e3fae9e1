"""Token-mean cross-entropy computed only where a label is supervised, in chunks.

A VLM sample is mostly image and prompt tokens, so the output head runs only on the positions whose next token
is supervised, a chunk at a time; each chunk's logits are recomputed in backward (activation checkpointing), so
the [tokens, vocab] float32 logits never exist at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states whose next token is supervised, and those targets (the causal shift)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024):
    """(mean loss over supervised tokens, number of supervised tokens).

    With no supervised token the loss is an explicit 0 that keeps the graph connected (a 0/0 mean would be NaN);
    the caller sees n = 0 and counts it.
    """
    h, t = supervised_positions(hidden, labels)
    n = t.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_size):
        hc, tc = h[i:i + chunk_size], t[i:i + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, hc, tc)
    return total / n, n


def plain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official reduction on full logits: mean over supervised tokens (the reference for tests and benches)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
