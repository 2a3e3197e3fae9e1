"""LoRA and QLoRA for InternVL, from scratch.

    y = base(x) + s * B(A(dropout(x))),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is Kaiming-uniform and B is zero, so an injected model computes exactly what its base did. Adapters go on
the fused linears (internal `attn.qkv` is the official `wqkv` / `qkv_proj`), so a LoRA here is the official
LoRA. Targets are named in official module names; model/weights.py translates them.

QLoRA: every LLM linear except the output head becomes a bitsandbytes NF4 matrix (double quantisation),
quantised while loading one tensor at a time (`prepare_qlora` is the loader's `prepare` hook). The ViT, the
projector, the embeddings and the head stay unquantised. Merges never touch NF4 weights: `merge_checkpoint`
merges onto the base checkpoint's own tensors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model import build_model, load_config
from model.weights import iter_checkpoint, mismatch_message, to_official_name

MODES = ("full", "lora", "qlora")
NF4_BLOCK = 64  # bitsandbytes NF4 block size (absmax per 64 weights)
NF4_NESTED_BLOCK = 256  # double quantisation: the absmax values, 8-bit per block of 256


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


@dataclass
class LoRAConfig:
    """The official recipe's defaults: r 16, alpha 2r, dropout 0.05, every LLM linear but the head."""
    r: int = 16
    alpha: float | None = None  # None = 2r, resolved here so meta.json records it
    dropout: float = 0.05
    targets: list[str] | None = None  # official names, e.g. ["wqkv", "attention.wo"]; None = the LLM default
    vit: bool = False  # also every ViT linear, targets or not (as official use_backbone_lora)
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and len(self.targets) == 0:
            raise ValueError("LoRA targets is an empty list; give official module names or leave it unset "
                             "for every LLM linear except the output head")

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def to_dict(self) -> dict:  # for meta.json
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


class LoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        # in_features/out_features, not weight.shape: under ZeRO-3 the base weight is a 0-element partition.
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scale = r, lora_scale(r, alpha, rslora)
        device = base.weight.device
        if dtype is None:
            dtype = base.weight.dtype if base.weight.is_floating_point() else base.compute_dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scale * update).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
    """W + s * B @ A, computed in float32 and cast to W's dtype: the one merge formula."""
    delta = scale * (lora_B.detach().float() @ lora_A.detach().float())
    return (weight.detach().float() + delta).to(weight.dtype)


# --- QLoRA: a frozen NF4 linear ---

def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise RuntimeError("QLoRA needs bitsandbytes (pip install bitsandbytes>=0.43)") from e
    return bitsandbytes


class NF4Linear(nn.Module):
    """A frozen linear whose weight is bitsandbytes NF4 with double quantisation; computes in `compute_dtype`.

    `weight` is the packed uint8 tensor, a frozen Parameter so that DeepSpeed's exclude_frozen_parameters
    leaves it out of checkpoints; the quantisation state is a plain attribute, never saved: a QLoRA model is
    always rebuilt from the bf16 base checkpoint. The loader hands each tensor to `assign_weight`, which
    quantises it on `device` and drops the bf16 copy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant_device = torch.device(device) if device is not None else None
        packed = (in_features * out_features + 1) // 2
        self.weight = nn.Parameter(torch.empty(packed, 1, dtype=torch.uint8, device="meta"),
                                   requires_grad=False)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"),
                                     requires_grad=False)
        self.quant_state = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                device=linear.weight.device)
        for name, p in linear.named_parameters():
            q.assign_weight(name, p.detach())
        return q

    def assign_weight(self, name: str, tensor: torch.Tensor) -> None:
        device = self.quant_device or tensor.device
        if name == "weight":
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"NF4Linear weight: expected shape {(self.out_features, self.in_features)}, "
                                 f"got {tuple(tensor.shape)}")
            w = tensor.to(device=device, dtype=self.compute_dtype)
            packed, self.quant_state = _bnb().functional.quantize_4bit(
                w, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
            self.weight = nn.Parameter(packed, requires_grad=False)
        elif name == "bias" and self.bias is not None:
            self.bias = nn.Parameter(tensor.to(device=device, dtype=self.compute_dtype), requires_grad=False)
        else:
            raise KeyError(f"NF4Linear has no parameter {name!r}")

    def dequantize(self) -> torch.Tensor:
        """The weight as the forward sees it, [out, in] in compute_dtype."""
        self._check_loaded()
        return _bnb().functional.dequantize_4bit(self.weight, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        y = _bnb().matmul_4bit(x.to(self.compute_dtype), self.weight.t(), quant_state=self.quant_state,
                               bias=self.bias)
        return y.to(x.dtype)

    def _check_loaded(self):
        if self.quant_state is None:
            raise RuntimeError("NF4Linear was never given its weight "
                               "(assign_weight was not called while loading)")

    def _apply(self, fn, recurse=True):
        # .to(device) moves the packed weight; the quantisation state is no tensor attribute: move it along.
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.weight.device != self.quant_state.absmax.device:
            self.quant_state.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4 double-quant, compute_dtype={self.compute_dtype}")


def nf4_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of one NF4 double-quantised matrix: packed 4-bit weights, 8-bit absmax per 64, and per 256 of
    those one float32 absmax, plus the two code books (16 and 256 float32) and the float32 offset."""
    n = out_features * in_features
    blocks = math.ceil(n / NF4_BLOCK)
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * (16 + 256) + 4


