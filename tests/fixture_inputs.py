"""Inputs of the fixture cases, rebuilt the way the official pipeline built them (tests/fixtures/README.md)."""
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture_pixels(case: str) -> torch.Tensor:
    """pixel_values [T, 3, 448, 448] of the fixture image, checked bit for bit against the stored subsample."""
    d = os.path.join(FIXTURES, case)
    img = Image.open(os.path.join(d, "image.png")).convert("RGB")
    w, h = img.size
    size, max_num = 448, 6
    cands = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num},
                   key=lambda x: x[0] * x[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in cands:
        diff = abs(w / h - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    i, j = best
    big = img.resize((size * i, size * j))
    tiles = [big.crop(((k % i) * size, (k // i) * size, (k % i + 1) * size, (k // i + 1) * size)) for k in range(i * j)]
    if len(tiles) > 1:
        tiles.append(img.resize((size, size)))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pv = torch.stack([(torch.from_numpy(np.array(t)).permute(2, 0, 1).float() / 255 - mean) / std for t in tiles])
    ref = load_file(os.path.join(d, "reference.safetensors"))
    assert torch.equal(pv[:, :, ::7, ::7], ref["pixel_values_sub"]), "fixture pixels differ from the official ones"
    return pv
