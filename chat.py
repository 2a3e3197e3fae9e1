"""Talk to an official InternVL 1.5 directory (converted or released) with the official chat semantics.

    python chat.py MODEL_DIR --image photo.jpg --question "What is in the picture?"
    python chat.py MODEL_DIR --image photo.jpg      # interactive: one question per line, history kept
    python chat.py MODEL_DIR --data test.jsonl,images/ --output answers.jsonl   # a test set, batched

As the official `InternVLChatModel.chat`: the system message is config.json's, else the template default of
the directory's own conversation.py; the image is tiled with the directory's settings; `<image>\\n` goes in
front of the first question when it has none; generation stops only at the template terminator (`<|im_end|>`
/ `<|end|>`); the answer is decoded without special tokens, cut at the terminator text and stripped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from data.dataset import SampleError, parse_record, read_annotation
from data.images import ImageLoadError, dynamic_preprocess, load_image, to_tensor
from data.templates import (directory_system_message, generation_prompt, get_template,  # noqa: F401
                            image_tokens, resolve_system_message)  # directory_system_message: re-exported
from data.tokenizer import load_tokenizer
from model import load_pretrained
from model.config import InternVLConfig
from model.weights import DTYPES, checkpoint_files

IMAGE_TAG = "<image>"


def image_to_pixel_values(image, config: InternVLConfig, max_num: int | None = None) -> torch.Tensor:
    """A PIL image -> float32 [tiles, 3, S, S] with the directory's tiling settings (official load_image)."""
    size = config.force_image_size
    if not config.dynamic_image_size:  # one tile, warped to S x S (to_tensor resizes)
        return to_tensor([image.convert("RGB")], size)
    tiles = dynamic_preprocess(image.convert("RGB"), config.min_dynamic_patch,
                               max_num or config.max_dynamic_patch, size, config.use_thumbnail)
    return to_tensor(tiles, size)


def build_prompt(tokenizer, config: InternVLConfig, question: str, history=(), num_patches_list=(),
                 system_message: str | None = None) -> tuple[str, list[int]]:
    """(question as kept in the history, prompt ids, BOS first where the tokenizer adds one) exactly as the
    official chat builds them.
    `system_message` None: config.json's, else the template default (see resolve_system_message)."""
    if not history and num_patches_list and IMAGE_TAG not in question:
        question = IMAGE_TAG + "\n" + question
    system_message = resolve_system_message(config, system_message)
    query = generation_prompt(config.template, question, list(history), system_message)
    n_tags = query.count(IMAGE_TAG)
    if n_tags != len(num_patches_list):
        raise ValueError(f"the prompt has {n_tags} {IMAGE_TAG} tag(s) but {len(num_patches_list)} image(s) "
                         f"were given{' (pass --image)' if not num_patches_list else ''}")
    for n in num_patches_list:
        query = query.replace(IMAGE_TAG, image_tokens(n, config.num_image_token), 1)
    return question, tokenizer.encode(query)


class StreamPrinter:
    """Prints the answer as tokens arrive. It re-decodes the new tokens each step and prints only text that
    can no longer change: nothing after the terminator, no trailing whitespace (the answer is stripped), and
    nothing while the text ends in an incomplete UTF-8 sequence (byte-fallback pieces)."""

    def __init__(self, tokenizer, sep: str, out=None):
        self.tokenizer, self.sep, self.out = tokenizer, sep, out or sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def __call__(self, step_ids: torch.Tensor) -> None:
        self.ids.append(int(step_ids[0]))
        text = decode_answer(self.tokenizer, self.ids, self.sep)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self, response: str) -> None:
        if response.startswith(self.printed):
            self._emit(response)
        else:  # the decoded text changed behind what was printed: give the final answer in full
            self.out.write("\n" + response)
        self.out.write("\n")
        self.out.flush()


