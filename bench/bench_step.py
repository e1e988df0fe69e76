"""One StepGRPO step end to end: r1vl's trainer functions against TRL's GRPOTrainer.

    python bench/bench_step.py --preset tiny              # CPU smoke run (< 1 min per implementation)
    python bench/bench_step.py --preset 2b --out-dir $OUT # one GPU: random Qwen2-VL-2B -> $OUT/step_h100.json

Both implementations run the same workload: the same randomly initialised model (built
once, saved to a work directory, loaded by both), the same synthetic-task prompts and
images in the same order, G completions per prompt from Hugging Face `generate` forced
to exactly --max-new-tokens tokens (EOS and the vision placeholder tokens are suppressed
on both sides, so every step trains on prompts x G x max-new-tokens completion tokens),
rewards from r1vl.rewards (StepRAR + StepRVR) on both sides, the same β, ε, loss type,
μ, micro-batch, AdamW hyper-parameters, attention implementation and gradient
checkpointing. Each (implementation, variant) runs in its own Python process, so Liger's
module-level patches never leak into another run and peak memory is per run.

Phases (seconds are medians over --repeats steps after --warmup steps, so with the
2b preset's 2 repeats the mean of the two, with the fastest in config.seconds_min and each
in config.seconds_per_repeat; every phase boundary synchronises the GPU; peak memory is
torch.cuda.max_memory_allocated, reset at the phase's start, maximum over the timed steps;
on CPU it is null: there is no per-phase allocator peak to read, and ru_maxrss is a
process-lifetime high-water mark):

  rollout  generation of G completions per prompt (prompt tokenisation, image
           preprocessing, HF generate, decoding). r1vl: HFEngine.generate;
           TRL: GRPOTrainer._generate.
  reward   StepRAR + StepRVR of every completion. r1vl: r1vl.eval.score + group
           advantages; TRL: GRPOTrainer._calculate_rewards calling a reward function that
           wraps the same r1vl.eval.score.
  logprob  log-probs without grad: the reference model's (β > 0) and, with μ > 1, the
           policy's old ones. r1vl: r1vl.algo.compute_logprobs; TRL: the
           _get_per_token_logps_and_entropies calls made while it prepares the batch.
  update   μ optimisation passes over all completions: per micro-batch forward + loss +
           backward, then clipping and the AdamW step. r1vl: r1vl.algo.grpo_update;
           TRL: the rest of its μ optimizer steps (training_step for each micro-batch,
           clipping, optimizer and scheduler), i.e. the round's wall time minus the time
           inside its _prepare_inputs (which holds generation, scoring and log-probs).
  step     the whole step: r1vl from the start of the rollout to the end of the update
           (also batch building between phases); TRL from on_step_begin of the first of
           the μ optimizer steps that share one generation to on_step_end of the last.

tokens_per_s = completion tokens / phase seconds (the update counts them μ times: it
processes them μ times); prompt tokens are not counted.

Variants of r1vl (--variants): "fused" (the trainer as it is: log-probs and the GRPO loss
from r1vl.kernels, no [tokens, vocab] logits) or "materialised" (bench-only
MaterialisedLMHead below: logits = hidden @ Wᵀ in the model dtype, fp32 log_softmax and
gather, as GRPO code without a fused head does it, then the same GRPO objective), each
with "+liger" (r1vl.speedups.apply_speedups with Liger's kernels; CUDA only: on CPU these
rows are reported as skipped, with the reason). Every variant runs the trainer's forward
as it is: the vision tower once per distinct image and each prompt once per group
(--no-dedup-images / --no-share-prompts measure without them). TRL runs with its defaults
for what is not matched above (its own chunked log-prob head, no Liger, whole rows).

The model is random, so every completion scores 0 and all advantages are 0 on both sides:
the update still does all of its work (nothing skips zero advantages), but its loss and
gradient are 0. r1vl runs record, untimed, a loss probe (_loss_probe) at a point where the
loss depends on the LM head, so the fused and materialised paths can be compared.

Jobs run in this order: the first r1vl variant, TRL, then the other variants, so that
the r1vl/TRL pair comes first. A worker writes its result after every step (a temporary
file renamed over the last), so a run cut off (--worker-timeout, --time-budget, SIGTERM to
this script, a crash) keeps the steps it finished: its rows say so in config.cut_short
and config.timed_steps, and a run cut off before its first timed step reports its
warm-up step (config.warmup_only). With --time-budget, a run that has a timed step stops
early when going on would leave the next run less than NEXT_RUN_FACTOR x its own time to
its first timed step.

Output: --out (default bench/results/step_<device>.json; --out-dir DIR: DIR/step_<device>.json),
{"rows": [{"impl", "phase", "device", "tokens_per_s", "seconds", "peak_mem_bytes", "config",
"versions"}]}, variant and shapes in config (the TF32 switches in config.tf32), written
after every run; then a markdown table and the r1vl/TRL ratios on stdout (last). A run that
fails (or has no timed step) is marked by config.error (exit code 1); one that fails before
finishing a step is a single row, as is a skipped one (config.skipped). SIGTERM: the rows so
far are written, exit code 143.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
PHASES = ("rollout", "reward", "logprob", "update", "step")
ROW_KEYS = ("impl", "phase", "device", "tokens_per_s", "seconds", "peak_mem_bytes", "config", "versions")
R1VL_VARIANTS = ("fused+liger", "fused", "materialised+liger", "materialised")

# Defaults per preset; every one of them is a CLI flag and is recorded in the JSON.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(prompts=2, num_generations=4, max_new_tokens=32, micro_batch=4, warmup=1, repeats=2,
                 dtype="float32", attn="sdpa", gradient_checkpointing=False,
                 min_pixels=56 * 56, max_pixels=112 * 112),
    # R1-VL's 2B recipe (configs/qwen2vl_2b.yaml): G=4, 8 prompts, micro-batch 4, bf16, gradient
    # checkpointing, images at its max_pixels (256 visual tokens); completions shortened from 1024
    # to 256 tokens and 2 timed steps to fit a session's GPU time (HF generate dominates the step).
    "2b": dict(prompts=8, num_generations=4, max_new_tokens=256, micro_batch=4, warmup=1, repeats=2,
               dtype="bfloat16", attn="auto", gradient_checkpointing=True,
               min_pixels=448 * 448, max_pixels=448 * 448),
}

# Qwen/Qwen2-VL-2B-Instruct's config.json (text model and vision tower), built in code with
# random weights: throughput does not need the trained ones.
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                        rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1000000.0,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                        use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                        attention_dropout=0.0, tie_word_embeddings=True)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536,
                          hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                          in_channels=3)

LIGER_CPU_REASON = ("skipped: Liger's RMSNorm/SwiGLU/LayerNorm/RoPE kernels are Triton GPU kernels; "
                    "r1vl.speedups.apply_speedups does not apply them on CPU")
CPU_PEAK_NOTE = ("null on CPU: no per-phase allocator peak (torch.cuda.max_memory_allocated is CUDA only, "
                 "ru_maxrss is a process-lifetime high-water mark)")


# --------------------------------------------------------------------------- small helpers


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "trl", "accelerate", "datasets", "liger-kernel", "triton", "flash-attn", "r1vl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["r1vl_commit"] = _cli.r1vl_commit()
    return out


def _resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_step: --device cuda but CUDA is not available")
    return torch.device(requested)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _tf32() -> dict:
    """TF32 switches as this run left them (fp32 matmuls / convolutions on CUDA)."""
    import torch

    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return {"cuda.matmul.allow_tf32": bool(mm.allow_tf32), "cudnn.allow_tf32": bool(cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


class PhaseClock:
    """Seconds and peak memory per phase of one step. Every boundary synchronises the GPU;
    on CUDA each phase resets the allocator's peak and reads it at its end (the step's peak
    is the maximum over everything in between). On CPU peaks are None."""

    def __init__(self, device, warmup: int = 0, on_step=None):
        import torch

        self.warmup = warmup  # the first steps, untimed: named so in the progress lines
        self.on_step = on_step  # on_step(steps) after each step: the worker saves its result there
        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.steps: list[dict] = []
        self.cur: dict | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _peak(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self.cuda else None

    def _fold_and_reset(self) -> None:
        """Fold the peak so far into the step's peak, then start a new peak window."""
        if self.cuda:
            p = self._peak()
            if self.cur is not None:
                self.cur["step_peak"] = max(self.cur["step_peak"] or 0, p)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def begin_step(self) -> None:
        self.sync()
        if self.cuda:  # a new window: what peaked since the last phase (the previous step's) is not this step's
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.cur = {"seconds": {}, "peak": {}, "step_peak": None, "t0": time.perf_counter(), "extra": {}}

    def end_step(self, **extra) -> dict:
        self.sync()
        st = self.cur
        st["seconds"]["step"] = time.perf_counter() - st.pop("t0")
        if self.cuda:
            st["step_peak"] = max(st["step_peak"] or 0, self._peak())
        st["peak"]["step"] = st.pop("step_peak")
        st["extra"].update(extra)
        st["t_end"] = time.time()  # wall clock: the driver reads how long a run took to each step
        self.steps.append(st)
        self.cur = None
        if self.on_step is not None:  # saved before its progress line: a line seen means a step kept
            self.on_step(self.steps)
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in st["seconds"].items() if k != "step")
        peak = f", peak {st['peak']['step'] / 2**30:.2f} GiB" if st["peak"].get("step") else ""
        n = len(self.steps)
        print(f"step {n}{' (warm-up)' if n <= self.warmup else ''}: {st['seconds']['step']:.2f} s ({phases}){peak}",
              file=sys.stderr, flush=True)
        return st

    def add(self, name: str, seconds: float, peak: int | None) -> None:
        st = self.cur
        st["seconds"][name] = st["seconds"].get(name, 0.0) + seconds
        if peak is not None:
            st["peak"][name] = max(st["peak"].get(name) or 0, peak)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        self._fold_and_reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0, self._peak())


