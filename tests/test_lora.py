"""LoRA / QLoRA (lora.py): exactness at init, merge, small checkpoints, freezing, targets, refusals, sizes."""
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora
from bench.lora_counts import adapter_count_closed_form
from lora import LoRAConfig, LoRALinear, NF4Linear
from model import build_model, load_pretrained, preset
from model.weights import to_official_state_dict

torch.set_num_threads(2)
FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["internlm2", "phi3", "qwen2", "llama"]
LINEARS_PER_LAYER = {"internlm2": 5, "phi3": 4, "qwen2": 7, "llama": 7}  # the LLM linears LoRA / QLoRA take
ROOT = Path(__file__).parent.parent


def small_batch(config, tiles=2, text=24, seed=0):
    """A fast multimodal batch: 56 px tiles (4 patches a side -> 4 image tokens per tile) and a short text."""
    g = torch.Generator().manual_seed(seed)
    per_tile = (56 // config.vision.patch_size) ** 2 // int(1 / config.downsample_ratio) ** 2
    ctx = config.img_context_token_id
    ids = torch.randint(3, ctx - 2, (1, text), generator=g)
    ids = torch.cat([ids[:, :4], torch.full((1, tiles * per_tile), ctx), ids[:, 4:]], dim=1)
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    return dict(input_ids=ids, pixel_values=torch.randn(tiles, 3, 56, 56, generator=g),
                image_flags=torch.ones(tiles, dtype=torch.long), labels=labels)


def logits_of(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def fixture_batch(family):
    """The fixture's own token ids, with random pixel values for its 7 tiles (only equality is tested)."""
    ref = load_file(str(FIXTURES / family / "reference.safetensors"))
    g = torch.Generator().manual_seed(1)
    return dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"],
                image_flags=ref["image_flags"], pixel_values=torch.randn(int(ref["num_tiles"].sum()), 3, 448, 448,
                                                                          generator=g))


def randomize_adapters(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def merge_in_memory(model):
    """Every adapter merged into its base weight with lora.merged_weight and the plain linears put back (the
    model then has the base's parameter names); returns the wrappers, for unmerge."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for name, m in wrappers:
            m.base.weight.copy_(lora.merged_weight(m.base.weight, m.lora_A, m.lora_B, m.scale))
            lora._set(model, name, m.base)
    return wrappers


def unmerge(model, wrappers):
    """W <- W - s * B @ A (float32, cast back), and the wrappers back in place."""
    with torch.no_grad():
        for name, m in wrappers:
            w = m.base.weight
            w.copy_((w.float() - m.scale * (m.lora_B.float() @ m.lora_A.float())).to(w.dtype))
            lora._set(model, name, m)


# --- the LoRA linear itself --------------------------------------------------------------------------------------

def test_lora_linear_formula_and_init():
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    m = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    x = torch.randn(3, 5, 64)
    assert torch.equal(m(x), base(x))  # B = 0: exactly the base
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.lora_A.abs().max() <= 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5): bound sqrt(6 / (6 in))
    assert m.lora_A.std() > 0.5 / math.sqrt(3 * 64)  # and not degenerate (uniform std = bound / sqrt 3)
    nn.init.normal_(m.lora_B)
    expected = base(x) + (16 / 8) * (x @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-5)
    rs = LoRALinear(nn.Linear(64, 96), r=16, alpha=8, rslora=True)
    assert rs.scale == 8 / 4 and LoRAConfig(r=16, alpha=8, rslora=True).scale == 2.0
    assert LoRAConfig(r=16, alpha=32).scale == 2.0


def test_lora_dropout_only_in_training():
    base = nn.Linear(32, 32)
    m = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    nn.init.normal_(m.lora_B)
    x = torch.randn(8, 32)
    m.eval()
    torch.testing.assert_close(m(x), base(x) + 2 * (x @ m.lora_A.T @ m.lora_B.T), rtol=0, atol=1e-5)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))


# --- exactness at initialisation (fixtures) ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_logits_equal_base_at_init(family):
    model = load_pretrained(str(FIXTURES / family), dtype=torch.float32)
    batch = fixture_batch(family)
    base = logits_of(model, batch)
    wrapped = lora.inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, vit=True))
    assert len(wrapped) == model.config.llm.num_layers * LINEARS_PER_LAYER[family] + 2 * 4
    lora.mark_trainable(model, "lora")
    model.eval()
    assert torch.equal(logits_of(model, batch), base)
    randomize_adapters(model)  # the adapters are really in the path
    assert (logits_of(model, batch) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["internlm2", "qwen2"])
def test_qlora_logits_equal_dequantised_base(family):
    """Qwen2: the q/k/v biases stay bf16 beside the NF4 weights."""
    path = str(FIXTURES / family)
    qmodel = load_pretrained(path, dtype=torch.bfloat16, prepare=lora.prepare_qlora)
    quantised = lora.quantizable_names(qmodel)
    assert len(quantised) == 2 * LINEARS_PER_LAYER[family] and "llm.head" not in quantised
    assert all(isinstance(qmodel.get_submodule(n), NF4Linear) for n in quantised)
    # ViT, projector and head stay plain bf16 linears
    for name, m in qmodel.named_modules():
        if isinstance(m, nn.Linear):
            assert not name.startswith("llm.layers.") and m.weight.dtype == torch.bfloat16
    assert isinstance(qmodel.llm.head, nn.Linear)

    ref = load_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in quantised:
            w = ref.get_submodule(name).weight
            deq = qmodel.get_submodule(name).dequantize()
            # real NF4: not the bf16 weight, but within half the largest code gap times the block absmax
            assert not torch.equal(deq, w)
            err = (deq.float() - w.float()).abs().reshape(-1, 64).max(1).values
            assert bool((err <= 0.17 * w.float().abs().reshape(-1, 64).max(1).values + 1e-3).all())
            w.copy_(deq)
    lora.inject_lora(qmodel, LoRAConfig(r=8, alpha=16))
    lora.mark_trainable(qmodel, "qlora")
    qmodel.eval()
    batch = small_batch(qmodel.config)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    torch.testing.assert_close(logits_of(qmodel, batch), logits_of(ref, batch), rtol=0, atol=0)


def test_qlora_quantises_each_tensor_as_it_arrives():
    """The loader hands each checkpoint tensor to NF4Linear.assign_weight; the result equals quantising the
    loaded bf16 weight, and no bf16 copy of a quantised matrix is kept."""
    path = str(FIXTURES / "phi3")
    qmodel = load_pretrained(path, dtype=torch.bfloat16, prepare=lora.prepare_qlora)
    ref = load_pretrained(path, dtype=torch.bfloat16)
    for name in lora.quantizable_names(qmodel):
        q = qmodel.get_submodule(name)
        assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad
        assert [p.dtype for p in q.parameters()] == [torch.uint8]
        assert torch.equal(q.dequantize(), NF4Linear.from_linear(ref.get_submodule(name)).dequantize())


# --- merge -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(family):
    model = load_pretrained(str(FIXTURES / family), dtype=torch.float32)
    batch = small_batch(model.config)
    base = logits_of(model, batch)
    lora.inject_lora(model, LoRAConfig(r=8, alpha=16, vit=True))
    randomize_adapters(model, std=0.02)  # s B A about 7% of W (std): a real, trained-sized update
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = logits_of(model, batch)
    wrappers = merge_in_memory(model)
    merged = logits_of(model, batch)
    diff = (merged - unmerged).abs().max().item()
    print(f"{family}: merged vs unmerged logits, max |diff| = {diff:.2e} (float32, LLM + ViT adapters; "
          f"adapters move the logits by up to {(unmerged - base).abs().max().item():.2f})")
    assert diff <= 1e-5 and (unmerged - base).abs().max() > 0.1
    unmerge(model, wrappers)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, batch), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_checkpoint_equals_in_memory_merge_and_export(family):
    """convert.py's path: adapters + projector merged onto the base read from disk equals the trained model
    merged in memory; the official export of the merged internal qkv equals the official-space LoRA merge."""
    path = FIXTURES / family
    cfg = LoRAConfig(r=8, alpha=16, vit=True)
    model = load_pretrained(str(path), dtype=torch.float32)
    lora.inject_lora(model, cfg)
    lora.mark_trainable(model, "lora")
    randomize_adapters(model)
    with torch.no_grad():
        model.projector.fc1.weight.add_(0.01)
    trained = lora.trainable_state_dict(model)
    streamed = dict(lora.merge_checkpoint(path, trained, cfg))
    merge_in_memory(model)
    merged = model.state_dict()
    assert streamed.keys() == merged.keys()
    for name, t in streamed.items():
        assert torch.equal(t, merged[name]), name
    assert not any(isinstance(m, LoRALinear) for m in model.modules())

    # internal Q|K|V merge, then export  ==  official layout: W_off + s * perm(B) @ A
    config = model.config
    q = "llm.layers.1.attn.qkv" if config.llm.spec.fused_qkv else "llm.layers.1.attn.k"
    base = dict(load_pretrained(str(path), dtype=torch.float32).named_parameters())[q + ".weight"].detach()
    a, b = trained[q + ".lora_A"], trained[q + ".lora_B"]
    exported = to_official_state_dict({q + ".weight": streamed[q + ".weight"]}, config)
    (off_name, off_merged), = exported.items()
    off_base = to_official_state_dict({q + ".weight": base}, config)[off_name]
    off_b = to_official_state_dict({q + ".weight": b}, config)[off_name]  # B's rows, permuted like W's
    torch.testing.assert_close(off_merged, off_base + cfg.scale * off_b @ a, rtol=0, atol=1e-6)
    if family == "internlm2":  # the permutation is real for InternLM2's per-group wqkv
        assert not torch.equal(off_b, b)



def test_merge_checkpoint_onto_trained_vit_layers():
    """LoRA on the ViT with its last layer unfrozen: that layer's base weights train too, and the merge adds
    s * B @ A onto the trained weights, not onto the checkpoint's."""
    path = FIXTURES / "internlm2"
    cfg = LoRAConfig(r=4, alpha=8, vit=True)
    model = load_pretrained(str(path), dtype=torch.float32)
    lora.inject_lora(model, cfg)
    lora.mark_trainable(model, "lora")
    for p in model.vit.layers[-1].parameters():  # train.py --unfreeze-vit-layers -1
        p.requires_grad_(True)
    randomize_adapters(model)
    qkv = model.vit.layers[-1].attn.qkv
    with torch.no_grad():
        qkv.base.weight.add_(0.01)
    trained = lora.trainable_state_dict(model)
    assert any(k.endswith(".attn.qkv.base.weight") for k in trained)
    streamed = dict(lora.merge_checkpoint(path, trained, cfg))
    name = f"vit.layers.{len(model.vit.layers) - 1}.attn.qkv.weight"
    assert torch.equal(streamed[name], lora.merged_weight(qkv.base.weight, qkv.lora_A, qkv.lora_B, cfg.scale))
    merge_in_memory(model)
    merged = model.state_dict()
    assert all(torch.equal(t, merged[n]) for n, t in streamed.items())


def test_alpha_defaults_to_2r():
    """The official ratio alpha = 2r unless alpha is given; to_dict (meta.json) records the resolved value."""
    assert LoRAConfig(r=64).alpha == 128 and LoRAConfig(r=64).scale == 2.0
    assert LoRAConfig(r=64).to_dict()["alpha"] == 128
    assert LoRAConfig(r=64, alpha=32).scale == 0.5
    assert LoRAConfig.from_dict(LoRAConfig(r=8).to_dict()).scale == 2.0
    default = LoRAConfig()  # the official recipe's
    assert (default.r, default.alpha, default.dropout, default.targets, default.vit) == (16, 32, 0.05, None, False)

def test_merge_checkpoint_checks_keys():
    path = FIXTURES / "internlm2"
    cfg = LoRAConfig(r=4, alpha=8)
    good = load_pretrained(str(path), dtype=torch.float32)
    lora.inject_lora(good, cfg)
    lora.mark_trainable(good, "lora")
    sd = lora.trainable_state_dict(good)
    with pytest.raises(ValueError, match="'llm.layers.0.attn.wq.lora_A' is not a parameter"):
        list(lora.merge_checkpoint(path, {**sd, "llm.layers.0.attn.wq.lora_A": torch.zeros(4, 64)}, cfg))
    bad = dict(sd)
    del bad["llm.layers.0.attn.out.lora_B"]
    with pytest.raises(ValueError, match="lora_A without lora_B"):
        list(lora.merge_checkpoint(path, bad, cfg))
    with pytest.raises(ValueError, match="shape"):
        list(lora.merge_checkpoint(path, sd, LoRAConfig(r=8, alpha=8)))
    # full mode: no adapters, trained tensors replace the base ones, everything else is the base bit for bit
    base = dict(load_pretrained(str(path), dtype=torch.float32).named_parameters())
    trained_w = base["llm.layers.1.mlp.up.weight"].detach() + 1
    out = dict(lora.merge_checkpoint(path, {"llm.layers.1.mlp.up.weight": trained_w}, None))
    assert out.keys() == base.keys() and torch.equal(out["llm.layers.1.mlp.up.weight"], trained_w)
    assert all(torch.equal(out[n], p) for n, p in base.items() if n != "llm.layers.1.mlp.up.weight")


# --- small checkpoints -------------------------------------------------------------------------------------------

def test_trainable_state_dict_restores_the_model_exactly(tmp_path):
    path = str(FIXTURES / "internlm2")
    cfg = LoRAConfig(r=8, alpha=16, dropout=0.1)
    model = load_pretrained(path, dtype=torch.float32)
    lora.inject_lora(model, cfg)
    report = lora.mark_trainable(model, "lora")
    randomize_adapters(model)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.mul_(1.5)
    torch.save(lora.trainable_state_dict(model), tmp_path / "trainable.pt")
    saved = torch.load(tmp_path / "trainable.pt")
    n_saved = sum(t.numel() for t in saved.values())
    assert n_saved == report["adapters"][0] + report["projector"][0]
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("projector.") for k in saved)
    model.eval()
    batch = small_batch(model.config)
    expected = logits_of(model, batch)

    fresh = load_pretrained(path, dtype=torch.float32)
    lora.inject_lora(fresh, cfg)
    lora.mark_trainable(fresh, "lora")
    assert (logits_of(fresh, batch) - expected).abs().max() > 1e-3
    lora.load_trainable_state_dict(fresh, saved)
    fresh.eval()
    assert torch.equal(logits_of(fresh, batch), expected)

    fresh2 = load_pretrained(path, dtype=torch.float32)
    lora.inject_lora(fresh2, cfg)
    lora.mark_trainable(fresh2, "lora", freeze_projector=True)
    with pytest.raises(ValueError, match=r"unexpected tensors \(6\): \['projector.fc1.bias'"):
        lora.load_trainable_state_dict(fresh2, saved)
    lora.mark_trainable(fresh2, "lora")
    with pytest.raises(ValueError, match=r"missing tensors \(1\): \['llm.layers.0.attn.out.lora_A'\]"):
        lora.load_trainable_state_dict(fresh2, {k: v for k, v in saved.items()
                                                if k != "llm.layers.0.attn.out.lora_A"})


# --- what trains -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_only_trainable_parameters_get_gradients(mode):
    dtype = torch.bfloat16 if mode == "qlora" else torch.float32
    model = load_pretrained(str(FIXTURES / "phi3"), dtype=dtype,
                            prepare=lora.prepare_qlora if mode == "qlora" else None)
    lora.inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05, targets=["qkv_proj", "down_proj", "attn.proj"]))
    lora.mark_trainable(model, mode)
    randomize_adapters(model)  # so lora_A gets a non-zero gradient too
    model.train()
    batch = small_batch(model.config)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    out = model(**batch)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith((".lora_A", ".lora_B")) or n.startswith("projector.")}
    assert sum(n.endswith(".lora_A") for n in trainable) == 2 * 2 + 2


