"""The official InternVL benchmarks (internvl_chat/eval of OpenGVLab/InternVL): one table, the readers of
their input files, and the runner behind `chat.py --benchmark` and `train.py --eval-benchmark`.

Each benchmark is asked as its official script asks it: the question built from the official input file with
the official prompt suffix, the image tiled with the official README's --max-num, the official chat (system
message, `<image>\\n` in front), greedy decoding with max_new_tokens and min_new_tokens=1, the answer cut at
the terminator and stripped. Scoring is metrics.py's. Splits that only a benchmark server scores get the
official results file, which is what the server takes.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field, replace
from xml.sax.saxutils import escape

import metrics
from metrics import MetricError

SHORT = "Answer the question using a single word or phrase."
VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"
# --cot (POPE, ScienceQA, M3CoT): no prompt suffix, the question wrapped in this, 4096 new tokens, and the
# answer taken from its "Final answer:" line (metrics.cot_extract_answer)
COT_INSTRUCTION = ("Your task is to answer the question below. Give step by step reasoning before you "
                   "answer, and when you're ready to answer, please use the format \"Final answer: ..\"\n\n"
                   "Question:\n\n{question}")
COT_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Benchmark:
    name: str  # the official dataset key
    input: str  # input format: vqa (jsonl), mpdocvqa (json), pope (jsonl), scienceqa (jsonl), mmbench (tsv)
    metric: str | None  # metrics.py key; None: only the benchmark's server scores it (results file only)
    prompt: str  # the official prompt suffix
    max_new_tokens: int
    results: str  # the layout of the official results file (RESULT_FIELDS)
    max_num: int = 6  # tiles per image: the official README's --max-num (the scripts' default 6)
    references: str = "record"  # where the scored answers come from: record (the input file) or annotation
    cot: bool = False  # the --cot variant (cot_variant)


def cot_variant(bench: Benchmark) -> Benchmark:
    if bench.input not in ("pope", "scienceqa"):
        raise ValueError(f"--cot: the official scripts have it for pope, sqa_test and m3cot_test, not "
                         f"{bench.name}")
    return replace(bench, prompt="", max_new_tokens=COT_MAX_NEW_TOKENS, cot=True)


BENCHMARKS = [
    Benchmark("vqav2_val", "vqa", "vqa_score", SHORT, 10, "vqa", references="annotation"),
    Benchmark("vqav2_testdev", "vqa", None, SHORT, 10, "vqa"),
    Benchmark("okvqa_val", "vqa", "vqa_score", SHORT, 10, "vqa", references="annotation"),
    Benchmark("textvqa_val", "vqa", "vqa_score", SHORT, 10, "vqa", references="annotation"),
    Benchmark("textvqa_val_ocr", "vqa", "vqa_score", SHORT, 10, "vqa", references="annotation"),
    Benchmark("vizwiz_val", "vqa", "vqa_score", VIZWIZ, 10, "vqa", references="annotation"),
    Benchmark("vizwiz_test", "vqa", None, VIZWIZ, 10, "vizwiz_test"),
    Benchmark("docvqa_val", "vqa", "anls", SHORT, 100, "doc", 18, references="annotation"),
    Benchmark("docvqa_test", "vqa", None, SHORT, 100, "doc_test", 18),
    Benchmark("chartqa_test_human", "vqa", "relaxed_accuracy", SHORT, 100, "chartqa", 12),
    Benchmark("chartqa_test_augmented", "vqa", "relaxed_accuracy", SHORT, 100, "chartqa", 12),
    Benchmark("infographicsvqa_val", "vqa", "anls", SHORT, 100, "doc", 24, references="annotation"),
    Benchmark("infographicsvqa_test", "vqa", None, SHORT, 100, "doc", 24),
    Benchmark("gqa_testdev", "vqa", "gqa", SHORT, 10, "doc"),
    Benchmark("gqa_testdev_llava", "vqa", "gqa", SHORT, 10, "doc"),
    Benchmark("ocrvqa_val", "vqa", "exact_match_accuracy", SHORT, 100, "doc"),
    Benchmark("ocrvqa_test", "vqa", "exact_match_accuracy", SHORT, 100, "doc"),
    Benchmark("ai2diagram_test", "vqa", "ai2d_exact_match", "", 10, "ai2d"),
    Benchmark("mpdocvqa_val", "mpdocvqa", "anls", SHORT, 100, "doc", 18),
    Benchmark("mpdocvqa_test", "mpdocvqa", None, SHORT, 100, "doc_test", 18),
    Benchmark("pope", "pope", "pope", SHORT, 100, "pope", references="annotation"),
    Benchmark("sqa_test", "scienceqa", "scienceqa", LETTER, 100, "scienceqa"),
    Benchmark("m3cot_test", "scienceqa", "scienceqa", LETTER, 100, "scienceqa"),
    Benchmark("mmbench_dev_20230712", "mmbench", "mmbench", LETTER, 100, "mmbench"),
    Benchmark("mmbench_dev_en_20231003", "mmbench", "mmbench", LETTER, 100, "mmbench"),
    Benchmark("mmbench_dev_cn_20231003", "mmbench", "mmbench", LETTER_CN, 100, "mmbench"),
    Benchmark("mmbench_test_en_20231003", "mmbench", "mmbench", LETTER, 100, "mmbench"),
    Benchmark("mmbench_test_cn_20231003", "mmbench", "mmbench", LETTER_CN, 100, "mmbench"),
    Benchmark("ccbench_dev_cn", "mmbench", "mmbench", LETTER_CN, 100, "ccbench"),
]

# The fields of each official results file, in order ("answer" is the answer as the script writes it).
RESULT_FIELDS = {
    "vqa": ("question", "question_id", "answer"),
    "vizwiz_test": ("image", "answer"),  # image: question_id without 'data/vizwiz/test/'
    "doc": ("question", "questionId", "answer", "annotation"),
    "doc_test": ("questionId", "answer"),
    "chartqa": ("question", "answer", "annotation"),
    "ai2d": ("question", "image", "answer", "annotation"),  # image: the question_id
    "pope": ("question_id", "text", "text_orig", "model_id", "metadata"),
    "scienceqa": ("question", "answer", "answer_orig", "gt_answers", "image_path"),
    "mmbench": ("question", "answer", "gt_answers", "index"),
    "ccbench": ("question", "answer", "gt_answers", "index"),
}


def get_benchmark(name: str) -> Benchmark:
    for b in BENCHMARKS:
        if b.name == name:
            return b
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(b.name for b in BENCHMARKS)}")


@dataclass
class Item:
    """One question: `case` holds the metric's inputs but the prediction; `fields` the results-file fields."""
    id: str
    question: str = ""
    image: object = None  # a path, a list of page paths (MP-DocVQA), or a callable returning a PIL image
    case: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------------- readers