# --- which modules: official names -> internal linear modules ---

def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _linear_names(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, m in model.named_modules()
            if n.startswith(prefix + ".") and isinstance(m, (nn.Linear, NF4Linear))]


def quantizable_names(model: nn.Module) -> list[str]:
    """Internal names of the LLM linears QLoRA quantises: all of them except the output head."""
    return [n for n in _linear_names(model, "llm") if n != "llm.head"]


def lora_candidates(model: nn.Module) -> dict[str, str]:
    """{official module name: internal name} of every linear LoRA may target: the LLM linears but the head,
    and the ViT linears (never the projector or the embeddings)."""
    family = model.config.llm.family
    names = quantizable_names(model) + _linear_names(model, "vit")
    return {to_official_name(name + ".weight", family).removesuffix(".weight"): name for name in names}


def _layer_relative(official: str) -> str:
    """'language_model.model.layers.3.attention.wqkv' -> 'attention.wqkv' (for listing candidates)."""
    parts = official.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] + 1:]) if digits else official


def resolve_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Internal module names the adapters go on. A target matches an official module name when it equals its
    last dotted components ('wqkv', 'attention.wqkv', 'attn.qkv'); a target matching nothing is an error.
    Like the official use_llm_lora / use_backbone_lora, the LLM targets and the ViT ones are independent."""
    candidates = lora_candidates(model)
    chosen = set()
    if cfg.targets is None:
        chosen.update(i for i in candidates.values() if i.startswith("llm."))
    if cfg.vit:
        chosen.update(i for i in candidates.values() if i.startswith("vit."))
    for target in cfg.targets or []:
        t = target.strip().split(".")
        hits = [internal for official, internal in candidates.items() if official.split(".")[-len(t):] == t]
        if not hits:
            llm = sorted({_layer_relative(o) for o, i in candidates.items() if i.startswith("llm.")})
            vit = sorted({_layer_relative(o) for o, i in candidates.items() if i.startswith("vit.")})
            raise ValueError(
                f"LoRA target {target!r} matches no linear layer of this {model.config.llm.family} model. "
                f"Candidates (official names): LLM {', '.join(llm)}; ViT {', '.join(vit)}. The output head, "
                f"the embeddings and the projector (mlp1) are never LoRA targets.")
        chosen.update(hits)
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


def inject_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every target linear in a LoRALinear (in place); returns the internal module names wrapped.

    Adapters take the base weight's dtype unless `dtype` is given; over an NF4 base, the dtype of the model's
    unquantised weights (so a float32 CPU run trains float32 adapters; DeepSpeed bf16 casts them anyway)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("this model already has LoRA adapters; inject_lora once per model")
    names = resolve_targets(model, cfg)
    for name in names:
        base = model.get_submodule(name)
        a_dtype = dtype or (model.llm.head.weight.dtype if isinstance(base, NF4Linear) else None)
        wrapper = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, a_dtype)
        _set(model, name, wrapper.train(base.training))  # keep the model's train/eval mode (dropout)
    return names


def prepare_qlora(model: nn.Module, device: torch.device | str | None = None,
                  compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Loader hook (load_pretrained(..., prepare=...)): on the meta-built model, replace every LLM linear but
    the head by an empty NF4Linear; the loader then hands each checkpoint tensor to its `assign_weight`, which
    quantises it on `device` (so only one bf16 matrix exists at a time)."""
    for name in quantizable_names(model):
        lin = model.get_submodule(name)
        q = NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype, device)
        _set(model, name, q)
    return model