@torch.no_grad()
def chat(model, tokenizer, pixel_values: torch.Tensor | None, question: str, history=None,
         max_new_tokens: int = 1024, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
         system_message: str | None = None, streamer=None, generator=None):
    """One turn of the official chat: returns (response, history + [(question, response)], new token ids).

    Like the official chat, the image (all its tiles) is passed again on every turn: its `<image>` lives in
    the first question of the history.
    """
    config = model.config
    history = list(history or [])
    num_patches = [pixel_values.shape[0]] if pixel_values is not None else []
    question, ids = build_prompt(tokenizer, config, question, history, num_patches, system_message)
    sep = get_template(config.template).stop
    eos_id = tokenizer.convert_tokens_to_ids(sep)
    device = next(model.parameters()).device
    dtype = model.llm.embed.weight.dtype
    input_ids = torch.tensor([ids], device=device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=dtype)
    out = model.generate(input_ids, pixel_values, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                         streamer=streamer)[0]
    response = decode_answer(tokenizer, out.tolist(), sep)
    history.append((question, response))
    return response, history, out


def decode_answer(tokenizer, ids, sep: str) -> str:
    """As the official chat: decoded without special tokens, cut at the terminator text, stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).split(sep)[0].strip()


def record_prompt(record, image_folder, tokenizer, config: InternVLConfig, system_message=None, max_num=None):
    """A LLaVA record -> (question, reference, prompt ids, pixel values or None): the first human turn and
    the gpt turn after it (a leading gpt turn is not asked for), the image tag in front of the question when
    it has none, several images sharing the tile cap, and a leading system turn as the system message, as in
    training.
    Raises SampleError, ImageLoadError or ValueError."""
    conv = parse_record(record, config.template)
    question, reference = conv.turns[0]
    pixel_values, patches = None, []
    if conv.images:
        cap = max_num or config.max_dynamic_patch
        cap = cap if len(conv.images) == 1 else max(1, cap // len(conv.images))
        paths = [p if image_folder is None else os.path.join(image_folder, p) for p in conv.images]
        tiles = [image_to_pixel_values(load_image(p), config, cap) for p in paths]
        pixel_values, patches = torch.cat(tiles), [t.shape[0] for t in tiles]
    system_message = system_message if conv.system is None else conv.system
    _, ids = build_prompt(tokenizer, config, question, [], patches, system_message)
    return question, reference, ids, pixel_values


@torch.no_grad()
def generate_batch(model, prompts, eos_id: int, max_new_tokens: int, stop_early: bool = True,
                   min_new_tokens: int = 0):
    """Greedy answers for [(prompt ids, pixel values or None)] in one left-padded batch with the KV cache:
    the new ids of each prompt, cut after its terminator, which is barred from the first min_new_tokens
    steps. stop_early=False always runs max_new_tokens steps (ZeRO-3 ranks must run the same number of
    forwards) and bars nothing."""
    device, dtype = next(model.parameters()).device, model.llm.embed.weight.dtype
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, (ids, _) in enumerate(prompts):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    tiles = [pv for _, pv in prompts if pv is not None]
    pixel_values = torch.cat(tiles).to(device=device, dtype=dtype) if tiles else None
    out = model.generate(input_ids.to(device), pixel_values, attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id if stop_early else None,
                         min_new_tokens=min_new_tokens)
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out.tolist()]


def plan_batches(prompts, batch_size, max_new_tokens, config: InternVLConfig):
    """Batches of [(row, ids, pixel values)], longest first (less padding). Phi-3's 'su' RoPE picks its
    factors from the largest position of the whole batch, so a batch mixes only prompts that stay on one side
    of original_max_position_embeddings for the whole generation, and one that may cross it runs alone: every
    answer then equals the prompt's answer alone."""
    prompts = sorted(prompts, key=lambda p: -len(p[1]))
    llm = config.llm
    if llm.family != "phi3" or (llm.rope_scaling or {}).get("type") not in ("su", "longrope"):
        return [prompts[k:k + batch_size] for k in range(0, len(prompts), batch_size)]
    orig = llm.original_max_position_embeddings
    long = [p for p in prompts if len(p[1]) > orig]
    short = [p for p in prompts if len(p[1]) + max_new_tokens <= orig]
    alone = [[p] for p in prompts if orig - max_new_tokens < len(p[1]) <= orig]
    return [g[k:k + batch_size] for g in (long, short) for k in range(0, len(g), batch_size)] + alone


