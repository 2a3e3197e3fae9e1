"""The embedded demo: a tiny random base model in the official format and a synthetic, learnable data set.

`make_demo(root)` writes, once, under `root`:
  base/   an official-format InternVL 1.5 directory (the "demo" size preset: InternLM2 LLM + InternViT-300M
          style ViT, both tiny, random weights, 224 px tiles): config.json, generation_config.json,
          model.safetensors (bf16, official names), and a slow InternLM2-layout tokenizer (tokenizer.model,
          tokenizer_config.json, special_tokens_map.json, added_tokens.json) that data.load_tokenizer reads
          like a released one.
  data/   images/*.png (a coloured shape at a position on a light background) and train.jsonl in LLaVA
          format: captions and questions about colour, shape and position, a few multi-turn, plus text-only
          samples. eval.jsonl + images/eval_*.png: a held-out set from the same generator with other draws
          (48 image and 16 text-only records), train.py's default --eval-data for the demo.
The answers are a function of the image, so the loss can fall well below the format-only level.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct

import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

from model.config import InternVLConfig, preset
from model.weights import save_safetensors, to_official_state_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "centre": (0.5, 0.5)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}
HEAD_STD = 0.1
SYSTEM_MESSAGE = "You are a helpful assistant that describes simple pictures."

# InternLM2 layout (tests/fixtures/README.md): the chat tokens are the last pieces of the sentencepiece
# vocabulary under placeholder names, renamed by tokenizer_config.json's added_tokens_decoder ...
CHAT_PIECES = [("[UNUSED_TOKEN_141]", "<|plugin|>"), ("[UNUSED_TOKEN_142]", "<|interpreter|>"),
               ("[UNUSED_TOKEN_143]", "<|action_end|>"), ("[UNUSED_TOKEN_144]", "<|action_start|>"),
               ("[UNUSED_TOKEN_145]", "<|im_end|>"), ("[UNUSED_TOKEN_146]", "<|im_start|>")]
# ... and the 9 InternVL tokens are added at the end of the vocabulary, in this order.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                   "</box>"]

TEXT_ONLY = [  # (question, answer): learnable without an image
    ("What colour do you get by mixing red and blue?", "Purple."),
    ("What colour do you get by mixing blue and yellow?", "Green."),
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("Is a circle round?", "Yes, a circle is round."),
    ("Which colour is the sky on a clear day?", "The sky is blue."),
    ("Which colour is a banana?", "A banana is yellow."),
    ("Name a shape with no corners.", "A circle."),
]


def demo_config(vocab_size: int) -> InternVLConfig:
    config = preset("demo", system_message=SYSTEM_MESSAGE)
    config.llm.vocab_size = vocab_size
    return config


# --- data ---

def draw(colour: str, shape: str, position: str, rng: random.Random) -> Image.Image:
    size = 448
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * size, (cy + rng.uniform(-0.04, 0.04)) * size
    r = rng.uniform(0.19, 0.24) * size  # large enough that the tiny frozen ViT's features tell shapes apart
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def conversation(colour: str, shape: str, position: str, rng: random.Random) -> list[dict]:
    qa = [("Describe the image.", f"A {colour} {shape} {WHERE[position]}."),
          ("What colour is the shape?", f"{colour.capitalize()}."),
          ("What shape is in the picture?", f"A {shape}."),
          ("Where is the shape?", f"It is {WHERE[position]}.")]
    turns = rng.sample(qa, len(qa))  # every question, in random order: 4 answers per image at little cost
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def make_data(data_dir: str, n_images: int, text_only: int, seed: int, name: str = "train") -> str:
    """images/*.png + {name}.jsonl (LLaVA format); returns the annotation path. Images of a set other than
    "train" are named images/{name}_*.png."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
    records = []
    for i in range(n_images):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        image = f"images/{'' if name == 'train' else name + '_'}{i:05d}.png"
        draw(colour, shape, position, rng).save(os.path.join(data_dir, image))
        records.append({"id": f"img{i}", "image": image,
                        "conversations": conversation(colour, shape, position, rng)})
    for i in range(text_only):
        q, a = rng.choice(TEXT_ONLY)
        records.append({"id": f"txt{i}",
                        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    rng.shuffle(records)
    path = os.path.join(data_dir, f"{name}.jsonl")
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# --- tokenizer ---

def _piece_message(piece: str, score: float, kind: int) -> bytes:
    """One ModelProto.SentencePiece, protobuf-encoded by hand (no protobuf dependency)."""
    raw = piece.encode()
    return b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> bytes:
    """SentencePiece BPE with byte fallback, identity normalisation, dummy prefix (as the released models),
    then the 6 chat placeholders appended as USER_DEFINED pieces at the end, where InternLM2 has them.

    Appending works because a repeated protobuf field may be continued anywhere in the message.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    user_defined = 4
    return buf.getvalue() + b"".join(b"\x0a" + _varint(len(m)) + m
                                     for m in (_piece_message(p, 0.0, user_defined) for p, _ in CHAT_PIECES))


def _token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer(out: str, model_bytes: bytes) -> int:
    """The four tokenizer files of a released InternLM2-based InternVL; returns the full vocabulary size."""
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(model_bytes)
    n_sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model")).get_piece_size()
    first_chat = n_sp - len(CHAT_PIECES)
    decoder = {"0": {**_token("<unk>"), "special": True}, "1": {**_token("<s>"), "special": True},
               "2": {**_token("</s>"), "special": True}}
    for i, (_, name) in enumerate(CHAT_PIECES):
        decoder[str(first_chat + i)] = {**_token(name), "special": True}
    added = {tok: n_sp + i for i, tok in enumerate(INTERNVL_TOKENS)}
    for tok, i in added.items():
        decoder[str(i)] = {**_token(tok), "special": True}
    chat_names = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                  "<|plugin|>"]
    tokenizer_config = {
        "added_tokens_decoder": decoder, "additional_special_tokens": chat_names + INTERNVL_TOKENS,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 4096, "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>"}
    special = {"additional_special_tokens": chat_names + [_token(t) for t in INTERNVL_TOKENS],
               "bos_token": _token("<s>"), "eos_token": _token("</s>"), "pad_token": _token("</s>"),
               "unk_token": _token("<unk>")}
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special),
                      ("added_tokens.json", added)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    return n_sp + len(INTERNVL_TOKENS)


# --- model ---

def random_tensor(name: str, shape, config: InternVLConfig, g: torch.Generator) -> torch.Tensor:
    """One random weight by its internal name: std 0.02 (HEAD_STD for the output head), unit norms, zero
    biases, layer scales at the init factor (also used tensor by tensor for real-size checkpoints)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("ls1", "ls2"):
        return torch.full(shape, config.vision.initializer_factor)
    if "norm" in name and leaf == "weight":
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    # the head: wide enough that a frozen head can express confident answers
    return torch.randn(shape, generator=g) * (HEAD_STD if name == "llm.head.weight" else 0.02)


def random_state_dict(config: InternVLConfig, seed: int) -> dict[str, torch.Tensor]:
    from model import build_model
    g = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, p.shape, config, g)
            for name, p in build_model(config, "meta").state_dict().items()}


def write_model(out: str, config: InternVLConfig, seed: int) -> None:
    official = to_official_state_dict(random_state_dict(config, seed), config)
    save_safetensors({k: v.to(torch.bfloat16).contiguous() for k, v in official.items()},
                     os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_official(), f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "transformers_version": "4.44.2"}, f, indent=2)


def make_demo(root: str, n_images: int = 960, text_only: int = 192, seed: int = 0) -> tuple[str, str, str]:
    """Write the demo base model and data under `root` once; returns (model_dir, annotation, image_folder).

    Written into a temporary directory and renamed when complete, so an interrupted first run is redone.
    """
    root = os.path.abspath(root)
    model_dir, data_dir = os.path.join(root, "base"), os.path.join(root, "data")
    annotation = os.path.join(data_dir, "train.jsonl")
    if all(os.path.exists(p) for p in (os.path.join(model_dir, "config.json"), annotation,
                                         os.path.join(data_dir, "eval.jsonl"))):
        return model_dir, annotation, data_dir
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "base"))
    make_data(os.path.join(tmp, "data"), n_images, text_only, seed)
    make_data(os.path.join(tmp, "data"), 48, 16, seed + 1, "eval")  # held-out: same generator, other draws
    # The fixed parts of every prompt are repeated so that BPE learns them as few pieces.
    with open(os.path.join(tmp, "data", "train.jsonl")) as f:
        messages = [t["value"].replace("<image>\n", "")
                    for line in f for t in json.loads(line)["conversations"]]
    texts = [SYSTEM_MESSAGE, "system", "user", "assistant"] * 20 + messages
    # Each message also follows a role header's newline in the prompt, where it gets no dummy-prefix space:
    # the official label code counts tokens of fragments tokenized alone, so both forms must tokenize alike.
    texts += [f"user\n{t}" for t in texts] + [f"{q} {a}" for q, a in TEXT_ONLY] + [
        f"A {c} {s} {w}." for c in COLOURS for s in SHAPES for w in WHERE.values()]
    vocab = write_tokenizer(os.path.join(tmp, "base"), train_tokenizer(texts))
    write_model(os.path.join(tmp, "base"), demo_config(vocab), seed)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    os.replace(tmp, root)
    return model_dir, annotation, data_dir
