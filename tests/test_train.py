"""train.py end to end on CPU: the demo learns, 1 vs 2 processes (ZeRO-1, ZeRO-3) agree, resume is exact, kill -9
during training or during a save loses nothing, QLoRA trains, NaN/inf and all-masked steps are skipped and counted,
and bad combinations are refused before any heavy work.

Every run is a real `python train.py` / `torchrun train.py` process. Running this file as a script is the
worker that injects faults, a kill in the middle of a save or a deliberately mixed data order, then calls
train.main().
"""
import json
import math
import os
import re
import shutil
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
    from demo import make_demo
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
    # a session of its own: a run that hangs (a collective one rank never joins) is killed whole at the timeout
    with subprocess.Popen(cmd + list(args) + ["--output-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [p.pid, *_descendants(p.pid)]:  # torchrun starts each rank in a session of its own
                os.kill(pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (a hang?), killed:\n"
                                 f"{stdout[-3000:]}\n{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc, metrics(out)


def _descendants(pid):
    """The processes below pid (from /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def losses(rows):
    return [r["loss"] for r in rows]


# ------------------------------------------------------------------------------------------------ the demo

def test_demo_learns_and_prints_the_convert_command(tmp_path):
    proc, rows = run(["--max-steps", "40", "--save-steps", "20", "--system-message", "Be brief.", "--eval-steps",
                      "20"], tmp_path / "demo_run", timeout=900)
    first, last = sum(losses(rows)[:10]) / 10, sum(losses(rows)[-10:]) / 10
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]  # the demo's own held-out eval.jsonl
    print(f"demo: 40 steps, first-10 mean loss {first:.3f}, last-10 mean {last:.3f} ({last / first:.0%}); "
          f"eval_loss at 20, 40: {evals}")
    assert len(rows) == 40
    assert last <= 0.7 * first, (first, last)
    assert len(evals) == 2 and evals[1] < evals[0]
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

RESUME_ARGS = ["--max-steps", "8", "--save-steps", "2", "--save-total-limit", "2", "--lora-dropout", "0.1"]


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    out, extensions = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("torch_extensions")
    _, rows = run(common(demo, 4, *RESUME_ARGS), out, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    return out, rows, extensions


def test_nothing_is_compiled_at_run_time(uninterrupted):
    """torch's AdamW through DeepSpeed (torch_adam) and plain gloo: no DeepSpeed op is JIT-built on a first run
    (it was FusedAdam and the shared-memory allreduce: minutes and 2 GB of compiler memory)."""
    assert os.listdir(uninterrupted[2]) == []


def test_resume_equals_uninterrupted(demo, uninterrupted, tmp_path):
    """Model, optimizer, scheduler, data position and RNG (LoRA dropout 0.1) come back: steps 5-8 are identical."""
    out_a, rows_a, _ = uninterrupted
    assert sorted(p.name for p in out_a.glob("iter_*")) == ["iter_6", "iter_8"]  # only the newest 2 kept
    # iter_4 was deleted by the keep-2 rule in run A; resume from iter_6 into a new run directory, the data given
    # by a relative path this time (run A had it absolute): the same data resumes.
    base, data = demo
    relative = (base, ",".join(os.path.relpath(p, ROOT) for p in data.split(",")))
    assert relative[1] != data
    proc, rows_b = run(common(relative, 4, *RESUME_ARGS, "--resume", str(out_a / "iter_6")), tmp_path)
    assert "resumed from" in proc.stdout and [r["step"] for r in rows_b] == [7, 8]
    assert losses(rows_b) == losses(rows_a)[6:]  # bit for bit (torch's AdamW; DeepSpeed's CPU FusedAdam was not)
    assert [r["lr"] for r in rows_b] == pytest.approx([r["lr"] for r in rows_a[6:]], rel=1e-9)


def test_kill_during_training_then_resume_auto(demo, uninterrupted, tmp_path):
    _, rows_a, _ = uninterrupted
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


def test_ctrl_c_prints_one_line_and_resume_auto_continues_exactly(demo, uninterrupted, tmp_path):
    """SIGINT in the middle of training: no traceback, exit 130, one line naming the newest complete checkpoint
    and --resume auto; resuming gives the uninterrupted run's losses."""
    _, rows_a, _ = uninterrupted
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common(demo, 4, *RESUME_ARGS),
                             "--output-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not any(r["step"] >= 3 for r in metrics(tmp_path)):  # iter_2 is complete by then
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert max(r["step"] for r in metrics(tmp_path)) < 8, "the run finished before Ctrl-C landed"
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    m = re.search(r"interrupted; the newest complete checkpoint is (.*iter_(\d+)): run the same command with "
                  r"--resume auto to continue exactly from step (\d+)", err)
    assert m and m.group(2) == m.group(3) and os.path.isdir(m.group(1)), err[-3000:]
    _, rows = run(common(demo, 4, *RESUME_ARGS, "--resume", "auto"), tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert losses(rows) == pytest.approx(losses(rows_a), abs=5e-5)


def test_kill_during_checkpoint_save_then_resume_auto(demo, uninterrupted, tmp_path):
    """SIGKILL after DeepSpeed wrote iter_4.tmp but before it was complete: iter_2 stays the valid one."""
    _, rows_a, _ = uninterrupted
    proc, _ = run(common(demo, 4, *RESUME_ARGS), tmp_path, worker=["kill-in-save", "4"], check=False)
    assert proc.returncode in (-9, 137), proc.stderr[-2000:]
    assert (tmp_path / "iter_4.tmp").is_dir() and not (tmp_path / "iter_4.tmp" / "meta.json").exists()
    assert not (tmp_path / "iter_4").exists() and (tmp_path / "latest").read_text() == "iter_2"
    resumed, rows = run(common(demo, 4, *RESUME_ARGS, "--resume", "auto"), tmp_path)
    assert f"resumed from {tmp_path / 'iter_2'} at step 2" in resumed.stdout
    assert losses(rows) == pytest.approx(losses(rows_a), abs=5e-5)
    assert not (tmp_path / "iter_4.tmp").exists()  # the partial save is cleaned up
    assert (tmp_path / "latest").read_text() == "iter_8"


def test_resume_refuses_other_settings(demo, uninterrupted, tmp_path):
    out_a, _, _ = uninterrupted
    proc, _ = run(common(demo, 2, *RESUME_ARGS, "--resume", str(out_a / "iter_8")), tmp_path, check=False)
    assert proc.returncode != 0 and "these settings differ" in proc.stdout + proc.stderr
    assert "'batch_size': (4, 2)" in proc.stdout + proc.stderr
    proc, _ = run(common(demo, 4, *RESUME_ARGS, "--max-steps", "12", "--resume", str(out_a / "iter_8")), tmp_path,
                  check=False)  # a longer schedule would move the LR of a finished cosine back up: refused
    assert proc.returncode != 0 and "cannot resume" in proc.stderr and "with --max-steps 12" in proc.stderr
    assert "planned for --max-steps 8" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_what_changes_the_order_or_the_schedule(demo, uninterrupted, tmp_path, monkeypatch):
    """Refused before the model loads: another system message (every sample's tokens, so lengths and order),
    another warmup ratio, lr or weight decay (the checkpoint's scheduler and optimizer state would override them
    silently), and samples whose length estimates differ from the checkpoint's (the sampler's own check)."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train.main sets them: undo
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    ckpt = uninterrupted[0] / "iter_8"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["data"]["sampler"]["position"] == meta["data"]["micro_batches_in_epoch"]
    argv = [*common(demo, 4, *RESUME_ARGS), "--output-dir", str(tmp_path / "out"), "--resume"]
    for extra, change in [(["--system-message", "Be brief."], r"'system_message': \('[^']+', 'Be brief.'\)"),
                          (["--warmup-ratio", "0.1"], r"'warmup_ratio': \(0.03, 0.1\)"),
                          (["--lr", "2e-3"], r"'lr': \(0.001, 0.002\)"),
                          (["--weight-decay", "0.1"], r"'weight_decay': \(0.01, 0.1\)")]:
        _refused([*argv, str(ckpt), *extra], rf"cannot resume .*these settings differ .*{change}")
    # a checkpoint written before these settings were in meta["run"] is still checked (from meta["args"])
    old = tmp_path / "old" / "iter_8"
    old.mkdir(parents=True)
    for k in ("system_message", "warmup_ratio", "lr", "weight_decay"):
        del meta["run"][k]
    (old / "meta.json").write_text(json.dumps(meta))
    _refused([*argv, str(old), "--warmup-ratio", "0.1"], r"'warmup_ratio': \(0.03, 0.1\)")
    meta["data"]["sampler"]["samples_sha1"] = "0" * 40  # the index estimated other lengths for the same records
    (old / "meta.json").write_text(json.dumps(meta))
    _refused([*argv, str(old)], r"^error: .*iter_8: cannot resume the sampler: saved samples_sha1=0{40} but this "
                                r"run has [0-9a-f]{40} .*the samples' length estimates or modalities differ")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_resume_refuses_changed_data_behind_the_same_path(demo, uninterrupted, tmp_path):
    import checkpoint
    from data import Source
    base, data = demo
    annotation, folder = data.split(",")
    copy = tmp_path / "train.jsonl"
    shutil.copy(annotation, copy)
    meta = json.loads((uninterrupted[0] / "iter_8" / "meta.json").read_text())
    meta["run"]["data"] = checkpoint.data_identity([Source(str(copy), folder)])
    (tmp_path / "ck" / "iter_8").mkdir(parents=True)
    (tmp_path / "ck" / "iter_8" / "meta.json").write_text(json.dumps(meta))
    with open(copy, "a") as f:
        f.write(open(annotation).readline())
    _refused(["--model-path", base, "--data", f"{copy},{folder}", "--resume", str(tmp_path / "ck" / "iter_8"),
              "--output-dir", str(tmp_path / "out")],
             r"cannot resume .*iter_8: .*train.jsonl changed since the checkpoint \(size \d+ -> \d+ bytes")
    assert not (tmp_path / "out").exists()


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
    assert rows[-1]["samples_seen"] == 128
    n = len(rows)  # no warmup, cosine from 1e-3 over exactly the epoch's packs: step k updates with lr(k - 1)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / n)) for k in range(n)])
    assert all(r["tokens"] <= 1024 for r in rows) and max(r["samples"] for r in rows) > 1
    assert rows[-1]["over_budget_packs"] == 0  # the estimates are exact
    first, last = sum(losses(rows)[:5]) / 5, sum(losses(rows)[-5:]) / 5
    print(f"packing: {len(rows)} packs for 128 samples, first-5 mean loss {first:.3f}, last-5 {last:.3f}")
    assert last < first
    _refused([*common(demo, 4, "--max-packed-tokens", "1024"), "--output-dir", str(tmp_path / "x")],
             r"--batch-size must be 1, not 4")
    _refused([*common(demo, 1, "--max-packed-tokens", "256"), "--output-dir", str(tmp_path / "y")],
             r"--max-packed-tokens 256 is below --max-length 512")


def test_a_sample_over_the_pack_tile_budget_is_an_error_line(demo, tmp_path):
    """2 tiles per image (no thumbnail) cannot fit --max-packed-tiles 1: one `error:` line naming a sample."""
    proc, _ = run(common(demo, 1, "--max-packed-tokens", "1024", "--max-packed-tiles", "1", "--min-tiles", "2",
                         "--max-tiles", "2", "--no-thumbnail", "--max-length", "1024"), tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^error: --max-packed-tiles 1 is below the 2 image tiles of sample train:\d+ \(96 "
                     r"sample\(s\) over it\)", proc.stderr, re.M), proc.stderr[-3000:]


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
    # The schedule follows the loop step through the skips (warmup ceil(0.03 x 7) = 1 step, then cosine): the
    # logged lr is the one step s updated with, and the checkpoint's scheduler is at the run's last step.
    expected = [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 6)) for s in range(1, 7)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    import torch
    state = torch.load(tmp_path / "iter_7" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == 7


def test_several_nonfinite_steps_in_a_row_abort(demo, tmp_path):
    proc, _ = run(common(demo, 4, "--max-steps", "8", "--max-bad-steps", "3"), tmp_path,
                  worker=["faults", "2,3,4,5,6,7,8", ""], check=False)
    assert proc.returncode != 0
    assert "aborting: 3 optimizer steps in a row had a NaN/inf loss" in proc.stderr


# ------------------------------------------------------------------------------------------------ options

@pytest.fixture(scope="module")
def tiled(demo, tmp_path_factory):
    """The demo base whose config.json asks for exactly 2 tiles and no thumbnail (the demo images are square,
    so the old fixed defaults, 1..12 tiles with a thumbnail, give 1 tile), and two short runs on it:
    A = --lora-r 64 --lora-targets wqkv --lora-vit --unfreeze-vit-layers 1 (checkpoints 2 and 3);
    B = --thumbnail --lora-alpha 8 --unfreeze-vit-layers 0."""
    import shutil
    base, data = demo
    out = tmp_path_factory.mktemp("tiled")
    shutil.copytree(base, out / "base")
    cfg = json.loads((out / "base" / "config.json").read_text())
    cfg.update(min_dynamic_patch=2, max_dynamic_patch=2, use_thumbnail=False)
    (out / "base" / "config.json").write_text(json.dumps(cfg))
    args = ["--model-path", str(out / "base"), "--data", data, "--max-length", "1024", "--num-workers", "0",
            "--batch-size", "4", "--grad-accum", "1", "--seed", "3", "--lora-dropout", "0"]
    _, a = run([*args, "--max-steps", "3", "--save-steps", "2", "--lora-r", "64", "--lora-targets", "wqkv",
                "--lora-vit", "--unfreeze-vit-layers", "1"], out / "a")
    _, b = run([*args, "--max-steps", "2", "--thumbnail", "--lora-alpha", "8", "--unfreeze-vit-layers", "0"],
               out / "b")
    meta = lambda run_dir: json.loads((out / run_dir / "iter_2" / "meta.json").read_text())  # noqa: E731
    return dict(a=(a, meta("a"), out / "a"), b=(b, meta("b"), out / "b"))


def test_lora_alpha_follows_r_unless_given(tiled):
    assert tiled["a"][1]["lora"]["r"] == 64 and tiled["a"][1]["lora"]["alpha"] == 128  # 2r: scale 2
    assert tiled["b"][1]["lora"]["r"] == 16 and tiled["b"][1]["lora"]["alpha"] == 8


def test_unfreeze_vit_layers_k_and_0(tiled):
    """Official semantics: K trains ViT layers K.. (under ViT LoRA, their base weights too); 0 = none."""
    base_vit = lambda meta: sorted({n.split(".")[2] for n in meta["run"]["trainable"]  # noqa: E731
                                    if n.startswith("vit.") and ".lora_" not in n})
    assert base_vit(tiled["b"][1]) == []
    assert base_vit(tiled["a"][1]) == ["1"]
    assert "vit.layers.1.attn.qkv.base.weight" in tiled["a"][1]["run"]["trainable"]


def test_lora_targets_with_lora_vit_keeps_both(tiled):
    adapted = {n.rsplit(".", 1)[0] for n in tiled["a"][1]["run"]["trainable"] if ".lora_" in n}
    assert adapted == {f"vit.layers.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                         "mlp.fc2")} | {
        f"llm.layers.{i}.attn.qkv" for i in (0, 1)}


def test_merge_keeps_the_trained_vit_layers(tiled):
    """convert.py on run A: the unfrozen ViT layer is exported as its trained weight + s * B @ A."""
    import torch

    import convert
    from lora import merged_weight
    from model import load_config
    from model.weights import iter_checkpoint
    _, meta, run_dir = tiled["a"]
    out = run_dir.parent / "a-converted"
    convert.convert(convert.parse_args([str(run_dir / "iter_2"), str(out)]), log=lambda *a: None)
    trained = torch.load(run_dir / "iter_2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = dict(iter_checkpoint(str(out), load_config(str(out))))
    m = "vit.layers.1.attn.qkv"
    w = trained[m + ".base.weight"]
    expect = merged_weight(w, trained[m + ".lora_A"], trained[m + ".lora_B"], 2.0).bfloat16()
    assert torch.equal(exported[m + ".weight"], expect)
    base = dict(iter_checkpoint(meta["base_model_path"], load_config(meta["base_model_path"])))
    assert not torch.equal(base[m + ".weight"], w.bfloat16())  # training moved it: the test can tell


def test_tiling_follows_config_json_unless_a_flag_says_otherwise(tiled):
    rows_a, meta_a, _ = tiled["a"]
    rows_b, meta_b, _ = tiled["b"]
    assert meta_a["tiling"] == {"min_dynamic_patch": 2, "max_dynamic_patch": 2, "use_thumbnail": False,
                                "force_image_size": 224}  # the demo base's
    assert meta_b["tiling"]["use_thumbnail"] is True
    assert any(r["image_tiles"] for r in rows_a) and any(r["image_tiles"] for r in rows_b)
    assert all(r["image_tiles"] in (0, 2 * r["samples"]) for r in rows_a)  # min = max = 2, no thumbnail
    assert all(r["image_tiles"] in (0, 3 * r["samples"]) for r in rows_b)  # 2 + the thumbnail (--thumbnail)
    # the export's config.json says how training cut the images, not how the base did
    import convert
    for name, (_, meta, run_dir) in tiled.items():
        out = run_dir.parent / f"{name}-tiling"
        convert.convert(convert.parse_args([str(run_dir / "iter_2"), str(out), "--no-verify"]), log=lambda *a: None)
        cfg = json.loads((out / "config.json").read_text())
        assert {k: cfg[k] for k in ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")} == {
            k: meta["tiling"][k] for k in ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")}
    assert json.loads((run_dir.parent / "b-tiling" / "config.json").read_text())["use_thumbnail"] is True


# ------------------------------------------------------------------------------------------------ collectives

COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "broadcast_object_list"}
# Object collectives put their tensors on torch.cuda.current_device() themselves (train.py sets it first).
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object"}


def test_the_collective_timeout_covers_a_slow_index(demo, tmp_path):
    """Ranks 1.. wait for rank 0's index within --dist-timeout-minutes: 1.2 s is too short for a 4 s index, the
    default is not; the memory pre-flight's number is the same on every rank."""
    slow = ["slow-index", "4"]
    proc, _ = run(common(demo, 1, "--dist-timeout-minutes", "0.02"), tmp_path / "short", nproc=2, worker=slow,
                  check=False)
    assert proc.returncode != 0 and re.search(r"[Tt]imed? ?out", proc.stderr), proc.stderr[-3000:]
    proc, _ = run(common(demo, 1), tmp_path / "default", nproc=2, worker=slow)
    assert "rank 0: 128 samples, smallest 1000.0" in proc.stdout
    assert "rank 1: 128 samples, smallest 1000.0" in proc.stdout


def test_peak_memory_is_the_steps(monkeypatch):
    """peak_mem_gb on a GPU: the peak since the previous reading (the counter is reset), not since loading."""
    import torch
    import train
    allocated = {"now": 0, "peak": 0}

    def alloc(n):
        allocated["now"] += n
        allocated["peak"] = max(allocated["peak"], allocated["now"])

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocated.update(peak=allocated["now"]))
    cuda = torch.device("cuda", 0)
    alloc(10 * 2**30), alloc(-8 * 2**30)  # loading: 10 GiB at its peak, 2 GiB kept
    train._peak_memory_gb(cuda)  # the loop starts
    alloc(3 * 2**30), alloc(-3 * 2**30)  # step 1: 5 GiB at its peak
    assert train._peak_memory_gb(cuda) == 5
    alloc(1 * 2**30), alloc(-1 * 2**30)  # step 2: 3 GiB
    assert train._peak_memory_gb(cuda) == 3


@pytest.mark.parametrize("config", ["ds_zero1.json", "ds_zero3.json"])
def test_the_optimizer_is_torch_adamw_fused_on_cuda(monkeypatch, config):
    """DeepSpeed builds torch.optim.AdamW (torch_adam) with fused=True on CUDA, so nothing is JIT-compiled."""
    import types
    import torch
    import train
    args = types.SimpleNamespace(batch_size=2, grad_accum=1, lr=1e-4, weight_decay=0.0, deepspeed=config)
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        ds = json.load(open(os.path.join(ROOT, config)))
        train.fill_deepspeed_config(ds, args, 1, torch.bfloat16)
        params = ds["optimizer"]["params"]
        assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
        assert params.get("fused", False) is cuda
    ds = {"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}, "zero_optimization": {}}
    train.fill_deepspeed_config(ds, args, 1, torch.bfloat16)  # a config's own choice stays
    assert ds["optimizer"]["params"]["torch_adam"] is False and "fused" not in ds["optimizer"]["params"]


def test_fp16_plumbing(monkeypatch, demo):
    """--dtype fp16 (GPUs without bf16): DeepSpeed's fp16 with dynamic loss scaling; a step DeepSpeed skips
    with a finite loss is counted as an overflow step, and the loss scale is reported. (DeepSpeed cannot run an
    fp16 step on CPU: the step itself runs under `pytest -m gpu` on a GPU.)"""
    import types
    import torch
    import options
    import train
    args = types.SimpleNamespace(batch_size=1, grad_accum=1, lr=1e-4, weight_decay=0.0, deepspeed="ds_zero1.json",
                                 dtype="fp16")
    assert options.compute_dtype(args, on_gpu=True) == torch.float16
    ds = json.load(open(os.path.join(ROOT, "ds_zero1.json")))
    train.fill_deepspeed_config(ds, args, 1, torch.float16)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    if not torch.cuda.is_available():
        _refused(common(demo, 1, "--dtype", "fp16"), "--dtype fp16 needs a CUDA GPU")

    class Engine:  # one fp16 step that overflows, then one that is applied
        optimizer = types.SimpleNamespace(loss_scale=2.0 ** 32)
        applied = [False, True]

        def __call__(self, **batch):
            return types.SimpleNamespace(loss=torch.tensor(2.5), n_supervised=4)

        def backward(self, loss, scale_wrt_gas=True):
            pass

        def step(self):
            pass

        def was_step_applied(self):
            return self.applied.pop(0)

        def get_global_grad_norm(self):
            return 1.0

    scheduler = types.SimpleNamespace(get_last_lr=lambda: [1e-4], step=lambda: None)
    monkeypatch.setattr(train, "all_reduce_sum", lambda values, device: values)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    meta = dict(num_supervised=4, num_tokens=10, num_samples=1, image_failures=0, replaced=0)
    micro = [{"meta": meta, "image_flags": torch.ones(1), "pixel_values": torch.zeros(1, 3, 2, 2),
              "input_ids": torch.zeros(1, 10, dtype=torch.long)}]
    counters = dict.fromkeys(train.COUNTERS, 0)
    engine = Engine()
    first = train.train_step(engine, scheduler, micro, 0, counters, torch.device("cpu"), torch.float16)
    assert first["loss_scale"] == 2.0 ** 32 and first["loss"] == 2.5
    assert counters["skipped_steps"] == counters["overflow_steps"] == 1 and counters["nonfinite_steps"] == 0
    train.train_step(engine, scheduler, micro, 1, counters, torch.device("cpu"), torch.float16)
    assert counters["skipped_steps"] == counters["overflow_steps"] == 1


def test_every_collective_has_its_tensor_on_the_training_device(monkeypatch):
    """On GPU the process group is NCCL only, which refuses CPU tensors: every collective of train.py goes
    through all_reduce_sum, which puts its tensor on the device it is given, and every call gives `device`
    (the training device). Checked with a fake collective on a non-CPU device, and in train.py's source."""
    import ast

    import torch
    import torch.distributed as dist

    import train
    seen = []

    class Reached(Exception):
        pass

    def fake(tensor, *a, **k):
        seen.append(tensor.device)
        raise Reached  # a "meta" tensor cannot be read back; its device is what is checked

    monkeypatch.setattr(dist, "all_reduce", fake)
    with pytest.raises(Reached):
        train.all_reduce_sum([1.0, 2.0], torch.device("meta"))
    assert seen == [torch.device("meta")]
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    helper_calls = 0
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            where = f"train.py:{node.lineno}"
            if isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES - OBJECT_COLLECTIVES:
                assert fn.name == "all_reduce_sum", f"{where}: {node.func.attr} outside the helper"
            if getattr(node.func, "id", None) == "all_reduce_sum":
                helper_calls += 1
                assert ast.unparse(node.args[1]) == "device", f"{where}: not the training device"
    assert helper_calls == 4  # the step's counts, its loss / non-finite flag, the held-out sums (evaluate.py),
    # the smallest free memory of the ranks
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, "evaluate.py")).read())):
        assert not (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES), \
            f"evaluate.py:{node.lineno}: a collective outside train.all_reduce_sum"


