"""Held-out evaluation during training (train.py --eval-data): the held-out loss and a few greedy answers.

eval_loss is the training loss's reduction (summed CE over every supervised token / their number, all ranks
together), so it does not depend on the number of processes or the batch size. Every rank runs the same number
of forwards (ZeRO-3 gathers parameters in each): a rank with fewer batches runs empty ones (weight 0).
Evaluation leaves training untouched: eval mode and back, RNG states restored, its own loader.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from data import ImageLoadError, SampleTooLong, SupervisedDataset, collate
from data.images import dummy_pixel_values
from data.templates import IGNORE_INDEX

MAX_NEW_TOKENS = 64  # for the --eval-samples answers


def eval_plan(dataset, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's batches of dataset indices, by modality and length; [] pads a rank with fewer batches."""
    order = sorted(range(len(dataset.lengths)), key=lambda i: (dataset.is_image[i], dataset.lengths[i], i))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    return mine + [[]] * (math.ceil(len(batches) / world) - len(mine))


def eval_collate(indices, dataset):
    """A held-out batch. A sample that cannot be built is left out (never replaced) and named in
    meta["skipped"]; an empty batch is one unsupervised token and one dummy tile: the forward still runs."""
    samples, skipped = [], []
    for i in indices:
        try:
            s = dataset.build(i)
        except (ImageLoadError, SampleTooLong) as e:
            skipped.append(f"{dataset.sample_id(i)}: {e}")
            continue
        samples.append({k: s[k] for k in ("input_ids", "labels", "pixel_values", "image_flags")})
    real = len(samples)
    if not samples:
        samples = [dict(input_ids=torch.zeros(1, dtype=torch.long), labels=torch.full((1,), IGNORE_INDEX),
                        pixel_values=dummy_pixel_values(dataset.image_size),
                        image_flags=torch.zeros(1, dtype=torch.long))]
    batch = collate(samples)
    batch["meta"].update(skipped=skipped, num_samples=real)
    return batch


def setup(args, config, tokenizer, world, rank, zero_stage, log, sum_over_ranks, build):
    """The Evaluator of --eval-data, or None. The held-out data gets the training data's checks before the
    first step, and must have a supervised token. `sum_over_ranks(numbers)`: train.py's all_reduce_sum;
    `build(sources)`: train.py's shared_dataset (built as the training set: once, on rank 0, cached)."""
    benchmark = read_benchmark(args.eval_benchmark) if getattr(args, "eval_benchmark", None) else None
    if benchmark and not args.eval_data:
        raise SystemExit("error: --eval-benchmark is scored at each evaluation of --eval-data: pass "
                         "--eval-data")
    if not args.eval_data:
        return None
    from chat import record_prompt
    from data import DataError, SampleError, Source, get_template
    try:
        sources = [Source.parse(s) for s in args.eval_data]
        for s in sources:
            if s.image_folder is not None and not os.path.isdir(s.image_folder):
                raise DataError(f"image folder {s.image_folder} does not exist (source {s.name})")
    except (ValueError, DataError) as e:
        raise SystemExit(f"error: held-out data (--eval-data): {e}")
    dataset = build(sources)
    template = get_template(config.template)
    tiled = replace(config, min_dynamic_patch=args.min_tiles, max_dynamic_patch=args.max_tiles,
                    use_thumbnail=args.thumbnail)  # the prompts' images cut as the run cuts its samples
    prompts = []
    for i in range(min(args.eval_samples, len(dataset))):
        si, record = dataset.index[i][0], dataset.record(i)
        try:
            question, reference, ids, pv = record_prompt(record, sources[si].image_folder, tokenizer, tiled,
                                                         dataset.system_message, dataset._max_num(si))
        except (SampleError, ImageLoadError, ValueError) as e:
            log(f"--eval-samples: leaving out {dataset.sample_id(i)}: {e}")
            continue
        prompts.append((dataset.sample_id(i), question, reference, ids, pv))
    ev = Evaluator(dataset, eval_plan(dataset, args.batch_size, world, rank), args.num_workers, prompts,
                   tokenizer.convert_tokens_to_ids(template.stop), zero_stage != 3, args.output_dir,
                   rank == 0, template.stop, sum_over_ranks, benchmark=benchmark)
    n_sup, n_samples, n_skipped, skipped = ev.count()
    for s in skipped:
        log(f"held-out sample left out: {s}")
    if n_sup == 0:
        first = f": {skipped[0]}" if skipped else ""
        raise SystemExit(f"error: --eval-data {' '.join(args.eval_data)}: no supervised token in the "
                         f"held-out set ({n_samples} usable samples, {n_skipped} left out{first})")
    answers = prompts and f", {len(prompts)} greedy answers to {args.output_dir}/samples.jsonl"
    log(f"held-out: {n_samples} samples, {n_sup} supervised tokens ({n_skipped} left out); eval every "
        f"{args.eval_steps} steps and at the end{answers or ''}")
    return ev


