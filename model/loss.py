"""Token-mean cross-entropy computed only where a label is supervised, in chunks, by the output head itself.

A VLM sample is mostly image and prompt tokens, so the output head runs only on the positions whose next token
is supervised, a chunk at a time, and each chunk's gradients are formed in the same pass (softmax - one-hot):
the [tokens, vocab] float32 logits never exist at once and nothing is recomputed in backward. The loss runs
inside the head module's own forward, so DeepSpeed ZeRO-3 has the head weight gathered while it is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
VOCAB_SLICE = 8192  # rows of the weight gradient formed per matmul


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """The supervised tokens: those whose label is the target of the position before (the causal shift), so
    a row's first label never counts. The one definition: the loss and the data's counts (its denominator)
    use it."""
    return labels[..., 1:] != IGNORE_INDEX


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states whose next token is supervised, and those targets."""
    keep = target_mask(labels)
    return hidden[:, :-1][keep], labels[:, 1:][keep]


def _ce_sum_and_grads(hidden, weight, targets, chunk_size, need_h, need_w):
    """Summed CE(hidden @ weight^T, targets) and, if asked, its gradients, one chunk of rows at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for i in range(0, targets.numel(), chunk_size):
        h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
        logits = F.linear(h, weight).float()  # head in the model dtype, loss in float32 (as the official)
        target_logit = logits.gather(1, t[:, None])
        # log-sum-exp and softmax in place: one [chunk, vocab] float32 buffer, no logsumexp temporary
        peak = logits.amax(-1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        norm = probs.sum(-1, keepdim=True)
        total += (norm.log() + peak - target_logit).sum()
        if need_h or need_w:
            g = probs.div_(norm)  # softmax
            g[torch.arange(t.numel(), device=t.device), t] -= 1.0
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[i:i + chunk_size] = g @ weight
            if need_w:
                for v in range(0, g.shape[1], VOCAB_SLICE):  # fp32 accumulation, no [vocab, hidden] temporary
                    grad_w[v:v + VOCAB_SLICE] += g[:, v:v + VOCAB_SLICE].t() @ h
            del g
        del logits, probs  # free this chunk's buffer before the next chunk allocates its own
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_h, need_w = ctx.needs_input_grad[:2]
        total, grad_h, grad_w = _ce_sum_and_grads(hidden, weight, targets, chunk_size, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.backward_done = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.backward_done:  # grad_w is scaled in place below
            raise RuntimeError("the fused output-head loss supports one backward pass (no retain_graph)")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w.mul_(grad_total).to(ctx.weight_dtype) if grad_w is not None else None  # in place: once
        return gh, gw, None, None


class OutputHead(nn.Linear):
    """The LLM's output projection. `head(h)` gives logits; `head(h, targets)` the summed cross-entropy."""

    chunk_size = 512  # rows per chunk: at 4096 x 92553 the peak is 0.24x the plain one (bench/loss.py)
    # Logits in this dtype, the weight cast VOCAB_SLICE rows at a time (convert.py's float32 check of a bf16
    # model: a whole float32 copy of the head would be 0.7 GiB at 2B, 2.3 GB at 26B).
    compute_dtype: torch.dtype | None = None

    def sliced_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in compute_dtype: each VOCAB_SLICE rows of the weight cast into ONE reused buffer, the
        logits written into one preallocated output. (A fresh cast per slice, its small output allocated after
        it, left glibc's heap fragmented: at 151,674 x 896 each call kept 0.4 GiB resident.)"""
        hidden = hidden.to(self.compute_dtype)
        out = hidden.new_empty(*hidden.shape[:-1], self.out_features)
        buf = hidden.new_empty(min(VOCAB_SLICE, self.out_features), self.in_features)
        for v in range(0, self.out_features, VOCAB_SLICE):
            w = buf[:min(VOCAB_SLICE, self.out_features - v)].copy_(self.weight[v:v + VOCAB_SLICE])
            out[..., v:v + len(w)] = F.linear(hidden, w)
        return out

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None and self.compute_dtype is not None:
            return self.sliced_logits(hidden)
        if targets is None:
            return super().forward(hidden)
        if torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, self.weight, targets, self.chunk_size)
        return _ce_sum_and_grads(hidden, self.weight, targets, self.chunk_size, False, False)[0]


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead):
    """(mean loss over supervised tokens, number of supervised tokens).

    With no supervised token the head still runs, on zero rows: under ZeRO-3 every rank must join the head
    weight's all-gather, whatever its batch (a padding batch of the evaluation has nothing supervised). The
    loss is then an explicit 0 with zero gradients (a 0/0 mean would be NaN); the caller sees n = 0.
    """
    h, t = supervised_positions(hidden, labels)
    n = t.numel()
    return head(h, t) / max(n, 1), n
