"""model/: parity with the official outputs stored in tests/fixtures, presets, key mapping, loss, errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import build_model, load_pretrained, preset
from model.internvl import pixel_shuffle
from model.loss import IGNORE_INDEX, OutputHead, chunked_cross_entropy
from model.weights import _wqkv_to_internal, to_internal_name, to_official_name, to_official_state_dict
from tests.fixture_inputs import FIXTURES, fixture_pixels

ATOL = 1e-4
torch.set_num_threads(2)


def plain_cross_entropy(logits, labels):
    """The official reduction on full logits: the mean CE over the supervised tokens (the reference)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.fixture(scope="module", params=["internlm2", "phi3", "qwen2", "llama"])
def case(request):
    d = os.path.join(FIXTURES, request.param)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json")) as f:
        info = json.load(f)
    model = load_pretrained(d, dtype=torch.float32)
    return dict(name=request.param, dir=d, ref=ref, info=info, model=model, pixels=fixture_pixels(request.param))


def close(a, b, atol=ATOL):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff} > {atol}"
    return diff


@torch.no_grad()
def test_vit_and_features_match_official(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    vit = m.vit(pv)
    close(vit[:, ref["vit_token_index"]], ref["vit_last_hidden_state_sel"])
    close(vit.double().mean(-1), ref["vit_last_hidden_state_token_mean"])
    close(vit.double().pow(2).mean(-1).sqrt(), ref["vit_last_hidden_state_token_rms"])
    feats = m.extract_feature(pv)
    assert feats.shape == (pv.shape[0], 256, m.config.llm.hidden_size)
    close(feats[:, ref["vision_features_token_index"]], ref["vision_features_sel"])
    close(feats.double().mean(-1), ref["vision_features_token_mean"])
    close(feats.double().pow(2).mean(-1).sqrt(), ref["vision_features_token_rms"])


@torch.no_grad()
def test_logits_and_loss_match_official(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    args = (ref["input_ids"], pv, ref["image_flags"], ref["attention_mask"], ref["position_ids"])
    logits = m(*args).logits
    assert logits.dtype == torch.float32
    close(logits[ref["logits_sel_batch"], ref["logits_sel_position"]], ref["logits_sel"])
    real = ~torch.isnan(ref["logits_token_logsumexp"])
    close(logits.double().logsumexp(-1)[real], ref["logits_token_logsumexp"][real])
    close(logits.double().mean(-1)[real], ref["logits_token_mean"][real])
    out = m(*args, labels=ref["labels"])
    assert out.logits is None
    assert out.n_supervised == case["info"]["samples"][0]["num_supervised_labels"]
    close(out.loss, ref["loss"])
    close(plain_cross_entropy(logits, ref["labels"]), ref["loss"])


@torch.no_grad()
def test_text_only_llm_logits_match_official(case):
    close(case["model"](case["ref"]["text_input_ids"]).logits, case["ref"]["text_logits"])


@torch.no_grad()
def test_greedy_generation_matches_official(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    ids, step_logits = m.generate(ref["chat_input_ids"], pv, attention_mask=ref["chat_attention_mask"],
                                  max_new_tokens=8, output_logits=True)
    assert ids.tolist() == ref["greedy_ids"].tolist()
    close(step_logits[0], ref["greedy_step_logits"])
    # chat semantics: stop at the template terminator; the official chat produced these ids
    chat = m.generate(ref["chat_input_ids"], pv, max_new_tokens=8, eos_token_id=case["info"]["chat"]["eos_token_id"])
    assert chat.tolist() == ref["chat_output_ids"].tolist()
    # stopping: with an eos that greedy emits at step 3, generation ends there
    stop = int(ref["greedy_ids"][0, 3])
    if stop not in ref["greedy_ids"][0, :3].tolist():
        short = m.generate(ref["chat_input_ids"], pv, max_new_tokens=8, eos_token_id=stop)
        assert short.tolist() == ref["greedy_ids"][:, :4].tolist()


@torch.no_grad()
def test_kv_cache_holds_only_keys_and_values(case):
    """The prefill's cache owns its keys and values: a view would keep each layer's whole fused q|k|v output
    alive (4x the values at 2B: 0.36 GiB more at 930 prompt tokens in float32)."""
    from model.llm import KVCache
    m, ids = case["model"], case["ref"]["text_input_ids"]
    cache = KVCache(len(m.llm.layers))
    m.llm(m.llm.embed(ids), torch.arange(ids.shape[1])[None], None, cache)
    for t in cache.k + cache.v:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@torch.no_grad()
def test_padded_batch_equals_samples_alone(case):
    """Right-padded batch of an image sample and a text-only sample (dummy tile, flag 0) vs each alone.

    The text sample is made longer than Phi-3's original_max_position_embeddings (1024 here) so both rows use
    the long RoPE factors alone too: the official su switch is batch-global (see the test below).
    """
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    a_ids, a_lab = ref["input_ids"][0], ref["labels"][0]
    b_ids = ref["text_input_ids"][0].repeat(60)[:1100]
    b_lab = b_ids.clone()
    b_lab[:5] = -100
    dummy = pv[:1] * 0 + 1.0  # any tile: its features must be dropped
    n = max(len(a_ids), len(b_ids))
    ids = torch.zeros(2, n, dtype=torch.long)
    lab = torch.full((2, n), -100)
    mask = torch.zeros(2, n, dtype=torch.long)
    pos = torch.zeros(2, n, dtype=torch.long)
    for r, (x, y) in enumerate([(a_ids, a_lab), (b_ids, b_lab)]):
        ids[r, :len(x)], lab[r, :len(x)], mask[r, :len(x)], pos[r, :len(x)] = x, y, 1, torch.arange(len(x))
    pixels = torch.cat([pv, dummy])
    flags = torch.cat([ref["image_flags"], torch.zeros(1, dtype=torch.long)])
    batch = m(ids, pixels, flags, mask, pos).logits
    alone_a = m(a_ids[None], pv, ref["image_flags"]).logits[0]
    alone_b = m(b_ids[None], dummy, torch.zeros(1, dtype=torch.long)).logits[0]
    close(batch[0, :len(a_ids)], alone_a, 1e-5)
    close(batch[1, :len(b_ids)], alone_b, 1e-5)
    loss = m(ids, pixels, flags, mask, pos, labels=lab)
    la = m(a_ids[None], pv, ref["image_flags"], labels=a_lab[None])
    lb = m(b_ids[None], dummy, torch.zeros(1, dtype=torch.long), labels=b_lab[None])
    assert loss.n_supervised == la.n_supervised + lb.n_supervised
    expected = (la.loss * la.n_supervised + lb.loss * lb.n_supervised) / loss.n_supervised
    close(loss.loss, expected, 1e-5)


@torch.no_grad()
def test_phi3_su_factor_switch_is_batch_global():
    """Official Phi-3: one row past original_max_position_embeddings switches every row to the long factors."""
    m = load_pretrained(os.path.join(FIXTURES, "phi3"), dtype=torch.float32)
    short = torch.arange(3, 40)[None]
    alone = m(short).logits
    batch = torch.zeros(2, 1100, dtype=torch.long)
    batch[0], batch[1, :short.shape[1]] = torch.arange(1100) % 400, short
    mask = torch.zeros_like(batch)
    mask[0], mask[1, :short.shape[1]] = 1, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    mixed = m(batch, attention_mask=mask, position_ids=pos).logits[1, :short.shape[1]]
    assert (mixed - alone[0]).abs().max() > 1e-2  # long factors applied to the short row
    m.config.llm.original_max_position_embeddings = 2048  # now both rows are "short": identical again
    close(m(batch, attention_mask=mask, position_ids=pos).logits[1, :short.shape[1]], m(short).logits[0], 1e-5)


@torch.no_grad()
def test_left_padded_generation_equals_alone(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    text = ref["text_input_ids"][0]
    alone = m.generate(text[None], max_new_tokens=5)
    ids = torch.cat([torch.zeros(7, dtype=torch.long), text])[None]
    mask = (torch.arange(ids.shape[1]) >= 7).long()[None]
    assert m.generate(ids, attention_mask=mask, max_new_tokens=5).tolist() == alone.tolist()


def test_round_trip_reproduces_every_stored_tensor_bit_for_bit(case):
    stored = {}
    for fname in sorted(os.listdir(case["dir"])):
        if fname.startswith("model") and fname.endswith(".safetensors"):
            stored.update(load_file(os.path.join(case["dir"], fname)))
    exported = to_official_state_dict(case["model"].state_dict(), case["model"].config)
    assert set(exported) == set(stored)
    for k, v in stored.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k


def test_gradient_checkpointing_gives_same_loss_and_grads(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    args = (ref["input_ids"], pv[:3], ref["image_flags"][:3])
    keep = torch.ones(ref["input_ids"].shape[1], dtype=torch.bool)  # keep 3 tiles' worth of image tokens
    keep[(ref["input_ids"][0] == m.config.img_context_token_id).nonzero()[3 * 256:]] = False
    ids = ref["input_ids"][:, keep]
    labels = ref["labels"][:, keep]
    results = []
    for ckpt in (False, True):
        m.zero_grad(set_to_none=True)
        m.train()
        m.set_gradient_checkpointing(ckpt, ckpt)
        m(ids, args[1], args[2], labels=labels).loss.backward()
        results.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    m.eval()
    m.set_gradient_checkpointing(False, False)
    m.zero_grad(set_to_none=True)
    assert results[0].keys() == results[1].keys() and len(results[0]) == len(list(m.parameters()))
    for k in results[0]:
        close(results[0][k], results[1][k], 1e-6)


# --- presets on the meta device ---

def _spec_shapes(size):
    """The official keys and shapes of the released models, written out independently of model/weights.py."""
    shapes = {}
    vit, llm = {"2b": (1024, 24, 4096, False), "4b": (1024, 24, 4096, False), "26b": (3200, 45, 12800, True),
                "InternVL2_5-1B": (1024, 24, 4096, False), "InternVL2-40B": (3200, 45, 12800, True)}[size], \
        {"2b": ("internlm2", 92553, 2048, 24, 4096, 8192), "4b": ("phi3", 32020, 3072, 32, 9216, 8192),
         "26b": ("internlm2", 92553, 6144, 48, 8192, 16384),
         "InternVL2_5-1B": ("qwen2", 151674, 896, 24, (896, 128), 4864),  # q 14 x 64, k / v 2 x 64
         "InternVL2-40B": ("llama", 64007, 7168, 60, (7168, 1024), 20480)}[size]  # q 56 x 128, k / v 8 x 128
    c, nl, inter, big = vit
    e = "vision_model.embeddings."
    shapes.update({e + "class_embedding": [1, 1, c], e + "position_embedding": [1, 1025, c],
                   e + "patch_embedding.weight": [c, 3, 14, 14], e + "patch_embedding.bias": [c]})
    for i in range(nl):
        p = f"vision_model.encoder.layers.{i}."
        shapes.update({p + "ls1": [c], p + "ls2": [c], p + "attn.qkv.weight": [3 * c, c],
                       p + "attn.proj.weight": [c, c], p + "attn.proj.bias": [c], p + "mlp.fc1.weight": [inter, c],
                       p + "mlp.fc1.bias": [inter], p + "mlp.fc2.weight": [c, inter], p + "mlp.fc2.bias": [c],
                       p + "norm1.weight": [c], p + "norm2.weight": [c]})
        if big:
            shapes.update({p + "attn.q_norm.weight": [c], p + "attn.k_norm.weight": [c]})
        else:
            shapes.update({p + "attn.qkv.bias": [3 * c], p + "norm1.bias": [c], p + "norm2.bias": [c]})
    fam, v, d, layers, qkv, i_ = llm
    shapes.update({"mlp1.0.weight": [4 * c], "mlp1.0.bias": [4 * c], "mlp1.1.weight": [d, 4 * c],
                   "mlp1.1.bias": [d], "mlp1.3.weight": [d, d], "mlp1.3.bias": [d]})
    lm = "language_model.model."
    if fam == "internlm2":
        shapes.update({lm + "tok_embeddings.weight": [v, d], lm + "norm.weight": [d],
                       "language_model.output.weight": [v, d]})
        for i in range(layers):
            p = f"{lm}layers.{i}."
            shapes.update({p + "attention.wqkv.weight": [qkv, d], p + "attention.wo.weight": [d, d],
                           p + "feed_forward.w1.weight": [i_, d], p + "feed_forward.w3.weight": [i_, d],
                           p + "feed_forward.w2.weight": [d, i_], p + "attention_norm.weight": [d],
                           p + "ffn_norm.weight": [d]})
    elif fam in ("qwen2", "llama"):  # transformers' classes; a tied Qwen2 head is stored too
        shapes.update({lm + "embed_tokens.weight": [v, d], lm + "norm.weight": [d],
                       "language_model.lm_head.weight": [v, d]})
        q, kv = qkv
        for i in range(layers):
            p = f"{lm}layers.{i}."
            shapes.update({p + "self_attn.q_proj.weight": [q, d], p + "self_attn.k_proj.weight": [kv, d],
                           p + "self_attn.v_proj.weight": [kv, d], p + "self_attn.o_proj.weight": [d, q],
                           p + "mlp.gate_proj.weight": [i_, d], p + "mlp.up_proj.weight": [i_, d],
                           p + "mlp.down_proj.weight": [d, i_], p + "input_layernorm.weight": [d],
                           p + "post_attention_layernorm.weight": [d]})
            if fam == "qwen2":
                shapes.update({p + "self_attn.q_proj.bias": [q], p + "self_attn.k_proj.bias": [kv],
                               p + "self_attn.v_proj.bias": [kv]})
    else:
        shapes.update({lm + "embed_tokens.weight": [v, d], lm + "norm.weight": [d],
                       "language_model.lm_head.weight": [v, d]})
        for i in range(layers):
            p = f"{lm}layers.{i}."
            shapes.update({p + "self_attn.qkv_proj.weight": [qkv, d], p + "self_attn.o_proj.weight": [d, d],
                           p + "mlp.gate_up_proj.weight": [2 * i_, d], p + "mlp.down_proj.weight": [d, i_],
                           p + "input_layernorm.weight": [d], p + "post_attention_layernorm.weight": [d]})
    return shapes


@pytest.mark.parametrize("size,count,params", [("2b", 517, 2.206e9), ("4b", 541, 4.147e9), ("26b", 934, 25.51e9),
                                               ("InternVL2_5-1B", 637, 0.9382e9), ("InternVL2-40B", 1138, 40.07e9)])
def test_presets_have_released_keys_shapes_and_parameter_counts(size, count, params):
    cfg = preset(size)
    m = build_model(cfg, "meta")
    n = sum(p.numel() for p in m.parameters())
    print(f"{size}: {n / 1e9:.4f} B parameters, {len(m.state_dict())} tensors")
    assert abs(n - params) / params < 5e-4
    official = {k: list(v.shape) for k, v in to_official_state_dict(m.state_dict(), cfg).items()}
    assert len(official) == count
    assert official == _spec_shapes(size)


# --- pieces ---

def test_pixel_shuffle_order_v1_v2():
    """A 4x4 grid, one channel, value 10r + c."""
    grid = torch.tensor([[10 * r + c for c in range(4)] for r in range(4)], dtype=torch.float32)
    x = grid.reshape(1, 4, 4, 1)
    v2 = pixel_shuffle(x, 0.5, "v2").reshape(4, 4).tolist()
    assert v2 == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    v1 = pixel_shuffle(x, 0.5, "v1").reshape(4, 4).tolist()
    assert v1 == [[0, 1, 10, 11], [20, 21, 30, 31], [2, 3, 12, 13], [22, 23, 32, 33]]


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 2), (8, 1)])
def test_wqkv_permutation_matches_official_split(heads, kv):
    cfg = preset("tiny")
    cfg.llm.num_heads, cfg.llm.num_kv_heads = heads, kv
    hd, d, g = cfg.llm.head_dim, cfg.llm.hidden_size, heads // kv
    w = torch.randn((heads + 2 * kv) * hd, d)
    # the official split, restated head by head: group j holds q heads j*g..j*g+g-1, then k_j, then v_j
    rows = w.reshape(kv, g + 2, hd, d)
    q = torch.cat([rows[h // g, h % g] for h in range(heads)])
    k = torch.cat([rows[j, g] for j in range(kv)])
    v = torch.cat([rows[j, g + 1] for j in range(kv)])
    internal = _wqkv_to_internal(w, cfg)
    assert torch.equal(internal, torch.cat([q, k, v]))
    name = "llm.layers.0.attn.qkv.weight"
    assert torch.equal(to_official_state_dict({name: internal}, cfg)[to_official_name(name, "internlm2")], w)


def test_every_release_is_identified_from_its_architecture_and_template():
    """The run's release comes from the checkpoint: InternVL2-8B is never taken for a 2B. Releases of one
    architecture and template (InternVL2-2B and Mini-InternVL-Chat-2B-V1-5) need the directory name."""
    from model.config import RELEASES, identify_release
    for name in RELEASES:
        assert identify_release(preset(name), "/models/" + name) == (name, True)
    assert identify_release(preset("InternVL2-8B")) == ("InternVL2-8B", True)
    assert identify_release(preset("InternVL2_5-8B")) == ("InternVL2_5-8B", True)
    assert identify_release(preset("InternVL2_5-4B")) == ("InternVL2_5-4B", True)
    assert identify_release(preset("InternVL2-2B")) == ("Mini-InternVL-Chat-2B-V1-5", True)
    from model import load_config
    qwen2, llama = (load_config(os.path.join(FIXTURES, n)) for n in ("qwen2", "llama"))
    assert identify_release(qwen2) == ("InternVL2_5-1B", False)  # tiny: the family's first release
    assert identify_release(llama) == ("InternVL2-40B", False)
    qwen2.template = "phi3-chat"
    with pytest.raises(ValueError, match="no released InternVL checkpoint has an Qwen2ForCausalLM LLM"):
        identify_release(qwen2)
    with pytest.raises(ValueError, match="InternVL2-Llama3-76B is not supported: its Llama-3 tokenizer"):
        preset("InternVL2-Llama3-76B")


def test_release_tokens_and_rope_follow_the_published_files():
    """Each release's <IMG_CONTEXT> is the 3rd InternVL token, 6 more follow, and the vocabulary ends there: the
    official fine-tune code adds them and resizes to len(tokenizer) (the released added_tokens.json: 92546 / 92553,
    32013 / 32020, 151648 / 151655, 151667 / 151674; InternVL2-40B 64000..64006, <img> and </img> being Yi's own
    pieces). InternVL2.5-26B's RoPE is internlm2_5-20b-chat's config.json (theta 5e7, dynamic x2.5)."""
    from model.config import RELEASES
    for name, c in RELEASES.items():
        assert c.img_context_token_id is not None and c.llm.vocab_size == c.img_context_token_id + 7, name
    llm = RELEASES["InternVL2_5-26B"].llm
    assert (llm.rope_theta, llm.rope_scaling) == (5e7, {"type": "dynamic", "factor": 2.5})
    assert RELEASES["InternVL2-26B"].llm.rope_scaling == {"type": "dynamic", "factor": 3.0}  # internlm2-chat-20b


@pytest.mark.parametrize("name", ["InternVL2_5-1B", "InternVL2-40B", "InternVL2_5-8B"])
def test_release_config_json_reads_back(name):
    """A preset's config.json (bench/realsize.py writes it) reads back to the same model, with the official
    class's switches (Qwen2 tie_word_embeddings and use_sliding_window, Llama attention_bias / mlp_bias)."""
    from model.config import InternVLConfig
    cfg = preset(name)
    d = cfg.to_official()
    back = InternVLConfig.from_official(d)
    assert (back.llm, back.vision, back.template) == (cfg.llm, cfg.vision, cfg.template)
    assert d["llm_config"]["architectures"] == [cfg.llm.architecture]
    assert d["llm_config"]["tie_word_embeddings"] == (name == "InternVL2_5-1B")
    assert all(d["llm_config"][k] == v for k, v in cfg.llm.spec.switches.items())


@pytest.mark.parametrize("size", ["2b", "4b", "InternVL2_5-1B", "InternVL2-40B"])
def test_name_table_round_trips(size):
    cfg = preset(size)
    for k in build_model(cfg, "meta").state_dict():
        assert to_internal_name(to_official_name(k, cfg.llm.family), cfg.llm.family) == k


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_loss_equals_plain_loss_and_grads(chunk, dtype):
    torch.manual_seed(0)
    head = OutputHead(32, 101, bias=False).to(dtype)
    head.chunk_size = chunk
    hidden = torch.randn(3, 40, 32, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 101, (3, 40))
    labels[torch.rand(3, 40) < 0.6] = -100
    loss, n = chunked_cross_entropy(hidden * 2, labels, head)
    (loss * 3).backward()  # an upstream and a downstream op around it
    gh, gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref = plain_cross_entropy(head(hidden * 2), labels)
    (ref * 3).backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-6
    assert (gh - hidden.grad).abs().max() < 1e-6 and (gw - head.weight.grad).abs().max() < 1e-6
    with torch.no_grad():  # evaluation: no gradient work, same value
        assert abs(chunked_cross_entropy(hidden * 2, labels, head)[0].item() - ref.item()) < 1e-6
    head.weight.requires_grad_(False)  # frozen head (LoRA): gradients for the hidden states only
    hidden.grad, head.weight.grad = None, None
    chunked_cross_entropy(hidden * 2, labels, head)[0].backward()
    assert (gh / 3 - hidden.grad).abs().max() < 1e-6 and head.weight.grad is None


def test_no_supervised_token_gives_zero_loss_and_count():
    head = OutputHead(8, 11, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss, n = chunked_cross_entropy(hidden, torch.full((1, 5), -100), head)
    assert n == 0 and loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()  # connected to the graph, so every rank reduces the same gradients
    assert hidden.grad is not None


def _allocated_bytes(fn):
    """fn()'s result and the bytes of every storage its aten ops created (views and in-place ops create none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.created = []  # every new storage's bytes (an address may be reused once freed: not a key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    self.created.append(t.untyped_storage().nbytes())
            return out

    with Record() as rec:
        out = fn()
    return out, sum(rec.created)


def test_head_in_compute_dtype_casts_into_one_reused_slice():
    """convert.py's float32 logits of a bf16 head: the numbers of a float32 cast of each VOCAB_SLICE rows, and
    every slice cast into ONE buffer, the logits into one output: what it allocates is one slice + the logits
    (+ each slice's own small product), whatever the vocabulary. A cast per slice, interleaved with its output,
    left glibc's heap fragmented: at 151,674 x 896 each call kept 0.4 GiB resident."""
    from model.loss import VOCAB_SLICE
    torch.manual_seed(0)
    vocab, hidden_size = 4 * VOCAB_SLICE + 5, 64
    head = OutputHead(hidden_size, vocab, bias=False).to(torch.bfloat16)
    head.compute_dtype = torch.float32
    hidden = torch.randn(2, 3, hidden_size)
    with torch.no_grad():
        got, allocated = _allocated_bytes(lambda: head(hidden))
        want = torch.cat([torch.nn.functional.linear(hidden, w.float()) for w in head.weight.split(VOCAB_SLICE)],
                         dim=-1)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    logits = 4 * hidden[..., 0].numel() * vocab
    assert allocated <= 4 * VOCAB_SLICE * hidden_size + 2 * logits, allocated  # a cast per slice: 4x the weight


# --- errors ---

def test_image_token_count_mismatch_is_an_error(case):
    m, ref, pv = case["model"], case["ref"], case["pixels"]
    with pytest.raises(ValueError, match=r"sample 0 has 1791 <IMG_CONTEXT> tokens.*7 image tiles x 256 = 1792"):
        keep = torch.ones(ref["input_ids"].shape[1], dtype=torch.bool)
        keep[(ref["input_ids"][0] == m.config.img_context_token_id).nonzero()[0]] = False
        m(ref["input_ids"][:, keep], pv, ref["image_flags"])
    with pytest.raises(ValueError, match=r"1792 <IMG_CONTEXT> tokens .* but 6 image tiles"):
        m(ref["input_ids"], pv, torch.tensor([1, 1, 1, 1, 1, 1, 0]))


def _copy_fixture(tmp_path, name="internlm2"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def test_missing_shard_is_an_error(tmp_path):
    d = _copy_fixture(tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) that do not exist.*model-00002-of-00002"):
        load_pretrained(str(d), dtype=torch.float32)


def _rewrite_single(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_unexpected_and_missing_keys_are_errors(tmp_path):
    d = _copy_fixture(tmp_path, "phi3")

    def edit(t):
        t["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        del t["mlp1.3.bias"]
    _rewrite_single(d, edit)
    with pytest.raises(ValueError, match=r"(?s)missing tensors \(1\): \['mlp1.3.bias'\].*unexpected tensors \(1\): "
                                         r"\['language_model.model.layers.0.self_attn.rotary_emb.inv_freq'\]"):
        load_pretrained(str(d), dtype=torch.float32)


def test_wrong_shape_is_an_error(tmp_path):
    d = _copy_fixture(tmp_path, "phi3")
    _rewrite_single(d, lambda t: t.__setitem__("mlp1.1.weight", torch.zeros(64, 255)))
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): \['mlp1.1.weight: checkpoint \[64, 255\] vs model "
                                         r"\[64, 256\]'\]"):
        load_pretrained(str(d), dtype=torch.float32)


def test_unknown_llm_architecture_is_an_error(tmp_path):
    d = _copy_fixture(tmp_path, "phi3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown LLM architecture 'MistralForCausalLM'.*supported: "
                                         r"\['InternLM2ForCausalLM', 'LlamaForCausalLM', 'Phi3ForCausalLM', "
                                         r"'Qwen2ForCausalLM'\]"):
        load_pretrained(str(d))


@pytest.mark.parametrize("name,key,value", [("qwen2", "use_sliding_window", True),
                                            ("llama", "attention_bias", True), ("llama", "mlp_bias", True)])
def test_switches_the_released_checkpoints_leave_off_are_refused(tmp_path, name, key, value):
    d = _copy_fixture(tmp_path, name)
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"][key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"llm_config.{key} = True is not supported"):
        load_pretrained(str(d))


def test_a_llama_3_tokenizer_is_refused(tmp_path):
    """InternVL2-Llama3-76B: a Llama decoder whose tokenizer is a tokenizer.json, not sentencepiece."""
    d = _copy_fixture(tmp_path, "llama")
    os.remove(d / "tokenizer.model")
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"Llama-3 tokenizer.json.*not supported"):
        load_pretrained(str(d))


def test_model_imports_nothing_from_data():
    """Lower layers never import upper ones: model/ reads the <IMG_CONTEXT> id itself (model/tokens.py)."""
    import ast
    root = os.path.join(os.path.dirname(FIXTURES), "..", "model")
    for fname in sorted(os.listdir(root)):
        if fname.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(root, fname)).read())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                assert not any(n == "data" or n.startswith("data.") for n in names), (fname, names)


def test_commands_start_and_load_without_torch_dynamo_or_sympy():
    """torch._dynamo and sympy cost seconds and 0.11 GiB of RSS in every command: importing torch's varlen
    attention loads them (the model imports it on first CUDA use only), and so does a random init (the
    embedding's normal_, the ViT's randn) or arithmetic (the ViT's layer scales) on the meta device, where every
    load builds the model (InternVL2.5-1B's bf16 load: 2.04 GiB = 1.17x its checkpoint with them, 1.97 GiB =
    1.13x without)."""
    import subprocess
    import sys
    code = ("import sys, train, chat, convert, evaluate; from model import load_pretrained; "
            f"load_pretrained({os.path.join(FIXTURES, 'qwen2')!r}); "
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(os.path.dirname(FIXTURES), ".."),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_load_fills_from_files_in_requested_dtype():
    m = load_pretrained(os.path.join(FIXTURES, "phi3"))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())
    with safe_open(os.path.join(FIXTURES, "phi3", "model.safetensors"), "pt") as f:
        w = f.get_tensor("language_model.lm_head.weight")
    assert torch.equal(m.llm.head.weight, w.to(torch.bfloat16))


@torch.no_grad()
def test_internlm2_dynamic_ntk_scales_past_max_positions_and_stays():
    """Beyond max_position_embeddings the base becomes theta*(f*L/max - (f-1))^(hd/(hd-2)), kept for later calls."""
    m = load_pretrained(os.path.join(FIXTURES, "internlm2"), dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    plain = m(ids).logits
    m.config.llm.max_position_embeddings = 64
    assert torch.equal(m(ids).logits, plain)  # 37 <= 64: no scaling
    cfg, hd, f, n = m.config.llm, m.config.llm.head_dim, 2.0, 100
    from model.llm import rope_cos_sin
    cos, _ = rope_cos_sin(cfg, torch.arange(n)[None], n, torch.float32)
    base = cfg.rope_theta * (f * n / 64 - (f - 1)) ** (hd / (hd - 2))
    angle = 7 * (1.0 / base ** (torch.arange(0, hd, 2).float() / hd))
    close(cos[0, 7, : hd // 2], angle.cos(), 1e-6)
    m(torch.arange(n)[None] % 500)  # a long call scales the base ...
    assert (m(ids).logits - plain).abs().max() > 1e-3  # ... and a later short call keeps it (official quirk)


@torch.no_grad()
def test_select_layer_and_resized_position_embedding():
    m = load_pretrained(os.path.join(FIXTURES, "phi3"), dtype=torch.float32)
    pv = torch.randn(2, 3, 224, 224)
    h = m.vit.embed(pv)
    for layer in m.vit.layers[:1]:
        h = layer(h)
    assert h.shape == (2, 16 * 16 + 1, 64)
    close(m.vit(pv, select_layer=-2), h, 0)
    stored = m.vit.pos_embed[0, 1:].reshape(1, 32, 32, 64).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(stored, size=(16, 16), mode="bicubic", align_corners=False)
    close(m.vit.position_embedding(16, 16, torch.float32)[0, 1:], resized.flatten(2).transpose(1, 2)[0], 0)
    close(m.vit.position_embedding(32, 32, torch.float32), m.vit.pos_embed, 0)  # identity at the stored grid


@torch.no_grad()
def test_sampling_top_p_and_temperature():
    m = load_pretrained(os.path.join(FIXTURES, "internlm2"), dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    greedy = m.generate(ids, max_new_tokens=6)
    # a nucleus smaller than the top token's probability keeps only that token: sampling equals greedy
    tiny_p = m.generate(ids, max_new_tokens=6, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert tiny_p.tolist() == greedy.tolist()
    draws = {tuple(m.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0,
                              generator=torch.Generator().manual_seed(s))[0].tolist()) for s in range(4)}
    assert len(draws) > 1  # a hot temperature samples different continuations
    again = m.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0,
                       generator=torch.Generator().manual_seed(0))
    assert tuple(again[0].tolist()) in draws  # seeded: reproducible


def test_load_pretrained_replace_uses_the_given_tensors_and_checks_them():
    """convert.py's trained model: replaced tensors are taken as given (the checkpoint's are not read) and must be
    parameters of the model with their shape."""
    path = os.path.join(FIXTURES, "phi3")
    head = load_pretrained(path, dtype=torch.float32).llm.head.weight
    new = torch.randn_like(head)
    model = load_pretrained(path, dtype=torch.float32, replace={"llm.head.weight": new})
    assert model.llm.head.weight.data_ptr() == new.data_ptr()
    with pytest.raises(KeyError, match="of another shape: \\['llm.head.weight'\\]"):
        load_pretrained(path, dtype=torch.float32, replace={"llm.head.weight": new[:3]})
    with pytest.raises(KeyError, match="no parameter of this model"):
        load_pretrained(path, dtype=torch.float32, replace={"llm.nothing": new})


def test_a_truncated_weight_file_is_named(tmp_path):
    base = tmp_path / "phi3"
    shutil.copytree(os.path.join(FIXTURES, "phi3"), base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated file"):
        load_pretrained(str(base), dtype=torch.float32)


def test_key_mismatch_message_names_counts_and_the_first_keys():
    from model.weights import mismatch_message
    msg = mismatch_message("x.safetensors does not match:", [f"m{i}" for i in range(10)], ["u"])
    assert msg == ("x.safetensors does not match:\n  missing tensors (10): ['m0', 'm1', 'm2', 'm3', 'm4', 'm5', "
                   "'m6', 'm7'] ...\n  unexpected tensors (1): ['u']")
    assert mismatch_message("w:", wrong=["a: [1] vs [2]"], limit=None) == "w:\n  wrong shapes (1): ['a: [1] vs [2]']"


def test_sampled_sha1_reads_evenly_spaced_chunks(tmp_path):
    """The whole file when it is small, else `samples` chunks, the first at 0 and the last ending at the end of
    the file: a byte in the last chunk changes it, a byte between chunks does not. The data index fingerprint
    hashes the same bytes, so existing index caches and resumes stay valid."""
    import hashlib

    from data.dataset import file_fingerprint
    from model.weights import sampled_sha1
    data = bytearray(torch.randint(0, 256, (300_000,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    path = tmp_path / "blob"
    path.write_bytes(data)
    chunks = b"".join(data[k * (300_000 - 1000) // 3:][:1000] for k in range(4))
    assert sampled_sha1(str(path), 4, 1000) == hashlib.sha1(chunks).hexdigest()
    assert sampled_sha1(str(path), 300, 1000) == hashlib.sha1(data).hexdigest()  # 300 x 1000 covers it all
    assert sampled_sha1(str(path), 64, 4096) == file_fingerprint(str(path))["sample_sha1"]
    before = sampled_sha1(str(path), 4, 1000)
    data[150_000] ^= 0xFF  # between the second and third chunk
    path.write_bytes(data)
    assert sampled_sha1(str(path), 4, 1000) == before
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert sampled_sha1(str(path), 4, 1000) != before
