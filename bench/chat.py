"""Batched greedy answers on a test set (chat.py --data): time per batch size, and whether the answers are equal.

    python bench/chat.py runs/demo/converted --data runs/demo/demo/data/eval.jsonl,runs/demo/demo/data \
        --batch-sizes 1 8 --repeats 3 [--json out.json]

For each batch size: the median wall time of answering every record (after a warm-up run), new tokens/s, and the
speed-up over the first batch size; `identical` says whether every answer and token count equals those of the
first batch size.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import chat  # noqa: E402
from bench.common import environment, time_median, write_json  # noqa: E402
from data import load_tokenizer  # noqa: E402
from model import load_pretrained  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True, help="ANNOTATION[,IMAGE_FOLDER]")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model_dir)
    records = chat.read_test_set(args.data)
    result = {"records": len(records), "max_new_tokens": args.max_new_tokens, "runs": [], **environment()}
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for b in args.batch_sizes:
            out = os.path.join(tmp, f"b{b}.jsonl")
            scores = {}
            timing = time_median(lambda: scores.update(chat.answer_test_set(
                model, tokenizer, records, out, b, args.max_new_tokens)), args.repeats)
            rows = [(r.get("answer"), r.get("tokens")) for r in map(json.loads, open(out))]
            first = first or (rows, timing["median_s"])
            result["runs"].append(dict(batch_size=b, **timing, new_tokens=scores["new_tokens"],
                                       tokens_per_s=scores["new_tokens"] / timing["median_s"],
                                       speedup=first[1] / timing["median_s"], identical=rows == first[0],
                                       exact_match=scores["exact_match"], contained=scores["contained"]))
    write_json(args.json, result)  # prints it too
    return result


if __name__ == "__main__":
    main()
