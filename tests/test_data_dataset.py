"""Sources, repeat ratios, the meta file, build-time validation and load-time skips."""
import json
import os
import random
import shutil
from functools import partial
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DataError, LengthGroupedSampler, SampleTooLong, Source, SupervisedDataset, build_sample, collate,
                  load_tokenizer, read_meta_file)
from data.dataset import read_annotation, repeat_indices
from data.images import header_size

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = load_tokenizer(os.path.join(FIX, "phi3"))
TEMPLATE = "phi3-chat"


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
    _age(d)
    return d


def _age(folder, seconds=3600):
    """Images written a while ago: an index cache stamps a folder changed in the last seconds as never current."""
    past = os.stat(folder).st_mtime - seconds
    os.utime(folder, (past, past))


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
    ds = SupervisedDataset([Source(a, str(image_dir), 0.5), Source(b, None, 1), Source(c, None, 2.5)], TOK, TEMPLATE, seed=3)
    assert {k: v["sampled"] for k, v in ds.source_counts.items()} == {"a": 5, "b": 10, "c": 25}
    assert len(ds) == 40 and sum(ds.is_image) == 5
    picked_c = sorted(k for si, k in ds.index if si == 2)
    assert [picked_c.count(k) for k in range(10)].count(3) == 5  # 2 full copies + half of them once more


def test_json_array_and_meta_file(tmp_path, image_dir):
    records = [{"image": "1.jpg", "conversations": conv()}, {"conversations": conv(a="Text only.")}]
    (tmp_path / "arr.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "l.jsonl", records)
    meta = {"first": {"root": "images", "annotation": "arr.json", "repeat_time": 2, "max_dynamic_patch": 2},
            "second": {"root": "images", "annotation": "l.jsonl", "repeat_time": 0.5, "data_augment": True}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sources = read_meta_file(str(tmp_path / "meta.json"))
    assert [(s.name, s.repeat, s.max_num, s.data_augment) for s in sources] == [
        ("first", 2.0, 2, False), ("second", 0.5, None, True)]
    assert sources[0].image_folder == str(image_dir)
    ds = SupervisedDataset(sources, TOK, TEMPLATE)
    assert len(ds) == 5
    sample = ds[0]  # source "first" keeps at most 2 tiles (+ thumbnail) for its 300x900 image
    assert sample["pixel_values"].shape[0] == 3 and sample["meta"]["id"] == "first:2"
    assert [line for line, *_ in read_annotation(str(tmp_path / "arr.json"))] == [2, 15]


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
    # the image tokens themselves, written in the text, would miscount the image features mid-run
    ({"conversations": conv(a="Tokens like <IMG_CONTEXT> mark features.")},
     "conversations[1] (gpt) holds <IMG_CONTEXT> literally"),
    ({"conversations": conv(q="What does <img> do in HTML?")}, "conversations[0] (human) holds <img> literally"),
    ({"image": "0.jpg", "conversations": conv(q="<image>\nClose it: </img>")}, "holds </img> literally"),
    ({"conversations": conv() + [{"from": "system", "value": "S"}]},
     "conversations[2]: a 'system' turn may only come first"),
]


def test_bad_inputs_reported_together_with_file_line(tmp_path):
    good = {"conversations": conv()}
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + [b for b, _ in BAD] + [good])
    with pytest.raises(DataError) as err:
        SupervisedDataset([Source(path)], TOK, TEMPLATE)
    msg = str(err.value)
    assert msg.startswith("9 bad sample(s) (use --skip-bad-samples to skip them)")
    for line, (_, reason) in enumerate(BAD, start=2):
        assert f"bad.jsonl:{line}: " in msg and reason in msg.splitlines()[line - 1]


