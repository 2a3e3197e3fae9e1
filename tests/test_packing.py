"""data/packing.py and the model's segment-id attention: plans, sampler, collation, and packed == unpacked."""
import functools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import model.llm as llm_module
from data.collate import collate
from data.packing import PackedBatchSampler, collate_packed, packed_total_steps, plan_packs
from model import load_pretrained
from model.llm import Varlen, attention_mask_4d
from tests.fixture_inputs import FIXTURES, fixture_pixels

torch.set_num_threads(2)


# ---------------------------------------------------------------- planning

def test_plan_packs_respects_both_budgets_and_uses_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(50, 1000) for _ in range(300)]
    tiles = [rng.choice([0, 0, 1, 3, 7, 13]) for _ in range(300)]
    packs = plan_packs(lengths, 2048, tiles, 20)
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(lengths[i] for i in p) <= 2048 for p in packs)
    assert all(sum(tiles[i] for i in p) <= 20 for p in packs)
    # with tokens alone, best-fit decreasing is within 3% of the lower bound sum(lengths) / budget
    bound = -(-sum(lengths) // 2048)
    assert len(plan_packs(lengths, 2048)) <= 1.03 * bound + 1


def test_plan_packs_exact_small_case_and_order():
    # 7+3, 6+4, 5+5 fill three packs of 10 exactly; members keep the given order
    assert sorted(plan_packs([5, 7, 4, 3, 6, 5], 10)) == [[0, 5], [1, 3], [2, 4]]
    assert plan_packs([5, 7, 4], 10, order=[2, 0]) == [[2, 0]]
    # the tile budget forces a third pack although the tokens would fit two
    assert len(plan_packs([2, 2, 2, 2], 8, tiles=[3, 3, 3, 3], max_tiles=4)) == 4


def test_plan_packs_errors_name_the_sample():
    with pytest.raises(ValueError, match=r"sample 1: 900 tokens do not fit the pack budget of 800"):
        plan_packs([10, 900], 800)
    with pytest.raises(ValueError, match=r"sample 0: 14 image tiles do not fit the pack budget of 13"):
        plan_packs([10, 20], 800, tiles=[14, 1], max_tiles=13)
    with pytest.raises(ValueError, match=r"sample 0: 0 tokens"):
        plan_packs([0], 800)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_covers_each_sample_once_with_equal_counts(world):
    rng = random.Random(1)
    lengths = [rng.randint(20, 500) for _ in range(203)]
    tiles = [rng.randint(0, 5) for _ in range(203)]
    samplers = [PackedBatchSampler(lengths, 1024, tiles, 12, world_size=world, rank=r, seed=7, window=64)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1
    assert len(per_rank[0]) == samplers[0].micro_batches(0)
    seen = [i for packs in per_rank for p in packs for i in p]
    assert set(seen) == set(range(203))
    padding = len(samplers[0].packs(0)) - len(plan_packs_of_epoch(samplers[0]))
    assert padding < world
    extra = len(seen) - 203  # only the padding packs repeat samples
    assert extra == sum(len(p) for p in samplers[0].packs(0)[len(plan_packs_of_epoch(samplers[0])):])
    # deterministic in (seed, epoch); another epoch is another order
    again = PackedBatchSampler(lengths, 1024, tiles, 12, world_size=world, rank=0, seed=7, window=64)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]


def plan_packs_of_epoch(sampler):
    """The epoch's packs before padding (same plan as the sampler, recomputed)."""
    rng = random.Random(f"{sampler.seed}/packed/{sampler.epoch}")
    order = list(range(len(sampler.lengths)))
    rng.shuffle(order)
    return [p for s in range(0, len(order), sampler.window)
            for p in plan_packs(sampler.lengths, sampler.max_tokens, sampler.tiles, sampler.max_tiles,
                                order[s:s + sampler.window])]


def test_sampler_resumes_and_counts_steps():
    lengths = [random.Random(i).randint(10, 300) for i in range(100)]
    s = PackedBatchSampler(lengths, 600, seed=3)
    full = list(s)
    s.set_epoch(0, 5)
    assert len(s) == len(full) - 5
    assert list(s) == full[5:]
    state = s.state_dict(position=2)
    r = PackedBatchSampler(lengths, 600, seed=3)
    r.load_state_dict(state)
    assert list(r) == full[2:]
    with pytest.raises(ValueError, match="saved max_tokens=600 but this run has 700"):
        PackedBatchSampler(lengths, 700, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="saved samples_sha1=.* the samples' length estimates or modalities"):
        PackedBatchSampler(lengths, 600, tiles=[1] * 100, seed=3).load_state_dict(state)  # tiles now counted
    per_epoch = [s.micro_batches(e) for e in range(3)]
    assert packed_total_steps(s, 2, 4) == per_epoch[0] // 4 + per_epoch[1] // 4
    assert packed_total_steps(s, 2.5, 4) == per_epoch[0] // 4 + per_epoch[1] // 4 + -(-(per_epoch[2] // 4) // 2)


# ---------------------------------------------------------------- collation

def _sample(ids, labels, tiles, real=True):
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                pixel_values=torch.full((tiles, 3, 4, 4), float(len(ids))),
                image_flags=torch.full((tiles,), int(real)), meta={"id": f"s{len(ids)}"})


