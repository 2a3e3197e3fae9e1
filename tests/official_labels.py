"""The official fragment-count label procedure, for the parity tests only.

The official preprocess_internlm / preprocess_phi3 / preprocess_mpt (commit 2410d1d) derive labels from the
lengths of separately tokenized prompt fragments. Training uses the net rule (data.templates.net_labels); the
tests check that the two agree wherever the official code is self-consistent, and show where it is not.
preprocess_internvl2_5 tokenises every turn on its own and concatenates the ids; training uses its rule as it is
(data.templates.turn_labels).

A leading {"from": "system"} turn: preprocess_internvl2_5 takes its value as the system message
(official_internvl2_5); preprocess_internlm / _phi3 / _mpt look its role up in {'human', 'gpt'} and raise KeyError
(official_prompt).
"""
from data.dataset import conversation_text, parse_record
from data.templates import IGNORE_INDEX, get_template
from data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START


def official_labels(template, tokenizer, text, ids, bos_per_round=True):
    """(labels, consistent) as the official code computes them; consistent is False where it prints
    'tokenization mismatch' and masks the whole sample. bos_per_round=False: preprocess_mpt as meant, not
    counting a BOS for every round after the first (the sequence has one BOS)."""
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
    elif t.name == "Hermes-2":  # preprocess_mpt
        cur = 0
        sep = t.sep + t.assistant
        turns = text.split(t.sep)
        re_turns = [t.sep.join(turns[:3])]
        for i in range(3, len(turns), 2):
            re_turns.append(t.sep.join(turns[i:i + 2]))
        for i, turn in enumerate(re_turns):
            if turn == "":
                break
            extra = 1 if i > 0 and not bos_per_round and tokenizer.add_bos else 0
            turn_len = tlen(turn) + 1 - extra
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            instr_len = tlen(parts[0] + sep) - extra
            mask(cur, cur + instr_len)
            cur += turn_len
        mask(cur, len(labels))
    elif t.name == "internvl2_5":
        return internvl2_5_labels(tokenizer, text, ids)
    else:
        raise ValueError(f"no official label procedure for template {t.name!r}")
    if cur != total:
        return [IGNORE_INDEX] * len(ids), False
    return labels, True


def internvl2_5_labels(tokenizer, text, ids):
    """preprocess_internvl2_5: (labels, consistent), consistent = the concatenated ids of the separately
    tokenised turns are `ids`."""
    parts = ["<|im_start|>" + p for p in text.split("<|im_start|>")[1:]]
    assert "".join(parts) == text
    own_ids, labels = _internvl2_5_turns(tokenizer, parts)
    return labels, own_ids == list(ids)


def _internvl2_5_turns(tokenizer, batches):
    """preprocess_internvl2_5's tokenisation of its rendered turns: (ids, labels)."""
    add_bos = tokenizer.add_bos
    pieces = [tokenizer.encode((tokenizer.bos_token if add_bos and k == 0 else "") + p) for k, p in enumerate(batches)]
    if add_bos:
        pieces = [p[1:] for p in pieces]
    role_len = len(tokenizer.encode("<|im_start|>assistant\n")) - (1 if add_bos else 0)
    labels = []
    for part, piece in zip(batches, pieces):
        if part.startswith("<|im_start|>assistant\n"):
            labels += [IGNORE_INDEX] * role_len + piece[role_len:-1] + [IGNORE_INDEX]
        else:
            labels += [IGNORE_INDEX] * len(piece)
    return [i for p in pieces for i in p], labels


def official_image_tag(conversations):
    """multi_modal_get_item (one image): '<image>\n' in front of conversations[0] unless it holds one, whatever
    its role."""
    convs = [dict(c) for c in conversations]
    if "<image>" not in convs[0]["value"]:
        convs[0]["value"] = "<image>\n" + convs[0]["value"]
    return convs


def official_internvl2_5(conversations, tokenizer, num_image_token_list, system_message, text_only=False):
    """preprocess_internvl2_5 on a record's conversations (no padding, no truncation): (ids, labels). A leading
    system turn's value replaces system_message (the template's); the <image> tags of the human turns only
    become the images' tokens, and there must be one per image (the official assertion)."""
    convs = [dict(c) for c in conversations]
    if convs[0]["from"] == "system":
        system_message, convs = convs[0]["value"], convs[1:]
    if not text_only:
        k = 0
        for c in convs:
            if c["from"] == "human":
                for _ in range(c["value"].count("<image>")):
                    if k == len(num_image_token_list):
                        break
                    tokens = IMG_START + IMG_CONTEXT * num_image_token_list[k] + IMG_END
                    c["value"] = c["value"].replace("<image>", tokens, 1)
                    k += 1
        assert k == len(num_image_token_list), f"{k} != {len(num_image_token_list)}"
    batches = [f"<|im_start|>system\n{system_message}<|im_end|>\n"]
    for c in convs:
        role = {"human": "user", "gpt": "assistant"}[c["from"]]  # official: NotImplementedError
        batches.append(f"<|im_start|>{role}\n{c['value']}<|im_end|>\n")
    return _internvl2_5_turns(tokenizer, batches)


def official_prompt(template, conversations, num_image_token_list, system_message):
    """The prompt preprocess_internlm / preprocess_phi3 / preprocess_mpt tokenise for a record's conversations:
    a first turn that is not the human's is skipped (a 'system' one is not in their role table: KeyError),
    roles must alternate, internlm2-chat strips every value, the template renders (system message, then role +
    message + sep per turn), and the first len(num_image_token_list) <image> tags become the images' tokens."""
    t = get_template(template)
    roles = {"human": t.user, "gpt": t.assistant}
    if roles[conversations[0]["from"]] != t.user:
        conversations = conversations[1:]
    text = t.system_template.format(system_message=system_message) + t.sep
    for j, c in enumerate(conversations):
        assert roles[c["from"]] == (t.user, t.assistant)[j % 2], j
        text += roles[c["from"]] + (c["value"].strip() if t.strip_messages else c["value"]) + t.sep
    for n in num_image_token_list:
        text = text.replace("<image>", IMG_START + IMG_CONTEXT * n + IMG_END, 1)
    return text


def sample_official_labels(record, sample, tokenizer, template, system_message=None, bos_per_round=True,
                           tile_tokens=256):
    """(labels, consistent) of the official procedure for build_sample's output for `record` (<= 1 image);
    system_message None: the template's default; tile_tokens: the model's num_image_token."""
    conv = parse_record(record, template)
    tiles = [len(sample["pixel_values"])] if conv.images else []
    system_message = get_template(template).system_message if system_message is None else system_message
    text, _ = conversation_text(conv, template, tiles, system_message, tile_tokens)
    return official_labels(template, tokenizer, text, sample["input_ids"].tolist(), bos_per_round)


def matches_official(record, sample, tokenizer, template, system_message=None, bos_per_round=True,
                     tile_tokens=256):
    """Whether the sample's labels are exactly the official ones."""
    official, consistent = sample_official_labels(record, sample, tokenizer, template, system_message,
                                                  bos_per_round, tile_tokens)
    return consistent and official == sample["labels"].tolist()