def test_skip_bad_samples_counts_them(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": conv()}] + [b for b, _ in BAD])
    ds = SupervisedDataset([Source(path)], TOK, TEMPLATE, skip_bad_samples=True)
    assert ds.source_counts["bad"] == {"records": 10, "bad": 9, "missing_images": 0, "valid": 1, "sampled": 1}
    assert "skipped 9 bad samples" in caplog.text and "bad.jsonl:3: missing 'conversations'" in caplog.text


def test_malformed_json_array_is_fatal(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"conversations": []},\n {"conversations": [}\n]')
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON"):
        SupervisedDataset([Source(str(tmp_path / "a.json"))], TOK, TEMPLATE, skip_bad_samples=True)


@pytest.mark.parametrize("content,message", [
    ('\n\n{"conversations": []}', r"a.json:3: a .json annotation must be an array of records"),
    ('[\n {"conversations": []}\n\n {"conversations": []}]', r"a.json:4: malformed JSON: expected ',' or ']'"),
    (b'[\n{"conversations": "\xff"}]', "a.json:2: not UTF-8"),
])
def test_json_array_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        SupervisedDataset([Source(str(path))], TOK, TEMPLATE, skip_bad_samples=True)


def test_unreadable_images_are_replaced_then_abort(tmp_path, image_dir, caplog):
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")  # exists (the build checks that), does not decode
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "broken.jpg", "conversations": conv()},
            {"image": "1.jpg", "conversations": conv()}, {"conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, image_failure_grace=5)
    s = ds[1]  # another image sample takes the slot
    assert s["meta"]["id"] in ("a:1", "a:3") and s["image_flags"].tolist() == [1] * len(s["image_flags"])
    assert s["meta"]["skipped"][0].startswith("a:2: ") and "broken.jpg: cannot load image" in s["meta"]["skipped"][0]
    assert ds.stats == {"seen": 2, "image_failures": 1, "too_long": 0}
    assert s["meta"]["image_failures"] == 1 and "skipping sample a:2" in caplog.text
    caplog.clear()
    ds.log_problems = False  # train.py: reported by the main process from the batch meta instead
    assert ds[1]["meta"]["image_failures"] == 1 and "skipping" not in caplog.text
    assert ds[1]["meta"]["id"] == s["meta"]["id"]  # the replacement is seeded
    strict = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, image_failure_grace=0, max_image_failure_rate=0.01)
    strict[0]
    with pytest.raises(RuntimeError, match=r"too many unreadable images: 1 of 2 samples seen .*broken.jpg"):
        strict[1]


def test_samples_that_cannot_fit_are_left_out_before_training_and_counted(tmp_path, image_dir, caplog):
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "2.jpg", "conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_length=400, max_num=6)  # 0.jpg: 7 tiles
    assert len(ds) == 1 and ds.adjusted["a"]["too_long"] == 1 and ds.source_counts["a"]["valid"] == 2
    assert ds[0]["meta"]["id"] == "a:2" and not ds[0]["meta"]["skipped"]  # never built, never replaced
    assert re.search(r"left out: 1 of 2 samples cannot fit --max-length 400 even cut: .* \(first: .*a.jsonl:1, "
                     r"which needs \d+\); --max-length \d+ fits them all", caplog.text)


def test_many_samples_that_cannot_fit_are_an_error_saying_what_to_change(tmp_path, image_dir):
    recs = [{"image": "0.jpg", "conversations": conv(a=f"A{i}")} for i in range(12)] + [{"conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    with pytest.raises(DataError, match=r"12 of 13 samples cannot fit --max-length 400 even cut.*first: .*a.jsonl:1, "
                                        r"which needs (\d+)\); --max-length \1 fits them all, fewer tiles "
                                        r"\(--max-tiles\).*--skip-bad-samples leaves out any number") as e:
        SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_length=400, max_num=6)
    need = int(re.search(r"which needs (\d+)", str(e.value)).group(1))
    assert len(SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_length=need, max_num=6)) == 13
    skipped = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_length=400, max_num=6,
                                skip_bad_samples=True)
    assert len(skipped) == 1 and skipped.adjusted["a"]["too_long"] == 12
    only_long = write_jsonl(tmp_path / "b.jsonl", recs[:12])
    with pytest.raises(DataError, match="12 of 12 samples cannot fit .*: no sample would be left"):
        SupervisedDataset([Source(only_long, str(image_dir))], TOK, TEMPLATE, max_length=400, max_num=6,
                          skip_bad_samples=True)


def test_need_is_the_smallest_max_length_a_sample_builds_at(tmp_path, image_dir):
    """The index's `need` (from token counts, before any sample is built) is exact: at need the sample builds
    (cut), at need - 1 it raises SampleTooLong. Image samples, a long question before the answer, and both."""
    recs = [{"image": "0.jpg", "conversations": conv(a="word " * 300)},
            {"conversations": conv(q="question " * 400, a="Yes.")},
            {"image": ["2.jpg", "1.jpg"], "conversations": conv(q="<image> then " * 1 + "<image> " + "why " * 50)},
            {"conversations": conv()}]  # fits: the others are left out
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    for tok, template in ((TOK, TEMPLATE), (load_tokenizer(os.path.join(FIX, "internlm2")), "internlm2-chat")):
        ds = SupervisedDataset([Source(path, str(image_dir))], tok, template, max_length=300, max_num=6,
                               skip_bad_samples=True, index_workers=1)
        x = ds.source_index[0]
        assert (x["need"][:3] > 300).all() and x["need"][3] == 0 and len(ds) == 1
        for k, rec in enumerate(recs[:3]):
            need = int(x["need"][k])
            s = build_sample(rec, tok, template, str(image_dir), max_num=6, max_length=need)
            assert len(s["input_ids"]) == need and s["truncated"]
            with pytest.raises(SampleTooLong):
                build_sample(rec, tok, template, str(image_dir), max_num=6, max_length=need - 1)


