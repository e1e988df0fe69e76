"""The trainer under DeepSpeed, through its real entry point: `torchrun --nproc-per-node 2
-m r1vl.train deepspeed=configs/ds_zero{3,2}.json` (gloo, CPU, bf16 as the shipped configs
say) on a tiny model: warm-up steps on the DeepSpeed engine, evaluation with gathered
weights, the warm-up -> StepGRPO optimizer reset, StepGRPO steps with a ZeRO reference
model, DeepSpeed checkpoints, a gathered 16-bit final model; then a resume from the step-2
checkpoint ends bit-for-bit where the uninterrupted run ended, and one on 1 rank (the
DeepSpeed state converted to its universal form) carries AdamW's state on.

The policy starts from a briefly warmed-up tiny model (built once, in-process, without
DeepSpeed) so that StepGRPO's rewards vary within groups and its gradients are not zero:
otherwise equal weights after a resume would prove nothing about the restored state."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ports import free_port

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_hidden_layers=1",
    "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1", "model.tiny.vision_depth=1",
    "model.tiny.vision_embed_dim=32", "model.tiny.vision_num_heads=1", "model.tiny.vocab_size=400",
    "model.tiny.tokenizer_corpus_size=60",
]
RUN = [
    "data.synthetic_train_size=60", "data.synthetic_test_size=6", "data.eval_size=4",
    "warmup.batch_size=2", "warmup.warmup_steps=1", "train.eval_batch_size=4",
    "rollout.num_generations=4", "rollout.max_completion_length=80", "train.prompts_per_step=2",
    "train.micro_batch_size=2", "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
    # pinned (the embedded defaults are tuned for the full-size default run)
    "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", "algorithm.beta=0.04",
    "algorithm.num_iterations=1", "optim.lr=0.001", "optim.scheduler=constant", "optim.warmup_steps=0",
]
TIMING = ("seconds", "tokens_per_s", "wall")


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory, data_dir):
    """A tiny Qwen2-VL after 100 SFT steps (one process, no DeepSpeed): it writes the R1-VL
    format often enough that StepGRPO's groups get different rewards."""
    from r1vl.train import main

    out = tmp_path_factory.mktemp("warm")
    assert main([f"output_dir={out}", f"data.synthetic_dir={data_dir}", *TINY, *RUN, "warmup.steps=100",
                 "warmup.lr=0.01", "warmup.batch_size=4", "train.max_steps=0", "train.eval_before=false",
                 "train.eval_after=false", "train.save_final=false", "distributed.num_threads=1"]) == 0
    return out / "warmup"