def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _parse(path, n, line, needed) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise MetricError(f"{path}:{n}: malformed JSON ({e})") from None
    missing = [k for k in needed if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise MetricError(f"{path}:{n}: no {', '.join(repr(k) for k in missing)} field")
    return rec


def _join(folder, path):
    return path if folder is None else os.path.join(folder, path)


def read_annotation_answers(bench: Benchmark, path: str) -> dict:
    """question id -> reference answers from the official annotation file: VQA {'annotations': [{question_id,
    answers: [{answer}]}]} or DocVQA / InfographicVQA {'data': [{questionId, answers}]}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if bench.metric == "vqa_score":
            return {a["question_id"]: [x["answer"] for x in a["answers"]] for a in data["annotations"]}
        return {d["questionId"]: d["answers"] for d in data["data"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --annotation {path}: not the official annotation file of {bench.name} "
                         f"({type(e).__name__}: {e})")


def read_vqa(bench, path, folder, annotation) -> list[Item]:
    """evaluate_vqa.py's jsonl: image, question, question_id, answer (optional: a string or a list)."""
    answers = read_annotation_answers(bench, annotation) if annotation else None
    items = []
    for n, line in _jsonl(path):
        try:
            rec = _parse(path, n, line, ("image", "question", "question_id"))
        except MetricError as e:
            items.append(Item(f"{path}:{n}", error=str(e)))
            continue
        qid, ann = rec["question_id"], rec.get("answer")
        question = rec["question"] + " " + bench.prompt if bench.prompt else rec["question"]
        item = Item(str(qid), question, _join(folder, rec["image"]))
        if bench.metric == "vqa_score":
            refs = answers.get(qid) if answers is not None else ann if isinstance(ann, list) else None
            item.case = {"references": refs}
        elif bench.metric == "anls":
            refs = answers.get(qid) if answers is not None else [ann] if isinstance(ann, str) else ann
            item.case = {"answers": refs}
        elif bench.metric == "gqa":
            item.case = {"answer": ann}
        elif bench.metric is not None:
            item.case = {"annotation": ann}
        if answers is not None and qid not in answers:  # the official scorer raises KeyError
            item.case["reference_error"] = f"question_id {qid!r} is not in the annotation file {annotation}"
        image_id = str(qid).replace("data/vizwiz/test/", "") if bench.results == "vizwiz_test" else qid
        item.fields = dict(question=question, question_id=qid, questionId=qid, annotation=ann, image=image_id)
        items.append(item)
    return items


def read_mpdocvqa(bench, path, folder, annotation) -> list[Item]:
    """MP-DocVQA's JSON {'data': [{questionId, question, page_ids, answers (optional)}]}: pages FOLDER/ID.jpg.
    The question is completed when the pages are tiled (pages_prompt: the Image-i prefix depends on them)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path}: not an MP-DocVQA file {{'data': [...]}} ({type(e).__name__}: {e})")
    items = []
    for k, rec in enumerate(data):
        missing = [f for f in ("questionId", "question", "page_ids")
                   if not isinstance(rec, dict) or f not in rec]
        if missing or not rec["page_ids"]:
            items.append(Item(f"{path}: data[{k}]", error=f"{path}: data[{k}]: no {missing or 'page_ids'}"))
            continue
        pages = [_join(folder, p + ".jpg") for p in rec["page_ids"]]
        item = Item(str(rec["questionId"]), rec["question"], pages)
        if bench.metric is not None:
            item.case = {"answers": rec.get("answers")}
        item.fields = dict(questionId=rec["questionId"], annotation=rec.get("answers"))
        items.append(item)
    return items


def read_pope(bench, path, folder, annotation) -> list[Item]:
    """llava_pope_test.jsonl (question_id, image, text, category); labels from the official annotation folder
    (coco_pope_{category}.json, one {'label'} per line, paired in order with that category's questions)."""
    labels, seen, items = {}, {}, []
    for n, line in _jsonl(path):
        try:
            rec = _parse(path, n, line, ("question_id", "image", "text", "category"))
            if SHORT not in rec["text"]:  # the official reader asserts it
                raise MetricError(f"{path}:{n}: the question does not contain the prompt {SHORT!r}")
        except MetricError as e:
            items.append(Item(f"{path}:{n}", error=str(e)))
            continue
        cat = rec["category"]
        if annotation and cat not in labels:
            label_file = os.path.join(annotation, f"coco_pope_{cat}.json")
            try:
                labels[cat] = [json.loads(x)["label"] for _, x in _jsonl(label_file)]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"error: POPE labels {label_file}: {type(e).__name__}: {e}")
        k = seen[cat] = seen.get(cat, -1) + 1
        label = labels[cat][k] if annotation and k < len(labels[cat]) else rec.get("label")
        question = rec["text"].replace(SHORT, bench.prompt).strip()
        question = COT_INSTRUCTION.format(question=question) if bench.cot else question
        item = Item(str(rec["question_id"]), question, _join(folder, rec["image"]))
        item.case = {"label": label, "category": cat} if label is not None else {}
        item.fields = dict(question_id=rec["question_id"], model_id="", metadata={})
        items.append(item)
    return items


def read_scienceqa(bench, path, folder, annotation) -> list[Item]:
    """scienceqa_test_img.jsonl: image, hint, question, choices (at most 5), answer (an index)."""
    items = []
    for n, line in _jsonl(path):
        try:
            rec = _parse(path, n, line, ("image", "hint", "question", "choices", "answer"))
            options = metrics.scienceqa_options(rec["choices"])
            letter = metrics.LETTERS[rec["answer"]] if isinstance(rec["answer"], int) else None
            if letter is None or rec["answer"] < 0:
                raise MetricError(f"answer {rec['answer']!r} is not an index into the choices")
        except (MetricError, IndexError) as e:
            error = str(e) if str(e).startswith(path) else f"{path}:{n}: {e}"
            items.append(Item(f"{path}:{n}", error=error))
            continue
        question = (rec["hint"] + "\n" if rec["hint"] else "") + rec["question"] + "\n"
        question += "\n".join(f"{k}. {v}" for k, v in options.items()) + "\n" + bench.prompt
        question = question.strip()
        question = COT_INSTRUCTION.format(question=question) if bench.cot else question
        image = _join(folder, rec["image"])
        item = Item(f"{path}:{n}", question, image, case={"options": options, "answer_letter": letter})
        item.fields = dict(question=question, gt_answers=item.case["answer_letter"], image_path=rec["image"])
        items.append(item)
    return items


# pandas' read_csv defaults: these cells are NaN
NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
      "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _pandas_column(values: list[str]) -> list:
    """A TSV column as pandas reads it: NaN cells None; a column of whole numbers is int64 ('007' -> 7), or
    float64 when it has NaN cells ('7' -> 7.0, printed '7.0'); a column of numbers float64; else strings."""
    cells = [None if v in NA else v for v in values]
    present = [v for v in cells if v is not None]
    for kind in (int, float):
        try:
            nums = [kind(v) for v in present]
        except ValueError:
            continue
        if kind is int and len(present) < len(cells):
            nums = [float(x) for x in nums]
        it = iter(nums)
        return [None if v is None else next(it) for v in cells]
    return cells


def read_mmbench(bench, path, folder, annotation) -> list[Item]:
    """The MMBench / CCBench TSV: index, image (base64), question, hint, A..E (NaN when absent), answer (dev
    sets only)."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is a long field
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or not {"index", "image", "question"} <= set(rows[0]):
        raise SystemExit(f"error: {path}: not an MMBench TSV (the header needs index, image, question)")
    head, body = rows[0], rows[1:]
    cols = {h: _pandas_column([r[i] if i < len(r) else "" for r in body]) for i, h in enumerate(head)}
    items = []
    for k, raw in enumerate(body):
        cell = {h: cols[h][k] for h in head}
        options = {c: cell[c] for c in metrics.LETTERS if cell.get(c) is not None}  # numbers stay numbers
        question = (f"{cell['hint']}\n" if cell.get("hint") is not None else "") + f"{cell['question']}"
        question += "".join(f"\n{c}. {v}" for c, v in options.items()) + "\n" + bench.prompt
        where = f"{path}:{k + 2} (index {cell['index']})"
        item = Item(str(cell["index"]), question, _b64_image(raw[head.index("image")], where))
        item.case = {"options": options, "answer": cell.get("answer")}  # no answer column on test splits
        # the submission: the TSV without these columns, the extracted answers in a 'prediction' column
        dropped = ("category", "image") if bench.results == "ccbench" else (
            "hint", "category", "source", "image", "comment", "l2-category")
        kept = [(h, cell[h]) for h in head if h not in dropped]
        item.fields = dict(question=question, gt_answers=cell.get("answer"), index=cell["index"], tsv=kept)
        items.append(item)
    return items


def _b64_image(data: str, where: str):
    def load():
        from PIL import Image
        from data.images import ImageLoadError
        try:
            return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"{where}: cannot decode the base64 image ({type(e).__name__}: {e})") from e
    return load


READERS = {"vqa": read_vqa, "mpdocvqa": read_mpdocvqa, "pope": read_pope, "scienceqa": read_scienceqa,
           "mmbench": read_mmbench}
PAGE_TILES = 64  # MP-DocVQA: the official --total-max-num, shared by the pages of a question


def read_items(bench: Benchmark, spec: str, annotation: str | None = None) -> list[Item]:
    """--data FILE[,IMAGE_FOLDER] (image paths in the file are relative to IMAGE_FOLDER, else to the current
    directory, as in the official data/ layout) -> the benchmark's items, in file order."""
    path, _, folder = spec.partition(",")
    for p in [path] + ([annotation] if annotation else []):
        if not os.path.exists(p):
            raise SystemExit(f"error: {p}: no such file")
    if annotation and bench.references != "annotation":
        raise SystemExit(f"error: --annotation {annotation}: {bench.name} takes its references from the "
                         f"--data file")
    return READERS[bench.input](bench, path, folder or None, annotation)


# -------------------------------------------------------------------------------------------------- runner
def answer_items(model, tokenizer, bench: Benchmark, items: list[Item], batch_size: int = 8,
                 max_num: int | None = None, system_message: str | None = None, stop_early: bool = True,
                 progress: bool = True) -> list[dict]:
    """Greedy answers to the items, `batch_size` prompts at a time (chat.py's batching: longest first, the
    same answers as one by one); images are loaded a few batches ahead only. One row per item, in order: id,
    question, answer and tokens, or error."""
    from chat import build_prompt, decode_answer, generate_batch, image_to_pixel_values, plan_batches
    from data.images import ImageLoadError, load_image
    from data.templates import get_template, resolve_system_message
    config = model.config
    sep = get_template(config.template).stop
    eos_id = tokenizer.convert_tokens_to_ids(sep)
    system_message = resolve_system_message(config, system_message)
    rows = [dict(id=it.id, question=it.question) if it.error is None else dict(id=it.id, error=it.error)
            for it in items]
    todo = [k for k, it in enumerate(items) if it.error is None]
    step = batch_size * 8
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=bench.name, dynamic_ncols=True, file=sys.stderr)
    for start in range(0, len(todo), step):
        prompts = []
        for k in todo[start:start + step]:
            it = items[k]
            try:
                if isinstance(it.image, list):
                    question, pv, patches = pages_prompt(it, config, max_num or bench.max_num, bench.prompt)
                    rows[k]["question"] = it.fields["question"] = question
                else:
                    image = it.image() if callable(it.image) else load_image(it.image)
                    question, pv = it.question, image_to_pixel_values(image, config, max_num or bench.max_num)
                    patches = [pv.shape[0]]
                _, ids = build_prompt(tokenizer, config, question, [], patches, system_message)
                prompts.append((k, ids, pv))
            except (ImageLoadError, ValueError) as e:
                rows[k]["error"] = str(e)
        for chunk in plan_batches(prompts, batch_size, bench.max_new_tokens, config):
            answers = generate_batch(model, [(ids, pv) for _, ids, pv in chunk], eos_id, bench.max_new_tokens,
                                     stop_early, min_new_tokens=1)
            for (k, _, _), ids in zip(chunk, answers):
                rows[k].update(answer=decode_answer(tokenizer, ids, sep), tokens=len(ids))
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return rows


