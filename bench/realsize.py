"""Real-size checks on CPU: random official-format checkpoints at the released 2B / 4B / InternVL2.5-1B shapes,
then load, one LoRA and one QLoRA step of train.py, convert, and a 2-process ZeRO-3 load, each measured in its
own process.

    python3 bench/realsize.py --size 2b --out /tmp/realsize            # prints JSON
    python3 bench/realsize.py --size 2b --only write,load,estimate     # a subset
    python3 bench/realsize.py --size InternVL2_5-1B                    # Qwen2.5-0.5B, 151674 ids, tied head

Checkpoints are written tensor by tensor into bf16 shards (never the whole model in memory) with the tokenizer
files of the right family (tests/fixtures); steps use float32 compute on CPU (bf16 matmuls are very slow here)
on samples of about 300 tokens (1 tile = 256 image tokens) under --max-length 512. Bars (the project's issues):
a bf16 load peaks at <= 1.15x the checkpoint's bytes; a QLoRA load at <= the NF4 LLM + the bf16 rest + 1 GiB;
convert at <= 1.3x the export + the trained tensors. Each bar is on the whole process's peak RSS; beside it the
bf16 load reports what the load adds to the RSS it started from (load_added_ratio) and convert what it adds to
the peak of a process that only imports what it imports (added_gib): the interpreter, torch and DeepSpeed are
a fixed 0.28-0.31 GiB, a large share of a 1.75 GiB checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
GIB = 2**30
SIZES = ("2b", "4b", "InternVL2_5-1B")
# The fixture whose tokenizer files a size's checkpoint gets (grown to the released ids): its LLM family's.
FIXTURE = {"internlm2": "internlm2", "phi3": "phi3", "qwen2": "qwen2"}
TOKENIZER_FILES = {"sentencepiece": ("tokenizer.model",), "bpe": ("vocab.json", "merges.txt")}
COMMON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def write_checkpoint(out: str, size: str, shard_bytes: int = 2 * GIB, seed: int = 0) -> dict:
    """A random official-format InternVL directory at the preset's shapes, streamed tensor by tensor into
    bf16 shards named as the released ones (a tied Qwen2 head is stored too, as the released files do)."""
    import math

    import torch

    from demo import random_tensor
    from model import build_model, preset
    from model.weights import SafetensorsWriter, to_official_name, to_official_tensor
    config = preset(size)
    os.makedirs(out, exist_ok=True)
    write_tokenizer(out, FIXTURE[config.llm.family], config.img_context_token_id)
    tensors = build_model(config, "meta").state_dict()
    plan, nbytes = [[]], 0
    for name, p in tensors.items():
        t = to_official_tensor(name, p, config)  # the official layout's shape (meta: no memory)
        if plan[-1] and nbytes + 2 * t.numel() > shard_bytes:
            plan.append([])
            nbytes = 0
        plan[-1].append((name, to_official_name(name, config.llm.family), tuple(t.shape)))
        nbytes += 2 * t.numel()
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, entries in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        writer = SafetensorsWriter(os.path.join(out, fname), [(o, s, torch.bfloat16) for _, o, s in entries],
                                   metadata={"format": "pt"})
        for name, official, _ in entries:
            tied = config.llm.tie_word_embeddings and name in ("llm.embed.weight", "llm.head.weight")
            # a tied head is stored with the embedding's values: both drawn from one seed
            t = random_tensor("llm.embed.weight" if tied else name, tensors[name].shape, config,
                              torch.Generator().manual_seed(seed + 1) if tied else g)
            writer.write(official, to_official_tensor(name, t, config).to(torch.bfloat16))
            weight_map[official] = fname
            total += 2 * math.prod(t.shape)
        writer.close()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_official(), f, indent=2)
    return {"checkpoint_bytes": total, "shards": len(plan)}


def write_tokenizer(out: str, family: str, img_context_id: int) -> None:
    """The family's fixture tokenizer grown to the released vocabulary: the added tokens (<img>,
    <IMG_CONTEXT>, ...) moved to their released ids; SentencePiece: unused pieces appended to the model up to
    them, so every id the model can produce decodes (Qwen2's BPE has no such filler: ids between its 856
    pieces and the added tokens are unused)."""
    import shutil

    from demo import _piece_message, _varint
    from model.config import FAMILIES
    fixture = os.path.join(ROOT, "tests", "fixtures", family)
    kind = FAMILIES[family].tokenizer
    for name in TOKENIZER_FILES[kind] + COMMON_FILES:
        shutil.copy(os.path.join(fixture, name), out)
    with open(os.path.join(fixture, "added_tokens.json")) as f:
        added = json.load(f)
    first, shift = min(added.values()), img_context_id - added["<IMG_CONTEXT>"]
    if kind == "sentencepiece":
        with open(os.path.join(out, "tokenizer.model"), "ab") as f:  # a repeated protobuf field may continue
            for i in range(shift):
                piece = _piece_message(f"<unused_{i}>", 0.0, 4)  # USER_DEFINED
                f.write(b"\x0a" + _varint(len(piece)) + piece)
    else:
        grow_bpe(out, shift)
    with open(os.path.join(out, "added_tokens.json"), "w") as f:
        json.dump({k: v + shift for k, v in added.items()}, f)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg["added_tokens_decoder"] = {str(int(k) + shift if int(k) >= first else int(k)): v
                                   for k, v in cfg["added_tokens_decoder"].items()}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def grow_bpe(out: str, n: int) -> None:
    """Append n merges to vocab.json + merges.txt (ids after the last): every byte pair not yet a token, then
    byte triples split as ranked BPE splits them, so the files stay a valid BPE whose ids have no gap."""
    from data.bpe import bytes_to_unicode
    char = bytes_to_unicode()
    spell = lambda b: "".join(char[x] for x in b)  # noqa: E731
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    ranks = {bytes(next(k for k, v in char.items() if v == c) for c in tok): i for tok, i in vocab.items()}
    merges, next_id = [], len(vocab)

    def add(a: bytes, b: bytes) -> None:
        nonlocal next_id
        ranks[a + b] = next_id
        vocab[spell(a + b)] = next_id
        merges.append(f"{spell(a)} {spell(b)}")
        next_id += 1

    pairs = (bytes([x, y]) for x in range(256) for y in range(256))
    for p in pairs:
        if len(merges) == n:
            break
        if p not in ranks:
            add(p[:1], p[1:])
    for x in range(256):
        for y in range(256):
            for z in range(256):
                if len(merges) == n:
                    break
                t = bytes([x, y, z])
                if t not in ranks:  # ranked BPE joins the lower-ranked pair first, the left one on a tie
                    add(*((t[:2], t[2:]) if ranks[t[:2]] <= ranks[t[1:]] else (t[:1], t[1:])))
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "a", encoding="utf-8") as f:
        f.write("".join(m + "\n" for m in merges))


def write_data(out: str, n: int = 64) -> str:
    """A small LLaVA-format set: one 448x448 image per sample, short answers (fits 256 tokens with 1 tile)."""
    from PIL import Image
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    Image.new("RGB", (448, 448), (200, 40, 40)).save(os.path.join(out, "images", "red.png"))
    path = os.path.join(out, "train.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": "red.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the picture?"},
                {"from": "gpt", "value": f"It is red, sample {i}."}]}) + "\n")
    return f"{path},{os.path.join(out, 'images')}"


def child(code: str) -> dict:
    """Run `code` in a fresh Python; it prints one JSON line last; its own peak RSS is added (VmHWM: getrusage's
    ru_maxrss keeps the peak of the process before exec, here this one's, which can be the larger)."""
    wrapped = code + "\nimport json as _j\nprint(_j.dumps(dict(peak_rss_gib=next(int(line.split()[1]) for line " \
                     "in open('/proc/self/status') if line.startswith('VmHWM')) / 2**20, **RESULT)))"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", wrapped], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t0
    return out


def run_cmd(cmd: list[str], env=None) -> dict:
    """A command's wall time and peak RSS (GNU time's maximum resident set size of the child tree's largest)."""
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M"] + cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    rss = [int(line.split("=")[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB=")]
    return {"wall_s": time.time() - t0, "peak_rss_gib": rss[-1] / 2**20}


