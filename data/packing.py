"""Sequence packing: several samples in one row, attention isolated between them.

A pack is a list of dataset indices whose token lengths fit a token budget and whose image tiles fit a tile
budget (the official `max_packed_tokens` / `num_images_expected`). One pack is one micro-batch row:

    input_ids        the samples one after another                                   [1, L]
    attention_mask   segment ids 1..k, one per sample (model/llm.py isolates them)   [1, L]
    position_ids     0..n-1 restarting at every sample                               [1, L]
    labels           each sample's own; a sample's first token is never a target of the previous one
    pixel_values     the pack's real tiles in sample order; text-only samples add no tile (one dummy tile
                     only when the pack has no real tile), so the ViT does no work on padding

The loss is the token mean over the pack's supervised tokens: exactly the loss of the same samples in one
padded batch. Packs are planned from length estimates before an epoch starts, so the number of packed steps
is known in advance and the LR schedule is exact. Use it as
`DataLoader(ds, batch_sampler=PackedBatchSampler(...), collate_fn=collate_packed)`.
"""
from __future__ import annotations

import bisect
import logging
import math
import random

import torch

from .collate import batch_meta, concat_tiles
from .sampler import SAMPLES_CHANGED, samples_sha1
from .templates import IGNORE_INDEX

log = logging.getLogger(__name__)


def plan_packs(lengths, max_tokens: int, tiles=None, max_tiles: int | None = None,
               order=None) -> list[list[int]]:
    """Best-fit decreasing: each sample, longest first, goes into the fullest pack it still fits (tokens and
    tiles), else opens a new pack. `order` (default: all indices) picks and orders the samples; within a pack,
    samples keep that order. Returns lists of indices into `lengths`."""
    order = range(len(lengths)) if order is None else order
    rank = {i: r for r, i in enumerate(order)}
    for i in rank:
        if not 0 < lengths[i] <= max_tokens:
            raise ValueError(f"sample {i}: {lengths[i]} tokens do not fit the pack budget of {max_tokens} "
                             f"tokens (max_packed_tokens must be >= the longest sample, e.g. >= max_length)")
        if tiles is not None and max_tiles is not None and tiles[i] > max_tiles:
            raise ValueError(f"sample {i}: {tiles[i]} image tiles do not fit the pack budget of "
                             f"{max_tiles} tiles")
    tile_cap = math.inf if tiles is None or max_tiles is None else max_tiles
    packs, free_tiles = [], []
    by_free = []  # sorted (free tokens, pack id): the fullest pack that fits is the first with free >= n
    for i in sorted(rank, key=lambda i: (-lengths[i], rank[i])):
        n, t = lengths[i], (tiles[i] if tiles is not None else 0)
        j = bisect.bisect_left(by_free, (n, -1))
        while j < len(by_free) and free_tiles[by_free[j][1]] < t:
            j += 1
        if j == len(by_free):
            packs.append([i])
            free_tiles.append(tile_cap - t)
            bisect.insort(by_free, (max_tokens - n, len(packs) - 1))
        else:
            free, p = by_free.pop(j)
            packs[p].append(i)
            free_tiles[p] -= t
            bisect.insort(by_free, (free - n, p))
    return [sorted(p, key=rank.__getitem__) for p in packs]


