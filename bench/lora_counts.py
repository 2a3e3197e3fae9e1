"""LoRA adapter sizes and QLoRA weight memory of the released architectures, computed on the meta device.

    python bench/lora_counts.py [--r 128] [--alpha 256] [--sizes 2b 4b 26b]

For each size: adapter parameters of the default LLM targets and of the ViT targets, counted on the injected model
and by the closed form r * sum(in + out); the per-part trainable report of a LoRA run; and the LLM weight memory in
bf16 versus QLoRA (NF4 double-quantised linears + bf16 embeddings, head and norms). Nothing is allocated.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora  # noqa: E402
from model import build_model, preset  # noqa: E402


def adapter_count_closed_form(config, r: int, llm: bool = True, vit: bool = False) -> int:
    """Adapter parameters of the default targets, from the architecture's dimensions: r * (in + out) per linear.

    InternLM2 per layer: wqkv (D, (H + 2 KV) hd), wo (H hd, D), w1 and w3 (D, I), w2 (I, D).
    Phi-3 per layer: qkv_proj, o_proj as above, gate_up_proj (D, 2 I), down_proj (I, D).
    Qwen2 / Llama per layer: q_proj (D, H hd), k_proj and v_proj (D, KV hd), o_proj, gate/up/down as InternLM2.
    ViT per layer: qkv (C, 3C), proj (C, C), fc1 (C, Iv), fc2 (Iv, C).
    """
    total = 0
    if llm:
        c = config.llm
        d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
        q, kv = c.num_heads * hd, c.num_kv_heads * hd
        qkv = (d + q + 2 * kv) if c.spec.fused_qkv else (d + q) + 2 * (d + kv)
        attn = qkv + (q + d)
        mlp = (d + 2 * i) + (i + d) if c.spec.fused_gate_up else 2 * (d + i) + (i + d)
        total += r * c.num_layers * (attn + mlp)
    if vit:
        v = config.vision
        total += r * v.num_layers * ((v.hidden_size + 3 * v.hidden_size) + 2 * v.hidden_size
                                     + 2 * (v.hidden_size + v.intermediate_size))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=128, help="LoRA rank (XTuner's 128 by default)")
    ap.add_argument("--alpha", type=float, default=256.0)
    ap.add_argument("--sizes", nargs="+", default=["2b", "4b", "26b"])
    args = ap.parse_args()
    gib = 2 ** 30
    for size in args.sizes:
        config = preset(size)
        model = build_model(config, "meta")
        lora.inject_lora(model, lora.LoRAConfig(r=args.r, alpha=args.alpha, vit=True))
        report = lora.mark_trainable(model, "lora")
        counted = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(part) and "lora_" in n)
                   for part in ("llm.", "vit.")}
        closed_llm = adapter_count_closed_form(config, args.r)
        closed_vit = adapter_count_closed_form(config, args.r, llm=False, vit=True)
        assert counted["llm."] == closed_llm and counted["vit."] == closed_vit, (counted, closed_llm, closed_vit)
        print(f"== {size} ({config.llm.family}), r={args.r}")
        print(f"LLM adapters {counted['llm.']:,} = closed form {closed_llm:,} "
              f"({closed_llm * 2 / 2**20:,.0f} MiB bf16); ViT adapters {counted['vit.']:,} = closed form "
              f"{closed_vit:,}")
        print(lora.format_report(report, "lora, LLM + ViT adapters"))

        q = build_model(config, "meta")
        bf16 = sum(p.numel() * 2 for p in q.llm.parameters())
        lora.prepare_qlora(q)
        nf4 = sum(lora.nf4_nbytes(m.out_features, m.in_features) for m in q.llm.modules()
                  if isinstance(m, lora.NF4Linear))
        rest = sum(p.numel() * 2 for p in q.llm.parameters() if p.is_floating_point())
        print(f"LLM weights: bf16 {bf16 / gib:.2f} GiB -> QLoRA {(nf4 + rest) / gib:.2f} GiB "
              f"(NF4 linears {nf4 / gib:.2f} GiB + bf16 embeddings/head/norms {rest / gib:.2f} GiB)\n")


if __name__ == "__main__":
    main()