def answer_test_set(model, tokenizer, records, output, batch_size=8, max_new_tokens=1024,
                    system_message=None, max_num=None):
    """Greedy answers for [(id, record, image folder)], `batch_size` prompts at a time, written to `output` as
    JSON lines in the input order: id, question, reference, answer, tokens (or error). Returns the scores:
    exact match (stripped strings equal) and reference contained in the answer, over the rows that have a
    reference and no error."""
    from tqdm import tqdm
    config = model.config
    sep = get_template(config.template).stop
    eos_id = tokenizer.convert_tokens_to_ids(sep)
    system_message = system_message if system_message is not None else resolve_system_message(config)
    rows, ready = [], []
    for rid, record, folder in records:
        row = {"id": rid}
        try:
            if isinstance(record, Exception):  # a line that is not JSON (read_test_set)
                raise record
            row["question"], row["reference"], ids, pv = record_prompt(record, folder, tokenizer, config,
                                                                       system_message, max_num)
            ready.append((len(rows), ids, pv))
        except (SampleError, ImageLoadError, ValueError) as e:  # reported in its row; the run goes on
            row["error"] = str(e)
        rows.append(row)
    bar = tqdm(total=len(ready), desc="answers", dynamic_ncols=True)
    tokens, t0 = 0, time.time()
    for chunk in plan_batches(ready, batch_size, max_new_tokens, config):
        answers = generate_batch(model, [(ids, pv) for _, ids, pv in chunk], eos_id, max_new_tokens)
        for (i, _, _), ids in zip(chunk, answers):
            rows[i].update(answer=decode_answer(tokenizer, ids, sep), tokens=len(ids))
            tokens += len(ids)
        bar.update(len(chunk))
        bar.set_postfix_str(f"tok/s {tokens / (time.time() - t0):.1f}")
    bar.close()
    seconds = time.time() - t0
    with open(output, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    scored = [r for r in rows if "answer" in r and r.get("reference") is not None]
    ref = lambda r: r["reference"].strip()  # noqa: E731
    return dict(records=len(rows), answered=len(ready), errors=len(rows) - len(ready), scored=len(scored),
                exact_match=sum(r["answer"] == ref(r) for r in scored) / max(1, len(scored)),
                contained=sum(ref(r) in r["answer"] for r in scored) / max(1, len(scored)),
                new_tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9))


def read_test_set(spec: str):
    """--data ANNOTATION[,IMAGE_FOLDER] -> [(id, record, image folder)]; id = the record's "id", else
    file:line. A malformed line becomes a record that fails with its file:line in the error."""
    path, _, folder = spec.partition(",")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --data {path}: no such file")
    out = []
    for line, _, _, rec in read_annotation(path):
        rid = rec.get("id") if isinstance(rec, dict) and rec.get("id") is not None else f"{path}:{line}"
        out.append((str(rid), SampleError(f"{path}:{line}: {rec}") if isinstance(rec, Exception) else rec,
                    folder or None))
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))
    p.add_argument("model_dir", help="an official InternVL 1.5 directory (convert.py's or a released one)")
    p.add_argument("--image", help="image file (default: none, a text-only chat)")
    p.add_argument("--question", help="ask once and exit (default: read questions from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest answer in tokens (default 1024)")
    p.add_argument("--max-num", type=int, help="tile cap for the image (default: the directory's "
                                               "max_dynamic_patch)")
    p.add_argument("--system-message", help="override the system message (default: config.json's, else the "
                                            "template default of the directory's conversation.py, else the "
                                            "data pipeline's)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default off)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --do-sample: divides the logits (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --do-sample: nucleus sampling (default "
                                                            "1.0: all tokens)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights and compute dtype (default: bfloat16 on "
                                                           "GPU, float32 on CPU)")
    p.add_argument("--no-stream", action="store_true",
                   help="print the answer only when it is complete (default: stream it)")
    p.add_argument("--data", metavar="ANNOTATION[,IMAGE_FOLDER]",
                   help="a LLaVA-format test set: greedy answers to each record's first question, batched, "
                        "to --output, with exact-match and contained rates against the first answers "
                        "(default: none, a chat)")
    p.add_argument("--output", help="with --data: the answers, JSON lines (default none)")
    p.add_argument("--batch-size", type=int, default=8, help="with --data: prompts per batch (default 8)")
    p.add_argument("--benchmark", metavar="NAME", help="with --data FILE[,IMAGE_FOLDER]: an official "
                   "InternVL benchmark (textvqa_val, docvqa_val, pope, sqa_test, ...; see benchmarks.py): "
                   "its official input file, prompt, max_new_tokens and scoring; per-item scores to "
                   "--output, the official results file beside it")
    p.add_argument("--annotation", help="with --benchmark: the official annotation file of the references "
                   "(VQAv2/OK-VQA/TextVQA/VizWiz: the 10 human answers; DocVQA/InfoVQA: the answers; POPE: "
                   "the folder of coco_pope_*.json labels) (default: the answers in the --data file)")
    p.add_argument("--cot", action="store_true", help="with --benchmark pope, sqa_test or m3cot_test: the "
                   "official --cot variant (step-by-step instruction, 4096 new tokens, the 'Final answer:' "
                   "line scored) (default off)")
    p.add_argument("--compare", metavar="BASE_DIR", help="with --benchmark: also answer with the base model "
                   "(answers to OUTPUT.base.jsonl) and print base, fine-tuned and delta")
    args = p.parse_args(argv)
    if (args.data is None) != (args.output is None):
        p.error("--data and --output go together")
    if (args.annotation or args.compare or args.cot) and not args.benchmark:
        p.error("--annotation, --compare and --cot go with --benchmark")
    if args.benchmark and not args.data:
        p.error("--benchmark needs --data FILE[,IMAGE_FOLDER] and --output")
    return args