def test_collate_packed_row_layout():
    a = _sample([1, 5, 6, 7], [-100, -100, 6, 7], 2)
    b = _sample([1, 8, 9], [8, 8, 9], 1, real=False)  # text-only: its dummy tile is dropped
    c = _sample([1, 4], [-100, 4], 1)
    out = collate_packed([a, b, c], max_tokens=16)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 9, 1, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 3, 3]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # b's first label (8) would be predicted from a's last token: masked; the rest is each sample's own
    assert out["labels"].tolist() == [[-100, -100, 6, 7, -100, 8, 9, -100, 4]]
    assert out["image_flags"].tolist() == [1, 1, 1]
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 4.0, 2.0]
    assert out["meta"]["num_tokens"] == 9 and out["meta"]["num_samples"] == 3
    assert out["meta"]["num_supervised"] == 5 and out["meta"]["over_budget"] == 0
    assert out["meta"]["ids"] == ["s4", "s3", "s2"]


def _collate_in_worker(samples):
    """Both collates, run where the DataLoader runs them, with whether their tiles were born shared."""
    packed, padded = collate_packed(samples), collate(samples)
    return packed, padded, packed["pixel_values"].is_shared(), padded["pixel_values"].is_shared()


def test_collate_in_a_worker_builds_the_tiles_in_shared_memory_with_the_same_numbers():
    """In a DataLoader worker the tiles are concatenated straight into shared memory (no second copy to send
    them); the numbers are those of the main-process collate, and a pack still drops text-only dummies."""
    torch.manual_seed(0)
    samples = [_sample([1, 5, 6, 7], [-100, -100, 6, 7], 2), _sample([1, 8, 9], [8, 8, 9], 1, real=False),
               _sample([1, 4], [-100, 4], 3)]
    for s in samples:
        s["pixel_values"] = torch.randn(s["pixel_values"].shape)
    main_packed, main_padded, shared_packed, shared_padded = _collate_in_worker(samples)
    assert not shared_packed and not shared_padded
    loader = torch.utils.data.DataLoader(samples, batch_size=3, num_workers=1, collate_fn=_collate_in_worker)
    packed, padded, shared_packed, shared_padded = next(iter(loader))
    assert shared_packed and shared_padded
    assert torch.equal(packed["pixel_values"], main_packed["pixel_values"])
    assert torch.equal(padded["pixel_values"], main_padded["pixel_values"])
    assert packed["pixel_values"].shape[0] == 5 and padded["pixel_values"].shape[0] == 6
    real = torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]])
    assert torch.equal(packed["pixel_values"], real)
    assert packed["image_flags"].tolist() == [1] * 5 and padded["image_flags"].tolist() == [1, 1, 0, 1, 1, 1]


