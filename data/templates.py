"""Chat templates `internlm2-chat`, `phi3-chat`, `Hermes-2` and `internvl2_5` (the official MPT style), the
system message, and labels.

A prompt is system block + sep, then per turn role + message + sep (`internvl2_5`'s sep ends in a newline):
  <|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|><|im_start|>assistant\\n{A}<|im_end|>
  <|system|>\\n{SYS}<|end|><|user|>\\n{Q}<|end|><|assistant|>\\n{A}<|end|>
  <|im_start|>system\\n{SYS}<|im_end|>\\n<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}
  <|im_end|>\\n (one line)
`internlm2-chat` and `Hermes-2` render alike; they differ in training (preprocess_internlm strips the
messages, preprocess_mpt does not). Chat stops at the stripped sep's token.
"""
import ast
import bisect
import os
from dataclasses import dataclass

from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START

IGNORE_INDEX = -100
NUM_IMAGE_TOKENS = 256  # per 448px tile after pixel shuffle (downsample 0.5)

# Official default since InternVL 2.0 (commit 0dc48a2, 2024-07-19, through 2410d1d) of internlm2-chat,
# phi3-chat and Hermes-2; internvl2_5 has its own. The fixtures' reference.json `system_message`.
# `config.json`'s system_message wins over them.
DEFAULT_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                          "是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                              "联合开发的多模态大语言模型。")
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
    strip_messages: bool  # preprocess_internlm strip()s every value, the others do not
    never_supervised: tuple = ()  # tokens always -100 (Phi-3: <|endoftext|>)
    system_message: str = DEFAULT_SYSTEM_MESSAGE  # the official default
    # How labels are made: "spans" (net_labels: every token that starts in an answer or its terminator) or
    # "turns" (preprocess_internvl2_5: turn_labels)
    labels: str = "spans"
    # preprocess_internvl2_5 renders each turn by its role: a leading gpt turn is an answer like any other
    # (the others skip a first turn that is not the human's), and only the human turns' <image> tags become
    # images (the others replace the tags anywhere in the text)
    by_role: bool = False

    @property
    def stop(self):
        """The token chat stops at and cuts the answer at (the official template.sep.strip())."""
        return self.sep.strip()


_CHATML = dict(system_template="<|im_start|>system\n{system_message}", user="<|im_start|>user\n",
               assistant="<|im_start|>assistant\n")
TEMPLATES = {
    "internlm2-chat": Template("internlm2-chat", **_CHATML, sep="<|im_end|>", strip_messages=True),
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n",
                          "<|end|>", strip_messages=False, never_supervised=("<|endoftext|>",)),
    "Hermes-2": Template("Hermes-2", **_CHATML, sep="<|im_end|>", strip_messages=False),
    "internvl2_5": Template("internvl2_5", **_CHATML, sep="<|im_end|>\n", strip_messages=False,
                            system_message=INTERNVL2_5_SYSTEM_MESSAGE, labels="turns", by_role=True),
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


def resolve_system_message(config=None, override=None, model_dir=None, template=None):
    """As the official chat: `override`, else config.json's system_message, else the template default of the
    directory's conversation.py, else the official default of the template (config's, else `template`; else
    DEFAULT_SYSTEM_MESSAGE)."""
    if override is not None:
        return override
    if config is not None and config.system_message is not None:
        return config.system_message
    template = config.template if config is not None else template
    found = directory_system_message(model_dir, template) if model_dir and template else None
    if found is not None:
        return found
    return get_template(template).system_message if template else DEFAULT_SYSTEM_MESSAGE


def render(template, turns, system_message=None, lead=None):
    """Training prompt for [(question, answer), ...] and the char spans of every answer + sep. system_message
    None: the template's default; lead: an answer before the first question (a by_role template's leading gpt
    turn).

    An empty message renders as the bare role (official get_prompt); callers reject empty turns
    before training, so here only a final answer of None gives a generation prompt."""
    t = get_template(template)
    system_message = t.system_message if system_message is None else system_message
    text = t.system_template.format(system_message=system_message) + t.sep
    spans = []
    if lead is not None:
        text += t.assistant
        spans.append((len(text), len(text) + len(lead) + len(t.sep)))
        text += lead + t.sep
    for question, answer in turns:
        text += t.user + question + t.sep if question else t.user
        text += t.assistant
        if answer:
            spans.append((len(text), len(text) + len(answer) + len(t.sep)))
            text += answer + t.sep
    return text, spans


def generation_prompt(template, question, history=(), system_message=None):
    """Prompt that chat() feeds to generate: history turns, then the question and the bare assistant role."""
    text, _ = render(template, list(history) + [(question, None)], system_message)
    return text


def make_labels(template, tokenizer, ids, starts, spans):
    """The labels of a rendered sample: the template's rule (net_labels or turn_labels)."""
    rule = net_labels if get_template(template).labels == "spans" else turn_labels
    return rule(template, tokenizer, ids, starts, spans)


def turn_labels(template, tokenizer, ids, starts, spans):
    """preprocess_internvl2_5: every turn is tokenised on its own and the ids concatenated (the same ids as
    the whole text: each turn starts with an added token); an assistant turn keeps its ids but its first
    len(tokenize(role)) (the role) and its last (the newline after <|im_end|>); all else is IGNORE_INDEX.
    Where a newline after a special token is two ids (a dummy-prefix sentencepiece: '▁', <0x0A>), the first
    stays supervised, as officially."""
    t = get_template(template)
    never = {tokenizer.convert_tokens_to_ids(x) for x in t.never_supervised}
    role_len = len(tokenizer.encode(t.assistant, add_bos=False))
    labels = [IGNORE_INDEX] * len(ids)
    for answer_start, end in spans:
        first = bisect.bisect_left(starts, answer_start - len(t.assistant))  # the role's <|im_start|>
        for i in range(first + role_len, bisect.bisect_left(starts, end) - 1):
            labels[i] = IGNORE_INDEX if ids[i] in never else ids[i]
    return labels


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
