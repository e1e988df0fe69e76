"""bench/bench_step.py at the tiny preset on CPU: r1vl (fused and materialised loss) and TRL's
GRPOTrainer, one timed step each, through the command line the GPU session runs."""
import json
import math
import signal
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
        # median and minimum per phase; the run was not cut short
        for r in rows:
            c = r["config"]
            assert c["seconds_min"] == min(c["seconds_per_repeat"]) and len(c["seconds_per_repeat"]) == 1
            assert c["timed_steps"] == 1 and "cut_short" not in c and "warmup_only" not in c
            assert "their mean" in c["statistic"]
        assert set(cfg["tf32"]) >= {"cuda.matmul.allow_tf32", "cudnn.allow_tf32"}


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


def test_rollout_is_pass_and_in_update_run_the_same_step(tmp_path):
    """--rollout-is pass / update: the trainer's two ways to take the rollout IS correction
    (a no-grad pass of its own, or the ratio formed in the update's forward), timed in their
    phases; the same step results (ratio, loss, KL) either way."""
    out = {}
    for mode in ("pass", "update"):
        path = tmp_path / f"{mode}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--preset", "tiny", "--device", "cpu",
               "--impls", "r1vl", "--variants", "fused", "--prompts", str(P), "--num-generations", str(G),
               "--max-new-tokens", str(L), "--micro-batch", "2", "--warmup", "0", "--repeats", "1",
               "--no-loss-probe", "--rollout-is", mode, "--out", str(path)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        rows = json.loads(path.read_text())["rows"]
        assert [r["phase"] for r in rows] == PHASES
        c = rows[-1]["config"]
        assert c["rollout_is"] == mode and (("no-grad pass" in c["rollout_is_path"]) == (mode == "pass"))
        assert f"fused, IS {mode} | step |" in p.stdout
        out[mode] = c["train_metrics_per_step"]
    assert out["pass"] == out["update"] and out["pass"][0]["is_ratio_mean"] == pytest.approx(1.0)


def test_table_and_ratios_printed_last(run):
    _, stdout = run
    lines = stdout.strip().splitlines()
    assert "| impl | variant | phase | s (median) | s (min) | tok/s | peak MiB |" in lines
    ratio_lines = [x for x in lines if x.startswith("r1vl/TRL update")]
    assert {x.split(",")[1].split(":")[0].strip() for x in ratio_lines} == {"fused", "materialised"}
    assert lines[-1].startswith("r1vl/TRL update")


def test_sigterm_keeps_the_finished_steps(tmp_path):
    """Each finished step is a line on stderr as it happens and is saved by the worker (its
    result file, rewritten after every step); SIGTERM to the driver (the GPU session's stage
    timeout) kills the worker and writes the rows of the steps it finished."""
    out, work = tmp_path / "step.json", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--preset", "tiny", "--device", "cpu",
           "--impls", "r1vl", "--variants", "fused", "--prompts", "2", "--num-generations", "2",
           "--max-new-tokens", "8", "--micro-batch", "2", "--warmup", "1", "--repeats", "300",
           "--no-loss-probe", "--workdir", str(work), "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    try:
        for line in p.stderr:
            err.append(line)
            if "r1vl:fused: step 3: " in line:
                break
        else:
            pytest.fail("".join(err)[-3000:])
        saved = json.loads((work / "result_r1vl_fused.json").read_text())     # the worker's own file
        assert saved["partial"] is True and len(saved["steps"]) >= 3 and saved["impl_config"]["variant"] == "fused"
        p.send_signal(signal.SIGTERM)
        stdout, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(err) + rest
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "r1vl:fused: step 1 (warm-up): " in err and "terminated (SIGTERM)" in err
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == PHASES
    c = rows[0]["config"]
    assert c["timed_steps"] >= 2 and len(c["seconds_per_repeat"]) == c["timed_steps"]
    assert c["cut_short"].startswith("terminated (SIGTERM to bench_step.py): ") and " of 301 steps" in c["cut_short"]
    assert "error" not in c and all(r["seconds"] > 0 for r in rows)
    assert "fused (" in stdout and "of 300 timed steps)" in stdout        # the table marks a cut run


# ----------------------------------------------------------------------------- the driver's side, with a stand-in worker

FAKE_WORKER = r"""
import json, os, sys, time
from pathlib import Path
job = sys.argv[sys.argv.index("--worker") + 1]
work = Path(sys.argv[sys.argv.index("--workdir") + 1])
how, n = job.split(":")
path = work / f"result_{how}_{n}.json"
steps = []
for i in range(int(n)):
    time.sleep(0.4)
    secs = {"rollout": 0.1, "reward": 0.1, "logprob": 0.1, "update": 0.1, "step": 0.4}
    steps.append({"seconds": secs, "peak": {}, "extra": {"completion_tokens": 8, "prompt_tokens": 20},
                  "t_end": time.time()})
    res = {"steps": steps, "impl_config": {"variant": "fake"}, "partial": True}
    tmp = path.with_name(".tmp_" + path.name)
    tmp.write_text(json.dumps(res))
    os.replace(tmp, path)
    print(f"step {i + 1}: 0.40 s", file=sys.stderr, flush=True)
if how == "crash":
    sys.exit(3)
if how == "hang":
    time.sleep(600)
res.pop("partial")
path.write_text(json.dumps(res))
"""

