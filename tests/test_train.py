"""train.py end to end on CPU: the demo learns, 1 vs 2 processes (ZeRO-1, ZeRO-3) agree, resume is exact, kill -9
during training or during a save loses nothing, QLoRA trains, NaN/inf and all-masked steps are skipped and counted,
and bad combinations are refused before any heavy work.

Every run is a real `python train.py` / `torchrun train.py` process. Running this file as a script is the
worker that injects faults or a deliberately mixed data order, then calls train.main().
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo base model and data set (128 samples, 96 with an image)."""
    from data.demo import make_demo
    base, annotation, folder = make_demo(str(tmp_path_factory.mktemp("demo") / "demo"), n_images=96, text_only=32)
    return base, f"{annotation},{folder}"


def common(demo, batch_size, *extra):
    base, data = demo
    return ["--model-path", base, "--data", data, "--max-tiles", "1", "--max-length", "512", "--num-workers", "0",
            "--lr", "1e-3", "--batch-size", str(batch_size), "--grad-accum", "1", "--save-steps", "100",
            "--seed", "3", *extra]


def run(args, out, nproc=1, worker=None, env=None, check=True, timeout=300):
    """Run train.py (or this file's worker) in `nproc` processes; returns (completed process, metrics rows)."""
    script = [os.path.abspath(__file__), *worker, "--"] if worker else [os.path.join(ROOT, "train.py")]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), *script]
    proc = subprocess.run(cmd + list(args) + ["--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc, metrics(out)


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def losses(rows):
    return [r["loss"] for r in rows]


# ------------------------------------------------------------------------------------------------ the demo

def test_demo_learns_and_prints_the_convert_command(tmp_path):
    proc, rows = run(["--max-steps", "40", "--save-steps", "20", "--system-message", "Be brief."],
                     tmp_path / "demo_run")
    first, last = sum(losses(rows)[:10]) / 10, sum(losses(rows)[-10:]) / 10
    print(f"demo: 40 steps, first-10 mean loss {first:.3f}, last-10 mean {last:.3f} ({last / first:.0%})")
    assert len(rows) == 40
    assert last <= 0.7 * first, (first, last)
    ckpt = tmp_path / "demo_run" / "iter_40"
    assert f"python convert.py {ckpt}" in proc.stdout
    assert (tmp_path / "demo_run" / "latest").read_text() == "iter_40"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["mode"] == "lora" and meta["step"] == 40 and meta["template"] == "internlm2-chat"
    assert meta["system_message"] == "Be brief."  # --system-message: what training used, for convert.py
    assert meta["base_model_path"] == str(tmp_path / "demo_run" / "demo" / "base")
    assert meta["lora"]["r"] == 16 and meta["versions"]["deepspeed"]
    # Frozen parameters are not in the checkpoint: only adapters and the projector.
    import torch
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(module) == set(meta["run"]["trainable"])
    assert all(".lora_" in k or k.startswith("projector.") for k in module)
    assert sorted(p.name for p in (tmp_path / "demo_run").glob("iter_*")) == ["iter_20", "iter_40"]


# ------------------------------------------------------------------------------------------------ 1 vs 2 processes

@pytest.mark.parametrize("stage", [1, 3])
def test_one_and_two_processes_agree(demo, tmp_path, stage):
    """Same global batch (1 x 4 vs 2 x 2), float32: per-step losses and grad norms agree within 1e-4.

    ZeRO-3 runs with a deliberately mixed order (worker `mixed`): one process gets image and text-only samples in
    the same micro-batch; with two, rank 0 gets only images and rank 1 only text (dummy tile): nothing hangs.
    """
    args = ["--deepspeed", os.path.join(ROOT, f"ds_zero{stage}.json"), "--max-steps", "4"]
    worker = ["mixed"] if stage == 3 else None
    mode = ["--mode", "full", "--drop-path-rate", "0"] if stage == 3 else ["--lora-dropout", "0"]  # deterministic
    _, one = run(common(demo, 4, *args, *mode), tmp_path / "one", worker=worker)
    proc, two = run(common(demo, 2, *args, *mode), tmp_path / "two", nproc=2, worker=worker)
    print(f"ZeRO-{stage} losses 1 process {losses(one)}\n{'':>16}2 processes {losses(two)}")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["samples"] == b["samples"] == 4 and a["supervised_tokens"] == b["supervised_tokens"]
    if stage == 3:
        assert all(r["image_tiles"] == 2 for r in two)  # two image samples + two text-only samples per step
    # The summary counts partitioned parameters whole, and DeepSpeed's deprecated collectives stay quiet.
    assert "FutureWarning" not in proc.stderr and "0.0M parameters" not in proc.stdout
    total = re.search(r"total +([\d,]+) / +([\d,]+)", proc.stdout)
    assert int(total[1].replace(",", "")) > 0 and int(total[2].replace(",", "")) > 100_000, proc.stdout


# ------------------------------------------------------------------------------------------------ resume and crashes

# Resumed losses match to float32 rounding, not bit for bit: the reloaded model, optimizer and scheduler state are
# bit-identical, but DeepSpeed's CPU FusedAdam rounds the first update after a reload differently in the last bit.
RESUME_ARGS = ["--max-steps", "8", "--save-steps", "2", "--save-total-limit", "2", "--lora-dropout", "0.1"]


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _, rows = run(common(demo, 4, *RESUME_ARGS), out)
    return out, rows


def test_resume_equals_uninterrupted(demo, uninterrupted, tmp_path):
    """Model, optimizer, scheduler, data position and RNG (LoRA dropout 0.1) come back: steps 5-8 are identical."""
    out_a, rows_a = uninterrupted
    assert sorted(p.name for p in out_a.glob("iter_*")) == ["iter_6", "iter_8"]  # only the newest 2 kept
    # iter_4 was deleted by the keep-2 rule in run A; resume from iter_6 into a new run directory.
    proc, rows_b = run(common(demo, 4, *RESUME_ARGS, "--resume", str(out_a / "iter_6")), tmp_path)
    assert "resumed from" in proc.stdout and [r["step"] for r in rows_b] == [7, 8]
    assert losses(rows_b) == pytest.approx(losses(rows_a)[6:], abs=5e-5)
    assert [r["lr"] for r in rows_b] == pytest.approx([r["lr"] for r in rows_a[6:]], rel=1e-9)


def test_kill_during_training_then_resume_auto(demo, uninterrupted, tmp_path):
    _, rows_a = uninterrupted
    base_cmd = [sys.executable, os.path.join(ROOT, "train.py"), *common(demo, 4, *RESUME_ARGS), "--output-dir",
                str(tmp_path)]
    proc = subprocess.Popen(base_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not any(r["step"] >= 3 for r in metrics(tmp_path)):  # iter_2 is complete by then
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in metrics(tmp_path))
    assert killed_at < 8, "the run finished before the kill landed"
    resumed, rows = run(common(demo, 4, *RESUME_ARGS, "--resume", "auto"), tmp_path)
    assert "resumed from" in resumed.stdout
    assert [r["step"] for r in rows] == list(range(1, 9))  # metrics.jsonl: rows after the checkpoint replaced
    assert losses(rows) == pytest.approx(losses(rows_a), abs=5e-5)


def test_kill_during_checkpoint_save_then_resume_auto(demo, uninterrupted, tmp_path):
    """SIGKILL after DeepSpeed wrote iter_4.tmp but before it was complete: iter_2 stays the valid one."""
    _, rows_a = uninterrupted
    proc, _ = run(common(demo, 4, *RESUME_ARGS), tmp_path, env={"INTERNVL_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert proc.returncode in (-9, 137), proc.stderr[-2000:]
    assert (tmp_path / "iter_4.tmp").is_dir() and not (tmp_path / "iter_4.tmp" / "meta.json").exists()
    assert not (tmp_path / "iter_4").exists() and (tmp_path / "latest").read_text() == "iter_2"
    resumed, rows = run(common(demo, 4, *RESUME_ARGS, "--resume", "auto"), tmp_path)
    assert f"resumed from {tmp_path / 'iter_2'} at step 2" in resumed.stdout
    assert losses(rows) == pytest.approx(losses(rows_a), abs=5e-5)
    assert not (tmp_path / "iter_4.tmp").exists()  # the partial save is cleaned up
    assert (tmp_path / "latest").read_text() == "iter_8"


def test_resume_refuses_other_settings(demo, uninterrupted, tmp_path):
    out_a, _ = uninterrupted
    proc, _ = run(common(demo, 2, *RESUME_ARGS, "--resume", str(out_a / "iter_8")), tmp_path, check=False)
    assert proc.returncode != 0 and "these settings differ" in proc.stdout + proc.stderr
    assert "'batch_size': (4, 2)" in proc.stdout + proc.stderr
    proc, _ = run(common(demo, 4, *RESUME_ARGS, "--max-steps", "12", "--resume", str(out_a / "iter_8")), tmp_path,
                  check=False)  # a longer schedule would move the LR of a finished cosine back up: refused
    assert proc.returncode != 0 and "cannot resume" in proc.stderr and "with --max-steps 12" in proc.stderr
    assert "planned for --max-steps 8" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ QLoRA

def test_qlora_trains_on_the_demo(demo, tmp_path):
    _, rows = run(common(demo, 4, "--mode", "qlora", "--max-steps", "12", "--lr", "2e-3", "--save-steps", "12"),
                  tmp_path)
    first, last = sum(losses(rows)[:3]) / 3, sum(losses(rows)[-3:]) / 3
    print(f"QLoRA: first-3 mean loss {first:.3f}, last-3 mean {last:.3f}")
    assert last < 0.85 * first
    import torch
    module = torch.load(tmp_path / "iter_12" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(".lora_" in k or k.startswith("projector.") for k in module)  # no 4-bit base in the checkpoint
    assert json.loads((tmp_path / "iter_12" / "meta.json").read_text())["mode"] == "qlora"


def test_packing_trains_one_epoch_with_an_exact_schedule(demo, tmp_path):
    """--max-packed-tokens: every sample once in the epoch, and the LR schedule ends exactly at its last pack."""
    _, rows = run(common(demo, 1, "--max-packed-tokens", "1024", "--epochs", "1", "--warmup-ratio", "0"), tmp_path)
    assert sum(r["samples"] for r in rows) == 128  # the demo fixture's 128 samples, each exactly once
    assert rows[-1]["samples_seen"] == 128 and rows[-1]["lr"] < 1e-3 * 1e-3  # cosine reached 0 at the last step
    assert all(r["tokens"] <= 1024 for r in rows) and max(r["samples"] for r in rows) > 1
    first, last = sum(losses(rows)[:5]) / 5, sum(losses(rows)[-5:]) / 5
    print(f"packing: {len(rows)} packs for 128 samples, first-5 mean loss {first:.3f}, last-5 {last:.3f}")
    assert last < first
    _refused([*common(demo, 4, "--max-packed-tokens", "1024"), "--output-dir", str(tmp_path / "x")],
             r"--batch-size must be 1, not 4")
    _refused([*common(demo, 1, "--max-packed-tokens", "256"), "--output-dir", str(tmp_path / "y")],
             r"--max-packed-tokens 256 is below --max-length 512")


# ------------------------------------------------------------------------------------------------ NaN / all-masked

def test_nonfinite_and_all_masked_steps_are_skipped_and_counted(demo, tmp_path):
    # the 4th batch has every label masked (no forward), so forward calls 3 and 5 are steps 3 (NaN) and 6 (inf)
    _, rows = run(common(demo, 4, "--max-steps", "7"), tmp_path, worker=["faults", "3,5", "4"])
    by_step = {r["step"]: r for r in rows}
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert math.isnan(by_step[3]["loss"]) and by_step[3]["nonfinite_steps"] == 1 and by_step[3]["skipped_steps"] == 1
    assert by_step[4]["loss"] is None and by_step[4]["supervised_tokens"] == 0  # all-masked: no forward
    assert by_step[4]["all_masked_steps"] == 1 and by_step[4]["all_masked_micro_batches"] == 1
    assert not math.isfinite(by_step[6]["loss"])
    assert rows[-1]["nonfinite_steps"] == 2 and rows[-1]["all_masked_steps"] == 1 and rows[-1]["skipped_steps"] == 3
    assert all(math.isfinite(by_step[s]["loss"]) for s in (1, 2, 5, 7))


def test_several_nonfinite_steps_in_a_row_abort(demo, tmp_path):
    proc, _ = run(common(demo, 4, "--max-steps", "8", "--max-bad-steps", "3"), tmp_path,
                  worker=["faults", "2,3,4,5,6,7,8", ""], check=False)
    assert proc.returncode != 0
    assert "aborting: 3 optimizer steps in a row had a NaN/inf loss" in proc.stderr


def test_data_problems_are_counted_per_run_and_printed_capped(demo, tmp_path, capsys):
    import shutil

    import train
    warn = train.Warnings(0, cap=3)
    for i in range(7):
        warn("kind", f"problem {i}")
    err = capsys.readouterr().err
    assert err.count("warning: problem") == 3 and "the last 'kind' warning shown" in err
    # End to end: one unreadable image, 2 DataLoader workers (restarted every epoch), 3 epochs.
    base, data = demo
    annotation, folder = data.split(",")
    records = [json.loads(line) for line in open(annotation)]
    records = [r for r in records if "image" in r][:8] + [r for r in records if "image" not in r][:4]
    shutil.copytree(folder, tmp_path / "data")
    (tmp_path / "data" / records[0]["image"]).write_bytes(b"not a png")
    with open(tmp_path / "data" / "few.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    few = (base, f"{tmp_path / 'data' / 'few.jsonl'},{tmp_path / 'data'}")
    proc, rows = run(common(few, 2, "--num-workers", "2", "--max-steps", "18"), tmp_path / "out")
    assert rows[-1]["epoch"] == 2 and rows[-1]["image_failures"] == rows[-1]["replaced_samples"] == 3
    assert "replaced 3 samples (3 unreadable images" in proc.stdout
    assert proc.stderr.count("warning: replaced sample few:") == 3 and "skipping sample" not in proc.stderr


# ------------------------------------------------------------------------------------------------ refusals

def _refused(argv, match):
    import train
    t0 = time.time()
    with pytest.raises(SystemExit, match=match):
        train.main(argv)
    assert time.time() - t0 < 30  # refused before any model or data is loaded


def test_bad_combinations_are_refused_before_any_heavy_work(demo, tmp_path):
    base, data = demo
    out = ["--output-dir", str(tmp_path)]
    _refused(["--size", "4b", "--model-path", base, "--data", data, *out],
             r"--size 4b but .* has the 2b architecture \(LLM internlm2, ViT layer_norm\)")
    fixture = os.path.join(ROOT, "tests", "fixtures", "internlm2")  # InternViT-6B style: the 26b architecture
    _refused(["--size", "2b", "--model-path", fixture, "--data", data, *out], r"--size 2b but .* has the 26b")
    _refused(["--data", data, *out], r"--model-path is missing")
    _refused(["--model-path", str(tmp_path / "nowhere"), "--data", data, *out], r"nowhere: no config.json")
    _refused(["--model-path", base, *out], r"no training data")
    _refused(["--model-path", base, "--data", str(tmp_path / "missing.jsonl"), *out],
             r"data file .*missing.jsonl does not exist")
    _refused(["--model-path", base, "--data", data, "--mode", "qlora", "--deepspeed",
              os.path.join(ROOT, "ds_zero3.json"), *out], r"QLoRA with ZeRO-3 is not supported")
    _refused(["--model-path", base, "--data", data, "--deepspeed", str(tmp_path / "ds.json"), *out],
             r"ds.json: no such file")
    _refused(["--model-path", base, "--data", data, "--freeze-llm", *out], r"--freeze-llm is for --mode full")
    _refused(["--model-path", base, "--data", data, "--resume", str(tmp_path), *out], r"not a complete checkpoint")
    (tmp_path / "iter_5").mkdir()
    (tmp_path / "iter_5" / "meta.json").write_text("{}")
    _refused(["--model-path", base, "--data", data, *out], r"already holds checkpoints \(iter_5\): pass --resume auto")


def test_help_fits_100_columns_and_every_option_says_its_default(capsys):
    import argparse

    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 50 and max(len(line) for line in lines) <= 100
    for a in train.build_parser()._actions:
        if a.help != argparse.SUPPRESS and a.dest != "help":
            assert "default" in a.help.lower(), a.option_strings
    for script in ("chat.py", "convert.py"):  # their options say their defaults too
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert max(len(line) for line in out.splitlines()) <= 100, script
        assert out.count("default") >= {"chat.py": 12, "convert.py": 6}[script], out


def test_worker_default_follows_the_cores(monkeypatch):
    import train

    def workers():
        args = train.parse_args(["--size", "2b"])
        args.demo = False
        return train.fill_defaults(args).num_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert workers() == 4


# ------------------------------------------------------------------------------------------------ workers

def _mixed_steps(self, epoch):
    """Each step: two image samples then two text-only samples, split into micro-batches in that order."""
    img = [i for i, m in enumerate(self.is_image) if m]
    txt = [i for i, m in enumerate(self.is_image) if not m]
    steps = []
    for k in range(0, min(len(img), len(txt)) - 1, 2):
        batch = [img[k], img[k + 1], txt[k], txt[k + 1]]
        steps.append([batch[j:j + self.batch_size] for j in range(0, 4, self.batch_size)])
    return steps


def _inject_faults(bad_calls, masked_batches):
    """Forward calls in `bad_calls` return a NaN (odd position) or inf loss; batches in `masked_batches` (1-based,
    collate calls) get every label masked."""
    import torch

    import data
    from model.internvl import InternVL
    forward, collate, calls = InternVL.forward, data.collate, {"forward": 0, "collate": 0}

    def bad_forward(self, *a, **k):
        out = forward(self, *a, **k)
        calls["forward"] += 1
        if calls["forward"] in bad_calls:
            out.loss = out.loss * (float("nan") if bad_calls.index(calls["forward"]) % 2 == 0 else float("inf"))
        return out

    def masking_collate(samples):
        batch = collate(samples)
        calls["collate"] += 1
        if calls["collate"] in masked_batches:
            batch["labels"] = torch.full_like(batch["labels"], -100)
            batch["meta"]["num_supervised"] = 0
        return batch

    InternVL.forward, data.collate = bad_forward, masking_collate


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    import train
    if kind == "mixed":
        import data
        data.LengthGroupedSampler.steps = _mixed_steps
    elif kind == "faults":
        parse = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
        _inject_faults(parse(sys.argv[2]), parse(sys.argv[3]))
    train.main(rest)
