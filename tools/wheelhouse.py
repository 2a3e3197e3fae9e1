"""Collect, where the network is, every wheel the project needs besides torch, for an offline install.

    python3 tools/wheelhouse.py DIR --python 3.12 --platform manylinux_2_28_x86_64     # with network
    pip install --no-index --find-links DIR -r requirements.txt                         # on the node

The node is expected to have torch (with its own dependencies: CUDA libraries, triton, sympy, ...)
installed, so those are left out. deepspeed publishes only a source archive: its wheel is built here
once (pure Python, no ops: DS_BUILD_OPS=0; nothing is compiled at run time either, see ds_zero*.json).
The other requirements and their dependencies are resolved for the target Python and platform by pip
itself (a dry-run install report) and downloaded as binary wheels. Prints the folder's size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDED = "torch"  # installed on the node with its dependencies; never downloaded


def read_requirements(path: str) -> list[str]:
    """The requirement lines of `path` (comments and blank lines dropped), torch left out."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and canonicalize_name(Requirement(line).name) != PROVIDED:
                out.append(line)
    return out


def platform_tags(platform: str) -> list[str]:
    """A manylinux target accepts every older manylinux tag of its architecture (pip takes the list as given):
    manylinux_2_28_x86_64 -> manylinux_2_28_x86_64, ..., manylinux_2_17_x86_64, manylinux2014_x86_64, ..."""
    if not platform.startswith("manylinux_2_"):
        return [platform]
    minor, arch = platform[len("manylinux_2_"):].split("_", 1)
    tags = [f"manylinux_2_{m}_{arch}" for m in range(int(minor), 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for m, name in legacy.items() if m <= int(minor)]


def target_flags(python: str, platform: str) -> list[str]:
    flags = ["--only-binary", ":all:", "--python-version", python]
    for tag in platform_tags(platform):
        flags += ["--platform", tag]
    return flags


def build_deepspeed_command(requirement: str, wheel_dir: str) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", wheel_dir, requirement]


def resolve_command(requirements: list[str], python: str, platform: str, wheel_dir: str, report: str,
                    target: str) -> list[str]:
    """pip's own resolver for the target, without installing: the dependencies and their pinned versions."""
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", report, "--target", target, "--find-links", wheel_dir,
            *target_flags(python, platform), *requirements]


def download_command(pins: list[str], python: str, platform: str, wheel_dir: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", wheel_dir,
            *target_flags(python, platform), *pins]


def target_environment(python: str, platform: str) -> dict:
    """Marker values of the node (PEP 508), for evaluating requirements there."""
    arch = platform.split("_", 3)[3] if platform.startswith("manylinux_") else platform.rsplit("_", 1)[-1]
    return {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": arch}


def to_download(report: dict, requirements: list[str], python: str, platform: str,
                skip: frozenset[str] = frozenset()) -> list[str]:
    """`name==version` of what the requirements need on the target, by pip's resolution: the requirements and
    everything they pull in (extras and markers evaluated for the target), not descending into torch (the
    node's) nor into `skip` (what else the node has), less deepspeed (built here). A package torch needs as
    well (typing-extensions) is kept: the others may need a newer one than the node's."""
    env = target_environment(python, platform)
    meta = {canonicalize_name(p["metadata"]["name"]): p["metadata"] for p in report["install"]}
    needed, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == PROVIDED or name in skip or (name, frozenset(req.extras)) in needed:
            continue
        if name not in meta:
            raise ValueError(f"pip's resolution has no {req.name}: the report does not match the requirements")
        needed.add((name, frozenset(req.extras)))
        for line in meta[name].get("requires_dist") or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in {"", *req.extras}):
                todo.append(dep)
    keep = sorted({name for name, _ in needed} - {"deepspeed"})
    return [f"{meta[n]['name']}=={meta[n]['version']}" for n in keep]


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder for the wheels (created)")
    p.add_argument("--python", default="3.12", help="the node's Python, major.minor (default 3.12)")
    p.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="the node's platform tag (default manylinux_2_28_x86_64)")
    p.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
    p.add_argument("--skip", default="", help="comma-separated packages the node already has besides torch "
                                              "(e.g. numpy,pillow: 24 MB less)")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    requirements = read_requirements(args.requirements)
    deepspeed = [r for r in requirements if canonicalize_name(Requirement(r).name) == "deepspeed"]
    for r in deepspeed:  # pure Python without its ops: the same wheel for every platform
        run(build_deepspeed_command(r, args.dir), env={"DS_BUILD_OPS": "0"})
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        target = os.path.join(tmp, "t")
        run(resolve_command(requirements, args.python, args.platform, args.dir, report, target))
        skip = frozenset(canonicalize_name(n) for n in args.skip.split(",") if n)
        pins = to_download(json.load(open(report)), requirements, args.python, args.platform, skip)
    run(download_command(pins, args.python, args.platform, args.dir))
    wheels = sorted(f for f in os.listdir(args.dir) if f.endswith(".whl"))
    print(f"{len(wheels)} wheels in {args.dir}: {folder_mb(args.dir):.1f} MB")
    print(f"on the node, torch installed: pip install --no-index --find-links {args.dir} -r requirements.txt")


if __name__ == "__main__":
    main()
