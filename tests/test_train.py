"""The trainer end to end on a very small run: outputs, checkpoints, kill + resume equality,
bad-input errors, the eval CLI."""
import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1vl.train import main

ROOT = Path(__file__).resolve().parents[1]

# seconds-scale run: 1-layer tiny model, a few prompts, short completions
FAST = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_hidden_layers=1",
    "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1", "model.tiny.vision_depth=1",
    "model.tiny.vision_embed_dim=32", "model.tiny.vision_num_heads=1", "model.tiny.vocab_size=400",
    "model.tiny.tokenizer_corpus_size=60",
    "data.synthetic_train_size=60", "data.synthetic_test_size=6", "data.eval_size=4",
    "warmup.steps=2", "warmup.batch_size=2", "warmup.warmup_steps=1",
    "rollout.num_generations=2", "rollout.max_completion_length=10", "train.prompts_per_step=2",
    "train.micro_batch_size=2", "train.eval_batch_size=4",
    "logging.progress=false", "logging.tensorboard=false", "distributed.num_threads=1",
]
TIMING = ("seconds", "tokens_per_s", "lr_", "wall")


def _strip(rec):
    return {k: v for k, v in rec.items() if not any(t in k for t in TIMING)}


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _args(out, data_dir, *extra):
    return [f"output_dir={out}", f"data.synthetic_dir={data_dir}", *FAST, *extra]


def test_reward_workers_score_while_the_log_probs_are_taken_with_the_same_results(tmp_path, data_dir, monkeypatch,
                                                                                   capfd):
    """With algorithm.reward_workers > 0 the step's completions are scored off the main thread while
    it builds the batch and takes the reference log-probs; every result is what in-line scoring
    gives (reward_workers=0 scores on the main thread, after the log-prob pass)."""
    import threading

    import r1vl.algo
    import r1vl.eval

    events = []
    real_score, real_logprobs = r1vl.eval.score, r1vl.algo.compute_logprobs
    # events, not sleeps (a busy machine outlasted a 1 s sleep): with workers the log-prob pass waits
    # for the scoring to have started, and the scoring, to end, for the pass to have started; where
    # the two cannot overlap, the wait runs out (60 s) and the order below shows it
    scoring, passing = threading.Event(), threading.Event()

    def score(*a, **k):
        events.append(("score", threading.current_thread() is threading.main_thread()))
        scoring.set()
        passing.wait(60)
        passing.clear()
        out = real_score(*a, **k)
        events.append(("scored", None))
        return out

    def compute_logprobs(*a, **k):
        if workers:
            scoring.wait(60)
            scoring.clear()
        events.append(("logprobs", None))
        passing.set()
        return real_logprobs(*a, **k)

    monkeypatch.setattr(r1vl.eval, "score", score)
    monkeypatch.setattr(r1vl.algo, "compute_logprobs", compute_logprobs)
    runs = {}
    for workers in (0, 2):
        events.clear()
        scoring.clear()
        passing.clear()
        out = tmp_path / f"w{workers}"
        assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_before=false", "train.eval_after=false",
                          "algorithm.beta=0.04", f"algorithm.reward_workers={workers}")) == 0
        runs[workers] = [_strip(r) for r in _metrics(out)]
        kinds = [e[0] for e in events]
        assert kinds.count("score") == 2 and kinds.count("logprobs") == 2, kinds
        if workers:  # each step: scoring starts, the log-prob pass starts, then scoring ends
            assert kinds == ["score", "logprobs", "scored"] * 2, kinds
            assert not any(e[1] for e in events if e[0] == "score")
        else:
            assert kinds == ["logprobs", "score", "scored"] * 2, kinds
            assert all(e[1] for e in events if e[0] == "score")
    assert runs[0] == runs[2]

    # a pool that cannot start: the scoring thread hands the batch back, the main thread scores it
    import r1vl.rewards.pool as pool_mod

    monkeypatch.setattr(r1vl.eval, "score", real_score)  # (no more waits: the batch is scored twice)
    monkeypatch.setattr(r1vl.algo, "compute_logprobs", real_logprobs)

    class Broken:
        def map(self, *a, **k):
            raise RuntimeError("no reward worker started within 120s")

    monkeypatch.setattr(pool_mod, "get_pool", lambda workers: Broken())
    out = tmp_path / "broken"
    assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_before=false", "train.eval_after=false",
                      "algorithm.beta=0.04", "algorithm.reward_workers=2")) == 0
    assert [_strip(r) for r in _metrics(out)] == runs[0]
    assert "score these on the main thread" in capfd.readouterr().err


def test_end_to_end_outputs(tmp_path, data_dir):
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=2", "train.save_every=1")) == 0
    recs = _metrics(out)
    phases = [r["phase"] for r in recs]
    assert phases == ["warmup", "warmup", "eval", "grpo", "grpo", "eval"]
    g = recs[3]
    for k in ("step", "loss", "reward_mean", "reward_std", "step_rar_mean", "step_rar_std", "step_rvr_mean",
              "step_rvr_std", "accuracy", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio", "entropy",
              "completion_length", "seconds_rollout", "seconds_reward", "seconds_logprob", "seconds_update",
              "tokens_per_s"):
        assert k in g, k
    assert all(torch.isfinite(torch.tensor(float(g[k]))) for k in ("loss", "kl", "entropy", "reward_mean"))
    # one group of sampled completions per StepGRPO step, with the group's advantages
    rolls = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rolls] == [1, 2]
    for r in rolls:
        rewards = torch.tensor([c["reward"] for c in r["completions"]])
        assert len(rewards) == 2 and r["problem"] and r["solution"]
        want = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert [c["advantage"] for c in r["completions"]] == pytest.approx(want.tolist(), abs=1e-5)
        assert all(c["reward"] == pytest.approx(c["step_rar"] + c["step_rvr"]) for c in r["completions"])
    # each held-out evaluation's completions and scores, consistent with its record
    evals = [r for r in recs if r["phase"] == "eval"]
    for name, rec in (("after_warmup", evals[0]), ("final", evals[1])):
        rows = [json.loads(x) for x in (out / "eval_outputs" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == rec["n"] and [r["index"] for r in rows] == list(range(rec["n"]))
        for key, rk in (("accuracy", "correct"), ("step_rvr", "step_rvr"), ("completion_length", "completion_length")):
            assert sum(r[rk] for r in rows) / len(rows) == pytest.approx(rec[key]), (name, key)
    summary = json.loads((out / "summary.json").read_text())
    for k in ("accuracy_after_warmup", "accuracy_final", "reward_after_warmup", "reward_final", "steps",
              "wall_seconds"):
        assert summary[k] is not None, k
    assert summary["steps"] == 2
    assert (out / "config.yaml").is_file() and (out / "plot.png").stat().st_size > 1000
    from r1vl.config import load_config

    assert load_config(out / "config.yaml").train.max_steps == 2  # the resolved config reloads
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["grpo-000001", "grpo-000002"]  # warm-up's and older ones pruned (keep 2)
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert final.config.tie_word_embeddings


def test_kill_and_resume_equals_uninterrupted(tmp_path, data_dir):
    """A run killed (SIGKILL) mid-training and resumed with train.resume=true ends with the same
    parameters and the same per-step metrics as a run that was never interrupted."""
    extra = ("train.max_steps=6", "train.save_every=1", "logging.plot=false", "train.eval_after=false")
    ref = tmp_path / "uninterrupted"
    assert main(_args(ref, data_dir, *extra)) == 0

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "r1vl.train", *_args(out, data_dir, *extra)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoints"
        if ck.is_dir() and any(p.name.startswith("grpo-") for p in ck.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "final").exists()

    assert main(_args(out, data_dir, *extra, "train.resume=true")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and "grpo-" in summary["resumed_from"]
    from safetensors.torch import load_file

    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [_strip(r) for r in _metrics(ref)]
    rb = [_strip(r) for r in _metrics(out)]
    assert ra == rb
    # the sampled completions too: the killed run's tail was dropped, each step is there once
    assert (out / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()


def test_sigterm_checkpoints_stops_and_resumes_equal(tmp_path, data_dir):
    """SIGTERM (a preemption) mid-StepGRPO: the run stops at the end of that step with a
    checkpoint although train.save_every=0, exits 128 + 15, and train.resume=true then ends
    with the parameters and per-step metrics of a run that was never stopped."""
    extra = ("train.max_steps=6", "logging.plot=false", "train.eval_after=false")
    ref = tmp_path / "uninterrupted"
    assert main(_args(ref, data_dir, *extra)) == 0

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "r1vl.train", *_args(out, data_dir, *extra)], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and '"grpo"' in (out / "metrics.jsonl").read_text():
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)  # the same stop twice (a scheduler + torchrun; the kernel may merge them)
            break
        time.sleep(0.05)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.count("SIGTERM: stopping at the end of this step") == 1, err[-2000:]
    done = [r["step"] for r in _metrics(out) if r["phase"] == "grpo"]
    assert 1 <= done[-1] < 6 and f"stopped after grpo step {done[-1]}/6" in err, err[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"grpo-{done[-1]:06d}"]
    assert not (out / "final").exists()

    # the command the stop line prints, alone (none of the first run's overrides): the run's own settings
    command = f"--config {out / 'config.yaml'} train.resume=true"
    assert command in err, err[-2000:]
    assert main(command.split()) == 0
    from safetensors.torch import load_file

    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert [_strip(r) for r in _metrics(ref)] == [_strip(r) for r in _metrics(out)]


def _signal_in_evaluation(monkeypatch, nth: int, signum: int, during: bool = False) -> list:
    """The nth evaluation of the next run gets `signum` as it starts (before its first batch),
    or `during` its (last) batch, as it scores it."""
    import r1vl.eval

    real, calls = r1vl.eval.evaluate, []
    real_score = r1vl.eval.score

    def kill():
        os.kill(os.getpid(), signum)
        time.sleep(0.01)

    def score(*a, **kw):
        if len(calls) == nth:
            kill()
        return real_score(*a, **kw)

    def evaluate(*a, **kw):
        calls.append(1)
        if len(calls) == nth and not during:
            kill()
        return real(*a, **kw)

    monkeypatch.setattr(r1vl.eval, "evaluate", evaluate)
    if during:
        monkeypatch.setattr(r1vl.eval, "score", score)
    return calls


@pytest.mark.parametrize("nth, signum, extra, ckpt, during", [
    (1, signal.SIGINT, (), "warmup-000002", False),  # the evaluation after the warm-up (Ctrl-C)
    (1, signal.SIGTERM, (), "warmup-000002", True),  # ... during its last (only) batch
    (2, signal.SIGTERM, ("train.eval_every=1",), "grpo-000001", False),  # train.eval_every's, in the loop
    # ... during its first of two batches, scored in the background: the stop before the second waits for it
    (2, signal.SIGTERM, ("train.eval_every=1", "algorithm.reward_workers=1", "train.eval_batch_size=2"), "grpo-000001",
     True),
    (3, signal.SIGTERM, ("train.eval_every=1",), "grpo-000002", False),  # the final one
    (3, signal.SIGTERM, ("train.eval_every=1",), "grpo-000002", True),  # ... during its last batch
])
def test_a_signal_during_an_evaluation_checkpoints_and_resumes_equal(tmp_path, data_dir, monkeypatch, capsys,
                                                                     nth, signum, extra, ckpt, during):
    """A preemption or Ctrl-C during an evaluation stops the run before the evaluation's next
    batch with a checkpoint of the point reached (train.save_every=0), exit 128 + signal; the
    resume runs that evaluation again and ends as a run never stopped. (The evaluations ran on
    to the end, then the final save, exit 0, no checkpoint: a preemption's kill lost every step.)"""
    args = ("train.max_steps=2", "logging.plot=false", *extra)
    ref = tmp_path / "uninterrupted"
    assert main(_args(ref, data_dir, *args)) == 0
    out = tmp_path / "stopped"
    calls = _signal_in_evaluation(monkeypatch, nth, signum, during)
    assert main(_args(out, data_dir, *args)) == 128 + signum
    assert len(calls) == nth
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping at the end of this step" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt]
    assert not (out / "final").exists()
    if nth != 2:  # in the loop, the step's own stop line names it
        done = 4 if during else 0
        assert f"evaluation ({done}/4 samples) with checkpoint" in err and ckpt in err, err[-2000:]
    monkeypatch.undo()
    assert main(_args(out, data_dir, *args, "train.resume=true")) == 0
    from safetensors.torch import load_file

    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [_strip(r) for r in _metrics(ref)] == [_strip(r) for r in _metrics(out)]
    for name in os.listdir(ref / "eval_outputs"):
        assert (ref / "eval_outputs" / name).read_text() == (out / "eval_outputs" / name).read_text(), name


def test_a_warmup_checkpoint_written_in_its_evaluation_cannot_lengthen_the_warmup(tmp_path, data_dir,
                                                                                   monkeypatch, capsys):
    """The checkpoint of a stop during the evaluation after the warm-up carries no warm-up
    optimizer state (freed before the evaluation): lengthening the warm-up from it is refused
    by name, not a KeyError or a silently fresh AdamW."""
    out = tmp_path / "run"
    _signal_in_evaluation(monkeypatch, 1, signal.SIGTERM)
    assert main(_args(out, data_dir, "train.max_steps=1", "logging.plot=false")) == 128 + signal.SIGTERM
    monkeypatch.undo()
    capsys.readouterr()
    assert main(_args(out, data_dir, "train.max_steps=1", "logging.plot=false", "warmup.steps=3",
                      "train.resume=true")) == 2
    err = capsys.readouterr().err
    assert "without the warm-up's optimizer state" in err and "Traceback" not in err, err[-2000:]


def test_stop_signal_handlers():
    from r1vl.train import StopSignal
    from r1vl.utils import Dist

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert stop.agreed(Dist()) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # handled between bytecodes: right after this call
        time.sleep(0.01)
        assert stop.agreed(Dist()) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)


def test_ctrl_c_stops_at_the_step_end_inside_the_loops_only():
    """SIGINT outside the step loops interrupts at once; inside them it asks for a stop at the
    step's end, a repeat within REPEAT_S is the same stop, a later one interrupts at once."""
    from r1vl.train import StopSignal
    from r1vl.utils import Dist

    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        with pytest.raises(KeyboardInterrupt):  # start-up, evaluation, final save: at once
            _sigint()
        assert stop.agreed(Dist()) == 0
        stop.armed = True
        try:
            _sigint()
            assert stop.agreed(Dist()) == signal.SIGINT
            _sigint()  # within REPEAT_S: the same stop delivered twice
        except KeyboardInterrupt:
            pytest.fail("SIGINT inside the loops (once, or repeated at once) interrupted")
        assert stop.agreed(Dist()) == signal.SIGINT
        stop._at -= stop.REPEAT_S
        with pytest.raises(KeyboardInterrupt):  # pressed again: at once
            _sigint()
    assert signal.getsignal(signal.SIGINT) is before


def test_the_same_stop_passed_on_during_a_long_c_call_is_not_a_second_signal(tmp_path):
    """A stop delivered twice (a scheduler's SIGTERM, then torchrun's, 0.2 s later) while the main
    thread is in a long C call (a backward pass, a collective; os.system's wait stands in): Python
    runs the second's handler only when the call returns, 3 s later. It was judged by when its
    handler ran, taken for a deliberate second signal and the run killed (status -15, no
    checkpoint). Now by when it arrived: the same stop. A second sent REPEAT_S after the first
    still stops at once, in a C call too."""
    code = ("import os, signal, sys, threading, time\nfrom r1vl.train import StopSignal\n"
            "with StopSignal() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop.signum == signal.SIGTERM\n"
            "    threading.Thread(target=lambda: (time.sleep(float(sys.argv[1])), os.kill(os.getpid(), "
            "signal.SIGTERM)), daemon=True).start()\n"
            "    os.system('sleep ' + sys.argv[2])\n"
            "print('went on')\n")
    (tmp_path / "stand_in.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(after, call_s):
        return subprocess.run([sys.executable, str(tmp_path / "stand_in.py"), str(after), str(call_s)], env=env,
                              capture_output=True, text=True, timeout=120)

    r = run(0.2, 3)
    assert r.returncode == 0 and "went on" in r.stdout, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("SIGTERM: stopping at the end of this step") == 1, r.stderr[-2000:]
    r = run(2.5, 4)  # sent again after REPEAT_S: at once (when the call returns)
    assert r.returncode == -signal.SIGTERM and "went on" not in r.stdout, (r.returncode, r.stderr[-2000:])


def test_the_same_stop_arriving_as_a_stopped_run_closes_is_not_a_second_signal(tmp_path, data_dir):
    """A run stops on a SIGTERM right after a step's own save (nothing left to write), and the
    same stop comes again 0.3 s later (torchrun passing it on) while the run closes its writers
    in _shutdown (W&B's finish: 1 s stands in). The handlers had been given back when run()
    returned: that repeat killed the process (-15), the W&B run unfinished, TensorBoard's tail
    lost. Now they stay until _shutdown is done: exit 128 + 15, every writer closed."""
    code = ("import os, signal, sys, threading, time\nimport r1vl.train as train\n"
            "class Writer:\n"
            "    def close(self, exit_code=0):\n"
            "        time.sleep(1.0)\n"
            "        print('closed', exit_code, flush=True)\n"
            "def run(cfg, stop):\n"
            "    train._OPEN_WRITERS.append(Writer())\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.05)\n"
            "    assert stop.signum == signal.SIGTERM\n"
            "    threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGTERM)), "
            "daemon=True).start()\n"
            "    raise train.Stopped(signal.SIGTERM, 'stopped after grpo step 2/4')\n"
            "train.run = run\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    (tmp_path / "stand_in.py").write_text(code)
    r = subprocess.run([sys.executable, str(tmp_path / "stand_in.py"), *_args(tmp_path / "run", data_dir)],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-2000:])
    assert r.stdout == f"closed {128 + signal.SIGTERM}\n", r.stderr[-2000:]


def test_ctrl_c_in_a_run(tmp_path, data_dir):
    """Ctrl-C mid-StepGRPO: a checkpoint at the step's end, exit 130, one line. Ctrl-C while
    the run starts: one line naming where, exit 130, no traceback."""
    def start(out):
        log = open(tmp_path / f"{out.name}.stderr", "wb")  # read while the run goes on
        proc = subprocess.Popen([sys.executable, "-m", "r1vl.train", *_args(out, data_dir, "train.max_steps=50")],
                                cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                                stderr=log)
        log.close()
        return proc

    def stderr_of(out):
        f = tmp_path / f"{out.name}.stderr"
        return f.read_text(errors="replace") if f.is_file() else ""

    def interrupt(out, ready):
        proc = start(out)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        err = stderr_of(out)
        assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
        return err

    out = tmp_path / "loop"
    err = interrupt(out, lambda: (out / "metrics.jsonl").is_file() and '"grpo"' in (out / "metrics.jsonl").read_text())
    done = [r["step"] for r in _metrics(out) if r["phase"] == "grpo"][-1]
    assert "SIGINT: stopping at the end of this step" in err and f"stopped after grpo step {done}/50" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"grpo-{done:06d}"]
    assert "Traceback" not in err

    # after the run's first log line (past seed_everything: a Ctrl-C inside numpy.random's first
    # import, a C extension's, can be swallowed there, which no handler sees), before the warm-up
    out = tmp_path / "startup"
    err = interrupt(out, lambda: "rank(s)," in stderr_of(out))
    assert "r1vl.train: interrupted (Ctrl-C) in " in err and "Traceback" not in err, err[-2000:]
    where = err.split("r1vl.train: interrupted (Ctrl-C) in ", 1)[1].split(";")[0]
    assert "_handle" not in where and f"{os.sep}r1vl{os.sep}" in where, where  # r1vl's frame, not the handler
    assert not (out / "checkpoints").exists()


def test_a_handled_ctrl_c_exits_with_the_clis_status(tmp_path):
    """A KeyboardInterrupt that left an exec() of a string (a dataclass being made while Ctrl-C
    arrives during an import) makes CPython end the process by SIGINT (-2) however it was
    handled; forget_keyboard_interrupt, which both CLIs call in their Ctrl-C handler, keeps
    their status (test_ctrl_c_in_a_run failed that way now and then)."""
    code = ("import sys\nfrom r1vl.utils import forget_keyboard_interrupt\n"
            "try:\n    exec('raise KeyboardInterrupt')\nexcept KeyboardInterrupt:\n"
            "    {}\nsys.exit(130)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, handler in (("handled", "forget_keyboard_interrupt()"), ("unhandled_mark", "pass")):
        (tmp_path / f"{name}.py").write_text(code.format(handler))
    # as `python -m r1vl.train` runs: a module, whose SystemExit reaches Py_RunMain's check
    runs = {name: subprocess.run([sys.executable, "-m", name], cwd=tmp_path, env=env, timeout=120).returncode
            for name in ("handled", "unhandled_mark")}
    assert runs == {"handled": 130, "unhandled_mark": -signal.SIGINT}  # the second: what it guards against


def test_atomic_checkpoint_write(tmp_path):
    from r1vl.utils import STATE_FILE, atomic_dir_write, latest_checkpoint

    ck = tmp_path / "checkpoints"

    def good(tmp):
        tmp.mkdir()
        (tmp / STATE_FILE).write_text("ok")

    atomic_dir_write(ck / "grpo-000001", good)

    def crash(tmp):
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt  # killed in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_dir_write(ck / "grpo-000002", crash)
    assert latest_checkpoint(ck).name == "grpo-000001"  # the partial save is invisible
    with pytest.raises(KeyboardInterrupt):
        atomic_dir_write(ck / "grpo-000001", crash)  # re-saving under the same name
    assert (ck / "grpo-000001" / STATE_FILE).read_text() == "ok"
    assert sorted(p.name for p in ck.iterdir()) == ["grpo-000001"]  # no partial copy left behind


def test_a_save_on_a_full_disk_names_the_path_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    """torch.save's error on a short write names neither the file nor the disk ("unexpected
    pos"): a save that fails with little space left says the disk is full, with the path; an
    ENOSPC anywhere in the error's chain does too; another error is passed on as it was."""
    import errno
    import shutil
    from collections import namedtuple

    from r1vl.files import DiskFullError
    from r1vl.utils import atomic_dir_write

    ck = tmp_path / "checkpoints"

    def torch_short_write(tmp):
        tmp.mkdir()
        (tmp / "trainer_state.pt").write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6096128 vs 6096020")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(24 << 20, 24 << 20, 4096))
    with pytest.raises(DiskFullError) as e:
        atomic_dir_write(ck / "grpo-000002", torch_short_write)
    assert str(ck / "grpo-000002") in str(e.value) and "0.0 MiB free" in str(e.value)
    assert "unexpected pos" in str(e.value) and "train.resume=true" in str(e.value)
    assert list(ck.iterdir()) == []

    def denied(tmp):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(PermissionError):  # little free space (a mount may say 0), but not the cause
        atomic_dir_write(ck / "grpo-000002", denied)

    def enospc(tmp):
        tmp.mkdir()
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("serialisation failed") from inner

    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 39, 1 << 39))  # a quota
    with pytest.raises(DiskFullError, match="No space left on device"):
        atomic_dir_write(ck / "final", enospc)
    with pytest.raises(RuntimeError, match="unexpected pos") as e:  # space left: not the disk
        atomic_dir_write(ck / "grpo-000002", torch_short_write)
    assert not isinstance(e.value, DiskFullError) and list(ck.iterdir()) == []


