"""Throughput of the data pipeline: JPEG decode -> tiles -> normalise -> tokens/labels -> collate.

Generates JPEGs of realistic sizes (phone photos, screenshots, documents), an annotation file with
80% image and 20% text-only samples, then times one process (dataset[i] + collate) and a DataLoader
with worker processes. Prints the median of several runs as samples/s, images/s and tiles/s.

    python3 bench/data.py                      # fixture tokenizer, 64 samples, 3 runs, 2 workers
    python3 bench/data.py --tokenizer PATH --samples 200 --runs 5 --workers 4 --max-num 12

Start time and memory at scale (--records N): writes a LLaVA-like annotation of N records (1-5 turns, 10-120
words per answer, 90% with an image file of its own, hard links to a pool of JPEGs of 64 sizes, so the index
reads one header per record as for LLaVA-665k; --image-wh F gives a fraction F of them image_wh) and reports, as
JSON: the dataset build seconds cold and warm (index cache), the seconds to stat() every image file once (what a
cache keyed by each image file would add to a warm start), the main process's RSS and the dataset's own bytes,
the RSS and private-memory growth of each DataLoader worker over --worker-samples samples, and the length
estimates' error against built samples.

    python3 bench/data.py --records 100000 --json out.json

With --json-layouts N it times reading a .json array of N short records written by json.dump(list) (one line)
and with indent=1 (a line per field), and prints the seconds and microseconds per record of each.

    python3 bench/data.py --json-layouts 60000

With --bad-lines K it breaks K records instead (malformed JSON, an unknown role, a missing image file, two <image>
tags for one image, in turn) and reports the seconds until the one error that must name every one of their
lines, and the rerun with skip_bad_samples that must count them.
"""
import argparse
import gc
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import DataError, LengthGroupedSampler, Source, SupervisedDataset, collate, load_tokenizer  # noqa: E402

SIZES = [(4032, 3024), (1920, 1080), (1280, 720), (1024, 768), (800, 1200), (640, 480), (1170, 2532), (2480, 3508)]


