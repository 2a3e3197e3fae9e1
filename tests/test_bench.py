"""bench/: tiny-size smoke runs whose JSON holds real numbers, the peak-memory counter, the FLOP formula."""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import collate, gpu, images, loss, step
from bench.common import PeakMemory, time_median
from model import build_model, preset

torch.set_num_threads(2)

TINY_STEP = ["--vit-layers", "1", "--vit-width", "64", "--llm-layers", "1", "--llm-width", "64", "--vocab", "600",
             "--image-size", "112", "--tokens", "160", "--tiles", "2", "--repeats", "1", "--warmup", "1"]


def real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_peak_memory_counts_live_tensor_bytes():
    w = torch.ones(1 << 18)  # allocated before the block: its views and in-place results are not new memory
    with PeakMemory("cpu") as m:
        w.t().mul_(2)
        w.view(-1)[:10].add_(1)
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.zeros(1 << 20, dtype=torch.uint8)
        d = c.view(-1)[: 1 << 10]  # a view adds nothing
    assert m.peak_bytes == 3 << 20
    assert b.numel() + c.numel() + d.numel() > 0
    t = time_median(lambda: None, repeats=3, warmup=1)
    assert len(t["runs_s"]) == 3 and t["min_s"] <= t["median_s"] <= t["max_s"]


def test_loss_bench_json(tmp_path):
    out = tmp_path / "loss.json"
    loss.main(["--tokens", "256", "--vocab", "3000", "--hidden", "32", "--chunk", "32", "--repeats", "1",
               "--warmup", "0", "--json", str(out)])
    r = json.loads(out.read_text())["results"][0]
    for name in ("plain", "chunked"):
        for key in ("loss", "forward_s", "forward_backward_s", "peak_forward_gib", "peak_forward_backward_gib"):
            assert real(r[name][key]) and r[name][key] > 0, (name, key)
    assert r["loss_abs_diff"] < 1e-4
    # 32-row chunks of a 3000-word vocabulary hold far less than 256 rows of logits and their gradients
    assert r["ratio_chunked_over_plain"]["peak_forward_backward_gib"] < 0.5