def test_cut_answers_and_leading_gpt_turns_are_counted_per_source(tmp_path, image_dir):
    recs = [{"conversations": conv()},
            {"conversations": [{"from": "gpt", "value": "Hello!"}] + conv()},
            {"conversations": conv(a="word " * 300)},
            {"conversations": [{"from": "gpt", "value": "Hi."}] + conv(a="word " * 300)}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, None)], TOK, TEMPLATE, max_length=200)
    c = ds.adjusted["a"]
    assert (c["cut"], c["gpt_first"], c["too_long"]) == (2, 2, 0)
    assert c["first_cut"].endswith("a.jsonl:3") and c["first_gpt_first"].endswith("a.jsonl:2")
    assert [bool(ds[i]["meta"]["truncated"]) for i in range(4)] == [False, False, True, True]


def test_lengths_and_tiles_equal_the_built_samples(tmp_path, image_dir):
    """Text tokens are counted exactly; tiles come from image_wh, else from each image file's header, so lengths
    and tiles equal the built sample's (truncated at max_length too). A record's own "length" is not trusted."""
    Image.new("RGB", (1000, 200), "red").save(image_dir / "wide.jpg")
    Image.new("RGB", (2000, 1500), "blue").save(image_dir / "big.png")
    recs = [{"image": "0.jpg", "image_wh": [640, 480], "conversations": conv()},
            {"image": "1.jpg", "conversations": conv(q="  Two  spaces,\nnew line.", a=" é 中文 ▁ x")},
            {"image": "0.jpg", "length": 12, "conversations": conv()},
            {"conversations": conv() + conv(q="Second turn:\n\n  list", a="Fine.\n- a\n- b")},
            {"image": ["0.jpg", "1.jpg"], "image_wh": [[640, 480], [300, 900]],
             "conversations": conv(q="<image> and <image>")},
            {"image": ["big.png", "1.jpg", "wide.jpg"], "conversations": conv(q="<image>, <image>, <image>?")},
            {"image": "wide.jpg", "image_wh": [1000], "conversations": conv()},  # not a size: the header's
            {"image": "2.jpg", "conversations": conv(a="word " * 2500)},  # cut at max_length
            {"image": "big.png", "conversations": conv(a="Big.")}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    small = dict(image_size=224, tile_tokens=64)  # a model of 224 px tiles: 64 <IMG_CONTEXT> each
    for tok, template, kw in ((TOK, TEMPLATE, {}), (load_tokenizer(os.path.join(FIX, "internlm2")), "internlm2-chat",
                                                   {}), (TOK, TEMPLATE, small)):
        ds = SupervisedDataset([Source(path, str(image_dir))], tok, template, max_num=6, max_length=2100, **kw)
        built = [ds[i] for i in range(len(ds))]
        assert [int((s["input_ids"] == tok.img_context_id).sum()) for s in built if not s["meta"]["truncated"]] == \
            [kw.get("tile_tokens", 256) * int(s["image_flags"].sum()) for s in built if not s["meta"]["truncated"]]
        assert {tuple(s["pixel_values"].shape[-2:]) for s in built} == {(kw.get("image_size", 448),) * 2}
        assert [s["meta"]["id"] for s in built] == [f"a:{k}" for k in range(1, 10)]  # none replaced
        # 300x900: 1x3 + thumbnail (the cap would say 7); 3 images share 6 (cap 2 each): 1 + 3 + 3
        assert ds.tiles.tolist() == [int(s["image_flags"].sum()) for s in built]
        # at 224 px the 448x448 image is 2x2 tiles + thumbnail (the official tie-break prefers the larger grid)
        assert ds.tiles.tolist() == [7, 4, 7, 0, 5, 7, 6, 5 if kw else 1, 7]
        assert ds.lengths.tolist() == [len(s["input_ids"]) for s in built]
        assert [s["meta"]["truncated"] for s in built] == [False] * 7 + [True, False] and ds.lengths[7] == 2100
        assert ds.is_image.tolist() == [True, True, True, False, True, True, True, True, True]
        assert ds.source_index[0]["unread_headers"] == 0


def test_index_counts_the_system_turn(tmp_path, image_dir):
    """A leading system turn is the sample's system message: the index counts its tokens (lengths equal the built
    samples'), and a gpt turn after it is dropped and counted as a leading one."""
    system = {"from": "system", "value": " Answer in one word, please. "}
    recs = [{"conversations": conv()},
            {"conversations": [system] + conv()},
            {"image": "0.jpg", "conversations": [system] + conv()},
            {"image": ["0.jpg", "1.jpg"], "conversations": [system] + conv(q="<image> and <image>")},
            {"conversations": [system, {"from": "gpt", "value": "Hi."}] + conv() + conv(q="Again?")},
            {"conversations": [{"from": "system", "value": ""}] + conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    for case, template in (("phi3", "phi3-chat"), ("internlm2", "internlm2-chat"), ("qwen2", "internvl2_5"),
                           ("llama", "Hermes-2")):
        tok = TOK if case == "phi3" else load_tokenizer(os.path.join(FIX, case))
        ds = SupervisedDataset([Source(path, str(image_dir))], tok, template, max_num=6)
        built = [ds[i] for i in range(len(ds))]
        assert ds.lengths.tolist() == [len(s["input_ids"]) for s in built]
        assert ds.lengths[1] != ds.lengths[0] and ds.lengths[5] < ds.lengths[1]
        if template == "internvl2_5":  # its official code keeps the gpt turn: nothing dropped
            assert ds.adjusted["a"]["gpt_first"] == 0 and ds.adjusted["a"]["first_gpt_first"] is None
        else:
            assert ds.adjusted["a"]["gpt_first"] == 1 and ds.adjusted["a"]["first_gpt_first"].endswith("a.jsonl:5")


def test_index_counts_a_leading_gpt_turn_where_it_is_kept(tmp_path, image_dir):
    """internvl2_5 trains on a leading gpt turn (after an optional system turn): the index counts its tokens
    (lengths equal the built samples', cut at max_length too) and counts none dropped; the other templates drop
    it and count it."""
    hi = {"from": "gpt", "value": "Hi! Ask me anything."}
    recs = [{"conversations": [hi] + conv()},
            {"image": "0.jpg", "conversations": [hi] + conv()},
            {"conversations": [{"from": "system", "value": "Be brief."}, hi] + conv() + conv(q="Again?")},
            {"image": "0.jpg", "conversations": [hi] + conv(q="<image>\nTag?", a="A literal <image> tag.")},
            {"conversations": [{"from": "gpt", "value": "word " * 2500}] + conv()},  # kept: cut at max_length
            {"conversations": conv()}]
    for case, template in (("qwen2", "internvl2_5"), ("internlm2", "internvl2_5"), ("phi3", "phi3-chat")):
        tok = TOK if case == "phi3" else load_tokenizer(os.path.join(FIX, case))
        if template != "internvl2_5":  # the answer's tag is an image there: one too many
            recs[3]["conversations"][-1]["value"] = "No tag."
        path = write_jsonl(tmp_path / "a.jsonl", recs)
        ds = SupervisedDataset([Source(path, str(image_dir))], tok, template, max_num=6, max_length=2100)
        built = [ds[i] for i in range(len(ds))]
        assert ds.lengths.tolist() == [len(s["input_ids"]) for s in built]
        kept = template == "internvl2_5"
        assert (ds.lengths[0] > ds.lengths[5]) == kept and (ds.lengths[4] == 2100) == kept
        assert [s["meta"]["truncated"] for s in built] == [False] * 4 + [kept, False]
        assert [s["meta"]["gpt_first"] for s in built] == [not kept] * 5 + [False]
        assert ds.adjusted["a"]["gpt_first"] == (0 if kept else 5)


def test_unreadable_image_headers_fall_back_to_the_cap(tmp_path, image_dir, monkeypatch, caplog):
    """An image whose header cannot be read is charged the cap (+ thumbnail), an upper bound, and counted; the
    build goes on, and the image is reported when its sample is built, like any unreadable image."""
    from data import dataset
    data = (image_dir / "0.jpg").read_bytes()
    (image_dir / "cut.jpg").write_bytes(data[:100])  # the header is cut
    (image_dir / "text.jpg").write_text("not an image")
    _age(image_dir)  # written a while ago: the warm build below trusts its cache
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "cut.jpg", "conversations": conv()},
            {"image": ["1.jpg", "text.jpg"], "conversations": conv(q="<image><image>")},
            {"image": "0.jpg", "conversations": conv(a="Again.")}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    reads = []
    monkeypatch.setattr(dataset, "header_size", lambda p: reads.append(os.path.basename(p)) or header_size(p))
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_num=6, cache_dir=str(tmp_path / "c"))
    assert sorted(reads) == ["0.jpg", "1.jpg", "cut.jpg", "text.jpg"]  # once per path
    warm = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_num=6, cache_dir=str(tmp_path / "c"))
    assert len(reads) == 4 and warm.source_index[0]["unread_headers"] == 2
    assert ds.tiles.tolist() == [7, 7, 4 + 4, 7]  # 640x480: 3x2 + 1; cut: the cap + 1; 1.jpg exact + the cap 3 + 1
    assert ds.source_index[0]["unread_headers"] == 2
    assert "a.jsonl: 2 record(s) with an image whose header cannot be read (first: line 2)" in caplog.text
    for i in (1, 2):
        s = ds[i]  # replaced by the other image samples, as before
        assert s["meta"]["id"] in ("a:1", "a:4") and "cannot load image" in s["meta"]["skipped"][0]
        assert int(s["image_flags"].sum()) <= ds.tiles[i] and len(s["input_ids"]) <= ds.lengths[i]


