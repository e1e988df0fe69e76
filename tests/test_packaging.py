"""What installing r1vl asks of a platform, and what the fused loss asks of the code that imports it.

- Triton and liger-kernel (which needs Triton) have wheels on PyPI for Linux only: setup.py
  requires them there alone, so that `pip install -e .[dev]` (and with it `make train`) resolves
  on macOS (where the trainer runs without them) and Windows (the loss's torch backend). Read
  from the installed metadata (`make venv` reinstalls when setup.py changes).
- `r1vl.kernels` needs torch alone: other GRPO code installs r1vl without its dependencies
  (`pip install --no-deps`, README) next to its own stack.
"""
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import LINUX_ONLY_WHEELS

ROOT = Path(__file__).resolve().parents[1]
LINUX_ONLY = {canonicalize_name(m.replace("_", "-")) for m in LINUX_ONLY_WHEELS}
PLATFORMS = {  # the marker variables a platform sets (the rest: this interpreter's)
    "Linux": dict(platform_system="Linux", sys_platform="linux", os_name="posix"),
    "Darwin": dict(platform_system="Darwin", sys_platform="darwin", os_name="posix"),
    "Windows": dict(platform_system="Windows", sys_platform="win32", os_name="nt"),
}


def _required(system: str, extra: str) -> set[str]:
    """Names of r1vl's requirements that apply on `system` with `extra` ("" for none)."""
    env = {**default_environment(), **PLATFORMS[system], "extra": extra}
    reqs = [Requirement(r) for r in md.requires("r1vl") or []]
    return {canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate(env)}


def _extras() -> list[str]:
    return [""] + (md.metadata("r1vl").get_all("Provides-Extra") or [])


def test_the_metadata_is_read():
    assert {"dev", "liger", "deepspeed", "vllm"} <= set(_extras())
    assert {"torch", "transformers", "triton"} <= _required("Linux", "")


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
def test_linux_only_wheels_are_not_required_elsewhere(system):
    for extra in _extras():
        required = _required(system, extra)
        assert "torch" in required and not required & LINUX_ONLY, (system, extra, sorted(required & LINUX_ONLY))


def test_linux_still_requires_them():
    assert "triton" in _required("Linux", "")
    assert LINUX_ONLY <= _required("Linux", "dev") and "liger-kernel" in _required("Linux", "liger")


def test_deepspeed_is_in_the_dev_extra_on_linux_only():
    """Its source build has failed on macOS; the DeepSpeed tests skip where it is missing."""
    assert "deepspeed" in _required("Linux", "dev") and "deepspeed" not in _required("Darwin", "dev")
    assert "deepspeed" in _required("Darwin", "deepspeed")  # asked for by name: pip tries


KERNEL_USE = """
import sys
import torch
before = {m.split(".")[0] for m in sys.modules}
from r1vl.kernels import FusedLinearGRPOLoss, fused_linear_grpo_loss, linear_logprobs
g = torch.Generator().manual_seed(0)
h = torch.randn(2, 6, 16, generator=g, requires_grad=True)
w = torch.randn(40, 16, generator=g, requires_grad=True)
t = torch.randint(0, 40, (2, 6), generator=g)
m = torch.ones(2, 6)
a = torch.tensor([1.0, -1.0])
with torch.no_grad():
    old = linear_logprobs(h, w, t)
loss, metrics = fused_linear_grpo_loss(h, w, t, m, a, old_logprobs=old, ref_logprobs=old - 0.1, beta=0.04)
loss.backward()
FusedLinearGRPOLoss(loss_type="dapo")(h, w, t, m, a)[0].backward()
assert torch.isfinite(loss) and h.grad is not None and w.grad is not None
new = {m.split(".")[0] for m in sys.modules} - before
print(" ".join(sorted(n for n in new if n not in sys.stdlib_module_names and not n.startswith("_"))))
"""


def test_the_kernels_import_nothing_but_torch():
    """A fresh interpreter that imports torch, then uses the fused loss and log-probs (CPU: the
    torch backend) has imported no third-party module besides r1vl itself."""
    proc = subprocess.run([sys.executable, "-c", KERNEL_USE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["r1vl"], proc.stdout