# --------------------------------------------------------------------------- the materialised head


def _materialised_head_class():
    import torch
    import torch.nn.functional as F

    from r1vl.kernels.objective import grpo_objective
    from r1vl.models import FusedLMHead

    class MaterialisedLMHead(FusedLMHead):
        """Bench-only stand-in for r1vl.models.FusedLMHead with the same modes, computed on
        materialised logits: logits = hidden @ Wᵀ (+ b) in the model dtype, then fp32
        log_softmax over the vocabulary and a gather of the targets (what GRPO code without
        a fused head does), then the same GRPO objective as r1vl.kernels (grpo_objective).
        Owns the same Parameters as the head it replaces (tied embeddings stay tied)."""

        def forward(self, hidden, targets=None, mask=None, advantages=None, *, mode: str = "logits",
                    temperature: float = 1.0, return_entropy: bool = False, **loss_kwargs):
            if targets is None:
                return F.linear(hidden, self.weight, self.bias)
            logits = F.linear(hidden, self.weight, self.bias).float()  # [B, T, V]
            if temperature != 1.0:
                logits = logits / temperature
            logsm = torch.log_softmax(logits, dim=-1)
            safe = targets.clamp(min=0) if mask is None else torch.where(mask != 0, targets, 0)
            logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            entropy = None
            if return_entropy:
                with torch.no_grad():
                    entropy = -(logsm.exp() * logsm).sum(-1)
            if mode == "logprobs":
                return (logp, entropy) if return_entropy else logp
            if mode != "grpo":
                raise ValueError(f"MaterialisedLMHead: unknown mode {mode!r}")
            return grpo_objective(
                logp, mask, advantages,
                old_logprobs=loss_kwargs.get("old_logprobs"), ref_logprobs=loss_kwargs.get("ref_logprobs"),
                rollout_is_ratio=loss_kwargs.get("rollout_is_ratio"), beta=float(loss_kwargs.get("beta", 0.04)),
                epsilon_low=float(loss_kwargs.get("epsilon_low", 0.2)),
                epsilon_high=float(loss_kwargs.get("epsilon_high", 0.2)),
                loss_type=loss_kwargs.get("loss_type", "grpo"),
                importance_sampling_level=loss_kwargs.get("importance_sampling_level", "token"),
                max_completion_length=loss_kwargs.get("max_completion_length"),
                num_items_in_batch=loss_kwargs.get("num_items_in_batch"), entropy=entropy)

    return MaterialisedLMHead


# --------------------------------------------------------------------------- shared set-up


def _r1vl_config(a: dict):
    """The trainer's validated Config for this benchmark (what train.py would read)."""
    from r1vl.config import load_config

    n = a["prompts"] * a["num_generations"]
    return load_config(None, [
        f"seed={a['seed']}",
        f"model.dtype={a['dtype']}",
        f"model.attn_implementation={a['attn']}",
        f"model.gradient_checkpointing={str(a['gradient_checkpointing']).lower()}",
        f"model.dedup_images={str(a['dedup_images']).lower()}",
        f"model.share_prompts={str(a['share_prompts']).lower()}",
        f"model.ref_on_host={str(a.get('ref_on_host', False)).lower()}",
        f"data.min_pixels={a['min_pixels']}", f"data.max_pixels={a['max_pixels']}",
        f"data.max_prompt_length={a['max_prompt_length']}",
        "rollout.engine=hf", f"rollout.num_generations={a['num_generations']}",
        f"rollout.temperature={a['temperature']}", f"rollout.top_p={a['top_p']}", f"rollout.top_k={a['top_k']}",
        f"rollout.max_completion_length={a['max_new_tokens']}", f"rollout.batch_size={n}",
        f"algorithm.beta={a['beta']}", f"algorithm.epsilon_low={a['epsilon']}",
        f"algorithm.epsilon_high={a['epsilon']}", f"algorithm.num_iterations={a['num_iterations']}",
        f"algorithm.loss_type={a['loss_type']}", f"algorithm.reward_workers={a['reward_workers']}",
        f"optim.lr={a['lr']}", "optim.scheduler=constant", "optim.warmup_steps=0",
        f"optim.impl={a.get('optim_impl', 'auto')}",
        f"train.prompts_per_step={a['prompts']}", f"train.micro_batch_size={a['micro_batch']}",
    ])


def qwen2vl_2b_config(tokenizer):
    """Qwen2-VL-2B's architecture with this tokenizer's special-token ids (the vocabulary
    stays 151,936: the model's rows beyond the tokenizer's are never produced by the
    tokenizer, and sampled ids there decode to nothing)."""
    from transformers import Qwen2VLConfig

    from r1vl.models import SPECIAL_TOKENS

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    return Qwen2VLConfig(
        text_config=dict(QWEN2_VL_2B_TEXT, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad),
        vision_config=dict(QWEN2_VL_2B_VISION),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
    )


