"""This checkout's kernels/ directory (installed as r1vl.kernels) must not stand in for
Hugging Face's `kernels` package when the repo root is on sys.path (`python -m r1vl.train`
or pytest run from there): transformers imports that package (an optional one up to 5.24,
a dependency from 5.25), and a directory of ours in its place crashed `import
transformers.activations` with "cannot import name 'CUDAProperties' from 'kernels'"."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import kernels
out = {"file": kernels.__file__, "real": getattr(kernels, "REAL", False),
       "version": getattr(kernels, "__version__", None),
       "has_loss": hasattr(kernels, "fused_linear_grpo_loss")}
from r1vl.kernels import fused_linear_grpo_loss, linear_logprobs  # ours, under its own name
out["ours"] = fused_linear_grpo_loss.__module__
import transformers.utils.import_utils as iu
out["transformers_sees_kernels"] = bool(iu.is_kernels_available())
json.dump(out, sys.stdout)
"""


def _probe(extra_path: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:  # after the cwd entry that `python -c` puts first: the shadowing order
        env["PYTHONPATH"] = str(extra_path)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_kernels_package_wins_over_this_directory(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text('__version__ = "0.0.1"\nREAL = True\n')
    out = _probe(site)
    assert Path(out["file"]).resolve() == (site / "kernels" / "__init__.py").resolve()
    assert out["real"] and out["version"] == "0.0.1" and not out["has_loss"]
    assert out["ours"] == "r1vl.kernels.api"


def test_without_hf_kernels_the_name_is_an_empty_module(tmp_path):
    out = _probe(None)
    if not Path(out["file"]).resolve().is_relative_to(ROOT):
        # the interpreter has Hugging Face's kernels installed: the first test covers this case
        assert not out["has_loss"]
        return
    assert Path(out["file"]).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert out["version"] is None and not out["has_loss"] and not out["real"]
    assert out["transformers_sees_kernels"] is False
    assert out["ours"] == "r1vl.kernels.api"