def _torchrun(stage: int, out: Path, model: Path, data_dir: Path, *extra: str,
              nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "r1vl.train",
           f"deepspeed={ROOT / 'configs' / f'ds_zero{stage}.json'}", f"output_dir={out}", f"model.path={model}",
           f"data.synthetic_dir={data_dir}", *RUN, "warmup.steps=2", "warmup.lr=0.001", "train.max_steps=3",
           "train.save_every=1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"torchrun r1vl.train (ZeRO-{stage}) exited {proc.returncode}:\n{tail}")
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not any(t in k for t in TIMING)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_two_ranks_train_then_resume_equals_uninterrupted(stage, tmp_path, warm_model, data_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    a = tmp_path / "uninterrupted"
    _torchrun(stage, a, warm_model, data_dir)
    recs = _metrics(a)
    assert [(r["phase"], r["step"]) for r in recs] == [("warmup", 1), ("warmup", 2), ("eval", 0), ("grpo", 1),
                                                       ("grpo", 2), ("grpo", 3), ("eval", 3)]
    grpo = [r for r in recs if r["phase"] == "grpo"]
    for r in recs:
        if r["phase"] in ("warmup", "grpo"):
            assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    for r in grpo:
        for k in ("reward_mean", "kl", "entropy", "lr"):
            assert math.isfinite(r[k]), (k, r)
        # the StepGRPO schedule replaced the warm-up's, which ends at 1e-4 after its last step
        assert r["lr"] == pytest.approx(1e-3)
    # each record's lr is the rate its step applied: 1 warm-up step of lr warm-up, then the
    # cosine at progress 0 (its 10% floor comes after the last step)
    assert [r["lr"] for r in recs[:2]] == pytest.approx([1e-3, 1e-3])
    assert any(r["grad_norm"] > 0 for r in grpo) and grpo[-1]["kl"] > 0  # StepGRPO moved the weights
    ck = a / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["grpo-000002", "grpo-000003"]
    for name in ("grpo-000002", "grpo-000003"):  # DeepSpeed state + 16-bit HF model + trainer state
        assert (ck / name / "ds").is_dir() and (ck / name / "model.safetensors").is_file()
        assert (ck / name / "trainer_state.pt").is_file()
        assert (ck / name / "config.yaml").read_text() == (a / "config.yaml").read_text()  # the settings then
    state = torch.load(ck / "grpo-000003" / "trainer_state.pt", weights_only=False)
    assert state["deepspeed"] and state["world"] == 2 and len(state["rng"]) == 2 and "optimizer" not in state
    final = AutoModelForImageTextToText.from_pretrained(a / "final")  # gathered, loads with the Auto class
    assert final.dtype == torch.bfloat16 and final.config.tie_word_embeddings
    before = load_file(warm_model / "model.safetensors")
    after = load_file(a / "final" / "model.safetensors")
    assert any(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in after)

    # resume: the files a run killed right after its step-2 checkpoint leaves behind
    b = tmp_path / "resumed"
    shutil.copytree(a, b)
    for p in (b / "checkpoints" / "grpo-000003", b / "final"):
        shutil.rmtree(p)
    (b / "summary.json").unlink()
    _torchrun(stage, b, warm_model, data_dir, "train.resume=true")
    summary = json.loads((b / "summary.json").read_text())
    assert summary["resumed_from"].endswith("grpo-000002")
    resumed = load_file(b / "final" / "model.safetensors")
    assert resumed.keys() == after.keys()
    for k in after:
        assert torch.equal(resumed[k], after[k]), k
    assert [_strip(r) for r in _metrics(b)] == [_strip(r) for r in recs]

    # the step-2 checkpoint resumed on 1 rank: its DeepSpeed state (partitioned over 2 ranks) is
    # converted to DeepSpeed's universal form, which the 1-rank engine loads
    c = tmp_path / "one_rank"
    shutil.copytree(a, c)
    for p in (c / "checkpoints" / "grpo-000003", c / "final"):
        shutil.rmtree(p)
    (c / "summary.json").unlink()
    proc = _torchrun(stage, c, warm_model, data_dir, "train.resume=true", "optim.lr=0.002", nproc=1)
    assert f"train.resume: {c / 'checkpoints' / 'grpo-000002'} was written by 2 rank(s), this run has 1" in proc.stderr
    assert "converting its DeepSpeed state (written by another number of ranks)" in proc.stderr
    assert sorted(p.name for p in (c / "checkpoints").iterdir()) == ["grpo-000002", "grpo-000003"]  # no temporary
    assert torch.load(c / "checkpoints" / "grpo-000003" / "trainer_state.pt", weights_only=True)["world"] == 1
    assert [(r["phase"], r["step"]) for r in _metrics(c)][-2:] == [("grpo", 3), ("eval", 3)]
    assert _metrics(c)[-2]["lr"] == pytest.approx(0.002)  # this run's optim.lr, not the checkpoint's
    # AdamW went on from the 2 ranks' state: one step more, and the second moments carried over
    # (v3 = beta2 v2 + (1 - beta2) g^2 >= beta2 v2; a fresh optimizer's step 1 has (1 - beta2) g^2)
    from r1vl import ds

    before, after = tmp_path / "u_before", tmp_path / "u_after"
    for src, dst in ((a / "checkpoints" / "grpo-000002", before), (c / "checkpoints" / "grpo-000003", after)):
        dst.mkdir()
        ds._convert_to_universal(src, dst)
    moments = sorted(p.parent.name for p in (after / "ds" / "zero").glob("*/exp_avg_sq.pt"))
    assert len(moments) > 10
    def load(root: Path, name: str, what: str) -> torch.Tensor:
        x = torch.load(root / "ds" / "zero" / name / f"{what}.pt", weights_only=False)
        return x["param"] if isinstance(x, dict) else x

    def step(root: Path, name: str) -> float:  # ZeRO-2: per parameter; ZeRO-3: in the common state only
        if (root / "ds" / "zero" / name / "step.pt").is_file():
            return load(root, name, "step").item()
        common = torch.load(root / "ds" / "zero" / "optimizer_state.pt", weights_only=False)
        return common["optimizer_state_dict"]["state"][0]["step"].item()

    beta2 = 0.99  # optim.beta2's default
    for name in moments:
        assert step(after, name) == step(before, name) + 1 == 3, name
        v2, v3 = load(before, name, "exp_avg_sq"), load(after, name, "exp_avg_sq")
        assert bool((v3 >= beta2 * v2 * (1 - 1e-5)).all()), name
def test_bad_deepspeed_config_is_one_clear_error(tmp_path, capsys):
    from r1vl.train import main

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    assert main([f"output_dir={tmp_path / 'out'}", f"deepspeed={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1vl.train: error:") and len(err.splitlines()) == 1
    assert str(bad) in err and "'optimizer'" in err
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    assert main([f"output_dir={tmp_path / 'out'}", f"deepspeed={bad}", "train.micro_batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu" in err and "train.micro_batch_size" in err


def test_missing_engines_are_one_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    from r1vl.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("deepspeed", "vllm") else real(name, *a))
    assert main(["--check", f"output_dir={tmp_path}", f"deepspeed={ROOT / 'configs' / 'ds_zero3.json'}"]) == 2
    assert "DeepSpeed is not installed" in capsys.readouterr().err
    assert main(["--check", f"output_dir={tmp_path}", "rollout.engine=vllm"]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_ref_on_host_refused_under_zero3(tmp_path, capsys):
    from r1vl.train import main

    args = ["--check", f"output_dir={tmp_path}", "model.ref_on_host=true"]
    assert main([*args, f"deepspeed={ROOT / 'configs' / 'ds_zero3.json'}"]) == 2
    err = capsys.readouterr().err
    assert "model.ref_on_host" in err and "ZeRO-3" in err and len(err.strip().splitlines()) == 1
    assert main([*args, f"deepspeed={ROOT / 'configs' / 'ds_zero2.json'}"]) == 0


def test_process_groups_are_released_at_exit(tmp_path, data_dir):
    """After a DeepSpeed run, main() leaves no process group alive, DeepSpeed's own references
    (deepspeed.utils.groups) included: they are released with torch's, not left to interpreter
    shutdown. (That alone did not stop the rare SIGABRT at exit: r1vl.utils.exit_after_collectives.)"""
    code = (
        "import sys\n"
        "from r1vl.train import main\n"
        "rc = main(sys.argv[1:])\n"
        "import torch.distributed as dist\n"
        "from deepspeed.utils import groups\n"
        "held = [k for k, v in vars(groups).items() if isinstance(v, dist.ProcessGroup)]\n"
        "print('RESULT', rc, dist.is_initialized(), held)\n"
        "from r1vl.utils import exit_after_collectives\n"
        "exit_after_collectives(0)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    args = [f"deepspeed={ROOT / 'configs' / 'ds_zero3.json'}", f"output_dir={tmp_path / 'run'}",
            f"data.synthetic_dir={data_dir}", *TINY, *RUN, "warmup.steps=1", "train.max_steps=1",
            "train.eval_before=false", "train.eval_after=false", "train.save_final=false",
            "rollout.max_completion_length=8"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 0 False []" in proc.stdout, proc.stdout[-2000:]


def test_resume_under_another_zero_stage_is_refused(tmp_path, data_dir, capsys):
    """A checkpoint written under ZeRO-2, resumed with a ZeRO-3 config: one line naming both
    stages before any model loads (DeepSpeed's loader ended in a bare AssertionError on every
    rank, after the model was built)."""
    import torch

    from r1vl.train import main
    from r1vl.utils import STATE_FILE

    pytest.importorskip("deepspeed")
    ck = tmp_path / "src" / "checkpoints" / "warmup-000001"
    ck.mkdir(parents=True)
    torch.save({"phase": "warmup", "step": 1, "rng": [None], "world": 1, "deepspeed": True, "zero_stage": 2,
                "config": None}, ck / STATE_FILE)
    args = [f"output_dir={tmp_path / 'dst'}", f"data.synthetic_dir={data_dir}", *RUN, "warmup.steps=2",
            f"deepspeed={ROOT / 'configs' / 'ds_zero3.json'}", f"train.resume={ck}"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"train.resume: {ck} was written under ZeRO-2, deepspeed={ROOT / 'configs' / 'ds_zero3.json'} is ZeRO-3" in err
    assert f"or start a new run from its weights alone: model.path={ck}" in err


_SIGNAL_IN_EVAL = '''
import os, signal, sys, time
import r1vl.eval
real = r1vl.eval.evaluate
def evaluate(*a, **kw):  # SIGTERM as the evaluation starts, as a scheduler's preemption
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    return real(*a, **kw)
r1vl.eval.evaluate = evaluate
from r1vl.train import main
sys.exit(main(sys.argv[1:]))
'''


def test_deepspeed_checkpoint_of_a_final_evaluation_without_stepgrpo_cannot_lengthen_the_warmup(tmp_path, data_dir,
                                                                                                 capsys):
    """train.max_steps=0, no evaluation after the warm-up, no saves: a signal in the final
    evaluation checkpoints warmup-N from an engine whose optimizer was already reset for
    StepGRPO (fresh AdamW, the StepGRPO schedule). Lengthening the warm-up from it is refused
    by name, as without DeepSpeed; it went on with that optimizer."""
    from r1vl.train import main
    from r1vl.utils import STATE_FILE

    wrapper = tmp_path / "signal_in_eval.py"
    wrapper.write_text(_SIGNAL_IN_EVAL)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    args = [f"deepspeed={ROOT / 'configs' / 'ds_zero2.json'}", f"output_dir={out}", f"data.synthetic_dir={data_dir}",
            *TINY, *RUN, "warmup.steps=2", "train.max_steps=0", "train.eval_before=false", "train.save_every=0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(wrapper), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "stopped during the final evaluation" in proc.stderr, proc.stderr[-3000:]
    ck = out / "checkpoints" / "warmup-000002"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ck.name]
    assert torch.load(ck / STATE_FILE, weights_only=False)["warmup_optimizer"] is False
    capsys.readouterr()
    assert main([*args, "warmup.steps=3", "train.resume=true"]) == 2
    err = capsys.readouterr().err
    assert f"train.resume: {ck}: it was written during an evaluation after the warm-up, without the warm-up's " \
           "optimizer state" in err and "Traceback" not in err, err[-2000:]


def test_a_deepspeed_resume_that_trains_other_tensors_is_one_line(tmp_path, data_dir, capsys):
    """model.freeze_vision changed on a DeepSpeed resume: DeepSpeed's loader failed after the model
    and engine were built, with a traceback naming another setting (ZeRO-2: the parameter-alignment
    layout) or none; without DeepSpeed the optimizer state's size was already refused in one line."""
    from r1vl.train import main

    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.synthetic_dir={data_dir}", *TINY, *RUN, "warmup.steps=1",
            "train.max_steps=1", "train.save_every=1", "train.eval_before=false", "train.eval_after=false",
            f"deepspeed={ROOT / 'configs' / 'ds_zero2.json'}", "model.dtype=float32", "distributed.num_threads=1"]
    assert main([*args, "model.freeze_vision=true"]) == 0
    capsys.readouterr()
    assert main([*args, "model.freeze_vision=false", "train.max_steps=2", "train.resume=true"]) == 2
    err = capsys.readouterr().err
    assert "this run trains" in err and "e.g. model.freeze_vision" in err and "Traceback" not in err, err[-2000:]
    assert main([*args, "model.freeze_vision=true", "train.max_steps=2", "train.resume=true"]) == 0