def test_packs_over_their_budget_are_counted_in_the_metrics(monkeypatch):
    """A pack over its token or tile budget is trained as is and counted: the step sums the packs' flags
    over the ranks into over_budget_packs (here an all-masked step, which needs no engine)."""
    import torch
    import torch.distributed as dist

    import train
    from data.packing import collate_packed

    def sample(n, tiles, skipped=()):
        return dict(input_ids=torch.ones(n, dtype=torch.long), labels=torch.full((n,), -100),
                    pixel_values=torch.zeros(tiles, 3, 4, 4), image_flags=torch.ones(tiles, dtype=torch.long),
                    meta={"skipped": list(skipped)})

    class Schedule:
        def get_last_lr(self):
            return [1e-3]

        def step(self):
            pass

    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.mul_(2))  # as if 2 ranks saw the same
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    # one sample replaced after two failed attempts, one after one: 2 replaced samples per rank
    micro = [collate_packed([sample(5, 1, ["a:3: unreadable", "a:9: too long"]), sample(4, 2, ["a:4: too long"])],
                            max_tokens=8, max_tiles=4),  # tokens over
             collate_packed([sample(3, 3), sample(3, 2)], max_tokens=8, max_tiles=4),  # tiles over
             collate_packed([sample(3, 1)], max_tokens=8, max_tiles=4)]
    counters = dict.fromkeys(train.COUNTERS, 0)
    row = train.train_step(None, Schedule(), micro, 0, counters, torch.device("cpu"), torch.float32)
    assert row["loss"] is None and counters["all_masked_steps"] == 1
    assert counters["over_budget_packs"] == 4 and counters["samples_seen"] == 10
    assert counters["replaced_samples"] == 4  # samples, not the 3 failed attempts per rank