def test_collate_packed_text_only_keeps_one_dummy_and_counts_overflow():
    b = _sample([1, 8, 9], [8, 8, 9], 1, real=False)
    out = collate_packed([b, b], max_tokens=5)
    assert out["image_flags"].tolist() == [0] and out["pixel_values"].shape[0] == 1
    assert out["meta"]["over_budget"] == 1 and out["meta"]["num_tokens"] == 6
    a, c = _sample([1, 5, 6, 7], [-100, -100, 6, 7], 2), _sample([1, 4], [-100, 4], 1)
    assert collate_packed([a, c], max_tokens=6, max_tiles=3)["meta"]["over_budget"] == 0  # both budgets met
    assert collate_packed([a, c], max_tokens=6, max_tiles=2)["meta"]["over_budget"] == 1  # 3 real tiles
    assert collate_packed([a, b, c], max_tokens=9, max_tiles=3)["meta"]["over_budget"] == 0  # b's dummy: none
    with pytest.raises(ValueError, match="empty pack"):
        collate_packed([])


# ---------------------------------------------------------------- attention isolation

def test_segment_mask_is_causal_same_segment_and_not_padding():
    mask = attention_mask_4d(torch.tensor([[1, 1, 2, 2, 2, 0]]), 6, 6)[0, 0].int()
    expected = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [0, 0, 1, 0, 0, 0],
                [0, 0, 1, 1, 0, 0],
                [0, 0, 1, 1, 1, 0],
                [1, 1, 1, 1, 1, 1]]  # a padding query sees everything (unused output, no NaN)
    assert mask.tolist() == expected
    assert attention_mask_4d(torch.ones(2, 5, dtype=torch.long), 5, 5) is None
    # a row of one segment id 2 is not "nothing padded": it is masked like a 0/1 mask
    assert attention_mask_4d(torch.full((1, 3), 2), 3, 3) is not None


def test_varlen_runs_from_segments():
    v = Varlen.from_segments(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]]))
    assert v.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and v.cu_seqlens.dtype == torch.int32
    assert v.max_len == 4
    assert v.runs == [(0, 0, 2), (0, 2, 5), (0, 5, 6), (1, 0, 4), (1, 4, 6)]


# ---------------------------------------------------------------- packed == unpacked, on the official fixtures

@functools.lru_cache(maxsize=None)
def _fixture_samples(case):
    d = os.path.join(FIXTURES, case)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    model = load_pretrained(d, dtype=torch.float32)
    model.config.llm.original_max_position_embeddings = 4096  # the real 4B value: no su switch inside the test
    pv, ctx = fixture_pixels(case), model.config.img_context_token_id
    vocab = model.config.llm.vocab_size
    g = torch.Generator().manual_seed(0)

    def text(n):
        t = torch.randint(3, vocab - 20, (n,), generator=g)
        return t

    b_ids = torch.cat([torch.tensor([1]), text(149)])
    b_lab = torch.where(torch.arange(150) >= 50, b_ids, -100)
    b = dict(input_ids=b_ids, labels=b_lab, pixel_values=pv[:1] * 0 + 0.5, image_flags=torch.zeros(1, dtype=torch.long))
    img = ref["input_ids"][0][(ref["input_ids"][0] == ctx).nonzero()[0, 0] - 1]  # the <img> token before the span

    def image_sample(tiles, before, after, supervised):
        ids = torch.cat([torch.tensor([1]), text(before), img[None], torch.full((256 * tiles,), ctx), img[None] + 1,
                         text(after)])
        labels = torch.where(torch.arange(len(ids)) >= len(ids) - supervised, ids, -100)
        return dict(input_ids=ids, labels=labels, pixel_values=pv[:tiles] if tiles > 1 else pv[2:3],
                    image_flags=torch.ones(tiles, dtype=torch.long))

    return model, [image_sample(2, 20, 60, 40), b, image_sample(1, 10, 40, 30)]


def _call(model, batch, **kw):
    keys = ("input_ids", "pixel_values", "image_flags", "attention_mask", "position_ids")
    return model(**{k: batch[k] for k in keys}, **kw)


@pytest.mark.parametrize("case", ["internlm2", "phi3"])
def test_packed_logits_and_loss_equal_unpacked(case):
    model, samples = _fixture_samples(case)
    with torch.no_grad():
        packed = collate_packed(samples)
        logits = _call(model, packed).logits[0]
        start = 0
        for s in samples:
            n = len(s["input_ids"])
            alone = model(s["input_ids"][None], s["pixel_values"], s["image_flags"]).logits[0]
            diff = (logits[start:start + n] - alone).abs().max().item()
            assert diff < 2e-5, f"sub-sample at {start}: max abs logit diff {diff}"
            start += n
        out = _call(model, packed, labels=packed["labels"])
        padded = collate(samples)
        ref = _call(model, padded, labels=padded["labels"])
    # the official token mean over every supervised token of the micro-batch, packed or padded
    assert out.n_supervised == ref.n_supervised == sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