def test_dataloader_with_workers(tmp_path, image_dir):
    recs = [{"image": f"{k % 3}.jpg", "conversations": conv(a=f"Answer {k}.")} for k in range(6)]
    recs += [{"conversations": conv(a=f"Text {k}.")} for k in range(4)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_num=2)
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


# ---------------------------------------------------------------- index: cache, image files, scale


def _big(tmp_path, n, bad_every=0):
    recs = [{"image": f"{k % 3}.jpg", "conversations": conv(a=f"Answer number {k}.")} if k % 4 else
            {"conversations": conv(a=f"Text {k}.")} for k in range(n)]
    for k in range(0, n, bad_every) if bad_every else ():
        recs[k] = '{"conversations": [' if k % 2 else {"conversations": [{"from": "bot", "value": "x"}]}
    return write_jsonl(tmp_path / "big.jsonl", recs)


def test_every_bad_line_is_reported_in_one_error(tmp_path, image_dir):
    path = _big(tmp_path, 3700, bad_every=100)  # 37 bad lines
    with pytest.raises(DataError) as err:
        SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE)
    msg = str(err.value)
    assert msg.startswith("37 bad sample(s)") and "more" not in msg
    assert [int(l.split(":")[1]) for l in msg.splitlines()[1:]] == list(range(1, 3602, 100))
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, skip_bad_samples=True)
    assert ds.source_counts["big"] == {"records": 3700, "bad": 37, "missing_images": 0, "valid": 3663,
                                       "sampled": 3663}


