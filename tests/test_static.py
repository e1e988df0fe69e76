"""Static checks over every Python file in the repo (pyflakes): an undefined name or a dead
import. The CUDA-only paths (tests marked cuda, bench/ on a GPU, vLLM on CUDA) never run on
this CPU machine, so a misspelt name there would otherwise surface only in a device session."""
import io
from pathlib import Path

from pyflakes import api as pyflakes_api  # the dev extra
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("r1vl", "kernels", "bench", "tests")


def _python_files() -> list[Path]:
    files = [ROOT / "setup.py"]
    for d in DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_the_walk_sees_the_code():
    names = {p.relative_to(ROOT).as_posix() for p in _python_files()}
    assert {"r1vl/train.py", "kernels/triton_grpo.py", "bench/bench_step.py",
            "tests/test_kernels_cuda.py", "tests/vllm_suite/conftest.py"} <= names


def test_pyflakes_finds_nothing():
    out, err = io.StringIO(), io.StringIO()
    n = sum(pyflakes_api.checkPath(str(p), Reporter(out, err)) for p in _python_files())
    report = (out.getvalue() + err.getvalue()).replace(str(ROOT) + "/", "")
    assert n == 0 and not report, report


def test_the_check_would_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    return undefined_name\n")
    out, err = io.StringIO(), io.StringIO()
    assert pyflakes_api.checkPath(str(bad), Reporter(out, err)) == 2
    assert "undefined_name" in out.getvalue() and "'os' imported but unused" in out.getvalue()
