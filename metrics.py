"""Benchmark answer scoring as the official InternVL evaluators compute it, quirks included.

    item_score(metric, case) -> float      one answer's score (1.0 / 0.0 for the accuracy metrics)
    aggregate(metric, cases) -> dict        the number the official script prints, under its own name

`case` is a dict with the fields of the official results file (tests/fixtures/metrics/cases.json):
    vqa_score               prediction, references (the 10 human answers)
    anls                    prediction, answers
    relaxed_accuracy        prediction, annotation (str or list)
    exact_match_accuracy    prediction, annotation (str or list)      (OCR-VQA, and AI2D: ai2d_exact_match)
    gqa                     prediction, answer
    scienceqa               prediction, choices, answer (index)      or  options {letter: text}, answer_letter
    mmbench                 prediction, options {letter: text}, answer (letter; None on test splits)
    pope                    prediction, label ('yes' / 'no'), category
Where the official code raises on an input (an empty annotation list, a bare '(' answer, ...) item_score
raises MetricError saying so; aggregate() leaves such items out and counts them under "errors".

The rules, as the official code has them (each is a test case):
- VQA accuracy (TextVQA, VQAv2, OK-VQA, VizWiz): prediction and the 10 human answers go through the EvalAI
  normalisation (vqa_normalize); for each of the 10 leave-one-out subsets min(#matches among the other
  9 / 3, 1), averaged; exactly 10 answers. No extraction from the answer.
- ANLS (DocVQA, InfographicVQA): 1 - Levenshtein / max(raw lengths) on lower-cased, whitespace-collapsed
  strings, best answer, 0 below 0.5.
- ChartQA relaxed accuracy: numbers within 5 % relative to the MODEL's answer ('x%' is x/100), else
  case-insensitive equality; the model answer is stripped, the annotation is not.
- OCR-VQA / AI2D: stripped, case-insensitive equality (AI2D: with the option letter, no letter extraction).
- GQA: trailing periods removed and lower-cased (convert_gqa_for_eval.py), then equality with the gold answer.
- ScienceQA / MMBench: option-letter extraction (choice_letter), then equality with the answer letter.
- POPE: yes/no parse of the first sentence; per category TP/FP/TN/FN, accuracy, precision, recall, F1, yes
  ratio; overall F1 = mean of the category F1s.
"""
from __future__ import annotations

import re

LETTERS = "ABCDE"  # the official ScienceQA / MMBench option letters


class MetricError(ValueError):
    """An input the official code cannot score (it raises there)."""


# ------------------------------------------------------------------------------------------ VQA normalisation
# EvalAI's answer processor (textvqa_eval.py EvalAIAnswerProcessor). Keys with capitals ("Im", "Ive", "Id've")
# can never match a lower-cased word; "somebody'd" -> "somebodyd" is reversed in the original table.
CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten"
                                                 .split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = ("a", "an", "the")
PUNCTUATION = ";/[]\"{}()=+\\_->< @`,?!".replace(" ", "")  # in the official order
# Meant as "a period not between digits", but the look-behind is written (?!<=\d): only "not followed by a
# digit" is checked. Passed re.UNICODE (32) as sub()'s count: at most 32 periods are removed.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
PERIOD_COUNT = int(re.UNICODE)


