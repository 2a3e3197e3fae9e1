"""Batch samples with the official concat_pad_data_collator semantics.

input_ids are padded on the right with 0 (the official pad id here, not the tokenizer's), labels with -100.
attention_mask comes from the lengths rather than `input_ids != 0`, so a genuine id 0 (<unk>) inside a sample
is still attended to. The keys are the model's forward arguments plus "meta" (pop it before the forward):
ids ("source:line" per sample), skipped (problems that made the dataset replace a sample: one per failed
attempt), replaced (samples replaced), image_failures,
num_samples, num_tokens, num_supervised (the loss denominator), truncated (samples cut at max_length),
gpt_first (samples whose leading gpt turn was dropped), wide_images (16-bit images clipped, as official).

pixel_values are concatenated by concat_tiles: in a DataLoader worker straight into shared memory, as torch's
default_collate does, so the batch's largest tensor crosses to the main process without another copy.
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
               pixel_values=concat_tiles([s["pixel_values"] for s in samples]),
               image_flags=torch.cat([s["image_flags"] for s in samples]))
    out["meta"] = batch_meta(samples, labels)
    return out


def concat_tiles(tensors):
    """torch.cat along dim 0. In a DataLoader worker the result is allocated in shared memory: the worker
    would otherwise copy the finished batch into shared memory to send it (a copy of every tile, into fresh
    pages)."""
    if torch.utils.data.get_worker_info() is None or len(tensors) == 0:
        return torch.cat(tensors)
    first = tensors[0]
    shape = torch.Size((sum(t.shape[0] for t in tensors), *first.shape[1:]))
    storage = torch.UntypedStorage._new_shared(first.element_size() * shape.numel())
    return torch.cat(tensors, out=first.new_empty(0).set_(storage).view(shape))


def batch_meta(samples, labels):
    """The bookkeeping of a batch (or of a pack, data/packing.py) built from `samples` with these `labels`."""
    metas = [s.get("meta", {}) for s in samples]
    return {
        "ids": [m.get("id") for m in metas],
        "skipped": [x for m in metas for x in m.get("skipped", [])],
        "replaced": sum(1 for m in metas if m.get("skipped")),  # samples that took a replacement
        "num_samples": len(samples),
        "num_tokens": sum(len(s["input_ids"]) for s in samples),
        "num_supervised": int(target_mask(labels).sum()),  # the loss's count
        "image_failures": sum(m.get("image_failures", 0) for m in metas),
        "truncated": sum(1 for m in metas if m.get("truncated")),
        "gpt_first": sum(1 for m in metas if m.get("gpt_first")),
        "wide_images": [p for m in metas for p in m.get("wide_images", [])],
    }
