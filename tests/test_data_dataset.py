"""Sources, repeat ratios, the meta file, build-time validation and load-time skips."""
import json
import os
import random

import pytest
import torch
from PIL import Image

from data import DataError, LengthGroupedSampler, Source, SupervisedDataset, collate, load_tokenizer, read_meta_file
from data.dataset import read_annotation, repeat_indices

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = load_tokenizer(os.path.join(FIX, "phi3"))


def conv(q="Describe the picture.", a="A gradient."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for k, wh in enumerate([(640, 480), (300, 900), (448, 448)]):
        Image.new("RGB", wh, (k * 50, 100, 200)).save(d / f"{k}.jpg")
    return d


@pytest.mark.parametrize("ratio,n", [(0.5, 10), (1, 10), (2.5, 10), (0.3, 10), (1.75, 7)])
def test_repeat_ratio_counts(ratio, n):
    picks = repeat_indices(n, ratio, random.Random(0))
    whole = int(ratio)
    assert len(picks) == whole * n + int(round((ratio - whole) * n, 6))
    counts = [picks.count(i) for i in range(n)]
    assert all(c in (whole, whole + 1) for c in counts)
    assert picks[:whole * n] == list(range(n)) * whole
    assert repeat_indices(n, ratio, random.Random(0)) == picks  # seeded
    if ratio % 1:
        others = [repeat_indices(n, ratio, random.Random(s))[whole * n:] for s in range(1, 6)]
        assert any(o != picks[whole * n:] for o in others)  # a random fraction, not the head


def test_dataset_repeat_ratios_and_source_counts(tmp_path, image_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"image": "0.jpg", "conversations": conv(a=f"A{i}")} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": conv(a=f"B{i}")} for i in range(10)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"conversations": conv(a=f"C{i}")} for i in range(10)])
    ds = SupervisedDataset([Source(a, str(image_dir), 0.5), Source(b, None, 1), Source(c, None, 2.5)], TOK, seed=3)
    assert {k: v["sampled"] for k, v in ds.source_counts.items()} == {"a": 5, "b": 10, "c": 25}
    assert len(ds) == 40 and sum(ds.is_image) == 5
    picked_c = sorted(k for si, k in ds.index if si == 2)
    assert [picked_c.count(k) for k in range(10)].count(3) == 5  # 2 full copies + half of them once more


def test_json_array_and_meta_file(tmp_path, image_dir):
    records = [{"image": "1.jpg", "conversations": conv()}, {"conversations": conv(a="Text only.")}]
    (tmp_path / "arr.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "l.jsonl", records)
    meta = {"first": {"root": "images", "annotation": "arr.json", "repeat_time": 2, "max_dynamic_patch": 2},
            "second": {"root": "", "annotation": "l.jsonl", "repeat_time": 0.5, "data_augment": True}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sources = read_meta_file(str(tmp_path / "meta.json"))
    assert [(s.name, s.repeat, s.max_num, s.data_augment) for s in sources] == [
        ("first", 2.0, 2, False), ("second", 0.5, None, True)]
    assert sources[0].image_folder == str(image_dir)
    ds = SupervisedDataset(sources, TOK)
    assert len(ds) == 5
    sample = ds[0]  # source "first" keeps at most 2 tiles (+ thumbnail) for its 300x900 image
    assert sample["pixel_values"].shape[0] == 3 and sample["meta"]["id"] == "first:2"
    assert [line for line, _ in read_annotation(str(tmp_path / "arr.json"))] == [2, 15]


def test_meta_file_errors(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"x": {"annotation": "a.jsonl", "repeat": 2}}))
    with pytest.raises(DataError, match=r"dataset 'x' has unknown keys \['repeat'\]"):
        read_meta_file(str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text('{"x": {"annotation": "a.jsonl",}}')
    with pytest.raises(DataError, match="m.json:1: malformed JSON"):
        read_meta_file(str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="repeat must be a positive number"):
        Source("a.jsonl", repeat=0)
    assert Source.parse("d/a.jsonl,imgs,2.5,4") == Source("d/a.jsonl", "imgs", 2.5, 4)


BAD = [
    ('{"conversations": [', "malformed JSON line"),
    ({"image": "0.jpg"}, "missing 'conversations'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "Q"}]}, "no answer turn"),
    ({"image": "0.jpg", "conversations": conv(q="<image> <image>")}, "2 <image> tags but 1 image"),
]


def test_bad_inputs_reported_together_with_file_line(tmp_path):
    good = {"conversations": conv()}
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + [b for b, _ in BAD] + [good])
    with pytest.raises(DataError) as err:
        SupervisedDataset([Source(path)], TOK)
    msg = str(err.value)
    assert msg.startswith("5 bad sample(s) (use --skip-bad-samples to skip them)")
    for line, (_, reason) in enumerate(BAD, start=2):
        assert f"bad.jsonl:{line}: " in msg and reason in msg.splitlines()[line - 1]


def test_skip_bad_samples_counts_them(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": conv()}] + [b for b, _ in BAD])
    ds = SupervisedDataset([Source(path)], TOK, skip_bad_samples=True)
    assert ds.source_counts["bad"] == {"records": 6, "bad": 5, "valid": 1, "sampled": 1}
    assert "skipped 5 bad samples" in caplog.text and "bad.jsonl:3: missing 'conversations'" in caplog.text


def test_malformed_json_array_is_fatal(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"conversations": []},\n {"conversations": [}\n]')
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON"):
        SupervisedDataset([Source(str(tmp_path / "a.json"))], TOK, skip_bad_samples=True)


def test_unreadable_images_are_replaced_then_abort(tmp_path, image_dir, caplog):
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "missing.jpg", "conversations": conv()},
            {"image": "1.jpg", "conversations": conv()}, {"conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, image_failure_grace=5)
    s = ds[1]  # another image sample takes the slot
    assert s["meta"]["id"] in ("a:1", "a:3") and s["image_flags"].tolist() == [1] * len(s["image_flags"])
    assert s["meta"]["skipped"][0].startswith("a:2: ") and "missing.jpg: cannot load image" in s["meta"]["skipped"][0]
    assert ds.stats == {"seen": 2, "image_failures": 1, "too_long": 0, "label_mismatches": 0}
    assert s["meta"]["image_failures"] == 1 and "skipping sample a:2" in caplog.text
    caplog.clear()
    ds.log_problems = False  # train.py: reported by the main process from the batch meta instead
    assert ds[1]["meta"]["image_failures"] == 1 and "skipping" not in caplog.text
    assert ds[1]["meta"]["id"] == s["meta"]["id"]  # the replacement is seeded
    strict = SupervisedDataset([Source(path, str(image_dir))], TOK, image_failure_grace=0, max_image_failure_rate=0.01)
    strict[0]
    with pytest.raises(RuntimeError, match=r"too many unreadable images: 1 of 2 samples seen .*missing.jpg"):
        strict[1]


def test_over_length_samples_are_counted_skips(tmp_path, image_dir):
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "2.jpg", "conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, max_length=400, max_num=6)  # 0.jpg: 7 tiles
    s = ds[0]
    assert s["meta"]["id"] == "a:2" and "image tokens end at position" in s["meta"]["skipped"][0]
    assert ds.stats["too_long"] >= 1


def test_length_estimates(tmp_path, image_dir):
    recs = [{"image": "0.jpg", "image_wh": [640, 480], "conversations": conv()},
            {"image": "0.jpg", "conversations": conv()},
            {"image": "0.jpg", "length": 1234, "conversations": conv()},
            {"conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, max_num=6)
    real = {i: len(ds[i]["input_ids"]) for i in (0, 1, 3)}  # 640x480 -> (3,2)+thumb = cap 6 + thumb = 7 tiles
    assert all(abs(ds.lengths[i] - n) <= 3 for i, n in real.items()), (ds.lengths, real)  # template tokens counted
    assert ds.lengths[2] == 1234
    assert ds.tiles == [7, 7, 7, 0]
    assert ds.is_image == [True, True, True, False]


def test_dataloader_with_workers(tmp_path, image_dir):
    recs = [{"image": f"{k % 3}.jpg", "conversations": conv(a=f"Answer {k}.")} for k in range(6)]
    recs += [{"conversations": conv(a=f"Text {k}.")} for k in range(4)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, max_num=2)
    sampler = LengthGroupedSampler(ds.lengths, ds.is_image, batch_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    ids = []
    for batch in loader:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_flags",
                              "meta"}
        flags = batch["image_flags"].tolist()
        assert len(set(flags)) == 1  # never mixed
        assert batch["pixel_values"].shape[0] == len(flags)
        ids += batch["meta"]["ids"]
    assert sorted(ids) == sorted(f"a:{k}" for k in range(1, 11))
