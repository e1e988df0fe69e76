"""The Triton kernels compile for Hopper (sm_90a) with real Triton, here, without a GPU.

The rest of the CPU suite runs the kernels through Triton's interpreter, which accepts
code the compiler rejects (a module-level `X: tl.constexpr = ...` global, for one, which
the interpreter reads and the compiler refuses). bench/compile_report.py compiles every
launcher's kernel through Triton's JIT path with a compile-only driver; this test runs
it, in a process without TRITON_INTERPRET, and checks what the compiler made."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _have_tools():
    try:
        import triton
    except ImportError:
        return False
    base = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((base / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm"))


pytestmark = pytest.mark.skipif(not _have_tools(), reason="this Triton has no bundled NVIDIA tools")


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")        # compile, not a cache hit
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--quick",
                        "--heads", "2b", "--dtypes", "bf16,fp32", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["arch"] == "sm_90"
    rows = rep["rows"]
    kinds = {(x["kernel"], x.get("dtype")) for x in rows}
    for k in ("fwd", "bwd"):
        assert {(k, "bf16"), (k, "fp32")} <= kinds
    assert {"objective", "row_stats", "row_grad"} <= {x["kernel"] for x in rows}
    for x in rows:
        assert x["error"] is None, x
        assert x["fits"], x                                 # shared memory and registers allow a CTA
        assert x["regs"] > 0 and x["n_instructions"] > 0
    for x in rows:
        if x["kernel"] in ("fwd", "bwd") and x["dtype"] == "bf16":
            # the head GEMMs run on Hopper's warpgroup MMA, fed by pipelined async copies
            # (fp32 inputs take exact IEEE dots on the CUDA cores: correctness, not speed)
            assert x["sass"]["HGMMA"] > 0, x
            assert x["sass"]["LDGSTS"] > 0, x
            assert not x["spills"], x                       # the default configs keep to registers
        if x["kernel"] == "bwd":
            assert x["sass"]["ATOMG"] + x["sass"]["RED"] + x["sass"]["REDG"] > 0, x   # dW/db atomics
    assert "| fwd | 2b | bf16 |" in r.stdout