def test_images_bench_json(tmp_path):
    out = tmp_path / "images.json"
    images.main(["--sizes", "300x200", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())["results"][0]
    assert r["size"] == "300x200" and r["tiles"] == 7 and r["pixels_equal"]  # grid (3, 2) + thumbnail
    for name in ("official", "ours"):
        for key in ("decode", "resize", "tensor", "total"):
            assert real(r[name][key]) and r[name][key] > 0, (name, key)
    assert real(r["speedup"]) and real(r["speedup_paired"])
    assert real(r["ceiling"]) and r["ceiling"] >= r["speedup"]  # Pillow's share alone is at most our total
    assert json.loads(out.read_text())["clock"] == "cpu"  # per-core CPU time unless --clock wall


def test_collate_bench_json(tmp_path):
    out = tmp_path / "collate.json"
    collate.main(["--samples", "3", "--text-only", "1", "--tiles", "2", "--packs", "2", "--warmup", "1",
                  "--rounds", "1", "--workers", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["pack_mib"] == round(2 * 2 * 3 * 448 * 448 * 4 / 2**20, 1)
    for name in ("mask", "cat", "ours"):
        assert real(r["cpu_ms_per_pack"][name]) and r["cpu_ms_per_pack"][name] > 0, name
        assert real(r["wall_ms_per_pack"][name]) and r["wall_ms_per_pack"][name] > 0, name
    assert r["cpu_ratio_to_ours"]["ours"] == 1.0


def test_step_bench_json(tmp_path):
    out = tmp_path / "step.json"
    step.main(TINY_STEP + ["--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["full", "lora"]
    for r in rows:
        for key in ("forward_s", "backward_s", "optimizer_s", "step_s", "tokens_per_s", "images_per_s", "peak_gib"):
            assert real(r[key]) and r[key] > 0, (r["mode"], key)
        assert r["tokens_per_step"] == 160
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]


def test_step_packing_bench_json(tmp_path):
    out = tmp_path / "packing.json"
    step.main(TINY_STEP + ["--packing", "--samples", "6", "--mode", "lora", "--json", str(out)])
    res = json.loads(out.read_text())
    pad = res["padding_at_4096"]
    assert 0 < pad["length_grouped_batches"]["padding_fraction"] < pad["random_batches"]["padding_fraction"] < 1
    assert pad["packed"]["micro_batches"] < pad["length_grouped_batches"]["micro_batches"]
    assert 0.9 < pad["packed"]["budget_fill"] <= 1
    p = res["packing"]
    assert p["packed"]["padding_fraction"] == 0 and 0 <= p["padded"]["padding_fraction"] < 1
    for way in ("padded", "packed"):
        assert real(p[way]["epoch_s"]) and real(p[way]["real_tokens_per_s"]) and p[way]["real_tokens_per_s"] > 0
    assert real(p["tokens_per_s_gain"])


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--sizes", "tiny", "--modes", "full", "lora", "qlora", "--device", "cpu", "--tokens", "600",
              "--tiles", "2", "--repeats", "1", "--warmup", "0", "--packing", "tiny:lora", "--packing-samples", "5",
              "--json", str(out)])
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["results"]] == ["full", "lora", "qlora"]
    for r in res["results"]:
        assert "error" not in r and "skipped" not in r, r
        for key in ("step_s", "tokens_per_s", "images_per_s", "model_tflops_per_step", "achieved_tflops", "loss"):
            assert real(r[key]), (r["mode"], key)
        parts = r["flops_by_part"]
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    full, lora = res["results"][0]["flops_by_part"], res["results"][1]["flops_by_part"]
    p = res["packing"]
    assert p["packed"]["padding_fraction"] == 0 < p["padded"]["padding_fraction"] < 1
    assert real(p["tokens_per_s_gain"]) and p["packed"]["real_tokens_per_s"] > 0
    # frozen ViT: forward only in both; the head trains only in full (x3 vs x2)
    assert full["vit"] == lora["vit"] and 2 * full["head"] == 3 * lora["head"] > 0


def test_gpu_bench_does_not_hide_a_failure(monkeypatch, tmp_path):
    """A configuration or the packing comparison that raises stops the bench (only out-of-memory is a row)."""
    def broken(*a, **k):
        raise TypeError("varlen_attn() got an unexpected keyword argument 'enable_gqa'")
    argv = ["--sizes", "tiny", "--modes", "lora", "--device", "cpu", "--json", str(tmp_path / "g.json")]
    monkeypatch.setattr(gpu, "run_config", broken)
    with pytest.raises(TypeError, match="enable_gqa"):
        gpu.main(argv + ["--packing", ""])
    monkeypatch.setattr(gpu, "run_config", lambda args, size, mode, *a: {"size": size, "mode": mode})
    monkeypatch.setattr(gpu, "packing_ab", broken)
    with pytest.raises(TypeError, match="enable_gqa"):
        gpu.main(argv + ["--packing", "tiny:lora"])


def test_gpu_bench_skips_what_cannot_fit_with_a_reason():
    row = gpu.run_config(gpu.parse_args([]), "26b", "full", torch.device("cpu"), torch.bfloat16, total_gib=139.0)
    assert "skipped" in row and "ZeRO-3" in row["skipped"] and "GiB" in row["skipped"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_flop_formula_matches_torch_flop_counter(mode):
    """ViT + projector forward and the LLM's linear layers, counted by torch on the tiny model. torch does not count
    the CPU SDPA kernel, so the attention term (4 n^2 C per ViT layer) is taken out of ours."""
    cfg = preset("tiny")
    model = build_model(cfg, "cpu")
    tiles, n = 1, cfg.vision.grid ** 2 + 1
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.extract_feature(torch.randn(tiles, 3, 448, 448))
    counted = fc.get_total_flops()
    mine = gpu.step_flops(cfg, mode, tokens=10, tiles=tiles, supervised_tokens=0, lora_r=4)
    attention = tiles * cfg.vision.num_layers * 4 * n * n * cfg.vision.hidden_size
    assert counted == mine["vit"] - attention + mine["projector"] // 3
    # LLM linears: forward of L tokens through every layer
    L = 50
    h = torch.randn(1, L, cfg.llm.hidden_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        for layer in model.llm.layers:
            layer.mlp(h)
            layer.attn.qkv(h)
            layer.attn.out(h)
    linear = 2 * L * sum(a * b for a, b in gpu.llm_linear_shapes(cfg.llm)) * cfg.llm.num_layers
    assert fc.get_total_flops() == linear


def test_data_bench_scale_mode_json(tmp_path):
    from bench import data as data_bench
    out = tmp_path / "data.json"
    data_bench.main(["--records", "300", "--workers", "1", "--worker-samples", "20", "--error-samples", "10",
                     "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["records"] == 300 and r["file_mb"] > 0
    for key in ("build_cold_s", "build_warm_s", "main_rss_mb", "dataset_mb", "dataset_over_file"):
        assert real(r[key]) and r[key] >= 0, key
    assert r["build_warm_s"] < r["build_cold_s"] and r["dataset_over_file"] < 1.5
    e = r["length_error"]
    assert e["samples"] == 10 and e["samples_tiles_from_header"] >= 5 and e["max_fraction"] == 0  # exact
    [w] = r["workers"]
    assert w["samples"] == 20 and real(w["rss_growth_mb"]) and real(w["private_growth_mb"])


def test_data_bench_bad_lines_are_all_in_one_error(tmp_path):
    """--bad-lines K breaks K records four ways; the cold build must name each of their lines, in one error,
    and --skip-bad-samples must count exactly K."""
    from bench import data as data_bench
    out = tmp_path / "bad.json"
    data_bench.main(["--records", "400", "--bad-lines", "9", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["bad_lines"] == r["lines_reported"] == r["skipped"] == 9 and r["every_bad_line_reported"]
    assert r["valid"] == 391 and r["error_first_line"].startswith("9 bad sample(s)")
    assert real(r["error_s"]) and real(r["skip_build_s"])


def test_data_bench_json_layouts(tmp_path):
    from bench import data as data_bench
    out = tmp_path / "layouts.json"
    data_bench.main(["--json-layouts", "500", "--runs", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["records"] == 500 and real(r["one_line_over_indented"])
    assert all(real(r[k]["us_per_record"]) and r[k]["file_mb"] >= 0 for k in ("one_line", "indented"))


def test_data_bench_throughput_mode_runs(tmp_path):
    from bench import data as data_bench
    out = tmp_path / "tp.json"
    data_bench.main(["--samples", "10", "--images", "2", "--runs", "1", "--workers", "0", "--max-num", "2",
                     "--json", str(out)])
    [row] = json.loads(out.read_text())
    # 8 image samples make 2 batches of 4; the 2 text-only ones fill no batch and are left out
    assert row["samples"] == 8 and real(row["samples_per_s"]) and row["samples_per_s"] > 0


def test_realsize_zero3_load_reports_every_rank(tmp_path):
    """bench/realsize.py's ZeRO-3 dry run, at the demo size: one peak RSS per rank, each a real process's."""
    from bench import realsize
    from demo import make_demo
    base, _, _ = make_demo(str(tmp_path / "demo"), n_images=8, text_only=0)
    data = realsize.write_data(str(tmp_path / "data"), n=8)
    r = realsize.measure_zero3_load(base, data, str(tmp_path / "zero3"), procs=2)
    assert len(r["rank_peak_rss_gib"]) == 2
    # each rank is a Python with torch and DeepSpeed loaded (> 0.2 GiB), and none exceeds the whole tree's peak
    assert all(0.2 < x <= r["peak_rss_gib"] for x in r["rank_peak_rss_gib"]), r


def test_demo_threads_bench_json(tmp_path):
    from bench import demo_threads
    r = demo_threads.main(["--steps", "2", "--threads", "1", "--busy", "0", "--repeats", "1", "--json",
                           str(tmp_path / "t.json")])
    assert [(x["busy"], x["threads"]) for x in r["runs"]] == [(0, 1)] and r["runs"][0]["median_s"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["steps"] == 2


def test_tokenizer_bench_json(tmp_path):
    from bench import tokenizer as tokenizer_bench
    out = tmp_path / "tok.json"
    tokenizer_bench.main(["--records", "5", "--runs", "1", "--index", "4", "--json", str(out)])
    r = json.loads(out.read_text())["tokenizers"]
    assert set(r) == {"internlm2", "phi3", "llama", "qwen2"} and r["internlm2"]["encode_vs_internlm2"] == 1.0
    assert r["internlm2"]["index_vs_internlm2"] == 1.0
    for row in r.values():
        assert row["tokens"] > 0 and all(real(row[k]) and row[k] > 0 for k in (
            "encode_tokens_per_s", "count_tokens_per_s", "encode_vs_internlm2", "count_vs_internlm2",
            "index_cpu_s", "index_vs_internlm2"))


def test_realsize_grows_the_qwen2_tokenizer_without_a_gap(tmp_path):
    """bench/realsize.py's InternVL2.5-1B tokenizer: the fixture's BPE grown by byte pairs, then byte triples, up to
    the added tokens, so every id below <IMG_CONTEXT> + 7 decodes (convert's self-check decodes a random model's
    answers); data/bpe.py accepts the files as ranked BPE (it refuses merges tiktoken would not reproduce)."""
    from bench.realsize import write_tokenizer
    from data import load_tokenizer
    write_tokenizer(str(tmp_path), "qwen2", 861 + 66_000)  # past the 65,536 - 600 free byte pairs: triples too
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert sorted(vocab.values()) == list(range(856 + 66_000)) and min(added.values()) == 856 + 66_000
    assert added["<IMG_CONTEXT>"] == 861 + 66_000
    tok = load_tokenizer(str(tmp_path))
    assert all(len(k) == 3 for k in list(vocab)[-100:])  # the last fillers are byte triples
    ids = torch.randint(0, 856 + 66_009, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    assert isinstance(tok.decode(ids), str)
    assert tok.encode("<|im_start|>user\nHi<|im_end|><IMG_CONTEXT>")[-1] == added["<IMG_CONTEXT>"]


def test_realsize_child_reports_its_own_peak_rss():
    """bench/realsize.py's child process reports its own peak RSS, not the one it inherits at exec (getrusage's
    ru_maxrss kept the parent's: 1.72 GiB for a process that only imports convert.py, after a 2B write)."""
    from bench import realsize
    held = bytearray(512 * 2**20)  # the parent holds 0.5 GiB, touched
    held[::4096] = b"\x01" * len(held[::4096])
    r = realsize.child("RESULT = {}")
    assert 0 < r["peak_rss_gib"] < 0.25, r
    del held
