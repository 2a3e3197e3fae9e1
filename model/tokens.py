"""The added tokens of a checkpoint's tokenizer files (a small JSON read). The model needs one of them, the
<IMG_CONTEXT> id; data/tokenizer.py reads them all through this same function."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# The InternVL tokens the rest of the toolkit asks for by name.
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    special: bool = True


def read_json(path: str) -> dict:
    """A JSON file's object, or {} when the file does not exist."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_added_tokens(path: str) -> dict[str, AddedToken]:
    """{content: AddedToken} from a checkpoint's tokenizer files, as the slow tokenizer reads them:
    tokenizer_config.json's added_tokens_decoder (with strip flags) wins over added_tokens.json."""
    added = {}
    decoder = read_json(os.path.join(path, "tokenizer_config.json")).get("added_tokens_decoder", {})
    for idx, spec in decoder.items():
        added[spec["content"]] = AddedToken(spec["content"], int(idx), bool(spec.get("lstrip", False)),
                                            bool(spec.get("rstrip", False)), bool(spec.get("special", True)))
    for content, idx in read_json(os.path.join(path, "added_tokens.json")).items():
        if content not in added:
            added[content] = AddedToken(content, int(idx))
    return added