def test_activation_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = load_pretrained(str(FIXTURES / "internlm2"), dtype=torch.float32)
        torch.manual_seed(0)  # the same A initialisation
        lora.inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, vit=True))
        lora.mark_trainable(model, "lora")
        randomize_adapters(model)
        model.set_gradient_checkpointing(vit=checkpointing, llm=checkpointing)
        model.train()
        torch.manual_seed(0)  # same dropout masks: checkpointing replays the RNG state
        model(**small_batch(model.config)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-6)


def test_mark_trainable_modes_and_report():
    model = build_model(preset("tiny"), "cpu")
    full = lora.mark_trainable(model, "full")
    n = {part: sum(p.numel() for name, p in model.named_parameters() if name.startswith(part + "."))
         for part in ("vit", "projector", "llm")}
    assert full == {"vit": (0, n["vit"]), "projector": (n["projector"], n["projector"]),
                    "llm": (n["llm"], n["llm"]), "adapters": (0, 0)}
    assert lora.mark_trainable(model, "full", train_vit=True, freeze_projector=True)["vit"] == (n["vit"], n["vit"])
    cfg = LoRAConfig(r=8, alpha=16)
    lora.inject_lora(model, cfg)
    rep = lora.mark_trainable(model, "lora")
    closed = adapter_count_closed_form(model.config, 8)
    assert rep == {"vit": (0, n["vit"]), "projector": (n["projector"], n["projector"]), "llm": (0, n["llm"]),
                   "adapters": (closed, closed)}
    text = lora.format_report(rep, "lora")
    assert re.search(rf"adapters +{closed:,} / +{closed:,}\n", text) and "total" in text
    assert lora.mark_trainable(model, "lora", freeze_projector=True)["projector"] == (0, n["projector"])
    q = build_model(preset("tiny"), "cpu")
    lora.quantize_llm(q)
    lora.inject_lora(q, cfg)
    rep = lora.mark_trainable(q, "qlora")
    assert q.llm.layers[0].attn.qkv.lora_A.dtype == torch.float32  # the model's dtype, not NF4's bf16 compute
    assert rep["llm"] == (0, n["llm"]) and rep["adapters"] == (closed, closed)  # NF4 counted as out*in


