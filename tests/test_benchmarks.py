"""chat.py --benchmark end to end on the demo model: a tiny file per official input format (VQA jsonl with and
without the official annotation file, POPE jsonl + label folder, ScienceQA jsonl, MMBench TSV) built here, the
official prompts, per-item scores equal to metrics.py's on the written answers, the official results files, and
batched answers equal to one by one."""
import base64
import dataclasses
import re
import json
import os
import zipfile

import pytest
import torch

import benchmarks
import chat
import metrics
from data import load_tokenizer
from model import load_pretrained

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def short_answers(monkeypatch):
    """The random demo model never stops: the CLI tests cap the official 100-token answers at 12 tokens (the
    table itself is checked against the official values in test_table_is_the_official_one)."""
    table = {b.name: dataclasses.replace(b, max_new_tokens=min(b.max_new_tokens, 12)) for b in
             benchmarks.BENCHMARKS}
    official = benchmarks.get_benchmark
    monkeypatch.setattr(benchmarks, "get_benchmark", lambda name: table[name] if name in table else
                        official(name))


def test_table_is_the_official_one():
    """Prompt suffix, max_new_tokens, metric, --max-num and results-file fields of every row equal the official
    scripts' (recorded in cases.json), and every official benchmark has a row."""
    official = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "metrics", "cases.json")))
    official = official["benchmarks"]
    assert {b.name for b in benchmarks.BENCHMARKS} == set(official)
    for b in benchmarks.BENCHMARKS:
        o = official[b.name]
        assert (b.prompt, b.max_new_tokens, b.metric) == (o["prompt_suffix"], o["max_new_tokens"], o["metric"])
        args = " ".join(o["readme_args"].values()).split()
        assert b.max_num == (int(args[args.index("--max-num") + 1]) if "--max-num" in args else 6), b.name
        assert list(benchmarks.RESULT_FIELDS[b.results]) == [f.split(" ")[0] for f in o["output_record_fields"]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    base, _, folder = make_demo(str(tmp_path_factory.mktemp("demo") / "demo"), n_images=8, text_only=4)
    images = sorted(f"images/{f}" for f in os.listdir(os.path.join(folder, "images")) if f.startswith("eval_"))
    return dict(dir=base, folder=folder, images=images[:5], model=load_pretrained(base, dtype=torch.float32),
                tokenizer=load_tokenizer(base))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def rows(path):
    return [json.loads(line) for line in open(path)]


def cli(demo, tmp_path, name, data, *extra):
    out = tmp_path / f"{name}.jsonl"
    assert chat.main([demo["dir"], "--benchmark", name, "--data", data, "--output", str(out), *extra]) == 0
    return rows(out)


def vqa_file(demo, tmp_path, answers):
    qs = ["What colour is the shape?", "What shape is in the picture?", "Where is the shape?", "Describe it.",
          "Is it red?"]
    return write_jsonl(tmp_path / "vqa.jsonl", [
        dict(image=img, question=q, question_id=100 + k, answer=answers(k)) for k, (img, q) in
        enumerate(zip(demo["images"], qs))] + [dict(image="images/missing.png", question="Q?", question_id=7)])


def test_vqa_accuracy_with_the_official_annotation_file(demo, tmp_path, capsys):
    """vqav2_val: question + ' ' + the official prompt; references from the annotation file by question_id; an
    item whose 10 answers are the model's own answer scores 1.0, the aggregate is the mean."""
    data = vqa_file(demo, tmp_path, lambda k: "blue")
    first = cli(demo, tmp_path, "vqav2_val", f"{data},{demo['folder']}")
    assert first[0]["question"] == "What colour is the shape? Answer the question using a single word or phrase."
    assert "missing.png" in first[-1]["error"] and "answer" not in first[-1]
    assert all("score" not in r for r in first)  # the jsonl's single answer is no set of 10 references
    mine = first[0]["answer"]
    ann = {"annotations": [{"question_id": 100 + k, "answers": [{"answer": mine if k == 0 else "zebra"}] * 10}
                           for k in range(5)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    capsys.readouterr()
    again = cli(demo, tmp_path, "vqav2_val", f"{data},{demo['folder']}", "--annotation", str(tmp_path / "ann.json"))
    out = capsys.readouterr().out
    assert [r.get("answer") for r in again] == [r.get("answer") for r in first]
    assert again[0]["score"] == 1.0 and again[0]["references"] == [mine] * 10
    for r in again[:5]:
        assert r["score"] == metrics.item_score("vqa_score", {"prediction": r["answer"], "references": r["references"]})
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["score"] == {"accuracy": sum(r["score"] for r in again[:5]) / 5}
    assert f"vqav2_val {summary['score']['accuracy']}" in out and summary["errors"] == 1
    results = json.load(open(tmp_path / "vqav2_val.results.json"))  # the official results file
    assert [list(r) for r in results] == [["question", "question_id", "answer"]] * 5


def test_docvqa_anls_and_test_split_submission(demo, tmp_path, capsys):
    data = vqa_file(demo, tmp_path, lambda k: ["blue", "Blue."] if k % 2 else "circle")
    got = cli(demo, tmp_path, "docvqa_val", f"{data},{demo['folder']}")
    for r in got[:5]:
        assert r["score"] == metrics.anls(r["answer"], r["answers"])
    assert "Overall ANLS: " in capsys.readouterr().out
    cli(demo, tmp_path, "docvqa_test", f"{data},{demo['folder']}")
    out = capsys.readouterr().out
    assert "the benchmark server scores" in out
    results = json.load(open(tmp_path / "docvqa_test.results.json"))
    assert [sorted(r) for r in results] == [["answer", "questionId"]] * 5
    assert [r["questionId"] for r in results] == [100, 101, 102, 103, 104]


def test_pope_labels_from_the_official_folder(demo, tmp_path, capsys):
    cats = ["adversarial", "random", "adversarial", "random", "random"]
    data = write_jsonl(tmp_path / "pope.jsonl", [
        dict(question_id=k, image=os.path.basename(img), category=c,
             text=f"Is there a {s} in the image?\nAnswer the question using a single word or phrase.")
        for k, (img, c, s) in enumerate(zip(demo["images"], cats, ["circle", "dog", "square", "cat", "shape"]))])
    labels = tmp_path / "coco"
    labels.mkdir()
    write_jsonl(labels / "coco_pope_adversarial.json", [{"label": "yes"}, {"label": "no"}])
    write_jsonl(labels / "coco_pope_random.json", [{"label": "no"}, {"label": "yes"}, {"label": "yes"}])
    got = cli(demo, tmp_path, "pope", f"{data},{os.path.join(demo['folder'], 'images')}", "--annotation",
              str(labels))
    assert [r["label"] for r in got] == ["yes", "no", "no", "yes", "yes"]  # k-th of its category
    assert got[0]["question"] == "Is there a circle in the image?\nAnswer the question using a single word or phrase."
    for r in got:
        assert r["score"] == float(metrics.pope_parse(r["answer"]) == r["label"])
    out = capsys.readouterr().out
    cases = [dict(prediction=r["answer"], label=r["label"], category=r["category"]) for r in got]
    try:
        assert metrics.aggregate("pope", cases)["printed_overall"] in out
    except metrics.MetricError as e:  # a random model may answer 'no' throughout: the official code divides by 0
        assert str(e) in out
    results = json.load(open(tmp_path / "pope.results.json"))
    assert list(results[0]) == ["question_id", "text", "text_orig", "model_id", "metadata"]


def test_scienceqa_question_and_letter_extraction(demo, tmp_path, capsys):
    recs = [dict(image=img, hint="Look at the picture." if k % 2 else "", question="Which shape is it?",
                 choices=["circle", "square", "triangle"][: 2 + k % 2], answer=k % 2) for k, img in
            enumerate(demo["images"][:4])]
    recs.append(dict(image=demo["images"][0], hint="", question="Q", choices=list("abcdef"), answer=0))
    got = cli(demo, tmp_path, "sqa_test", write_jsonl(tmp_path / "sqa.jsonl", recs) + f",{demo['folder']}")
    assert got[0]["question"] == ("Which shape is it?\nA. circle\nB. square\nAnswer with the option's letter "
                                  "from the given choices directly.")
    assert got[1]["question"].startswith("Look at the picture.\nWhich shape is it?\nA. circle")
    assert "6 choices" in got[4]["error"] and got[4]["error"].startswith(str(tmp_path / "sqa.jsonl:5: "))
    for r, rec in zip(got[:4], recs):
        options = dict(zip("ABC", rec["choices"]))
        assert r["extracted"] == metrics.choice_letter(r["answer"], options, scienceqa=True)
        assert r["score"] == float(r["extracted"] == "AB"[rec["answer"]])
    assert f"Acc@1: {sum(r['score'] for r in got[:4]) / 4}" in capsys.readouterr().out


def png_b64(path):
    return base64.b64encode(open(path, "rb").read()).decode()


def mmbench_tsv(demo, tmp_path, with_answer=True):
    head = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    lines = ["\t".join(head if with_answer else [h for h in head if h != "answer"])]
    for k, img in enumerate(demo["images"][:4]):
        cells = [str(10 + k), "Which shape is it?", "A hint" if k == 1 else "", "circle", "square",
                 "triangle" if k % 2 else "", "", "B", "cat", png_b64(os.path.join(demo["folder"], img)), "src",
                 "l2", "", "dev"]
        if not with_answer:
            del cells[7]
        lines.append("\t".join(cells))
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_mmbench_tsv_and_xlsx_submission(demo, tmp_path, capsys):
    got = cli(demo, tmp_path, "mmbench_dev_en_20231003", mmbench_tsv(demo, tmp_path))
    assert got[0]["question"] == ("Which shape is it?\nA. circle\nB. square\nAnswer with the option's letter "
                                  "from the given choices directly.")
    assert got[1]["question"] == ("A hint\nWhich shape is it?\nA. circle\nB. square\nC. triangle\nAnswer with "
                                  "the option's letter from the given choices directly.")
    for r in got:
        assert r["extracted"] == metrics.choice_letter(r["answer"], {"A": "circle", "B": "square"}, False) or \
            "C" in r["question"]
        assert r["score"] == float(r["extracted"] == "B")
    assert "plain accuracy" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "mmbench_dev_en_20231003.xlsx") as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
    first = re.findall(r"<t xml:space=\"preserve\">(.*?)</t>", sheet.split("</row>")[0])
    assert first == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]  # as official
    second = re.findall(r"<v>(.*?)</v>|<t xml:space=\"preserve\">(.*?)</t>", sheet.split("</row>")[1])
    assert [a or b for a, b in second] == ["10", "Which shape is it?", "circle", "square", got[0]["extracted"],
                                           "B", "dev"]  # NaN cells empty, the index a number
    assert sheet.count("<row ") == 5
    # the test split has no answer column: answers and the submission, no score
    got = cli(demo, tmp_path, "mmbench_test_en_20231003", mmbench_tsv(demo, tmp_path, with_answer=False))
    assert all("score" not in r and "extracted" in r for r in got)
    assert "the benchmark server scores" in capsys.readouterr().out


def test_batched_equals_one_by_one(demo, tmp_path):
    """Batches of 3 (longest first) give every item the answer it gets alone."""
    bench = benchmarks.get_benchmark("docvqa_val")
    data = vqa_file(demo, tmp_path, lambda k: "blue")
    items = benchmarks.read_items(bench, f"{data},{demo['folder']}")
    m, tok = demo["model"], demo["tokenizer"]
    one = benchmarks.run(m, tok, bench, items, str(tmp_path / "one.jsonl"), batch_size=1, progress=False)
    three = benchmarks.run(m, tok, bench, items, str(tmp_path / "three.jsonl"), batch_size=3, progress=False)
    assert rows(tmp_path / "one.jsonl") == rows(tmp_path / "three.jsonl")
    assert one["score"] == three["score"] and one["answered"] == 5 and one["new_tokens"] > 5


def test_compare_prints_base_finetuned_delta(demo, tmp_path, capsys):
    data = vqa_file(demo, tmp_path, lambda k: "blue")
    cli(demo, tmp_path, "gqa_testdev_llava", f"{data},{demo['folder']}", "--compare", demo["dir"])
    out = capsys.readouterr().out
    table = out[out.index("gqa_testdev_llava     "):].splitlines()
    assert table[0].split() == ["gqa_testdev_llava", "base", "fine-tuned", "delta"]
    name, base, tuned, delta = table[1].split()
    assert name == "accuracy" and base == tuned and float(delta) == 0.0  # the same model on both sides
    assert rows(tmp_path / "gqa_testdev_llava.base.jsonl") == rows(tmp_path / "gqa_testdev_llava.jsonl")


def test_bad_input_is_named_before_the_model_loads(demo, tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'.*textvqa_val"):
        chat.main([demo["dir"], "--benchmark", "nope", "--data", "x.jsonl", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such file"):
        chat.main([demo["dir"], "--benchmark", "textvqa_val", "--data", str(tmp_path / "none.jsonl"),
                   "--output", str(tmp_path / "o")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "question": "Q"}])
    (tmp_path / "bad.jsonl").write_text((tmp_path / "bad.jsonl").read_text() + "{oops\n")
    items = benchmarks.read_items(benchmarks.get_benchmark("textvqa_val"), bad)
    assert items[0].error.endswith("bad.jsonl:1: no 'question_id' field")
    assert "bad.jsonl:2: malformed JSON" in items[1].error


def test_min_new_tokens_bars_the_terminator_at_first(demo):
    """The official scripts generate with min_new_tokens=1: a terminator as the first pick is replaced by the
    next-best token (HF's MinNewTokensLengthLogitsProcessor)."""
    m, tok = demo["model"], demo["tokenizer"]
    ids = torch.tensor([tok.encode("Hello there")])
    first = int(m.generate(ids, max_new_tokens=1)[0, 0])
    alone = m.generate(ids, max_new_tokens=4, eos_token_id=first)
    barred = m.generate(ids, max_new_tokens=4, eos_token_id=first, min_new_tokens=1)
    assert alone[0].tolist() == [first]  # stops at once
    assert int(barred[0, 0]) != first and barred.shape[1] >= 2
    logits = m.generate(ids, max_new_tokens=1, output_logits=True)[1][0, 0]
    assert int(barred[0, 0]) == int(logits.topk(2).indices[1])


def test_mmbench_columns_read_as_pandas_does(tmp_path):
    """A column of whole numbers with an empty cell is float64 in pandas ('3' -> '3.0' in the question), a full
    one int64; the strings 'None' and 'NA' are NaN; a question id missing from a VQA annotation file is a per-item
    score error (the official scorer raises KeyError)."""
    head = "index\tquestion\thint\tA\tB\tC\tanswer\timage"
    body = ["1\tHow many?\tNone\t3\t4\t\tA\t" + "x" * 300_000, "2\tHow many?\tA hint\t5\t6\t7\tB\tx"]
    (tmp_path / "m.tsv").write_text("\n".join([head] + body) + "\n")
    items = benchmarks.read_items(benchmarks.get_benchmark("mmbench_dev_en_20231003"), str(tmp_path / "m.tsv"))
    assert items[0].question.startswith("How many?\nA. 3\nB. 4\nAnswer")  # hint 'None' is NaN; C absent
    assert items[1].question.startswith("A hint\nHow many?\nA. 5\nB. 6\nC. 7.0\nAnswer")
    assert items[0].case == {"options": {"A": 3, "B": 4}, "answer": "A"} and items[0].id == "1"
    bench = benchmarks.get_benchmark("textvqa_val")
    data = write_jsonl(tmp_path / "v.jsonl", [dict(image="a.png", question="Q", question_id=k) for k in (1, 2)])
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "a"}] * 10}]}))
    items = benchmarks.read_items(bench, data, str(tmp_path / "ann.json"))
    rows = [{"id": "1", "answer": "a"}, {"id": "2", "answer": "a"}]
    assert benchmarks.score_rows(bench, items, rows) == {"accuracy": 1.0}
    assert rows[0]["score"] == 1.0 and "2 is not in the annotation file" in rows[1]["score_error"]


