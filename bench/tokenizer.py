"""Tokenizer throughput on LLaVA-like conversations: Qwen2's byte-level BPE (tiktoken) against the sentencepiece
tokenizers, on the texts of bench/data.py's scale records (1-5 turns, 10-120 words per answer, a long tail of
rare words), each rendered with its tokenizer's template as the dataset renders it (no image tokens).

    python3 bench/tokenizer.py                       # 1500 records (1.9M tokens each), the four fixture tokenizers
    python3 bench/tokenizer.py --index 5000          # also the index build of 5,000 scale records per tokenizer

Times, per tokenizer, the two calls the data pipeline makes: encode_with_offsets (build_sample, every sample
every epoch) and count_tokens (the index's length estimates, once per record), each over all records, best of
--runs taken in turns. Prints tokens/s and characters/s, and each tokenizer's rate over the InternLM2
sentencepiece one's. The fixture tokenizers are tiny (512-868 tokens), so they make more, shorter tokens per
word than the released ones.

--index N writes bench/data.py's scale annotation of N records (with its image files) and builds the dataset's
index of it with each tokenizer, in one process (index_workers 1), each time with a freshly loaded tokenizer (its
count caches cold, as at a real first start): the CPU seconds, best of --runs taken in turns, and their ratio to
InternLM2's.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.data import WORDS, make_scale_annotation  # noqa: E402
from data import Source, SupervisedDataset, load_tokenizer  # noqa: E402
from data.dataset import Conversation, conversation_text  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TOKENIZERS = {"internlm2": "internlm2-chat", "phi3": "phi3-chat", "llama": "Hermes-2", "qwen2": "internvl2_5"}


def conversations(n, seed=0):
    """The turns of bench/data.py make_scale_annotation's records (same generator, same seed)."""
    rng = random.Random(seed)
    words = WORDS + [f"w{k}" for k in range(3000)]
    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 5)):
            q = " ".join(rng.choices(words, k=rng.randint(4, 25))).capitalize() + "?"
            a = " ".join(rng.choices(words, k=rng.randint(10, 120))).capitalize() + "."
            turns.append((q, a))
        out.append(Conversation([], turns))
    return out


def rate(fn, texts):
    """(tokens/s, chars/s, tokens) of one pass of fn over all texts."""
    t0 = time.perf_counter()
    tokens = sum(fn(t) for t in texts)
    seconds = time.perf_counter() - t0
    return tokens / seconds, sum(map(len, texts)) / seconds, tokens


def index_seconds(records, runs):
    """{tokenizer: best CPU seconds of a cold index build of `records` scale records} (module docstring)."""
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        annotation = os.path.join(tmp, "scale.jsonl")
        make_scale_annotation(annotation, tmp, records)
        for _ in range(runs):
            for name, template in TOKENIZERS.items():
                tok = load_tokenizer(os.path.join(FIXTURES, name))
                t0 = time.process_time()
                SupervisedDataset([Source(annotation, tmp)], tok, template, index_workers=1)
                best[name] = min(best.get(name, float("inf")), time.process_time() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1500)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--index", type=int, default=0, metavar="N",
                   help="also time the index build of N scale records per tokenizer")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    convs = conversations(args.records)
    toks = {name: load_tokenizer(os.path.join(FIXTURES, name)) for name in TOKENIZERS}
    texts = {name: [conversation_text(c, template, [], None)[0] for c in convs]
             for name, template in TOKENIZERS.items()}
    best = {}
    for _ in range(args.runs):  # the tokenizers take turns, so a change of load hits them alike
        for name, tok in toks.items():
            for call, fn in (("encode", lambda t: len(tok.encode_with_offsets(t)[0])), ("count", tok.count_tokens)):
                r = rate(fn, texts[name])
                best[name, call] = max(best.get((name, call), r), r)
    rows = {name: {"template": TOKENIZERS[name], "tokens": best[name, "encode"][2],
                   "encode_tokens_per_s": round(best[name, "encode"][0]),
                   "encode_chars_per_s": round(best[name, "encode"][1]),
                   "count_tokens_per_s": round(best[name, "count"][0]),
                   "count_chars_per_s": round(best[name, "count"][1])} for name in TOKENIZERS}
    base = rows["internlm2"]
    for row in rows.values():
        row["encode_vs_internlm2"] = round(row["encode_tokens_per_s"] / base["encode_tokens_per_s"], 2)
        row["count_vs_internlm2"] = round(row["count_tokens_per_s"] / base["count_tokens_per_s"], 2)
    for name, row in rows.items():
        print(f"{name:10s} {row['tokens']:>11,d} tokens  encode_with_offsets {row['encode_tokens_per_s']:>10,d} tok/s "
              f"(x{row['encode_vs_internlm2']:.2f})  count_tokens {row['count_tokens_per_s']:>10,d} tok/s "
              f"(x{row['count_vs_internlm2']:.2f})")
    if args.index:
        seconds = index_seconds(args.index, args.runs)
        for name, row in rows.items():
            row["index_cpu_s"] = round(seconds[name], 3)
            row["index_vs_internlm2"] = round(seconds[name] / seconds["internlm2"], 2)
            print(f"{name:10s} index of {args.index:,d} records {row['index_cpu_s']:.2f} s CPU "
                  f"(x{row['index_vs_internlm2']:.2f} InternLM2's time)")
    result = {"records": args.records, "runs": args.runs, "index_records": args.index,
              "load_avg_1m": os.getloadavg()[0], "tokenizers": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