def test_index_workers_build_the_serial_index(tmp_path, image_dir, monkeypatch, caplog):
    """Records checked by forked index workers, many chunks each: the same index, counts and problems (every
    bad line, in file order) as one process, with bad JSON, bad records, missing and unreadable images."""
    import numpy as np

    from data import dataset
    monkeypatch.setattr(dataset, "_SCAN_CHUNK", 97)
    (image_dir / "cut.jpg").write_bytes((image_dir / "0.jpg").read_bytes()[:100])
    path = _big(tmp_path, 1500, bad_every=100)
    with open(path, "a") as f:
        for k in range(20):
            f.write(json.dumps({"image": "gone.jpg" if k % 2 else "cut.jpg", "conversations": conv()}) + "\n")
    built = {}
    for workers in (1, 3):
        ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, skip_bad_samples=True,
                               index_workers=workers)
        built[workers] = ds.source_index[0]
    serial, parallel = built[1], built[3]
    assert serial["records"] == 1520 and serial["bad"] == 15 + 10 and serial["missing_images"] == 10
    assert serial["unread_headers"] == 10 and len(serial["line"]) == 1520 - 25
    for key, value in serial.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == parallel[key].dtype and np.array_equal(value, parallel[key]), key
        else:
            assert value == parallel[key], key
    assert caplog.text.count("10 record(s) with an image whose header cannot be read (first: line 1501)") == 2
    with pytest.raises(DataError, match="15 bad sample"):  # without the skip: the error of a serial build
        SupervisedDataset([Source(_big(tmp_path, 1500, bad_every=100), str(image_dir))], TOK, TEMPLATE,
                          index_workers=3)
    (tmp_path / "a.json").write_text('[\n {"conversations": []},\n {"conversations": [}\n]')
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON"):  # raised while the workers run
        SupervisedDataset([Source(str(tmp_path / "a.json"))], TOK, TEMPLATE, index_workers=2)
    parent, scan = os.getpid(), SupervisedDataset._scan_records

    def dies_in_a_worker(self, si, chunk, memo):
        if os.getpid() != parent and chunk[0][0] > 500:
            os._exit(9)  # as the out-of-memory killer would end it
        return scan(self, si, chunk, memo)
    monkeypatch.setattr(SupervisedDataset, "_scan_records", dies_in_a_worker)
    with pytest.raises(RuntimeError, match="big.jsonl: an index worker died .* --index-workers 1"):
        SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, skip_bad_samples=True, index_workers=2)