def pages_prompt(item: Item, config, max_num: int, prompt: str):
    """MP-DocVQA (its official reader): each page tiled with max(1, min(max_num, 64 // pages)) tiles; when
    there is more than one tile in all, 'Image-i: <image>\\n' per page in front of the question; then the
    prompt."""
    import torch

    from chat import image_to_pixel_values
    from data.images import load_image
    cap = max(1, min(max_num, PAGE_TILES // len(item.image)))
    tiles = [image_to_pixel_values(load_image(p), config, cap) for p in item.image]
    pv = torch.cat(tiles)
    question = item.question
    if pv.shape[0] > 1:
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tiles))) + question
    return question + " " + prompt, pv, [t.shape[0] for t in tiles]


def score_rows(bench: Benchmark, items: list[Item], rows: list[dict]) -> dict:
    """Per-item scores into the rows (score, or score_error where the official code would raise; the extracted
    letter of the choice benchmarks) and the official aggregate over the scored ones."""
    cases = []
    for it, row in zip(items, rows):
        if "answer" not in row or bench.metric is None:
            continue
        if bench.cot:  # the official scripts score the "Final answer:" line
            row["cot_answer"] = metrics.cot_extract_answer(row["answer"]).strip()
        case = dict(it.case, prediction=row.get("cot_answer", row["answer"]))
        # the references beside the answer; a gold "answer" (GQA, MMBench) is written as "gt_answer"
        row.update({("gt_answer" if k == "answer" else k): v for k, v in it.case.items()
                    if k not in ("options", "reference_error")})
        try:
            if bench.metric in ("scienceqa", "mmbench"):
                row["extracted"] = metrics.extracted(bench.metric, case)
            if "reference_error" in it.case:
                raise MetricError(it.case["reference_error"])
            if not _has_reference(bench, it.case):
                continue
            row["score"] = metrics.item_score(bench.metric, case)
            cases.append(case)
        except MetricError as e:
            row["score_error"] = str(e)
    if not cases:
        return {}
    try:
        return metrics.aggregate(bench.metric, cases)
    except MetricError as e:
        return {"error": str(e)}


