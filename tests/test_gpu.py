"""Certify a GPU machine in one command, after the offline install (README):

    python3 -m pytest -q -m gpu tests

With CUDA, at the released 2B shape with random weights, each a real train.py run on one GPU (NCCL):
  * LoRA, ZeRO-1, padded batches of 2, held-out evaluation; a resume from step 5 must reproduce steps 6-10 to
    1e-3 absolute; convert (its self-check: the reloaded export's logits equal the trained model's), then the
    export's batched chat answers must equal its one-by-one answers;
  * QLoRA, ZeRO-1, then convert (self-check); full fine-tuning, ZeRO-3 (one checkpoint: 26 GB at 2B);
  * a packed run; an fp16 run, 32 steps (dynamic loss scaling: its only skipped steps are counted overflows);
  * no skipped step anywhere else; varlen flash attention equal to masked SDPA; bench/gpu.py's peak memory per
    mode within 15% of the estimate, tokens/s and MFU printed.
The whole run has its own timeout (BUDGET_S, 8 minutes with CUDA) and writes one JSON report,
runs/gpu_certify/report.json (a section per test: "passed", or the test failed or did not finish).
Without CUDA the same flow runs at the tiny demo size with gloo (plumbing only) in the normal suite; fp16 (no
DeepSpeed fp16 on CPU), the kernels and the GPU figures are skipped.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CUDA = torch.cuda.is_available()
OUT = os.path.join(ROOT, "runs", "gpu_certify")
STEPS, SAVE = (10, 5) if CUDA else (4, 2)
BUDGET_S = 480 if CUDA else 1800  # the certification's own overall timeout
START = time.monotonic()
REPORT = {"cuda": CUDA, "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
          "size": "2b" if CUDA else "demo (tiny)", "tests": {}}
pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU run checks the plumbing only)")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    REPORT["elapsed_s"] = round(time.monotonic() - START, 1)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(REPORT, f, indent=1)


def section(request, **fields):
    """This test's part of the report: "passed" is set by its last line, so a failure leaves "started"."""
    REPORT["tests"][request.node.name] = {"status": "started", **fields}
    return REPORT["tests"][request.node.name]


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    from bench.realsize import write_checkpoint, write_data
    root = tmp_path_factory.mktemp("gpu")
    if CUDA:
        base = str(root / "base_2b")
        write_checkpoint(base, "2b")
    else:
        from demo import make_demo
        base, _, _ = make_demo(str(root / "demo"), n_images=16, text_only=0)
    return base, write_data(str(root / "data"), n=64), write_data(str(root / "eval"), n=8)


def sh(cmd):
    """Run a command within what is left of the overall budget."""
    left = BUDGET_S - (time.monotonic() - START)
    if left <= 1:
        pytest.fail(f"the certification's overall timeout ({BUDGET_S} s) is spent")
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)}: stopped by the certification's overall timeout ({BUDGET_S} s)")
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def train(base, data, out, mode, *extra, steps=STEPS):
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "train.py", "--model-path", base, "--data", data, "--mode", mode, "--max-steps", str(steps),
        "--save-steps", str(SAVE), "--max-length", "512", "--max-tiles", "1", "--grad-accum", "1",
        "--num-workers", "0", "--lr", "1e-4", "--output-dir", out, *extra])
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def figures(rows):
    """What the report keeps of a run: losses, median tokens/s, the skip counters of its last row."""
    return {"losses": [r["loss"] for r in rows], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            **{k: rows[-1][k] for k in ("skipped_steps", "overflow_steps", "nonfinite_steps")}}


def check_trained(rows, steps=STEPS, overflow_allowed=False):
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in rows), rows
    last = rows[-1]
    assert last["nonfinite_steps"] == 0, last
    if overflow_allowed:  # fp16: DeepSpeed skips the steps whose scaled gradient overflowed, and counts them
        assert last["skipped_steps"] == last["overflow_steps"] < steps, last
    else:
        assert last["skipped_steps"] == 0, last