def test_mpdocvqa_pages_share_the_tile_budget(demo, tmp_path, capsys):
    """MP-DocVQA: pages FOLDER/ID.jpg, each tiled with max(1, min(18, 64 // pages)); 'Image-i: <image>\\n' per
    page in front when there is more than one tile in all; ANLS against the file's answers."""
    from PIL import Image
    pages = tmp_path / "pages"
    pages.mkdir()
    for k, img in enumerate(demo["images"][:3]):
        Image.open(os.path.join(demo["folder"], img)).convert("RGB").save(pages / f"p{k}.jpg")
    Image.open(os.path.join(demo["folder"], demo["images"][0])).resize((1800, 450)).convert("RGB").save(
        pages / "wide.jpg")
    data = tmp_path / "val.json"
    data.write_text(json.dumps({"data": [
        dict(questionId=1, question="What colour?", page_ids=["p0", "p1"], answers=["red"]),
        dict(questionId=2, question="What shape?", page_ids=["p2"], answers=["circle", "a circle"]),
        dict(questionId=3, question="Which side?", page_ids=["wide"], answers=["left"]),
        dict(questionId=4, question="Gone?", page_ids=["nope"], answers=["x"])]}))
    got = cli(demo, tmp_path, "mpdocvqa_val", f"{data},{pages}")
    short = "Answer the question using a single word or phrase."
    from data.images import load_image
    tiles = [chat.image_to_pixel_values(load_image(str(pages / f"{p}.jpg")), demo["model"].config, 18).shape[0]
             for p in ("p0", "p2", "wide")]
    assert tiles[2] > 1  # a wide page is tiled: the prefix appears for a single page too
    assert got[0]["question"] == f"Image-1: <image>\nImage-2: <image>\nWhat colour? {short}"
    assert got[1]["question"] == (f"What shape? {short}" if tiles[1] == 1 else
                                  f"Image-1: <image>\nWhat shape? {short}")
    assert got[2]["question"] == f"Image-1: <image>\nWhich side? {short}"
    assert "nope.jpg" in got[3]["error"]
    for r in got[:3]:
        assert r["score"] == metrics.anls(r["answer"], r["answers"])
    assert "Overall ANLS: " in capsys.readouterr().out