def test_workers_fork_frozen_and_the_trainer_unfreezes():
    """gc.freeze() around the fork only: the DataLoader workers inherit the frozen objects (copy-on-write pages
    stay shared), the training process does not keep the garbage of every epoch start forever."""
    import gc
    from types import SimpleNamespace as NS

    import torch

    import train
    from data import LengthGroupedSampler

    class FreezeProbe(torch.utils.data.Dataset):  # each item: the frozen objects where it is built
        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return gc.get_freeze_count()
    sampler = LengthGroupedSampler([1] * 4, [False] * 4, batch_size=2)
    args = NS(num_workers=1, seed=0)
    pos = train.Progress()
    gc.unfreeze()
    drawn = train.batches(FreezeProbe(), sampler, lambda items: items, args, pos, torch.device("cpu"))
    for _ in range(6):  # three epochs of two micro-batches
        in_worker = next(drawn)
        assert min(in_worker) > 1000 and gc.get_freeze_count() == 0
    assert pos.epoch == 2


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


def test_what_is_changed_as_official_is_counted_named_once_and_summarised(demo, tmp_path):
    """An answer cut at --max-length, conversations starting with a gpt turn (dropped, as official) and a 16-bit
    PNG (clipped, as official): counted in metrics.jsonl and the summary, each named once in the log; the summary
    ends with the last eval_loss."""
    import shutil

    import numpy as np
    from PIL import Image
    base, data = demo
    annotation, folder = data.split(",")
    records = [json.loads(line) for line in open(annotation)]
    records = [r for r in records if "image" in r][:8] + [r for r in records if "image" not in r][:4]
    shutil.copytree(folder, tmp_path / "data")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(tmp_path / "data" / "w.png")
    records[1]["image"] = "w.png"
    for r in records[8:10]:
        r["conversations"].insert(0, {"from": "gpt", "value": "Hello, ask me anything."})
    records[11]["conversations"][1]["value"] = "word " * 600
    with open(tmp_path / "data" / "few.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    few = f"{tmp_path / 'data' / 'few.jsonl'},{tmp_path / 'data'}"
    proc, rows = run(common((base, few), 2, "--max-steps", "6", "--eval-data", few, "--eval-steps", "3"),
                     tmp_path / "out")  # 6 steps of 2: the 12 samples once
    last = rows[-1]
    assert (last["truncated_samples"], last["gpt_first_dropped"], last["wide_images"]) == (1, 2, 1)
    assert [r["truncated_samples"] for r in rows] == sorted(r["truncated_samples"] for r in rows)  # running totals
    assert proc.stdout.count("samples have answers cut at --max-length 512 (first: ") == 1
    assert "few.jsonl:12); they train on what is left" in proc.stdout
    assert proc.stdout.count("2 conversations start with a gpt turn, dropped as the official code does (first: ") == 1
    assert proc.stderr.count("w.png is a 16-bit image") == 1
    assert ("changed as the official code does: 1 answers cut at --max-length, 2 leading gpt turns dropped, 1 16-bit "
            "images clipped") in proc.stdout
    assert f"; eval_loss {last['eval_loss']:.4f}; checkpoint " in proc.stdout


def test_progress_bar_fits_100_columns_with_evaluation_on():
    """Long runs, big figures and an eval_loss: the whole line fits 100 columns, no figure cut, a bar left."""
    from tqdm import tqdm

    import train
    row = dict(loss=12.3456, lr=1.96e-3, tokens_per_s=123456.7)
    figures = train.progress(row, 0.31641)
    assert figures == "loss 12.3456 eval 0.3164 lr 1.96e-03 tok/s 123457"
    for n, total, elapsed in [(123, 800, 12.3), (12345, 100000, 3 * 3600 + 1234.5), (99999, 100000, 99 * 3600)]:
        line = tqdm.format_meter(n, total, elapsed, ncols=100, bar_format=train.BAR_FORMAT, postfix=figures)
        assert len(line) <= 100 and line.endswith(", " + figures), line
        assert len(line.split("|")[1]) >= 5, line  # the bar itself
    assert "eval" not in train.progress(row)


def test_recipe_defaults_follow_the_official_scripts():
    """InternVL2_5-78B full: 8192 tokens, 1 x 4 per device (32 GPUs), lr 2e-5, wd 0.05, drop path 0.4, ZeRO-3,
    6 tiles; InternVL2-1B LoRA: 4096 tokens, 4 x 2, lr 4e-5, wd 0.01, no drop path, ZeRO-1."""
    import options
    from model import preset
    for size, mode, want in [
            ("InternVL2_5-78B", "full", dict(max_length=8192, batch_size=1, grad_accum=4, lr=2e-5, weight_decay=0.05,
                                             drop_path_rate=0.4, max_tiles=6, deepspeed="ds_zero3.json")),
            ("InternVL2-1B", "lora", dict(max_length=4096, batch_size=4, grad_accum=2, lr=4e-5, weight_decay=0.01,
                                          drop_path_rate=0.0, max_tiles=6, deepspeed="ds_zero1.json")),
            ("26b", "lora", dict(max_length=4096, batch_size=2, grad_accum=4, lr=2e-5, max_tiles=12,
                                 deepspeed="ds_zero3.json"))]:
        args = options.parse_args(["--size", size, "--mode", mode])
        args.demo, config = False, preset(size, max_dynamic_patch=12)
        args.size = options.checkpoint_size(config, args.size)
        options.fill_defaults(args)
        options.resolve_tiling(args, config)
        got = {k: getattr(args, k) for k in want}
        got["deepspeed"] = os.path.basename(got["deepspeed"])
        assert got == want, size


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
             r"--size Mini-InternVL-Chat-4B-V1-5 but the checkpoint has the Mini-InternVL-Chat-2B-V1-5 "
             r"architecture \(LLM InternLM2ForCausalLM 2x128, ViT layer_norm")
    fixture = os.path.join(ROOT, "tests", "fixtures", "internlm2")  # InternViT-6B style: the 26b architecture
    _refused(["--size", "2b", "--model-path", fixture, "--data", data, *out], r"--size Mini-InternVL-Chat-2B-V1-5 but .* has the InternVL-Chat-V1-5")
    _refused(["--size", "InternVL2-Llama3-76B", "--model-path", fixture, "--data", data, *out],
             r"InternVL2-Llama3-76B: not supported, its Llama-3 tokenizer")
    _refused(["--data", data, *out], r"--model-path is missing")
    _refused(["--model-path", str(tmp_path / "nowhere"), "--data", data, *out], r"nowhere: no config.json")
    _refused(["--model-path", base, *out], r"no training data")
    _refused(["--model-path", base, "--data", str(tmp_path / "missing.jsonl"), *out],
             r"data file .*missing.jsonl does not exist")
    _refused(["--model-path", base, "--data", data, "--mode", "qlora", "--deepspeed",
              os.path.join(ROOT, "ds_zero3.json"), *out], r"QLoRA with ZeRO-3 is not supported")
    _refused(["--model-path", base, "--data", data, "--deepspeed", str(tmp_path / "ds.json"), *out],
             r"ds.json: no such file")
    _refused(["--model-path", base, "--data", data, "--freeze-llm", *out],
             r"freeze_llm is for mode 'full', not 'lora'")
    _refused(["--model-path", base, "--data", data, "--mode", "full", "--freeze-llm", "--freeze-projector", *out],
             r"error: nothing to train with these freeze options")
    _refused(["--model-path", base, "--data", data, "--unfreeze-vit-layers", "2", *out],
             r"error: unfreeze_vit_layers 2: the ViT has 2 layers")
    _refused(["--model-path", base, "--data", data, "--resume", str(tmp_path), *out], r"not a complete checkpoint")
    _refused(["--model-path", base, "--data", os.path.dirname(data.split(",")[0]), *out],
             r"data file .* is a directory \(source .*\): give the annotation file \(.json/.jsonl\), then its "
             r"image folder")
    for option, value, match in [("--batch-size", "0", "--batch-size 0: must be at least 1"),
                                 ("--grad-accum", "0", "--grad-accum 0: must be at least 1"),
                                 ("--max-steps", "-1", r"--max-steps -1: must be 0 \(a dry run"),
                                 ("--save-steps", "0", "--save-steps 0: must be at least 1"),
                                 ("--max-length", "0", "--max-length 0: must be at least 1"),
                                 ("--epochs", "0", "--epochs 0: must be above 0"),
                                 ("--lr", "-1e-5", "--lr -1e-05: must be 0 or more")]:
        _refused(["--model-path", base, "--data", data, f"{option}={value}", *out], match)
    file = tmp_path / "a-file"
    file.write_text("")
    _refused(["--model-path", base, "--data", data, "--output-dir", str(file)], r"exists and is not a directory")
    _refused(["--model-path", base, "--data", data, "--output-dir", str(file / "run")], r"a-file is a file")
    (tmp_path / "iter_5").mkdir()
    (tmp_path / "iter_5" / "meta.json").write_text("{}")
    _refused(["--model-path", base, "--data", data, *out], r"already holds checkpoints \(iter_5\): pass --resume auto")


