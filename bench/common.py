"""Shared bench helpers: median timing after warm-up, peak memory, JSON output.

Peak memory: on CUDA, the allocator's peak (torch.cuda.max_memory_allocated) above what was allocated when the
measurement started. On CPU there is no allocator counter, so `PeakMemory` counts the bytes of live tensor
storages created inside the block, seen through a torch dispatch mode (forward, backward and recomputation
alike); kernel-internal workspaces are not seen. It slows the ops down, so benches time and measure memory in
separate runs.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_median(fn, repeats: int = 5, warmup: int = 1, device="cpu") -> dict:
    """Run fn() warmup times, then `repeats` timed times; seconds as median, min, max and every run."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs}


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:  # freed since the last op
            self.current -= self.live.pop(key)[1]
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                # a view or in-place result shares an input's storage: new memory only if that was never seen
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak_bytes: the most memory the block held at once, above
    what was allocated when it started."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._mode = _LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
        return False


def gib(n_bytes: float) -> float:
    return n_bytes / 2 ** 30


def environment(device="cpu") -> dict:
    d = torch.device(device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(d),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    if d.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(d)
    elif hasattr(os, "getloadavg"):
        env["load_average_1min"] = os.getloadavg()[0]  # the machine may be shared: read figures as ratios
    return env


def write_json(path: str | None, result: dict) -> None:
    """Print the result as JSON and, with a path, write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
