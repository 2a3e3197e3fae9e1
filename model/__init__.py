"""InternVL 1.5 / 2 / 2.5 in plain PyTorch: `load_pretrained(path)` reads an official checkpoint directory."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from .config import PRESETS, InternVLConfig, LLMConfig, VisionConfig, preset
from .internvl import InternVL, ModelOutput
from .tokens import IMG_CONTEXT, read_added_tokens
from .weights import assign_tensor, check_checkpoint, iter_checkpoint, trim_heap

__all__ = ["InternVL", "InternVLConfig", "LLMConfig", "VisionConfig", "ModelOutput", "PRESETS", "preset",
           "build_model", "load_config", "load_pretrained"]


def load_config(path: str) -> InternVLConfig:
    """config.json of an official directory, plus the <IMG_CONTEXT> id from its tokenizer files."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected an official InternVL 1.5 / 2 / 2.5 "
                                f"directory)")
    with open(cfg_file) as f:
        config = InternVLConfig.from_official(json.load(f), source=cfg_file)
    if config.llm.family == "llama" and not os.path.exists(os.path.join(path, "tokenizer.model")):
        raise ValueError(f"{path}: a Llama decoder without tokenizer.model (InternVL2-Llama3-76B's Llama-3 "
                         f"tokenizer.json?) is not supported: only sentencepiece Llama tokenizers are "
                         f"(InternVL2-40B)")
    token = read_added_tokens(path).get(IMG_CONTEXT)
    if token is None:
        raise ValueError(f"{path}: no {IMG_CONTEXT} token in added_tokens.json or tokenizer_config.json")
    config.img_context_token_id = token.id
    return config


def build_model(config: InternVLConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None
                ) -> InternVL:
    """An InternVL with random (or, on "meta", unallocated) weights."""
    with torch.device(device):
        model = InternVL(config)
    return model.to(dtype) if dtype is not None else model


def load_pretrained(path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    prepare: Callable[[InternVL], None] | None = None,
                    replace: dict[str, torch.Tensor] | None = None, zero3: dict | None = None) -> InternVL:
    """Load an official InternVL directory strictly: every tensor present, expected and of the right
    shape.

    The model is built on the meta device and filled one tensor at a time, so no second copy is ever held.
    `prepare(model)` runs on the meta model before filling (QLoRA swaps in 4-bit layers there). `replace`
    {internal name: tensor} is used as it is instead of the checkpoint's tensor, which is then not read
    (convert.py's trained model: a full run's trained LLM is not loaded twice). `zero3`: a DeepSpeed config
    whose ZeRO-3 partitions the model while it is built (every rank calls this; see _load_zero3).
    """
    config = load_config(path)
    if zero3 is not None:
        return _load_zero3(path, config, zero3)
    model = build_model(config, "meta")
    expected = {name: p.shape for name, p in model.named_parameters()}
    files = check_checkpoint(path, config, expected)
    if prepare is not None:
        prepare(model)
    replace = replace or {}
    wrong = sorted(k for k, t in replace.items() if expected.get(k) != t.shape)
    if wrong:
        raise KeyError(f"replacement tensors that are no parameter of this model, or of another shape: "
                       f"{wrong[:8]}")
    for name, tensor in iter_checkpoint(path, config, files, skip=set(replace)):
        assign_tensor(model, name, replace[name].to(device) if tensor is None else tensor.to(device=device,
                                                                                             dtype=dtype))
        del tensor
        trim_heap()  # the read buffer, when converted or quantised, is freed: give it back
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a prepare() that added parameters must initialise them itself
        raise RuntimeError(f"parameters left uninitialised after loading {path}: {leftover}")
    return model.eval()


def _load_zero3(path: str, config: InternVLConfig, ds_config: dict) -> InternVL:
    """Rank 0 reads each tensor and scatters it into its partitions: no rank ever holds the whole model. The
    dtype is the DeepSpeed config's (deepspeed 0.19's zero.Init ignores a dtype argument on CPU)."""
    import deepspeed
    import torch.distributed as dist
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = InternVL(config)
    params = dict(model.named_parameters())
    files = check_checkpoint(path, config, {n: p.ds_shape for n, p in params.items()})
    master = dist.get_rank() == 0
    for name, tensor in iter_checkpoint(path, config, files, read=master):
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            if master:
                params[name].data.copy_(tensor)
        del tensor
        trim_heap()  # the gathered copy and the read buffer are freed: give them back
    return model