def _unwritable_dir(tmp_path):
    """A directory this process cannot create files in (root ignores permissions: then /sys where it is so)."""
    import tempfile
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return "/sys"
    pytest.skip("no unwritable directory available to root here")


def test_an_unwritable_output_dir_and_lr_0_are_caught_before_the_model_loads(demo, tmp_path, monkeypatch, capsys):
    import model
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train.main sets them: undo
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    base, data = demo
    locked = _unwritable_dir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")
    monkeypatch.setattr(model, "load_pretrained", no_model)
    _refused(["--model-path", base, "--data", data, "--output-dir", os.path.join(locked, "run")],
             r"^error: --output-dir .*run cannot be written \(.*\); choose another --output-dir")
    _refused(["--output-dir", os.path.join(locked, "demo")], r"^error: --output-dir .*demo cannot be written")
    assert not os.path.exists(os.path.join(locked, "run"))
    # --lr 0 is legal (a dry run of the optimizer) but surely not meant: a warning, then the run goes on
    _refused(["--model-path", base, "--data", data, "--lr", "0", "--batch-size", "100000", "--output-dir",
              str(tmp_path / "lr0")], r"make no full step")
    assert "warning: --lr 0: the optimizer will not change the weights" in capsys.readouterr().err


def test_freezing_is_one_function_that_checks_the_options_together():
    """lora.mark_trainable sets requires_grad from the mode and every freeze option (train.py calls only it):
    the parts that train, counted, and each combination that means nothing refused."""
    import lora
    from model import build_model, preset

    def model(adapters=False, vit_adapters=False):
        m = build_model(preset("tiny"), "meta")
        if adapters:
            lora.inject_lora(m, lora.LoRAConfig(r=4, vit=vit_adapters))
        return m
    m = model()
    n = {part: total for part, (_, total) in lora.parameter_report(m).items()}
    layer = sum(p.numel() for p in m.vit.layers[-1].parameters())
    assert len(m.vit.layers) == 2
    rep = lora.mark_trainable(m, "full", freeze_llm=True, unfreeze_vit_layers=-1)
    assert rep == {"vit": (layer, n["vit"]), "projector": (n["projector"],) * 2, "llm": (0, n["llm"]),
                   "adapters": (0, 0)}
    assert lora.mark_trainable(m, "full", unfreeze_vit_layers=1)["vit"] == (layer, n["vit"])  # 1.. = the last
    every_layer = sum(p.numel() for p in m.vit.layers.parameters())
    assert lora.mark_trainable(m, "full", unfreeze_vit_layers=-2)["vit"] == (every_layer, n["vit"])
    assert lora.mark_trainable(m, "full", train_vit=True)["vit"] == (n["vit"], n["vit"])
    with_vit = model(adapters=True, vit_adapters=True)
    rep = lora.mark_trainable(with_vit, "lora", unfreeze_vit_layers=1)  # under ViT LoRA: its base weights too
    assert rep["vit"][0] == layer and rep["llm"][0] == 0
    refused = [(model(), "full", dict(freeze_llm=True, freeze_projector=True), "nothing to train"),
               (model(True), "lora", dict(freeze_llm=True), "freeze_llm is for mode 'full', not 'lora'"),
               (model(), "full", dict(train_vit=True, unfreeze_vit_layers=1), "choose one"),
               (model(), "full", dict(unfreeze_vit_layers=2), "unfreeze_vit_layers 2: the ViT has 2 layers"),
               (model(), "full", dict(unfreeze_vit_layers=-3), "unfreeze_vit_layers -3: the ViT has 2 layers"),
               (model(True, True), "lora", dict(train_vit=True), "the ViT also has LoRA adapters")]
    for m, mode, options, match in refused:
        with pytest.raises(ValueError, match=match):
            lora.mark_trainable(m, mode, **options)


