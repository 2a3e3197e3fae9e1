"""tools/wheelhouse.py: what it downloads and how, offline (a fake pip report); the real run needs the network
and is done by hand (see the module docstring)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import wheelhouse  # noqa: E402


def _pkg(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


# The shape of `pip install --dry-run --report`: torch with its own dependencies (some through extras, one
# for another platform), and the project's packages, some sharing a dependency with torch.
REPORT = {"install": [
    _pkg("deepspeed", "0.19.8", "torch", "pydantic>=2", "numpy", "packaging"),
    _pkg("bitsandbytes", "0.50.2", "torch<3,>=2.3", "numpy>=1.17", "packaging>=20.9"),
    _pkg("torch", "2.14.1", "filelock", "typing-extensions>=4.10", "sympy>=1.13.3",
         "cuda-toolkit[cublas,cudart]==13.0.3; platform_system == 'Linux'",
         "optree>=0.13; extra == 'optree'", "pywin32; sys_platform == 'win32'"),
    _pkg("cuda-toolkit", "13.0.3", "nvidia-cublas==13.*; extra == 'cublas'",
         "nvidia-cuda-runtime==13.*; extra == 'cudart'", "nvidia-cufft==12.*; extra == 'cufft'"),
    _pkg("nvidia-cublas", "13.1"), _pkg("nvidia-cuda-runtime", "13.0"), _pkg("nvidia-cufft", "12.0"),
    _pkg("sympy", "1.14", "mpmath<1.4"), _pkg("mpmath", "1.3"), _pkg("filelock", "4.3"),
    _pkg("typing_extensions", "4.16"), _pkg("pydantic_core", "2.50"),
    _pkg("pydantic", "2.14", "typing-extensions>=4.6", "pydantic-core==2.50"),
    _pkg("numpy", "2.4.6"), _pkg("packaging", "26.4"), _pkg("tiktoken", "0.14", "regex"),
    _pkg("regex", "2026.1"),
]}


def test_what_the_requirements_need_less_torch_and_its_own_dependencies():
    reqs = ["deepspeed>=0.14", "bitsandbytes>=0.43", "tiktoken", "numpy>=1.22"]
    pins = wheelhouse.to_download(REPORT, reqs, "3.12", "manylinux_2_28_x86_64")
    # typing_extensions: torch has one, pydantic may need a newer one; deepspeed is built, not downloaded
    assert pins == ["bitsandbytes==0.50.2", "numpy==2.4.6", "packaging==26.4", "pydantic==2.14",
                    "pydantic_core==2.50", "regex==2026.1", "tiktoken==0.14", "typing_extensions==4.16"]
    skip = frozenset({"numpy"})
    assert "numpy==2.4.6" not in wheelhouse.to_download(REPORT, reqs, "3.12", "manylinux_2_28_x86_64", skip)
    with pytest.raises(ValueError, match="no sentencepiece"):
        wheelhouse.to_download(REPORT, reqs + ["sentencepiece"], "3.12", "manylinux_2_28_x86_64")


def test_requirements_are_read_from_the_file_without_torch(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ntorch>=2.5  # note\n\ndeepspeed>=0.14\nbitsandbytes>=0.43  # NF4\ntiktoken\n")
    assert wheelhouse.read_requirements(str(req)) == ["deepspeed>=0.14", "bitsandbytes>=0.43", "tiktoken"]
    real = wheelhouse.read_requirements(os.path.join(ROOT, "requirements.txt"))
    assert "deepspeed>=0.14" in real and not any(r.startswith("torch") for r in real)


def test_a_manylinux_target_accepts_older_tags():
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_24_x86_64" in tags  # bitsandbytes' tag
    assert "manylinux2014_x86_64" in tags and "manylinux1_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert wheelhouse.platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_commands():
    """Binary wheels only, for the target Python and platform; deepspeed built from source without deps; the
    resolver sees the built deepspeed wheel (--find-links) and installs nothing (--dry-run)."""
    flags = wheelhouse.target_flags("3.12", "manylinux_2_28_x86_64")
    assert flags[:4] == ["--only-binary", ":all:", "--python-version", "3.12"]
    assert flags.count("--platform") == len(wheelhouse.platform_tags("manylinux_2_28_x86_64"))
    build = wheelhouse.build_deepspeed_command("deepspeed>=0.14", "W")
    assert build[1:] == ["-m", "pip", "wheel", "--no-deps", "--wheel-dir", "W", "deepspeed>=0.14"]
    resolve = wheelhouse.resolve_command(["deepspeed>=0.14", "numpy"], "3.12", "manylinux_2_28_x86_64", "W",
                                         "R.json", "T")
    for part in (["install", "--dry-run", "--ignore-installed"], ["--report", "R.json"], ["--target", "T"],
                 ["--find-links", "W"], flags, ["deepspeed>=0.14", "numpy"]):
        assert any(resolve[i:i + len(part)] == part for i in range(len(resolve))), part
    download = wheelhouse.download_command(["numpy==2.4.6"], "3.12", "manylinux_2_28_x86_64", "W")
    assert download[3:7] == ["download", "--no-deps", "--dest", "W"] and download[-1] == "numpy==2.4.6"
    assert download[7:-1] == flags