def test_report_counts_zero3_partitioned_parameters_whole():
    model = build_model(preset("tiny"), "cpu")
    whole = lora.mark_trainable(model, "full")
    for p in model.parameters():  # what deepspeed.zero.Init leaves on a rank: an empty tensor and ds_numel
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert lora.parameter_report(model) == whole and whole["llm"][0] > 0


# --- targets -----------------------------------------------------------------------------------------------------

def test_targets_in_official_names():
    model = build_model(preset("tiny"), "meta")
    names = lora.resolve_targets(model, LoRAConfig(targets=["wqkv", "feed_forward.w2"]))
    assert names == ["llm.layers.0.attn.qkv", "llm.layers.0.mlp.down", "llm.layers.1.attn.qkv",
                     "llm.layers.1.mlp.down"]
    assert lora.resolve_targets(model, LoRAConfig(targets=["attn.qkv"])) == [
        "vit.layers.0.attn.qkv", "vit.layers.1.attn.qkv"]  # the ViT's, not the LLM's wqkv
    default = lora.resolve_targets(model, LoRAConfig())
    assert len(default) == 10 and all(n.startswith("llm.layers.") for n in default)
    assert len(lora.resolve_targets(model, LoRAConfig(vit=True))) == 18
    phi3 = build_model(preset("4b"), "meta")
    assert lora.resolve_targets(phi3, LoRAConfig(targets=["gate_up_proj"]))[:1] == ["llm.layers.0.mlp.gate_up"]
    assert len(lora.resolve_targets(phi3, LoRAConfig())) == 32 * 4
    for name in ("InternVL2_5-1B", "InternVL2-40B"):  # transformers' Qwen2 / Llama names, as official LoRA
        m = build_model(preset(name), "meta")
        official = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert lora.resolve_targets(m, LoRAConfig(targets=official)) == lora.resolve_targets(m, LoRAConfig())
        assert lora.resolve_targets(m, LoRAConfig(targets=["self_attn.v_proj"]))[:2] == [
            "llm.layers.0.attn.v", "llm.layers.1.attn.v"]
        assert len(lora.resolve_targets(m, LoRAConfig())) == m.config.llm.num_layers * 7