def test_cot_variant(demo, tmp_path, monkeypatch):
    """--cot (ScienceQA): no prompt suffix, the question wrapped in the official instruction, the 'Final answer:'
    line extracted, then the letter; only where the official scripts have it."""
    monkeypatch.setattr(benchmarks, "COT_MAX_NEW_TOKENS", 12)
    recs = [dict(image=img, hint="", question="Which shape is it?", choices=["circle", "square"], answer=1)
            for img in demo["images"][:2]]
    got = cli(demo, tmp_path, "sqa_test", write_jsonl(tmp_path / "sqa.jsonl", recs) + f",{demo['folder']}", "--cot")
    assert got[0]["question"] == benchmarks.COT_INSTRUCTION.format(question="Which shape is it?\nA. circle\nB. square")
    assert got[0]["question"].startswith("Your task is to answer the question below. Give step by step reasoning")
    for r in got:
        assert r["cot_answer"] == metrics.cot_extract_answer(r["answer"]).strip()
        assert r["extracted"] == metrics.choice_letter(r["cot_answer"], {"A": "circle", "B": "square"}, True)
    with pytest.raises(SystemExit, match="--cot: the official scripts have it for pope, sqa_test and m3cot_test"):
        cli(demo, tmp_path, "textvqa_val", write_jsonl(tmp_path / "v.jsonl", []), "--cot")
