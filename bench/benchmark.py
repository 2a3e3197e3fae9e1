"""chat.py --benchmark throughput: items/s of an official benchmark run per batch size, and whether the answers equal.

    python bench/benchmark.py [MODEL_DIR] [--benchmark textvqa_val --data FILE[,IMAGE_FOLDER]] --batch-sizes 1 8

Without MODEL_DIR: the demo base model (tiny, random weights), written to a temporary directory. Without --data:
a TextVQA-style file of --items questions about the demo's held-out images (10 references each, the demo's own
answers), asked as textvqa_val (official prompt, max_new_tokens 10). For each batch size: the median wall time of
the whole run (after a warm-up run), items/s, new tokens/s, the speed-up over the first batch size, `identical`
(every answer and score equal to those of the first batch size) and the official score line.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import benchmarks  # noqa: E402
from bench.common import environment, time_median, write_json  # noqa: E402
from data import load_tokenizer  # noqa: E402
from model import load_pretrained  # noqa: E402


def demo_file(folder: str, n: int, path: str) -> str:
    """n TextVQA-style questions on the demo's held-out images, with their answers as the 10 references."""
    qa = {"What colour is the shape?", "What shape is in the picture?", "Where is the shape?"}
    out = []
    for line in open(os.path.join(folder, "eval.jsonl")):
        rec = json.loads(line)
        turns = rec["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["value"].replace("<image>\n", "")
            if "image" in rec and question in qa and len(out) < n:
                out.append(dict(image=rec["image"], question=question, question_id=len(out),
                                answer=[a["value"]] * 10))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return f"{path},{folder}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--benchmark", default="textvqa_val")
    ap.add_argument("--data", help="FILE[,IMAGE_FOLDER] (default: demo questions)")
    ap.add_argument("--annotation")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = args.model_dir, args.data
        if model_dir is None or data is None:
            from demo import make_demo
            base, _, folder = make_demo(os.path.join(tmp, "demo"), n_images=8, text_only=4)
            model_dir = model_dir or base
            data = data or demo_file(folder, args.items, os.path.join(tmp, "bench.jsonl"))
        bench = benchmarks.get_benchmark(args.benchmark)
        items = benchmarks.read_items(bench, data, args.annotation)
        model, tokenizer = load_pretrained(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
        result = {"benchmark": bench.name, "items": len(items), "model": model_dir, "runs": [], **environment()}
        first = None
        for b in args.batch_sizes:
            out, summary = os.path.join(tmp, f"b{b}.jsonl"), {}
            timing = time_median(lambda: summary.update(benchmarks.run(model, tokenizer, bench, items, out, b,
                                                                       progress=False)), args.repeats)
            rows = [(r.get("answer"), r.get("score")) for r in map(json.loads, open(out))]
            first = first or (rows, timing["median_s"])
            result["runs"].append(dict(batch_size=b, **timing, items_per_s=summary["answered"] / timing["median_s"],
                                       new_tokens=summary["new_tokens"],
                                       tokens_per_s=summary["new_tokens"] / timing["median_s"],
                                       speedup=first[1] / timing["median_s"], identical=rows == first[0],
                                       official=summary["official"]))
    write_json(args.json, result)  # prints it too
    return result


if __name__ == "__main__":
    main()
