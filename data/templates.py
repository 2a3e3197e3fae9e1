"""Chat templates `internlm2-chat` and `phi3-chat` (the official MPT style), the system message, and labels.

A prompt is system block + sep, then per turn role + message + sep, no newline between turns:
  <|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|><|im_start|>assistant\\n{A}<|im_end|>
  <|system|>\\n{SYS}<|end|><|user|>\\n{Q}<|end|><|assistant|>\\n{A}<|end|>
"""
import ast
import os
from dataclasses import dataclass

from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START

IGNORE_INDEX = -100
NUM_IMAGE_TOKENS = 256  # per 448px tile after pixel shuffle (downsample 0.5)

# Official default since InternVL 2.0 (commit 0dc48a2, 2024-07-19, through 2410d1d) for both templates;
# the fixtures' reference.json `system_message`. `config.json`'s system_message wins over it.
DEFAULT_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                          "是一个有用无害的人工智能助手。")
# Release-era defaults (the checkpoints' own conversation.py, XTuner); pass them explicitly to use them.
RELEASE_SYSTEM_MESSAGES = {
    "internlm2-chat": "You are an AI assistant whose name is InternLM (书生·浦语).",
    "phi3-chat": "You are an AI assistant whose name is Phi-3.",
}


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str  # contains {system_message}
    user: str
    assistant: str
    sep: str  # the terminator of every turn; its token is supervised after each answer
    strip_messages: bool  # preprocess_internlm strip()s every value, preprocess_phi3 does not
    never_supervised: tuple = ()  # tokens always -100 (Phi-3: <|endoftext|>)


TEMPLATES = {
    "internlm2-chat": Template("internlm2-chat", "<|im_start|>system\n{system_message}", "<|im_start|>user\n",
                               "<|im_start|>assistant\n", "<|im_end|>", strip_messages=True),
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n",
                          "<|end|>", strip_messages=False, never_supervised=("<|endoftext|>",)),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def image_tokens(n_tiles, per_tile=NUM_IMAGE_TOKENS):
    """What one <image> becomes in the prompt: the ViT's features replace the <IMG_CONTEXT> tokens."""
    return IMG_START + IMG_CONTEXT * (per_tile * n_tiles) + IMG_END


def directory_system_message(model_dir, template):
    """The system message a directory's own conversation.py registers for `template` (the released
    checkpoints ship the release-era one), or None. Read with ast, never executed."""
    path = os.path.join(model_dir, "conversation.py")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        name = isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
        if name == "Conversation":
            kw = {k.arg: k.value for k in node.keywords}
            try:
                if ast.literal_eval(kw["name"]) == template and "system_message" in kw:
                    return ast.literal_eval(kw["system_message"])
            except (KeyError, ValueError):
                continue
    return None


def resolve_system_message(config=None, override=None, model_dir=None):
    """As the official chat: `override`, else config.json's system_message, else the template default of the
    directory's conversation.py, else DEFAULT_SYSTEM_MESSAGE."""
    if override is not None:
        return override
    if config is not None and config.system_message is not None:
        return config.system_message
    found = directory_system_message(model_dir, config.template) if model_dir and config is not None else None
    return found if found is not None else DEFAULT_SYSTEM_MESSAGE


def render(template, turns, system_message=DEFAULT_SYSTEM_MESSAGE):
    """Training prompt for [(question, answer), ...] and the char spans of every answer + sep.

    An empty message renders as the bare role (official get_prompt); callers reject empty turns
    before training, so here only a final answer of None gives a generation prompt."""
    t = get_template(template)
    text = t.system_template.format(system_message=system_message) + t.sep
    spans = []
    for question, answer in turns:
        text += t.user + question + t.sep if question else t.user
        text += t.assistant
        if answer:
            spans.append((len(text), len(text) + len(answer) + len(t.sep)))
            text += answer + t.sep
    return text, spans


def generation_prompt(template, question, history=(), system_message=DEFAULT_SYSTEM_MESSAGE):
    """Prompt that chat() feeds to generate: history turns, then the question and the bare assistant role."""
    text, _ = render(template, list(history) + [(question, None)], system_message)
    return text


def net_labels(template, tokenizer, ids, starts, spans):
    """Supervise every token that starts inside an answer + terminator span; all else is IGNORE_INDEX.

    The official code counts the tokens of separately tokenized fragments instead; where a word tokenizes
    differently alone (InternLM2's dummy prefix) that shifts or masks whole samples
    (tests/official_labels.py)."""
    t = get_template(template)
    never = {tokenizer.convert_tokens_to_ids(x) for x in t.never_supervised}
    labels, k = [IGNORE_INDEX] * len(ids), 0
    for i, (tid, s) in enumerate(zip(ids, starts)):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and tid not in never:
            labels[i] = tid
    return labels
