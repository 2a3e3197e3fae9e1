"""InternVL 1.5: ViT -> pixel shuffle -> mlp1 projector -> features spliced into the LLM's embeddings."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import InternVLConfig
from .llm import Decoder, KVCache
from .loss import chunked_cross_entropy
from .vit import InternViT


class ModelOutput(NamedTuple):  # a tuple: DeepSpeed's ZeRO-3 hooks find the tensors in it
    logits: torch.Tensor | None  # float32 [B, L, V]; None when labels are given (only the loss is computed)
    loss: torch.Tensor | None  # token mean over supervised tokens
    n_supervised: int = 0  # supervised tokens in this batch (the loss's denominator)


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """[T, H, W, C] -> [T, H*r, W*r, C/r^2] in the official order; v1 leaves the grid transposed."""
    t, h, w, c = x.shape
    x = x.reshape(t, h, int(w * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(t, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


class Projector(nn.Module):
    """Official `mlp1`: LayerNorm(eps 1e-5) -> Linear -> GELU(erf) -> Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-5)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class InternVL(nn.Module):
    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        self.vit = InternViT(config.vision)
        vit_out = config.vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        self.projector = Projector(vit_out, config.llm.hidden_size)
        self.llm = Decoder(config.llm)

    def set_gradient_checkpointing(self, vit: bool = True, llm: bool = True) -> None:
        self.vit.gradient_checkpointing = vit
        self.llm.gradient_checkpointing = llm

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, num_image_token, llm_hidden]."""
        h = self.vit(pixel_values, self.config.select_layer)[:, 1:]  # drop the class token
        t, n, c = h.shape
        side = int(n ** 0.5)
        h = pixel_shuffle(h.reshape(t, side, side, c), self.config.downsample_ratio, self.config.ps_version)
        return self.projector(h.reshape(t, -1, h.shape[-1]))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None, image_flags=None) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> position replaced, in order, by the image features.

        Dummy tiles (image_flags 0, text-only samples) exist only to keep the vision and projector
        parameters in the graph on every rank (ZeRO-3, gradient reduction): when the batch has a real tile
        they are skipped, else one of them goes through the ViT and its features are added with weight 0
        (zero gradients).
        """
        embeds = self.llm.embed(input_ids).clone()  # never write into the raw embedding output (autograd)
        ctx = self.config.img_context_token_id
        is_image = input_ids == ctx if ctx is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if pixel_values is None:
            if bool(is_image.any()):
                n = int(is_image.sum())
                raise ValueError(f"input_ids hold {n} <IMG_CONTEXT> tokens but no pixel_values")
            return embeds
        if ctx is None:
            raise ValueError("config.img_context_token_id is unknown: load the model from a directory with "
                             "its tokenizer files, or set it")
        if image_flags is None:
            image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
        flags = image_flags.reshape(-1).bool()
        if flags.numel() != pixel_values.shape[0]:
            raise ValueError(f"image_flags has {flags.numel()} entries for {pixel_values.shape[0]} tiles")
        n_real = int(flags.sum())
        if n_real == flags.numel():
            real, dummy = self.extract_feature(pixel_values), None
        elif n_real:  # no ViT work on dummy tiles: the real ones keep the vision parameters in the graph
            real, dummy = self.extract_feature(pixel_values[flags]), None
        else:
            dummy = self.extract_feature(pixel_values[:1])
            real = dummy[:0]
        per_sample = is_image.sum(-1).tolist()
        if sum(per_sample) != real.shape[0] * real.shape[1]:
            raise ValueError(self._count_error(per_sample, real.shape[0], real.shape[1]))
        embeds[is_image] = real.reshape(-1, real.shape[-1]).to(embeds.dtype)
        if dummy is not None:
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds

    @staticmethod
    def _count_error(per_sample: list[int], tiles: int, per_tile: int) -> str:
        bad = [b for b, n in enumerate(per_sample) if n % per_tile]
        where = (f"sample {bad[0]} has {per_sample[bad[0]]} <IMG_CONTEXT> tokens, not a multiple of "
                 f"{per_tile}; " if bad else "")
        return (f"image token count mismatch: {where}the batch has {sum(per_sample)} <IMG_CONTEXT> tokens "
                f"(per sample: {per_sample}) but {tiles} image tiles x {per_tile} = {tiles * per_tile} "
                f"features. Features are never truncated: fix the sample (was it cut by max_length?)")

    def forward(self, input_ids, pixel_values=None, image_flags=None, attention_mask=None, position_ids=None,
                labels=None) -> ModelOutput:
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        if position_ids is None:  # as the official forward: 0..L-1 (the collator passes per-sample positions)
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.llm(embeds, position_ids, attention_mask)
        if labels is None:
            return ModelOutput(logits=self.llm.head(hidden).float(), loss=None)
        if attention_mask is not None:  # padded positions never count, whatever their labels say
            labels = labels.masked_fill(~attention_mask.bool(), -100)
        loss, n = chunked_cross_entropy(hidden, labels, self.llm.head)
        return ModelOutput(logits=None, loss=loss, n_supervised=n)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, image_flags=None, attention_mask=None, max_new_tokens=32,
                 eos_token_id=None, do_sample=False, temperature=1.0, top_p=1.0, generator=None,
                 output_logits=False, streamer=None, min_new_tokens=0):
        """New token ids [B, n] with a KV cache; greedy unless do_sample.

        Stops when every row has produced `eos_token_id` (an int or a list; pass the template terminator, e.g.
        the tokenizer's <|im_end|> / <|end|> id, to stop as the official chat does). Finished rows are padded
        with the eos id. Left padding is supported through `attention_mask`. `streamer(ids)` is called with
        each new step's ids [B] as soon as they are picked (chat.py prints tokens as they come). The eos ids
        cannot be picked in the first `min_new_tokens` steps (HF's min_new_tokens; the official benchmark
        scripts set 1).
        """
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=input_ids.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(len(self.llm.layers))
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        hidden = self.llm(embeds, position_ids, mask, cache)
        logits = self.llm.head(hidden[:, -1]).float()
        tokens, step_logits = [], []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            step_logits.append(logits)
            if step < min_new_tokens and eos.numel():
                logits = logits.index_fill(-1, eos, float("-inf"))
            nxt = self._pick(logits, do_sample, temperature, top_p, generator)
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
            tokens.append(nxt)
            if streamer is not None:
                streamer(nxt)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            hidden = self.llm(self.llm.embed(nxt[:, None]), position_ids, mask, cache)
            logits = self.llm.head(hidden[:, -1]).float()
        out = torch.stack(tokens, dim=1)
        return (out, torch.stack(step_logits, dim=1)) if output_logits else out

    @staticmethod
    def _pick(logits, do_sample, temperature, top_p, generator):
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
        if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
            sorted_p, order = probs.sort(-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