def prepare(a: dict, work: Path) -> dict:
    """Synthetic data and the model + processor every run loads (saved under `work`)."""
    import torch

    from r1vl.data.synthetic import generate
    from r1vl.models import load_policy, save_pretrained

    device = _resolve_device(a["device"])
    n_prompts = (a["warmup"] + a["repeats"]) * a["prompts"]
    generate(str(work / "data"), n_prompts, 1, a["seed"])
    cfg = _r1vl_config(a)
    model_dir = work / "model"
    if a["preset"] == "tiny":  # the default run's tiny Qwen2-VL (BPE trained on 2,000 synthetic samples)
        model, processor = load_policy(cfg.model, min_pixels=a["min_pixels"], max_pixels=a["max_pixels"],
                                       seed=a["seed"], corpus=None, cache_dir=model_dir)
        name = "tiny Qwen2-VL (r1vl.models.build_tiny, model.tiny defaults)"
    else:
        from transformers import Qwen2VLForConditionalGeneration

        from r1vl.models import VLProcessor, make_image_processor, synthetic_corpus, train_tokenizer

        t = cfg.model.tiny
        tokenizer = train_tokenizer(synthetic_corpus(t.tokenizer_corpus_size, seed=a["seed"]), t.vocab_size,
                                    t.max_token_length)
        config = qwen2vl_2b_config(tokenizer)
        torch.manual_seed(a["seed"])
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=_dtype(a["dtype"]))
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(model.generation_config, key, getattr(config.text_config, key))
        processor = VLProcessor(tokenizer, make_image_processor(a["min_pixels"], a["max_pixels"]))
        save_pretrained(model, processor, model_dir)
        name = "Qwen2-VL-2B architecture, random init (published config numbers)"
    tc = model.config.text_config
    vc = model.config.vision_config
    from bench_loss import device_name, device_slug  # this script's folder is sys.path[0] in its workers
    from r1vl.speedups import resolve_attn_implementation

    meta = {
        "device": device_name(device), "slug": device_slug(device), "versions": _versions(),
        "attn_resolved": resolve_attn_implementation(a["attn"], device, a["dtype"]),
        "model": {"name": name, "params": int(sum(p.numel() for p in model.parameters())),
                  "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
                  "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
                  "num_key_value_heads": tc.num_key_value_heads, "vocab_size": tc.vocab_size,
                  "tokenizer_size": len(processor.tokenizer),
                  "tie_word_embeddings": bool(model.config.tie_word_embeddings), "vision_depth": vc.depth,
                  "vision_embed_dim": vc.embed_dim, "seed": a["seed"]},
    }
    del model
    return meta


def _load_samples(a: dict, work: Path):
    from r1vl.data import load_dataset

    ds = load_dataset(str(work / "data" / "train.jsonl"), min_pixels=a["min_pixels"], max_pixels=a["max_pixels"])
    return [ds[i] for i in range(len(ds))]


def _suppressed_ids(processor) -> list[int]:
    """Ids never sampled on either side: the vision placeholders (as the HF engine does) and
    the stop tokens, so that every completion has exactly max_new_tokens tokens."""
    out = []
    for i in list(processor.vision_token_ids()) + list(processor.stop_token_ids()):
        if i not in out:
            out.append(int(i))
    return out


# --------------------------------------------------------------------------- r1vl


def run_r1vl(a: dict, work: Path, variant: str, save=None) -> dict:
    """The r1vl job; save(result) after every step (the worker writes it, so a run cut off
    keeps its finished steps)."""
    import torch

    from r1vl.algo import UpdateConfig, build_batch, compute_logprobs, group_advantages, grpo_update
    from r1vl.eval import make_prompt, score
    from r1vl.models import HostWeights, PolicyWithLoss, load_pretrained, make_reference, unwrap
    from r1vl.rollout.base import SamplingConfig
    from r1vl.rollout.is_correction import RolloutIS, is_ratio_stats
    from r1vl.speedups import SpeedupError, apply_speedups
    from r1vl.train import check_prompt_lengths, logprob_temperatures, make_engine, make_optimizer
    from r1vl.utils import derive_seed, seed_everything

    loss_path, _, liger = variant.partition("+")
    liger = liger == "liger"
    is_mode = a.get("rollout_is", "off")
    device = _resolve_device(a["device"])
    cfg = _r1vl_config(a)
    seed_everything(cfg.seed)
    model, processor = load_pretrained(work / "model", dtype=cfg.model.dtype,
                                       attn_implementation=a["attn_resolved"], min_pixels=cfg.data.min_pixels,
                                       max_pixels=cfg.data.max_pixels)
    model.to(device)
    try:
        sp = apply_speedups(model, device=device, attn_implementation=a["attn_resolved"],
                            gradient_checkpointing=cfg.model.gradient_checkpointing, liger=liger)
    except SpeedupError as e:
        return {"skipped": f"skipped: {e}"}
    if liger and not sp["liger"]:
        return {"skipped": LIGER_CPU_REASON}
    model.train()  # as the trainer: from_pretrained's eval mode would turn gradient checkpointing off
    m_cfg = cfg.model
    policy = PolicyWithLoss(model, dedup_images=m_cfg.dedup_images, share_prompts=m_cfg.share_prompts)
    if loss_path == "materialised":
        model.lm_head = _materialised_head_class()(model.lm_head)
    params = [p for p in policy.parameters() if p.requires_grad]
    a_cfg, ro = cfg.algorithm, cfg.rollout
    ref_policy = (PolicyWithLoss(make_reference(model), dedup_images=m_cfg.dedup_images,
                                 share_prompts=m_cfg.share_prompts) if a_cfg.beta != 0 else None)
    ref_weights = HostWeights(ref_policy, device) if ref_policy is not None and m_cfg.ref_on_host else None
    mu = a_cfg.num_iterations
    steps = a["warmup"] + a["repeats"]
    opt, sched = make_optimizer(params, cfg.optim.lr, cfg, steps * mu, cfg.optim.warmup_steps, cfg.optim.scheduler)
    ucfg = UpdateConfig(beta=a_cfg.beta, epsilon_low=a_cfg.epsilon_low, epsilon_high=a_cfg.epsilon_high,
                        num_iterations=mu, loss_type=a_cfg.loss_type,
                        importance_sampling_level=a_cfg.importance_sampling_level,
                        temperature=logprob_temperatures(cfg)[0],
                        max_completion_length=ro.max_completion_length,
                        micro_batch_size=cfg.train.micro_batch_size, max_grad_norm=cfg.optim.max_grad_norm)
    engine = make_engine(cfg, model, processor)
    engine.suppress_ids = _suppressed_ids(processor)  # forced length: no EOS, no vision placeholders
    samples_all = _load_samples(a, work)
    G, P, L = ro.num_generations, cfg.train.prompts_per_step, ro.max_completion_length
    dtype = next(model.parameters()).dtype
    impl_config = {"variant": variant, "loss_path": loss_path,
                   "lm_head": ("r1vl.kernels fused (linear_logprobs / fused_linear_grpo_loss)"
                               if loss_path == "fused" else
                               "materialised logits (model dtype) -> fp32 log_softmax + gather, "
                               "same GRPO objective (bench-only MaterialisedLMHead)"),
                   "liger": sp["liger"] or [], "attn_implementation": sp["attn_implementation"],
                   "gradient_checkpointing": sp["gradient_checkpointing"],
                   "dedup_images": m_cfg.dedup_images, "share_prompts": m_cfg.share_prompts,
                   "ref_on_host": m_cfg.ref_on_host,
                   "optimizer": f"torch.optim.AdamW(betas=({cfg.optim.beta1}, {cfg.optim.beta2}), "
                                f"eps={cfg.optim.eps}, weight_decay={cfg.optim.weight_decay}, "
                                f"{_adamw_kind(opt)}), clip {cfg.optim.max_grad_norm}",
                   "generation": f"r1vl.rollout.hf_engine.HFEngine, {G * P} sequences per generate() call",
                   "rollout_is_path": {"off": "none", "pass": "a no-grad pass of its own for the old log-probs (logprob "
                                  "phase), the ratio handed to the update",
                                  "update": "the ratio formed in the update's forward (RolloutIS)"}[is_mode]}

    def saved(steps_so_far):
        if save is not None:
            save({"steps": steps_so_far, "impl_config": dict(impl_config, tf32=_tf32()), "partial": True})

    clock = PhaseClock(device, warmup=a["warmup"], on_step=saved)
    for step in range(steps):
        samples = samples_all[step * P: (step + 1) * P]
        prompts = [make_prompt(processor, s) for s in samples]
        clock.begin_step()
        with clock.phase("rollout"):
            sampling = SamplingConfig(max_new_tokens=L, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                      seed=derive_seed(cfg.seed, 3, 0, step))
            comps = engine.generate(prompts, G, sampling)
        with clock.phase("reward"):
            sc = score([c.text for c in comps], [samples[c.prompt_index] for c in comps], alpha=a_cfg.alpha,
                       variant=a_cfg.accuracy_variant, accuracy_weight=a_cfg.accuracy_weight,
                       validity_weight=a_cfg.validity_weight, workers=a_cfg.reward_workers,
                       timeout_s=a_cfg.reward_timeout_s)
            adv = group_advantages(torch.tensor(sc["total"]), G, scale=a_cfg.scale_rewards)
        lengths = {len(c.token_ids) for c in comps}
        if lengths != {L}:
            raise RuntimeError(f"forced-length generation failed: completion lengths {sorted(lengths)} != {L}")
        batch = build_batch(processor, [prompts[c.prompt_index].text for c in comps],
                            [prompts[c.prompt_index].image for c in comps], [c.token_ids for c in comps],
                            dtype=dtype, compact_images=True).to(device)  # as the trainer builds it
        check_prompt_lengths(batch, [samples[c.prompt_index] for c in comps], cfg.data.max_prompt_length)
        with clock.phase("logprob"):
            ref_lp = old_lp = None
            if ref_policy is not None:
                with ref_weights.on_device() if ref_weights is not None else contextlib.nullcontext():
                    ref_lp = compute_logprobs(ref_policy, batch, micro_batch_size=ucfg.micro_batch_size,
                                              temperature=ucfg.temperature)
            if mu > 1 or is_mode == "pass":  # old log-probs here (as TRL computes them while preparing the
                # batch, and the trainer for its IS correction), not in the update
                old_lp = compute_logprobs(policy, batch, micro_batch_size=ucfg.micro_batch_size,
                                          temperature=ucfg.temperature)
            is_spec = is_ratio = None
            if is_mode != "off":  # the engine's log-probs: a stand-in (values do not change the cost)
                eng = ref_lp if ref_lp is not None else torch.zeros(batch.targets.shape, device=device)
                is_spec = RolloutIS(eng, batch.mask.bool(), cap=ro.is_cap, mode=ro.is_mode,
                                    temperature=ucfg.temperature)
                if is_mode == "pass":
                    is_ratio, is_spec = is_spec.ratio(old_lp, batch.mask), None
                    if mu == 1:
                        old_lp = None  # (as the trainer: at mu = 1 the update's own log-probs are the old ones)
        with clock.phase("update"):
            # what the update ran with: checkpointing works in training mode only
            impl_config["gradient_checkpointing"] = bool(sp["gradient_checkpointing"]) and unwrap(model).training
            m = grpo_update(policy, opt, sched, batch, adv.to(device), ucfg, ref_logprobs=ref_lp,
                            old_logprobs=old_lp, rollout_is_ratio=is_ratio, rollout_is=is_spec)
            if is_mode != "off":
                is_mean = is_ratio_stats(m.pop("rollout_is_ratio", is_ratio), batch.mask, cap=ro.is_cap,
                                         mode=ro.is_mode)["is_ratio_mean"]
            engine.load_weights(unwrap(model).named_parameters())  # as train.py: a no-op for the HF engine
        clock.end_step(completion_tokens=int(batch.mask.sum()),
                       prompt_tokens=int(batch.inputs["attention_mask"][:, : batch.start].sum()),
                       loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), entropy=float(m.get("entropy", "nan")),
                       kl=float(m.get("kl", 0.0)), **({} if is_mode == "off" else {"is_ratio_mean": is_mean}))
    probe = _loss_probe(policy, params, batch, ref_lp, ucfg, device, cfg.seed) if a["loss_probe"] else None
    return {"steps": clock.steps, "loss_probe": probe, "impl_config": dict(impl_config, tf32=_tf32())}


