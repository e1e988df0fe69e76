"""`python -m r1vl.eval --engine vllm` on the real vLLM CPU backend: the same greedy
completions, scores and outputs file as `--engine hf` on the same checkpoint and items."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_eval_cli_vllm_engine_matches_hf(tiny_tied, tmp_path):
    from r1vl.data.synthetic import prepare_task

    path, _, _ = tiny_tied
    data = tmp_path / "data"
    prepare_task(data, 4, 5, 0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)

    def run(engine):
        outputs = tmp_path / f"{engine}.jsonl"
        r = subprocess.run([sys.executable, "-m", "r1vl.eval", "--model", str(path), "--data", str(data),
                            "--engine", engine, "--limit", "5", "--batch-size", "2", "--max-new-tokens", "8",
                            "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--device", "cpu",
                            "--outputs", str(outputs)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout), [json.loads(x) for x in outputs.read_text().splitlines()], r.stderr

    hf, hf_rows, _ = run("hf")
    vl, vl_rows, err = run("vllm")
    assert "engine = vllm" in err
    assert len(vl_rows) == 5 and [r["index"] for r in vl_rows] == list(range(5))
    assert len({r["completion"] for r in vl_rows}) > 1, "every completion is the same: the check proves little"
    for a, b in zip(hf_rows, vl_rows):
        assert a == b, (a, b)
    for k in ("n", "accuracy", "step_rar", "step_rvr", "reward", "completion_length", "truncated"):
        assert vl[k] == hf[k], k
    # the engine's temporary model directory is removed
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("r1vl-eval-*")
                if p.stat().st_mtime > (tmp_path / "hf.jsonl").stat().st_mtime]


@pytest.mark.slow
def test_eval_cli_vllm_engine_sigterm_removes_its_temporary_model_folder(tiny_tied, tmp_path):
    """SIGTERM once the engine is up: exit 143 with one line, and the engine's temporary model
    folder (config + processor files, r1vl-eval-* in the temporary directory) is removed, as on
    Ctrl-C; SIGTERM's default action left it behind (found by an audit). One that a killed
    evaluation (SIGKILL: no cleanup runs) left on this host is removed as the next one starts."""
    import signal
    import time

    from r1vl.data.synthetic import prepare_task

    path, _, _ = tiny_tied
    data = tmp_path / "data"
    prepare_task(data, 4, 5, 0)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    from r1vl.eval import _work_prefix

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp / f"{_work_prefix(gone.pid)}x1y2z3"  # a killed evaluation's: swept at the next one's start
    (stale / "vllm_engine_model").mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "r1vl.eval", "--model", str(path), "--data", str(data),
                             "--engine", "vllm", "--limit", "5", "--batch-size", "1", "--max-new-tokens", "64",
                             "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            folders = [p for p in tmp.glob("r1vl-eval-*") if p != stale]
            if folders and (folders[0] / "vllm_engine_model" / "config.json").is_file():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(2)  # the engine starts from that folder
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "r1vl.eval: stopped (SIGTERM): no result", err[-3000:]
    assert list(tmp.glob("r1vl-eval-*")) == []  # (the stale one too)
