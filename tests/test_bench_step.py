"""bench/bench_step.py at the tiny preset on CPU: r1vl (fused and materialised loss) and TRL's
GRPOTrainer, one timed step each, through the command line the GPU session runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ["impl", "phase", "device", "tokens_per_s", "seconds", "peak_mem_bytes", "config", "versions"]
PHASES = ["rollout", "reward", "logprob", "update", "step"]
P, G, L = 2, 2, 8  # prompts per step, completions per prompt, forced completion length

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step") / "step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--preset", "tiny", "--device", "cpu",
           "--impls", "r1vl,trl", "--variants", "fused+liger,fused,materialised",
           "--prompts", str(P), "--num-generations", str(G), "--max-new-tokens", str(L), "--micro-batch", "2",
           "--warmup", "0", "--repeats", "1", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:] + p.stdout[-2000:]
    return json.loads(out.read_text()), p.stdout


def _by_job(rows):
    jobs = {}
    for r in rows:
        jobs.setdefault((r["impl"], r["config"]["variant"]), []).append(r)
    return jobs


def test_schema_and_phases(run):
    data, _ = run
    assert list(data) == ["rows"]
    for r in data["rows"]:
        assert list(r) == ROW_KEYS
        assert r["device"].startswith("cpu")
        assert r["peak_mem_bytes"] is None  # CPU: no per-phase allocator peak (said in config)
        assert "peak_mem_note" in r["config"]
        for pkg in ("torch", "transformers", "trl"):
            assert r["versions"][pkg]
    jobs = _by_job(data["rows"])
    assert set(jobs) == {("r1vl", "fused+liger"), ("r1vl", "fused"), ("r1vl", "materialised"), ("trl", "default")}
    # Liger is CUDA-only: reported as skipped with the reason, no numbers
    (skipped,) = jobs[("r1vl", "fused+liger")]
    assert skipped["seconds"] is None and skipped["tokens_per_s"] is None
    assert "Liger" in skipped["config"]["skipped"]
    for job in [("r1vl", "fused"), ("r1vl", "materialised"), ("trl", "default")]:
        rows = jobs[job]
        assert [r["phase"] for r in rows] == PHASES
        by = {r["phase"]: r for r in rows}
        for r in rows:
            assert math.isfinite(r["seconds"]) and r["seconds"] > 0, (job, r["phase"], r["seconds"])
            assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
            assert r["tokens_per_s"] * r["seconds"] == pytest.approx(P * G * L, rel=1e-6)
        # the phases are parts of the step
        parts = sum(by[ph]["seconds"] for ph in PHASES[:-1])
        assert parts <= by["step"]["seconds"] * (1 + 1e-6), (job, parts, by["step"]["seconds"])
        cfg = by["update"]["config"]
        assert (cfg["prompts_per_step"], cfg["num_generations"], cfg["max_completion_length"]) == (P, G, L)
        assert cfg["micro_batch_size"] == 2 and cfg["loss_type"] == "grpo" and cfg["beta"] == 0.04


def test_same_workload_on_both_sides(run):
    data, _ = run
    upd = {(r["impl"], r["config"]["variant"]): r["config"] for r in data["rows"]
           if r["phase"] == "update" and r["seconds"] is not None}
    completion = {k: c["completion_tokens_per_step"] for k, c in upd.items()}
    prompt = {k: c["prompt_tokens_per_step"] for k, c in upd.items()}
    # forced length: every completion has exactly L tokens, on both sides
    assert set(completion.values()) == {P * G * L}, completion
    # same prompts, images and tokenisation
    assert len(set(prompt.values())) == 1, prompt
    assert upd[("trl", "default")]["gradient_checkpointing"] == upd[("r1vl", "fused")]["gradient_checkpointing"]
    assert upd[("trl", "default")]["attn_implementation"] == upd[("r1vl", "fused")]["attn_implementation"]
    # AdamW: both sides run torch's for-loop implementation on CPU (r1vl's auto is fused on CUDA only)
    assert "for-loop" in upd[("trl", "default")]["optimizer"], upd[("trl", "default")]["optimizer"]
    assert "for-loop" in upd[("r1vl", "fused")]["optimizer"], upd[("r1vl", "fused")]["optimizer"]


def test_fused_and_materialised_update_agree(run):
    data, _ = run
    probe = {r["config"]["variant"]: r["config"]["loss_probe"] for r in data["rows"]
             if r["impl"] == "r1vl" and r["phase"] == "update" and r["seconds"] is not None}
    f, m = probe["fused"], probe["materialised"]
    assert abs(f["loss"]) > 1e-3 and f["grad_norm"] > 1e-3  # a point where the head matters
    assert m["loss"] == pytest.approx(f["loss"], rel=1e-4)
    assert m["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-4)
    assert m["kl"] == pytest.approx(f["kl"], rel=1e-4)


def test_table_and_ratios_printed_last(run):
    _, stdout = run
    lines = stdout.strip().splitlines()
    assert "| impl | variant | phase | s | tok/s | peak MiB |" in lines
    ratio_lines = [x for x in lines if x.startswith("r1vl/TRL update")]
    assert {x.split(",")[1].split(":")[0].strip() for x in ratio_lines} == {"fused", "materialised"}
    assert lines[-1].startswith("r1vl/TRL update")


def test_progress_lines_and_a_timed_out_worker(tmp_path):
    """Each finished step is a line on stderr as it happens; a worker cut off by --worker-timeout
    leaves its last lines in the row's error, the verdict last (the table shows that line)."""
    out = tmp_path / "step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--preset", "tiny", "--device", "cpu",
           "--impls", "r1vl", "--variants", "fused", "--prompts", "2", "--num-generations", "2",
           "--max-new-tokens", "8", "--micro-batch", "2", "--warmup", "1", "--repeats", "300",
           "--worker-timeout", "15", "--no-loss-probe", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]  # a failed run
    assert "bench_step:   r1vl:fused: step 1 (warm-up): " in p.stderr and "r1vl:fused: step 2: " in p.stderr
    err = json.loads(out.read_text())["rows"][0]["config"]["error"]
    assert err.startswith("its last lines:\nstep ") and err.endswith("\ntimed out after 15 s"), err[-500:]
    assert "failed: timed out after 15 s" in p.stdout