def quantize_llm(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Quantise an already loaded model in place, one linear at a time (tests, benches, models built in
    memory)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("quantize before inject_lora (the adapters wrap the quantised linears)")
    for name in quantizable_names(model):
        lin = model.get_submodule(name)
        if isinstance(lin, nn.Linear):
            _set(model, name, NF4Linear.from_linear(lin, compute_dtype))
    return model


# --- what trains ---

def check_supported(mode: str, zero_stage: int) -> None:
    """Refuse unsupported (mode, ZeRO stage) pairs before any heavy work (train.py calls this first)."""
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose from {', '.join(MODES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"unknown ZeRO stage {zero_stage!r}; DeepSpeed has stages 0-3")
    if mode == "qlora" and zero_stage == 3:
        raise ValueError(
            "QLoRA with ZeRO-3 is not supported: ZeRO-3 would partition the frozen 4-bit weights, which "
            "bitsandbytes cannot gather. Use ZeRO-1 or ZeRO-2 (--deepspeed ds_zero1.json): the NF4 base is "
            "replicated (26B: about 12 GB per GPU) and only the trainable state is sharded. For ZeRO-3, use "
            "--mode lora.")


def _has(model, cls) -> bool:
    return any(isinstance(m, cls) for m in model.modules())


def mark_trainable(model: nn.Module, mode: str, *, train_vit: bool = False, unfreeze_vit_layers: int = 0,
                   freeze_projector: bool = False, freeze_llm: bool = False) -> dict[str, tuple[int, int]]:
    """Set requires_grad for `mode` and the freeze options, after checking that they fit the model and each
    other; returns the per-part report (parameter_report).

    full: LLM + projector; lora / qlora: adapters + projector (XTuner's default). train_vit trains the whole
    ViT, unfreeze_vit_layers K the ViT layers K.. (official: 0 = none, -K = the last K; under ViT LoRA their
    base weights too); freeze_projector freezes the projector, freeze_llm (full mode) the LLM.
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose from {', '.join(MODES)}")
    has_lora, has_nf4 = _has(model, LoRALinear), _has(model, NF4Linear)
    if mode == "full" and (has_lora or has_nf4):
        raise ValueError("mode 'full' trains the plain model, but this one has LoRA adapters or NF4 weights")
    if mode in ("lora", "qlora") and not has_lora:
        raise ValueError(f"mode {mode!r} needs LoRA adapters: call inject_lora(model, LoRAConfig(...)) first")
    if mode == "qlora" and not has_nf4:
        raise ValueError("mode 'qlora' needs NF4 LLM weights: load with prepare=prepare_qlora (or "
                         "quantize_llm)")
    if mode == "lora" and has_nf4:
        raise ValueError("this model has NF4 weights; its mode is 'qlora', not 'lora'")
    if train_vit and any(isinstance(m, LoRALinear) for m in model.vit.modules()):
        raise ValueError("train_vit trains the whole ViT, but the ViT also has LoRA adapters; choose one")
    n_vit = len(model.vit.layers)
    if unfreeze_vit_layers and train_vit:
        raise ValueError(f"train_vit trains every ViT layer and unfreeze_vit_layers {unfreeze_vit_layers} "
                         f"some of them; choose one")
    if not -n_vit <= unfreeze_vit_layers < n_vit:
        raise ValueError(f"unfreeze_vit_layers {unfreeze_vit_layers}: the ViT has {n_vit} layers (K trains "
                         f"layers K.., -K the last K)")
    if freeze_llm and mode != "full":
        raise ValueError(f"freeze_llm is for mode 'full', not {mode!r} (the LoRA modes already freeze the "
                         f"LLM base)")
    unfrozen = tuple(f"vit.layers.{i}." for i in range(n_vit)[unfreeze_vit_layers:] if unfreeze_vit_layers)
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            p.requires_grad_(True)
        elif name.startswith("vit."):
            p.requires_grad_(train_vit or name.startswith(unfrozen))
        elif name.startswith("projector."):
            p.requires_grad_(not freeze_projector)
        elif name.startswith("llm."):
            p.requires_grad_(mode == "full" and not freeze_llm)
        else:
            raise ValueError(f"parameter {name!r} belongs to no known part (vit, projector, llm)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train with these freeze options")
    return parameter_report(model)


def parameter_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{part: (trainable, total)} for vit, projector, llm and adapters (LoRA A/B, counted apart from the part
    they sit in). NF4 weights count as their logical out*in parameters, ZeRO-3 partitioned ones as whole."""
    report = {part: [0, 0] for part in ("vit", "projector", "llm", "adapters")}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if isinstance(module, NF4Linear) and p_name == "weight":
                numel = module.in_features * module.out_features
            else:
                numel = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition is empty; ds_numel whole
            part = "adapters" if p_name in ("lora_A", "lora_B") else mod_name.split(".")[0]
            report[part][0] += numel if p.requires_grad else 0
            report[part][1] += numel
    return {k: (t, n) for k, (t, n) in report.items()}


def format_report(report: dict[str, tuple[int, int]], mode: str = "") -> str:
    lines = [f"trainable parameters{f' ({mode})' if mode else ''}:"]
    for part, (t, n) in report.items():
        lines.append(f"  {part:<10} {t:>15,} / {n:>15,}")
    t, n = sum(v[0] for v in report.values()), sum(v[1] for v in report.values())
    lines.append(f"  {'total':<10} {t:>15,} / {n:>15,}  ({100 * t / max(n, 1):.3f}% trainable)")
    return "\n".join(lines)


# --- small checkpoints and the merge ---

def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that train (adapters + trainable non-LoRA parameters): LoRA's are megabytes."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict"):
    """Copy `state` into the trainable parameters of a freshly built, injected and marked model. Strict: every
    trainable parameter must be given, nothing else may be, and shapes must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(mismatch_message(f"{source} does not match the model's trainable parameters (were "
                                          f"the same mode, LoRA settings and freeze options used?):",
                                          missing, unexpected))
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(p.shape)}")
            p.copy_(state[name])


def _split_trained(trainable: dict[str, torch.Tensor], lora: LoRAConfig | None, config):
    """Check the trained tensors against the architecture (built on the meta device) and split them into
    ({adapted weight: (A, B)}, {replaced tensor: trained value}), both under the base checkpoint's names."""
    meta = build_model(config, "meta")
    if lora is not None:
        inject_lora(meta, lora)
    expected = dict(meta.named_parameters())
    adapters, replaced = {}, {}
    for name, t in trainable.items():
        if name not in expected:
            raise ValueError(f"trained tensor {name!r} is not a parameter of this {config.llm.family} model "
                             f"with {'LoRA ' + str(lora.to_dict()) if lora else 'no LoRA'}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"trained tensor {name}: shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
        module, _, kind = name.rpartition(".")
        if kind in ("lora_A", "lora_B"):
            other = "lora_B" if kind == "lora_A" else "lora_A"
            if f"{module}.{other}" not in trainable:
                raise ValueError(f"{module}: {kind} without {other} in the trained tensors")
            adapters[module + ".weight"] = (trainable[module + ".lora_A"], trainable[module + ".lora_B"])
        else:
            replaced[name.replace(".base.", ".")] = t  # a wrapped linear's own tensors keep their plain name
    wrapped = {n.removesuffix(".lora_A") for n in expected if n.endswith(".lora_A")}
    absent = sorted(wrapped - {m.removesuffix(".weight") for m in adapters})
    if absent:
        raise ValueError(f"LoRA settings target {len(absent)} modules with no adapter in the trained "
                         f"tensors, e.g. {absent[:4]}")
    return adapters, replaced


def merge_checkpoint(base_dir: str | Path, trainable: dict[str, torch.Tensor], lora: LoRAConfig | None,
                     config=None, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the merged model as (internal name, tensor), one tensor at a time. The tensors it computes
    (trained, merged) come in `dtype` if given (convert.py asks for float32 and casts once when writing, so a
    float32 export keeps the float32 merge), else in the base checkpoint's; every other tensor comes as the
    checkpoint stores it: the writer's one cast from there gives the same bytes as one through float32, and no
    float32 copy of an untouched embedding or head is made (0.5 GiB at 151,674 x 896).

    Base tensors are read from `base_dir` (the bf16 checkpoint, never a 4-bit model); each trained non-LoRA
    tensor replaces the base one, then each adapted weight W (base or trained) becomes merged_weight(W, A, B).
    Every trained tensor is checked before anything is read."""
    config = config or load_config(str(base_dir))
    adapters, replaced = _split_trained(trainable, lora, config)
    used = set()
    for name, tensor in iter_checkpoint(str(base_dir), config):
        if name in replaced:  # trained; if also adapted (a ViT layer unfrozen under LoRA), merged onto below
            tensor = replaced[name].detach().to(device=tensor.device, dtype=dtype or tensor.dtype)
            used.add(name)
        elif name in adapters and dtype is not None:
            tensor = tensor.to(dtype)
        if name in adapters:
            tensor = merged_weight(tensor, *adapters[name], lora.scale)
            used.add(name)
        yield name, tensor
    left = sorted((set(adapters) | set(replaced)) - used)
    if left:
        raise ValueError(f"{base_dir}: the checkpoint has no tensor for trained parameters {left[:8]}")