def _has_reference(bench, case) -> bool:
    key = {"vqa_score": "references", "anls": "answers", "gqa": "answer", "pope": "label", "scienceqa":
           "answer_letter", "mmbench": "answer"}.get(bench.metric, "annotation")
    return case.get(key) is not None


def official_line(bench: Benchmark, score: dict) -> str:
    """The score as the official script prints it."""
    if "error" in score:
        return f"{bench.name}: no score: {score['error']}"
    m = bench.metric
    if m == "anls":
        return f"Overall ANLS: {score['anls']:2.4f}"
    if m == "scienceqa":
        return f"Acc@1: {score['acc@1']}"
    if m == "pope":
        per = score["per_category"]
        return "; ".join(f"{c}: {per[c]['printed_summary']} (F1, acc, precision, recall, yes ratio)"
                         for c in score["categories_in_order"]) + "; " + score["printed_overall"]
    if m == "vqa_score":
        return f"{bench.name} {score['accuracy']}"
    if m == "mmbench":
        return (f"{bench.name} plain accuracy {score['plain_accuracy']} (single pass; the official score is "
                f"the MMBench server's CircularEval of the .xlsx)")
    name = metrics.AGGREGATE_NAMES[m]
    return f"{bench.name} {{'{name}': {score[name]}}}"