def test_packed_gradients_equal_padded_batch():
    model, samples = _fixture_samples("internlm2")
    grads = []
    for batch in (collate_packed(samples), collate(samples)):
        model.zero_grad()
        _call(model, batch, labels=batch["labels"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        diff = (grads[0][name] - grads[1][name]).abs().max().item()
        assert diff < 1e-5 * max(1.0, grads[1][name].abs().max().item()), f"{name}: grad diff {diff}"


@pytest.mark.parametrize("way", ["packed", "padded"])
def test_per_run_attention_equals_the_block_diagonal_mask(way):
    """The default path off CUDA (SDPA per run) against SDPA with the [B, 1, L, L] mask over whole rows."""
    model, samples = _fixture_samples("internlm2")
    batch = collate_packed(samples) if way == "packed" else collate(samples)
    with torch.no_grad():
        runs = _call(model, batch).logits
        model.llm.use_varlen = False
        try:
            dense = _call(model, batch).logits
        finally:
            model.llm.use_varlen = True
    real = batch["attention_mask"].bool()
    assert (runs - dense)[real].abs().max().item() < 1e-5


def _runs_attention(q, k, v, cu_q, cu_k, enable_gqa=False):
    """varlen_attn's semantics (flat [tokens, heads, hd], causal per run), by SDPA on each run."""
    assert torch.equal(cu_q, cu_k)
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (z[a:b].transpose(0, 1) for z in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


# Stand-ins with the exact signatures of torch.nn.attention.varlen.varlen_attn in each release (read from the
# wheels): 2.9 has no varlen module; 2.10 takes is_causal; 2.11 window_size; 2.12+ adds enable_gqa.
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, is_causal: bool = False,
                     return_aux=None):
    assert is_causal and key.shape[1] == query.shape[1]
    return _runs_attention(query, key, value, cu_seq_q, cu_seq_k)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, return_aux=None,
                     scale=None, window_size: tuple[int, int] = (-1, -1)):
    assert window_size == (-1, 0) and key.shape[1] == query.shape[1]
    return _runs_attention(query, key, value, cu_seq_q, cu_seq_k)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, return_aux=None,
                     scale=None, window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                     seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0)
    if not enable_gqa and query.shape[1] != key.shape[1]:  # as torch 2.12 refuses it
        raise ValueError("Expect query and key/value to have the same number of heads")
    return _runs_attention(query, key, value, cu_seq_q, cu_seq_k, enable_gqa=enable_gqa)


@pytest.mark.parametrize("kernel", [None, varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_12],
                         ids=["2.9", "2.10", "2.11", "2.12+"])
def test_varlen_call_binds_every_torch_signature(monkeypatch, kernel):
    """The CUDA varlen branch (its reshapes, run boundaries and the call itself) with each torch's signature,
    on CPU with reference kernels; the fixture uses GQA (4 query heads, 2 kv heads). Equal to masked SDPA."""
    model, samples = _fixture_samples("internlm2")
    attn = model.llm.layers[0].attn
    assert attn.num_kv_heads < attn.num_heads
    packed, padded = collate_packed(samples), collate(samples)
    calls = []
    with torch.no_grad():
        model.llm.use_varlen = False
        want = [_call(model, b, labels=b["labels"]).loss for b in (packed, padded)]
        model.llm.use_varlen = True
        monkeypatch.setattr(llm_module, "varlen_attn", kernel)
        if kernel is not None:  # as on CUDA in bf16
            monkeypatch.setattr(llm_module, "varlen_available", lambda x: calls.append(1) or True)
        got = [_call(model, b, labels=b["labels"]).loss for b in (packed, padded)]
    assert len(calls) == (0 if kernel is None else 2 * model.llm.cfg.num_layers)
    for w, g in zip(want, got):
        assert abs(w.item() - g.item()) < 1e-5
