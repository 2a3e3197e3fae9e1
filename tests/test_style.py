"""The reading bars of the core: lines of at most 110 columns, functions of at most 80 lines, and no reference to
documents a reader of this repository does not have."""
import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
CORE = ["train.py", "checkpoint.py", "convert.py", "lora.py", "chat.py", "evaluate.py", "memory.py", "demo.py",
        "metrics.py", "benchmarks.py", "model/*.py", "data/*.py"]


def core_files():
    files = sorted({p for pattern in CORE for p in REPO.glob(pattern)})
    assert len(files) > 15, files  # the globs still find the core
    return files


def test_core_lines_fit_110_columns():
    long = [f"{p.relative_to(REPO)}:{n}" for p in core_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, long


def test_core_functions_fit_80_lines():
    long = [f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in core_files() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_no_references_to_documents_outside_the_repository():
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md") and ".git" not in p.parts]
    cited = [f"{p.relative_to(REPO)}:{n}" for p in files
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if re.search(r"\bSPEC\b|§", line) and p.name != "test_style.py"]
    assert not cited, cited
