"""bench/bench_memory.py on a synthetic metrics.jsonl (the trainer writes the timeline on CUDA only)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"phase": "warmup", "step": 1, "loss": 1.0}, {"phase": "eval", "after": "warmup", "step": 0}]
    for step in (1, 2, 3):
        mem = [{"phase": "wake", "allocated": 20 * GiB, "reserved": 22 * GiB, "device_used": 30 * GiB},
               {"phase": "sync", "allocated": 20 * GiB, "reserved": 22 * GiB, "device_used": 31 * GiB},
               {"phase": "generate", "allocated": 21 * GiB, "reserved": 23 * GiB, "device_used": (50 + step) * GiB},
               {"phase": "sleep", "allocated": 20 * GiB, "reserved": 22 * GiB, "device_used": 26 * GiB},
               {"phase": "train", "allocated": 40 * GiB, "reserved": (60 + step) * GiB, "device_used": 66 * GiB}]
        recs.append({"phase": "grpo", "step": step, "loss": 0.1, "memory": mem})
    lines = [json.dumps(r) for r in recs] + ['{"phase": "grpo", "step": 4, "mem']  # a killed run's cut line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"world_size": 4, "device": "NVIDIA H100 80GB HBM3"}))
    return run


def test_bench_memory_plots_a_synthetic_timeline(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "res" / "mem.png"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["events"] == 15 and res["steps"] == 3 and res["run"]["world_size"] == 4
    assert list(res["phases"]) == ["wake", "sync", "generate", "sleep", "train"]
    assert res["phases"]["generate"]["device_used_peak_gib"] == 53.0
    assert res["phases"]["train"]["reserved_peak_gib"] == 63.0 and res["phases"]["train"]["count"] == 3
    assert "generate" in r.stdout and "train" in r.stdout


def test_bench_memory_without_timeline_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "grpo", "step": 1, "loss": 0.0}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), str(tmp_path),
                        "--out", str(tmp_path / "m.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "CUDA only" in r.stderr and not (tmp_path / "m.png").exists()


def test_adamw_step_overhead_per_implementation():
    """What optim.impl's default rests on: foreach's step allocates a temporary as large as
    the parameters, fused none (bench/bench_adamw_memory.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_adamw_memory import step_overhead
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    assert step_overhead("foreach", torch.float32, tensors=4, size=256) >= 0.99
    assert step_overhead("fused", torch.float32, tensors=4, size=256) < 0.01  # a few scalars
