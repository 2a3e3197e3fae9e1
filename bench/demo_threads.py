"""How fast are the demo's training steps with 1 or 2 torch threads, alone and beside busy processes?

    python3 bench/demo_threads.py --steps 60 --threads 1 2 --busy 0 1 --repeats 2

Each run is `python train.py --max-steps STEPS` (the embedded demo) with OMP_NUM_THREADS set; the figure is
the sum of metrics.jsonl's per-step seconds (start-up and evaluation left out). `--busy K` starts K processes
that spin a core each for the length of the run (a laptop doing something else). Runs are interleaved (repeat, busy,
threads), so a change in the machine's load between them touches every setting alike: on a shared machine
read the ratios, not the seconds. Prints JSON (and writes it with --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from demo import make_demo  # noqa: E402

SPIN = "while True: pass"


def demo_steps_seconds(steps: int, threads: int | None, out: str, demo_files: str) -> float:
    """`demo_files`: the demo's base and data, written once and copied in (train.py uses them as they are)."""
    shutil.copytree(demo_files, os.path.join(out, "demo"))
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--max-steps", str(steps), "--save-steps",
                    str(steps), "--output-dir", out], cwd=ROOT, env=env, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return sum(json.loads(line)["seconds"] for line in f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="0: leave OMP_NUM_THREADS unset")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning background processes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    runs = {(b, t): [] for b in args.busy for t in args.threads}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        demo_files = os.path.dirname(make_demo(os.path.join(tmp, "demo_files", "demo"))[0])
        for r in range(args.repeats):
            for busy in args.busy:
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
                try:
                    for t in args.threads:
                        out = os.path.join(tmp, f"r{r}_b{busy}_t{t}")
                        runs[busy, t].append(demo_steps_seconds(args.steps, t or None, out, demo_files))
                finally:
                    for s in spinners:
                        s.kill()
                        s.wait()
    result = {"steps": args.steps, "cores": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "runs": [{"busy": b, "threads": t or "unset", "seconds": [round(s, 2) for s in v],
                        "median_s": round(statistics.median(v), 2)} for (b, t), v in runs.items()]}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