def _adamw_kind(opt) -> str:
    """Which AdamW implementation runs: fused, foreach or for-loop (torch's default resolved)."""
    d = getattr(opt, "defaults", {})
    if d.get("fused"):
        return "fused"
    if d.get("foreach") is not None:
        return "foreach" if d["foreach"] else "for-loop"
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach  # private; stable since torch 2.0
        params = [p for g in opt.param_groups for p in g["params"]]
        foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    except Exception:  # noqa: BLE001 - a label only
        return "torch's default"
    return "foreach (torch's default here)" if foreach else "for-loop (torch's default here)"


def _loss_probe(policy, params, batch, ref_lp, ucfg, device, seed: int) -> dict:
    """Untimed, after the timed steps: r1vl.algo.grpo_update on the last step's batch at a
    point where the loss depends on the head's log-probs. (At a real step of this benchmark
    it does not: the random model's completions all score 0, so the advantages are 0, and
    with μ = 1 the ratio is 1 and the reference equals the policy, so loss and gradient are
    0 whatever the head computes.) Seeded advantages ~ N(0, 1), old log-probs = reference
    log-probs + 0.1·N(0, 1) (ratios ≠ 1, some clipped) and reference log-probs shifted by
    −0.1·N(0, 1) (KL ≠ 0); μ = 2 passes (grpo_update takes old log-probs only for μ > 1)
    with SGD at lr 0, so the weights do not move. Returns the loss and the gradient norm
    (before clipping): equal for the fused and the materialised head up to rounding."""
    import dataclasses

    import torch

    from r1vl.algo import compute_logprobs, grpo_update

    if ref_lp is None:
        ref_lp = compute_logprobs(policy, batch, micro_batch_size=ucfg.micro_batch_size, temperature=ucfg.temperature)
    g = torch.Generator().manual_seed(seed + 17)
    B, T = batch.targets.shape
    mask = batch.mask.to(device=device, dtype=torch.float32)
    adv = torch.randn(B, generator=g).to(device)
    old = (ref_lp + 0.1 * torch.randn(B, T, generator=g).to(device)) * mask
    ref = (ref_lp - 0.1 * torch.randn(B, T, generator=g).to(device)) * mask
    sgd = torch.optim.SGD(params, lr=0.0)
    cfg = dataclasses.replace(ucfg, num_iterations=2, beta=ucfg.beta or 0.04)
    m = grpo_update(policy, sgd, None, batch, adv, cfg, ref_logprobs=ref, old_logprobs=old)
    sgd.zero_grad(set_to_none=True)
    return {k: float(m[k]) for k in ("loss", "grad_norm", "kl", "clip_ratio") if k in m}


# --------------------------------------------------------------------------- TRL


