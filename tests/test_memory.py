"""train.py --estimate-memory: exact parameter and optimizer counts from a meta model, honest verdicts, no weights
read. (bench/realsize.py compares it with what real-size CPU steps hold; bench/gpu.py with GPU peaks.)"""
import pytest
import torch

import lora
import memory
import train
from model import build_model, preset


def tiny_config():
    cfg = preset("tiny")
    cfg.img_context_token_id = cfg.llm.vocab_size - 7
    return cfg


def test_weights_and_optimizer_bytes_are_exact_counts():
    """Weights = every parameter in the compute dtype; optimizer = fp32 master + 2 AdamW moments of exactly the
    trainable parameters, divided over the GPUs: checked against a real (tiny) model with LoRA."""
    cfg = tiny_config()
    real = build_model(cfg, "cpu", torch.float32)
    lora.inject_lora(real, lora.LoRAConfig(r=8, alpha=16))
    lora.mark_trainable(real, "lora")
    meta = build_model(cfg, "meta")
    lora.inject_lora(meta, lora.LoRAConfig(r=8, alpha=16))
    lora.mark_trainable(meta, "lora")
    n_train = sum(p.numel() for p in real.parameters() if p.requires_grad)
    run = memory.RunShape(mode="lora", zero_stage=1, gpus=4, batch_size=1, max_length=512, tiles=1,
                          dtype_bytes=4, reduce_bucket=0)
    est = memory.estimate(meta, cfg, run, on_gpu=False)
    assert est["weights"] == sum(p.numel() * 4 for p in real.parameters())
    assert est["optimizer"] == n_train * 12 / 4
    assert est["gradients"] == n_train * 4 + n_train * 4 / 4
    assert est["overhead"] == 0 and est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))


def test_nf4_weights_match_bitsandbytes_storage():
    """QLoRA: the estimate's 4-bit LLM bytes equal what bitsandbytes stores (packed weights + quantisation
    state), within 15%."""
    cfg = tiny_config()
    real = build_model(cfg, "cpu", torch.float32)
    lora.quantize_llm(real, compute_dtype=torch.float32)
    stored = 0
    for m in real.modules():
        if isinstance(m, lora.NF4Linear):
            qs = m.quant_state
            stored += m.weight.numel() + qs.absmax.numel() * qs.absmax.element_size()
            stored += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + qs.code.numel() * 4
    meta = build_model(cfg, "meta")
    lora.inject_lora(meta, lora.LoRAConfig(r=8, alpha=16))
    lora.mark_trainable(meta, "lora")
    run = memory.RunShape(mode="qlora", zero_stage=1, gpus=1, batch_size=1, max_length=512, tiles=1,
                          dtype_bytes=4, reduce_bucket=0)
    dense = sum(p.numel() * 4 for n, p in meta.named_parameters()
                if n.rsplit(".", 1)[0] not in set(lora.quantizable_names(meta)))
    nf4 = memory.estimate(meta, cfg, run, on_gpu=False)["weights"] - dense
    assert nf4 == pytest.approx(stored, rel=0.15)


def run_cli(argv, capsys):
    train.main(argv + ["--estimate-memory"])
    return capsys.readouterr().out


def test_cli_reads_config_json_without_loading_weights(monkeypatch, capsys):
    import model
    monkeypatch.setattr(model, "load_pretrained", lambda *a, **k: pytest.fail("--estimate-memory loaded weights"))
    out = run_cli(["--model-path", "tests/fixtures/phi3", "--mode", "lora", "--gpus", "2"], capsys)
    assert "Mini-InternVL-Chat-4B-V1-5, lora, ZeRO-1, 2 GPU(s)" in out and "verdict: fits" in out
    for part in ("weights", "gradients", "optimizer", "activations", "overhead", "total"):
        assert part in out


def test_verdicts_for_runs_that_cannot_start(capsys):
    out = run_cli(["--size", "26b", "--mode", "full", "--gpus", "1"], capsys)
    assert "verdict: does NOT fit on 1 GPU(s) of 80 GiB" in out
    assert "verdict: fits on 8 GPU(s) of 80 GiB" in run_cli(["--size", "26b", "--mode", "full", "--gpus", "8"],
                                                             capsys)
    with pytest.raises(SystemExit, match="error: QLoRA with ZeRO-3 is not supported"):
        run_cli(["--size", "26b", "--mode", "qlora", "--deepspeed", "ds_zero3.json"], capsys)
    with pytest.raises(SystemExit, match="needs --size or --model-path"):
        run_cli([], capsys)


def test_zero3_partitions_and_more_gpus_never_cost_more(capsys):
    """ZeRO-3 divides weights, gradients and optimizer states over the GPUs (plus ~2 gathered layers)."""
    def total(gpus):
        return train.main(["--size", "26b", "--mode", "full", "--gpus", str(gpus), "--estimate-memory"])
    one, eight = total(1), total(8)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert eight["weights"] < one["weights"] / 4
    assert one["activations"] == eight["activations"]


