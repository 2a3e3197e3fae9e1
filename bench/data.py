"""Throughput of the data pipeline: JPEG decode -> tiles -> normalise -> tokens/labels -> collate.

Generates JPEGs of realistic sizes (phone photos, screenshots, documents), an annotation file with
80% image and 20% text-only samples, then times one process (dataset[i] + collate) and a DataLoader
with worker processes. Prints the median of several runs as samples/s, images/s and tiles/s.

    python3 bench/data.py                      # fixture tokenizer, 64 samples, 3 runs, 2 workers
    python3 bench/data.py --tokenizer PATH --samples 200 --runs 5 --workers 4 --max-num 12
"""
import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import LengthGroupedSampler, Source, SupervisedDataset, collate, load_tokenizer  # noqa: E402

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "internlm2"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--images", type=int, default=16, help="distinct JPEGs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-num", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("data").setLevel(logging.ERROR)  # the tiny tokenizer's label-mismatch notes are not news here

    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(tmp, args.images)
        ann = os.path.join(tmp, "bench.jsonl")
        make_annotation(ann, images, args.samples)
        t0 = time.perf_counter()
        ds = SupervisedDataset([Source(ann, tmp)], tok, max_num=args.max_num)
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
