"""A full StepGRPO run of the default (shrunk) with rollout.engine=vllm under a
2-rank torchrun: warm-up, evaluation, StepGRPO steps with the colocated engine,
final evaluation; rewards and losses must be finite."""
from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys

import pytest

from vllm_test_utils import free_port


def _trainer_builds_vllm_engine() -> bool:
    """The coordination point with the trainer: make_engine() hands rollout.engine=vllm
    to VLLMEngine.from_config(cfg, model, processor)."""
    import r1vl.train

    return "VLLMEngine" in inspect.getsource(r1vl.train.make_engine)


@pytest.mark.slow
@pytest.mark.skipif(not _trainer_builds_vllm_engine(),
                    reason="r1vl.train.make_engine does not build VLLMEngine.from_config yet")
@pytest.mark.parametrize("correction,mode,mu", [(True, "token_truncate", 1), (False, "token_truncate", 1),
                                                (True, "sequence_mask", 1), (True, "token_truncate", 2)],
                         ids=["is", "no_is", "is_sequence_mask", "is_mu2"])
def test_stepgrpo_run_with_vllm_engine(tmp_path, correction, mode, mu):
    """With the correction the loss scores the raw logits (algorithm.logprob_temperature=1.0,
    the authors' code) while the ratio still compares trainer and engine at the sampling
    temperature (0.7): a ratio near 1 shows the two temperatures are kept apart. TRL's default
    mode (sequence_mask) runs through the trainer too. At mu = 1 the update's forward forms the
    ratio (no separate pass), at mu = 2 a pass before the update does."""
    out = tmp_path / "run"
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "r1vl.train",
           f"output_dir={out}", "rollout.engine=vllm", "warmup.steps=3", "train.max_steps=2",
           "rollout.num_generations=2", "train.prompts_per_step=2", "rollout.max_completion_length=16",
           "data.synthetic_train_size=40", "data.synthetic_test_size=4", "data.eval_size=4",
           "model.tiny.tokenizer_corpus_size=40", "logging.tensorboard=false", "logging.plot=false",
           "logging.progress=false", "algorithm.logprob_temperature=1.0",
           f"rollout.is_correction={str(correction).lower()}", f"rollout.is_mode={mode}",
           f"algorithm.num_iterations={mu}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"r1vl.train exited {proc.returncode}:\n{tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    grpo = [r for r in rows if r.get("phase") == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2]
    for r in grpo:
        for key in ("reward_mean", "loss", "step_rar_mean", "step_rvr_mean", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["completion_length"] > 0
        # truncated IS against the engine's own log-probs: 1 because wake() pushed the current
        # weights (stale dummy or pre-warm-up weights would put it far off) and the trainer's
        # log-probs carry the engine's logit bias on the image placeholders (without it every
        # token's ratio was 1 - their mass, and a sequence's the product: 0.90 in the audit)
        if not correction:
            assert "is_ratio_mean" not in r, r
            continue
        assert abs(r["is_ratio_mean"] - 1.0) < 1e-3 and abs(r["is_ratio_max"] - 1.0) < 1e-3, r
        assert r["is_ratio_capped_frac"] == 0.0, r
    assert [r["after"] for r in rows if r.get("phase") == "eval"] == ["warmup", "grpo"]
    assert (out / "summary.json").is_file()
    assert (out / "vllm_engine_model" / "config.json").is_file()  # the engine was the vLLM one