def test_targets_and_vit_together():
    """--lora-targets picks the LLM linears and --lora-vit adds every ViT linear (official use_llm_lora and
    use_backbone_lora are independent): neither drops the other."""
    model = build_model(preset("tiny"), "meta")
    names = lora.resolve_targets(model, LoRAConfig(targets=["wqkv"], vit=True))
    vit = lora.resolve_targets(model, LoRAConfig(targets=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]))
    assert len(vit) == 8 and all(n.startswith("vit.") for n in vit)
    assert sorted(names) == sorted(vit + ["llm.layers.0.attn.qkv", "llm.layers.1.attn.qkv"])

def test_unmatched_target_is_an_error_listing_candidates():
    model = build_model(preset("tiny"), "meta")
    with pytest.raises(ValueError, match=r"'q_proj' matches no linear layer of this internlm2 model\. "
                                         r"Candidates \(official names\): LLM attention\.wo, attention\.wqkv, "
                                         r"feed_forward\.w1, feed_forward\.w2, feed_forward\.w3; ViT attn\.proj, "
                                         r"attn\.qkv, mlp\.fc1, mlp\.fc2"):
        lora.inject_lora(model, LoRAConfig(targets=["wqkv", "q_proj"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-injected
    with pytest.raises(ValueError, match="'output' matches no linear.*output head.*never LoRA targets"):
        lora.inject_lora(model, LoRAConfig(targets=["output"]))
    with pytest.raises(ValueError, match="'mlp1.1' matches no linear"):
        lora.inject_lora(model, LoRAConfig(targets=["mlp1.1"]))
    phi3 = build_model(preset("4b"), "meta")
    with pytest.raises(ValueError, match="'wqkv' matches no linear layer of this phi3 model.*self_attn.qkv_proj"):
        lora.inject_lora(phi3, LoRAConfig(targets=["wqkv"]))


# --- refusals ----------------------------------------------------------------------------------------------------

def test_refused_combinations():
    with pytest.raises(ValueError, match="QLoRA with ZeRO-3 is not supported.*ZeRO-1 or ZeRO-2"):
        lora.check_supported("qlora", 3)
    for mode, stage in [("qlora", 1), ("qlora", 2), ("lora", 3), ("full", 3), ("lora", 1)]:
        lora.check_supported(mode, stage)
    with pytest.raises(ValueError, match="unknown training mode 'dora'"):
        lora.check_supported("dora", 1)
    with pytest.raises(ValueError, match="positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="empty list"):
        LoRAConfig(targets=[])
    with pytest.raises(ValueError, match="unknown LoRA settings \\['rank'\\]"):
        LoRAConfig.from_dict({"rank": 8})

    model = build_model(preset("tiny"), "cpu")
    with pytest.raises(ValueError, match="needs LoRA adapters: call inject_lora"):
        lora.mark_trainable(model, "lora")
    lora.inject_lora(model, LoRAConfig(r=4, alpha=8, vit=True))
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        lora.inject_lora(model, LoRAConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match="mode 'full' trains the plain model"):
        lora.mark_trainable(model, "full")
    with pytest.raises(ValueError, match="'qlora' needs NF4 LLM weights"):
        lora.mark_trainable(model, "qlora")
    with pytest.raises(ValueError, match="ViT also has LoRA adapters"):
        lora.mark_trainable(model, "lora", train_vit=True)
    with pytest.raises(RuntimeError, match="quantize before inject_lora"):
        lora.quantize_llm(model)
    q = lora.quantize_llm(build_model(preset("tiny"), "cpu"))
    lora.inject_lora(q, LoRAConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match="its mode is 'qlora', not 'lora'"):
        lora.mark_trainable(q, "lora")
    empty = NF4Linear(8, 8)
    with pytest.raises(RuntimeError, match="never given its weight"):
        empty(torch.randn(1, 8))


# --- sizes on the meta device ------------------------------------------------------------------------------------

def test_nf4_nbytes_matches_bitsandbytes():
    for out_f, in_f in [(96, 64), (300, 70), (256, 1024)]:
        q = NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False))
        s = q.quant_state
        tensors = [q.weight, s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code]
        assert lora.nf4_nbytes(out_f, in_f) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("size", ["2b", "4b", "26b", "InternVL2_5-1B"])
def test_adapter_counts_at_r128_equal_closed_form(size):
    config = preset(size)
    model = build_model(config, "meta")
    lora.inject_lora(model, LoRAConfig(r=128, alpha=256, vit=True))
    rep = lora.mark_trainable(model, "lora")
    llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm.") and "lora_" in n)
    vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vit.") and "lora_" in n)
    closed_llm = adapter_count_closed_form(config, 128)
    closed_vit = adapter_count_closed_form(config, 128, llm=False, vit=True)
    print(f"{size}: r=128 adapters LLM {llm:,} (closed form {closed_llm:,}), ViT {vit:,} (closed form {closed_vit:,})")
    assert (llm, vit) == (closed_llm, closed_vit)
    assert rep["adapters"] == (llm + vit, llm + vit)
    expected_llm = {"2b": 125_829_120, "4b": 201_326_592, "26b": 578_813_952,  # worked out by hand
                    "InternVL2_5-1B": 70_385_664}[size]  # 24 x 128 x (1792 + 2 x 1024 + 1792 + 3 x 5760)
    assert closed_llm == expected_llm


def test_26b_qlora_llm_weight_memory():
    config = preset("26b")
    model = build_model(config, "meta")
    lora.prepare_qlora(model)
    nf4 = sum(lora.nf4_nbytes(m.out_features, m.in_features) for m in model.llm.modules()
              if isinstance(m, NF4Linear))
    plain = sum(p.numel() * 2 for name, p in model.llm.named_parameters() if p.is_floating_point())
    bf16_all = sum(p.numel() * 2 for p in build_model(config, "meta").llm.parameters())
    print(f"26B LLM weights: bf16 {bf16_all / 2**30:.2f} GiB; QLoRA NF4 linears {nf4 / 2**30:.2f} GiB + "
          f"bf16 embeddings/head/norms {plain / 2**30:.2f} GiB = {(nf4 + plain) / 2**30:.2f} GiB")
    n_linear = 48 * (8192 * 6144 + 6144 * 6144 + 3 * 16384 * 6144)
    assert sum(m.in_features * m.out_features for m in model.llm.modules() if isinstance(m, NF4Linear)) == n_linear
    # 4.127 bits per weight, plus about 1 KiB of code books per matrix
    assert 0 < nf4 / n_linear - (0.5 + 1 / 64 + 4 / (64 * 256)) < 240 * 1100 / n_linear
    assert plain == 2 * (2 * 92553 * 6144 + 97 * 6144)


# --- DeepSpeed ---------------------------------------------------------------------------------------------------

DS_SCRIPT = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, lora
from model import load_pretrained
sys.path.insert(0, "tests")
from test_lora import small_batch
qlora, stage3 = sys.argv[1] == "qlora", int(sys.argv[3]) == 3
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
       "zero_optimization": {"stage": int(sys.argv[3])}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
deepspeed.init_distributed(dist_backend="gloo")
fixture = "tests/fixtures/" + sys.argv[4]
load = lambda: load_pretrained(fixture, dtype=torch.bfloat16, prepare=lora.prepare_qlora if qlora else None)
reference = load()
torch.manual_seed(0)
lora.inject_lora(reference, lora.LoRAConfig(r=8, alpha=16, vit=True))
model = load_pretrained(fixture, zero3=cfg) if stage3 else load()  # ZeRO-3: partitioned while it is read
if stage3:
    plain = {n.replace(".base.", "."): p for n, p in reference.named_parameters()}  # names without adapters
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p, plain[name]), f"partitioned load differs: {name}"
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16, enabled=stage3):  # as train.py does
    lora.inject_lora(model, lora.LoRAConfig(r=8, alpha=16, vit=True))
