"""The layout of a training checkpoint, shared by train.py (writes and resumes) and convert.py (reads)."""
import glob
import os
import re

FORMAT = "internvl-train-checkpoint/1"  # meta.json's "format"


def complete_checkpoints(out_dir):
    """[(step, path)] of the complete iter_* checkpoints (renamed, with meta.json), oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "iter_*")):
        m = re.fullmatch(r"iter_(\d+)", os.path.basename(path))
        if m and os.path.exists(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)
