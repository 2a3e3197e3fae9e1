"""Image path, side by side with the official one: JPEG -> 13 tiles -> normalised float32 pixel values.

official: Image.open(p).convert('RGB'), the official dynamic_preprocess (resize, crops, thumbnail), then per
          tile torchvision's Resize(448) (a no-op on 448 tiles) + ToTensor + Normalize(ImageNet), torch.stack.
          torchvision is not needed: its tensor code is written out below exactly as it runs
          (torchvision.transforms.functional.to_tensor, PIL uint8 branch, and F.normalize with inplace=False).
ours:     data.images.load_image, resize_to_grid, grids_to_tensor (= images_to_pixel_values).

Both run in one process, one thread, interleaved (the order alternates per repeat; a first round warms up and
is dropped), on the same JPEGs, and their pixel values are checked equal bit for bit. Prints JSON: per size the
median ms of each stage (decode, resize = the PIL tiling, tensor = to-tensor + normalise), the median totals,
speedup = official / ours of those medians and speedup_paired = the median of the per-repeat ratios.
ceiling = official / (our decode + resize) is the ratio that even a free tensor stage could not pass: the JPEG
decode and the two bicubic resizes are Pillow's work in both pipelines (the same calls, fixed by pixel-exactness),
so on a machine where they are most of the time no tensor code can lift the ratio above it.
The clock is the process's CPU time by default (one thread: the cost per core; on a machine shared with other
jobs it leaves out the time spent waiting for a core); `--clock wall` times wall seconds instead.

    python3 bench/images.py            # 640x480, 1024x768, 2000x1500; 12 tiles + thumbnail; 7 repeats; CPU time
    python3 bench/images.py --repeats 11 --sizes 800x600 4032x3024
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import environment, write_json  # noqa: E402
from data.images import (IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess,  # noqa: E402
                         grids_to_tensor, load_image, resize_to_grid)

STAGES = ("decode", "resize", "tensor")


def make_jpeg(path, w, h):
    """Noise + gradients: JPEG size and decode cost close to a real photo."""
    noise = Image.effect_noise((w // 4, h // 4), 60).resize((w, h), Image.BICUBIC)
    grad = Image.linear_gradient("L").resize((w, h))
    Image.merge("RGB", (noise, grad, noise.transpose(Image.FLIP_LEFT_RIGHT))).save(path, quality=90)


def tv_transform(pic, size=IMAGE_SIZE):
    """torchvision Compose([Lambda(RGB), Resize((size, size), BICUBIC), ToTensor(), Normalize(mean, std)])."""
    pic = pic.convert("RGB") if pic.mode != "RGB" else pic
    if pic.size != (size, size):
        pic = pic.resize((size, size), Image.BICUBIC)
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))  # F.to_tensor
    img = img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1)).contiguous()
    x = img.to(dtype=torch.float32).div(255)
    x = x.clone()  # F.normalize(inplace=False)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    if (std == 0).any():
        raise ValueError("std evaluated to zero")
    return x.sub_(mean).div_(std)


def official(path, max_num, clock):
    t0 = clock()
    image = Image.open(path).convert("RGB")
    t1 = clock()
    tiles = dynamic_preprocess(image, max_num=max_num)
    t2 = clock()
    pv = torch.stack([tv_transform(t) for t in tiles])
    return pv, (t1 - t0, t2 - t1, clock() - t2)


def ours(path, max_num, clock):
    t0 = clock()
    image = load_image(path)
    t1 = clock()
    grid = resize_to_grid(image, max_num=max_num)
    t2 = clock()
    pv = grids_to_tensor([grid])
    return pv, (t1 - t0, t2 - t1, clock() - t2)


def side_by_side(path, repeats, max_num, clock=time.process_time):
    """Median stage times (ms) of both pipelines on one JPEG, interleaved; raises if the pixels differ."""
    times = {"official": [], "ours": []}
    for r in range(repeats + 1):  # round 0 warms up and is dropped; the order alternates
        pv = {}
        for name, fn in [("official", official), ("ours", ours)][::1 if r % 2 else -1]:
            pv[name], t = fn(path, max_num, clock)
            if r:
                times[name].append(t)
        if not torch.equal(pv["official"], pv["ours"]):
            raise SystemExit(f"{path}: pixel values differ from the official pipeline")
    row = {"tiles": pv["ours"].shape[0], "pixels_equal": True}
    for name, ts in times.items():
        row[name] = {s: round(1e3 * statistics.median(t[i] for t in ts), 2) for i, s in enumerate(STAGES)}
        row[name]["total"] = round(1e3 * statistics.median(sum(t) for t in ts), 2)
    row["speedup"] = round(row["official"]["total"] / row["ours"]["total"], 3)  # ratio of the medians
    paired = [sum(a) / sum(b) for a, b in zip(times["official"], times["ours"])]
    row["speedup_paired"] = round(statistics.median(paired), 3)  # median of the per-round ratios
    pil = statistics.median(t[0] + t[1] for t in times["ours"])  # decode + resize: Pillow's share of ours
    row["ceiling"] = round(row["official"]["total"] / (1e3 * pil), 3)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["640x480", "1024x768", "2000x1500"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-num", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            w, h = map(int, size.split("x"))
            path = os.path.join(tmp, f"{size}.jpg")
            make_jpeg(path, w, h)
            row = side_by_side(path, args.repeats, args.max_num, clock)
            rows.append({"size": size, "repeats": args.repeats, **row})
    write_json(args.json, {"environment": environment(), "max_num": args.max_num, "threads": args.threads,
                           "clock": args.clock, "results": rows})


if __name__ == "__main__":
    main()