def check_resume(base, data, out, mode, rows, *extra):
    """Resume from step SAVE: the steps after it reproduce the uninterrupted run's losses to 1e-3."""
    shutil.rmtree(os.path.join(out, f"iter_{STEPS}"))
    with open(os.path.join(out, "latest"), "w") as f:
        f.write(f"iter_{SAVE}")
    again = train(base, data, out, mode, *extra, "--resume", "auto")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(rows[SAVE:], again[SAVE:])]
    assert [r["step"] for r in again[SAVE:]] == list(range(SAVE + 1, STEPS + 1))
    assert max(diffs) <= 1e-3, (diffs, rows[SAVE:], again[SAVE:])
    return max(diffs)


def convert(out, export):
    """convert.py merges and writes the export, reloads it and checks its logits against the trained model's
    (its self-check; it fails the command when they differ)."""
    stdout = sh([sys.executable, "convert.py", os.path.join(out, f"iter_{STEPS}"), export])
    assert os.path.exists(os.path.join(export, "config.json"))
    return stdout.strip().splitlines()[-3:]


def test_lora_padded_eval_resume_convert_chat(request, base_and_data, tmp_path, capsys):
    rep = section(request, mode="lora", zero=1, batch=2)
    base, data, eval_data = base_and_data
    out = str(tmp_path / "lora")
    extra = ["--batch-size", "2", "--eval-data", eval_data, "--eval-steps", str(SAVE)]
    rows = train(base, data, out, "lora", *extra)
    check_trained(rows)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all(e == e for e in evals), rows
    rep.update(figures(rows), eval_loss=evals)
    rep["resume_max_abs_diff"] = check_resume(base, data, out, "lora", rows, *extra)
    export = str(tmp_path / "lora_export")
    rep["convert"] = convert(out, export)
    test_set = tmp_path / "test.jsonl"  # prompts of different lengths: the batch is padded
    questions = ["What colour is it?", "Describe the picture in one short sentence, please.", "Colour?",
                 "Is there anything in the image besides the colour red? Answer briefly.", "What is shown?",
                 "Name the colour."]
    test_set.write_text("".join(json.dumps({"image": "red.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "It is red."}]}) + "\n"
        for q in questions))
    answers = {}
    for batch in (4, 1):  # float32: a padded batch and single prompts compute the same greedy answers
        path = str(tmp_path / f"answers_{batch}.jsonl")
        sh([sys.executable, "chat.py", export, "--data", f"{test_set},{data.split(',')[1]}", "--output", path,
            "--max-new-tokens", "8", "--batch-size", str(batch), "--dtype", "float32"])
        answers[batch] = [json.loads(line) for line in open(path)]
    assert len(answers[4]) == 6 and all("error" not in r and r["tokens"] >= 1 for r in answers[4]), answers[4]
    assert [r["answer"] for r in answers[4]] == [r["answer"] for r in answers[1]]
    with capsys.disabled():
        print(f"\nlora: {rep['tokens_per_s']:.0f} tokens/s, resume max |diff| {rep['resume_max_abs_diff']:.2e}")
    rep["status"] = "passed"


def test_qlora_convert(request, base_and_data, tmp_path):
    rep = section(request, mode="qlora", zero=1, batch=1)
    base, data, _ = base_and_data
    out = str(tmp_path / "qlora")
    rows = train(base, data, out, "qlora", "--batch-size", "1")
    check_trained(rows)
    rep.update(figures(rows))
    rep["convert"] = convert(out, str(tmp_path / "qlora_export"))
    rep["status"] = "passed"


def test_full_zero3(request, base_and_data, tmp_path):
    """Full fine-tuning under ZeRO-3. At 2B a checkpoint holds 26 GB of float32 optimizer state: on the GPU one
    checkpoint at the end (the resume is certified by the LoRA run); on CPU (tiny) the resume is checked too."""
    rep = section(request, mode="full", zero=3, batch=1)
    base, data, _ = base_and_data
    out = str(tmp_path / "full")
    extra = ["--batch-size", "1", "--deepspeed", "ds_zero3.json", "--drop-path-rate", "0"]
    rows = train(base, data, out, "full", *extra, *(["--save-steps", str(STEPS)] if CUDA else []))
    check_trained(rows)
    rep.update(figures(rows))
    if not CUDA:
        rep["resume_max_abs_diff"] = check_resume(base, data, out, "full", rows, *extra)
    rep["status"] = "passed"


def test_packed(request, base_and_data, tmp_path):
    rep = section(request, mode="lora", zero=1, packing="1024 tokens")
    base, data, _ = base_and_data
    rows = train(base, data, str(tmp_path / "packed"), "lora", "--max-packed-tokens", "1024", steps=SAVE)
    check_trained(rows, steps=SAVE)
    assert all(r["samples"] >= 2 for r in rows), rows  # several samples per pack
    rep.update(figures(rows))
    rep["status"] = "passed"


@needs_cuda
def test_fp16(request, base_and_data, tmp_path):
    """fp16 from the shipped config's dynamic loss scale (2^32, hysteresis 2): the first steps overflow and are
    skipped (counted), about 20 of them at a loss near ln(vocab), until the scale fits; then steps apply."""
    rep = section(request, mode="lora", zero=1, dtype="fp16")
    base, data, _ = base_and_data
    steps = 32
    rows = train(base, data, str(tmp_path / "fp16"), "lora", "--dtype", "fp16", "--batch-size", "2", steps=steps)
    check_trained(rows, steps=steps, overflow_allowed=True)
    rep.update(figures(rows), loss_scales=[r["loss_scale"] for r in rows])
    assert rows[-1]["loss_scale"] < rows[0]["loss_scale"] or rows[-1]["overflow_steps"] == 0
    rep["status"] = "passed"


@needs_cuda
def test_varlen_flash_attention_equals_masked_sdpa(request):
    from bench.gpu import varlen_check
    rep = section(request)
    r = varlen_check(torch.device("cuda"), torch.bfloat16)
    rep.update(r)
    assert r["loss_abs_diff"] <= 2e-2 * abs(r["loss_sdpa_mask"])
    assert r["grad_max_abs_diff"] <= 5e-2 * r["grad_max_abs"]
    rep["status"] = "passed"


@needs_cuda
def test_gpu_figures_and_memory_estimate(request, capsys):
    """bench/gpu.py at 2B: per mode tokens/s, MFU, and the peak allocated memory within 15% of the estimate
    (less its fixed CUDA context and allocator allowance, which max_memory_allocated does not see)."""
    rep = section(request)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "gpu.json")
    sh([sys.executable, "bench/gpu.py", "--sizes", "2b", "--modes", "lora", "qlora", "full", "--repeats", "3",
        "--packing", "", "--no-varlen-check", "--json", path])
    rows = json.load(open(path))["results"]
    rep["modes"] = [{k: row.get(k) for k in ("mode", "tokens_per_s", "mfu", "peak_memory_gib",
                                             "memory_estimate_allocated_gib", "memory_estimate_gib", "skipped")}
                    for row in rows]
    with capsys.disabled():
        for r in rep["modes"]:
            print(f"\n2b {r['mode']}: {r['tokens_per_s'] or 0:.0f} tokens/s, MFU {r['mfu'] or 0:.1%}, peak "
                  f"{r['peak_memory_gib'] or 0:.1f} GiB, estimate {r['memory_estimate_allocated_gib']:.1f} GiB "
                  f"(+1.5 context/slack)")
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, row
        est = row["memory_estimate_allocated_gib"]
        assert abs(row["peak_memory_gib"] - est) <= 0.15 * est, row
    rep["status"] = "passed"