@pytest.mark.parametrize("override, words", [
    ("data.test=/nonexistent/test.jsonl", ["data.test", "/nonexistent/test.jsonl", "does not exist"]),
    ("model.path=/nonexistent/model", ["model.path", "no such directory"]),
    ("model.path=.", ["model.path", "config.json"]),
    ("train.resume=/nonexistent/ckpt", ["train.resume", "not a checkpoint"]),
    ("deepspeed=ds.json", ["deepspeed"]),
])
def test_bad_inputs_one_clear_message(tmp_path, capsys, override, words):
    assert main([f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1vl.train: error:") and len(err.splitlines()) == 1
    for w in words:
        assert w in err


def test_prompt_over_max_prompt_length(tmp_path, data_dir, capsys):
    assert main(_args(tmp_path / "run", data_dir, "data.max_prompt_length=20", "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "max_prompt_length=20" in err and "train.jsonl:" in err
    # at start-up over the whole split, not when a long row is first sampled
    assert "60 of 60 prompts" in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_bad_input_exit_code_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "r1vl.train", f"output_dir={tmp_path}", "data.test=/no/such/dir"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "data.test" in r.stderr


def test_eval_cli(tmp_path, data_dir, capsys):
    from r1vl.eval import main as eval_main
    from r1vl.models import build_tiny, synthetic_corpus

    build_tiny(synthetic_corpus(30), vocab_size=400, out_dir=tmp_path / "m", hidden_size=64,
               intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               vision_depth=1, vision_embed_dim=32, vision_num_heads=1)
    capsys.readouterr()  # a first transformers import may print (DeepSpeed's accelerator note)
    assert eval_main(["--model", str(tmp_path / "m"), "--data", str(data_dir), "--n", "3",
                      "--max-new-tokens", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0 and "step_rar" in res and "step_rvr" in res
    assert eval_main(["--model", str(tmp_path / "nope"), "--data", str(data_dir)]) == 2
    assert "--model" in capsys.readouterr().err
    assert eval_main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "nodata")]) == 2
    assert "--data" in capsys.readouterr().err


def test_adamw_impl_choice():
    from types import SimpleNamespace

    from r1vl.train import adamw_impl

    cuda, cpu = [SimpleNamespace(is_cuda=True)] * 2, [SimpleNamespace(is_cuda=False)]
    assert adamw_impl("auto", cuda) == {"fused": True}
    assert adamw_impl("auto", cuda + cpu) == {}  # mixed devices: torch's default
    assert adamw_impl("auto", cpu) == {}  # CPU: torch's default (for-loop), the default run unchanged
    assert adamw_impl("auto", cuda, deepspeed=True) == {}  # DeepSpeed steps its own fp32 partitions
    assert adamw_impl("fused", cpu) == {"fused": True}
    assert adamw_impl("foreach", cuda) == {"foreach": True}
    assert adamw_impl("for_loop", cuda) == {"foreach": False}


def test_make_optimizer_impls_agree():
    """optim.impl changes how AdamW runs, not what it computes."""
    from r1vl.config import load_config
    from r1vl.train import make_optimizer

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(3)]
    out = {}
    for impl in ("fused", "foreach", "for_loop", "auto"):
        cfg = load_config(None, [f"optim.impl={impl}", "optim.weight_decay=0.1"])
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt, sched = make_optimizer((p for p in params), 1e-2, cfg, 10, 0, "constant")  # a generator is fine
        assert opt.defaults.get("fused") is (True if impl == "fused" else None)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
            sched.step()
        out[impl] = [p.detach() for p in params]
    assert not torch.equal(out["auto"][0], init[0])
    for impl in ("fused", "foreach", "auto"):
        for a, b in zip(out[impl], out["for_loop"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _adamw_run(impl, init, grads, saved=None):
    from r1vl.config import load_config
    from r1vl.train import load_optimizer_state, make_optimizer

    cfg = load_config(None, [f"optim.impl={impl}"])
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt, _ = make_optimizer(params, 1e-2, cfg, 10, 0, "constant")
    if saved is not None:
        load_optimizer_state(opt, saved)
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    return opt, params


@pytest.mark.parametrize("saved_impl,run_impl", [("foreach", "fused"), ("fused", "for_loop"), ("fused", "fused")])
def test_resume_keeps_this_runs_adamw_impl(saved_impl, run_impl):
    """A checkpoint written under one optim.impl resumes under the run's own (torch alone would
    take the checkpoint's fused/foreach flags), with the same moments and step count."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(4)]
    opt, params = _adamw_run(saved_impl, init, grads[:2])
    saved = copy.deepcopy(opt.state_dict())
    resumed, out = _adamw_run(run_impl, [p.detach() for p in params], grads[2:], saved)
    for k in ("fused", "foreach"):
        assert resumed.param_groups[0][k] == resumed.defaults[k], k
    assert resumed.param_groups[0]["fused"] is (True if run_impl == "fused" else None)
    assert float(resumed.state[out[0]]["step"]) == 4.0
    _, ref = _adamw_run("for_loop", init, grads)  # uninterrupted
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_resume_optimizer_group_mismatch_is_clear():
    from r1vl.train import UserError, load_optimizer_state

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    saved = {"state": {}, "param_groups": [dict(opt.param_groups[0], params=[0])] * 2}
    with pytest.raises(UserError, match="2 parameter groups"):
        load_optimizer_state(opt, saved)


def test_ref_on_host_same_run(tmp_path, data_dir):
    """model.ref_on_host moves where the reference weights live, not what the run computes
    (on CPU host and device are one memory: this checks the wiring end to end)."""
    runs = {}
    for on in (False, True):
        out = tmp_path / f"ref_on_host_{on}"
        assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_before=false", "train.eval_after=false",
                          f"model.ref_on_host={str(on).lower()}")) == 0
        runs[on] = [_strip(r) for r in _metrics(out) if r["phase"] == "grpo"]
    assert len(runs[True]) == 2 and all("kl" in r for r in runs[True])  # the reference was read
    assert runs[True] == runs[False]


@pytest.mark.parametrize("overrides,expected", [
    ([], (0.7, 0.7)),  # null: the sampling temperature (the default run)
    (["algorithm.logprob_temperature=1.0"], (1.0, 0.7)),  # the authors' code: raw logits
    # greedy (refused for a run with StepGRPO steps: its G completions would be equal)
    (["rollout.temperature=0", "algorithm.logprob_temperature=null", "train.max_steps=0"], (1.0, 1.0)),
    (["rollout.temperature=1.2", "rollout.vllm.logprobs_mode=raw_logprobs"], (1.2, 1.0)),
])
def test_logprob_temperatures(overrides, expected):
    from r1vl.config import load_config
    from r1vl.train import logprob_temperatures

    assert logprob_temperatures(load_config(None, ["rollout.temperature=0.7", *overrides])) == expected


def test_logprob_temperature_reaches_the_update(tmp_path, data_dir):
    """algorithm.logprob_temperature drives the trainer's log-probs: equal to the sampling
    temperature it is the default run exactly; at 1.0 (the authors' code) the run differs."""
    runs = {}
    for t in ("null", "0.7", "1.0"):
        out = tmp_path / f"lpt_{t}"
        assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_before=false", "train.eval_after=false",
                          "rollout.temperature=0.7", f"algorithm.logprob_temperature={t}")) == 0
        runs[t] = [_strip(r) for r in _metrics(out) if r["phase"] == "grpo"]
    assert len(runs["null"]) == 2
    assert runs["0.7"] == runs["null"]
    assert runs["1.0"][0]["entropy"] != runs["null"][0]["entropy"]  # same samples, scored at another temperature


def test_bias_correction_kl_reaches_the_update(tmp_path, data_dir, monkeypatch):
    """algorithm.use_bias_correction_kl and algorithm.delta reach the fused loss (off / null: not
    passed at all, the kernel's defaults). That the correction changes the step: test_algo."""
    import r1vl.kernels as kernels

    seen = []
    real = kernels.fused_linear_grpo_loss

    def spy(*a, **kw):
        seen.append((kw.get("use_bias_correction_kl", False), kw.get("delta")))
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "fused_linear_grpo_loss", spy)
    for flag, delta in (("false", "null"), ("true", "1.5")):
        seen.clear()
        assert main(_args(tmp_path / f"kl_{flag}", data_dir, "train.max_steps=2", "train.eval_before=false",
                          "train.eval_after=false", f"algorithm.use_bias_correction_kl={flag}",
                          f"algorithm.delta={delta}")) == 0
        assert seen and set(seen) == {(flag == "true", None if delta == "null" else 1.5)}


def test_output_dir_of_a_previous_run(tmp_path, data_dir, capsys):
    """A fresh run never mixes its outputs with an earlier run's: refused, or (train.overwrite)
    the earlier outputs are removed first; train.resume=true without a checkpoint is refused
    when a run is there (it would silently start over)."""
    import shutil

    out = tmp_path / "run"
    data_dir = shutil.copytree(data_dir, tmp_path / "data")  # seed=1 below rewrites the synthetic task
    fast = ("train.max_steps=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, *fast, "train.save_every=1")) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    assert main(_args(out, data_dir, *fast, "seed=1")) == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "train.overwrite=true" in err
    assert f"continue it with --config {out / 'config.yaml'} train.resume=true" in err  # its own settings
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    assert (out / "metrics.jsonl").read_text() == metrics
    assert main(["--check", *_args(out, data_dir, *fast)]) == 2  # make train's check sees it too
    capsys.readouterr()
    # a resume on other data is refused, by --check too, before anything is generated or written
    other = ("data.synthetic_train_size=50", "train.resume=true")
    rows = (data_dir / "train.jsonl").read_text()
    for check in (["--check"], []):
        assert main([*check, *_args(out, data_dir, *fast, *other)]) == 2
        assert "was written by a run on other data (data.synthetic_train_size=60, this run 50)" in \
            capsys.readouterr().err
        assert (out / "metrics.jsonl").read_text() == metrics
        assert (data_dir / "train.jsonl").read_text() == rows  # the built-in task was not made again
    assert main(["--check", *_args(out, data_dir, *fast, "train.resume=true")]) == 0  # its own data: fine
    capsys.readouterr()

    assert main(_args(out, data_dir, *fast, "seed=1", "train.overwrite=true")) == 0  # save_every=0 now
    assert not (out / "checkpoints").exists()  # the old run's checkpoints are gone, not resumable
    assert [r["phase"] for r in _metrics(out)] == ["warmup", "warmup", "grpo"]
    assert main(_args(out, data_dir, *fast, "train.resume=true")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "save_every" in err
    assert main(_args(out, data_dir, *fast, "seed=2")) == 2  # no checkpoint: a resume is not suggested
    err = capsys.readouterr().err
    assert "without a checkpoint to continue from" in err and "train.resume" not in err, err[-1000:]
    assert main(_args(tmp_path / "new", data_dir, *fast, "train.resume=true")) == 0  # nothing there: fresh


def test_resume_from_a_checkpoint_of_another_dir(tmp_path, data_dir, capsys):
    """train.resume=<checkpoint> into a new output_dir: the KL reference comes from the run that
    wrote the checkpoint, and the resumed step equals the original's."""
    extra = ("train.max_steps=2", "train.save_every=1", "train.eval_before=false", "train.eval_after=false",
             "logging.plot=false")
    src = tmp_path / "src"
    assert main(_args(src, data_dir, *extra)) == 0
    ck = src / "checkpoints" / "grpo-000001"
    dst = tmp_path / "dst"
    assert main(_args(dst, data_dir, *extra, f"train.resume={ck}")) == 0
    assert not (dst / "warmup").exists()
    a = [_strip(r) for r in _metrics(src) if r["phase"] == "grpo"]
    b = [_strip(r) for r in _metrics(dst) if r["phase"] == "grpo"]
    assert b == a[1:] and "kl" in b[0]
    # the continued run resumed in turn (lengthened): its checkpoint says where the reference is
    # (dst has no warmup/: this was refused, naming dst twice)
    more = [x for x in extra if not x.startswith("train.max_steps")] + ["train.max_steps=3", "train.resume=true",
                                                                         "train.keep_checkpoints=0"]
    assert main(_args(src, data_dir, *more)) == 0
    assert main(_args(dst, data_dir, *more)) == 0, capsys.readouterr().err[-2000:]
    a = [_strip(r) for r in _metrics(src) if r["phase"] == "grpo"]
    b = [_strip(r) for r in _metrics(dst) if r["phase"] == "grpo"]
    assert [r["step"] for r in b] == [2, 3] and b == a[1:]
    capsys.readouterr()
    assert main(_args(tmp_path / "dst2", data_dir, *extra, f"train.resume={ck}", "model.tiny.intermediate_size=96")) == 2
    assert "another model" in capsys.readouterr().err
    # into an output_dir that holds a third run: refused, not merged into its logs
    assert main(_args(dst, data_dir, *extra, f"train.resume={ck}")) == 2
    assert f"train.resume: {ck} is another run's checkpoint, and output_dir {dst} holds a previous run" in \
        capsys.readouterr().err


def test_a_resume_on_another_number_of_ranks_says_what_changes(tmp_path, caplog):
    """check_resume_world's warning: the rows per step of the phase that goes on, against what the
    run it continues drew (its own per-rank setting x its ranks, not this run's), and the setting
    that keeps them; a warm-up-end checkpoint speaks of StepGRPO's steps, one with no step left
    of none; the other ranks say nothing; a state without a number of ranks is refused."""
    from r1vl.config import load_config, to_dict
    from r1vl.train import UserError, check_resume_world
    from r1vl.utils import Dist

    def warned(state, world, *over, rank=0):
        caplog.clear()
        cfg = load_config(None, ["warmup.steps=4", "train.max_steps=6", *over])
        with caplog.at_level("WARNING", logger="r1vl.train"):
            assert check_resume_world(state, tmp_path, cfg, Dist(rank=rank, world=world)) is (state["world"] != world)
        return "\n".join(r.getMessage() for r in caplog.records if r.name == "r1vl.train")

    def state(phase, step, world, *over, ds=False):
        return {"phase": phase, "step": step, "world": world, "deepspeed": ds,
                "config": to_dict(load_config(None, ["warmup.steps=4", "train.max_steps=6", *over]))}

    assert warned(state("grpo", 2, 2), 2) == ""
    # scaled as the warning advises: 1 rank x 4 -> 2 ranks x 2, the same 4 rows
    text = warned(state("grpo", 2, 1, "train.prompts_per_step=4"), 2, "train.prompts_per_step=2")
    assert f"train.resume: {tmp_path} was written by 1 rank(s), this run has 2; its StepGRPO steps draw 4 rows " \
           "each (train.prompts_per_step=2 per rank x 2), as the run it continues did; each rank's random state " \
           "starts afresh" in text
    text = warned(state("grpo", 2, 2, "train.prompts_per_step=3"), 1, "train.prompts_per_step=3")
    assert "draw 3 rows each (train.prompts_per_step=3 per rank x 1), where the run it continues drew 6 " \
           "(train.prompts_per_step=6 keeps them)" in text
    text = warned(state("warmup", 1, 3, "warmup.batch_size=1"), 2, "warmup.batch_size=1")
    assert "its warm-up steps draw 2 rows each (warmup.batch_size=1 per rank x 2), where the run it continues " \
           "drew 3 (no whole warmup.batch_size keeps them on 2 rank(s))" in text
    # the warm-up's last checkpoint: StepGRPO's steps come next (not begun: would have)
    text = warned(state("warmup", 4, 2, "train.prompts_per_step=2"), 1, "train.prompts_per_step=2")
    assert "its StepGRPO steps draw 2 rows each (train.prompts_per_step=2 per rank x 1), where the run it " \
           "continues would have drawn 4 (train.prompts_per_step=4 keeps them)" in text
    text = warned(state("grpo", 6, 2), 1)  # nothing left to train (a stop in the final evaluation)
    assert "rows" not in text and "this run has 1; each rank's random state starts afresh" in text
    assert "DeepSpeed's universal form" in warned(state("grpo", 2, 2, ds=True), 1)
    assert "universal" not in warned(state("grpo", 2, 2), 1)
    assert warned(state("grpo", 2, 2), 1, rank=1) == ""
    with pytest.raises(UserError, match="names no number of ranks"):
        check_resume_world({"phase": "grpo", "step": 1}, tmp_path, load_config(None, []), Dist())


def test_overwrite_removes_the_vllm_engine_model_folder(tmp_path):
    """train.overwrite=true removes every output of the run before, the vLLM engine's model folder
    (rollout.engine=vllm) among them; a file of the user's stays."""
    from r1vl.train import clear_previous_run

    (tmp_path / "vllm_engine_model").mkdir()
    (tmp_path / "vllm_engine_model" / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    assert sorted(clear_previous_run(tmp_path)) == ["metrics.jsonl", "vllm_engine_model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_check_resume_config_names_the_differences(tmp_path, caplog):
    from r1vl.config import load_config, to_dict
    from r1vl.train import check_resume_config

    files = ["data.train=d/train.jsonl", "data.test=d/test.jsonl"]  # (the built-in task's seed would be refused)
    saved = to_dict(load_config(None, files))
    cfg = load_config(None, [*files, "train.max_steps=99", "logging.level=DEBUG", "seed=3",
                             "rollout.num_generations=4"])
    with caplog.at_level("WARNING", logger="r1vl.train"):
        assert check_resume_config(saved, cfg, tmp_path) == ["rollout.num_generations", "seed"]
    assert "seed: 0 -> 3" in caplog.text
    assert check_resume_config(saved, load_config(None, [*files, "train.max_steps=99"]), tmp_path) == []
    caplog.clear()  # ranks other than 0 (warn=False): the same check, no second warning
    with caplog.at_level("WARNING", logger="r1vl.train"):
        assert check_resume_config(saved, cfg, tmp_path, warn=False) == ["rollout.num_generations", "seed"]
    assert caplog.text == ""
    # the micro-batch size is memory alone, except under bnpo (a token mean per micro-batch)
    mbs = [*files, "train.micro_batch_size=3"]
    assert check_resume_config(saved, load_config(None, mbs), tmp_path, warn=False) == []
    bnpo = to_dict(load_config(None, [*files, "algorithm.loss_type=bnpo"]))
    assert check_resume_config(bnpo, load_config(None, [*mbs, "algorithm.loss_type=bnpo"]), tmp_path,
                               warn=False) == ["train.micro_batch_size"]
    assert check_resume_config(bnpo, load_config(None, mbs), tmp_path, warn=False) == [
        "algorithm.loss_type", "train.micro_batch_size"]


def test_resuming_a_finished_run_from_an_earlier_checkpoint_is_said(tmp_path, data_dir, capfd):
    """A finished run resumed from a checkpoint before its end trains its last steps again and
    replaces final/: a warning says so (the logs after the checkpoint are dropped silently)."""
    out = tmp_path / "run"
    fast = ("train.max_steps=2", "train.save_every=1", "train.eval_before=false", "train.eval_after=false",
            "logging.plot=false")
    assert main(_args(out, data_dir, *fast)) == 0
    assert main(_args(out, data_dir, *fast, "train.resume=true")) == 0  # from its last step: nothing redone
    assert "holds a finished run" not in capfd.readouterr().err
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(_args(out, data_dir, *fast, f"train.resume={out / 'checkpoints' / 'grpo-000001'}")) == 0
    assert f"{out} holds a finished run (up to grpo step 2, 1 step(s) after grpo step 1); continuing from " \
           "grpo-000001 trains 1 of them again, and replaces final/" in capfd.readouterr().err
    # a run that ends there (train.max_steps=1): the step after it is dropped, final/ replaced
    assert main(_args(copy, data_dir, *fast, "train.max_steps=1",
                      f"train.resume={copy / 'checkpoints' / 'grpo-000001'}")) == 0
    assert "continuing from grpo-000001 drops 1 past this run's end (warmup.steps=2, train.max_steps=1), and " \
           "replaces final/" in capfd.readouterr().err


def test_a_resume_on_other_data_is_refused(tmp_path):
    """A checkpoint continues only on the data it was trained on: a resume without the first
    run's data overrides went on with the built-in task, said by a warning alone. Judged from the
    configs before any data is made where they tell (the built-in task where a file was, or made
    with other sizes or another seed: of the splits used, the held-out one only when both runs
    evaluate); files are compared by content once loaded (the next test), so the same file spelled
    otherwise or moved, or the task's own files, are no refusal here, except for a checkpoint
    written without fingerprints (by resolved path then). The refusal names the run's settings."""
    from r1vl.config import load_config, to_dict
    from r1vl.train import UserError, check_resume_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    ck = run / "checkpoints" / "grpo-000003"

    def check(saved_args, args, fingerprints=True):
        return check_resume_config(to_dict(load_config(None, saved_args)), load_config(None, args), ck,
                                   fingerprints=fingerprints)

    with pytest.raises(UserError) as e:
        check(["data.train=mine/train.jsonl", "data.test=mine/test.jsonl"], [f"output_dir={run}"])
    msg = str(e.value)
    assert "data.train='mine/train.jsonl', this run 'synthetic'" in msg and "data.test=" in msg
    assert f"--config {run / 'config.yaml'} train.resume=true" in msg
    with pytest.raises(UserError, match="data.synthetic_train_size=50, this run 3000"):
        check(["data.synthetic_train_size=50"], [])
    with pytest.raises(UserError, match="seed=0, this run 5"):
        check([], ["seed=5"])  # the built-in task made with another seed
    files = ["data.train=data/train.jsonl", "data.test=data/test.jsonl"]
    moved = [f"data.train={tmp_path / 'data' / 'train.jsonl'}", "data.test=elsewhere/test.jsonl"]
    assert "data.train" in check(files, moved)  # by content, later: warned here
    with pytest.raises(UserError, match="data.train='data/train.jsonl', this run"):
        check(files, moved, fingerprints=False)  # a checkpoint without fingerprints: by resolved path
    assert check(files, [f"data.train={Path('data/train.jsonl').resolve()}", files[1]], fingerprints=False) == [
        "data.train"]  # the same file spelled otherwise: warned only
    assert "data.train" in check([], files)  # the task's own files, say: by content, later
    # the held-out split's task matters only when both runs evaluate; it depends on both sizes
    quiet = ["train.eval_before=false", "train.eval_after=false"]
    with pytest.raises(UserError, match="data.synthetic_test_size=9, this run 400"):
        check(["data.synthetic_test_size=9"], [])
    assert check(quiet + ["data.synthetic_test_size=9"], quiet) == ["data.synthetic_test_size"]  # warned only
    on_file = [files[0], "data.test=synthetic", *quiet]  # (a file beside the task's held-out split: no evaluation)
    assert check([*on_file, "seed=1", "data.synthetic_train_size=60"], [*on_file, "seed=2", "data.test=x.jsonl"]) \
        == ["data.synthetic_train_size", "data.test", "seed"]  # nothing evaluated: warned only
    # another run's checkpoint, into this output_dir: that run's settings, this output_dir and checkpoint
    with pytest.raises(UserError) as e:
        check(["data.synthetic_train_size=50"], [f"output_dir={tmp_path / 'new'}"])
    assert f"--config {run / 'config.yaml'} output_dir={tmp_path / 'new'} train.resume={ck}" in str(e.value)
    (run / "config.yaml").unlink()  # a checkpoint copied out of its run: no command to name
    with pytest.raises(UserError, match="the data settings of the run that wrote it"):
        check(["data.synthetic_train_size=50"], [])


def test_a_resume_reads_its_data_files_by_content(tmp_path, data_dir, capsys):
    """Files are compared by content (rows, problem, solution, key steps): the same data moved
    elsewhere resumes; a changed row is refused, by --check too."""
    import shutil

    rows = [json.loads(x) for x in (Path(data_dir) / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["image_path"] = str(Path(data_dir) / r["image_path"])
    first = tmp_path / "a" / "train.jsonl"
    first.parent.mkdir()
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    fast = ("train.max_steps=2", "train.save_every=1", "train.eval_before=false", "train.eval_after=false",
            "logging.plot=false")
    assert main(_args(out, data_dir, *fast, f"data.train={first}", "train.max_steps=1")) == 0
    moved = tmp_path / "b" / "train.jsonl"  # the same rows, elsewhere: resumes (with a warning)
    moved.parent.mkdir()
    shutil.copy(first, moved)
    shutil.rmtree(first.parent)
    assert main(_args(out, data_dir, *fast, f"data.train={moved}", "train.resume=true")) == 0
    capsys.readouterr()
    rows[5]["solution"] = rows[5]["solution"].replace("### The final answer is:", "So.\n### The final answer is:")
    moved.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for check in (["--check"], []):
        assert main([*check, *_args(out, data_dir, *fast, f"data.train={moved}", "train.resume=true",
                                    "train.max_steps=3")]) == 2
        err = capsys.readouterr().err
        assert "was written by a run on other data (data.train: the same 60 rows with other text, or in another " \
               f"order): {moved} changed since, or is another file" in err, err
    assert main(_args(out, data_dir, *fast, f"data.train={moved}", "train.resume=true", "train.max_steps=3",
                      "data.skip_bad_rows=true")) == 2  # (not a setting that lets it through)


def test_the_stop_message_comes_from_rank_0_only(caplog):
    """A terminal's Ctrl-C reaches every rank: each stops, rank 0 alone says so."""
    from r1vl.train import StopSignal
    from r1vl.utils import Dist

    for quiet, lines in ((False, 1), (True, 0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="r1vl.train"), StopSignal() as stop:
            stop.quiet = quiet
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert stop.agreed(Dist()) == signal.SIGUSR1
        assert caplog.text.count("stopping at the end of this step") == lines


def test_a_signal_during_start_up_is_announced_by_rank_0_only(caplog, monkeypatch):
    """A SIGTERM to every process of a torchrun (a scheduler's) during the start-up checks, before
    run() had set `quiet` from its rank: every rank printed the stop message. Rank 1 is quiet from
    torchrun's RANK on."""
    from r1vl.train import StopSignal

    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger="r1vl.train"), StopSignal():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
        assert caplog.text.count("stopping at the end of this step") == lines, rank


def test_non_finite_loss_stops_the_run(tmp_path, data_dir, capsys):
    """A diverged step (here: a huge warm-up lr without clipping) stops the run at once with
    the step named (its gradient norm, else its loss, is not finite); the step is in metrics.jsonl."""
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "warmup.steps=6", "warmup.lr=1e4", "optim.max_grad_norm=0",
                      "warmup.warmup_steps=0", "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "warmup step" in err and "warmup.lr=10000" in err
    assert any(f"the {what} is {x}" in err.lower() for what in ("loss", "gradient norm") for x in ("nan", "inf"))
    recs = _metrics(out)
    assert recs[-1]["phase"] == "warmup" and not math.isfinite(recs[-1]["loss"] + recs[-1]["grad_norm"])
    assert all(math.isfinite(r["loss"] + r["grad_norm"]) for r in recs[:-1])
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("phase, at, mu", [("warmup", 2, 1), ("grpo", 1, 1), ("grpo", 1, 2)])
def test_non_finite_gradient_is_not_applied_and_stops_the_run(phase, at, mu, tmp_path, data_dir, capsys,
                                                              monkeypatch):
    """A finite loss whose gradient holds an inf (fp16 overflow in the backward pass) made the
    clipped update NaN in every weight: the run went on to the next step's NaN loss, and a
    checkpoint saved at the step held NaN weights. The update is not applied, the run stops at
    that step naming the gradient norm, and the weights and the checkpoints before it are finite.
    With num_iterations=2 the step's second pass is not run (it was, and applied)."""
    import r1vl.algo as algo

    real, calls, policies = algo._optimizer_step, [], []
    poison_at = at + (2 if phase == "grpo" else 0)  # FAST: 2 warm-up steps, one optimizer step each

    def poisoned(policy, params, optimizer, scheduler, max_grad_norm):
        calls.append(1)
        if len(calls) == poison_at:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
            policies.append(policy)
        return real(policy, params, optimizer, scheduler, max_grad_norm)

    monkeypatch.setattr(algo, "_optimizer_step", poisoned)
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=0",
                      f"algorithm.num_iterations={mu}")) == 2
    err = capsys.readouterr().err
    assert f"{phase} step {at}: the gradient norm is inf" in err and "r1vl did not apply the non-finite update" \
        in err, err
    assert len(calls) == poison_at  # no optimizer step after it
    recs = [r for r in _metrics(out) if r["phase"] in ("warmup", "grpo")]
    assert (recs[-1]["phase"], recs[-1]["step"]) == (phase, at) and math.isinf(recs[-1]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert all(torch.isfinite(p).all() for p in policies[0].parameters())
    names = sorted(c.name for c in (out / "checkpoints").iterdir())
    assert names == (["warmup-000001"] if phase == "warmup" else ["warmup-000001", "warmup-000002"]), names


def test_the_gradient_norm_is_taken_in_fp32():
    """float16 gradients of 300 in 200k elements: their norm (134164) is finite but over float16's
    65504, and torch's clip_grad_norm_ took it in float16: inf, which now stops the run. The norm
    is taken in fp32, and the clipping scales the gradients as clip_grad_norm_ does in fp32."""
    from r1vl.algo import _clip

    p = torch.nn.Parameter(torch.zeros(200_000, dtype=torch.float16))
    p.grad = torch.full_like(p, 300.0)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([3.0, 4.0, 12.0])
    norm = _clip([p, q], 1.0)
    want = math.sqrt(200_000 * 300.0 ** 2 + 13.0 ** 2)
    assert norm == pytest.approx(want, rel=1e-4)  # fp32 accumulation over 200k terms
    assert float(p.grad[0]) == pytest.approx(300.0 / want, rel=1e-3)
    assert q.grad.tolist() == pytest.approx([3.0 / want, 4.0 / want, 12.0 / want], rel=1e-4)
    a = torch.nn.Parameter(torch.zeros(5))
    a.grad = torch.arange(5.0)
    b = torch.nn.Parameter(torch.zeros(5))
    b.grad = torch.arange(5.0)
    assert _clip([a], 0.0) == pytest.approx(math.sqrt(30.0)) and a.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert _clip([a], 1.0) == pytest.approx(float(torch.nn.utils.clip_grad_norm_([b], 1.0)))
    assert torch.allclose(a.grad, b.grad)


def test_non_finite_step_message_says_what_reached_the_weights(tmp_path):
    """Whether the step's non-finite update was applied, as the update reported it (r1vl's own
    skip, DeepSpeed's overflow check); under DeepSpeed's fp16 loss scaler a skipped overflow step
    is routine: no stop. The fp16 exemption is the DeepSpeed config's precision, not model.dtype."""
    from r1vl.config import load_config
    from r1vl.train import UserError, check_finite_loss

    base = json.loads((ROOT / "configs" / "ds_zero2.json").read_text())

    def ds_cfg(stage, precision, *extra):
        raw = copy.deepcopy(base)
        raw["zero_optimization"]["stage"] = stage
        raw["bf16"]["enabled"] = precision == "bf16"
        raw["fp16"] = {"enabled": precision == "fp16"}
        path = tmp_path / f"ds{stage}{precision}.json"
        path.write_text(json.dumps(raw))
        return load_config(None, [f"deepspeed={path}", *extra])

    inf_norm = {"phase": "grpo", "step": 3, "loss": 0.5, "grad_norm": float("inf")}
    cases = [(load_config(None, []), 1, "r1vl did not apply the non-finite update"),
             (ds_cfg(2, "bf16"), 1, "DeepSpeed skipped the non-finite update"),
             (ds_cfg(2, "bf16"), 0, "the update has reached the weights"),
             (ds_cfg(0, "fp32", "model.dtype=float16"), 0, "the update has reached the weights")]
    for cfg, skipped, said in cases:
        with pytest.raises(UserError, match="grpo step 3: the gradient norm is inf") as e:
            check_finite_loss(inf_norm, cfg, skipped)
        assert said in str(e.value), (cfg.deepspeed, str(e.value))
    check_finite_loss(inf_norm, ds_cfg(2, "fp16"), 1)  # the loss scaler's overflow step: the run goes on
    with pytest.raises(UserError, match="the loss is nan .*the update has reached the weights"):
        check_finite_loss({**inf_norm, "loss": float("nan"), "grad_norm": 1.0}, ds_cfg(2, "fp16"))
    check_finite_loss({**inf_norm, "grad_norm": 1.0}, load_config(None, []))


@pytest.mark.parametrize("check", [True, False])
def test_deepspeed_skips_a_non_finite_step_and_the_run_stops(check, tmp_path, data_dir, capsys, monkeypatch):
    """DeepSpeed's ZeRO-2 (bf16, one process) on a warm-up step whose gradients are all inf (a
    finite loss): the run stops at it, and the message says what the engine did, which its config
    decides (bf16.check_grad_overflow, on by default: skipped, the weights finite; off: applied)."""
    pytest.importorskip("deepspeed")
    import r1vl.algo as algo
    from r1vl import ds

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    real_backward, real_step, calls, engines = algo._backward, ds.step, [], []

    def backward(policy, loss, last):
        calls.append(1)
        return real_backward(policy, InfGrad.apply(loss) if len(calls) == 2 else loss, last)

    def step(engine):
        engines.append(engine)
        return real_step(engine)

    monkeypatch.setattr(algo, "_backward", backward)
    monkeypatch.setattr(ds, "step", step)
    monkeypatch.setenv("DS_BUILD_OPS", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    raw = json.loads((ROOT / "configs" / "ds_zero2.json").read_text())
    raw["bf16"]["check_grad_overflow"] = check
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    out = tmp_path / "run"
    assert main(_args(out, data_dir, f"deepspeed={tmp_path / 'ds.json'}", "warmup.steps=3",
                      "train.max_steps=0", "train.eval_before=false", "train.eval_after=false")) == 2
    err = capsys.readouterr().err
    said = "DeepSpeed skipped the non-finite update" if check else "the update has reached the weights"
    assert "warmup step 2: the gradient norm is inf" in err and said in err, err
    assert [r["step"] for r in _metrics(out)] == [1, 2] and math.isinf(_metrics(out)[-1]["grad_norm"])
    finite = [bool(torch.isfinite(p).all()) for p in ds.base_optimizer(engines[-1]).param_groups[0]["params"]]
    assert len(engines) == 2 and finite and all(finite) == check, finite


def test_prompt_template_reaches_training_prompts(tmp_path, data_dir, monkeypatch):
    """data.prompt_template=verbatim: warm-up and StepGRPO prompts carry the problem alone;
    the held-out evaluation keeps the instruction."""
    import r1vl.eval as ev

    seen = []
    real = ev.make_prompt

    def spy(processor, sample, template="r1vl"):
        if hasattr(sample, "solution"):  # a sample's prompt, not the start-up length check's
            seen.append(template)
        return real(processor, sample, template)

    monkeypatch.setattr(ev, "make_prompt", spy)
    assert main(_args(tmp_path / "run", data_dir, "train.max_steps=1", "data.prompt_template=verbatim",
                      "logging.plot=false")) == 0
    n_train = 2 * 2 + 2  # warm-up: 2 steps x 2 prompts; StepGRPO: 1 step x 2 prompts
    assert seen.count("verbatim") == n_train and set(seen) == {"verbatim", "r1vl"}  # evaluation: r1vl


def test_check_reads_the_rows(tmp_path, data_dir, capsys):
    """--check (make train runs it before torchrun) reads every data row, as the run would."""
    good = (Path(data_dir) / "test.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"  # image paths are relative to the file: point them at data_dir's
    good = [json.dumps({**json.loads(x), "image_path": str(Path(data_dir) / json.loads(x)["image_path"])})
            for x in good[:1]]
    row = json.loads(good[0])
    row.pop("solution")
    bad.write_text("\n".join([good[0], json.dumps(row)]) + "\n")
    for name in ("train", "test"):
        assert main(["--check", f"output_dir={tmp_path / 'o'}", f"data.{name}={bad}",
                     f"data.{'test' if name == 'train' else 'train'}={Path(data_dir) / 'test.jsonl'}"]) == 2
        err = capsys.readouterr().err
        assert "bad.jsonl:2" in err and "solution" in err, err
    assert main(["--check", f"output_dir={tmp_path / 'o'}", f"data.train={Path(data_dir) / 'train.jsonl'}",
                 f"data.test={Path(data_dir) / 'test.jsonl'}"]) == 0
    assert "config OK" in capsys.readouterr().out


def test_rows_left_out_are_listed(tmp_path, data_dir, capsys):
    """data.skip_bad_rows=true: malformed rows and prompts over data.max_prompt_length are left
    out; skipped_rows.jsonl lists each with its reason and summary.json counts them."""
    rows = [json.loads(x) for x in (Path(data_dir) / "train.jsonl").read_text().splitlines()]
    rows = [{**r, "image_path": str(Path(data_dir) / r["image_path"])} for r in rows]
    rows[3].pop("solution")
    rows[7]["problem"] = "0123456789" * 60  # digits are one token each
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(_args(out, data_dir, f"data.train={train}", f"data.test={Path(data_dir) / 'test.jsonl'}",
                      "train.max_steps=1", "logging.plot=false")) == 2
    err = capsys.readouterr().err  # without it: the row, and the setting that would leave it out
    assert f"{train}:4" in err and "data.skip_bad_rows=true leaves bad rows out" in err
    assert main(_args(out, data_dir, f"data.train={train}", f"data.test={Path(data_dir) / 'test.jsonl'}",
                      "data.skip_bad_rows=true", "train.max_steps=1",
                      "logging.plot=false")) == 0
    listed = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["split"], r["row"]) for r in listed] == [("train", f"{train}:4"), ("train", f"{train}:8")]
    assert "solution" in listed[0]["reason"] and "max_prompt_length=512" in listed[1]["reason"]
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["train_rows"] == len(rows) - 2 and data["train_skipped"] == 2 and data["test_skipped"] == 0


def test_log_every():
    from r1vl.train import log_every

    assert [s for s in range(1, 61) if log_every(s, 60)] == [1] + list(range(3, 61, 3))
    assert [s for s in range(1, 6) if log_every(s, 5)] == [1, 2, 3, 4, 5]
    assert [s for s in range(1, 401) if log_every(s, 400)][:3] == [1, 20, 40]


def test_eta(monkeypatch):
    from r1vl import train

    monkeypatch.setattr(train.time, "perf_counter", lambda: 1000.0 + 3 * 12.5)
    assert train.eta(1000.0, 3, 300) == ", left 1:01:52"  # 297 steps x 12.5 s = 3712 s
    assert train.eta(1000.0, 300, 300) == ", left 0:00:00"
    assert train.eta(1000.0, 0, 300) == ""


def test_no_stepgrpo_step_evaluates_once(tmp_path, data_dir, monkeypatch):
    """train.max_steps=0: the final weights are the warm-up's, so the held-out evaluation
    after the warm-up is reused as the final one (summary.json still has every key)."""
    import r1vl.eval as ev

    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=0", "logging.plot=false")) == 0
    assert len(calls) == 1
    s = json.loads((out / "summary.json").read_text())
    for k in ("accuracy", "reward", "step_rar", "step_rvr"):
        assert s[f"{k}_final"] == s[f"{k}_after_warmup"] is not None, k
    assert s["accuracy_by_family_final"] == s["accuracy_by_family_after_warmup"] and s["eval_n"] == 4
    assert s["paired"]["fixed"] == s["paired"]["broken"] == 0 and s["steps"] == 0
    assert [r.get("after") for r in _metrics(out) if r["phase"] == "eval"] == ["warmup", "grpo"]


def test_windows_is_refused_at_start(tmp_path, monkeypatch, capsys):
    """On Windows the first StepGRPO step's rewards would fail after the whole warm-up (the reward
    workers need pipe descriptors, the deadline a signal timer): --check and a run stop at once."""
    from r1vl.rewards.pool import platform_problem

    assert platform_problem("linux") is None and platform_problem("darwin") is None
    monkeypatch.setattr(sys, "platform", "win32")
    for argv in (["--check", f"output_dir={tmp_path / 'a'}"], [f"output_dir={tmp_path / 'b'}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "r1vl.train: error: rewards cannot be scored on win32" in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_a_math_verify_older_than_0_8_is_refused_at_start(tmp_path, monkeypatch, capsys):
    """math-verify 0.7 (setup.py allowed it) takes no None for the timeouts r1vl turns off: every
    parse failed inside it, silently, and every answer it was needed for scored 0 (\\frac{10}{2}
    against 5). The trainer's start (and --check, and the eval CLI's) refuses it in one line."""
    from importlib import metadata

    from r1vl.rewards.pool import math_verify_problem, platform_problem

    assert math_verify_problem() is None  # this environment's
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.7.0" if name == "math-verify" else real(name))
    assert platform_problem("linux") is None  # another machine's platform alone
    for argv in (["--check", f"output_dir={tmp_path / 'a'}"], [f"output_dir={tmp_path / 'b'}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ("r1vl.train: error: math-verify 0.7.0 is installed, and r1vl needs 0.8 or newer" in err
                and "pip install 'math-verify>=0.8,<0.10'" in err and "Traceback" not in err), err
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(metadata, "version", lambda name: "0.9.1" if name == "math-verify" else real(name))
    assert math_verify_problem() is None


def test_without_matplotlib_and_tensorboard_the_run_says_so(tmp_path, data_dir, monkeypatch, capsys):
    """A plain `pip install -e .` has neither: the run goes on, and one line each says what is
    missing and how to get it (plot.png and tensorboard/ are in the README's list of outputs)."""
    for mod in ("matplotlib", "matplotlib.pyplot", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, mod, None)  # an import of it raises ImportError
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=0", "logging.tensorboard=true")) == 0
    err = capsys.readouterr().err
    assert "no plot.png: matplotlib is not installed (pip install matplotlib" in err, err[-3000:]
    assert "TensorBoard disabled (ModuleNotFoundError" in err and "pip install tensorboard" in err, err[-3000:]
    assert (out / "summary.json").is_file()
    assert not (out / "plot.png").exists() and not (out / "tensorboard").exists()


def test_truncate_after_a_checkpoint_drops_the_tail_of_both_logs(tmp_path):
    """A run killed after step 4 and resumed from its step-2 checkpoint: metrics.jsonl and
    rollouts.jsonl keep the warm-up, its evaluation and StepGRPO steps 1-2 only."""
    from r1vl.utils import MetricsWriter

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for s in (1, 2):
        w.write({"phase": "warmup", "step": s})
    w.write({"phase": "eval", "after": "warmup", "step": 0})
    for s in (1, 2, 3, 4):
        w.write({"phase": "grpo", "step": s})
        w.write_rollouts({"phase": "grpo", "step": s, "completions": []})
        if s == 3:
            w.write({"phase": "eval", "after": "grpo", "step": 3, "final": False})
    with (tmp_path / "rollouts.jsonl").open("a") as f:
        f.write('{"phase": "grpo", "st')  # a line cut short by the kill
    w.truncate_after("grpo", 2)
    kept = [(r["phase"], r["step"]) for r in _metrics(tmp_path)]
    assert kept == [("warmup", 1), ("warmup", 2), ("eval", 0), ("grpo", 1), ("grpo", 2)]
    rolls = [json.loads(x)["step"] for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert rolls == [1, 2]
    # a kill while the log is rewritten leaves it whole (it was truncated to nothing, then written)
    before = (tmp_path / "metrics.jsonl").read_text()
    import r1vl.files

    def killed(fd):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(r1vl.files.os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            w.truncate_after("grpo", 1)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "rollouts.jsonl"]
    # a fresh writer (a new run, not a resume) starts both logs anew
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, fresh=True)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "rollouts.jsonl").exists()


@pytest.mark.parametrize("keep,expect", [(1, ["grpo-000003"]),
                                         (0, ["grpo-000001", "grpo-000002", "grpo-000003", "warmup-000001",
                                              "warmup-000002"])])
def test_keep_checkpoints(tmp_path, data_dir, keep, expect):
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=3", "train.save_every=1", f"train.keep_checkpoints={keep}",
                      "train.eval_before=false", "train.eval_after=false", "logging.plot=false")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == expect


def test_stray_rank_without_world_size_is_one_line(tmp_path, capsys, monkeypatch):
    """RANK=1 left by an enclosing job, no WORLD_SIZE: the trainer's messages are rank 0's, so it
    ended in a traceback or said nothing; now one line, before anything is written."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == ("r1vl.train: error: RANK=1 but WORLD_SIZE is unset: not a torchrun "
                                               "environment; unset RANK to run as one process, or launch with torchrun")
    assert not (tmp_path / "run").exists()


def test_solutions_longer_than_what_is_generated_or_learned_are_said(tmp_path, data_dir, capsys):
    """Reference solutions longer than rollout.max_completion_length (completions like them cut
    before the answer: reward 0, with only `truncated` in metrics.jsonl saying why) or than
    warmup.max_length (cut silently) are said at start, by --check too."""
    extra = ("warmup.max_length=5", "rollout.max_completion_length=6", "train.max_steps=1",
             "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    assert main(_args(tmp_path / "cut", data_dir, *extra)) == 0
    err = capsys.readouterr().err
    gen = [x for x in err.splitlines() if "reference solutions are longer than rollout.max_completion_length=6" in x]
    warm = [x for x in err.splitlines() if "reference solutions are longer than warmup.max_length=5" in x]
    assert len(gen) == len(warm) == 1, err
    assert "cut before their final answer" in gen[0] and "the warm-up learns them cut" in warm[0]
    train = Path(data_dir) / "train.jsonl"
    assert main(["--check", f"output_dir={tmp_path / 'c'}", f"data.train={train}",
                 f"data.test={Path(data_dir) / 'test.jsonl'}", "rollout.max_completion_length=6"]) == 0
    err = capsys.readouterr().err
    assert "reference solutions are longer than rollout.max_completion_length=6" in err
    assert "images are scaled down" not in err  # 84x84 images, data.max_pixels 12544
    # and images data.max_pixels shrinks, at start (INFO: a run's log, pytest's capture in-process)
    assert main(_args(tmp_path / "small", data_dir, "data.max_pixels=3136", "warmup.steps=0", "train.max_steps=0",
                      "train.eval_before=false", "train.eval_after=false", "logging.plot=false")) == 0
    assert "data.train: 60 of 60 images are scaled down to at most data.max_pixels=3136 pixels (the largest is " \
           "84x84)" in capsys.readouterr().err
    # long enough: nothing said
    assert main(["--check", f"output_dir={tmp_path / 'c'}", f"data.train={train}",
                 f"data.test={Path(data_dir) / 'test.jsonl'}", "rollout.max_completion_length=512"]) == 0
    assert "reference solutions are longer" not in capsys.readouterr().err


def test_solution_lengths_are_measured_in_chunks(caplog):
    """The tokenizer took every reference solution in one call: its encodings held ~35 KB a row
    at the peak (8.5 GB of a 10.3 GB --check at 260,000 rows). Now at most 1,024 a call, the
    lengths as before (the longest row is named), and a start line over 10,000 rows."""
    from types import SimpleNamespace

    from r1vl.config import load_config
    from r1vl.models import train_tokenizer
    from r1vl.train import check_solution_lengths

    tok = train_tokenizer(["### Step 1: one two three", "### The final answer is: 4"], vocab_size=300)
    calls = []

    def counting(texts, **kw):
        calls.append(len(texts))
        return tok(texts, **kw)

    sols = [f"### Step 1: {'one ' * (3 if i != 10_007 else 40)}\n### The final answer is: 4" for i in range(12_000)]
    dataset = SimpleNamespace(text_only=lambda: [SimpleNamespace(solution=x) for x in sols],
                              source=lambda i: f"data.jsonl:{i + 1}")
    cfg = load_config(None, ["rollout.max_completion_length=30", "warmup.steps=0"])
    with caplog.at_level(logging.INFO, logger="r1vl.train"):
        check_solution_lengths(dataset, SimpleNamespace(tokenizer=counting), cfg)
    assert max(calls) <= 1024 and sum(calls) == 12_000
    longest = len(tok(sols[10_007], add_special_tokens=False)["input_ids"])
    assert longest > 30
    assert (f"1 of 12000 reference solutions are longer than rollout.max_completion_length=30 tokens (longest "
            f"data.jsonl:10008: {longest})") in caplog.text
    assert "data.train: measuring 12000 reference solutions in tokens" in caplog.text


def test_check_shows_its_progress(tmp_path, data_dir):
    """python -m r1vl.train --check printed no log line (its logging was never set up): minutes
    of reading, decoding and measuring at 100,000s of rows went by in silence."""
    r = subprocess.run([sys.executable, "-m", "r1vl.train", "--check", f"output_dir={tmp_path / 'o'}",
                        f"data.train={Path(data_dir) / 'train.jsonl'}", f"data.test={Path(data_dir) / 'test.jsonl'}"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config OK" in r.stdout
    assert "data.train: the images of 60 rows decoded, 0 unreadable" in r.stderr, r.stderr
    # before that, reading: 2 minutes at 260,000 rows, which --check spent in silence
    train = Path(data_dir) / "train.jsonl"
    assert f"data.train: reading {train} (every row checked, every image header read)" in r.stderr
    assert "data.train: 60 rows read (" in r.stderr and "data.test: reading " in r.stderr
    assert "data.train: reference solutions of " in r.stderr and " INFO r1vl.train: " in r.stderr


def test_reference_solutions_without_the_response_format_are_said(tmp_path, data_dir, caplog, capfd):
    """Solutions the warm-up learns that StepRVR scores 0 (no Step sections, ...): said at start,
    by --check too, with their count and the first row; the built-in task's are in the format."""
    rows = [json.loads(x) for x in (Path(data_dir) / "train.jsonl").read_text().splitlines()]
    for r in rows[3:6]:
        r["solution"] = "### The final answer is: " + r["solution"].split("### The final answer is:")[-1].strip()
        r["image_path"] = str(Path(data_dir) / r["image_path"])
    for r in rows[:3] + rows[6:]:
        r["image_path"] = str(Path(data_dir) / r["image_path"])
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = Path(data_dir) / "test.jsonl"
    args = [f"output_dir={tmp_path / 'c'}", f"data.train={train}", f"data.test={test}"]
    with caplog.at_level("WARNING", logger="r1vl.train"):
        assert main(["--check", *args]) == 0
    err = caplog.text
    assert f"3 of {len(rows)} reference solutions are not in the response format StepRVR rewards" in err, err
    assert f"first {train}:4" in err, err
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1vl.train"):
        assert main(["--check", *args, "warmup.steps=0"]) == 0  # no warm-up learns them: nothing said
        assert main(["--check", f"output_dir={tmp_path / 'c'}", f"data.train={Path(data_dir) / 'train.jsonl'}",
                     f"data.test={test}"]) == 0
    assert "response format" not in caplog.text
    capfd.readouterr()
    assert main(_args(tmp_path / "run", data_dir, f"data.train={train}", "train.max_steps=0",
                      "train.eval_before=false", "train.eval_after=false", "logging.plot=false")) == 0
    assert f"3 of {len(rows)} reference solutions are not in the response format" in capfd.readouterr().err


def test_print_config(tmp_path, capsys):
    """--print-config: the resolved config as YAML (overrides applied), loadable again; no run."""
    import yaml

    from r1vl.config import load_config, to_dict

    assert main(["--print-config", "train.max_steps=7", f"output_dir={tmp_path / 'x'}"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.max_steps == 7 and to_dict(cfg) == yaml.safe_load(text)
    assert not (tmp_path / "x").exists()
    assert main(["--print-config", "train.max_step=7"]) == 2  # a typo is still refused
    assert "train.max_step" in capsys.readouterr().err
    # --dotted.key=value (load_config takes it; argparse called it an unrecognized argument) and
    # overrides on both sides of an option (argparse refused the second group)
    assert main(["seed=1", "--print-config", "seed=2", "--train.max_steps=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 2 and cfg["train"]["max_steps"] == 3
    with pytest.raises(SystemExit):
        main(["--print-config", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_resume_drops_eval_outputs_after_the_checkpoint(tmp_path):
    from r1vl.train import EVAL_OUTPUTS, drop_eval_outputs_after

    d = tmp_path / EVAL_OUTPUTS
    d.mkdir()
    for name in ("after_warmup", "grpo_step_000002", "grpo_step_000004", "final"):
        (d / f"{name}.jsonl").write_text("{}\n")
    drop_eval_outputs_after(tmp_path, "grpo", 3)
    assert sorted(p.stem for p in d.iterdir()) == ["after_warmup", "grpo_step_000002"]
    # a warm-up checkpoint (its last step's too) precedes every evaluation: the after-warm-up one goes
    drop_eval_outputs_after(tmp_path, "warmup", 400)  # as its metrics.jsonl record does
    assert sorted(p.stem for p in d.iterdir()) == []


def test_resume_drops_the_summary_and_plot_of_the_run_it_continues(tmp_path):
    """They described the run past the checkpoint (a finished run's 12 steps and final
    evaluation, after a resume from step 6 killed at step 8); the resumed run writes its own."""
    from r1vl.train import EVAL_OUTPUTS, drop_outputs_after

    (tmp_path / EVAL_OUTPUTS).mkdir()
    for name in ("summary.json", "plot.png", "metrics.jsonl", f"{EVAL_OUTPUTS}/final.jsonl",
                 f"{EVAL_OUTPUTS}/after_warmup.jsonl"):
        (tmp_path / name).write_text("{}\n")
    drop_outputs_after(tmp_path, "grpo", 6)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        [f"{EVAL_OUTPUTS}/after_warmup.jsonl", "metrics.jsonl"]


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    """A run killed after StepGRPO step 4, resumed from its step-2 checkpoint, logs steps 3-4
    again: TensorBoard shows each step once, with the resumed run's values (it kept both
    versions of steps 3-4, and a finished run's final evaluation twice)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from r1vl.utils import MetricsWriter

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    w.write({"phase": "warmup", "step": 1, "loss": 2.0})
    for s in (1, 2, 3, 4):
        w.write({"phase": "grpo", "step": s, "reward": float(s)})
    w.write({"phase": "eval", "step": 4, "final": True, "accuracy": 0.5})
    w.close()
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=True, fresh=False)   # the resume
    w.truncate_after("grpo", 2)
    for s in (3, 4):
        w.write({"phase": "grpo", "step": s, "reward": 10.0 * s})
    w.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    got = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    assert got == {"warmup/loss": [(1, 2.0)], "grpo/reward": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    # each point keeps the time it was logged at (metrics.jsonl's wall_time), not the resume's
    times = {(r["phase"], r["step"]): r["wall_time"] for r in _metrics(tmp_path)}
    assert [round(e.wall_time, 3) for e in ea.Scalars("grpo/reward")] == [times[("grpo", s)] for s in (1, 2, 3, 4)]


def test_a_run_without_stepgrpo_logs_its_one_evaluation_once_to_tensorboard(tmp_path, data_dir):
    """train.max_steps=0: the evaluation after the warm-up is the final one too. metrics.jsonl has
    both records (the summary and the plot read them); TensorBoard (and W&B) got its numbers twice
    at step 0."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=0", "logging.tensorboard=true", "logging.plot=false")) == 0
    evals = [r for r in _metrics(out) if r["phase"] == "eval"]
    assert [(r["after"], r["step"], r.get("final", False)) for r in evals] == [("warmup", 0, False),
                                                                              ("grpo", 0, True)]
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("eval/accuracy")] == [(0, pytest.approx(evals[0]["accuracy"]))]
    assert len(ea.Scalars("warmup/loss")) == 2


def test_updates_run_in_training_mode_so_checkpointing_recomputes(tmp_path, data_dir, monkeypatch):
    """model.gradient_checkpointing=true did nothing: the policy came from from_pretrained in eval
    mode, where HF's checkpointed layers run plainly, and stayed there for the warm-up and for
    StepGRPO with num_iterations=1 (the memory it promises was never saved). Every module is in
    training mode in each update, and with checkpointing each decoder layer runs twice per
    micro-batch (the recompute in the backward pass), once without."""
    import r1vl.algo as algo

    reals = {name: getattr(algo, name) for name in ("sft_step", "grpo_update")}

    def run(checkpointing):
        calls = {"sft_step": [], "grpo_update": []}

        def spy(name):
            real = reals[name]

            def wrapped(policy, *a, **k):
                layers = [m for m in policy.modules() if type(m).__name__.endswith("DecoderLayer")]
                count = [0]
                hooks = [m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in layers]
                try:
                    out = real(policy, *a, **k)
                finally:
                    for h in hooks:
                        h.remove()
                calls[name].append((all(m.training for m in policy.modules()), count[0]))
                return out
            monkeypatch.setattr(algo, name, wrapped)

        spy("sft_step")
        spy("grpo_update")
        out = tmp_path / f"gc{checkpointing}"
        assert main(_args(out, data_dir, "train.max_steps=1", "train.eval_before=false", "train.eval_after=false",
                          f"model.gradient_checkpointing={str(checkpointing).lower()}", "logging.plot=false")) == 0
        return calls

    plain, checkpointed = run(False), run(True)
    for name in ("sft_step", "grpo_update"):
        assert plain[name] and all(training for training, _ in plain[name] + checkpointed[name]), (name, plain)
        assert [2 * n for _, n in plain[name]] == [n for _, n in checkpointed[name]], (name, plain, checkpointed)


def test_frozen_vision_builds_no_graph_grads_go_after_the_step_and_the_reference_stays_in_eval(
        tmp_path, data_dir, monkeypatch):
    """Three states an audit found wrong: with model.freeze_vision and gradient checkpointing,
    transformers' input-embedding hook made the frozen vision tower build a graph (recomputed and
    back-propagated for no gradient); every trainable gradient was held from one step's end to the
    next step's start (through the rollouts, evaluations and saves); and the reference wrapper
    put every reference module in training mode after its first log-prob pass."""
    import r1vl.algo as algo

    seen = {"vision_outputs_with_grad": 0, "vision_outputs": 0, "grads_left": [], "ref_modes": []}
    reals = {name: getattr(algo, name) for name in ("sft_step", "grpo_update", "compute_logprobs")}

    def update_spy(name):
        def wrapped(policy, *a, **k):
            blocks = [m for m in policy.modules() if type(m).__name__.endswith("VisionBlock")]

            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                seen["vision_outputs"] += 1
                seen["vision_outputs_with_grad"] += int(out.requires_grad)
            hooks = [b.register_forward_hook(hook) for b in blocks]
            try:
                return reals[name](policy, *a, **k)
            finally:
                for h in hooks:
                    h.remove()
                seen["grads_left"].append(sum(p.grad is not None for p in policy.parameters()))
        monkeypatch.setattr(algo, name, wrapped)

    def logprobs_spy(policy, *a, **k):
        out = reals["compute_logprobs"](policy, *a, **k)
        if not any(p.requires_grad for p in policy.parameters()):  # the reference
            seen["ref_modes"].append(sum(m.training for m in policy.modules()))
        return out

    update_spy("sft_step")
    update_spy("grpo_update")
    monkeypatch.setattr(algo, "compute_logprobs", logprobs_spy)
    out = tmp_path / "run"
    assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_before=false", "train.eval_after=false",
                      "model.freeze_vision=true", "model.gradient_checkpointing=true", "logging.plot=false")) == 0
    assert seen["vision_outputs"] > 0 and seen["vision_outputs_with_grad"] == 0, seen
    assert len(seen["grads_left"]) == 4 and set(seen["grads_left"]) == {0}, seen
    assert seen["ref_modes"] == [0, 0], seen


def test_resume_past_the_run_end_is_refused(tmp_path, data_dir, capsys):
    """A checkpoint at StepGRPO step 2 resumed with train.max_steps=1 would log step 2's model
    as the final one at step 1: refused, naming the fix."""
    out = tmp_path / "run"
    extra = ("train.save_every=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, "train.max_steps=2", *extra)) == 0
    capsys.readouterr()
    assert main(_args(out, data_dir, "train.max_steps=1", "train.resume=true", *extra)) == 2
    err = capsys.readouterr().err
    assert "is at grpo step 2, beyond this run's train.max_steps=1" in err and "Traceback" not in err


def test_config_naming_a_directory(tmp_path, capsys):
    assert main(["--config", str(tmp_path)]) == 2
    assert "is a directory; expected a YAML file" in capsys.readouterr().err


def test_qwen2_5_vl_tiny_run(tmp_path, data_dir):
    """model.tiny.arch=qwen2_5_vl: the trainer's whole path (warm-up, HF rollouts, shared
    prompts, image de-duplication, the fused loss, save) on Qwen2.5-VL's architecture."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    assert main(_args(out, data_dir, "model.tiny.arch=qwen2_5_vl", "train.max_steps=2", "warmup.lr=0.01")) == 0
    recs = _metrics(out)
    assert [r["phase"] for r in recs] == ["warmup", "warmup", "eval", "grpo", "grpo", "eval"]
    for r in recs:
        if r["phase"] in ("warmup", "grpo"):
            assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(final).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert final.config.vision_config.fullatt_block_indexes == [0]  # model.tiny.vision_depth=1
    init, after = load_file(out / "init" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert init.keys() == after.keys() and any("visual" in k for k in after)
    assert any(not torch.equal(init[k], after[k]) for k in after)  # the warm-up moved the weights


def test_lr_metric_is_the_lr_each_step_applied(tmp_path, data_dir, monkeypatch):
    """metrics.jsonl's lr is the learning rate of the step's (first) optimizer step, read before
    the scheduler moves on, as HF's Trainer logs it: warm-up from 1/W of the peak, not the next
    step's value."""
    import r1vl.algo

    applied = []
    real = r1vl.algo._optimizer_step

    def spy(policy, params, optimizer, scheduler, max_grad_norm):
        applied.append(optimizer.param_groups[0]["lr"])
        return real(policy, params, optimizer, scheduler, max_grad_norm)

    monkeypatch.setattr(r1vl.algo, "_optimizer_step", spy)
    out = tmp_path / "lr"
    assert main(_args(out, data_dir, "warmup.steps=3", "warmup.warmup_steps=2", "train.max_steps=2",
                      "optim.warmup_steps=1", "algorithm.num_iterations=2", "train.eval_before=false",
                      "train.eval_after=false", "logging.plot=false")) == 0
    logged = [r["lr"] for r in _metrics(out) if r["phase"] in ("warmup", "grpo")]
    first_of_step = applied[:3] + applied[3::2]  # warm-up: one optimizer step each; StepGRPO: mu = 2
    assert logged == pytest.approx(first_of_step)
    assert logged[0] == pytest.approx(0.5 * 5e-4)  # warm-up step 1 of W = 2


def test_eval_every_reaches_the_last_step_without_a_final_evaluation(tmp_path, data_dir):
    out = tmp_path / "ev"
    assert main(_args(out, data_dir, "train.max_steps=2", "train.eval_every=1", "train.eval_before=false",
                      "train.eval_after=false", "logging.plot=false")) == 0
    assert [r["step"] for r in _metrics(out) if r["phase"] == "eval"] == [1, 2]
    assert sorted(p.name for p in (out / "eval_outputs").iterdir()) == ["grpo_step_000001.jsonl",
                                                                       "grpo_step_000002.jsonl"]


def test_lengthened_run_keeps_the_eval_every_evaluation_its_final_one_stood_for(tmp_path, data_dir):
    """A finished run lengthened on resume (train.max_steps 2 -> 4, eval_every=2): its step-2
    evaluation was the final one, which the resume drops; it is run again at the resume, so the
    continued run has one at each multiple of eval_every (it had none at step 2)."""
    out = tmp_path / "run"
    extra = ("train.eval_every=2", "train.save_every=2", "train.eval_before=false", "logging.plot=false")
    assert main(_args(out, data_dir, *extra, "train.max_steps=2")) == 0
    assert [(r["step"], r["final"]) for r in _metrics(out) if r["phase"] == "eval"] == [(2, True)]
    assert main(_args(out, data_dir, *extra, "train.max_steps=4", "train.resume=true")) == 0
    assert [(r["step"], r["final"]) for r in _metrics(out) if r["phase"] == "eval"] == [(2, False), (4, True)]
    assert sorted(p.name for p in (out / "eval_outputs").iterdir()) == ["final.jsonl", "grpo_step_000002.jsonl"]
    # a checkpoint whose step had its in-loop evaluation: not run a second time
    assert main(_args(out, data_dir, *extra, "train.max_steps=4", "train.eval_after=false",
                      "train.resume=" + str(out / "checkpoints" / "grpo-000002"))) == 0
    assert [(r["step"], r["final"]) for r in _metrics(out) if r["phase"] == "eval"] == [(2, False), (4, False)]


def test_eval_before_on_a_resume_inside_stepgrpo_is_not_run_on_stepgrpo_weights(tmp_path, data_dir, capsys):
    """A run without the after-warm-up evaluation, resumed inside StepGRPO with
    train.eval_before=true: the weights are StepGRPO's, so no "after warm-up" record is made."""
    extra = ("train.max_steps=2", "train.save_every=1", "train.eval_after=false", "logging.plot=false")
    src = tmp_path / "src"
    assert main(_args(src, data_dir, *extra, "train.eval_before=false")) == 0
    dst = tmp_path / "dst"
    capsys.readouterr()
    assert main(_args(dst, data_dir, *extra, "train.eval_before=true",
                      f"train.resume={src / 'checkpoints' / 'grpo-000001'}")) == 0
    assert not any(r["phase"] == "eval" for r in _metrics(dst))
    assert "had no evaluation after the warm-up" in capsys.readouterr().err


def test_resume_from_an_earlier_checkpoint_drops_the_later_ones(tmp_path, data_dir, capsys):
    """Resuming from an older checkpoint of the same run (after a NaN, say): the later
    checkpoints of the abandoned continuation go, as its logs do; kept, they outranked this
    run's own saves (keep_checkpoints deleted the new one, and train.resume=true then found
    the stale one)."""
    out = tmp_path / "run"
    extra = ("train.save_every=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, *extra, "train.max_steps=3", "train.keep_checkpoints=3")) == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["grpo-000001", "grpo-000002", "grpo-000003"]
    capsys.readouterr()
    assert main(_args(out, data_dir, *extra, "train.max_steps=2", "train.keep_checkpoints=1",
                      f"train.resume={ck / 'grpo-000001'}")) == 0
    assert "removing the later checkpoints grpo-000002, grpo-000003" in capsys.readouterr().err
    assert sorted(p.name for p in ck.iterdir()) == ["grpo-000002"]  # this run's own save


def test_interrupted_saves_are_cleaned_and_a_corrupt_state_is_one_line(tmp_path, capsys):
    from r1vl.utils import STATE_FILE, clean_interrupted_saves

    ck = tmp_path / "checkpoints"
    # (and DeepSpeed's collective saves: .tmp-X-ds / .old-X-ds, which were left behind)
    for name in (".tmp-grpo-000003-99", ".old-grpo-000002-98", ".old-grpo-000001-97", "grpo-000001",
                 ".tmp-grpo-000004-ds", ".old-grpo-000005-ds"):
        (ck / name).mkdir(parents=True)
    (ck / ".old-grpo-000002-98" / STATE_FILE).write_text("the good copy")
    # output_dir's own final/ and warmup/ (a model's copy each), beside a user's files
    for name in (".tmp-final-12", ".tmp-warmup-ds", ".old-final-13", ".tmp-mine-14"):
        (tmp_path / name).mkdir()
    assert len(clean_interrupted_saves(tmp_path, names=("final", "warmup"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-mine-14", "checkpoints", "final"]
    (tmp_path / "final").rmdir()
    done = clean_interrupted_saves(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["grpo-000001", "grpo-000002", "grpo-000005"]
    assert (ck / "grpo-000002" / STATE_FILE).read_text() == "the good copy"  # renamed back, not lost
    assert len(done) == 5
    for name in ("grpo-000005",):
        (ck / name).rmdir()
    (ck / "grpo-000001" / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / ".tmp-final-77").mkdir()  # a kill during final/'s save: the run's start removes it
    assert main([f"output_dir={tmp_path}", f"train.resume={ck / 'grpo-000001'}", *FAST]) == 2
    assert not (tmp_path / ".tmp-final-77").exists()
    err = capsys.readouterr().err
    assert f"train.resume: {ck / 'grpo-000001' / STATE_FILE} is unreadable (" in err and "Traceback" not in err


class _Touch:
    """Unpickled, it creates a file: a stand-in for code run by loading an untrusted pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_state_file_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    from r1vl.utils import STATE_FILE

    ck = tmp_path / "elsewhere" / "grpo-000001"
    ck.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"phase": "grpo", "step": 1, "payload": _Touch(marker)}, ck / STATE_FILE)
    assert main([f"output_dir={tmp_path / 'out'}", f"train.resume={ck}", *FAST]) == 2
    assert not marker.exists()  # torch.load(weights_only=False) created it
    err = capsys.readouterr().err
    assert f"train.resume: {ck / STATE_FILE} holds objects other than tensors and plain data" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "bytes"])
def test_a_state_file_whose_pickle_is_damaged_is_unreadable(tmp_path, damage):
    """A whole zip whose data.pkl is cut short (the weights-only unpickler's EOFError has no text)
    or has bad bytes: one 'unreadable' line, not a traceback, nor the untrusted-objects message."""
    import zipfile

    from r1vl.train import UserError, read_state
    from r1vl.utils import STATE_FILE, rng_state

    torch.save({"phase": "grpo", "step": 1, "rng": [rng_state()], "config": {"seed": 0}}, tmp_path / STATE_FILE)
    with zipfile.ZipFile(tmp_path / STATE_FILE) as z:
        files = {i: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(tmp_path / STATE_FILE, "w") as z:
        for info, data in files.items():
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 2] if damage == "truncated" else data[:40] + b"\xff" * 8 + data[48:]
            z.writestr(info, data)
    with pytest.raises(UserError, match=rf"^train.resume: {tmp_path / STATE_FILE} is unreadable \(.+\); resume from"):
        read_state(tmp_path)


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_rng_states_round_trip_through_a_weights_only_load(tmp_path, numpy_module):
    """rng_state's form loads with weights_only=True and restores every generator; so does the
    form checkpoints had before it (numpy's key as a pickled ndarray, written by numpy 2 or 1)."""
    import random
    import zipfile

    import numpy as np

    from r1vl.train import read_state
    from r1vl.utils import STATE_FILE, rng_state, set_rng_state

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    draws()
    new = rng_state()
    old = dict(new, numpy=np.random.get_state())  # what older checkpoints hold
    expected = draws()
    for name, st in (("new", new), ("old", old)):
        d = tmp_path / name
        d.mkdir()
        torch.save({"rng": [st]}, d / STATE_FILE)
        if name == "old":  # the reconstructor's module as the writing numpy named it
            with zipfile.ZipFile(d / STATE_FILE) as z:
                files = {i: z.read(i) for i in z.infolist()}
            with zipfile.ZipFile(d / STATE_FILE, "w") as z:
                for info, data in files.items():
                    if info.filename.endswith("data.pkl"):  # (numpy 2 writes numpy._core, 1.26 numpy.core)
                        writer = next(m for m in (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
                                      if m + b"_reconstruct" in data)
                        data = data.replace(writer, numpy_module.encode() + b"\n")
                    z.writestr(info, data)
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        set_rng_state(read_state(d)["rng"][0])
        assert draws() == expected, name


def _stop_rank(rank: int, store: str, log_path: str) -> None:
    import logging

    import torch.distributed as dist

    from r1vl.train import StopSignal
    from r1vl.utils import Dist

    logging.basicConfig(filename=log_path, level=logging.WARNING, force=True)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    d = Dist(rank=rank, world=2)
    with StopSignal() as stop:
        stop.quiet = not d.main
        if rank == 1:  # a scheduler signalling one process
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
        assert stop.agreed(d) == signal.SIGUSR1
    dist.destroy_process_group()


def test_a_signal_to_another_rank_is_announced_by_rank_0(tmp_path):
    """Only rank 0 speaks; when the signal reached another rank alone, rank 0 says why the run
    stops (with the stop message on rank 0 only, nobody did)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [ctx.Process(target=_stop_rank, args=(r, str(tmp_path / "store"), str(logs[r]))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    text = [p.read_text() if p.exists() else "" for p in logs]
    assert "SIGUSR1 reached another rank: stopping at the end of this step" in text[0]
    assert text[1] == ""


def test_a_resume_that_cannot_load_its_optimizer_state_stops_before_removing_anything(tmp_path, data_dir, capsys):
    """model.freeze_vision changed on a resume: the checkpoint's optimizer state does not fit.
    The run stops at start with one line, before the later checkpoints, summary.json and
    config.yaml of the run it continues are touched (they were removed, then a bare torch
    ValueError). A run that ended its warm-up resumes into StepGRPO with it changed: the
    warm-up optimizer, with no warm-up step left, is not loaded."""
    import yaml

    out = tmp_path / "run"
    extra = ("train.save_every=1", "train.keep_checkpoints=0", "train.eval_before=false", "logging.plot=false")
    assert main(_args(out, data_dir, *extra, "train.max_steps=3")) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    summary, config = (out / "summary.json").read_text(), (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_args(out, data_dir, *extra, "train.max_steps=3", "model.freeze_vision=true",
                      f"train.resume={out / 'checkpoints' / 'grpo-000001'}")) == 2
    err = capsys.readouterr().err
    assert "its optimizer state holds" in err and "model.freeze_vision" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "summary.json").read_text() == summary and (out / "config.yaml").read_text() == config
    warm = tmp_path / "warm"
    assert main(_args(warm, data_dir, *extra, "train.max_steps=0", "train.eval_after=false")) == 0
    assert main(_args(warm, data_dir, *extra, "train.max_steps=1", "model.freeze_vision=true", "train.resume=true")) == 0
    assert yaml.safe_load((warm / "config.yaml").read_text())["model"]["freeze_vision"] is True


def test_a_resume_with_another_eval_size_ends_without_a_paired_test(tmp_path, data_dir, capsys):
    """data.eval_size may change on a resume (no warning); the final evaluation then covers other
    items than the one after the warm-up: no paired comparison (it raised at the very end, and
    the finished run had no summary.json)."""
    out = tmp_path / "run"
    extra = ("train.save_every=1", "logging.plot=false")
    assert main(_args(out, data_dir, *extra, "train.max_steps=1")) == 0
    capsys.readouterr()
    assert main(_args(out, data_dir, *extra, "train.max_steps=2", "train.resume=true", "data.eval_size=3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary.get("paired") is None
    assert "no paired comparison" in capsys.readouterr().err


def test_images_are_decoded_in_threads_in_order(tmp_path, monkeypatch):
    """The start-up decode of every image (data.verify_images) and a step's samples run in
    threads (PIL releases the GIL): the same results, in row order, as one by one; a truncated
    file is found at its row; a data set of in-memory PIL images stays serial."""
    import threading

    from PIL import Image

    from r1vl.data import load_dataset
    from r1vl.train import image_problems, map_images

    rows = []
    for i in range(24):
        Image.new("RGB", (60 + i, 40), (i * 10 % 256, 50, 90)).save(tmp_path / f"{i}.jpg", quality=90)
        rows.append({"problem": f"p{i}", "solution": f"### The final answer is: {i}", "image_path": f"{i}.jpg",
                     "key_steps": None})
    whole = (tmp_path / "13.jpg").read_bytes()
    (tmp_path / "13.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the decode fails
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(str(tmp_path / "d.jsonl"), min_pixels=3136, max_pixels=12544, check_images=False)
    assert ds.threadsafe_images
    seen = set()
    real = ds.image_problem

    def spy(i):
        seen.add(threading.current_thread().name)
        return real(i)

    monkeypatch.setattr(ds, "image_problem", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    got = image_problems(ds, range(len(ds)))
    assert [i for i, why in enumerate(got) if why] == [13] and "cannot load image" in got[13]
    assert any(name.startswith("r1vl-images") for name in seen)
    samples = map_images(ds.__getitem__, [5, 2, 20, 7, 0, 11, 3, 19], ds)
    assert [s.problem for s in samples] == ["p5", "p2", "p20", "p7", "p0", "p11", "p3", "p19"]
    with pytest.raises(Exception, match="13.jpg"):  # the failure of its row, whatever ran first
        map_images(ds.__getitem__, [1, 2, 13, 4, 5, 6, 7, 8], ds)
    seen.clear()
    monkeypatch.setattr(ds, "threadsafe_images", False)
    assert image_problems(ds, range(len(ds))) == got and seen == {threading.main_thread().name}


def test_a_cut_reference_solution_is_learned_without_an_end_of_turn(tmp_path, data_dir, monkeypatch):
    """warmup.max_length cuts a solution: the cut one gets no end of turn (it taught the model
    to stop mid-solution, its rollouts then ending as 'stop', not 'length'); a whole one does."""
    import r1vl.algo
    from r1vl.train import warmup_target

    assert warmup_target([5, 6, 7], 3, 1) == [5, 6, 7, 1]
    assert warmup_target([5, 6, 7, 8], 3, 1) == [5, 6, 7]
    seen = []
    real = r1vl.algo.build_batch

    def spy(processor, texts, images, conts, **kw):
        seen.append((conts, processor.stop_token_ids()[0]))
        return real(processor, texts, images, conts, **kw)

    monkeypatch.setattr(r1vl.algo, "build_batch", spy)
    assert main(_args(tmp_path / "run", data_dir, "warmup.steps=1", "warmup.max_length=4", "train.max_steps=0",
                      "train.eval_before=false", "train.eval_after=false", "logging.plot=false")) == 0
    (conts, eos), = seen
    assert conts and all(len(c) == 4 and c[-1] != eos for c in conts)  # every solution is longer


def test_a_second_run_into_a_live_runs_output_dir_is_refused(tmp_path, data_dir, capsys):
    """One run writes an output_dir at a time: a resume or overwrite started while another run
    still writes there (or torchrun's workers orphaned by a SIGKILL) is refused by name, before
    it cleans the other's unfinished saves; once that run is gone, the directory is free."""
    from r1vl.train import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "checkpoints" / ".tmp-grpo-000003-999").mkdir(parents=True)  # the live run's save
        args = _args(out, data_dir, "warmup.steps=0", "train.max_steps=0", "train.eval_before=false",
                     "train.eval_after=false", "logging.plot=false", "train.overwrite=true")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"another run is writing there (pid {holder.pid}" in err and "Traceback" not in err, err[-2000:]
        assert (out / "checkpoints" / ".tmp-grpo-000003-999").is_dir()  # not cleaned away under it
        assert main(["--check", *args]) == 2  # --check says so too
        assert f"another run is writing there (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["--check", *args]) == 0
    assert main(args) == 0  # its lock went with it
    assert main(args) == 0  # and this process's own, when its run ended


def test_a_check_probing_the_lock_as_a_run_starts_does_not_refuse_the_run(tmp_path, monkeypatch):
    """--check probes output_dir's lock by taking it for an instant. A run starting there in that
    instant (the probe's process descheduled while it holds it: 0.5 s injected) found the lock
    taken and was refused as if another run wrote there, naming the pid the file held (the
    previous run's, long gone). Now a lock held that briefly is waited for."""
    import threading

    import r1vl.train as train

    out = tmp_path / "run"
    out.mkdir()
    (out / train.LOCK_FILE).write_text("4242\n")  # a finished run's pid
    real, taken, answers = train._lock_or_holder, threading.Event(), []

    def probing(f):
        holder = real(f)
        if threading.current_thread().name == "probe":
            taken.set()
            time.sleep(0.5)  # held while the run starts
        return holder

    monkeypatch.setattr(train, "_lock_or_holder", probing)
    probe = threading.Thread(target=lambda: answers.append(train.output_dir_holder(out)), name="probe")
    probe.start()
    try:
        assert taken.wait(30)
        train.hold_output_dir(out)  # raised UserError: another run is writing there (pid 4242)
        assert (out / train.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        probe.join(30)
        train.release_output_dirs()
    assert answers == [None]


def test_a_stopped_run_holds_its_output_dir_until_its_writers_are_closed(tmp_path, data_dir, monkeypatch):
    """A run stopped by a signal (or failing) closes its metrics writer on the way out, in
    _shutdown: TensorBoard's tail into output_dir/tensorboard, W&B's finish (seconds) into
    output_dir/wandb. The output_dir lock was let go first, so a resume started in that window
    took it and rewrote the event files (and continued the W&B run) under the closing one. Now
    the lock is held until they are closed."""
    import fcntl

    import r1vl.utils
    from r1vl.train import LOCK_FILE

    out, held = tmp_path / "run", []
    real_close = r1vl.utils.MetricsWriter.close

    def close(self, *a, **kw):
        with open(out / LOCK_FILE) as f:  # another process's view: a fresh open file
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return real_close(self, *a, **kw)

    monkeypatch.setattr(r1vl.utils.MetricsWriter, "close", close)
    _signal_in_evaluation(monkeypatch, 1, signal.SIGTERM)
    assert main(_args(out, data_dir, "train.max_steps=1", "logging.plot=false")) == 128 + signal.SIGTERM
    assert held == [True]  # was [False]: let go before the writer closed
    with open(out / LOCK_FILE) as f:  # and let go at the end
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_resume_with_another_batch_goes_on_from_the_row_where_it_stopped(tmp_path, data_dir, monkeypatch, capfd):
    """The checkpoint saves where the data stream stands: a resume with another
    train.prompts_per_step continues from that row (it used to restart at step * the new size,
    repeating rows with a smaller one, skipping rows with a larger one); metrics.jsonl carries
    the epoch reached."""
    from r1vl.utils import IndexStream

    drawn = []
    take = IndexStream.take

    def record(self, step, k):
        idx = take(self, step, k)
        drawn.append((self.seed, idx))
        return idx

    monkeypatch.setattr(IndexStream, "take", record)
    fast = ("train.save_every=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    out = tmp_path / "run"
    assert main(_args(out, data_dir, *fast, "train.max_steps=2", "train.prompts_per_step=3")) == 0
    grpo_seed = drawn[-1][0]
    state_file = out / "checkpoints" / "grpo-000002" / "trainer_state.pt"  # as written before positions were saved:
    state = torch.load(state_file, weights_only=False)  # its run's k (config) places it
    assert state.pop("data_position") == {"phase": "grpo", "step": 2, "position": 6}
    torch.save(state, state_file)
    assert main(_args(out, data_dir, *fast, "train.max_steps=4", "train.prompts_per_step=1", "train.resume=true")) == 0
    for later in ("train.prompts_per_step=4", "train.prompts_per_step=2"):  # larger, then back (one process)
        assert main(_args(out, data_dir, *fast, f"train.max_steps={5 if later.endswith('4') else 6}", later,
                          "train.resume=true")) == 0
    rows = [i for seed, idx in drawn if seed == grpo_seed for i in idx]
    assert len(rows) == 2 * 3 + 2 * 1 + 4 + 2 < 60
    assert len(set(rows)) == len(rows), rows  # one epoch of 60 rows: no row twice, none skipped
    from r1vl.utils import derive_seed

    perm = torch.randperm(60, generator=torch.Generator().manual_seed(derive_seed(0, 2) * 1_000_003)).tolist()
    assert rows == perm[:len(rows)]
    epochs = [r["epoch"] for r in _metrics(out) if r["phase"] == "grpo"]
    assert epochs == pytest.approx([3 / 60, 6 / 60, 7 / 60, 8 / 60, 12 / 60, 14 / 60])
    assert "StepGRPO: steps 6-6 draw 2 rows each (train.prompts_per_step=2 x 1 ranks), epochs 0.20-0.23 of " \
        "data.train's 60 rows" in capfd.readouterr().err


def test_a_resume_on_other_rows_left_out_is_refused_and_evaluations_are_not_paired(tmp_path, data_dir, capsys):
    """data.skip_bad_rows=true: the rows kept (an image that does not decode left out) are part of
    what a resume must match. An image repaired before a resume left the file's rows the same but
    changed the rows the data order is drawn over, silently (rows repeated and skipped); now it
    is refused, at start and by --check. On the held-out side, the evaluation after the warm-up
    and the final one then covered other items, and summary.json still paired them."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    bad_train, bad_test = data / rows[3]["image_path"], data / test[1]["image_path"]
    good = {p: p.read_bytes() for p in (bad_train, bad_test)}
    for p in good:
        p.write_bytes(good[p][:120])  # the header reads, the decode fails
    fast = (f"data.train={data / 'train.jsonl'}", f"data.test={data / 'test.jsonl'}", "data.skip_bad_rows=true",
            "train.save_every=1", "logging.plot=false")
    out = tmp_path / "run"
    assert main(_args(out, data_dir, *fast, "train.max_steps=1")) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["data"]["train_rows"] == 59 and first["paired"] is not None and first["eval_n"] == 4
    bad_train.write_bytes(good[bad_train])  # repaired
    capsys.readouterr()
    for check in (["--check"], []):
        assert main([*check, *_args(out, data_dir, *fast, "train.max_steps=2", "train.resume=true")]) == 2
        err = capsys.readouterr().err
        assert "was trained on other rows of data.train (59 rows kept then, 60 now): the file's rows are the same, " \
            "the rows left out as bad are not" in err and "this run leaves out 0" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["grpo-000001", "warmup-000002"]
    bad_train.write_bytes(good[bad_train][:120])  # as it was: resumes; the held-out image repaired instead
    bad_test.write_bytes(good[bad_test])
    assert main(_args(out, data_dir, *fast, "train.max_steps=2", "train.resume=true")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary.get("paired") is None and summary["eval_n"] == 4
    assert "no paired comparison: the evaluation after the warm-up covered other held-out rows than the final " \
        "one" in capsys.readouterr().err


def test_a_resume_applies_this_runs_optimizer_settings_and_schedule(tmp_path, data_dir, monkeypatch):
    """Loading the checkpoint's optimizer state brought back its lr, betas, eps and weight decay,
    so a resume with a new optim.lr (to rescue a run) trained at the old one while config.yaml
    named the new; a lengthened cosine run's first resumed step ran at the old schedule's next
    lr (0, its end). Now this run's settings apply, its schedule at the step reached."""
    from r1vl.algo import lr_lambda

    applied = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        g = self.param_groups[0]
        applied.append((g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    fast = ("train.save_every=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false",
            "optim.scheduler=cosine", "warmup.steps=1")
    out = tmp_path / "run"
    assert main(_args(out, data_dir, *fast, "train.max_steps=2", "optim.lr=1e-4")) == 0
    first = [a for a in applied[1:]]  # (the warm-up's step first)
    applied.clear()
    assert main(_args(out, data_dir, *fast, "train.max_steps=4", "train.resume=true", "optim.lr=5e-4",
                      "optim.weight_decay=0.1", "optim.beta2=0.9", "optim.eps=1e-6")) == 0
    two, four = lr_lambda("cosine", 2, 0), lr_lambda("cosine", 4, 0)
    assert [a[0] for a in first] == pytest.approx([1e-4 * two(0), 1e-4 * two(1)])
    assert [a[0] for a in applied] == pytest.approx([5e-4 * four(2), 5e-4 * four(3)])  # not 1e-4 * two(2) = 0
    assert all(a[1:] == ((0.9, 0.9), 1e-6, 0.1) for a in applied), applied
    lrs = [r["lr"] for r in _metrics(out) if r["phase"] == "grpo"]
    assert lrs == pytest.approx([1e-4 * two(0), 1e-4 * two(1), 5e-4 * four(2), 5e-4 * four(3)])
    # two updates a step from step 4 on: the schedule spans 6 x 2 optimizer steps, 4 x 2 of them done
    applied.clear()
    assert main(_args(out, data_dir, *fast, "train.max_steps=6", "train.resume=true", "optim.lr=5e-4",
                      "algorithm.num_iterations=2")) == 0
    twelve = lr_lambda("cosine", 12, 0)
    assert [a[0] for a in applied] == pytest.approx([5e-4 * twelve(k) for k in range(8, 12)])


def test_a_resume_with_other_evaluation_settings_ends_without_a_paired_test(tmp_path, data_dir, capfd):
    """The evaluation after the warm-up and the final one made with other settings (a resume
    that changed the completion budget or the reward's alpha) were still paired in summary.json,
    as if the weights alone had changed."""
    out = tmp_path / "run"
    extra = ("train.save_every=1", "logging.plot=false")
    assert main(_args(out, data_dir, *extra, "train.max_steps=1")) == 0
    assert json.loads((out / "summary.json").read_text())["paired"] is not None
    capfd.readouterr()
    assert main(_args(out, data_dir, *extra, "train.max_steps=2", "train.resume=true",
                      "rollout.max_completion_length=12", "algorithm.alpha=0.2")) == 0
    assert json.loads((out / "summary.json").read_text()).get("paired") is None
    assert "no paired comparison: the evaluation after the warm-up was made with other settings than the final " \
        "one (changed on a resume: algorithm.alpha 0.1 -> 0.2, rollout.max_completion_length 10 -> 12)" \
        in capfd.readouterr().err


def test_held_out_evaluations_decode_eval_batch_size_items_per_generate_call(tmp_path, data_dir, monkeypatch):
    """train.eval_batch_size is the HF engine's decoding batch in the trainer's evaluations
    (the eval CLI's --batch-size); rollouts keep rollout.batch_size. It used to be split again
    by rollout.batch_size, so raising it changed nothing."""
    from r1vl.rollout.hf_engine import HFEngine

    sizes = {"greedy": [], "sampled": []}
    real = HFEngine._generate_batch

    def spy(self, batch, sampling):
        sizes["greedy" if sampling.temperature == 0 else "sampled"].append(len(batch))
        return real(self, batch, sampling)

    monkeypatch.setattr(HFEngine, "_generate_batch", spy)
    assert main(_args(tmp_path / "run", data_dir, "train.max_steps=1", "rollout.batch_size=3",
                      "train.eval_batch_size=4", "data.eval_size=5", "logging.plot=false")) == 0
    assert sizes["greedy"] == [4, 1, 4, 1]  # after the warm-up, final: 5 items, 4 a call
    assert sizes["sampled"] == [3, 1]  # 2 prompts x G=2, 3 sequences a call


def test_a_resume_killed_while_removing_later_checkpoints_leaves_no_abandoned_one_to_resume(
        tmp_path, data_dir, monkeypatch, capfd):
    """train.resume=<an earlier checkpoint> removes the later ones of the run it continues. Killed
    midway (Ctrl-C at start-up, SIGKILL), it left a later checkpoint whose logs were already cut:
    train.resume=true then went on from it, with the steps between missing from metrics.jsonl.
    The later checkpoints are renamed out of reach first, so the resume point stays the newest."""
    import shutil

    out = tmp_path / "run"
    fast = ("train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=0", "train.eval_before=false",
            "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, *fast)) == 0
    whole = [_strip(r) for r in _metrics(out) if r["phase"] == "grpo"]
    real = shutil.rmtree

    def killed_at_the_last(path, *a, **k):
        if "grpo-000004" in str(path):
            raise KeyboardInterrupt  # after grpo-000003 went
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_at_the_last)
    try:
        main(_args(out, data_dir, *fast, f"train.resume={out / 'checkpoints' / 'grpo-000002'}"))
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(shutil, "rmtree", real)
    capfd.readouterr()
    assert main(_args(out, data_dir, *fast, "train.resume=true")) == 0
    assert "resuming from" in (err := capfd.readouterr().err) and "grpo step 2)" in err, err[-2000:]
    assert [_strip(r) for r in _metrics(out) if r["phase"] == "grpo"] == whole
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "grpo-000001", "grpo-000002", "grpo-000003", "grpo-000004", "warmup-000001", "warmup-000002"]


def test_the_written_config_does_not_overwrite_the_run_it_describes(tmp_path, data_dir, capsys):
    """config.yaml is what `--config <it> train.resume=true` continues a run with: a run started
    with train.overwrite=true wrote that too, so the command, where the run left no checkpoint,
    deleted the finished run and trained afresh instead of refusing."""
    import yaml

    out = tmp_path / "run"
    fast = ("train.max_steps=1", "train.eval_before=false", "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, *fast, "train.overwrite=true")) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["overwrite"] is False
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["--config", str(out / "config.yaml"), "train.resume=true"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before and (out / "final" / "config.json").is_file()


def test_a_vllm_tensor_parallel_size_that_does_not_divide_the_ranks_is_one_line(tmp_path, data_dir, monkeypatch,
                                                                                capsys):
    """It was the engine's own ValueError, raised after the model loaded: a traceback (every
    rank's, under torchrun) and exit 1."""
    from r1vl.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    args = _args(tmp_path / "run", data_dir, "rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("rollout.vllm.tensor_parallel_size=2 must divide the number of ranks, 1 (each group of "
                        "that many ranks runs one vLLM engine)") and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / "init").exists()  # before anything is built
    monkeypatch.setenv("WORLD_SIZE", "4")  # --check: the world is the launcher's, told by WORLD_SIZE
    assert main(["--check", *args]) == 0
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--check", *args]) == 2 and "divide the number of ranks, 3" in capsys.readouterr().err


def test_check_reads_the_built_in_task_as_the_run_will(tmp_path, capfd):
    """--check said "config OK" for the built-in task where the run then stopped at start: its
    rows' prompt lengths and an unwritable data.synthetic_dir were checked for data files only.
    It generates the task where the run reads it (the run then reuses it)."""
    small = ["data.synthetic_train_size=20", "data.synthetic_test_size=4", "data.eval_size=4", "logging.progress=false"]
    out = tmp_path / "run"
    assert main(["--check", f"output_dir={out}", *small, "data.max_prompt_length=10"]) == 2
    err = capfd.readouterr().err
    assert "20 of 20 prompts are longer than data.max_prompt_length=10" in err and f"{out / 'data' / 'train.jsonl'}" \
        in err, err[-2000:]
    assert main(["--check", f"output_dir={out}", *small, f"data.synthetic_dir={ROOT / 'README.md'}"]) == 2
    assert "cannot write the synthetic task" in capfd.readouterr().err
    assert main(["--check", f"output_dir={out}", *small]) == 0
    assert "generating the synthetic task" not in capfd.readouterr().err  # the first --check's, reused
    assert sorted(p.name for p in out.iterdir()) == ["data"]


def test_a_resume_from_an_earlier_checkpoint_leaves_none_of_the_abandoned_steps_outputs(tmp_path, data_dir, capfd):
    """Resumed from a checkpoint before its end, a finished run drops what came after it. With
    train.save_final=false its final/ stayed (the abandoned steps' model, beside a summary of the
    new run) under a warning that said "replaces final/"; from the warm-up's last checkpoint, the
    after-warm-up evaluation's outputs stayed while metrics.jsonl dropped its record."""
    out = tmp_path / "run"
    fast = ("train.max_steps=1", "train.save_every=1", "train.eval_after=false", "logging.plot=false")
    assert main(_args(out, data_dir, *fast)) == 0
    assert (out / "eval_outputs" / "after_warmup.jsonl").is_file() and (out / "final" / "config.json").is_file()
    capfd.readouterr()
    assert main(_args(out, data_dir, *fast, "train.eval_before=false", "train.save_final=false",
                      f"train.resume={out / 'checkpoints' / 'warmup-000002'}")) == 0
    err = capfd.readouterr().err
    assert "trains 1 of them again, and removes final/ (train.save_final=false writes none)" in err, err[-2000:]
    assert not (out / "final").exists() and not (out / "eval_outputs" / "after_warmup.jsonl").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")
                and p.name != ".r1vl.lock"], sorted(p.name for p in out.iterdir())
    assert [r["phase"] for r in _metrics(out)] == ["warmup", "warmup", "grpo"]


def test_a_full_disk_outside_the_saves_stops_the_run_in_one_line(tmp_path, data_dir, monkeypatch, capfd):
    """metrics.jsonl, the evaluation outputs, init/: a full disk there was a traceback and exit 1
    (the saves already said it in one line, DiskFullError)."""
    import errno

    from r1vl.utils import MetricsWriter

    real = MetricsWriter.write

    named = [True]

    def full(self, rec, *a, **k):
        if rec.get("phase") == "grpo":  # open() names the file; a write() or close() does not
            raise OSError(errno.ENOSPC, "No space left on device", *([str(self.path)] if named[0] else []))
        return real(self, rec, *a, **k)

    monkeypatch.setattr(MetricsWriter, "write", full)
    out = tmp_path / "run"
    run = _args(out, data_dir, "train.max_steps=1", "train.eval_before=false", "logging.plot=false")
    assert main(run) == 2
    err = capfd.readouterr().err
    assert f"r1vl.train: error: writing {out / 'metrics.jsonl'}: No space left on device; free some space" in err
    assert "Traceback" not in err
    named[0] = False
    assert main([*run, "train.overwrite=true"]) == 2
    assert "r1vl.train: error: a write failed: No space left on device; free some space" in capfd.readouterr().err
    # other errors are not taken for one: a full /dev/shm says so in a RuntimeError's text only
    monkeypatch.setattr(MetricsWriter, "write", lambda self, rec, *a, **k: (_ for _ in ()).throw(
        RuntimeError("unable to write to file </torch_1>: No space left on device (28)")))
    with pytest.raises(RuntimeError):
        main([*run, "train.overwrite=true"])


def test_an_overwrite_killed_midway_leaves_no_half_deleted_checkpoint_to_resume(tmp_path, data_dir, monkeypatch,
                                                                                capfd):
    """train.overwrite=true deleted checkpoints/ in place: Ctrl-C or a kill midway left a checkpoint
    with its trainer_state.pt but not its weights, which train.resume=true then picked and could
    not load. Each output is renamed out of the way first; the next start cleans the rest."""
    import shutil

    out = tmp_path / "run"
    fast = ("train.max_steps=2", "train.save_every=1", "train.eval_before=false", "train.eval_after=false",
            "logging.plot=false")
    assert main(_args(out, data_dir, *fast)) == 0
    real = shutil.rmtree

    def killed_midway(path, *a, **k):
        if "checkpoints" in str(path):  # the newest checkpoint's weights go first, then the kill
            (Path(path) / "grpo-000002" / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    assert main(_args(out, data_dir, *fast, "train.overwrite=true")) == 130  # Ctrl-C at start-up
    monkeypatch.setattr(shutil, "rmtree", real)
    capfd.readouterr()
    assert main(_args(out, data_dir, *fast, "train.resume=true")) == 2
    err = capfd.readouterr().err
    assert "no checkpoint to resume from" in err and "cannot load" not in err, err[-2000:]
    assert main(_args(out, data_dir, *fast, "train.overwrite=true")) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # cleaned at its start


def test_a_vllm_engine_that_does_not_start_is_one_line(tmp_path, data_dir, monkeypatch, capsys):
    """vLLM's refusal of its settings (no room for the KV cache) was a traceback of about 100
    lines and exit 1, whose hint (gpu_memory_utilization) is ignored off CUDA."""
    from r1vl.rollout import vllm_engine

    def refuse(*a, **k):
        raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                         "when initializing the engine.\nmore lines")

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_engine.VLLMEngine, "from_config", classmethod(refuse))
    assert main(_args(tmp_path / "run", data_dir, "rollout.engine=vllm", "warmup.steps=0")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        "r1vl.train: error: rollout.engine=vllm: the vLLM engine did not start: No available memory for the cache "
        "blocks.") and "rollout.vllm.kv_cache_memory_bytes" in err.splitlines()[-1], err[-2000:]


def _resume_check(tmp_path, saved_args, args):
    from r1vl.config import load_config, to_dict
    from r1vl.train import check_resume_config

    ck = tmp_path / "run" / "checkpoints" / "grpo-000003"
    return check_resume_config(to_dict(load_config(None, saved_args)), load_config(None, args), ck)


def test_the_held_out_split_counts_only_when_both_runs_evaluate(tmp_path):
    """The held-out split's settings matter to a resume only when both runs evaluate (train.eval_every
    alone makes a run evaluate)."""
    from r1vl.train import UserError

    quiet = ["train.eval_before=false", "train.eval_after=false"]
    assert _resume_check(tmp_path, [*quiet, "data.synthetic_test_size=9"], []) == ["data.synthetic_test_size"]
    every = [*quiet, "train.eval_every=5"]
    with pytest.raises(UserError, match="data.synthetic_test_size=9, this run 400"):
        _resume_check(tmp_path, [*every, "data.synthetic_test_size=9"], every)


def test_check_resume_data_compares_the_held_out_split_when_both_runs_evaluate(tmp_path):
    """The held-out split's fingerprint is compared when both runs evaluate."""
    from r1vl.config import load_config, to_dict
    from r1vl.train import UserError, check_resume_data

    cfg = load_config(None, ["data.train=f/train.jsonl", "data.test=f/test.jsonl"])
    fp = {"rows": 3, "sha256": "a"}
    saved = {"train": fp, "test": {"rows": 4, "sha256": "b"}}
    with pytest.raises(UserError, match=r"data.test: 4 rows, this run's 5"):
        check_resume_data(saved, {"train": fp, "test": {"rows": 5, "sha256": "c"}}, tmp_path / "ck", cfg,
                          to_dict(cfg))
    check_resume_data(saved, {"train": fp, "test": saved["test"]}, tmp_path / "ck", cfg, to_dict(cfg))


def test_a_refused_data_setting_is_named_once(tmp_path):
    """seed (and data.synthetic_train_size) make both built-in splits: named once."""
    from r1vl.train import UserError

    with pytest.raises(UserError) as e:
        _resume_check(tmp_path, [], ["seed=5"])
    assert str(e.value).count("seed=0, this run 5") == 1


def test_only_a_finished_run_is_said_to_redo_steps(tmp_path, caplog):
    """warn_redone_steps: steps after the checkpoint of a run without summary.json (not finished)
    are no 'finished run'."""
    import json

    from r1vl.train import warn_redone_steps

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"phase": "grpo", "step": s, "loss": 0.0}) + "\n"
                                                    for s in (1, 2, 3)))
    ends = {"warmup": 0, "grpo": 3}
    ck = tmp_path / "checkpoints" / "grpo-000001"
    with caplog.at_level(logging.WARNING, logger="r1vl.train"):
        assert warn_redone_steps(tmp_path, ck, "grpo", 1, ends) is False
        assert "finished run" not in caplog.text
        (tmp_path / "summary.json").write_text("{}")
        assert warn_redone_steps(tmp_path, ck, "grpo", 1, ends) is True
    assert "trains 2 of them again" in caplog.text