def vqa_normalize(text: str) -> str:
    """The EvalAI answer normalisation of the VQA / TextVQA evaluators."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation: deleted everywhere if it touches a space anywhere in the text, else replaced by a space;
    # the test is on the text before this step (commas are gone already: the digit-comma clause never fires).
    before, digit_comma = text, DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        glued = p + " " in before or " " + p in before or digit_comma
        text = text.replace(p, "" if glued else " ")
    text = PERIOD.sub("", text, PERIOD_COUNT)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, references: list[str]) -> float:
    """VQA accuracy of one answer against its 10 human answers (TextVQAAccuracyEvaluator)."""
    if not isinstance(references, (list, tuple)) or not all(isinstance(r, str) for r in references):
        raise MetricError(f"VQA accuracy needs a list of 10 human answers (strings), got {references!r}")
    if len(references) != 10:
        raise MetricError(f"VQA accuracy needs exactly 10 human answers, got {len(references)} (the official "
                          f"evaluator asserts this)")
    answer, refs = vqa_normalize(prediction), [vqa_normalize(r) for r in references]
    if answer not in refs:
        return 0.0
    # leave each reference out in turn, in order: the summation order decides the last bit of the float
    accs = [min(1, float(sum(r == answer for k, r in enumerate(refs) if k != j)) / 3) for j in range(10)]
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------------------------------------ ANLS
def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs, on code points."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        new = [j]
        for i, ca in enumerate(a, 1):
            new.append(row[i - 1] if ca == cb else 1 + min(row[i - 1], row[i], new[-1]))
        row = new
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average-normalised Levenshtein similarity of one answer (infographicsvqa_eval.py). The distance is
    taken on the normalised strings but divided by the longer RAW string (its upper() length): padding
    raises the score."""
    if not answers:
        raise MetricError("ANLS needs at least one reference answer (the official evaluator raises on none)")
    pred = " ".join(prediction.strip().lower().split())
    values = []
    for ans in answers:
        dist = levenshtein(" ".join(ans.strip().lower().split()), pred)
        length = max(len(ans.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    score = 1 - min(values)
    return 0 if score < threshold else score


# ------------------------------------------------------------------------------------------ ChartQA / OCR-VQA
def _number(text: str) -> float | None:
    """'12.5' -> 12.5, '50%' -> 0.5 (every trailing % removed), None when float() refuses it."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _annotations(annotation) -> list[str]:
    refs = [annotation] if isinstance(annotation, str) else annotation
    if refs is None:
        raise MetricError("no reference answer (a test split without answers?): the official scorer raises "
                          "TypeError here")
    refs = list(refs)
    if not refs:
        raise MetricError("empty reference list: the official scorer raises ValueError (max of nothing)")
    if not all(isinstance(r, str) for r in refs):
        raise MetricError(f"reference answers must be strings, got {refs!r}")
    return refs


def relaxed_correct(answer: str, annotation: str) -> bool:
    """ChartQA's relaxed correctness as evaluate_vqa.py calls it: tolerance relative to the model's answer."""
    ann, ans = _number(annotation), _number(answer)
    if ann is not None and ans:  # ans == 0 (or 0%) falls back to the strings
        return abs(ann - ans) / abs(ans) <= 0.05
    return annotation.lower() == answer.lower()


def relaxed_accuracy(prediction: str, annotation) -> float:
    return float(max(relaxed_correct(prediction.strip(), a) for a in _annotations(annotation)))


def exact_match(prediction: str, annotation) -> float:
    """OCR-VQA and AI2D: stripped, case-insensitive equality with any annotation."""
    answer = prediction.strip().lower()
    return max(1.0 if answer == a.strip().lower() else 0.0 for a in _annotations(annotation))


def gqa_prediction(prediction: str) -> str:
    """convert_gqa_for_eval.py: trailing periods removed, lower-cased (no whitespace strip)."""
    return prediction.rstrip(".").lower()


# -------------------------------------------------------------------------------------------- multiple choice
def choice_letter(prediction: str, options: dict[str, str], scienceqa: bool) -> str:
    """The official option-letter extraction (post_process of evaluate_scienceqa.py / evaluate_mmbench.py): a
    one-character answer as is; else its first character if that is an option letter; else the first option
    (in letter order) whose text occurs in the answer; else (ScienceQA only) 'X.' -> 'X' and '(X)' -> 'X';
    else the answer unchanged."""
    pred = prediction.strip()
    if len(pred) == 1:
        return pred
    if not scienceqa and not pred:
        raise MetricError("empty answer: the official MMBench post_process raises IndexError on it")
    if len(pred) > 1 or not scienceqa:
        if pred[0] in options:
            return pred[0]
        for letter, text in options.items():
            if not isinstance(text, str):
                raise MetricError(f"option {letter} is {text!r}, not text: the official post_process raises "
                                  f"TypeError testing it against the answer")
            if text in pred:
                return letter
    if not scienceqa:
        return pred
    if len(pred) > 1 and pred[1] == ".":
        pred = pred[0]
    if len(pred) > 1 and pred[0] == "(":
        if len(pred) < 3:
            raise MetricError(f"answer {prediction!r}: the official ScienceQA post_process raises IndexError "
                              f"on a 2-character answer starting with '('")
        if pred[2] == ")":
            pred = pred[1]
    return pred


def scienceqa_options(choices: list[str]) -> dict[str, str]:
    if len(choices) > len(LETTERS):
        raise MetricError(f"{len(choices)} choices: the official ScienceQA reader has letters A-E only (it "
                          f"raises IndexError)")
    return dict(zip(LETTERS, choices))


COT_ANSWER = re.compile(r"(Final answer:|Answer:)\s*(.*)", re.IGNORECASE)


def cot_extract_answer(text: str) -> str:
    """--cot: the rest of the line after the first 'Final answer:' / 'Answer:', stripped; else the text."""
    match = COT_ANSWER.search(text)
    return match.group(2).strip() if match else text


# ------------------------------------------------------------------------------------------------------ POPE
def pope_parse(text: str) -> str:
    """eval_pope.py: first sentence, commas deleted, split on single spaces; 'no' iff a word is No, no or
    not."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_counts(predictions: list[str], labels: list[str], category: str = "") -> dict:
    """TP/FP/TN/FN and the rates of one category (answers and labels paired in order, as zip does)."""
    pred = [pope_parse(p) != "no" for p in predictions]
    gold = [lab != "no" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    where = f"POPE category {category!r}: " if category else "POPE: "
    if not pred:
        raise MetricError(f"{where}no answers")
    if tp + fp == 0:
        raise MetricError(f"{where}no 'yes' answer, precision is undefined (the official eval_pope.py raises "
                          f"ZeroDivisionError)")
    if tp + fn == 0:
        raise MetricError(f"{where}no 'yes' label, recall is undefined (the official eval_pope.py raises "
                          f"ZeroDivisionError)")
    precision, recall = float(tp) / float(tp + fp), float(tp) / float(tp + fn)
    if precision + recall == 0:
        raise MetricError(f"{where}no true positive, F1 is undefined (the official eval_pope.py raises "
                          f"ZeroDivisionError)")
    f1 = 2 * precision * recall / (precision + recall)
    acc = (tp + tn) / (tp + tn + fp + fn)
    yes_ratio = pred.count(True) / len(pred)
    return dict(TP=tp, FP=fp, TN=tn, FN=fn, accuracy=acc, precision=precision, recall=recall, f1=f1,
                yes_ratio=yes_ratio,
                printed_summary="%.3f, %.3f, %.3f, %.3f, %.3f" % (f1, acc, precision, recall, yes_ratio))


def pope_aggregate(cases: list[dict]) -> dict:
    """Per category (in sorted order) the eval_pope.py figures, and the mean F1 it prints as 'Overall F1'."""
    category = [c.get("category", "") for c in cases]  # the official layout: one label file per category
    per = {}
    for cat in sorted(set(category)):
        mine = [c for c, k in zip(cases, category) if k == cat]
        per[cat] = pope_counts([c["prediction"] for c in mine], [c["label"] for c in mine], cat)
    categories = list(per)
    f1s = [per[cat]["f1"] for cat in categories]
    overall = sum(f1s) / len(f1s)
    return dict(per_category=per, categories_in_order=categories, overall_f1=overall,
                printed_overall=f"Overall F1: {overall * 100:.2f}")


# ------------------------------------------------------------------------------------------------- dispatch
def _choice_case(case: dict, scienceqa: bool) -> tuple[str, str | None]:
    """(extracted letter, gold letter) of a ScienceQA / MMBench case."""
    if scienceqa and "choices" in case:
        options = scienceqa_options(case["choices"])
        if not isinstance(case["answer"], int) or not 0 <= case["answer"] < len(LETTERS):
            raise MetricError(f"answer index {case['answer']!r} names no option letter A-E")
        gold = LETTERS[case["answer"]]
    else:
        options = case["options"]
        gold = case.get("answer_letter", case.get("answer"))
    return choice_letter(case["prediction"], options, scienceqa), gold


def extracted(metric: str, case: dict) -> str:
    """The answer as the official script writes it to its results file, before comparison."""
    if metric in ("scienceqa", "mmbench"):
        return _choice_case(case, metric == "scienceqa")[0]
    if metric == "gqa":
        return gqa_prediction(case["prediction"])
    if metric == "pope":
        return pope_parse(case["prediction"])
    return case["prediction"]


def item_score(metric: str, case: dict) -> float:
    """One answer's official score; MetricError where the official code raises."""
    p = case["prediction"]
    if not isinstance(p, str):
        raise MetricError(f"the answer must be a string, got {p!r}")
    if metric == "vqa_score":
        return vqa_score(p, case["references"])
    if metric == "anls":
        return anls(p, _annotations(case["answers"]))
    if metric == "relaxed_accuracy":
        return relaxed_accuracy(p, case["annotation"])
    if metric in ("exact_match_accuracy", "ai2d_exact_match"):
        return exact_match(p, case["annotation"])
    if metric == "gqa":
        return 1.0 if gqa_prediction(p) == case["answer"] else 0.0
    if metric in ("scienceqa", "mmbench"):
        got, gold = _choice_case(case, metric == "scienceqa")
        return 1.0 if got == gold else 0.0
    if metric == "pope":
        return 1.0 if pope_parse(p) == case["label"] else 0.0
    raise ValueError(f"unknown metric {metric!r} (known: {', '.join(AGGREGATE_NAMES)})")


AGGREGATE_NAMES = {  # the name under which each official script reports its mean
    "vqa_score": "accuracy", "anls": "anls", "relaxed_accuracy": "relaxed_accuracy",
    "exact_match_accuracy": "accuracy", "ai2d_exact_match": "accuracy", "gqa": "accuracy",
    "scienceqa": "acc@1", "mmbench": "plain_accuracy", "pope": "overall_f1"}


def aggregate(metric: str, cases: list[dict]) -> dict:
    """The official aggregate over `cases` in order, under its official name. Items the official code cannot
    score are left out and counted in "errors" (the official script stops there instead)."""
    if metric not in AGGREGATE_NAMES:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(AGGREGATE_NAMES)})")
    if metric == "pope":
        return pope_aggregate(cases)
    scores, errors = [], 0
    for case in cases:
        try:
            scores.append(item_score(metric, case))
        except MetricError:
            errors += 1
    if not scores:
        raise MetricError(f"{metric}: no answer could be scored ({errors} errors)")
    out = {AGGREGATE_NAMES[metric]: sum(scores) / len(scores)}
    return {**out, "errors": errors} if errors else out