def test_every_released_checkpoint_is_estimated(capsys):
    """--estimate-memory for every row of the checkpoint table: the official recipe's batch, length and ZeRO
    stage; bigger models never need less per GPU in the same mode."""
    import options
    from model.config import RELEASES
    totals = {}
    for name in RELEASES:
        for mode in ("full", "lora", "qlora"):
            est = train.main(["--size", name, "--mode", mode, "--estimate-memory"])
            assert all(v >= 0 for v in est.values()) and est["total"] < 400 * 2**30, (name, mode, est)
            totals[name, mode] = est
        out = capsys.readouterr().out
        assert f"{name}, lora, ZeRO-{3 if options.RECIPES[name].zero3 else 1}" in out
    one, eight = totals["InternVL2_5-1B", "full"], totals["InternVL2_5-8B", "full"]
    assert one["weights"] < eight["weights"] and one["optimizer"] < eight["optimizer"]
    assert totals["InternVL2_5-78B", "qlora"]["weights"] < totals["InternVL2_5-78B", "full"]["weights"] * 8


ZERO_CASES = [dict(stage=1, overlap=True, contiguous=True, bucket=30000, dtype="bf16"),
              dict(stage=1, overlap=False, contiguous=True, bucket=30000, dtype="bf16"),
              dict(stage=1, overlap=True, contiguous=False, bucket=30000, dtype="bf16"),
              dict(stage=3, overlap=True, contiguous=True, bucket=20000, dtype="bf16"),
              dict(stage=1, overlap=True, contiguous=True, bucket=30000, dtype="fp32")]


def test_reduce_buckets_are_what_a_real_engine_allocates():
    """DeepSpeed's gradient buckets, from a real (gloo, CPU) engine: reduce_bucket_size elements each,
    whatever the trainable count (2112 here), two with ZeRO-1 overlap_comm, one with ZeRO-3."""
    import json
    import os
    import subprocess
    import sys
    probe = os.path.join(os.path.dirname(__file__), "zero_buffers_probe.py")
    out = subprocess.run([sys.executable, probe, *map(json.dumps, ZERO_CASES)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    allocated = json.loads(out.stdout.strip().splitlines()[-1])
    for case, real in zip(ZERO_CASES, allocated):
        run = memory.RunShape(mode="lora", zero_stage=case["stage"], gpus=1, batch_size=1, max_length=512,
                              tiles=1, dtype_bytes=2 if case["dtype"] == "bf16" else 4,
                              reduce_bucket=case["bucket"], overlap_comm=case["overlap"],
                              contiguous_gradients=case["contiguous"])
        assert memory.reduce_buckets(run) == real, (case, real)
    assert allocated[0] == 2 * 30000 * 2  # not min(bucket, trainable) as before


def test_the_trained_head_holds_its_float32_gradient_and_cast():
    """Full fine-tuning: the fused loss keeps a float32 [vocab, hidden] weight gradient to the backward and
    casts it to the weight's dtype."""
    cfg = tiny_config()
    model = memory.meta_model(cfg, "full")
    run = memory.RunShape(mode="full", zero_stage=1, gpus=1, batch_size=1, max_length=512, tiles=1)
    with_head = memory.estimate(model, cfg, run)["activations"]
    model.llm.head.weight.requires_grad = False
    assert with_head - memory.estimate(model, cfg, run)["activations"] == cfg.llm.vocab_size * \
        cfg.llm.hidden_size * (4 + 2)


def test_a_micro_batch_carries_the_most_tiles_its_samples_can():
    """Multi-image samples (the data's tile rule) fit the bound; a pack is one row of --max-packed-tiles."""
    from data.images import per_image_cap
    for max_num, max_length in ((12, 8192), (6, 4096), (12, 2048)):
        bound = memory.tiles_per_micro_batch(max_length, 256, batch_size=1)
        for n in range(1, 64):
            cap = per_image_cap(max_num, n)
            tiles = n * (cap + (1 if cap > 1 else 0))  # each image: its grid and a thumbnail
            if tiles * 256 <= max_length:
                assert tiles <= bound, (max_num, max_length, n)
        assert bound > max_num + 1 or max_length < (max_num + 1) * 256
    assert memory.tiles_per_micro_batch(8192, 256, batch_size=4) == 4 * 32
    assert memory.tiles_per_micro_batch(8192, 256, batch_size=1, max_packed_tiles=40) == 32
    assert memory.tiles_per_micro_batch(16384, 256, batch_size=1, max_packed_tiles=40) == 40


def test_estimate_memory_applies_the_batch_one_rule_of_packing(capsys):
    out = run_cli(["--size", "2b", "--mode", "lora", "--gpus", "1", "--max-packed-tokens", "8192"], capsys)
    assert "micro-batch 1 x 8192 tokens, 32 tiles" in out
    with pytest.raises(SystemExit, match="--batch-size must be 1"):
        run_cli(["--size", "2b", "--mode", "lora", "--max-packed-tokens", "8192", "--batch-size", "4"], capsys)