class PackedBatchSampler(torch.utils.data.Sampler):
    """Yields one pack (a list of dataset indices) per micro-batch; deterministic in (seed, epoch).

    Per epoch: shuffle all samples, plan packs (`plan_packs`) within consecutive windows of `window` samples
    (a bigger window packs tighter and costs more planning time), shuffle the packs, and pad the list by
    repeating its first packs to a multiple of world_size; rank r takes packs r, r + world_size, ...
    Every sample appears exactly once per epoch across ranks, apart from that padding.

    Lengths are the dataset's estimates (`SupervisedDataset.lengths`); `tiles` the image tiles per sample, or
    None for no tile budget. Resuming: `set_epoch(epoch, position)` with the number of micro-batches this rank
    already consumed in that epoch, or state_dict / load_state_dict.
    """

    def __init__(self, lengths, max_tokens: int, tiles=None, max_tiles: int | None = None,
                 world_size: int = 1, rank: int = 0, seed: int = 0, window: int = 4096):
        if tiles is not None and len(tiles) != len(lengths):
            raise ValueError(f"{len(lengths)} lengths but {len(tiles)} tile counts")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if window < 1 or max_tokens < 1:
            raise ValueError("window and max_tokens must be >= 1")
        if not len(lengths):
            raise ValueError("no samples to pack")
        self.lengths = [int(n) for n in lengths]
        self.tiles = [int(t) for t in tiles] if tiles is not None else None
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.world_size, self.rank, self.seed, self.window = world_size, rank, seed, window
        self.epoch, self.position = 0, 0
        self._cache = None  # (epoch, packs): planning a large dataset takes seconds, do it once per epoch

    def packs(self, epoch: int) -> list[list[int]]:
        """Every pack of the epoch, in order, padded to a multiple of world_size (all ranks)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"{self.seed}/packed/{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        packs = []
        for start in range(0, len(order), self.window):
            packs += plan_packs(self.lengths, self.max_tokens, self.tiles, self.max_tiles,
                                order[start:start + self.window])
        rng.shuffle(packs)
        need = (-len(packs)) % self.world_size
        packs += [packs[k % len(packs)] for k in range(need)]
        self._cache = (epoch, packs)
        return packs

    def micro_batches(self, epoch: int) -> int:
        """Packs (micro-batches) per rank in `epoch`; equal on every rank."""
        return len(self.packs(epoch)) // self.world_size

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def __iter__(self):
        mine = self.packs(self.epoch)[self.rank::self.world_size]
        while self.position < len(mine):
            pack = mine[self.position]
            self.position += 1
            yield pack

    def __len__(self):
        return self.micro_batches(self.epoch) - self.position

    def state_dict(self, position: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "world_size": self.world_size, "max_tokens": self.max_tokens,
                "max_tiles": self.max_tiles, "window": self.window, "num_samples": len(self.lengths),
                "samples_sha1": samples_sha1(self.lengths, self.tiles)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "world_size", "max_tokens", "max_tiles", "window", "num_samples", "samples_sha1"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the packed sampler: saved {key}={state.get(key)} but this "
                                 f"run has {mine[key]} (the packs depend on it"
                                 f"{SAMPLES_CHANGED * (key == 'samples_sha1')})")
        self.set_epoch(state["epoch"], state["position"])


def packed_total_steps(sampler: PackedBatchSampler, epochs: float, grad_accum: int) -> int:
    """Optimizer steps of a packed run of `epochs` epochs (a fraction allowed): the LR schedule's length.

    Pack counts differ slightly between epochs (each epoch is shuffled and packed anew), so count each one.
    """
    total, e = 0, 0
    while epochs - e > 0:
        steps = sampler.micro_batches(e) // grad_accum
        total += steps if epochs - e >= 1 else math.ceil((epochs - e) * steps)
        e += 1
    return total


def collate_packed(samples, max_tokens: int | None = None, max_tiles: int | None = None) -> dict:
    """The samples of one pack -> one row [1, L] (keys as data.collate, so the model call is the same).

    With `max_tokens` / `max_tiles`, a pack over either budget (estimates below the built sample: an image
    file changed after the index was built, or a replacement for a failed sample with none that fits) is
    still trained on as is, never truncated, and counted in meta["over_budget"] with a warning (train.py
    sums it into the metrics' over_budget_packs).
    """
    if not samples:
        raise ValueError("collate_packed got an empty pack")
    lengths = [len(s["input_ids"]) for s in samples]
    input_ids = torch.cat([s["input_ids"] for s in samples])[None]
    labels = torch.cat([s["labels"] for s in samples])[None].clone()
    starts = [sum(lengths[:k]) for k in range(len(samples))]
    labels[0, starts] = IGNORE_INDEX  # a sample's last token never predicts the next sample's first token
    segments = [torch.full((n,), k + 1, dtype=torch.long) for k, n in enumerate(lengths)]
    attention_mask = torch.cat(segments)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    flags = [s["image_flags"].reshape(-1) for s in samples]
    kept = [(s["pixel_values"], f) if bool(f.all()) else (s["pixel_values"][f.bool()], f[f.bool()])
            for s, f in zip(samples, flags) if bool(f.any())]  # real tiles only, copied once below
    if not kept:  # a text-only pack keeps one dummy tile (flag 0) to keep the ViT in the graph
        kept = [(samples[0]["pixel_values"][:1], flags[0][:1])]
    total, tiles = sum(lengths), int(sum(f.sum() for f in flags))
    over = (max_tokens is not None and total > max_tokens) or (max_tiles is not None and tiles > max_tiles)
    if over:
        log.warning("pack of %d samples has %d tokens and %d tiles, over its budget of %s tokens and %s "
                    "tiles (length estimates too low?)", len(samples), total, tiles, max_tokens, max_tiles)
    out = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
               pixel_values=concat_tiles([pixels for pixels, _ in kept]),
               image_flags=torch.cat([f for _, f in kept]))
    out["meta"] = dict(batch_meta(samples, labels), over_budget=int(over))
    return out

