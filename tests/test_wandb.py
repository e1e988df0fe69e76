"""logging.wandb=true: what the trainer hands W&B (a recording stand-in for the wandb module),
the resumed run continuing the same W&B run, the exit code on an interrupted run, clear
errors when W&B cannot start, and one real offline run through the installed wandb."""
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from r1vl.config import load_config, to_dict
from r1vl.train import WANDB_ID_FILE, main
from test_train import _args, _metrics

WB = ["logging.wandb=true", "logging.wandb_project=proj"]


class _Run:
    def __init__(self, calls, kw):
        self.calls, self.kw = calls, kw
        self.id = kw["id"]
        self.settings = types.SimpleNamespace(mode=kw.get("mode") or "online")
        self.summary = {}
        self.logged = []
        self.defined = []
        self.finished = []

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, data):
        if self.calls.get("raise_on_log") and any(k.startswith("grpo/") for k in data):
            raise KeyboardInterrupt
        self.logged.append(dict(data))

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


def _fake_wandb(monkeypatch, init_error=None):
    calls = {"runs": []}
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kw):
        if init_error is not None:
            raise init_error
        run = _Run(calls, kw)
        calls["runs"].append(run)
        return run
    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_records_config_summary_and_exit_code(tmp_path, data_dir, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    out = tmp_path / "myrun"
    args = _args(out, data_dir, "train.max_steps=2", *WB)
    assert main(args) == 0
    (run,) = calls["runs"]
    kw = run.kw
    assert kw["project"] == "proj" and kw["name"] == "myrun" and kw["dir"] == str(out)
    assert kw["mode"] is None and kw["resume"] == "allow"
    assert kw["id"] == (out / "wandb" / WANDB_ID_FILE).read_text().strip() and len(kw["id"]) == 8
    assert kw["config"] == json.loads(json.dumps(to_dict(load_config(out / "config.yaml"))))
    # one W&B record per metrics.jsonl record, the same numbers, each on its phase's step axis
    recs = _metrics(out)
    assert len(run.logged) == len(recs) == 6
    for rec, data in zip(recs, run.logged):
        ph = rec["phase"]
        assert data[f"{ph}/step"] == rec["step"]
        nums = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in ("step", "wall_time")}  # W&B keeps its own time
        assert nums and {f"{ph}/{k}": v for k, v in nums.items()} == {k: v for k, v in data.items()
                                                                     if k != f"{ph}/step"}
    assert ("grpo/*", "grpo/step") in run.defined and ("warmup/*", "warmup/step") in run.defined
    summary = json.loads((out / "summary.json").read_text())
    assert run.summary["accuracy_final"] == summary["accuracy_final"]
    assert run.summary["data/train_rows"] == summary["data"]["train_rows"] == 60
    assert run.finished == [0]


def test_resumed_run_continues_the_wandb_run(tmp_path, data_dir, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=1", "train.save_every=1", *WB)) == 0
    assert main(_args(out, data_dir, "train.max_steps=2", "train.save_every=1", "train.resume=true", *WB)) == 0
    first, second = calls["runs"]
    assert second.kw["id"] == first.kw["id"]
    # a fresh run into the same output_dir (overwrite) is a new W&B run
    assert main(_args(out, data_dir, "train.max_steps=1", "train.overwrite=true", *WB)) == 0
    assert calls["runs"][2].kw["id"] != first.kw["id"]


def test_interrupted_run_finishes_with_its_exit_code(tmp_path, data_dir, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    calls["raise_on_log"] = True  # Ctrl-C while the first StepGRPO record is logged
    assert main(_args(tmp_path / "run", data_dir, "train.max_steps=2", *WB)) == 130
    assert calls["runs"][0].finished == [130]


def test_wandb_that_cannot_start_stops_the_run_before_training(tmp_path, data_dir, monkeypatch, capsys):
    _fake_wandb(monkeypatch, init_error=RuntimeError("api_key not configured (no-tty)"))
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=1", *WB)) == 2
    err = capsys.readouterr().err
    assert "api_key not configured" in err and "wandb login" in err and "logging.wandb_mode=offline" in err
    assert not (out / "metrics.jsonl").exists()


def test_missing_wandb_is_a_start_up_error(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    assert main(["--check", *_args(tmp_path / "run", data_dir, *WB)]) == 2
    assert "wandb is not installed" in capsys.readouterr().err


def test_real_wandb_offline(tmp_path, data_dir, monkeypatch):
    """The installed wandb takes the calls: an offline run directory for the run's id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=1", *WB, "logging.wandb_mode=offline")) == 0
    run_id = (out / "wandb" / WANDB_ID_FILE).read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    data = runs[0] / f"run-{run_id}.wandb"
    # the records reach the file from W&B's service process, which outlives finish() in this test
    # process; a run's own process shuts it down at exit (wandb's atexit teardown, which
    # exit_after_collectives runs too): so does the test (a loaded CI worker once saw only the
    # 7-byte header right after finish)
    import wandb

    wandb.teardown()
    assert data.is_file() and data.stat().st_size > 1000


@pytest.mark.slow
def test_wandb_that_cannot_start_stops_every_rank_with_one_line(tmp_path, data_dir):
    """Two ranks: rank 0 starts W&B; when it cannot, every rank stops with the one error line
    (no rank left waiting in the next collective, no traceback)."""
    import os
    import subprocess

    from ports import free_port
    from test_train import ROOT

    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(
        "def init(**kw):\n    raise RuntimeError('api_key not configured (no-tty)')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "r1vl.train",
                        *_args(tmp_path / "run", data_dir, "train.max_steps=1", *WB)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("r1vl.train: error: logging.wandb=true: W&B did not start") == 1, r.stderr[-3000:]
    assert "[rank1]: Traceback" not in r.stderr and "Connection closed by peer" not in r.stderr, r.stderr[-3000:]