def headline(bench: Benchmark, score: dict) -> dict:
    """The numbers a comparison shows: the official aggregate (POPE: overall and per-category F1)."""
    if not score or "error" in score:
        return {}
    if bench.metric == "pope":
        return {"overall_f1": score["overall_f1"],
                **{f"{c}_f1": score["per_category"][c]["f1"] for c in score["categories_in_order"]}}
    return {k: v for k, v in score.items() if k != "errors"}


def write_results(bench: Benchmark, items: list[Item], rows: list[dict], path: str) -> str:
    """The official results file of the answered items (MMBench / CCBench: the .xlsx of the submission);
    returns its path."""
    records = []
    for it, row in zip(items, rows):
        if "answer" not in row:
            continue
        answer = row.get("extracted", row.get("cot_answer", row["answer"]))
        values = dict(it.fields, answer=answer, text=answer, text_orig=row["answer"],
                      answer_orig=row["answer"])
        records.append({k: values.get(k) for k in RESULT_FIELDS[bench.results]})
    if bench.input == "mmbench":  # pandas' DataFrame.insert(6 or 8, 'prediction'); unanswered rows: empty
        answers = {it.id: row.get("extracted", row.get("answer")) for it, row in zip(items, rows)}
        at = 8 if bench.results == "ccbench" else 6
        table = [[v for _, v in it.fields["tsv"]] for it in items if it.fields]
        for it, line in zip([it for it in items if it.fields], table):
            line.insert(at, answers.get(it.id))
        head = [h for h, _ in next(it.fields["tsv"] for it in items if it.fields)] if table else []
        write_xlsx(path, head[:at] + ["prediction"] + head[at:], table)
        return path
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    return path


