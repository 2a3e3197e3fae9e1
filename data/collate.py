"""Batch samples with the official concat_pad_data_collator semantics.

input_ids are padded on the right with 0 (the official pad id here, not the tokenizer's), labels with -100.
attention_mask comes from the lengths rather than `input_ids != 0`, so a genuine id 0 (<unk>) inside a sample
is still attended to. The keys are the model's forward arguments plus "meta" (pop it before the forward):
ids ("source:line" per sample), skipped (problems that made the dataset replace a sample), image_failures,
num_samples, num_tokens, num_supervised (the loss denominator), truncated.
"""
import torch

from model.loss import target_mask

from .templates import IGNORE_INDEX

PAD_ID = 0


def collate(samples, pad_id=PAD_ID):
    lengths = [len(s["input_ids"]) for s in samples]
    batch, width = len(samples), max(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    position_ids = torch.zeros(batch, width, dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[b, :n] = s["input_ids"]
        labels[b, :n] = s["labels"]
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
    out = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
               pixel_values=torch.cat([s["pixel_values"] for s in samples]),
               image_flags=torch.cat([s["image_flags"] for s in samples]))
    out["meta"] = batch_meta(samples, labels)
    return out


def batch_meta(samples, labels):
    """The bookkeeping of a batch (or of a pack, data/packing.py) built from `samples` with these `labels`."""
    metas = [s.get("meta", {}) for s in samples]
    return {
        "ids": [m.get("id") for m in metas],
        "skipped": [x for m in metas for x in m.get("skipped", [])],
        "num_samples": len(samples),
        "num_tokens": sum(len(s["input_ids"]) for s in samples),
        "num_supervised": int(target_mask(labels).sum()),  # the loss's count
        "image_failures": sum(m.get("image_failures", 0) for m in metas),
        "truncated": sum(1 for m in metas if m.get("truncated")),
    }
