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
