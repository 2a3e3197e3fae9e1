"""metrics.py against the official InternVL evaluators' outputs stored in tests/fixtures/metrics/cases.json:
every case's outputs and score, every aggregate, and a clear error where the official code crashes."""
import json
import math
import os

import pytest

import metrics
from metrics import MetricError

CASES_FILE = os.path.join(os.path.dirname(__file__), "fixtures", "metrics", "cases.json")
CASES = json.load(open(CASES_FILE))["metrics"]
SCORED = ["vqa_score", "anls", "relaxed_accuracy", "exact_match_accuracy", "ai2d_exact_match", "gqa",
          "scienceqa", "mmbench", "pope"]


def close(a, b):
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-12)


def cases(metric):
    return [pytest.param(c, id=c["id"]) for c in CASES[metric]["cases"]]


@pytest.mark.parametrize("case", cases("vqa_normalize"))
def test_vqa_normalize(case):
    assert metrics.vqa_normalize(case["input"]) == case["output"]


@pytest.mark.parametrize("case", cases("cot_extract_answer"))
def test_cot_extract_answer(case):
    assert metrics.cot_extract_answer(case["text"]) == case["extracted"]


@pytest.mark.parametrize("metric", SCORED)
def test_item_scores_equal_official(metric):
    wrong = []
    for c in CASES[metric]["cases"]:
        want = c["correct"] if metric == "pope" else c["score"]
        got = metrics.item_score(metric, c)
        if metric == "vqa_score":  # the official loop order is reproduced: equal to the last bit
            refs = [metrics.vqa_normalize(r) for r in c["references"]]
            ok = got == want and refs == c["normalized_references"] \
                and metrics.vqa_normalize(c["prediction"]) == c["normalized_prediction"]
        else:
            ok = got == want
        if "extracted" in c:
            ok = ok and metrics.extracted(metric, c) == c["extracted"]
        if "converted_prediction" in c:
            ok = ok and metrics.extracted(metric, c) == c["converted_prediction"]
        if "parsed" in c:
            ok = ok and metrics.extracted(metric, c) == c["parsed"]
        if not ok:
            wrong.append((c["id"], got, want, c["note"]))
    assert not wrong
    assert len(CASES[metric]["cases"]) == CASES[metric]["n_cases"]


@pytest.mark.parametrize("metric", SCORED)
def test_aggregates_equal_official(metric):
    want = CASES[metric]["aggregate"]
    got = metrics.aggregate(metric, CASES[metric]["cases"])
    if metric != "pope":
        assert got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
        return
    assert got["categories_in_order"] == want["categories_in_order"]
    assert got["printed_overall"] == want["printed_overall"] and close(got["overall_f1"], want["overall_f1"])
    for cat, w in want["per_category"].items():
        g = got["per_category"][cat]
        assert g.keys() == w.keys()
        for k, v in w.items():
            assert (g[k] == v) if isinstance(v, (int, str)) else close(g[k], v), (cat, k)


CRASH_METRICS = [m for m in CASES if CASES[m].get("crash_cases")]


@pytest.mark.parametrize("metric", CRASH_METRICS)
def test_crash_cases_give_a_clear_error(metric):
    """Where the official code raises, metrics.py raises MetricError naming the problem (never a score)."""
    hints = {"AssertionError": "10 human answers", "ValueError": "empty reference",
             "TypeError": "no reference", "IndexError": "IndexError",
             "ZeroDivisionError": "ZeroDivisionError"}
    for c in CASES[metric]["crash_cases"]:
        with pytest.raises(MetricError, match=hints[c["raises"]]):
            if metric == "pope":
                metrics.pope_counts(c["predictions"], c["labels"], "random")
            else:
                metrics.item_score(metric, c)


def test_aggregate_counts_unscorable_items():
    good = {"prediction": "B", "options": {"A": "cat", "B": "dog"}, "answer": "B"}
    bad = {"prediction": " ", "options": {"A": "cat", "B": "dog"}, "answer": "A"}
    assert metrics.aggregate("mmbench", [good, bad, good]) == {"plain_accuracy": 1.0, "errors": 1}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.aggregate("bleu", [good])


def test_vqa_post_process_is_not_applied():
    """The VQA script defines a post_process it never calls: 'The answer is two.' scores against 'two' as a
    whole sentence (normalised 'answer is 2'), not as '2'."""
    for c in CASES["vqa_post_process"]["cases"][:5]:
        refs = [c["output"]] * 10
        if metrics.vqa_normalize(c["text"]) != metrics.vqa_normalize(c["output"]):
            assert metrics.item_score("vqa_score", {"prediction": c["text"], "references": refs}) == 0.0


def test_non_text_options_and_bad_answer_index_are_errors():
    """pandas reads a column of numbers as numbers: the official MMBench post_process then raises TypeError when it
    tests such an option against the answer; a ScienceQA answer index past E names no letter."""
    assert metrics.item_score("mmbench", {"prediction": "B", "options": {"A": 1.0, "B": 2.0}, "answer": "B"}) == 1.0
    with pytest.raises(MetricError, match="option A is 1.0, not text"):
        metrics.item_score("mmbench", {"prediction": "two", "options": {"A": 1.0, "B": 2.0}, "answer": "B"})
    with pytest.raises(MetricError, match="answer index 5"):
        metrics.item_score("scienceqa", {"prediction": "A", "choices": ["x", "y"], "answer": 5})


def test_pope_without_categories_is_one_group_and_bad_references_are_errors():
    cases = [dict(prediction=p, label=lab) for p, lab in [("Yes", "yes"), ("No.", "no"), ("yes", "no")]]
    got = metrics.aggregate("pope", cases)
    assert got["categories_in_order"] == [""] and got["per_category"][""]["TP"] == 1 and got["overall_f1"] == 2 / 3
    with pytest.raises(MetricError, match="list of 10 human answers"):
        metrics.item_score("vqa_score", {"prediction": "x", "references": None})