def test_data_problems_are_one_clean_error_before_the_model_loads(demo, tmp_path, monkeypatch):
    """Bad annotation lines, missing image files and a missing image folder: one message with file:line, before
    the model is touched, and no output directory left behind."""
    import model
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train.main sets them: undo
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    base, data = demo
    annotation, folder = data.split(",")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(model, "load_pretrained", no_model)  # every load goes through it, ZeRO-3 too
    lines = open(annotation).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"conversations": [', '{"image": "x.png"}'] + lines[3:]) + "\n")
    out = tmp_path / "out"
    common_args = ["--model-path", base, "--output-dir", str(out)]
    _refused([*common_args, "--data", f"{bad},{folder}"],
             r"(?s)^error: 2 bad sample\(s\).*bad.jsonl:4: malformed JSON line.*bad.jsonl:5: missing 'conversations'")
    n_images = sum('"image"' in line for line in lines)
    _refused([*common_args, "--data", annotation],  # the image folder forgotten
             rf"(?s)^error: {n_images} bad sample\(s\).*missing image files: .*{n_images} of {len(lines)} records"
             rf".*train.jsonl:\d+: image file not found: ")
    _refused([*common_args, "--data", f"{annotation},{tmp_path / 'nowhere'}"], r"image folder .*nowhere does not exist")
    n_images = sum('"image"' in line for line in lines)  # 1 tile (64 tokens) each: none fits 60
    _refused([*common_args, "--data", data, "--max-tiles", "1", "--max-length", "60"],
             rf"^error: {n_images} of {len(lines)} samples cannot fit --max-length 60 even cut: .*first: .*train.jsonl:"
             rf"\d+, which needs \d+\); --max-length \d+ fits them all, fewer tiles \(--max-tiles\)")
    assert not out.exists()


def test_data_error_has_no_traceback(demo, tmp_path):
    base, data = demo
    proc, _ = run(["--model-path", base, "--data", data.split(",")[0]], tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and "image file not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_fits_100_columns_and_every_option_says_its_default(capsys):
    import argparse

    import options
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 50 and max(len(line) for line in lines) <= 100
    for a in options.build_parser()._actions:
        if a.help != argparse.SUPPRESS and a.dest != "help":
            assert "default" in a.help.lower(), a.option_strings
    for script in ("chat.py", "convert.py"):  # their options say their defaults too
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert max(len(line) for line in out.splitlines()) <= 100, script
        assert out.count("default") >= {"chat.py": 12, "convert.py": 6}[script], out


def test_worker_default_follows_the_cores(monkeypatch):
    import options

    def workers():
        args = options.parse_args(["--size", "Mini-InternVL-Chat-2B-V1-5"])
        args.demo = False
        return options.fill_defaults(args).num_workers
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
            out = out._replace(loss=out.loss * (float("nan") if bad_calls.index(calls["forward"]) % 2 == 0
                                                else float("inf")))
        return out

    def masking_collate(samples):
        batch = collate(samples)
        calls["collate"] += 1
        if calls["collate"] in masked_batches:
            batch["labels"] = torch.full_like(batch["labels"], -100)
            batch["meta"]["num_supervised"] = 0
        return batch

    InternVL.forward, data.collate = bad_forward, masking_collate


def _kill_in_save(step):
    """SIGKILL in the middle of checkpoint `step`'s save: DeepSpeed's files written, meta.json not yet."""
    import checkpoint
    write_meta = checkpoint.write_meta

    def killing_write_meta(ckpt_dir, meta):
        if meta["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        write_meta(ckpt_dir, meta)
    checkpoint.write_meta = killing_write_meta


def _slow_index(seconds):
    """Rank 0 indexes the data for `seconds` more while the others wait; then each rank prints the smallest of
    a number that differs per rank (the memory pre-flight's free bytes) and stops before the model loads."""
    import data
    import train

    class SlowIndex(data.SupervisedDataset):
        def __init__(self, *a, index=None, **k):
            if index is None:
                time.sleep(seconds)
            super().__init__(*a, index=index, **k)

    def stop(args, dataset, rank, world):
        smallest = train.smallest_over_ranks(1000.0 + rank, torch.device("cpu"))
        print(f"rank {rank}: {len(dataset)} samples, smallest {smallest}", flush=True)
        torch.distributed.destroy_process_group()
        sys.exit(0)
    import torch
    data.SupervisedDataset, train.plan_batches = SlowIndex, stop


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    import train
    if kind == "mixed":
        import data
        data.LengthGroupedSampler.steps = _mixed_steps
    elif kind == "slow-index":
        _slow_index(float(sys.argv[2]))
    elif kind == "kill-in-save":
        _kill_in_save(int(sys.argv[2]))
    elif kind == "faults":
        parse = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
        _inject_faults(parse(sys.argv[2]), parse(sys.argv[3]))
    train.main(rest)
