"""bench/bench_loss.py end to end at a tiny CPU shape: the JSON schema the issue asks for,
one row per backend and peer, and the same loss value from every GRPO implementation
(the rows time the same objective on the same inputs)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.needs("triton", "liger_kernel")
def test_bench_loss_tiny_cpu(tmp_path):
    out = tmp_path / "loss.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "bench/bench_loss.py", "--device", "cpu", "--dtype", "float32",
         "--shapes", "64x300x48", "--backends", "torch,triton", "--reps", "2", "--warmup", "1",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    peers = ("reference", "liger_chunked") + (("trl_chunked",) if importlib.util.find_spec("trl") else ())
    for impl in ("fused_torch", "fused_triton", "logprobs_torch", "logprobs_triton", *peers, "floor", "floor_fwd"):
        r = rows[impl]
        assert {"impl", "device", "hidden", "vocab", "tokens", "dtype", "ms_median",
                "peak_mem_bytes", "versions"} <= set(r)
        assert (r["hidden"], r["vocab"], r["tokens"], r["dtype"]) == (64, 300, 48, "float32")
        assert r["ms_median"] > 0 and math.isfinite(r["ms_median"]), impl
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    losses = [rows[i]["loss_value"] for i in ("fused_torch", "fused_triton", *peers)]
    assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0])), losses
    assert "targets" in data and "floor" in proc.stdout
    assert data["triton_autotune"] == {}            # the interpreter runs fixed blocks, no autotuner


@pytest.mark.needs("triton")
def test_autotune_choices_reads_the_forward_autotuner(monkeypatch):
    """What bench_loss.py records of the compiled forward's autotuning (on the GPU)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_loss
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import r1vl.kernels.triton_grpo as tg

    class Tuned:
        cache = {(151936, 1536, False, False, "torch.bfloat16"): "BLOCK_M: 64, FLAT: True, num_warps: 4"}

    monkeypatch.setattr(tg, "_FWD_TUNED", [Tuned()])
    assert bench_loss.autotune_choices() == {
        "(151936, 1536, False, False, 'torch.bfloat16')": "BLOCK_M: 64, FLAT: True, num_warps: 4"}
    monkeypatch.setattr(tg, "_FWD_TUNED", [])
    assert bench_loss.autotune_choices() == {}