def converse(model, tokenizer, args, system_message: str, device) -> int:
    """--question once, or one question per stdin line with the history kept (/reset, /exit)."""
    pixel_values = None
    if args.image:
        pixel_values = image_to_pixel_values(load_image(args.image), model.config, args.max_num)
    sep = get_template(model.config.template).stop
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.do_sample else None
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                    temperature=args.temperature, top_p=args.top_p, system_message=system_message,
                    generator=generator)

    def answer(question, history):
        printer = None if args.no_stream else StreamPrinter(tokenizer, sep)
        response, history, _ = chat(model, tokenizer, pixel_values, question, history, streamer=printer,
                                    **settings)
        if printer is None:
            print(response, flush=True)
        else:
            printer.finish(response)
        return history

    if args.question is not None:
        answer(args.question, None)
        return 0
    tiles = f"image {args.image} ({pixel_values.shape[0]} tiles)" if pixel_values is not None else "no image"
    dtype = str(model.llm.embed.weight.dtype).removeprefix("torch.")
    print(f"{args.model_dir} on {device} ({dtype}), {tiles}. Type a question; /reset clears the history, "
          f"/exit (or Ctrl-D) quits.", file=sys.stderr)
    history = None
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if question in ("/exit", "/quit"):
            return 0
        if question == "/reset":
            history = None
        elif question:
            print("ASSISTANT: ", end="", flush=True)
            history = answer(question, history)


def check_model_dir(path: str) -> None:
    """An official directory with its weights, or one `error:` line saying what the directory is instead."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path}: no such directory")
    inside = [os.path.join(path, d) for d in os.listdir(path) if d.startswith("iter_")]
    checkpoints = [d for d in [path, *inside] if os.path.exists(os.path.join(d, "meta.json"))]
    if checkpoints:
        raise SystemExit(f"error: {path} is a train.py checkpoint or run directory (trained tensors only); "
                         f"convert it first: python convert.py {path} OUT, then chat with OUT")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {path}: no config.json (expected an official InternVL directory)")
    try:
        checkpoint_files(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e} (no weights to chat with)") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    check_model_dir(args.model_dir)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.benchmark:
        import benchmarks

        def load(model_dir):
            model = load_pretrained(model_dir, dtype=dtype, device=device)
            return model, load_tokenizer(model_dir), resolve_system_message(model.config, args.system_message,
                                                                            model_dir)
        return benchmarks.main(args, load)
    tokenizer = load_tokenizer(args.model_dir)
    model = load_pretrained(args.model_dir, dtype=dtype, device=device)
    system_message = resolve_system_message(model.config, args.system_message, args.model_dir)
    if not args.data:
        return converse(model, tokenizer, args, system_message, device)
    scores = answer_test_set(model, tokenizer, read_test_set(args.data), args.output, args.batch_size,
                             args.max_new_tokens, system_message, args.max_num)
    print(f"{scores['answered']} of {scores['records']} records answered ({scores['errors']} errors) -> "
          f"{args.output}; exact match {scores['exact_match']:.1%}, reference contained "
          f"{scores['contained']:.1%} (of {scores['scored']} with a reference); {scores['tokens_per_s']:.1f} "
          f"tokens/s\n{json.dumps(scores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
