"""Chat templates `internlm2-chat` and `phi3-chat` (official MPT style, SPEC §6) and labels.

A prompt is system block + sep, then per turn role + message + sep, no newline between turns:
  <|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|><|im_start|>assistant\\n{A}<|im_end|>
  <|system|>\\n{SYS}<|end|><|user|>\\n{Q}<|end|><|assistant|>\\n{A}<|end|>

Labels follow the net rule (SPEC §7.3): each answer and its closing terminator are supervised, all else
is -100 (Phi-3: <|endoftext|> always -100). `official_labels` re-derives them the way the official
preprocess_internlm / preprocess_phi3 do (fragment token counts) so the two can be compared.
"""
from dataclasses import dataclass

IGNORE_INDEX = -100

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
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>",
                          strip_messages=False, never_supervised=("<|endoftext|>",)),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


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
    """Supervise every token that starts inside an answer+terminator span (SPEC §7.3 net rule)."""
    t = get_template(template)
    never = {tokenizer.convert_tokens_to_ids(x) for x in t.never_supervised}
    labels, k = [IGNORE_INDEX] * len(ids), 0
    for i, (tid, s) in enumerate(zip(ids, starts)):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and tid not in never:
            labels[i] = tid
    return labels


def official_labels(template, tokenizer, text, ids):
    """Labels as the official preprocess_internlm / preprocess_phi3 compute them from the lengths of
    separately tokenized fragments (commit 2410d1d). Returns (labels, consistent): consistent is
    False where the official code prints 'tokenization mismatch' and masks the whole sample."""
    t = get_template(template)
    labels = list(ids)
    total = sum(1 for i in ids if i != tokenizer.pad_id)
    cur = 1
    labels[0] = IGNORE_INDEX

    def tlen(s):
        return len(tokenizer.encode(s))

    def mask(a, b):
        for i in range(max(a, 0), min(b, len(labels))):
            labels[i] = IGNORE_INDEX

    if t.name == "internlm2-chat":
        parts = text.split(t.assistant)
        length = tlen(parts[0] + t.assistant) - 1
        mask(cur, cur + length)
        cur += length
        for part in parts[1:-1]:
            pieces = part.split(t.user)
            if len(pieces) != 2:  # the official code would raise on the unpacking
                return [IGNORE_INDEX] * len(ids), False
            cur += tlen(pieces[0]) - 1
            length = tlen(t.user + pieces[1] + t.assistant) - 1
            mask(cur, cur + length)
            cur += length
        cur += tlen(parts[-1]) - 1
        mask(cur, len(labels))
    elif t.name == "phi3-chat":
        for x in t.never_supervised:
            xid = tokenizer.convert_tokens_to_ids(x)
            labels = [IGNORE_INDEX if i == xid else l for i, l in zip(ids, labels)]
        sep = t.sep + t.assistant
        turns = text.split(t.sep)
        re_turns = [t.sep.join(turns[:3])]
        for i in range(3, len(turns), 2):
            re_turns.append(t.sep.join(turns[i:i + 2]))
        for i, turn in enumerate(re_turns):
            if turn == "":
                break
            turn_len = tlen(turn) - (0 if i == 0 else 1)
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            instr_len = tlen(parts[0] + sep) - (1 if i == 0 else 2)
            mask(cur, cur + instr_len)
            cur += turn_len
        mask(cur, len(labels))
    else:
        raise ValueError(f"no official label procedure for template {t.name!r}")
    if cur != total:
        return [IGNORE_INDEX] * len(ids), False
    return labels, True