def measure_load(ckpt: str) -> dict:
    """A bf16 load; also the process's RSS before it (the interpreter, torch and the imports: the fixed part)."""
    return child(f"""
import time, torch
from model import load_pretrained
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
before = rss()
t0 = time.time(); m = load_pretrained({ckpt!r}, dtype=torch.bfloat16)
RESULT = dict(load_s=time.time() - t0, param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
              rss_before_load_gib=before / 2**30)
""")


def measure_qlora_load(ckpt: str) -> dict:
    return child(f"""
import time, torch
from functools import partial
from lora import prepare_qlora, NF4Linear, nf4_nbytes
from model import load_pretrained
t0 = time.time()
m = load_pretrained({ckpt!r}, dtype=torch.bfloat16, prepare=partial(prepare_qlora, compute_dtype=torch.float32))
nf4 = sum(nf4_nbytes(x.out_features, x.in_features) for x in m.modules() if isinstance(x, NF4Linear))
dense = sum(p.numel() * 2 for n, p in m.named_parameters() if p.is_floating_point())
RESULT = dict(load_s=time.time() - t0, nf4_bytes=nf4, dense_bf16_bytes=dense)
""")


def train_cmd(ckpt: str, data: str, out: str, mode: str) -> list[str]:
    """train.py's arguments for the CPU runs: float32, 1 tile, batch 1, no DataLoader workers."""
    return ["train.py", "--model-path", ckpt, "--data", data, "--mode", mode, "--dtype", "fp32",
            "--max-length", "512", "--max-tiles", "1", "--batch-size", "1", "--grad-accum", "1",
            "--num-workers", "0", "--output-dir", out, "--save-steps", "1000"]


