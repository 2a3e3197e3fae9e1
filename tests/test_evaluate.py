"""train.py --eval-data: eval_loss is exact under data parallelism (1 vs 2 processes, ZeRO-3, an odd-size held-out
set), evaluation leaves the training trajectory untouched, greedy answers go to samples.jsonl, and bad held-out
data is refused at start with file:line."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT, common, demo, losses, run  # noqa: F401  (demo is a fixture)


@pytest.fixture(scope="module")
def held_out(demo, tmp_path_factory):  # noqa: F811
    """5 held-out records (3 with an image, 2 text-only): in batches of 2 over 2 ranks, rank 1 pads."""
    _, data = demo
    folder = data.split(",")[1]
    records = [json.loads(line) for line in open(os.path.join(folder, "eval.jsonl"))]
    picked = [r for r in records if "image" in r][:3] + [r for r in records if "image" not in r][:2]
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return f"{path},{folder}"


def test_evaluation_does_not_change_training(demo, held_out, tmp_path):  # noqa: F811
    """Same per-step losses and grad norms with and without --eval-data (LoRA dropout on, so the RNG matters);
    eval_loss at steps 3 and 6 only; 2 greedy answers per evaluation in samples.jsonl."""
    base = common(demo, 4, "--max-steps", "6", "--lora-dropout", "0.1")
    _, plain = run(base, tmp_path / "plain")
    proc, ev = run(base + ["--eval-data", held_out, "--eval-steps", "3", "--eval-samples", "2"], tmp_path / "eval")
    assert losses(plain) == losses(ev) and [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in ev]
    assert [r["step"] for r in ev if "eval_loss" in r] == [3, 6]
    assert all(math.isfinite(r["eval_loss"]) for r in ev if "eval_loss" in r)
    assert "held-out: 5 samples" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "samples.jsonl")]
    assert [(r["step"], r["id"]) for r in rows] == [(3, "held_out:1"), (3, "held_out:2"), (6, "held_out:1"),
                                                     (6, "held_out:2")]
    assert all(set(r) == {"step", "id", "question", "reference", "answer"} for r in rows)


def test_eval_loss_same_for_one_and_two_processes_zero3(demo, held_out, tmp_path):  # noqa: F811
    """ZeRO-3, full mode: 1 process x batch 4 vs 2 processes x batch 2 (eval batches of 4 vs 2; 5 samples, so rank 1
    runs a padding batch, with no supervised token), greedy answers on both ranks: eval_loss agrees to float32
    rounding, nothing hangs. The persistence threshold is lowered so that the output head is partitioned: a rank
    that skipped it would never join its all-gather (the run is killed at the timeout)."""
    ds = json.loads(open(os.path.join(ROOT, "ds_zero3.json")).read())
    # every tensor above 1000 values (the head: 128 x ~1000) partitioned, and gathered anew at each use
    ds["zero_optimization"].update(stage3_param_persistence_threshold=1000, stage3_max_live_parameters=1000,
                                   stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ["--deepspeed", str(tmp_path / "ds.json"), "--max-steps", "2", "--mode", "full",
            "--drop-path-rate", "0", "--eval-data", held_out, "--eval-steps", "1", "--eval-samples", "2"]
    _, one = run(common(demo, 4, *args), tmp_path / "one")
    cache = tmp_path / "index_cache"  # the held-out set is indexed as the training set: on rank 0, cached
    _, two = run(common(demo, 2, *args), tmp_path / "two", nproc=2, timeout=600,
                 env={"INTERNVL_DATA_CACHE": str(cache)})
    assert len(list(cache.glob("*.npz"))) == 2
    ev1, ev2 = [r["eval_loss"] for r in one], [r["eval_loss"] for r in two]
    print(f"eval_loss 1 process {ev1}, 2 processes {ev2}")
    assert ev1 == pytest.approx(ev2, rel=1e-5) and ev1[1] < ev1[0]
    assert [r["eval_supervised_tokens"] for r in one] == [r["eval_supervised_tokens"] for r in two]
    assert len(open(tmp_path / "two" / "samples.jsonl").readlines()) == 4


def _refused(argv, out, match):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and match in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # before the first step


def test_bad_held_out_data_is_refused_at_start(demo, held_out, tmp_path):  # noqa: F811
    path, folder = held_out.split(",")
    lines = open(path).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], '{"conversations": []}', lines[1]]) + "\n")
    _refused(common(demo, 4, "--eval-data", f"{bad},{folder}"), tmp_path / "a",
             f"{bad}:2: 'conversations' must be a non-empty list")
    # every answer is cut by --max-length: found in the index, an error at start naming the --max-length that fits
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"conversations": [{"from": "human", "value": "red blue " * 400},
                                                  {"from": "gpt", "value": "Purple."}]}) + "\n")
    _refused(common(demo, 4, "--eval-data", str(long)), tmp_path / "b",
             f"held-out data (--eval-data): 1 of 1 samples cannot fit --max-length 512 even cut: their image tokens "
             f"or their first answer end past it (first: {long}:1, which needs ")


def test_eval_plan_gives_every_rank_the_same_number_of_batches():
    from types import SimpleNamespace as NS
    from evaluate import eval_plan
    ds = NS(is_image=[True, False, True, True, False], lengths=[30, 10, 20, 40, 5])
    plans = [eval_plan(ds, 2, 2, r) for r in range(2)]
    assert plans == [[[4, 1], [3]], [[2, 0], []]]  # text first, then images by length; [] = a padding batch
    assert sorted(i for p in plans for b in p for i in b) == list(range(5))
    assert eval_plan(ds, 4, 1, 0) == [[4, 1, 2, 0], [3]]


def test_a_padding_batch_has_no_supervised_token():
    from types import SimpleNamespace as NS
    from data.images import IMAGE_SIZE
    from evaluate import eval_collate
    b = eval_collate([], NS(image_size=IMAGE_SIZE))
    assert b["meta"]["num_supervised"] == 0 and b["meta"]["num_samples"] == 0 and b["input_ids"].shape == (1, 1)
    assert b["image_flags"].tolist() == [0] and b["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_resume_drops_a_torn_log_line(tmp_path):
    """kill -9 mid-write leaves half a row (here cut inside a multi-byte character): the resume drops it with the
    rows after the checkpoint, keeps the others, and the next resume reads the file again."""
    import checkpoint
    rows = [dict(step=s, id="held_out:1", answer="réponse") for s in (2, 4, 6)]  # the row of step 6 is torn
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows]
    (tmp_path / "samples.jsonl").write_bytes(lines[0] + lines[1] + lines[2][:lines[2].index(b"\xc3") + 1])
    (tmp_path / "metrics.jsonl").write_bytes(lines[0] + lines[1] + lines[2][:20])  # JSONDecodeError before
    checkpoint.truncate_logs(str(tmp_path), 4)
    for name in ("samples.jsonl", "metrics.jsonl"):
        assert (tmp_path / name).read_bytes() == lines[0] + lines[1]
    checkpoint.truncate_logs(str(tmp_path), 2)
    assert (tmp_path / "samples.jsonl").read_bytes() == lines[0]


def test_benchmark_score_logged_at_each_evaluation(demo, held_out, tmp_path):  # noqa: F811
    """--eval-benchmark: the official score (here GQA accuracy) in metrics.jsonl beside eval_loss at each evaluation,
    equal to the mean of the per-item scores written to OUTPUT/NAME-stepN.jsonl; bad specs refused at start."""
    path, folder = held_out.split(",")
    images = [json.loads(line)["image"] for line in open(path) if "image" in json.loads(line)]
    bench = tmp_path / "gqa.jsonl"
    bench.write_text("".join(json.dumps(dict(image=img, question=q, question_id=k, answer=a)) + "\n" for k, (img, q, a)
                             in enumerate(zip(images, ["What colour?", "What shape?", "Where?"], ["red", "circle", "left"]))))
    base = common(demo, 4, "--max-steps", "2", "--eval-data", held_out, "--eval-steps", "1")
    _, rows = run(base + ["--eval-benchmark", f"gqa_testdev_llava={bench},{folder}"], tmp_path / "bench")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["eval_loss"]) for r in rows)
    for r in rows:
        items = [json.loads(line) for line in open(tmp_path / "bench" / f"gqa_testdev_llava-step{r['step']}.jsonl")]
        assert len(items) == 3 and all(set(i) >= {"answer", "score", "gt_answer"} for i in items)
        assert r["eval_gqa_testdev_llava_accuracy"] == sum(i["score"] for i in items) / 3
    _refused(common(demo, 4, "--eval-benchmark", f"gqa_testdev_llava={bench}"), tmp_path / "a",
             "--eval-benchmark is scored at each evaluation of --eval-data")
    _refused(common(demo, 4, "--eval-data", held_out, "--eval-benchmark", "nope=x.jsonl"), tmp_path / "b",
             "unknown benchmark 'nope'")


def test_eval_sample_prompts_are_tiled_as_the_run(demo, tmp_path):  # noqa: F811
    """--eval-samples prompts cut their images with the run's --min-tiles/--max-tiles/--thumbnail (here 2, 2, off
    on a base whose config.json says 1, 12, on): the same tiles as the held-out sample built for the loss."""
    from types import SimpleNamespace as NS

    import evaluate
    from data import SupervisedDataset, load_tokenizer
    from model import load_config
    base, data = demo
    folder = data.split(",")[1]
    config = load_config(base)
    assert (config.min_dynamic_patch, config.use_thumbnail) == (1, True)
    args = NS(eval_data=[f"{os.path.join(folder, 'eval.jsonl')},{folder}"], eval_samples=3, min_tiles=2, max_tiles=2,
              thumbnail=False, max_length=1024, seed=0, skip_bad_samples=False, batch_size=2, num_workers=0,
              output_dir=str(tmp_path), eval_steps=1)
    tokenizer = load_tokenizer(base)

    def build(sources):  # train.py's shared_dataset, in one process
        return SupervisedDataset(sources, tokenizer, config.template, config.system_message, max_num=2, min_num=2,
                                 use_thumbnail=False, max_length=1024, image_size=config.force_image_size,
                                 tile_tokens=config.num_image_token)
    ev = evaluate.setup(args, config, tokenizer, 1, 0, 1, lambda *a: None, lambda values: values, build)
    tiles = {pid: pv.shape[0] for pid, _, _, _, pv in ev.prompts if pv is not None}
    assert tiles and set(tiles.values()) == {2}
    built = {ev.dataset.sample_id(i): ev.dataset.build(i)["pixel_values"].shape[0] for i in range(3)}
    assert all(built[pid] == n for pid, n in tiles.items())
