"""The engine under a real 2-rank torchrun launch (gloo), as the trainer runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_test_utils import free_port

HERE = Path(__file__).parent


def _torchrun(out_dir: Path, tp: int, timeout: int = 420) -> list[dict]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)  # this pytest process's own one-rank group must not leak in
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(HERE / "dist_worker.py"), str(out_dir), str(tp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"torchrun exited {proc.returncode}:\n{tail}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_tp1(tmp_path):
    r0, r1 = _torchrun(tmp_path, tp=1)
    for r in (r0, r1):
        assert r["world"] == 2 and r["tp"] == 1
        assert r["lp_diff_initial"] < 1e-4 and r["lp_diff_after_update"] < 1e-4
        assert abs(r["is_ratio_mean"] - 1) < 1e-3 and abs(r["is_ratio_max"] - 1) < 1e-3
        assert 0.8 < r["trainer_is_ratio_min"] <= r["trainer_is_ratio_max"] <= 1 + 1e-5
        # from_config pushed the bound policy; wake() pushed it again after the update
        assert r["calls"] == ["load_weights", "generate", "generate", "sleep1", "wake", "load_weights",
                              "generate", "generate", "sleep1"]
    # each rank has its own engine seed: the same prompt and request seed sample differently
    assert r0["samples"] != r1["samples"]
    # the engine's model directory was written once, by rank 0
    assert (tmp_path / "run" / "vllm_engine_model" / "config.json").is_file()
    assert r0["eval_n"] == r1["eval_n"] == 3


@pytest.mark.slow
def test_two_ranks_tp2(tmp_path):
    """One engine sharded over both ranks (tensor parallel): each rank still gets
    the completions of its own prompts, equal to HF's. With per-rank seeds (the trainer's) the
    engine is in sync (each rank had sampled its own token into the shared forward: ratios 1.3 to
    1.5), and an evaluation whose ranks make unequal numbers of generate() calls ends (it hung)."""
    r0, r1 = _torchrun(tmp_path, tp=2)
    for r in (r0, r1):
        assert r["tp"] == 2
        assert r["lp_diff_initial"] < 1e-4 and r["lp_diff_after_update"] < 1e-4
        assert abs(r["is_ratio_mean"] - 1) < 1e-3 and abs(r["is_ratio_max"] - 1) < 1e-3
        assert r["eval_n"] == 3
    assert r0["samples"] != r1["samples"]