def measure_step(ckpt: str, data: str, out: str, mode: str) -> dict:
    """Two steps of train.py in one process (ZeRO-1)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    r = run_cmd([sys.executable] + train_cmd(ckpt, data, out, mode) + ["--max-steps", "2"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    r["step_s"] = [row["seconds"] for row in rows]  # the first includes warm-up allocations
    r["loss"] = [row["loss"] for row in rows]
    ckpt_dir = os.path.join(out, f"iter_{rows[-1]['step']}")
    r["optimizer_file_bytes"] = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)
                                    if "optim_states" in f)
    r["checkpoint"] = ckpt_dir
    return r


def measure_zero3_load(ckpt: str, data: str, out: str, procs: int = 2) -> dict:
    """A ZeRO-3 dry run of train.py in `procs` processes (LoRA, --max-steps 0: load, build the engine, exit):
    each rank's peak RSS. torchrun starts `sh -c` per rank (--no-python), which runs train.py under GNU time
    writing that rank's peak RSS (KiB) to RSS_PREFIX.LOCAL_RANK."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    prefix = os.path.join(out, "peak_rss_kib")
    per_rank = ["sh", "-c", 'exec /usr/bin/time -f %M -o "$RSS_PREFIX.$LOCAL_RANK" "$@"', "sh", sys.executable]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "--no-python", *per_rank, *train_cmd(ckpt, data, out, "lora"), "--max-steps", "0",
           "--deepspeed", "ds_zero3.json"]
    r = run_cmd(cmd, env={"OMP_NUM_THREADS": "1", "RSS_PREFIX": prefix})
    r["rank_peak_rss_gib"] = [int(open(f"{prefix}.{i}").read().split()[-1]) / 2**20 for i in range(procs)]
    return r