def _trl_processor(processor):
    """transformers' Qwen2VLProcessor around r1vl's tokenizer and (PIL) image processor. Its
    constructor insists on a video processor, which needs torchvision; images only here, so
    the video processor may be None."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                     video_processor=None, chat_template=processor.tokenizer.chat_template)


def run_trl(a: dict, work: Path, save=None) -> dict:
    """TRL's job; save(result) after every step, as run_r1vl."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1vl.algo import scale_mode
    from r1vl.data import format_prompt
    from r1vl.eval import score
    from r1vl.models import VLProcessor

    device = _resolve_device(a["device"])
    cfg = _r1vl_config(a)
    a_cfg, ro = cfg.algorithm, cfg.rollout
    G, P, L, mb = ro.num_generations, cfg.train.prompts_per_step, ro.max_completion_length, cfg.train.micro_batch_size
    N = G * P
    mu = a_cfg.num_iterations
    steps = a["warmup"] + a["repeats"]
    processor = VLProcessor.from_pretrained(work / "model", min_pixels=cfg.data.min_pixels,
                                            max_pixels=cfg.data.max_pixels)
    trl_proc = _trl_processor(processor)
    samples = _load_samples(a, work)[: steps * P]
    # the same prompts, in the same order (shuffle off): step k trains on samples[k*P:(k+1)*P];
    # images already sized by r1vl's loader; conversational prompts, TRL puts the image first
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": format_prompt(s.problem)}] for s in samples],
                              "image": [s.image for s in samples], "idx": list(range(len(samples)))})

    def step_rar_plus_step_rvr(prompts, completions, idx, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(texts, [samples[i] for i in idx], alpha=a_cfg.alpha, variant=a_cfg.accuracy_variant,
                     accuracy_weight=a_cfg.accuracy_weight, validity_weight=a_cfg.validity_weight,
                     workers=a_cfg.reward_workers, timeout_s=a_cfg.reward_timeout_s)["total"]

    gc_on = cfg.model.gradient_checkpointing
    args = GRPOConfig(
        output_dir=str(work / "trl_out"), seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=a["dtype"] == "bfloat16", fp16=a["dtype"] == "float16",
        model_init_kwargs={"dtype": a["dtype"], "attn_implementation": a["attn_resolved"]},
        per_device_train_batch_size=mb, gradient_accumulation_steps=N // mb,  # one optimizer step = all N
        num_generations=G, max_completion_length=L, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
        use_vllm=False, generation_kwargs={"suppress_tokens": _suppressed_ids(processor)},
        beta=a_cfg.beta, epsilon=a_cfg.epsilon_low, epsilon_high=a_cfg.epsilon_high, loss_type=a_cfg.loss_type,
        importance_sampling_level=a_cfg.importance_sampling_level, num_iterations=mu,
        use_bias_correction_kl=a_cfg.use_bias_correction_kl,  # TRL's default is True: the same objective
        delta=a_cfg.delta,
        scale_rewards=scale_mode(a_cfg.scale_rewards), mask_truncated_completions=False,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.optim.max_grad_norm,
        optim=a.get("trl_optim", "adamw_torch"), lr_scheduler_type="constant", warmup_steps=0, max_steps=steps * mu,
        gradient_checkpointing=gc_on, gradient_checkpointing_kwargs={"use_reentrant": False} if gc_on else None,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
        report_to="none", logging_steps=10**9, save_strategy="no", disable_tqdm=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=str(work / "model"), reward_funcs=[step_rar_plus_step_rvr], args=args,
                          train_dataset=data, processing_class=trl_proc)
    def impl_config() -> dict:
        model = trainer.model
        return {"variant": "default", "loss_path": "trl (its chunked log-prob head, trl.trainer.utils"
                                                   ".add_fused_lm_head, always on in trl 1.16)",
                "liger": [], "attn_implementation": model.config._attn_implementation,
                "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", gc_on)),
                "optimizer": f"{args.optim} (torch.optim.AdamW, betas=({cfg.optim.beta1}, "
                             f"{cfg.optim.beta2}), eps={cfg.optim.eps}, {_adamw_kind(trainer.optimizer)}), "
                             f"clip {cfg.optim.max_grad_norm}",
                "generation": f"GRPOTrainer HF generate (use_vllm=False), {N} sequences per call; "
                              f"per_device_train_batch_size={mb}, gradient_accumulation_steps={N // mb}, "
                              f"steps_per_generation={args.steps_per_generation}",
                "trl_mixed_precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
                "tf32": _tf32()}

    def saved(steps_so_far):
        if save is not None:
            save({"steps": steps_so_far, "impl_config": impl_config(), "partial": True})

    clock = PhaseClock(device, warmup=a["warmup"], on_step=saved)
    state = {"in_batch": False, "prepare": 0.0, "tokens": None, "upd_peak": None, "upd_open": False}

    def timed(name, fn, phase_name=None, only_in_batch=False):
        def wrapper(*args_, **kw):
            if clock.cur is None or (only_in_batch and not state["in_batch"]):
                return fn(*args_, **kw)
            with clock.phase(phase_name or name):
                return fn(*args_, **kw)
        return wrapper

    trainer._generate = timed("rollout", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed("logprob", trainer._get_per_token_logps_and_entropies,
                                                       only_in_batch=True)
    orig_gen_score, orig_prepare = trainer._generate_and_score_completions, trainer._prepare_inputs

    def gen_score(inputs):
        state["in_batch"] = True
        try:
            out = orig_gen_score(inputs)
        finally:
            state["in_batch"] = False
        state["tokens"] = (int(out["completion_mask"].sum()), int(out["prompt_mask"].sum()))
        return out

    def prepare_inputs(generation_batch):
        if clock.cur is None:
            return orig_prepare(generation_batch)
        clock.sync()
        if state["upd_open"] and clock.cuda:  # the previous micro-batch's forward/backward
            state["upd_peak"] = max(state["upd_peak"] or 0, clock._peak())
        t0 = time.perf_counter()
        out = orig_prepare(generation_batch)
        clock.sync()
        state["prepare"] += time.perf_counter() - t0
        clock._fold_and_reset()  # a window of the update's peak starts here
        state["upd_open"] = True
        return out

    trainer._generate_and_score_completions = gen_score
    trainer._prepare_inputs = prepare_inputs

    class RoundTimer(TrainerCallback):
        """μ optimizer steps share one generation: they are one StepGRPO step."""

        def on_step_begin(self, args_, st, control, **kw):
            if st.global_step % mu == 0:
                state.update(prepare=0.0, upd_peak=None, upd_open=False)
                clock.begin_step()

        def on_step_end(self, args_, st, control, **kw):
            if st.global_step % mu == 0 and clock.cur is not None:
                clock.sync()
                round_s = time.perf_counter() - clock.cur["t0"]
                peak = clock._peak()
                if peak is not None:
                    peak = max(peak, state["upd_peak"] or 0)
                clock.add("update", round_s - state["prepare"], peak)
                comp, prompt = state["tokens"]
                clock.end_step(completion_tokens=comp, prompt_tokens=prompt)

    trainer.add_callback(RoundTimer())
    trainer.train()
    return {"steps": clock.steps, "impl_config": impl_config()}


# --------------------------------------------------------------------------- rows, table


STATISTIC = ("seconds: median over the timed steps (with 2 steps the median is their mean); seconds_min: "
             "the fastest timed step; seconds_per_repeat: each; tokens_per_s from the median; "
             "peak = max over the timed steps")
WARMUP_ONLY = ("no timed step finished before the run was cut off: these are its last warm-up step's numbers "
               "(first-call costs such as compilation and autotuning included; the peak memory is still that "
               "step's peak)")


def job_rows(impl: str, variant: str, res: dict, a: dict, meta: dict) -> list[dict]:
    """Five rows (rollout, reward, logprob, update, step) of one run, from the steps it
    finished (a run cut short keeps them: config.cut_short says how far it got); one row
    when it was skipped or failed before finishing a step."""
    device = meta["device"]
    base = {
        "preset": a["preset"], "variant": variant, "model": meta["model"], "dtype": a["dtype"],
        "prompts_per_step": a["prompts"], "num_generations": a["num_generations"],
        "completions_per_step": a["prompts"] * a["num_generations"], "max_completion_length": a["max_new_tokens"],
        "forced_length": "EOS and vision placeholder tokens suppressed on both sides: every completion has "
                         "exactly max_completion_length tokens",
        "micro_batch_size": a["micro_batch"], "num_iterations": a["num_iterations"], "beta": a["beta"],
        "epsilon": a["epsilon"], "loss_type": a["loss_type"], "temperature": a["temperature"], "top_p": a["top_p"],
        "top_k": a["top_k"], "lr": a["lr"], "min_pixels": a["min_pixels"], "max_pixels": a["max_pixels"],
        "attn_requested": a["attn"], "attn_resolved": a["attn_resolved"], "reward_workers": a["reward_workers"],
        "rollout_is": a.get("rollout_is", "off"), "seed": a["seed"],
        "warmup_steps": a["warmup"], "repeats": a["repeats"], "statistic": STATISTIC,
        "tokens_counted": "completion tokens (update: x num_iterations)",
        "sync": "torch.cuda.synchronize at every phase boundary" if meta["slug"] != "cpu" else "none needed (CPU)",
    }
    if meta["slug"] == "cpu":
        base["peak_mem_note"] = CPU_PEAK_NOTE
    else:
        base["peak_mem_note"] = "torch.cuda.max_memory_allocated, reset at the start of each phase"
    steps = res.get("steps") or []
    if "skipped" in res or not steps:
        cfg = dict(base, **{k: res[k] for k in ("skipped", "error", "cut_short") if k in res})
        return [{"impl": impl, "phase": "step", "device": device, "tokens_per_s": None, "seconds": None,
                 "peak_mem_bytes": None, "config": cfg, "versions": meta["versions"]}]
    timed = steps[a["warmup"]:]
    cfg = dict(base, **res["impl_config"])
    for k in ("cut_short", "error"):
        if k in res:
            cfg[k] = res[k]
    cfg["timed_steps"] = len(timed)
    if not timed:
        timed = steps[-1:]
        cfg["warmup_only"] = WARMUP_ONLY
    ex = timed[-1]["extra"]
    cfg["completion_tokens_per_step"] = ex["completion_tokens"]
    cfg["prompt_tokens_per_step"] = ex["prompt_tokens"]
    if res.get("loss_probe"):
        cfg["loss_probe"] = res["loss_probe"]
    if "loss" in ex:
        cfg["train_metrics_per_step"] = [{k: s["extra"][k] for k in ("loss", "grad_norm", "entropy", "kl",
                                                                      "is_ratio_mean") if k in s["extra"]}
                                         for s in steps]
    rows = []
    for ph in PHASES:
        secs = [s["seconds"].get(ph, 0.0) for s in timed]
        med = statistics.median(secs)
        peaks = [s["peak"].get(ph) for s in timed if s["peak"].get(ph) is not None]
        tokens = ex["completion_tokens"] * (a["num_iterations"] if ph == "update" else 1)
        rows.append({"impl": impl, "phase": ph, "device": device,
                     "tokens_per_s": tokens / med if med > 0 else None, "seconds": med,
                     "peak_mem_bytes": max(peaks) if peaks else None,
                     "config": dict(cfg, seconds_per_repeat=secs, seconds_min=min(secs), tokens=tokens),
                     "versions": meta["versions"]})
    return rows


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = [TABLE_HEADER, "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["config"]
        if r["seconds"] is None:
            why = c.get("skipped") or ("failed: " + (str(c.get("error") or "?").splitlines() or ["?"])[-1][:120])
            lines.append(f"| {r['impl']} | {c['variant']} | — | {why} | | | |")
            continue
        mib = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        lines.append(f"| {r['impl']} | {_variant_cell(c)} | {r['phase']} | {r['seconds']:.3f} | "
                     f"{c['seconds_min']:.3f} | {_fmt(r['tokens_per_s'], '.1f')} | {_fmt(mib, '.0f')} |")
    return "\n".join(lines)


TABLE_HEADER = "| impl | variant | phase | s (median) | s (min) | tok/s | peak MiB |"


def _variant_cell(c: dict) -> str:
    """The variant (with its --rollout-is mode), marked when its numbers come from a run cut short."""
    v = c["variant"] + (f", IS {c['rollout_is']}" if c.get("rollout_is", "off") != "off" else "")
    if c.get("warmup_only"):
        return f"{v} (warm-up step only)"
    if c.get("cut_short"):
        return f"{v} ({c['timed_steps']} of {c['repeats']} timed steps)"
    return v


def ratios(rows: list[dict]) -> list[str]:
    """r1vl / TRL for the update phase: tokens/s (goal >= 2) and peak memory (goal <= 0.6)."""
    trl = next((r for r in rows if r["impl"] == "trl" and r["phase"] == "update" and r["seconds"]), None)
    if trl is None:
        return ["r1vl/TRL: no TRL update row (TRL skipped or failed)"]
    out = []
    for r in rows:
        if r["impl"] != "r1vl" or r["phase"] != "update" or not r["seconds"]:
            continue
        tps = r["tokens_per_s"] / trl["tokens_per_s"]
        if r["peak_mem_bytes"] is not None and trl["peak_mem_bytes"]:
            mem = f"{r['peak_mem_bytes'] / trl['peak_mem_bytes']:.2f}x (goal <= 0.6x)"
        else:
            mem = "n/a (no peak memory on CPU)"
        caveat = [f"{who}: warm-up step only" for who, x in (("r1vl", r), ("TRL", trl))
                  if x["config"].get("warmup_only")]
        out.append(f"r1vl/TRL update, {r['config']['variant']}: tokens/s {tps:.2f}x (goal >= 2x), peak memory {mem}"
                   + (f" [{'; '.join(caveat)}]" if caveat else ""))
    return out


# --------------------------------------------------------------------------- driver


def _jobs(a: dict) -> list[tuple[str, str]]:
    """The first r1vl variant, then TRL, then the other variants: a run cut short by a time
    limit still has the comparison that matters most."""
    r1 = [("r1vl", v) for v in a["variants"]] if "r1vl" in a["impls"] else []
    trl = [("trl", "default")] if "trl" in a["impls"] else []
    return r1[:1] + trl + r1[1:]


_CHILD: subprocess.Popen | None = None
POLL_S = 1.0            # how often the driver looks at a running worker's result file
NEXT_RUN_FACTOR = 1.5   # time left for the next run: this multiple of this run's time to its first timed step


class _Terminated(BaseException):
    """SIGTERM reached the driver (e.g. `timeout` ending the GPU session's stage)."""


def _on_term(signum, frame):  # the running worker is killed and its finished steps kept (_spawn)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)       # once: the rows are being written
    raise _Terminated(signum)


def _result_path(work: Path, job: str) -> Path:
    return work / f"result_{re.sub(r'[^a-z0-9]+', '_', job)}.json"


def _save_json(path: Path, obj) -> None:
    """Write to a temporary file, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_timed_s(steps: list, warmup: int, t0: float) -> float | None:
    """Seconds from the worker's start to the end of its first timed step."""
    return steps[warmup]["t_end"] - t0 if len(steps) > warmup else None


def _stop_for_next(steps: list, warmup: int, t0: float, deadline: float, factor: float) -> bool:
    """Whether to stop a run now to leave the next one its time: once it has a timed step,
    the step in progress (expected to last as long as the last one) would end later than
    `deadline` minus factor x this run's time to its first timed step."""
    first = _first_timed_s(steps, warmup, t0)
    if first is None:
        return False
    expected_end = steps[-1]["t_end"] + steps[-1]["seconds"]["step"]
    return expected_end > deadline - factor * first


def _spawn(job: str, work: Path, timeout: float | None, warmup: int = 0, total: int | None = None,
           reserve: float | None = None) -> dict:
    """One worker process; its output goes to work/log_<job>.txt, and its progress lines
    ("step i: ...") to stderr as they come. The worker saves its result after every step, so
    a run cut off (timeout, SIGTERM to the driver, a crash, or stopped to leave the next run
    `reserve` x its time to its first timed step) returns the steps it finished, with
    "cut_short" saying why; "error" only when it failed or has no timed step."""
    import threading

    global _CHILD
    out = _result_path(work, job)
    out.unlink(missing_ok=True)                         # never read an earlier run's file
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--workdir", str(work)]
    t0 = time.time()
    deadline = None if timeout is None else t0 + timeout
    lines: list[str] = []
    _CHILD = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pump(stream) -> None:
        for line in stream:
            lines.append(line)
            if line.startswith("step "):
                print(f"bench_step:   {job}: {line.rstrip()}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, args=(_CHILD.stdout,), daemon=True)
    reader.start()
    cut, terminated = None, False
    try:
        while True:
            try:
                _CHILD.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                now = time.time()
                if deadline is not None and now >= deadline:
                    cut = f"timed out after {timeout:.0f} s"
                    break
                if reserve is not None and deadline is not None:
                    steps = (_read_json(out) or {}).get("steps") or []
                    if _stop_for_next(steps, warmup, t0, deadline, reserve):
                        cut = (f"stopped after {len(steps) - warmup} timed step(s) to leave the next run "
                               f"{reserve:g} x this run's {_first_timed_s(steps, warmup, t0):.0f} s to its first "
                               "timed step")
                        break
    except _Terminated:
        cut, terminated = "terminated (SIGTERM to bench_step.py)", True
    finally:
        if _CHILD.poll() is None:
            _CHILD.kill()
        _CHILD.wait()
        rc = _CHILD.returncode
        _CHILD = None
    reader.join(timeout=10)
    dt = time.time() - t0
    (work / f"log_{out.stem[len('result_'):]}.txt").write_text("".join(lines))
    tail = "\n".join("".join(lines).strip().splitlines()[-25:])
    res = _read_json(out)
    if cut is None and rc == 0 and res is not None and not res.get("partial"):
        res["wall_s"] = dt
        res["first_timed_s"] = _first_timed_s(res.get("steps") or [], warmup, t0)
        return res
    why = cut or f"exit code {rc}"
    steps = (res or {}).get("steps") or []
    if not steps:                                       # nothing to keep: the verdict last (table)
        err = {"error": f"its last lines:\n{tail}\n{why}" if cut else f"exit code {rc}: {tail}"}
        return dict(err, terminated=True) if terminated else err
    res.pop("partial", None)
    res.update(wall_s=dt, first_timed_s=_first_timed_s(steps, warmup, t0),
               cut_short=f"{why}: {len(steps)}{'' if total is None else f' of {total}'} steps finished "
                         f"({min(len(steps), warmup)} warm-up)")
    if cut is None:                                     # it failed after some steps
        res["error"] = f"exit code {rc}: {tail}"
    elif len(steps) <= warmup:
        res["error"] = f"its last lines:\n{tail}\n{why} before its first timed step"
    if terminated:
        res["terminated"] = True
    return res


def worker(job: str, work: Path) -> int:
    a = json.loads((work / "args.json").read_text())
    path = _result_path(work, job)

    def save(res):
        _save_json(path, res)

    if job == "prepare":
        res = prepare(a, work)
    elif job == "trl":
        res = run_trl(a, work, save=save)
    elif job.startswith("r1vl:"):
        res = run_r1vl(a, work, job.split(":", 1)[1], save=save)
    else:
        raise SystemExit(f"unknown worker job {job!r}")
    save(res)
    return 0


def _preset_default(key: str, fmt=str) -> str:
    return "default: the preset's, " + ", ".join(f"{name} {fmt(p[key])}" for name, p in sorted(PRESETS.items()))


def build_parser() -> argparse.ArgumentParser:
    pd = _preset_default
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="A bad argument is one error line and exit code 2, before anything runs. "
                                    "Flags left unset take the preset's value; every value is in each "
                                    "row's config.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="tiny: the repo's tiny model (CPU smoke run); 2b: random Qwen2-VL-2B (GPU) "
                         "(default: %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda if available, else cpu (default: %(default)s)")
    ap.add_argument("--impls", default="r1vl,trl", help="comma-separated among r1vl, trl (default: %(default)s)")
    ap.add_argument("--variants", default=",".join(R1VL_VARIANTS),
                    help=f"r1vl variants, comma-separated among {', '.join(R1VL_VARIANTS)}; +liger ones are "
                         "reported as skipped on CPU (default: all)")
    ap.add_argument("--prompts", type=_cli.positive_int, help="prompts per step (" + pd("prompts") + ")")
    ap.add_argument("--num-generations", type=_cli.positive_int,
                    help="G, completions per prompt, at least 2 (" + pd("num_generations") + ")")
    ap.add_argument("--max-new-tokens", type=_cli.positive_int,
                    help="completion length in tokens (forced: exactly this many) (" + pd("max_new_tokens") + ")")
    ap.add_argument("--micro-batch", type=_cli.positive_int,
                    help="sequences per forward/backward (and per log-prob pass); must divide prompts x G ("
                         + pd("micro_batch") + ")")
    ap.add_argument("--num-iterations", type=_cli.positive_int, default=1,
                    help="μ, optimisation passes per generation (default: %(default)s)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient β (default: %(default)s)")
    ap.add_argument("--epsilon", type=float, default=0.2, help="clip range ε, low and high (default: %(default)s)")
    ap.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo", "dapo"), default="grpo",
                    help="(default: %(default)s)")
    ap.add_argument("--temperature", type=_cli.positive_float, default=1.0,
                    help="sampling temperature (default: %(default)s)")
    ap.add_argument("--top-p", type=_cli.positive_float, default=1.0, help="(default: %(default)s)")
    ap.add_argument("--top-k", type=_cli.nonneg_int, default=0, help="0: off (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (" + pd("dtype") + ")")
    ap.add_argument("--attn", choices=("auto", "eager", "sdpa", "flash_attention_2"),
                    help="attention implementation for both (auto: flash-attn 2 on CUDA when it imports, else "
                         "sdpa) (" + pd("attn") + ")")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="gradient checkpointing, on both sides (" + pd("gradient_checkpointing", onoff) + ")")
    ap.add_argument("--min-pixels", type=_cli.positive_int,
                    help="image pixel bounds, in pixels (the synthetic 84x84 images are resized into them by "
                         "r1vl's loader) (" + pd("min_pixels") + ")")
    ap.add_argument("--max-pixels", type=_cli.positive_int, help="upper image bound, in pixels (" + pd("max_pixels") + ")")
    ap.add_argument("--max-prompt-length", type=_cli.positive_int, default=1024,
                    help="prompt tokens, checked as the trainer does (default: %(default)s)")
    ap.add_argument("--dedup-images", action=argparse.BooleanOptionalAction, default=True,
                    help="r1vl: vision tower once per distinct image (model.dedup_images); TRL runs it per "
                         "completion (default: on)")
    ap.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=True,
                    help="r1vl: log-prob passes and the update forward each prompt once and share its KV "
                         "cache with its G completions (model.share_prompts); TRL forwards whole rows "
                         "(default: on)")
    ap.add_argument("--ref-on-host", action=argparse.BooleanOptionalAction, default=False,
                    help="r1vl: reference weights in host memory, on the GPU for the reference log-probs only "
                         "(model.ref_on_host); TRL keeps its reference on the GPU (default: off)")
    ap.add_argument("--optim-impl", choices=("auto", "fused", "foreach", "for_loop"), default="auto",
                    help="r1vl: AdamW implementation (optim.impl; auto: fused on CUDA) (default: %(default)s)")
    ap.add_argument("--trl-optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch",
                    help="TRL: its optim argument (adamw_torch, its default: foreach on CUDA) "
                         "(default: %(default)s)")
    ap.add_argument("--reward-workers", type=_cli.nonneg_int, default=0,
                    help="r1vl.rewards.score_batch workers, 0: in-process (default: %(default)s)")
    ap.add_argument("--rollout-is", choices=("off", "pass", "update"), default="off",
                    help="r1vl only: the rollout importance-sampling correction's cost (vLLM + "
                         "rollout.is_correction in the trainer): 'pass' takes the trainer's old log-probs in a "
                         "no-grad pass of its own (the logprob phase), 'update' forms the ratio inside the "
                         "update's forward (the trainer at num_iterations=1); the engine log-probs are a stand-in "
                         "(the reference's, or 0), which does not change the cost (default: %(default)s)")
    ap.add_argument("--warmup", type=_cli.nonneg_int, help="untimed steps first (" + pd("warmup") + ")")
    ap.add_argument("--repeats", type=_cli.positive_int, help="timed steps, median taken (" + pd("repeats") + ")")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--loss-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="r1vl: after the timed steps, grpo_update at a point where the loss is not 0 "
                         "(fused and materialised must agree; untimed) (default: on)")
    ap.add_argument("--out", default=None,
                    help="JSON path; missing folders are created (default: bench/results/step_<device>.json)")
    ap.add_argument("--out-dir", default=None, help="write DIR/step_<device>.json instead, e.g. $OUT (default: none)")
    ap.add_argument("--workdir", default=None,
                    help="where the model and data are built, kept afterwards (default: a temp dir, removed)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp work dir (default: off)")
    ap.add_argument("--worker-timeout", type=_cli.positive_float, default=None,
                    help="seconds per run; a run cut off keeps the steps it finished (default: none)")
    ap.add_argument("--time-budget", type=_cli.positive_float, default=None,
                    help="seconds for the whole benchmark: each run gets at most what is left and keeps the "
                         "steps it finished when cut off; once it has a timed step it stops early to leave the "
                         f"next run {NEXT_RUN_FACTOR:g} x its own time to its first timed step; a run is skipped "
                         "when less is left than the quickest run so far took to its first timed step "
                         "(default: none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv=None):
    """The command line, checked: every bad value is an argparse error (exit code 2) here,
    before the model is built."""
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.worker:
        return a
    impls = [x.strip() for x in a.impls.split(",") if x.strip()]
    variants = [x.strip() for x in a.variants.split(",") if x.strip()]
    for x in impls:
        if x not in ("r1vl", "trl"):
            ap.error(f"--impls: unknown {x!r}; choose from r1vl, trl")
    for x in variants:
        if x not in R1VL_VARIANTS:
            ap.error(f"--variants: unknown {x!r}; choose from {', '.join(R1VL_VARIANTS)}")
    if not impls:
        ap.error("--impls: none given")
    if a.rollout_is != "off" and "trl" in impls:
        ap.error("--rollout-is: r1vl only (TRL's correction needs its vLLM rollouts); add --impls r1vl")
    if a.rollout_is == "update" and a.num_iterations > 1:
        ap.error("--rollout-is update: needs --num-iterations 1 (with more, the old log-probs come from a pass "
                 "before the update: 'pass')")
    if "r1vl" in impls and not variants:
        ap.error("--variants: none given")
    eff = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in PRESETS[a.preset].items()}
    if eff["num_generations"] < 2:
        ap.error("--num-generations must be >= 2 (group-relative advantages)")
    n = eff["prompts"] * eff["num_generations"]
    if n % eff["micro_batch"]:
        ap.error(f"prompts x G = {n} must be a multiple of --micro-batch {eff['micro_batch']} "
                 "(TRL's gradient accumulation covers all completions of a step)")
    if eff["min_pixels"] > eff["max_pixels"]:
        ap.error(f"--min-pixels {eff['min_pixels']} is above --max-pixels {eff['max_pixels']}")
    if a.device == "cuda":
        _cli.require_cuda(ap, "--device")
    if a.out:
        _cli.out_file(ap, "--out", a.out)
    elif a.out_dir:
        _cli.out_dir(ap, "--out-dir", a.out_dir)
    if a.workdir:
        _cli.out_dir(ap, "--workdir", a.workdir)
    return a


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.worker:
        return worker(ns.worker, Path(ns.workdir))
    a = {k: v for k, v in vars(ns).items() if k not in ("worker", "workdir", "keep_workdir", "out", "out_dir",
                                                         "worker_timeout", "time_budget")}
    for k, v in PRESETS[ns.preset].items():
        if a.get(k) is None:
            a[k] = v
    a["impls"] = [x.strip() for x in ns.impls.split(",") if x.strip()]         # checked in parse_args
    a["variants"] = [x.strip() for x in ns.variants.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, _on_term)
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="bench_step_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(a, indent=1))
    t0 = time.perf_counter()

    def time_left() -> float | None:
        if ns.time_budget is None:
            return ns.worker_timeout
        left = ns.time_budget - (time.perf_counter() - t0)
        return left if ns.worker_timeout is None else min(left, ns.worker_timeout)

    meta = _spawn("prepare", work, time_left())  # this process never touches the GPU
    if "error" in meta:
        print(f"bench_step: building the model and data failed:\n{meta['error']}", file=sys.stderr)
        return 1
    a["attn_resolved"] = meta["attn_resolved"]
    (work / "args.json").write_text(json.dumps(a, indent=1))
    cuda = meta["slug"] != "cpu"
    print(f"bench_step: {meta['model']['name']}, {meta['model']['params'] / 1e6:.1f} M parameters, on "
          f"{meta['device']} ({meta['wall_s']:.0f} s to build); work dir {work}", file=sys.stderr, flush=True)
    name = f"step_{meta['slug']}.json"
    out = Path(ns.out) if ns.out else (Path(ns.out_dir) if ns.out_dir else ROOT / "bench" / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed = terminated = False
    firsts: list[float] = []  # seconds each run took to its first timed step
    jobs = _jobs(a)

    def runs_here(impl: str, variant: str) -> bool:
        return not (impl == "r1vl" and variant.endswith("+liger") and not cuda)

    try:
        for k, (impl, variant) in enumerate(jobs):
            left = time_left()
            est = min(firsts, default=0.0)
            if not runs_here(impl, variant):
                res = {"skipped": LIGER_CPU_REASON}
            elif ns.time_budget is not None and left is not None and left < max(est, 1.0):
                res = {"skipped": f"skipped: --time-budget {ns.time_budget:.0f} s: {max(left, 0):.0f} s left, less "
                                  f"than the {est:.0f} s the quickest run so far took to its first timed step"}
            else:
                # with a budget, a run that has a timed step stops early to leave the next run its time
                more = any(runs_here(i, v) for i, v in jobs[k + 1:])
                reserve = NEXT_RUN_FACTOR if ns.time_budget is not None and more else None
                res = _spawn("trl" if impl == "trl" else f"r1vl:{variant}", work, left, warmup=a["warmup"],
                             total=a["warmup"] + a["repeats"], reserve=reserve)
                failed |= "error" in res
                terminated = bool(res.get("terminated"))
                if res.get("first_timed_s"):
                    firsts.append(res["first_timed_s"])
            rows += job_rows(impl, variant, res, a, meta)
            if res.get("skipped"):
                status = res["skipped"]
            elif "error" in res:
                status = "FAILED" + (f" ({res['cut_short']})" if res.get("cut_short") else "")
            else:
                status = f"done in {res.get('wall_s', 0):.0f} s" + (f", cut short: {res['cut_short']}"
                                                                     if res.get("cut_short") else "")
            print(f"bench_step: {impl} {variant}: {status}", file=sys.stderr, flush=True)
            if "error" in res:
                print(res["error"], file=sys.stderr)
            for r in rows:
                assert tuple(r) == ROW_KEYS
            _save_json(out, {"rows": rows})  # after every run: a cut run keeps its rows
            if terminated:
                break
    except _Terminated:                         # between runs: every finished run is in `out` already
        terminated = True
    if terminated:
        failed = True
        print("bench_step: terminated (SIGTERM): the rows so far are written", file=sys.stderr, flush=True)
    if not ns.keep_workdir and not ns.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench_step: wrote {out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(table(rows))
    print()
    for line in ratios(rows):
        print(line)
    if terminated:
        return 128 + signal.SIGTERM
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