def read_benchmark(spec: str):
    """--eval-benchmark NAME=FILE[,IMAGE_FOLDER[,ANNOTATION]] -> (Benchmark, items), read before the model."""
    import benchmarks
    name, eq, files = spec.partition("=")
    if not eq or not files:
        raise SystemExit(f"error: --eval-benchmark {spec}: expected NAME=FILE[,IMAGE_FOLDER[,ANNOTATION]]")
    path, folder, annotation = (files.split(",") + ["", ""])[:3]
    try:
        bench = benchmarks.get_benchmark(name)
    except ValueError as e:
        raise SystemExit(f"error: --eval-benchmark: {e}")
    items = benchmarks.read_items(bench, f"{path},{folder}" if folder else path, annotation or None)
    if not any(it.error is None for it in items):
        raise SystemExit(f"error: --eval-benchmark {spec}: no usable item"
                         f"{': ' + items[0].error if items else ''}")
    return bench, items


@dataclass
class Evaluator:
    dataset: SupervisedDataset
    plan: list  # this rank's batches (eval_plan)
    num_workers: int
    prompts: list  # [(id, question, reference, ids, pixel values)] of the --eval-samples answers
    eos_id: int
    stop_early: bool  # False under ZeRO-3: every rank then runs MAX_NEW_TOKENS decoding steps
    output_dir: str
    master: bool
    sep: str  # the template terminator, where answers are cut
    sum_over_ranks: Callable  # a list of numbers summed over the ranks
    last: float | None = None  # the latest eval_loss, for the progress bar
    benchmark: tuple | None = None  # (Benchmark, items) of --eval-benchmark
    score_keys: tuple = ()  # the benchmark numbers of the latest evaluation, for TensorBoard

    def loader(self):
        return torch.utils.data.DataLoader(self.plan, batch_size=None, num_workers=self.num_workers,
                                           collate_fn=partial(eval_collate, dataset=self.dataset),
                                           generator=torch.Generator().manual_seed(0))

    def count(self):
        """(supervised tokens, samples, skipped samples, their problems) of the held-out set, all ranks
        together."""
        local, skipped = [0, 0, 0], []
        for b in self.loader():
            m = b["meta"]
            local = [x + y for x, y in zip(local, (m["num_supervised"], m["num_samples"], len(m["skipped"])))]
            skipped += m["skipped"]
        return (*(int(x) for x in self.sum_over_ranks(local)), skipped)

    @torch.no_grad()
    def run(self, engine, step, device, dtype):
        """{"eval_loss": ...} over the whole held-out set; the --eval-samples answers are written."""
        t0 = time.time()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        state = random.getstate(), torch.get_rng_state(), cuda
        engine.eval()
        try:
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for b in self.loader():
                b.pop("meta")
                b = {k: v.to(device) for k, v in b.items()}
                b["pixel_values"] = b["pixel_values"].to(dtype)
                out = engine(**b)
                total[0] += out.loss.double() * out.n_supervised
                total[1] += out.n_supervised
            total = self.sum_over_ranks(total.tolist())
            if self.prompts:
                self.write_samples(engine.module, step)
            scores = self.score_benchmark(engine.module, step) if self.benchmark else {}
        finally:
            engine.train()
            random.setstate(state[0])
            torch.set_rng_state(state[1])
            if state[2] is not None:
                torch.cuda.set_rng_state_all(state[2])
        self.last = total[0] / total[1]
        return dict(eval_loss=self.last, eval_supervised_tokens=int(total[1]), **scores,
                    eval_seconds=time.time() - t0)

    def score_benchmark(self, model, step):
        """--eval-benchmark: every rank answers every item (ZeRO-3 needs the same forwards on all ranks);
        rank 0 writes the answers and per-item scores to OUTPUT/NAME-stepN.jsonl. Returns {eval_NAME_SCORE:
        value}."""
        import benchmarks
        bench, items = self.benchmark
        out = os.path.join(self.output_dir, f"{bench.name}-step{step}.jsonl") if self.master else None
        summary = benchmarks.run(model, self.dataset.tokenizer, bench, items, out,
                                 system_message=self.dataset.system_message, stop_early=self.stop_early,
                                 progress=False)
        numbers = benchmarks.headline(bench, summary["score"])
        scores = {f"eval_{bench.name}_{k}": v for k, v in numbers.items()}
        self.score_keys = tuple(scores)
        return scores

    def write_samples(self, model, step):
        """Greedy answers to the fixed prompts, the same batches on every rank (ZeRO-3 needs the same
        forwards), appended to OUTPUT/samples.jsonl by rank 0."""
        from chat import decode_answer, generate_batch, plan_batches
        new = {}
        for chunk in plan_batches([(k, p[3], p[4]) for k, p in enumerate(self.prompts)], len(self.prompts),
                                  MAX_NEW_TOKENS, model.config):
            answers = generate_batch(model, [(ids, pv) for _, ids, pv in chunk], self.eos_id, MAX_NEW_TOKENS,
                                     self.stop_early)
            new.update(zip([k for k, _, _ in chunk], answers))
        if self.master:
            rows = [json.dumps(dict(step=step, id=rid, question=question, reference=reference,
                                    answer=decode_answer(self.dataset.tokenizer, new[k], self.sep)),
                               ensure_ascii=False) + "\n" for k, (rid, question, reference, _, _)
                    in enumerate(self.prompts)]
            with open(os.path.join(self.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
                f.write("".join(rows))  # one write: a kill leaves at most a torn tail, which a resume drops