def measure_convert(ckpt_dir: str, out: str) -> dict:
    """convert.py with its self-check; also the peak RSS of a process that only imports what it imports
    (convert.py and DeepSpeed's zero_to_fp32: the fixed part)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    r = run_cmd([sys.executable, "convert.py", ckpt_dir, out])
    r["export_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    r["imports_rss_gib"] = child("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); import convert\n"
                                 "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
                                 "RESULT = {}")["peak_rss_gib"]
    return r


def estimate(size: str, mode: str, *extra: str) -> dict:
    """train.py --estimate-memory's figures for the CPU runs above (float32; 1 process and ZeRO-1 unless
    `extra` options say otherwise)."""
    import options
    args = options.parse_args(["--size", size, "--mode", mode, "--dtype", "fp32", "--max-length", "512",
                               "--max-tiles", "1", "--batch-size", "1", "--gpus", "1", "--estimate-memory",
                               *extra])
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        est = options.print_memory_estimate(args)
    return {k: v / GIB for k, v in est.items()}


def zero3_expectation(size: str, procs: int = 2) -> dict:
    """What each rank of a ZeRO-3 load should hold, float32: its 1/procs of the partitioned parameters, the
    parameters of at most stage3_param_persistence_threshold elements whole (DeepSpeed keeps those on every
    rank), and the largest tensor (gathered whole while it is filled)."""
    from model import build_model, preset
    with open(os.path.join(ROOT, "ds_zero3.json")) as f:
        threshold = float(json.load(f)["zero_optimization"]["stage3_param_persistence_threshold"])
    sizes = [p.numel() for p in build_model(preset(size), "meta").parameters()]
    whole = sum(n for n in sizes if n <= threshold)
    r = dict(partitioned_share_gib=4 * (sum(sizes) - whole) / procs / GIB, persistent_gib=4 * whole / GIB,
             largest_tensor_gib=4 * max(sizes) / GIB)
    r["expected_gib"] = sum(r.values())
    return r


class Results(dict):
    """The JSON so far, rewritten to `path` after every measurement (a later one may be killed for memory)."""

    def __init__(self, path, **kw):
        super().__init__(**kw)
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2b", choices=SIZES)
    p.add_argument("--out", default="/tmp/realsize")
    p.add_argument("--only", default="write,load,qlora_load,estimate,lora_step,qlora_step,convert,zero3")
    p.add_argument("--json", help="also write the results here, after every measurement")
    args = p.parse_args(argv)
    steps = args.only.split(",")
    root = os.path.join(args.out, args.size)
    ckpt = os.path.join(root, "base")
    res = Results(args.json, size=args.size)
    if "write" in steps or not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.time()
        res["write"] = {**write_checkpoint(ckpt, args.size), "seconds": time.time() - t0}
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    res["checkpoint_gib"] = ckpt_bytes / GIB
    if "load" in steps:
        r = measure_load(ckpt)
        r["ratio_to_checkpoint"] = r["peak_rss_gib"] * GIB / ckpt_bytes
        r["bar_ok"] = r["ratio_to_checkpoint"] <= 1.15
        # what the load itself adds, without the fixed interpreter + imports (reported, not the bar)
        r["load_added_ratio"] = (r["peak_rss_gib"] - r["rss_before_load_gib"]) * GIB / ckpt_bytes
        res["load_bf16"] = r
    if "qlora_load" in steps:
        r = measure_qlora_load(ckpt)
        r["bar_gib"] = (r["nf4_bytes"] + r["dense_bf16_bytes"]) / GIB + 1
        r["bar_ok"] = r["peak_rss_gib"] <= r["bar_gib"]
        res["load_qlora"] = r
    if "estimate" in steps:
        res["estimate_gib"] = {m: estimate(args.size, m) for m in ("lora", "qlora", "full")}
    data = write_data(os.path.join(root, "data"))
    for mode in ("lora", "qlora"):
        if f"{mode}_step" in steps:
            res[f"{mode}_step"] = measure_step(ckpt, data, os.path.join(root, f"run_{mode}"), mode)
    if "zero3" in steps:
        r = measure_zero3_load(ckpt, data, os.path.join(root, "run_zero3"))
        r.update(zero3_expectation(args.size))
        r["estimate_gib"] = estimate(args.size, "lora", "--gpus", "2", "--deepspeed", "ds_zero3.json")
        res["zero3_x2_lora_load"] = r
    if "convert" in steps and "lora_step" in res:
        r = measure_convert(res["lora_step"]["checkpoint"], os.path.join(root, "converted"))
        trained = res["lora_step"]["optimizer_file_bytes"] / 3  # fp32 master = 1/3 of master + 2 moments
        r["bar_gib"] = (1.3 * r["export_bytes"] + trained) / GIB
        r["bar_ok"] = r["peak_rss_gib"] <= r["bar_gib"]
        r["ratio_to_export"] = r["peak_rss_gib"] * GIB / r["export_bytes"]
        # what convert adds to its imports, against the same bar (reported, not the bar)
        r["added_gib"] = r["peak_rss_gib"] - r["imports_rss_gib"]
        res["convert"] = r
    if "estimate_gib" in res:  # train.py --estimate-memory against what the runs above held
        cmp = {}
        if "load_bf16" in res:
            # the estimate is for float32 compute (4 bytes a parameter), the load bf16
            cmp["weights"] = res["estimate_gib"]["full"]["weights"] * GIB / (2 * res["load_bf16"]["param_bytes"])
        for mode in ("lora", "qlora"):
            if f"{mode}_step" in res:
                measured = res[f"{mode}_step"]["optimizer_file_bytes"] / GIB
                cmp[f"optimizer_{mode}"] = res["estimate_gib"][mode]["optimizer"] / measured
                cmp[f"total_{mode}_vs_peak_rss"] = res["estimate_gib"][mode]["total"] / res[f"{mode}_step"][
                    "peak_rss_gib"]
        res["estimate_over_measured"] = cmp
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