A = dict(preset="tiny", prompts=1, num_generations=2, max_new_tokens=4, micro_batch=2, num_iterations=1, beta=0.04,
         epsilon=0.2, loss_type="grpo", temperature=1.0, top_p=1.0, top_k=0, lr=1e-6, min_pixels=1, max_pixels=1,
         attn="sdpa", attn_resolved="sdpa", reward_workers=0, seed=0, dtype="float32", warmup=1, repeats=5)
META = {"device": "cpu (test)", "slug": "cpu", "model": {}, "versions": {}}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(bench_step, "__file__", str(script))   # _spawn runs this file as the worker
    monkeypatch.setattr(bench_step, "POLL_S", 0.1)
    return bench_step, tmp_path


def test_a_timed_out_worker_keeps_its_finished_steps(fake):
    bs, work = fake
    res = bs._spawn("hang:4", work, 8.0, warmup=1, total=6)
    assert [s["seconds"]["step"] for s in res["steps"]] == [0.4] * 4 and "error" not in res
    assert res["cut_short"] == "timed out after 8 s: 4 of 6 steps finished (1 warm-up)"
    assert 0 < res["first_timed_s"] < res["wall_s"] < 15
    rows = bs.job_rows("r1vl", "fused", res, A, META)
    assert [r["phase"] for r in rows] == PHASES and rows[0]["config"]["timed_steps"] == 3
    assert "3 of 5 timed steps" in bs.table(rows)
    assert (work / "log_hang_4.txt").read_text().count("step ") == 4


def test_a_worker_cut_off_before_its_first_timed_step(fake):
    bs, work = fake
    res = bs._spawn("hang:1", work, 3.0, warmup=1, total=6)        # only the warm-up step finished
    assert res["error"].endswith("timed out after 3 s before its first timed step"), res["error"]
    rows = bs.job_rows("trl", "default", res, A, META)
    assert [r["phase"] for r in rows] == PHASES
    assert rows[0]["config"]["timed_steps"] == 0 and "warm-up" in rows[0]["config"]["warmup_only"]
    assert "(warm-up step only)" in bs.table(rows)
    res = bs._spawn("hang:0", work, 1.5, warmup=1, total=6)        # nothing at all: one error row, verdict last
    assert res["error"].startswith("its last lines:") and res["error"].endswith("\ntimed out after 2 s")
    (row,) = bs.job_rows("trl", "default", res, A, META)
    assert row["seconds"] is None and "timed out" in bs.table([row])


def test_a_crashed_worker_keeps_its_steps_and_fails(fake):
    bs, work = fake
    res = bs._spawn("crash:3", work, 30.0, warmup=1, total=6)
    assert len(res["steps"]) == 3 and res["error"].startswith("exit code 3")
    assert res["cut_short"].startswith("exit code 3: 3 of 6 steps")
    res = bs._spawn("done:2", work, 30.0, warmup=1, total=2)       # a whole run: no cut_short
    assert len(res["steps"]) == 2 and "cut_short" not in res and "partial" not in res


def test_a_run_stops_early_to_leave_the_next_its_time(fake):
    """With a budget, a run that has its timed step stops once going on would leave the next
    run less than NEXT_RUN_FACTOR x its own time to its first timed step."""
    bs, work = fake
    res = bs._spawn("hang:50", work, 6.0, warmup=1, total=51, reserve=3.0)
    first = res["first_timed_s"]
    assert res["cut_short"].startswith("stopped after ") and "error" not in res
    # it stops at the first poll where the next step would end after 6 s - 3 x first (at once, if
    # that is already past when its first timed step ends)
    assert len(res["steps"]) >= 2 and res["wall_s"] <= max(first, 6.0 - 3.0 * first) + 1.0, (res["wall_s"], first)
    # the rule itself
    t0, steps = 100.0, [{"t_end": 101.0, "seconds": {"step": 1.0}}, {"t_end": 102.0, "seconds": {"step": 1.0}}]
    assert not bs._stop_for_next(steps[:1], 1, t0, 110.0, 1.5)          # no timed step yet: never
    assert not bs._stop_for_next(steps, 1, t0, 106.0, 1.5)              # next step ends 103 <= 106 - 3
    assert bs._stop_for_next(steps, 1, t0, 105.5, 1.5)                  # 103 > 105.5 - 3


def test_a_steps_peak_memory_is_its_own(fake):
    """On CUDA each step's peak starts at the step: it folded in the peak since the last phase,
    i.e. the previous step's update (the first timed step inherited the warm-up's autotuning)."""
    bs, _ = fake
    alloc = {"now": 0, "peak": 0}

    class FakeCuda:
        @staticmethod
        def synchronize(device):
            pass

        @staticmethod
        def max_memory_allocated(device):
            return alloc["peak"]

        @staticmethod
        def reset_peak_memory_stats(device):
            alloc["peak"] = alloc["now"]

    def use(n):  # allocate n, then free it
        alloc["now"] += n
        alloc["peak"] = max(alloc["peak"], alloc["now"])
        alloc["now"] -= n

    clock = bs.PhaseClock(type("Dev", (), {"type": "cuda"})())
    clock.torch = type("FakeTorch", (), {"cuda": FakeCuda})
    clock.begin_step()
    with clock.phase("update"):
        use(100)
    clock.end_step()
    use(70)  # between steps (the driver's own work)
    clock.begin_step()
    with clock.phase("rollout"):
        use(20)
    st = clock.end_step()
    assert clock.steps[0]["peak"]["step"] == 100 and st["peak"] == {"rollout": 20, "step": 20}
