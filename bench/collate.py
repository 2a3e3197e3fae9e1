"""What a pack's tiles cost between a DataLoader worker and the training loop.

A pack of --samples samples (--text-only of them text-only, with one dummy tile each; the others --tiles tiles
each) is collated in a DataLoader worker (--workers of them) and received by the main process, which reads
every pixel once (as the copy to the device does). Three ways to build the pack's pixel_values, side by side:

    mask      torch.cat of every sample's tiles, then the real ones selected by image_flags (what
              data/packing.py did before: two copies, and the worker copies the result into shared memory
              to send it: a third)
    cat       torch.cat of the real tiles only (two copies: the cat and the send)
    ours      data.collate.concat_tiles of the real tiles: one copy, into shared memory, sent as is

Each sample's tiles are fresh tensors, as the image path returns them. Prints JSON, per variant (medians over
--rounds interleaved rounds, the first --warmup packs of a round dropped from the wall times):
    cpu_ms_per_pack   CPU time (user + system) per pack of the worker and the main process together: the cost
                      when every core is busy, as in training with enough workers
    wall_ms_per_pack  time between packs in the main process. A worker sends a batch from a background thread
                      (multiprocessing.Queue's feeder), so with a core to spare (--workers 1 here) the send's
                      copy overlaps the next pack and `cat` can show a lower wall time than ours
and the ratio of each variant's CPU time to ours.

    python3 bench/collate.py     # 8 samples (2 text-only), 7 tiles each, 2 workers, 40 packs, 3 rounds
    python3 bench/collate.py --tiles 13 --samples 4 --rounds 5 --workers 1
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import environment, write_json  # noqa: E402
from data.collate import concat_tiles  # noqa: E402
from data.images import IMAGE_SIZE  # noqa: E402


class Tiles(torch.utils.data.Dataset):
    """Sample i: fresh tiles (value i) and their image_flags; every `text_every`-th sample is text-only."""

    def __init__(self, n, tiles, text_every):
        self.n, self.tiles, self.text_every = n, tiles, text_every

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        text = self.text_every and i % self.text_every == 0
        count = 1 if text else self.tiles
        return torch.full((count, 3, IMAGE_SIZE, IMAGE_SIZE), float(i)), torch.full((count,), int(not text))


def mask(samples):
    flags = torch.cat([f for _, f in samples])
    return torch.cat([p for p, _ in samples])[flags.bool()]


def cat(samples):
    return torch.cat([p for p, f in samples if bool(f.all())])


def ours(samples):
    return concat_tiles([p for p, f in samples if bool(f.all())])


VARIANTS = {"mask": mask, "cat": cat, "ours": ours}


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers that have exited and been joined
    return usage.ru_utime + usage.ru_stime


def per_pack_ms(collate_fn, dataset, pack, packs, warmup, workers):
    """(CPU ms, median wall ms) per pack from `workers` workers; checks every pack's pixels."""
    batches = [list(range(k * pack, (k + 1) * pack)) for k in range(packs + warmup)]
    cpu0, main0 = children_cpu(), time.process_time()
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate_fn, prefetch_factor=2)
    times, t = [], time.perf_counter()
    for k, pixels in enumerate(loader):
        total = float(pixels.sum())  # the main process reads every pixel once
        now = time.perf_counter()
        if k >= warmup:
            times.append(now - t)
        t = now
        real = [i for i in batches[k] if not (dataset.text_every and i % dataset.text_every == 0)]
        expected = sum(i * dataset.tiles for i in real) * 3 * IMAGE_SIZE * IMAGE_SIZE
        if pixels.shape[0] != len(real) * dataset.tiles or total != expected:
            raise SystemExit(f"{collate_fn.__name__}: pack {k} has the wrong tiles")
    # the exhausted loader has joined its workers: their CPU time is now in RUSAGE_CHILDREN
    cpu = children_cpu() - cpu0 + time.process_time() - main0
    return 1e3 * cpu / len(batches), 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8, help="samples per pack")
    p.add_argument("--text-only", type=int, default=2, help="of which text-only (one dummy tile each)")
    p.add_argument("--tiles", type=int, default=7, help="tiles of each image sample")
    p.add_argument("--packs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (2: this machine's cores)")
    p.add_argument("--rounds", type=int, default=3, help="each variant this many times, interleaved")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text_every = args.samples // args.text_only if args.text_only else 0
    dataset = Tiles(args.samples * (args.packs + args.warmup), args.tiles, text_every)
    runs = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in list(VARIANTS)[r % 3:] + list(VARIANTS)[:r % 3]:
            runs[name].append(per_pack_ms(VARIANTS[name], dataset, args.samples, args.packs, args.warmup,
                                          args.workers))
    cpu = {name: round(statistics.median(c for c, _ in v), 2) for name, v in runs.items()}
    wall = {name: round(statistics.median(w for _, w in v), 2) for name, v in runs.items()}
    real = args.samples - args.text_only
    pack_mib = real * args.tiles * 3 * IMAGE_SIZE * IMAGE_SIZE * 4 / 2**20
    write_json(args.json, {
        "environment": environment(), "samples": args.samples, "text_only": args.text_only,
        "tiles": args.tiles, "pack_mib": round(pack_mib, 1), "packs": args.packs,
        "workers": args.workers, "rounds": args.rounds, "cpu_ms_per_pack": cpu, "wall_ms_per_pack": wall,
        "cpu_ratio_to_ours": {name: round(cpu[name] / cpu["ours"], 3) for name in cpu}})


if __name__ == "__main__":
    main()