def test_missing_image_files_are_found_at_build_with_counts(tmp_path, image_dir):
    recs = [{"image": "0.jpg", "conversations": conv()}, {"image": "gone.jpg", "conversations": conv()},
            {"image": ["1.jpg", "sub/x.jpg"], "conversations": conv(q="<image><image>")}, {"conversations": conv()}]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    with pytest.raises(DataError) as err:
        SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE)
    msg = str(err.value)
    assert msg.startswith(f"2 bad sample(s) (use --skip-bad-samples to skip them); missing image files: "
                          f"{{'a': '2 of 4 records under {image_dir}'}}:")
    assert f"a.jsonl:2: image file not found: {image_dir}/gone.jpg" in msg
    assert f"a.jsonl:3: image file not found: {image_dir}/sub/x.jpg" in msg
    with pytest.raises(DataError, match=r"missing image files: \{'a': '3 of 4 records under"):  # folder not given
        SupervisedDataset([Source(path)], TOK, TEMPLATE)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, skip_bad_samples=True)
    assert ds.source_counts["a"] == {"records": 4, "bad": 2, "missing_images": 2, "valid": 2, "sampled": 2}


def test_index_cache_is_reused_and_rebuilt_when_anything_changes(tmp_path, image_dir, monkeypatch):
    path = _big(tmp_path, 200)
    cache = str(tmp_path / "cache")
    scans = []
    scan = SupervisedDataset._scan
    monkeypatch.setattr(SupervisedDataset, "_scan", lambda self, si: scans.append(si) or scan(self, si))
    cold = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache)
    warm = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache)
    assert len(scans) == 1 and len(os.listdir(cache)) == 1
    for c in ("lengths", "tiles", "is_image", "index"):
        assert getattr(warm, c).tolist() == getattr(cold, c).tolist()
    assert warm[5]["input_ids"].tolist() == cold[5]["input_ids"].tolist()
    SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache, max_num=4)  # another tile cap
    SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache, system_message="Hi.")
    SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache, tile_tokens=64)
    SupervisedDataset([Source(path, str(image_dir))], load_tokenizer(os.path.join(FIX, "internlm2")), "internlm2-chat",
                      cache_dir=cache)
    assert len(scans) == 5
    with open(path, "a") as f:  # the same path, new content: rebuilt, never reused
        f.write(json.dumps({"conversations": conv(a="One more.")}) + "\n")
    changed = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache)
    assert len(scans) == 6 and len(changed) == 201
    other_rank = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, index=changed.source_index)
    assert len(scans) == 6 and other_rank.lengths.tolist() == changed.lengths.tolist()
    from data import dataset
    monkeypatch.setattr(dataset, "INDEX_VERSION", dataset.INDEX_VERSION - 1)  # a cache an older version wrote
    SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache)
    assert len(scans) == 7  # another key: an index built another way is never read back


