"""Model configuration: plain dataclasses, the size presets, and config.json in the official layout.

Every architectural value of a loaded model comes from its config.json (`InternVLConfig.from_official`); the
presets exist to build the released architectures on the meta device (shapes, parameter counts, memory
estimates, GPU benchmarks with random weights) and a tiny model for tests and the demo.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Family:
    """What tells one decoder family apart. Its official parameter names are its row of model/weights.py's
    NAMES; everything else about it is here."""
    architecture: str  # llm_config.architectures[0] of the official config.json
    template: str  # conversation template when config.json names none (data/templates.py)
    tokenizer: str  # "sentencepiece" (tokenizer.model) or "bpe" (Qwen2's vocab.json + merges.txt)
    qkv_bias: bool  # biases on the q, k and v projections (Qwen2)
    fused_qkv: bool  # one q|k|v matrix (InternLM2 wqkv, Phi-3 qkv_proj), else q_proj, k_proj, v_proj
    fused_gate_up: bool  # one gate|up matrix (Phi-3 gate_up_proj), else two
    rope_scaling: tuple[str, ...] = ()  # the llm_config.rope_scaling types it accepts (none is always fine)
    # llm_config switches of the official class that must have these values (read: checked; written: set)
    switches: dict = field(default_factory=dict)


# The decoder families, keyed by their llm_config.model_type. An architecture not named here is refused.
FAMILIES: dict[str, Family] = {
    "internlm2": Family("InternLM2ForCausalLM", "internlm2-chat", "sentencepiece", qkv_bias=False,
                        fused_qkv=True, fused_gate_up=False, rope_scaling=("dynamic", "linear"),
                        switches={"bias": False}),
    "phi3": Family("Phi3ForCausalLM", "phi3-chat", "sentencepiece", qkv_bias=False, fused_qkv=True,
                   fused_gate_up=True, rope_scaling=("su", "longrope")),
    "qwen2": Family("Qwen2ForCausalLM", "internvl2_5", "bpe", qkv_bias=True, fused_qkv=False,
                    fused_gate_up=False, switches={"use_sliding_window": False}),
    "llama": Family("LlamaForCausalLM", "Hermes-2", "sentencepiece", qkv_bias=False, fused_qkv=False,
                    fused_gate_up=False, switches={"attention_bias": False, "mlp_bias": False}),
}
LLM_FAMILIES = {f.architecture: name for name, f in FAMILIES.items()}  # official class name -> family
TEMPLATES = {name: f.template for name, f in FAMILIES.items()}  # family -> its default template


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    norm_type: str = "layer_norm"  # "layer_norm" (InternViT-300M) or "rms_norm" (InternViT-6B)
    qk_normalization: bool = False
    qkv_bias: bool = True
    eps: float = 1e-6
    drop_path_rate: float = 0.0
    initializer_factor: float = 1.0  # initial value of the layer scales ls1 / ls2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class LLMConfig:
    family: str = "internlm2"  # a key of FAMILIES
    vocab_size: int = 92553
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 8
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    # None, {"type": "dynamic", "factor": f} (InternLM2) or {"type": "su", "short_factor": [...],
    # "long_factor": [...]} (Phi-3)
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    original_max_position_embeddings: int | None = None  # Phi-3 su: the short/long switch point
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 2
    # The base LLM's value (Qwen2-0.5B, Qwen2.5-0.5B / 3B: tied). The official InternVLChatConfig unties it on
    # load and the released files store both, so the model always has its own head; this is only recorded.
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def architecture(self) -> str:
        return self.spec.architecture


@dataclass
class InternVLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str | None = None  # None: the family's (TEMPLATES)
    ps_version: str = "v2"  # the official class default is v1: always read it from config.json
    downsample_ratio: float = 0.5
    select_layer: int = -1
    force_image_size: int = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    system_message: str | None = None
    img_context_token_id: int | None = None  # resolved from the tokenizer files when loading a directory
    # The config.json this came from, kept so that an export changes only what it must.
    official: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.template is None:
            self.template = TEMPLATES[self.llm.family]

    @property
    def num_image_token(self) -> int:
        return int((self.vision.grid * self.downsample_ratio) ** 2)

    @classmethod
    def from_official(cls, d: dict, source: str = "config.json") -> "InternVLConfig":
        """Read an official InternVLChatConfig dict (nested llm_config / vision_config)."""
        for key in ("llm_config", "vision_config"):
            if key not in d:
                raise ValueError(f"{source}: no '{key}' (not an InternVL chat config.json)")
        lc, vc = d["llm_config"], d["vision_config"]
        arch = (lc.get("architectures") or [None])[0]
        if arch not in LLM_FAMILIES:
            raise ValueError(
                f"{source}: unknown LLM architecture {arch!r} in llm_config.architectures; "
                f"supported: {sorted(LLM_FAMILIES)}")
        family = LLM_FAMILIES[arch]
        if d.get("ps_version", "v1") not in ("v1", "v2"):
            raise ValueError(f"{source}: ps_version must be 'v1' or 'v2', got {d['ps_version']!r}")
        vision = VisionConfig(
            hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"],
            num_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"],
            image_size=vc.get("image_size", 448), patch_size=vc.get("patch_size", 14),
            # absent norm_type means the class default, rms_norm (InternViT-6B)
            norm_type=vc.get("norm_type", "rms_norm"), qk_normalization=bool(vc.get("qk_normalization",
            False)),
            qkv_bias=bool(vc.get("qkv_bias", False)), eps=vc.get("layer_norm_eps", 1e-6),
            drop_path_rate=vc.get("drop_path_rate", 0.0),
            initializer_factor=vc.get("initializer_factor", 1.0))
        if vision.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"{source}: vision_config.norm_type must be layer_norm or rms_norm, "
                             f"got {vision.norm_type!r}")
        rope_scaling = lc.get("rope_scaling")
        if rope_scaling is not None:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            allowed = FAMILIES[family].rope_scaling
            if kind not in allowed:
                raise ValueError(f"{source}: llm_config.rope_scaling type {kind!r} is not supported for "
                                 f"{arch} (supported: {allowed or 'none'})")
        spec = FAMILIES[family]
        # Switches the official classes have and the released checkpoints leave off: refused, not ignored.
        for key, value in spec.switches.items():
            if key in lc and lc[key] != value:
                raise ValueError(f"{source}: llm_config.{key} = {lc[key]!r} is not supported for {arch} "
                                 f"(expected {value!r})")
        if lc.get("head_dim") not in (None, lc["hidden_size"] // lc["num_attention_heads"]):
            raise ValueError(f"{source}: llm_config.head_dim {lc['head_dim']} is not hidden_size / "
                             f"num_attention_heads; not supported")
        llm = LLMConfig(
            family=family, vocab_size=lc["vocab_size"], hidden_size=lc["hidden_size"],
            num_layers=lc["num_hidden_layers"], num_heads=lc["num_attention_heads"],
            num_kv_heads=lc.get("num_key_value_heads") or lc["num_attention_heads"],
            intermediate_size=lc["intermediate_size"], rms_norm_eps=lc.get("rms_norm_eps", 1e-5),
            rope_theta=float(lc.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
            max_position_embeddings=lc.get("max_position_embeddings", 32768),
            original_max_position_embeddings=lc.get("original_max_position_embeddings"),
            bos_token_id=lc.get("bos_token_id", 1), eos_token_id=lc.get("eos_token_id", 2),
            pad_token_id=lc.get("pad_token_id", 2 if spec.fused_qkv else None),  # the class defaults
            tie_word_embeddings=bool(lc.get("tie_word_embeddings", False)))
        if family == "phi3" and rope_scaling is not None and llm.original_max_position_embeddings is None:
            raise ValueError(f"{source}: Phi-3 su rope scaling needs "
                             f"llm_config.original_max_position_embeddings")
        return cls(
            vision=vision, llm=llm, template=d.get("template") or None,
            ps_version=d.get("ps_version", "v1"), downsample_ratio=d.get("downsample_ratio", 0.5),
            select_layer=d.get("select_layer", -1),
            force_image_size=d.get("force_image_size") or vision.image_size,
            dynamic_image_size=d.get("dynamic_image_size", True), use_thumbnail=d.get("use_thumbnail", True),
            min_dynamic_patch=d.get("min_dynamic_patch", 1), max_dynamic_patch=d.get("max_dynamic_patch", 12),
            system_message=d.get("system_message"), official=copy.deepcopy(d))

    def to_official(self) -> dict:
        """config.json dict: the source config with our values written over it (a fresh one for presets)."""
        d = copy.deepcopy(self.official) if self.official else {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",  # no auto_map: no code
            "llm_config": {}, "vision_config": {}, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False}
        v, l = self.vision, self.llm
        d["vision_config"].update({
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": 3, "norm_type": v.norm_type, "qk_normalization": v.qk_normalization,
            "qkv_bias": v.qkv_bias, "layer_norm_eps": v.eps, "drop_path_rate": v.drop_path_rate,
            "initializer_factor": v.initializer_factor, "hidden_act": "gelu", "use_flash_attn": True})
        d["llm_config"].update({
            "architectures": [l.architecture], "model_type": l.family, "vocab_size": l.vocab_size,
            "hidden_size": l.hidden_size, "num_hidden_layers": l.num_layers,
            "num_attention_heads": l.num_heads,
            "num_key_value_heads": l.num_kv_heads, "intermediate_size": l.intermediate_size,
            "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta, "rope_scaling": l.rope_scaling,
            "max_position_embeddings": l.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": l.bos_token_id, "eos_token_id": l.eos_token_id, "pad_token_id": l.pad_token_id,
            "tie_word_embeddings": l.tie_word_embeddings})
        d["llm_config"].update(l.spec.switches)
        if l.original_max_position_embeddings is not None:
            d["llm_config"]["original_max_position_embeddings"] = l.original_max_position_embeddings
        d.update({
            "template": self.template, "ps_version": self.ps_version,
            "downsample_ratio": self.downsample_ratio,
            "select_layer": self.select_layer, "force_image_size": self.force_image_size,
            "dynamic_image_size": self.dynamic_image_size, "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch, "max_dynamic_patch": self.max_dynamic_patch,
            "hidden_size": l.hidden_size})
        if self.system_message is not None:
            d["system_message"] = self.system_message
        return d


# --- size presets: the released architectures, and tiny ones for tests and the demo ---

_VIT_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                         norm_type="layer_norm", qk_normalization=False, qkv_bias=True,
                         initializer_factor=1.0)
_VIT_6B = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                       norm_type="rms_norm", qk_normalization=True, qkv_bias=False, initializer_factor=0.1)

# April-2024 Phi-3-mini-128k LongRoPE factors. A loaded checkpoint always uses its own config values.
_PHI3_LONG = [1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547,
              1.2299998998641968, 1.2299998998641968, 1.2999999523162842, 1.4499999284744263,
              1.5999999046325684, 1.6499998569488525, 1.8999998569488525, 2.859999895095825, 3.68999981880188,
              5.419999599456787, 5.489999771118164, 5.489999771118164, 9.09000015258789, 11.579999923706055,
              15.65999984741211, 15.769999504089355, 15.789999961853027, 18.360000610351562,
              21.989999771118164, 23.079999923706055, 30.009998321533203, 32.35000228881836,
              32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156, 56.20000457763672,
              57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844, 61.190006256103516,
              61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086, 63.48000717163086,
              63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625, 64.80001068115234,
              64.81001281738281, 64.81001281738281]
_PHI3_SHORT = ([1.05] * 3 + [1.1] * 2 + [1.15, 1.2, 1.25, 1.3, 1.35, 1.5] + [2.0] * 21 + [2.05] * 3
               + [2.1] * 3 + [2.15] * 2 + [2.35, 2.55] + [2.6] * 2 + [2.75] + [2.85] * 2 + [2.95])

PRESETS: dict[str, InternVLConfig] = {
    "2b": InternVLConfig(
        vision=_VIT_300M, img_context_token_id=92546,
        llm=LLMConfig(family="internlm2", vocab_size=92553, hidden_size=2048, num_layers=24, num_heads=16,
                      num_kv_heads=8, intermediate_size=8192, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32768)),
    "4b": InternVLConfig(
        vision=_VIT_300M, img_context_token_id=32013,
        llm=LLMConfig(family="phi3", vocab_size=32020, hidden_size=3072, num_layers=32, num_heads=32,
                      num_kv_heads=32, intermediate_size=8192, rope_theta=1e4,
                      rope_scaling={"type": "su", "short_factor": _PHI3_SHORT, "long_factor": _PHI3_LONG},
                      max_position_embeddings=131072, original_max_position_embeddings=4096,
                      eos_token_id=32000, pad_token_id=32000)),
    "26b": InternVLConfig(
        vision=_VIT_6B, img_context_token_id=92546,
        llm=LLMConfig(family="internlm2", vocab_size=92553, hidden_size=6144, num_layers=48, num_heads=48,
                      num_kv_heads=8, intermediate_size=16384, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=32768)),
    # Same shapes as the test fixtures: fast on a CPU, every code path of the 26B (rms_norm + q/k norm, GQA).
    "tiny": InternVLConfig(
        vision=replace(_VIT_6B, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        llm=LLMConfig(family="internlm2", vocab_size=521, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=128, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 2.0}),
        max_dynamic_patch=6),
    # The demo base (demo.py): the 2B's family (InternViT-300M style ViT, InternLM2), tiny; its vocab_size is
    # set to the size of the tokenizer it is trained with. 224 px tiles (64 image tokens, not 256): its
    # forward and backward cost a quarter of a 448 one's on a CPU, and it still learns the shapes.
    "demo": InternVLConfig(
        vision=replace(_VIT_300M, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                       image_size=224),
        force_image_size=224,
        llm=LLMConfig(family="internlm2", vocab_size=0, hidden_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=256, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 2.0})),
}



# --- the released checkpoints ---
# ViT: InternViT-300M-448px (V2_5 in 2.5: same shape) or InternViT-6B-448px-V1-5 / V2_5 (45 layers kept). LLM:
# the base model's config.json values; vocab = the base tokenizer's length + the InternVL tokens (the official
# fine-tune code resizes to len(tokenizer)), <IMG_CONTEXT> the 3rd of them. Checked against the released
# added_tokens.json and file sizes; sources and what stayed unverified: README.md's checkpoint table.


def _release(vit, template, family, vocab, hidden, layers, heads, kv, inter, theta=1e6, scaling=None,
             max_pos=32768, ctx=None, **llm) -> InternVLConfig:
    return InternVLConfig(vision=vit, template=template, img_context_token_id=ctx, llm=LLMConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, intermediate_size=inter, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos, **llm))


_NTK2 = {"type": "dynamic", "factor": 2.0}
# Qwen2 / Qwen2.5 (tokenizers of 151646 / 151665 ids)
_QWEN2 = dict(family="qwen2", rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
RELEASES: dict[str, InternVLConfig] = {
    "Mini-InternVL-Chat-2B-V1-5": PRESETS["2b"],
    "Mini-InternVL-Chat-4B-V1-5": PRESETS["4b"],
    "InternVL-Chat-V1-5": PRESETS["26b"],
    # InternVL 2
    "InternVL2-1B": _release(_VIT_300M, "Hermes-2", vocab=151655, hidden=896, layers=24, heads=14, kv=2,
                             inter=4864, ctx=151648, tie_word_embeddings=True, **_QWEN2),  # Qwen2-0.5B
    "InternVL2-2B": replace(PRESETS["2b"], template="internlm2-chat"),  # internlm2-chat-1_8b
    "InternVL2-4B": replace(PRESETS["4b"], template="phi3-chat"),  # Phi-3-mini-128k-instruct
    "InternVL2-8B": _release(_VIT_300M, "internlm2-chat", "internlm2", vocab=92553, hidden=4096, layers=32,
                             heads=32, kv=8, inter=14336, scaling=_NTK2, ctx=92546),  # internlm2_5-7b-chat
    "InternVL2-26B": replace(PRESETS["26b"], template="internlm2-chat"),  # internlm2-chat-20b
    # Nous-Hermes-2-Yi-34B; added_tokens.json: 7 tokens at 64000..64006 (<img>, </img> are Yi pieces)
    "InternVL2-40B": _release(_VIT_6B, "Hermes-2", "llama", vocab=64007, hidden=7168, layers=60, heads=56,
                              kv=8, inter=20480, theta=5e6, max_pos=4096, ctx=64000, pad_token_id=0,
                              eos_token_id=7),
    # InternVL 2.5
    "InternVL2_5-1B": _release(_VIT_300M, "internvl2_5", vocab=151674, hidden=896, layers=24, heads=14, kv=2,
                               inter=4864, ctx=151667, tie_word_embeddings=True, **_QWEN2),  # Qwen2.5-0.5B
    "InternVL2_5-2B": replace(PRESETS["2b"], template="internvl2_5"),  # internlm2_5-1_8b-chat
    "InternVL2_5-4B": _release(_VIT_300M, "internvl2_5", vocab=151674, hidden=2048, layers=36, heads=16, kv=2,
                               inter=11008, ctx=151667, tie_word_embeddings=True, **_QWEN2),  # Qwen2.5-3B
    "InternVL2_5-8B": _release(_VIT_300M, "internvl2_5", "internlm2", vocab=92553, hidden=4096, layers=32,
                               heads=32, kv=8, inter=14336, scaling=_NTK2, ctx=92546),  # internlm2_5-7b-chat
    "InternVL2_5-26B": _release(_VIT_6B, "internvl2_5", "internlm2", vocab=92553, hidden=6144, layers=48,
                                heads=48, kv=8, inter=16384, theta=5e7, ctx=92546,
                                scaling={"type": "dynamic", "factor": 2.5}),  # internlm2_5-20b-chat
    "InternVL2_5-38B": _release(_VIT_6B, "internvl2_5", vocab=151674, hidden=5120, layers=64, heads=40, kv=8,
                                inter=27648, ctx=151667, **_QWEN2),  # Qwen2.5-32B-Instruct
    "InternVL2_5-78B": _release(_VIT_6B, "internvl2_5", vocab=151674, hidden=8192, layers=80, heads=64, kv=8,
                                inter=29568, ctx=151667, **_QWEN2),  # Qwen2.5-72B-Instruct
}
VERSIONS = {name: "1.5" if "V1-5" in name else "2.5" if name.startswith("InternVL2_5") else "2"
            for name in RELEASES}
SIZE_ALIASES = {"2b": "Mini-InternVL-Chat-2B-V1-5", "4b": "Mini-InternVL-Chat-4B-V1-5",
                "26b": "InternVL-Chat-V1-5"}  # the 1.5-era --size names
REFUSED = {"InternVL2-Llama3-76B": "its Llama-3 tokenizer (tokenizer.json) is not supported"}


def preset(name: str, **overrides) -> InternVLConfig:
    """A fresh copy of a named preset or released checkpoint, with top-level fields optionally replaced."""
    name = SIZE_ALIASES.get(name, name)
    if name in REFUSED:
        raise ValueError(f"{name} is not supported: {REFUSED[name]}")
    if name not in PRESETS and name not in RELEASES:
        raise ValueError(f"unknown size preset {name!r}; choose from {sorted(PRESETS) + sorted(RELEASES)}")
    return replace(copy.deepcopy(PRESETS.get(name) or RELEASES[name]), **overrides)


def _shape(c: InternVLConfig) -> tuple:
    v, l = c.vision, c.llm
    return (l.family, v.norm_type, v.hidden_size, v.num_layers, l.hidden_size, l.num_layers, l.num_heads,
            l.num_kv_heads, l.intermediate_size)


def identify_release(config: InternVLConfig, hint: str = "") -> tuple[str, bool]:
    """(the released checkpoint this config is, exact): the one of the same architecture (LLM class, ViT
    variant, hidden sizes, layers) and template. Releases that share all of these (InternVL2-2B and
    Mini-InternVL-Chat-2B-V1-5) are told apart by `hint` (the directory name), else the first is taken. No
    exact match (a tiny test model, a custom LLM): the first release of the same LLM class, ViT variant and
    template, exact False."""
    same = [n for n, r in RELEASES.items() if _shape(r) == _shape(config) and r.template == config.template]
    exact = bool(same)
    if not same:
        same = [n for n, r in RELEASES.items() if _shape(r)[:2] == _shape(config)[:2]
                and r.template == config.template]
    if not same:
        raise ValueError(f"no released InternVL checkpoint has an {config.llm.architecture} LLM with an "
                         f"InternViT ({config.vision.norm_type}) and template {config.template!r}; known: "
                         f"{sorted(RELEASES)}")
    hinted = [n for n in same if n.lower() in hint.lower()]
    return (hinted or same)[0], exact