a = model.llm.layers[1].mlp.down.lora_A
with deepspeed.zero.GatheredParameters([a], enabled=stage3):
    assert torch.equal(a, reference.llm.layers[1].mlp.down.lora_A), "adapter init differs under zero.Init"
lora.mark_trainable(model, sys.argv[1])
frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=cfg)
batch = small_batch(model.config)
batch["pixel_values"] = batch["pixel_values"].bfloat16()
labels = batch.pop("labels")
model.set_gradient_checkpointing(vit=True, llm=True)
engine.train()
losses = []
for _ in range(4):
    loss = engine(**batch, labels=labels).loss  # the model's chunked loss, under ZeRO-3 with a frozen head too
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print("losses", losses)
assert losses[-1] < losses[0], losses
if not stage3:
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
print("OK")
"""


@pytest.mark.parametrize("mode,stage,family", [("qlora", 1, "internlm2"), ("lora", 3, "qwen2")])
def test_deepspeed_trains(mode, stage, family, tmp_path):
    """One process, gloo: DeepSpeed takes the frozen NF4 base (ZeRO-1) and LoRA on weights partitioned while they
    are read (ZeRO-3, Qwen2: its q/k/v biases too)."""
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT)
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run = subprocess.run([sys.executable, str(script), mode, port, str(stage), family], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-2])