def test_index_cache_follows_the_image_files(tmp_path, image_dir, monkeypatch):
    """The cache is stale once an image folder it looked in changed (an image added or removed), and keyed by the
    working directory when the image paths are relative to it: a missing image that appears is found, one that
    goes is reported; a folder changed moments before it was listed is never trusted."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"image": f"{k}.jpg", "conversations": conv()} for k in range(4)])
    cache = str(tmp_path / "cache")
    build = partial(SupervisedDataset, [Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=cache)
    scans = []
    scan = SupervisedDataset._scan
    monkeypatch.setattr(SupervisedDataset, "_scan", lambda self, si: scans.append(si) or scan(self, si))
    assert build(skip_bad_samples=True).source_counts["a"]["valid"] == 3  # 3.jpg is missing
    assert build(skip_bad_samples=True).source_counts["a"]["valid"] == 3 and len(scans) == 1  # reused
    shutil.copy(image_dir / "0.jpg", image_dir / "3.jpg")  # added after the run
    assert build().source_counts["a"]["valid"] == 4 and len(scans) == 2  # no "bad sample": it exists
    assert build().source_counts["a"]["valid"] == 4 and len(scans) == 3  # listed moments after it changed
    _age(image_dir)
    assert build().source_counts["a"]["valid"] == 4 and len(scans) == 4  # stamped now
    assert build().source_counts["a"]["valid"] == 4 and len(scans) == 4  # reused while nothing changes
    os.remove(image_dir / "1.jpg")
    with pytest.raises(DataError, match=r"a.jsonl:2: image file not found: .*1.jpg"):
        build()
    # no image folder: the paths resolve against the working directory, which keys the cache
    rel = write_jsonl(tmp_path / "rel.jsonl", [{"image": "images/0.jpg", "conversations": conv()}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    assert SupervisedDataset([Source(rel)], TOK, TEMPLATE, cache_dir=cache).source_counts["rel"]["valid"] == 1
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError, match="image file not found: images/0.jpg"):
        SupervisedDataset([Source(rel)], TOK, TEMPLATE, cache_dir=cache)


def test_a_corrupt_index_cache_is_rebuilt(tmp_path, image_dir, monkeypatch, caplog):
    """A truncated or corrupt cache file is a miss (rebuilt and rewritten), never a crash; the file is synced
    before it is renamed into place."""
    path = _big(tmp_path, 50)
    cache = tmp_path / "cache"
    synced, replace = [], os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(os, "replace", lambda a, b: synced.append(("replace", str(a))) or replace(a, b))
    cold = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=str(cache))
    [npz] = cache.glob("*.npz")
    assert synced == [synced[0], ("replace", synced[0])] and synced[0].endswith(".tmp.npz")
    for damage in (lambda b: b[:len(b) // 2], lambda b: b[:100] + b"\0" * 64 + b[164:], lambda b: b""):
        npz.write_bytes(damage(npz.read_bytes()))
        again = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, cache_dir=str(cache))
        assert again.lengths.tolist() == cold.lengths.tolist() and "unreadable" in caplog.text
        assert np.load(npz)["length"].size == 50  # rewritten whole


def test_records_are_read_from_the_file_not_held(tmp_path, image_dir):
    path = _big(tmp_path, 400)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE)
    assert not hasattr(ds, "records")
    held = sum(a.nbytes for a in (ds.index, ds.lengths, ds.tiles, ds.is_image))
    held += sum(x[c].nbytes for x in ds.source_index for c in ("offset", "nbytes", "line", "length", "tiles"))
    assert held < 0.5 * os.path.getsize(path)
    lines = open(path).read().splitlines()
    assert ds.record(7) == json.loads(lines[7]) and ds.sample_id(7) == "big:8"


def test_jpeg_augmentation_varies_with_the_epoch_reproducibly(tmp_path, image_dir):
    Image.effect_noise((448, 448), 60).convert("RGB").save(image_dir / "noise.png")  # JPEG quality shows on noise
    path = write_jsonl(tmp_path / "a.jsonl", [{"image": "noise.png", "conversations": conv()}])
    src = Source(path, str(image_dir), data_augment=True)

    def pixels(epoch):
        ds = SupervisedDataset([src], TOK, TEMPLATE, max_num=1, seed=5)
        ds.set_epoch(epoch)
        return ds[0]["pixel_values"]

    # epoch 0 and 2 both draw another JPEG quality than epoch 1 with this seed
    assert not torch.equal(pixels(0), pixels(1)) and not torch.equal(pixels(1), pixels(2))
    assert torch.equal(pixels(1), pixels(1))  # reproducible: a resumed run (set_epoch(1) first) sees the same


def test_packs_from_estimates_stay_within_budget_when_images_are_smaller(tmp_path, image_dir):
    """Estimates above the built samples (here: images made smaller after the index was built; or the cap for an
    unreadable header): packs planned with them never exceed the token or tile budget once built, and cover every
    sample once."""
    from data.packing import PackedBatchSampler, collate_packed
    recs = [{"image": f"{k % 3}.jpg", "conversations": conv(a="word " * (1 + k % 7))} for k in range(18)]
    recs += [{"conversations": conv(a="text " * k)} for k in range(1, 7)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = SupervisedDataset([Source(path, str(image_dir))], TOK, TEMPLATE, max_num=6)
    for k in range(2):  # 640x480 (7 tiles) and 300x900 (4 tiles) become 1-tile images
        Image.new("RGB", (448, 448), "green").save(image_dir / f"{k}.jpg")
    sampler = PackedBatchSampler(ds.lengths, 2048, tiles=ds.tiles, max_tiles=15, seed=1, window=8)
    seen = []
    for pack in sampler:
        out = collate_packed([ds[i] for i in pack], max_tokens=2048)
        assert out["input_ids"].shape[1] <= 2048 and int(out["image_flags"].sum()) <= 15
        assert out["meta"]["over_budget"] == 0
        seen += out["meta"]["ids"]
    assert sorted(seen) == sorted(f"a:{k}" for k in range(1, 25))
    assert any(int(ds.tiles[i]) > int(ds[i]["image_flags"].sum()) for i in range(18))  # estimates were off


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_json_array_read_in_blocks_of_any_size(tmp_path, monkeypatch, block):
    """A .json array is decoded a block at a time: records, lines, byte ranges and errors are those of the whole
    file at once, whatever the block size (multi-byte characters and records cut by block ends)."""
    from data import dataset
    records = [{"conversations": conv(q=f"问题 {k} é?", a=f"回答 {k} — ünïcode." * k)} for k in range(6)]
    path = tmp_path / "u.json"
    text = json.dumps(records, indent=None if block == 5 else 1, ensure_ascii=False)  # one line, or many
    path.write_text("  \n\n" + text + "\n \n", encoding="utf-8")
    whole = list(read_annotation(str(path)))  # the default block holds the whole file
    monkeypatch.setattr(dataset, "_JSON_BLOCK", block)
    assert list(read_annotation(str(path))) == whole and [r for *_, r in whole] == records
    data = path.read_bytes()
    assert [json.loads(data[o:o + n]) for _, o, n, _ in whole] == records
    for content, message in [  # the messages of the whole-file reader
            (b'[\n {"a": 1},\n {"a": 2}\n\n {"a": 3}]', r"a.json:5: malformed JSON: expected"),
            (b'[\n {"a": 1},\n {"a": [}\n]', r"a.json:3: malformed JSON: Expecting value \(column 9\)"),
            (b'[{"a": 1}, {"a": 2}, {"a": [}]', r"a.json:1: malformed JSON: Expecting value \(column 29\)"),
            (b'[\n{"a": "\xc3\xa9"},\n{"a": "\xff"}]', "a.json:3: not UTF-8"),
            (b'\n\n\n {"a": 1}', "a.json:4: a .json annotation must be an array")]:
        (tmp_path / "a.json").write_bytes(content)
        with pytest.raises(DataError, match=message):
            list(read_annotation(str(tmp_path / "a.json")))


def test_one_line_json_array_is_read_in_bounded_text(tmp_path, monkeypatch):
    """json.dump(list) writes no newline: the reader still forgets the text it has consumed, so it holds a few
    blocks whatever the file size (each record then costs the same, one line or indented; holding the whole
    file made every record rescan it) and reads the same records as from the indented file."""
    from data import dataset
    records = [{"conversations": conv(q=f"Question {k}?", a="Answer." * (k % 7 + 1))} for k in range(3000)]
    (tmp_path / "one.json").write_text(json.dumps(records))
    (tmp_path / "indented.json").write_text(json.dumps(records, indent=1))
    block, held = 256, []
    more = dataset._Blocks.more

    def counted(self):
        grew = more(self)
        held.append(len(self.text))
        return grew
    monkeypatch.setattr(dataset, "_JSON_BLOCK", block)
    monkeypatch.setattr(dataset._Blocks, "more", counted)
    lines = {}
    for name in ("one.json", "indented.json"):
        held.clear()
        got = list(read_annotation(str(tmp_path / name)))
        assert [r for *_, r in got] == records
        longest = max(n for _, _, n, _ in got)
        assert len(held) > 100 and max(held) <= 3 * block + longest, (name, max(held))
        lines[name] = [line for line, *_ in got]
    assert set(lines["one.json"]) == {1} and lines["indented.json"][-1] > 3000


def test_json_array_with_non_ascii_text_is_read_back_by_byte_offset(tmp_path):
    records = [{"conversations": conv(q=f"问题 {k} é?", a=f"回答 {k} — ünïcode.")} for k in range(5)]
    (tmp_path / "u.json").write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    ds = SupervisedDataset([Source(str(tmp_path / "u.json"))], TOK, TEMPLATE)
    assert [ds.record(i) for i in range(5)] == records
    assert [ds.sample_id(i) for i in range(5)] == [f"u:{2 + 12 * k}" for k in range(5)]
