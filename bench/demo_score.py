"""Does the demo model look at the picture? Draws fresh demo images (a seed the demo data never used), asks each
the colour and the shape question through the official chat (greedy, as chat.py), and scores the answers.

    python3 bench/demo_score.py runs/demo/converted            # 40 images; chance: colour 1/5, shape 1/3

An answer is right when the only colour (shape) word in it is the true one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from chat import chat, image_to_pixel_values  # noqa: E402
from demo import COLOURS, POSITIONS, SHAPES, draw  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import load_pretrained  # noqa: E402

QUESTIONS = {"colour": ("What colour is the shape?", list(COLOURS)),
             "shape": ("What shape is in the picture?", SHAPES)}


def named(answer: str, words) -> set[str]:
    return {w for w in words if re.search(rf"\b{w}\b", answer.lower())}


def score(model_dir: str, n: int = 40, seed: int = 12345, show: int = 0) -> dict:
    """{'colour': right, 'shape': right, 'n': n, 'examples': [...]} on n fresh images drawn with `seed`."""
    rng = random.Random(seed)
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32, device="cpu")
    result, examples = {"colour": 0, "shape": 0, "n": n}, []
    for _ in range(n):
        truth = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
        image = draw(truth["colour"], truth["shape"], rng.choice(list(POSITIONS)), rng)
        pixel_values = image_to_pixel_values(image, model.config)
        for kind, (question, words) in QUESTIONS.items():
            answer = chat(model, tokenizer, pixel_values, question, max_new_tokens=16)[0]
            result[kind] += named(answer, words) == {truth[kind]}
            examples.append((truth[kind], answer))
    result["examples"] = examples[:show]
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a converted demo model (convert.py output)")
    p.add_argument("--images", type=int, default=40, help="fresh images to draw (default 40)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fresh images (default 12345; the demo "
                                                           "data use 0)")
    p.add_argument("--show", type=int, default=6, help="(truth, answer) pairs to print (default 6)")
    args = p.parse_args(argv)
    r = score(args.model_dir, args.images, args.seed, args.show)
    print(json.dumps({**r, "colour_rate": r["colour"] / r["n"], "shape_rate": r["shape"] / r["n"]}))


if __name__ == "__main__":
    main()