def write_xlsx(path: str, header: list[str], rows: list[list]) -> None:
    """A one-sheet .xlsx: numbers as numbers, anything else as inline strings, None as an empty cell (no
    spreadsheet library needed)."""
    def cell(ref, v):
        if v is None:
            return ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<c r="{ref}"><v>{v!r}</v></c>'
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(str(v))}</t></is></c>'

    def col(i):
        return (col(i // 26 - 1) if i >= 26 else "") + chr(65 + i % 26)
    sheet = "".join(f'<row r="{r + 1}">' + "".join(cell(f"{col(c)}{r + 1}", v) for c, v in enumerate(vals))
                    + "</row>" for r, vals in enumerate([header] + rows))
    xml = '<?xml version="1.0" encoding="UTF-8"?>'
    pkg = "http://schemas.openxmlformats.org/package/2006"
    office = "http://schemas.openxmlformats.org/officeDocument/2006"
    sml = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    mime = "application/vnd.openxmlformats-officedocument.spreadsheetml"

    def rels(kind, target):
        return (f'{xml}<Relationships xmlns="{pkg}/relationships"><Relationship Id="rId1" '
                f'Type="{office}/relationships/{kind}" Target="{target}"/></Relationships>')
    files = {
        "[Content_Types].xml": f'{xml}<Types xmlns="{pkg}/content-types"><Default Extension="rels" '
                               f'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                               f'<Default Extension="xml" ContentType="application/xml"/><Override PartName='
                               f'"/xl/workbook.xml" ContentType="{mime}.sheet.main+xml"/><Override PartName='
                               f'"/xl/worksheets/sheet1.xml" ContentType="{mime}.worksheet+xml"/></Types>',
        "_rels/.rels": rels("officeDocument", "xl/workbook.xml"),
        "xl/workbook.xml": f'{xml}<workbook {sml} xmlns:r="{office}/relationships"><sheets><sheet '
                           f'name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": rels("worksheet", "worksheets/sheet1.xml"),
        "xl/worksheets/sheet1.xml": f"{xml}<worksheet {sml}><sheetData>{sheet}</sheetData></worksheet>",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)


def run(model, tokenizer, bench: Benchmark, items: list[Item], output: str | None, batch_size: int = 8,
        max_num: int | None = None, system_message: str | None = None, stop_early: bool = True,
        progress: bool = True) -> dict:
    """Answer and score a benchmark. With `output`: the rows as JSON lines there (id, question, answer,
    tokens, the references, extracted, score or score_error; error for an item that could not be asked) and
    the official results file beside it (OUTPUT stem + .results.json, MMBench .xlsx). Returns the summary."""
    t0 = time.time()
    rows = answer_items(model, tokenizer, bench, items, batch_size, max_num, system_message, stop_early,
                        progress)
    seconds = time.time() - t0
    score = score_rows(bench, items, rows)
    answered = sum("answer" in r for r in rows)
    summary = dict(benchmark=bench.name, metric=bench.metric, items=len(rows), answered=answered,
                   errors=len(rows) - answered, scored=sum("score" in r for r in rows),
                   score_errors=sum("score_error" in r for r in rows), score=score,
                   new_tokens=sum(r.get("tokens", 0) for r in rows), seconds=seconds,
                   items_per_s=answered / max(seconds, 1e-9))
    if output:
        with open(output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        ext = ".xlsx" if bench.input == "mmbench" else ".results.json"
        summary["results_file"] = write_results(bench, items, rows, os.path.splitext(output)[0] + ext)
    if score:
        summary["official"] = official_line(bench, score)
    else:
        server = bench.metric is None or bench.input == "mmbench"
        summary["official"] = f"{bench.name}: no score here: " + (
            f"the benchmark server scores {summary.get('results_file', 'the results file (pass --output)')}"
            if server else "no reference answers")
    return summary


def compare_table(bench: Benchmark, base: dict, tuned: dict) -> str:
    """base, fine-tuned and delta of each headline number, one line each."""
    b, t = headline(bench, base["score"]), headline(bench, tuned["score"])
    lines = [f"{bench.name:<28} {'base':>10} {'fine-tuned':>10} {'delta':>10}"]
    for k in list(t) or list(b):
        bv, tv = b.get(k), t.get(k)
        delta = f"{tv - bv:+10.4f}" if bv is not None and tv is not None else f"{'-':>10}"
        fmt = (lambda v: f"{v:10.4f}" if v is not None else f"{'-':>10}")  # noqa: E731
        lines.append(f"{k:<28} {fmt(bv)} {fmt(tv)} {delta}")
    if len(lines) == 1:
        lines.append("(no score on either side: " + "; ".join(s["official"] for s in (base, tuned)) + ")")
    return "\n".join(lines)


def main(args, load) -> int:
    """chat.py --benchmark: read the items (errors before any model load), answer and score them with the
    model of args.model_dir (and with --compare, of the base directory too), print the official line and a
    JSON summary. `load(model_dir)` -> (model, tokenizer, system message)."""
    try:
        bench = get_benchmark(args.benchmark)
        bench = cot_variant(bench) if getattr(args, "cot", False) else bench
    except ValueError as e:
        raise SystemExit(f"error: --benchmark: {e}")
    items = read_items(bench, args.data, args.annotation)
    if args.compare:
        from chat import check_model_dir
        check_model_dir(args.compare)
    bad = [it for it in items if it.error]
    print(f"{bench.name}: {len(items)} items from {args.data.partition(',')[0]}"
          f"{f' ({len(bad)} unusable, first: {bad[0].error})' if bad else ''}", file=sys.stderr)
    runs = [(args.compare, os.path.splitext(args.output)[0] + ".base.jsonl")] if args.compare else []
    summaries = {}
    for model_dir, output in [(args.model_dir, args.output)] + runs:
        model, tokenizer, system_message = load(model_dir)
        s = run(model, tokenizer, bench, items, output, args.batch_size, args.max_num, system_message)
        del model
        summaries[model_dir] = s
        print(f"{model_dir}: {s['official']}\n  {s['answered']} of {s['items']} answered ({s['errors']} "
              f"errors, {s['score_errors']} unscorable), {s['items_per_s']:.2f} items/s -> {output}"
              f"{' + ' + s['results_file'] if s.get('results_file') else ''}")
    if args.compare:
        print(compare_table(bench, summaries[args.compare], summaries[args.model_dir]))
    print(json.dumps(summaries[args.model_dir] if not args.compare else summaries, ensure_ascii=False))
    return 0
