"""Inputs of the fixture cases, built with the data pipeline (whose own tests check it against the fixtures)."""
import os

import torch
from safetensors.torch import load_file

from data import load_image
from data.images import images_to_pixel_values

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture_pixels(case: str) -> torch.Tensor:
    """pixel_values [T, 3, 448, 448] of the fixture image, checked bit for bit against the stored subsample."""
    d = os.path.join(FIXTURES, case)
    pv, _ = images_to_pixel_values([load_image(os.path.join(d, "image.png"))], max_num=6)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    assert torch.equal(pv[:, :, ::7, ::7], ref["pixel_values_sub"]), "fixture pixels differ from the official ones"
    return pv
