import json
import os

import pytest
import torch
from safetensors.torch import load_file

from data import build_sample, collate, load_tokenizer
from model.config import TEMPLATES

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def test_collate_pads_right_and_concatenates_tiles():
    a = dict(input_ids=torch.tensor([1, 5, 6, 7]), labels=torch.tensor([-100, -100, 6, 7]),
             pixel_values=torch.full((2, 3, 448, 448), 0.5), image_flags=torch.tensor([1, 1]),
             meta={"id": "s:1", "skipped": ["s:9: gone"], "wide_images": ["im/16bit.png"]})
    b = dict(input_ids=torch.tensor([1, 0, 9]), labels=torch.tensor([-100, 0, 9]),
             pixel_values=torch.full((1, 3, 448, 448), -1.0), image_flags=torch.tensor([0]),
             meta={"id": "s:2", "skipped": [], "truncated": True, "gpt_first": True})
    out = collate([a, b])
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 0, 9, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 0, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]  # a real id 0 is still attended
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert out["pixel_values"].shape == (3, 3, 448, 448)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [0.5, 0.5, -1.0]
    assert out["image_flags"].tolist() == [1, 1, 0]
    assert out["meta"] == {"ids": ["s:1", "s:2"], "skipped": ["s:9: gone"], "num_samples": 2, "num_tokens": 7,
                           "num_supervised": 4, "image_failures": 0, "truncated": 1, "gpt_first": 1,
                           "wide_images": ["im/16bit.png"], "replaced": 1}


def test_collate_of_fixture_sample_matches_official_batch():
    for case in ("internlm2", "phi3"):
        t = load_file(os.path.join(FIX, case, "reference.safetensors"))
        record = json.load(open(os.path.join(FIX, case, "conversation.json")))
        sample = build_sample(record, load_tokenizer(os.path.join(FIX, case)), TEMPLATES[case], os.path.join(FIX, case),
                              max_num=6)
        out = collate([sample])
        for key in ("input_ids", "labels", "attention_mask", "position_ids", "image_flags"):
            assert torch.equal(out[key], t[key]), (case, key)
        assert out["input_ids"].shape[1] == int(t["sample_lengths"][0])


def test_supervised_count_is_the_loss_count_when_the_first_label_is_supervised():
    """The collator's num_supervised (the loss denominator) and the loss count the same tokens: a label is a
    target of the position before it, so a row's first label never counts (row 0 here starts supervised)."""
    import torch.nn.functional as F

    from data.packing import collate_packed
    from model import build_model, preset
    torch.manual_seed(0)
    model = build_model(preset("tiny", img_context_token_id=500), "cpu", torch.float32).eval()
    dummy = dict(pixel_values=torch.zeros(1, 3, 448, 448), image_flags=torch.tensor([0]))
    a = dict(input_ids=torch.tensor([1, 5, 6, 7, 8, 9]), labels=torch.tensor([1, -100, 6, 7, -100, 9]),
             **dummy)
    b = dict(input_ids=torch.tensor([1, 4, 3]), labels=torch.tensor([1, 4, -100]), **dummy)
    targets = {(0, 2), (0, 3), (0, 5), (1, 1)}  # (row, position) of the supervised tokens
    batch = collate([a, b])
    assert batch["meta"]["num_supervised"] == len(targets)
    meta = batch.pop("meta")
    with torch.no_grad():
        out = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ce = {(r, p): F.cross_entropy(logits[r, p - 1], batch["labels"][r, p]).item() for r, p in targets}
    assert out.n_supervised == meta["num_supervised"]
    assert out.loss.item() == pytest.approx(sum(ce.values()) / len(targets), rel=1e-5)
    # a pack: the second sample starts supervised too; its first token is no target of the first sample's last
    pack = collate_packed([a, b])
    assert pack["meta"]["num_supervised"] == 4  # a: 6, 7, 9; b: 4
    pack.pop("meta")
    with torch.no_grad():
        assert model(**pack).n_supervised == 4