def make_images(folder, n):
    paths = []
    for k in range(n):
        w, h = SIZES[k % len(SIZES)]
        # noise + gradients: JPEG sizes and decode cost close to real photos
        noise = Image.effect_noise((w // 4, h // 4), 60).resize((w, h), Image.BICUBIC)
        grad = Image.linear_gradient("L").resize((w, h))
        img = Image.merge("RGB", (noise, grad, noise.transpose(Image.FLIP_LEFT_RIGHT)))
        path = os.path.join(folder, f"img{k}.jpg")
        img.save(path, quality=90)
        paths.append(os.path.basename(path))
    return paths


def make_annotation(path, images, n):
    with open(path, "w") as f:
        for k in range(n):
            q = "Describe the picture in detail, including every object, its colour and position. " * (1 + k % 3)
            a = "The picture shows a smooth gradient with a grid pattern and some noise. " * (2 + k % 5)
            rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            if k % 5:
                rec["image"] = images[k % len(images)]
                rec["conversations"][0]["value"] = "<image>\n" + q
            f.write(json.dumps(rec) + "\n")


def run_single(ds, batches):
    t0 = time.perf_counter()
    n = images = tiles = 0
    for b in batches:
        batch = collate([ds[i] for i in b])
        n += len(b)
        images += sum(1 for i in b if ds.is_image[i])
        tiles += int(batch["image_flags"].sum())
    return n, images, tiles, time.perf_counter() - t0


def run_loader(ds, sampler, workers):
    t0 = time.perf_counter()
    n = images = tiles = 0
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    for batch in loader:
        n += batch["input_ids"].shape[0]
        images += batch["input_ids"].shape[0] if batch["image_flags"][0] else 0  # batches never mix modalities
        tiles += int(batch["image_flags"].sum())
    return n, images, tiles, time.perf_counter() - t0


def report(name, results):
    n, images, tiles, _ = results[0]
    secs = statistics.median(r[3] for r in results)
    row = {"setting": name, "samples": n, "images": images, "tiles": tiles, "median_s": round(secs, 3),
           "samples_per_s": round(n / secs, 2), "images_per_s": round(images / secs, 2),
           "tiles_per_s": round(tiles / secs, 2), "runs": len(results)}
    print(f"{name:<22} {row['samples_per_s']:>8.2f} samples/s {row['images_per_s']:>8.2f} images/s "
          f"{row['tiles_per_s']:>8.2f} tiles/s  (median of {len(results)} runs, {n} samples, {secs:.2f} s)")
    return row


WORDS = [w for w in ("the a of to and in is on with for picture man woman dog cat car street table red blue green "
                      "small large left right top bottom near behind holding wearing sitting standing two three "
                      "people building sky tree water window sign white black yellow photo shows there are some "
                      "what where how many colour color shape image background foreground").split()]


def make_scale_annotation(path, folder, n, fmt="jsonl", seed=0, image_wh=0.0, bad=0):
    """LLaVA-like records: 1-5 turns, 10-120 words per answer, 90% with an image of its own (a hard link to one
    of 64 JPEGs of 224-1024 px a side; a fraction `image_wh` of them give image_wh). A .json array puts one
    record per line. `bad` records, evenly spread, are broken in turn: malformed JSON, an unknown role, a
    missing image file, two <image> tags for one image. Returns their 1-based line numbers."""
    rng = random.Random(seed)
    sizes = [(rng.randint(224, 1024), rng.randint(224, 1024)) for _ in range(64)]
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for k, wh in enumerate(sizes):
        Image.new("RGB", wh, (4 * k, 120, 200)).save(os.path.join(folder, f"pool{k}.jpg"), quality=90)
    words = WORDS + [f"w{k}" for k in range(3000)]  # a long tail, like real text
    if bad and fmt != "jsonl":
        raise ValueError("bad records are written to .jsonl annotations only")
    broken = {int((k + 0.5) * n / bad): k % 4 for k in range(bad)} if bad else {}
    lines = []
    with open(path, "w") as f:
        f.write("[\n" if fmt == "json" else "")
        for i in range(n):
            turns = []
            for t in range(rng.randint(1, 5)):
                q = " ".join(rng.choices(words, k=rng.randint(4, 25))).capitalize() + "?"
                a = " ".join(rng.choices(words, k=rng.randint(10, 120))).capitalize() + "."
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            rec = {"id": i, "conversations": turns}
            if rng.random() < 0.9:
                k = rng.randrange(len(sizes))
                rec["image"] = f"img/{i}.jpg"
                os.link(os.path.join(folder, f"pool{k}.jpg"), os.path.join(folder, rec["image"]))
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
                if rng.random() < image_wh:
                    rec["image_wh"] = list(sizes[k])
            if i in broken:
                kind = broken[i]
                if kind == 1:
                    turns[0]["from"] = "robot"
                elif kind == 2:
                    rec["image"] = f"img/gone{i}.jpg"
                elif kind == 3:
                    if "image" not in rec:
                        rec["image"] = f"img/{i}.jpg"
                        os.link(os.path.join(folder, "pool0.jpg"), os.path.join(folder, rec["image"]))
                    turns[0]["value"] = "<image>\n<image>\n" + turns[0]["value"].replace("<image>\n", "")
                lines.append(i + 1)
            line = json.dumps(rec)
            if broken.get(i) == 0:
                line = line[:-5]  # cut short: not JSON
            f.write(line + ("," if fmt == "json" and i < n - 1 else "") + "\n")
        f.write("]\n" if fmt == "json" else "")
    return lines


def _memory_kb():
    """(RSS, private = Private_Clean + Private_Dirty) of this process, in KiB."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


class _MemoryProbe(torch.utils.data.Dataset):
    """Builds the real sample, returns (worker id, RSS, private) instead of its tensors."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.ds[i]
        info = torch.utils.data.get_worker_info()
        return (info.id if info else -1, *_memory_kb())


def worker_growth(ds, workers, samples, seed=0):
    """Per worker: memory after its first sample and after `samples` samples (indices spread over the epoch)."""
    order = random.Random(seed).sample(range(len(ds)), min(len(ds), samples * workers))
    loader = torch.utils.data.DataLoader(_MemoryProbe(ds), batch_size=None, sampler=order, num_workers=workers)
    gc.freeze()  # as train.py does around its workers' fork
    probes = iter(loader)
    gc.unfreeze()
    seen = {}
    for wid, rss, private in probes:
        seen.setdefault(wid, []).append((rss, private))
    out = []
    for w, m in sorted(seen.items()):
        half = m[len(m) // 2]
        out.append({"worker": w, "samples": len(m), "rss_first_mb": round(m[0][0] / 1024, 1),
                    "rss_growth_mb": round((m[-1][0] - m[0][0]) / 1024, 1),
                    "private_growth_mb": round((m[-1][1] - m[0][1]) / 1024, 1),
                    "rss_growth_second_half_mb": round((m[-1][0] - half[0]) / 1024, 1)})
    return out


def length_error(ds, n, seed=0):
    """Absolute error of ds.lengths against the samples built from the same records (ds.build: no replacement
    can hide a miss), as a fraction of the built length: mean and max over all, and the mean over the image
    samples whose record has no image_wh (tiles from the image header)."""
    errs, from_header = [], []
    for i in random.Random(seed).sample(range(len(ds)), min(n, len(ds))):
        real = len(ds.build(i)["input_ids"])
        errs.append(abs(int(ds.lengths[i]) - real) / real)
        if ds.is_image[i] and "image_wh" not in ds.record(i):
            from_header.append(errs[-1])
    return {"samples": len(errs), "mae_fraction": sum(errs) / len(errs), "max_fraction": max(errs),
            "samples_tiles_from_header": len(from_header),
            "mae_fraction_tiles_from_header": sum(from_header) / max(1, len(from_header))}


def bad_input(args, tok):
    """Bad records at scale: the cold build must fail with one DataError naming every bad line (file:line);
    then a build with skip_bad_samples counts them. Seconds of both."""
    with tempfile.TemporaryDirectory() as tmp:
        ann = os.path.join(tmp, "scale.jsonl")
        lines = make_scale_annotation(ann, tmp, args.records, bad=args.bad_lines)
        kw = dict(max_num=args.max_num, max_length=args.max_length, cache_dir=os.path.join(tmp, "cache"),
                  index_workers=args.index_workers)
        t0 = time.perf_counter()
        try:
            SupervisedDataset([Source(ann, tmp)], tok, args.template, **kw)
            raise SystemExit(f"{ann}: {len(lines)} bad records were not reported")
        except DataError as e:
            message = str(e)
        error_s = time.perf_counter() - t0
        reported = sorted({int(n) for n in re.findall(r"scale\.jsonl:(\d+):", message)})
        t0 = time.perf_counter()
        ds = SupervisedDataset([Source(ann, tmp)], tok, args.template, skip_bad_samples=True, **kw)
        skip_s = time.perf_counter() - t0
    row = {"records": args.records, "bad_lines": len(lines), "error_s": round(error_s, 2),
           "error_first_line": message.splitlines()[0][:200], "lines_reported": len(reported),
           "every_bad_line_reported": reported == lines, "skip_build_s": round(skip_s, 2),
           "skipped": ds.source_counts["scale"]["bad"], "valid": ds.source_counts["scale"]["valid"],
           "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(row, indent=2))
    return row


def json_layouts(n, runs):
    """Seconds to read a .json array of n short records (read_annotation: each record parsed, with its line and
    byte range), one line vs indented: the same per record when the reader forgets what it consumed."""
    from data.dataset import read_annotation
    records = [{"id": k, "image": f"img/{k}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is in picture {k}?"},
        {"from": "gpt", "value": "A red square on a white background."}]} for k in range(n)]
    row = {"records": n, "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, indent in (("one_line", None), ("indented", 1)):
            path = os.path.join(tmp, f"{layout}.json")
            with open(path, "w") as f:
                json.dump(records, f, indent=indent)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                got = sum(1 for _ in read_annotation(path))
                times.append(time.perf_counter() - t0)
            assert got == n
            secs = statistics.median(times)
            row[layout] = {"file_mb": round(os.path.getsize(path) / 2**20, 1), "median_s": round(secs, 3),
                           "us_per_record": round(secs / n * 1e6, 2)}
    row["one_line_over_indented"] = round(row["one_line"]["median_s"] / row["indented"]["median_s"], 2)
    row["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(row, indent=2))
    return row


def scale(args, tok):
    with tempfile.TemporaryDirectory() as tmp:
        ann = os.path.join(tmp, f"scale.{args.format}")
        t0 = time.perf_counter()
        make_scale_annotation(ann, tmp, args.records, args.format, image_wh=args.image_wh)
        write_s = time.perf_counter() - t0
        for folder in (tmp, os.path.join(tmp, "img")):  # images written a while before the run: a folder
            past = time.time() - 3600  # changed in the last seconds makes the index cache untrusted
            os.utime(folder, (past, past))
        size = os.path.getsize(ann)
        cache = os.path.join(tmp, "cache")
        rss0 = _memory_kb()[0]
        builds, cpu = [], []
        for kind in ("cold", "warm"):
            t0, c0 = time.perf_counter(), time.process_time()
            ds = SupervisedDataset([Source(ann, tmp)], tok, args.template, max_num=args.max_num,
                                   max_length=args.max_length, cache_dir=cache, index_workers=args.index_workers)
            builds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        # what a cache key over every image file would add to each warm start: a stat() per image
        images = [os.path.join(tmp, "img", name) for name in os.listdir(os.path.join(tmp, "img"))]
        t0 = time.perf_counter()
        for p in images:
            os.stat(p)
        stat_s = time.perf_counter() - t0
        held = ds.index.nbytes + sum(a.nbytes for a in (ds.lengths, ds.is_image, ds.tiles)) + sum(
            x[c].nbytes for x in ds.source_index for c in ("offset", "nbytes", "line", "length", "tiles", "is_image"))
        row = {"records": args.records, "format": args.format, "image_wh": args.image_wh,
               "file_mb": round(size / 2**20, 1),
               "write_s": round(write_s, 2), "build_cold_s": round(builds[0], 2), "build_warm_s": round(builds[1], 2),
               "build_cold_cpu_s": round(cpu[0], 2), "build_warm_cpu_s": round(cpu[1], 2),
               "stat_every_image_s": round(stat_s, 3), "images": len(images),
               "main_rss_mb": round(_memory_kb()[0] / 1024, 1),
               "main_rss_growth_mb": round((_memory_kb()[0] - rss0) / 1024, 1),
               "dataset_mb": round(held / 2**20, 2), "dataset_over_file": round(held / size, 3),
               "index_workers": args.index_workers, "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
        row["length_error"] = length_error(ds, args.error_samples) if args.error_samples else None
        if args.workers:
            row["workers"] = worker_growth(ds, args.workers, args.worker_samples)
    print(json.dumps(row, indent=2))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "internlm2"))
    p.add_argument("--template", default="internlm2-chat", help="the chat template of the tokenizer's family")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--images", type=int, default=16, help="distinct JPEGs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-num", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--records", type=int, help="scale mode: start time and memory of a synthetic N-record annotation")
    p.add_argument("--format", choices=["jsonl", "json"], default="jsonl", help="scale mode: annotation format")
    p.add_argument("--image-wh", type=float, default=0.0,
                   help="scale mode: fraction of image records that give image_wh (LLaVA-665k: none)")
    p.add_argument("--max-length", type=int, default=4096, help="scale mode: max tokens per sample")
    p.add_argument("--worker-samples", type=int, default=1000, help="scale mode: samples per DataLoader worker")
    p.add_argument("--error-samples", type=int, default=100, help="scale mode: samples built to measure lengths")
    p.add_argument("--index-workers", type=int, help="scale mode: processes that check the records (default: "
                   "the dataset's, one per core for files of 16 MiB and more)")
    p.add_argument("--bad-lines", type=int, default=0,
                   help="scale mode: break this many records (.jsonl) and time the error that lists them instead")
    p.add_argument("--json-layouts", type=int, metavar="N",
                   help="time reading N short records as a one-line .json array and an indented one")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.json_layouts:
        row = json_layouts(args.json_layouts, args.runs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=2)
        return

    tok = load_tokenizer(args.tokenizer)
    if args.records:
        row = bad_input(args, tok) if args.bad_lines else scale(args, tok)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=2)
        return
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(tmp, args.images)
        ann = os.path.join(tmp, "bench.jsonl")
        make_annotation(ann, images, args.samples)
        t0 = time.perf_counter()
        ds = SupervisedDataset([Source(ann, tmp)], tok, args.template, max_num=args.max_num)
        build_s = time.perf_counter() - t0
        sampler = LengthGroupedSampler(ds.lengths, ds.is_image, args.batch_size)
        batches = list(sampler)
        print(f"{len(ds)} samples ({sum(ds.is_image)} with an image of {len(SIZES)} sizes up to 4032x3024), "
              f"max_num {args.max_num}, batch {args.batch_size}, torch threads {args.threads}; "
              f"dataset built (validation + length estimates) in {build_s:.2f} s")
        rows = [report("1 process", [run_single(ds, batches) for _ in range(args.runs)])]
        if args.workers > 0:
            rows.append(report(f"DataLoader {args.workers} workers",
                               [run_loader(ds, sampler, args.workers) for _ in range(args.runs)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
