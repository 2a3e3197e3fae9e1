"""Length-grouped, modality-aware, distributed, resumable batch sampler.

Per epoch, deterministic in (seed, epoch):
1. image and text-only samples are handled apart (a batch never mixes them);
2. each group is shuffled and its last len(group) % (batch_size * world_size) samples are left out of
   this epoch (`sampler.left_out`: counted, and a different seeded set each epoch), so every rank gets the
   same number of full batches and no sample is repeated to fill one (it would count twice in the loss);
3. it is cut into mega-batches of batch_size * world_size * group_batches samples, each sorted by
   estimated length (descending) and cut into micro-batches of batch_size; world_size consecutive
   micro-batches form one step (similar lengths on every rank at a step);
4. the steps of both groups are shuffled together; rank r takes micro-batch r of every step.
Every sample appears at most once per epoch across ranks.

Use it as `DataLoader(ds, batch_sampler=sampler, collate_fn=collate)`. To resume, save
`sampler.state_dict(batches_consumed_this_epoch)` (the DataLoader prefetches, so the sampler's own
position runs ahead of training) and call `load_state_dict` before iterating.
"""
import hashlib
import random

import numpy as np
import torch


def samples_sha1(*columns):
    """A fingerprint of the per-sample values an order is planned from (lengths, modality or tiles)."""
    h = hashlib.sha1()
    for c in columns:
        h.update(np.asarray(c if c is not None else [], dtype=np.int64).tobytes() + b"/")
    return h.hexdigest()


class LengthGroupedSampler(torch.utils.data.Sampler):
    def __init__(self, lengths, is_image, batch_size, world_size=1, rank=0, seed=0, group_batches=8):
        if len(lengths) != len(is_image):
            raise ValueError(f"{len(lengths)} lengths but {len(is_image)} modality flags")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or group_batches < 1:
            raise ValueError("batch_size and group_batches must be >= 1")
        self.lengths, self.is_image = [int(n) for n in lengths], [bool(m) for m in is_image]
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_batches = seed, group_batches
        self.epoch, self.position = 0, 0
        unit = batch_size * world_size
        n_img = sum(self.is_image)
        self.left_out = {"image": n_img % unit, "text-only": (len(self.is_image) - n_img) % unit}  # per epoch

    def set_epoch(self, epoch, position=0):
        self.epoch, self.position = epoch, position

    def steps(self, epoch):
        """All steps of an epoch: a list of [world_size micro-batches of indices]."""
        rng = random.Random(f"{self.seed}/{epoch}")
        unit = self.batch_size * self.world_size
        steps = []
        for modality in (True, False):
            group = [i for i, m in enumerate(self.is_image) if m == modality]
            if not group:
                continue
            rng.shuffle(group)
            group = group[:len(group) - len(group) % unit]
            mega = unit * self.group_batches
            for start in range(0, len(group), mega):
                chunk = sorted(group[start:start + mega], key=lambda i: -self.lengths[i])
                micro = [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
                steps += [micro[k:k + self.world_size] for k in range(0, len(micro), self.world_size)]
        rng.shuffle(steps)
        return steps

    def __iter__(self):
        steps = self.steps(self.epoch)
        while self.position < len(steps):
            batch = steps[self.position][self.rank]
            self.position += 1
            yield batch
        self.position = 0  # a finished pass starts over (call set_epoch for the next epoch's order)

    def __len__(self):
        unit = self.batch_size * self.world_size
        n_img = sum(self.is_image)
        n_txt = len(self.is_image) - n_img
        return n_img // unit + n_txt // unit - self.position

    def state_dict(self, position=None):
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "group_batches": self.group_batches, "num_samples": len(self.lengths),
                "samples_sha1": samples_sha1(self.lengths, self.is_image)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "world_size", "batch_size", "group_batches", "num_samples", "samples_sha1"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the sampler: saved {key}={state.get(key)} but this run has "
                                 f"{mine[key]} (the order depends on it"
                                 f"{SAMPLES_CHANGED * (key == 'samples_sha1')})")
        self.set_epoch(state["epoch"], state["position"])


SAMPLES_CHANGED = (": the samples' length estimates or modalities differ, so the data, the image files, the "
                   "system message, the template or the tiling changed")
