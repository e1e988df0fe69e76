"""The bench/ scripts' command lines, in-process (seconds): --help gives every flag's
default, a bad argument is one error line and exit code 2 before any work starts, the JSON
names the device and versions, the printed figures match it, and bench/README.md's
commands parse."""
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = ("bench_loss", "bench_step", "bench_share", "bench_memory", "bench_cpu_memory",
           "bench_adamw_memory", "bench_decode", "bench_host", "compile_report", "plot_loss", "gpu_ceilings")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")


def _mod(name):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _exit_code(fn, argv, capsys):
    """(exit code, stderr) of fn(argv), which must raise SystemExit."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code, capsys.readouterr().err


def _blocked(tmp_path):
    """An output path whose folder cannot exist: a file is in the way."""
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile" / "out.json")


def _help_entries(text: str) -> dict[str, str]:
    """'--flag' -> its help paragraph, from argparse's --help output."""
    entries, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            cur = m.group(1)
            entries[cur] = line
        elif cur and line.startswith("   "):
            entries[cur] += " " + line.strip()
        else:
            cur = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_flags_default(script, capsys):
    with pytest.raises(SystemExit) as e:
        _mod(script).main(["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    flags = [f for f in entries if f not in ("-h", "--help")]
    assert flags, script
    undocumented = [f for f in flags if "default" not in entries[f].lower()]
    assert not undocumented, f"{script}: no default in the help of {undocumented}"


def test_bench_step_help_has_no_small_flag(capsys):
    """bench/gpu_session.sh's dry run picks --small if bench_step.py's help mentions it."""
    with pytest.raises(SystemExit):
        _mod("bench_step").main(["--help"])
    out = capsys.readouterr().out
    assert "--small" not in out and "tiny" in out and "--out" in out and "--preset" in out


# ----------------------------------------------------------------------------- bad arguments

LOSS = ["--device", "cpu", "--shapes", "64x300x48", "--impls", "fused_torch", "--reps", "1", "--input-sets", "1"]
SHARE = ["--device", "cpu", "--layers", "1", "--vision-layers", "1", "--vocab", "1100", "--prompts", "1", "--G", "2",
         "--completion", "4", "--image", "56", "--reps", "1"]


OUT, BAD = "{out}", "{bad_out}"   # a fresh path in tmp_path; one whose folder cannot exist
BAD_ARGS = {
    "bench_loss": [
        (LOSS + ["--backends", "foo", "--impls", "fused", "--out", OUT], "--backends"),
        (LOSS + ["--shapes", "64x300", "--out", OUT], "--shapes"),
        (LOSS + ["--shapes", "abc", "--out", OUT], "--shapes"),
        (LOSS + ["--shapes", "64x300x1000", "--out", OUT], "512"),            # would time 512 tokens
        (["--device", "cpu", "--heads", "3b", "--tokens", "48", "--out", OUT], "--heads"),
        (["--device", "cpu", "--heads", "64x300", "--tokens", "-5", "--out", OUT], "--tokens"),
        (LOSS + ["--reps", "-1", "--out", OUT], "--reps"),
        (LOSS + ["--reps", "0", "--out", OUT], "--reps"),                     # was: silently 3
        (LOSS + ["--warmup", "-1", "--out", OUT], "--warmup"),
        (LOSS + ["--device", "foo", "--out", OUT], "--device"),
        (LOSS + ["--targets-at", "12x", "--out", OUT], "--targets-at"),
        (LOSS + ["--impls", "fused_foo", "--out", OUT], "--impls"),
        (LOSS + ["--impls", "fused_torch_c0", "--out", OUT], "--impls"),          # no 0 MiB chunk
        (LOSS + ["--onepass-chunk-mb", "0", "--out", OUT], "--onepass-chunk-mb"),
        (LOSS + ["--onepass-chunk-mb", "1k", "--out", OUT], "--onepass-chunk-mb"),
        (LOSS + ["--torch-variants-at", "some", "--out", OUT], "--torch-variants-at"),
        (LOSS + ["--out", BAD], "--out"),
        (["--device", "cpu", "--out", BAD], "--out"),          # was: a notice line on the variant rows first
        (LOSS + ["--out", OUT, "--png", "{tmp}/p.json"], "--png"),
    ],
    "bench_step": [
        (["--variants", "foo"], "--variants"),
        (["--impls", "r1vl,foo"], "--impls"),
        (["--repeats", "0"], "--repeats"),
        (["--prompts", "-1"], "--prompts"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--micro-batch", "3"], "--micro-batch"),
        (["--num-generations", "1"], "--num-generations"),
        (["--time-budget", "-5"], "--time-budget"),
        (["--out", BAD], "--out"),
        (["--rollout-is", "pass"], "--rollout-is"),  # with TRL (the default --impls)
        (["--impls", "r1vl", "--rollout-is", "update", "--num-iterations", "2"], "--rollout-is"),
        (["--impls", "r1vl", "--rollout-is", "foo"], "--rollout-is"),
    ],
    "bench_share": [
        (SHARE + ["--reps", "0", "--out", OUT], "--reps"),
        (SHARE + ["--attn", "foo", "--out", OUT], "--attn"),
        (SHARE + ["--completion", "1", "--out", OUT], "--completion"),
        (SHARE + ["--out", BAD], "--out"),
    ],
    "bench_memory": [
        (["{tmp}/missing"], "no such file"),                      # was: its own wording, not "error:"
    ],
    "bench_cpu_memory": [
        (["--tokens", "1000", "--hidden", "64", "--vocab", "1000", "--out", OUT], "--tokens"),  # timed 512
        (["--tokens", "100", "--hidden", "64", "--vocab", "1000", "--out", OUT], "--tokens"),   # timed 0
        (["--tokens", "512", "--hidden", "0", "--vocab", "1000", "--out", OUT], "--hidden"),
        (["--tokens", "512", "--hidden", "64", "--vocab", "1000", "--out", BAD], "--out"),
    ],
    "bench_adamw_memory": [
        (["--tensors", "0"], "--tensors"),
        (["--size", "-1"], "--size"),
    ],
    "bench_decode": [
        (["--n", "0"], "--n"),
        (["--max-pixels", "-1"], "--max-pixels"),
        (["--threads", "0"], "--threads"),
    ],
    "bench_host": [
        (["--prompts", "0"], "--prompts"),
        (["--max-pixels", "-1"], "--max-pixels"),
        (["--answers", "x"], "--answers"),
        (["--reward-workers", "0"], "--reward-workers"),
    ],
    "compile_report": [
        (["--tokens", "-1", "--kernels", "objective", "--quick"], "--tokens"),
        (["--kernels", ","], "--kernels"),
        (["--heads", "3b"], "--heads"),
    ],
    "gpu_ceilings": [
        (["--small", "--reps", "0", "--out", OUT], "--reps"),
        (["--small", "--mm", "-5", "--out", OUT], "--mm"),
        (["--small", "--copy-gib", "0", "--out", OUT], "--copy-gib"),         # was: silently the default size
        (["--small", "--device", "foo", "--out", OUT], "--device"),
        (["--small", "--reps", "2", "--out", BAD], "--out"),
    ],
}


@pytest.mark.parametrize("script,argv,word", [(s, a, w) for s, cases in BAD_ARGS.items() for a, w in cases],
                         ids=[f"{s}-{i}-{w.strip('-')}" for s, cases in BAD_ARGS.items()
                              for i, (_, w) in enumerate(cases)])
def test_bad_argument_exits_2_with_one_line(script, argv, word, tmp_path, capsys):
    mod = _mod(script)
    fn = mod.parse_args if script == "bench_step" else mod.main   # bench_step: nothing is built
    argv = [a.format(out=tmp_path / "o.json", bad_out=_blocked(tmp_path), tmp=tmp_path) for a in argv]
    code, err = _exit_code(fn, argv, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "error:" in lines[0] and word in lines[0], (code, err)
    assert not (tmp_path / "o.json").exists()


@NO_CUDA
@pytest.mark.parametrize("script", ["bench_loss", "bench_step", "bench_share", "gpu_ceilings"])
def test_device_cuda_without_cuda_is_an_argument_error(script, tmp_path, capsys):
    mod = _mod(script)
    fn = mod.parse_args if script == "bench_step" else mod.main
    argv = ["--device", "cuda", "--out", str(tmp_path / "o.json")]
    argv += {"bench_loss": ["--shapes", "64x300x48"], "gpu_ceilings": ["--small"]}.get(script, [])
    code, err = _exit_code(fn, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err, err


def test_bench_loss_triton_on_cpu_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = _exit_code(_mod("bench_loss").main, LOSS + ["--backends", "triton", "--impls", "fused",
                                                            "--out", str(tmp_path / "o.json")], capsys)
    assert code == 2 and "TRITON_INTERPRET=1" in err and err.count("\n") == 1, err


def test_compile_report_refuses_the_interpreter_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, err = _exit_code(_mod("compile_report").main, ["--kernels", "objective", "--heads", "2b", "--quick"],
                           capsys)
    assert code == 2 and "TRITON_INTERPRET" in err and err.count("\n") == 1, err


def test_compile_report_checks_its_json_path_before_compiling(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = _mod("compile_report")
    monkeypatch.setattr(mod, "run", lambda *a, **k: pytest.fail("compiled before checking --json"))
    code, err = _exit_code(mod.main, ["--kernels", "objective", "--heads", "2b", "--quick", "--json",
                                      _blocked(tmp_path)], capsys)
    assert code == 2 and "--json" in err and err.count("\n") == 1, err


def _metrics(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    mem = [{"phase": "generate", "allocated": 2**30, "reserved": 2**31, "device_used": 2**32}]
    (run / "metrics.jsonl").write_text(json.dumps({"phase": "grpo", "step": 1, "memory": mem}) + "\n")
    return run


def test_bench_memory_out_must_be_a_png(tmp_path, capsys):
    run = _metrics(tmp_path)
    main = _mod("bench_memory").main
    for out, word in ((tmp_path / "m.json", ".png"), (tmp_path / "noext", ".png"),
                      (Path(_blocked(tmp_path)).with_suffix(".png"), "--out")):
        code, err = _exit_code(main, [str(run), "--out", str(out)], capsys)
        assert code == 2 and word in err and err.count("\n") == 1, (out, err)
    assert not list(tmp_path.glob("noext*")) and not (tmp_path / "m.json").exists()


def _loss_json(tmp_path) -> Path:
    row = dict(impl="fused_torch", device="cpu", hidden=64, vocab=300, tokens=48, dtype="float32", ms_median=1.0,
               peak_mem_bytes=1000, versions={})
    p = tmp_path / "loss.json"
    p.write_text(json.dumps({"rows": [row], "config": {}, "targets": []}))
    return p


def test_plot_loss_draws_an_untimed_row_in_the_memory_panel(tmp_path, capsys):
    """bench_loss.py's reference is measured for its peak only (ms_median null); an auto row
    recorded as an alias has neither: the plot takes the one and skips the other."""
    base = dict(device="cpu", hidden=64, vocab=300, dtype="float32", versions={})
    rows = [dict(base, impl=i, tokens=n, ms_median=ms, peak_mem_bytes=peak)
            for n in (48, 96) for i, ms, peak in (("fused_torch", 1.0, 1000), ("reference", None, 9000))]
    rows.append(dict(base, impl="fused_auto", tokens=48, ms_median=None, peak_mem_bytes=None, alias_of="fused_torch"))
    path = tmp_path / "loss.json"
    path.write_text(json.dumps({"rows": rows, "config": {}, "targets": []}))
    png = tmp_path / "p.png"
    _mod("plot_loss").main([str(path), "--png", str(png), "--impls", "reference"])
    assert png.stat().st_size > 0
    _mod("plot_loss").main([str(path), "--png", str(png), "--impls", "fused_*,reference"])


def test_plot_loss_tells_heads_apart_at_one_token_count(tmp_path, monkeypatch):
    """The GPU plan measures one token count: each line is one point, which a line style cannot
    mark, and both heads had marker "o" in the same colour."""
    import matplotlib.pyplot as plt

    base = dict(device="cpu", dtype="bfloat16", versions={}, tokens=16384, impl="fused_torch", ms_median=1.0,
                peak_mem_bytes=1000)
    path = tmp_path / "loss.json"
    path.write_text(json.dumps({"rows": [dict(base, hidden=1536, vocab=151936), dict(base, hidden=3584, vocab=152064)],
                                "config": {}, "targets": []}))
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    _mod("plot_loss").main([str(path), "--png", str(tmp_path / "p.png")])
    markers = {line.get_label(): line.get_marker() for line in figs[0].axes[0].lines}
    assert len(markers) == 2 and len(set(markers.values())) == 2, markers


def test_plot_loss_bad_inputs_exit_2(tmp_path, capsys):
    good = _loss_json(tmp_path)
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    main = _mod("plot_loss").main
    png = str(tmp_path / "p.png")
    for argv, word in (([str(tmp_path / "missing.json"), "--png", png], "no such file"),
                       ([str(tmp_path / "text.json"), "--png", png], "not a JSON"),
                       ([str(tmp_path / "other.json"), "--png", png], "rows"),
                       ([str(good), "--png", png, "--impls", "foo"], "--impls"),       # was: an empty plot
                       ([str(good), "--png", str(tmp_path / "p.json")], "--png"),
                       ([str(good), "--png", str(Path(_blocked(tmp_path)).with_suffix(".png"))], "--png")):
        code, err = _exit_code(main, argv, capsys)
        assert code == 2 and word in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------- what is written and printed

def test_bench_loss_rows_record_trl_version(tmp_path, capsys):
    """trl_chunked is one of the rows: every row's versions name trl too."""
    out = tmp_path / "loss.json"
    _mod("bench_loss").main(LOSS + ["--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert {"python", "torch", "triton", "liger-kernel", "transformers", "trl", "r1vl"} <= set(row["versions"])
    assert row["device"].startswith("cpu") and (row["hidden"], row["vocab"], row["tokens"]) == (64, 300, 48)


def test_gpu_ceilings_printed_figures_match_the_json(tmp_path, capsys):
    out = tmp_path / "c.json"
    _mod("gpu_ceilings").main(["--small", "--reps", "2", "--mm", "64", "--copy-gib", "0.001", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["config"]["reps"] == 2 and res["mm"]["n"] == 64 and res["device"].startswith("cpu")
    tflops = float(re.search(r"mm:\s+(\S+) TFLOP/s", printed).group(1))
    assert tflops > 0 and abs(tflops - res["mm"]["tflops"]) <= 1e-3 * res["mm"]["tflops"], printed
    tbs = float(re.search(r"copy:\s+(\S+) TB/s", printed).group(1))
    assert tbs > 0 and abs(tbs - res["copy"]["tb_per_s"]) <= 1e-3 * res["copy"]["tb_per_s"], printed


def _fake_workers(fail=None):
    real = subprocess.run

    def run(cmd, **kw):
        if "--worker" not in cmd:  # git rev-parse for versions(): the real one
            return real(cmd, **kw)
        impl = cmd[cmd.index("--worker") + 1]
        if impl == fail:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nMemoryError: out of memory\n")
        row = dict(impl=impl, loss=1.0, ms=1.0, alloc_peak=100 if impl == "fused" else 1000,
                   rss_peak=200 if impl == "fused" else 1000, n_alloc_events=3)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")
    return run


def test_bench_cpu_memory_json_names_device_and_versions(tmp_path, capsys, monkeypatch):
    mod = _mod("bench_cpu_memory")
    monkeypatch.setattr(mod.subprocess, "run", _fake_workers())
    out = tmp_path / "sub" / "cm.json"
    assert mod.main(["--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["device"].startswith("cpu") and d["versions"]["torch"] == torch.__version__
    assert (d["tokens"], d["hidden"], d["vocab"]) == (2048, 512, 151936) and d["passed"] is True
    err = capsys.readouterr().err
    assert err.index("reference: running") < err.index("fused: running")       # progress before each worker


def test_bench_cpu_memory_worker_failure_is_reported(tmp_path, capsys, monkeypatch):
    mod = _mod("bench_cpu_memory")
    monkeypatch.setattr(mod.subprocess, "run", _fake_workers(fail="reference"))
    assert mod.main(["--out", str(tmp_path / "cm.json")]) == 1
    err = capsys.readouterr().err
    assert "reference worker failed" in err and "MemoryError" in err
    assert not (tmp_path / "cm.json").exists()


def test_bench_share_shows_progress(tmp_path, capsys, monkeypatch):
    step = _mod("bench_step")                                  # a narrow model: the 2B's dims take ~20 s here
    monkeypatch.setattr(step, "QWEN2_VL_2B_TEXT", dict(step.QWEN2_VL_2B_TEXT, hidden_size=64, intermediate_size=128,
                                                       num_attention_heads=2, num_key_value_heads=1,
                                                       rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}))
    monkeypatch.setattr(step, "QWEN2_VL_2B_VISION", dict(step.QWEN2_VL_2B_VISION, embed_dim=32, num_heads=2,
                                                         hidden_size=64))
    out = tmp_path / "share.json"
    assert _mod("bench_share").main(SHARE + ["--out", str(out)]) == 0
    cap = capsys.readouterr()
    progress = [x for x in cap.err.splitlines() if x.startswith("bench_share:")]
    assert len(progress) == 6 and "warm-up" in progress[0] and "run 1/1" in progress[1], cap.err
    d = json.loads(out.read_text())
    assert all(r["update_peak_mem_bytes"] is None for r in d["rows"])
    assert "nan" not in cap.out                                # the table prints '-' where the JSON has null


def _readme_commands():
    text = (BENCH / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"python (bench/\w+\.py)(.*)", line)
            if m:
                cmds.append((m.group(1), shlex.split(m.group(2).split("  #")[0].split(" # ")[0])))
    return cmds


def test_readme_commands_parse(tmp_path):
    """Each `python bench/<script>.py ...` in bench/README.md names a script and flags that exist."""
    cmds = _readme_commands()
    assert {c[0] for c in cmds} >= {f"bench/{s}.py" for s in ("bench_loss", "bench_step", "bench_share",
                                                              "compile_report", "plot_loss")}
    for script, argv in cmds:
        mod = _mod(Path(script).stem)
        argv = [a.replace("$OUT", str(tmp_path)) for a in argv]
        mod.build_parser().parse_args(argv)                    # SystemExit(2) on an unknown flag or value


def test_gpu_session_refuses_a_bad_stage_cap(tmp_path):
    """R1VL_CAP_<stage> is checked before any device time is spent (setup not even begun)."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, R1VL_CAP_tests="3m", OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", "bench/gpu_session.sh", "tests"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "R1VL_CAP_tests=3m: expected whole seconds" in r.stderr
    assert not (tmp_path / "out").exists()
    for var in ("R1VL_GPU_BUDGET_S", "R1VL_PYTEST_TIMEOUT"):
        env = dict(os.environ, OUT=str(tmp_path / "out"), **{var: "200s"})
        r = subprocess.run(["bash", "bench/gpu_session.sh", "step"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and f"{var}=200s: expected whole seconds" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_session_stops_pytest_with_sigint_and_keeps_its_junit(tmp_path):
    """A pytest stage that reaches its timeout gets SIGINT, not SIGTERM: pytest then still
    writes its junit XML and -rfEs summary, so the finished tests' results come back.
    The stage's timeout is reached as test_slow runs, whatever pytest's start-up took (5-6 s of
    the 8 s cap this test used to set, on a loaded machine: the stage then ended before any
    test had run): coreutils' timeout keeps its time on SIGALRM, so test_slow sends its parent,
    the stage's timeout, a SIGALRM, which ends the stage as the timer would. The cap (240 s,
    the stage still taking SIGINT at its end) is only a safety net."""
    import os

    slow = tmp_path / "test_slow.py"
    slow.write_text("import os, signal, time\n\ndef test_fast():\n    pass\n\ndef test_fail():\n    assert False\n\n"
                    "def test_slow():\n    with open(f'/proc/{os.getppid()}/comm') as f:\n"
                    "        if f.read().strip() == 'timeout':\n            os.kill(os.getppid(), signal.SIGALRM)\n"
                    "    time.sleep(600)\n")
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, R1VL_WHL_DIR=str(tmp_path / "none"),
               R1VL_GPU_DRYRUN="1", R1VL_TEST_FILES=str(slow), R1VL_CAP_tests="240", R1VL_CAP_tests_cuda_other="1",
               TMPDIR=str(tmp))
    r = subprocess.run(["bash", "bench/gpu_session.sh", "tests"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "BEGIN tests (timeout 240s, then SIGINT)" in r.stdout and "KeyboardInterrupt" in r.stdout
    assert "FAILED" in r.stdout and "test_fail" in r.stdout            # the -rfEs summary was printed
    line = next(x for x in (out / "summary.txt").read_text().splitlines() if x.startswith("tests "))
    assert "TIMEOUT" in line and "1 passed, 1 failed" in line, line
    assert not list(tmp.glob("gpu_session_stages.*"))  # the stages' status file, outside $OUT, removed at exit


def test_bench_decode_measures_the_check(capsys):
    """bench_decode.py times the start-up decode check on images it makes (all of them readable)."""
    mod = _mod("bench_decode")
    assert mod.main(["--n", "8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 rows, 1 per image (640x480 JPEG / 448x448 PNG)" in out and "decode check" in out
    assert "(0 unreadable)" in out and "in 2 thread(s) as the trainer runs it" in out
    assert mod.main(["--n", "8", "--jpeg-size", "1200x900", "--rows-per-image", "2"]) == 0
    assert "8 rows, 2 per image (1200x900 JPEG / 448x448 PNG)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--jpeg-size", "4x"])
    assert "--jpeg-size: expected WxH, e.g. 4000x3000, got '4x'" in capsys.readouterr().err


def test_bench_host_measures_both_cuts(capsys):
    """bench_host.py times the batch, the rope positions, the rewards and the rewards beside the
    batch both ways, after checking they agree."""
    mod = _mod("bench_host")
    assert mod.main(["--prompts", "2", "--generations", "2", "--completion-tokens", "8", "--max-pixels", "12544",
                     "--reps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("build_batch, 2 prompts x 2, 8 completion tokens") and "every micro-batch of 4 equal" in out[0]
    assert out[1].startswith("rope positions of the shared-prompt forward, 1 micro-batches of 4") \
        and "equal on every real token" in out[1]
    assert out[2].startswith("rewards, 4 completions, 3 distinct answers per group") and "totals equal" in out[2]
    assert out[3].startswith("rewards in 2 worker processes and the batch, one after the other: ") \
        and "(4 rows; rewards equal to in-process scoring)" in out[3]


def test_gpu_session_dry_run_never_writes_into_an_interpreter(tmp_path):
    """A dry run from a checkout whose interpreter imports r1vl from another tree (a clone
    sharing a venv) stops at setup: it used to write a finder + .pth into that interpreter's
    site-packages, which sent every later `import r1vl` there to the clone."""
    import os
    import shutil
    import sys
    import sysconfig

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "clone"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(root / "bench" / "gpu_session.sh", repo / "bench")
    shutil.copy(root / "setup.py", repo)
    site = Path(sysconfig.get_paths()["purelib"])
    before = sorted(p.name for p in site.iterdir())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, R1VL_WHL_DIR=str(tmp_path / "none"),
               R1VL_GPU_DRYRUN="1", TMPDIR=str(tmp))
    try:
        r = subprocess.run(["bash", str(repo / "bench" / "gpu_session.sh"), "ceilings"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
        after = sorted(p.name for p in site.iterdir())
    finally:  # a regression must not leave this interpreter importing r1vl from tmp_path
        for name in ("_r1vl_source_finder.py", "r1vl_source.pth"):
            if name not in before:
                (site / name).unlink(missing_ok=True)
    assert r.returncode != 0
    assert "a dry run never writes into an interpreter" in r.stdout + r.stderr
    assert after == before
    assert not list(tmp.glob("gpu_session_stages.*"))  # removed at its exit, a failed setup's too
