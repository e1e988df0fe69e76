"""DeepSpeed ZeRO-2/3 for the r1vl trainer: config, engine, gathers, reference model,
generation, checkpoints. Every function takes plain inputs; train.py strings them together:

    ds.check_config(cfg)                                            # preflight (--check), one process
    ds_cfg = ds.config_from_trainer(cfg, world_size=d.world)        # "auto" keys filled
    opt = torch.optim.AdamW(trainable_params, ...); sched = LambdaLR(opt, ...)
    engine = ds.initialize(PolicyWithLoss(model), ds_cfg, optimizer=opt, scheduler=sched)
    # one optimizer step over micro-batches (algo.grpo_update / sft_step):
    for i, mb in enumerate(micro_batches):
        loss, _ = engine(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="grpo", ...)
        ds.backward(engine, loss * weight, last=i == len(micro_batches) - 1)
    grad_norm = ds.step(engine)          # clip (gradient_clipping) + AdamW + scheduler + zero grads
    ds.reset_optimizer(engine, lr=..., lr_lambda=...)   # warm-up -> StepGRPO: fresh AdamW state
    ref = ds.prepare_reference(PolicyWithLoss(ds.make_reference(engine)), ds_cfg)
    with ds.gathered_for_generation(engine):            # ZeRO-3: full weights, hooks off
        completions = hf_engine.generate(...)
    vllm_engine.load_weights(ds.named_parameters(engine))   # bucketed ZeRO-3 gathers
    ds.save_checkpoint(engine, ck_dir, processor=processor, write_extra=...)   # all ranks
    ds.load_checkpoint(engine, ck_dir)                                         # all ranks

ZeRO-3 partitions every parameter: outside the forward of the module that owns it a
parameter is an empty shard. r1vl.models.FusedLMHead owns the LM-head weight (the same
Parameter as embed_tokens when tied) and runs the fused loss / log-probs inside its own
forward, so DeepSpeed gathers the weight there, in backward too. A module that reads a
weight it does not own must register it (`deepspeed.zero.register_external_parameter`).

Functions marked "collective" must be called by every rank, in the same order.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

AUTO = "auto"
MiB = 1 << 20
CHECKPOINT_TAG = "ds"  # the DeepSpeed (optimizer / scheduler / fp32 master) part of a checkpoint dir

# keys the trainer owns: filled from its config when "auto" (or absent), refused when they disagree
TRAINER_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping")
# ZeRO-3 sizes that may be "auto": filled from the model's hidden size (the Hugging Face convention)
MODEL_SIZED_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


class DeepSpeedConfigError(ValueError):
    """A user's mistake in a DeepSpeed JSON file (names the file and the key)."""


class DeepSpeedCheckpointError(ValueError):
    """A resume point without DeepSpeed state (written by a run without `deepspeed=`)."""


# --------------------------------------------------------------------------- config


def read_config(path: str | os.PathLike) -> dict:
    """The JSON object in `path` (clear errors for a missing file, bad JSON, a non-object)."""
    p = Path(path)
    if not p.is_file():
        raise DeepSpeedConfigError(f"deepspeed: config file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{p}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def fill_config(raw: dict, *, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int,
                max_grad_norm: float, dtype: str | None = None, source: str = "<deepspeed config>") -> dict:
    """A copy of `raw` with the trainer-owned keys filled and checked.

    train_micro_batch_size_per_gpu = micro_batch_size, gradient_accumulation_steps,
    train_batch_size = micro * accumulation * world_size, gradient_clipping = max_grad_norm
    (0 = none): each may be "auto" (or absent) and is then filled; an explicit value must
    equal the trainer's, else DeepSpeedConfigError names `source`, the key and both values.
    `bf16.enabled` / `fp16.enabled` may be "auto": on when `dtype` is "bfloat16" / "float16".
    An "optimizer" or "scheduler" section is refused (the trainer builds AdamW and the lr
    schedule from optim.*), and so is managed_gradient_accumulation=false (r1vl marks the
    accumulation boundary itself, see `backward`)."""
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    out = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in out:
            raise DeepSpeedConfigError(
                f"{source}: remove the '{section}' section: r1vl builds AdamW and its lr schedule from the "
                "trainer config (optim.*, warmup.*) and hands them to DeepSpeed")
    if out.get("managed_gradient_accumulation", True) is not True:
        raise DeepSpeedConfigError(
            f"{source}: managed_gradient_accumulation must be true (or absent): r1vl marks the gradient "
            "accumulation boundary of each micro-batch itself")
    want = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "train_batch_size": int(micro_batch_size) * int(gradient_accumulation_steps) * int(world_size),
        "gradient_clipping": float(max_grad_norm),
    }
    origin = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "ceil(train.prompts_per_step * rollout.num_generations / "
                                       "train.micro_batch_size)",
        "train_batch_size": f"micro batch x accumulation steps x {world_size} rank(s)",
        "gradient_clipping": "optim.max_grad_norm",
    }
    for key in TRAINER_KEYS:
        value = out.get(key, AUTO)
        if value == AUTO:
            out[key] = want[key]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DeepSpeedConfigError(f"{source}: {key}: expected a number or \"auto\", got {value!r}")
        same = math.isclose(float(value), want[key], rel_tol=1e-9, abs_tol=1e-12) if key == "gradient_clipping" \
            else (float(value) == want[key])
        if not same:
            raise DeepSpeedConfigError(
                f"{source}: {key} = {value!r} disagrees with the trainer's value {want[key]!r} (from {origin[key]}); "
                f"set it to \"auto\" or change the trainer config")
        out[key] = want[key]
    for section, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        sec = out.get(section)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise DeepSpeedConfigError(f"{source}: {section}: expected an object like {{\"enabled\": true}}, got {sec!r}")
        if sec.get("enabled") == AUTO:
            sec["enabled"] = dtype == name
        elif not isinstance(sec.get("enabled", False), bool):
            raise DeepSpeedConfigError(f"{source}: {section}.enabled: expected true, false or \"auto\", "
                                       f"got {sec.get('enabled')!r}")
    if _enabled(out, "bf16") and _enabled(out, "fp16"):
        raise DeepSpeedConfigError(f"{source}: bf16.enabled and fp16.enabled are both true; choose one")
    zero = out.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"{source}: zero_optimization: expected an object, got {zero!r}")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    if stage == 0 and (_enabled(out, "bf16") or _enabled(out, "fp16")):
        # DeepSpeed's stage-0 16-bit wrapper takes one optimizer step with zero gradients when it
        # is built: AdamW's count starts at 1 (the first update ~0.74x its size) and weight decay
        # acts once before training
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage 0 with bf16/fp16 is not supported (DeepSpeed's "
                                   "stage-0 16-bit optimizer wrapper steps the optimizer once when built); use stage "
                                   "1, 2 or 3, or no deepspeed= (plain DDP)")
    for key in MODEL_SIZED_KEYS:
        if zero.get(key) == AUTO and stage != 3:
            del zero[key]  # only stage 3 reads them
    left = [k for k in _auto_keys(out) if k not in {f"zero_optimization.{m}" for m in MODEL_SIZED_KEYS}]
    if left:
        raise DeepSpeedConfigError(f"{source}: \"auto\" is not supported for {', '.join(left)} "
                                   f"(r1vl fills only {', '.join(TRAINER_KEYS)}, bf16/fp16.enabled and "
                                   f"zero_optimization.{{{', '.join(MODEL_SIZED_KEYS)}}})")
    return out


def load_config(path: str | os.PathLike, *, micro_batch_size: int, gradient_accumulation_steps: int,
                world_size: int, max_grad_norm: float, dtype: str | None = None) -> dict:
    """read_config(path) + fill_config(...) (errors name `path`)."""
    return fill_config(read_config(path), micro_batch_size=micro_batch_size,
                       gradient_accumulation_steps=gradient_accumulation_steps, world_size=world_size,
                       max_grad_norm=max_grad_norm, dtype=dtype, source=str(path))


def trainer_batch_values(cfg, world_size: int) -> dict:
    """The trainer-owned values for an r1vl.config.Config: one StepGRPO optimizer step per
    rank covers prompts_per_step x num_generations sequences in micro-batches of
    train.micro_batch_size."""
    micro = int(cfg.train.micro_batch_size)
    per_step = int(cfg.train.prompts_per_step) * int(cfg.rollout.num_generations)
    return dict(micro_batch_size=micro, gradient_accumulation_steps=max(1, math.ceil(per_step / micro)),
                world_size=int(world_size), max_grad_norm=float(cfg.optim.max_grad_norm), dtype=cfg.model.dtype)


def config_from_trainer(cfg, world_size: int) -> dict:
    """The DeepSpeed config named by `cfg.deepspeed` (an r1vl.config.Config), filled."""
    if not cfg.deepspeed:
        raise DeepSpeedConfigError("deepspeed: no DeepSpeed config file given")
    out = load_config(cfg.deepspeed, **trainer_batch_values(cfg, world_size))
    _check_trainer_options(cfg, out)
    return out


def _check_trainer_options(cfg, ds_config: dict) -> None:
    if getattr(cfg.model, "ref_on_host", False) and zero_stage(ds_config) == 3:
        raise DeepSpeedConfigError(
            f"{cfg.deepspeed}: model.ref_on_host is not for ZeRO-3, which partitions the reference model "
            "across ranks instead; use it with ZeRO-0/1/2 or without DeepSpeed")


def check_config(cfg) -> dict:
    """Preflight (one process, before torchrun starts the ranks): the file named by
    `cfg.deepspeed` is valid and agrees with the trainer for some world size. An explicit
    train_batch_size fixes the world size (it must be a multiple of micro batch x
    accumulation); the ranks check it again against their real world size. Returns the
    config filled for that world size (1 when train_batch_size is "auto")."""
    raw = read_config(cfg.deepspeed)
    _check_trainer_options(cfg, raw)
    vals = trainer_batch_values(cfg, 1)
    tbs = raw.get("train_batch_size", AUTO)
    per_rank = vals["micro_batch_size"] * vals["gradient_accumulation_steps"]
    if tbs != AUTO and isinstance(tbs, int) and not isinstance(tbs, bool):
        if tbs <= 0 or tbs % per_rank:
            raise DeepSpeedConfigError(
                f"{cfg.deepspeed}: train_batch_size = {tbs} is not a multiple of micro batch x accumulation steps "
                f"= {per_rank} (from train.micro_batch_size, train.prompts_per_step, rollout.num_generations); "
                "set it to \"auto\"")
        vals["world_size"] = tbs // per_rank
    filled = fill_config(raw, source=str(cfg.deepspeed), **vals)
    _check_precision(cfg, filled)
    return filled


_PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}  # a config's 16-bit precision: the model.dtype it trains in


def _check_precision(cfg, ds_config: dict) -> None:
    """model.dtype against the precision the DeepSpeed config trains in, when the run trains:
    float16 weights under a config with neither bf16 nor fp16 (AdamW on the float16 weights
    themselves) are refused as without DeepSpeed; a 16-bit model.dtype the config overrides
    (DeepSpeed casts the module to its own precision) is said."""
    from r1vl.config import FLOAT16_ADAMW

    if not (cfg.warmup.steps > 0 or cfg.train.max_steps > 0) or cfg.model.dtype == "float32":
        return
    prec = precision(ds_config)
    if prec == "fp32" and cfg.model.dtype == "float16":
        raise DeepSpeedConfigError(f"{cfg.deepspeed}: model.dtype=float16 with neither bf16 nor fp16 enabled there "
                                   "(no fp32 master weights): " + FLOAT16_ADAMW)
    if _PRECISION_DTYPE.get(prec) != cfg.model.dtype and os.environ.get("RANK", "0") == "0":
        if prec == "fp32":
            log.warning("model.dtype=bfloat16 with %s, which enables neither bf16 nor fp16: AdamW updates the bf16 "
                        "weights themselves (no fp32 master copy), and most steps of about lr round away; set its "
                        "bf16.enabled to true or \"auto\"", cfg.deepspeed)
        else:
            log.warning("model.dtype=%s with %s, which enables %s: the model computes and trains in %s (DeepSpeed "
                        "casts it), not %s; to follow model.dtype, set both \"bf16\" and \"fp16\" there to "
                        "{\"enabled\": \"auto\"}", cfg.model.dtype, cfg.deepspeed, prec,
                        _PRECISION_DTYPE[prec], cfg.model.dtype)


def zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def precision(ds_config: dict) -> str:
    """"bf16", "fp16" or "fp32": the precision a filled DeepSpeed config trains in."""
    return "bf16" if _enabled(ds_config, "bf16") else "fp16" if _enabled(ds_config, "fp16") else "fp32"


def engine_precision(engine) -> str:
    """"bf16", "fp16" or "fp32": the precision a DeepSpeedEngine trains in."""
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def _trainer_config(cfg) -> dict | None:
    """The run's DeepSpeed config filled with its batch values, or None (no deepspeed=, or a
    config that does not read: its error comes where the engine is built)."""
    if not cfg.deepspeed:
        return None
    try:
        return fill_config(read_config(cfg.deepspeed), **trainer_batch_values(cfg, 1))
    except (DeepSpeedConfigError, OSError, ValueError):
        return None


def compute_dtype(cfg) -> str:
    """The dtype the policy computes in: model.dtype, or bfloat16 / float16 when the DeepSpeed
    config enables one (the engine casts the module whatever model.dtype says). A config that
    does not read is model.dtype here."""
    raw = _trainer_config(cfg)
    if raw is None:
        return cfg.model.dtype
    return _PRECISION_DTYPE.get(precision(raw), cfg.model.dtype)


def loss_scaled(cfg) -> bool:
    """Whether the run's DeepSpeed config trains in fp16, under its loss scaler: an overflow
    step (a non-finite gradient) is routine there, skipped, and the scale lowered."""
    raw = _trainer_config(cfg)
    return raw is not None and precision(raw) == "fp16"


def _enabled(ds_config: dict, section: str) -> bool:
    sec = ds_config.get(section)
    return isinstance(sec, dict) and sec.get("enabled") is True


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _auto_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def _hidden_size(model: nn.Module) -> int | None:
    from r1vl.models import unwrap

    config = getattr(unwrap(model), "config", None)
    for c in (getattr(config, "text_config", None), config):
        h = getattr(c, "hidden_size", None)
        if isinstance(h, int):
            return h
    return None


def fill_model_sizes(ds_config: dict, model: nn.Module) -> dict:
    """ZeRO-3 sizes left "auto": reduce_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
    stage3_param_persistence_threshold = 10 h (h = the language model's hidden size)."""
    out = copy.deepcopy(ds_config)
    zero = out.get("zero_optimization") or {}
    autos = [k for k in MODEL_SIZED_KEYS if zero.get(k) == AUTO]
    if autos:
        h = _hidden_size(model)
        if h is None:
            raise DeepSpeedConfigError(f"zero_optimization.{autos[0]} = \"auto\" needs the model's hidden_size, "
                                       "which its config does not have; give a number")
        sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                 "stage3_param_persistence_threshold": 10 * h}
        for k in autos:
            zero[k] = sizes[k]
    return out


# --------------------------------------------------------------------------- runtime


def _repo_build_dir() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root / "build" if (root / "setup.py").is_file() else None


def prepare_runtime() -> None:
    """Before DeepSpeed builds anything: JIT-built ops go to <repo>/build/torch_extensions
    (cached across runs) unless TORCH_EXTENSIONS_DIR is set. On a CPU-only machine the
    collectives run on the gloo process group; DeepSpeed's optional shared-memory
    all-reduce op (a minutes-long C++ JIT build on first use, no gain for the tiny CPU
    runs) is switched off unless R1VL_DS_CPU_SHM=1. Also on CPU: DeepSpeed's Muon optimizer
    module (imported by every engine to test `isinstance(opt, MuonWithAuxAdam)`; r1vl never
    uses Muon) is imported with its torch.compile decorators off: compiling them costs each
    rank about 7 s of CPU at start-up. torch's deprecation warnings for the collectives that
    DeepSpeed calls (one per call) are silenced."""
    import warnings

    build = _repo_build_dir()
    if build is not None and "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(build / "torch_extensions")
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    if cpu and os.environ.get("R1VL_DS_CPU_SHM", "0") != "1":
        import deepspeed.ops

        ops = deepspeed.ops.__compatible_ops__  # probed once per process; DeepSpeed reads this dict
        ops["deepspeed_shm_comm"] = False
    if cpu:
        _import_muon_uncompiled()
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    ds_logger = logging.getLogger("DeepSpeed")
    if not log.isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)


def _import_muon_uncompiled() -> None:
    import sys

    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:  # another DeepSpeed layout: leave it alone
        return
    real = getattr(compiler, "compile", None)
    if real is None or not hasattr(compiler, "dummy_decorator"):
        return
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        for mod in ("muon_optimizer", "original_muon"):
            importlib.import_module(f"deepspeed.runtime.zero.muon.{mod}")
    except ImportError:
        pass
    finally:
        compiler.compile = real


# the variables _ensure_process_group added to os.environ (forget_process_group_env removes them)
_ENV_ADDED: list[str] = []


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one process (torchrun sets the env vars)."""
    if dist.is_available() and dist.is_initialized():
        return
    import socket

    def add(key: str, value: str) -> None:
        if key not in os.environ:
            os.environ[key] = value
            _ENV_ADDED.append(key)

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            add("MASTER_PORT", str(s.getsockname()[1]))
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        add(key, value)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def forget_process_group_env() -> None:
    """Remove the variables _ensure_process_group set, once its group is destroyed: a process
    that ran the trainer in-process (a notebook, a test) is left without a launcher's environment,
    which another library would take for one (accelerate, as TRL's trainer builds it, starts a
    process group of its own then)."""
    while _ENV_ADDED:
        os.environ.pop(_ENV_ADDED.pop(), None)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_engine(obj: Any) -> bool:
    """True for a DeepSpeedEngine (without importing deepspeed when it is not loaded)."""
    return any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed") for c in type(obj).__mro__)


def is_zero3(model: Any) -> bool:
    """True when `model` (engine or module) has ZeRO-3 partitioned parameters."""
    if is_engine(model):
        return bool(model.zero_optimization_partition_weights())
    return any(hasattr(p, "ds_id") for p in model.parameters())


def initialize(model: nn.Module, ds_config: dict, *, optimizer: torch.optim.Optimizer,
               scheduler: Any = None):
    """A DeepSpeedEngine over `model` (an r1vl.models.PolicyWithLoss) with the trainer's
    torch optimizer (built over the model's trainable parameters) and lr scheduler (an
    instance over that optimizer; the engine steps it in `step`). The engine moves the
    model to the accelerator and casts it to bf16/fp16 when the config enables one; under
    ZeRO-3 it partitions every parameter. Collective."""
    prepare_runtime()
    _ensure_process_group()
    import deepspeed

    cfg = fill_model_sizes(ds_config, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    log.info("DeepSpeed ZeRO-%d engine on %d rank(s): micro batch %d, accumulation %d, clipping %s, %s",
             engine.zero_optimization_stage(), engine.world_size, engine.train_micro_batch_size_per_gpu(),
             engine.gradient_accumulation_steps(), engine.gradient_clipping(), engine_precision(engine))
    return engine


# --------------------------------------------------------------------------- one optimizer step


def backward(engine, loss: torch.Tensor, *, last: bool) -> None:
    """Backward of one micro-batch's (already weighted) loss. `last` marks the final
    micro-batch before `step`: DeepSpeed completes the gradient reduction there. The loss
    is not divided by gradient_accumulation_steps (r1vl weights micro-batch losses so that
    their sum is the loss of the whole batch)."""
    engine.set_gradient_accumulation_boundary(bool(last))
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> float:
    """Clip (gradient_clipping), optimizer step, scheduler step, zero the gradients.
    Returns the global gradient norm before clipping. Collective."""
    engine.set_gradient_accumulation_boundary(True)
    before = None
    if engine.zero_optimization_stage() == 0:
        # stage 0 in fp32 clips without recording the norm (get_global_grad_norm() is None):
        # the gradients are all-reduced by now, so their norm is the global one
        grads = [q.grad.detach().float().norm() for q in engine.module.parameters() if q.grad is not None]
        before = float(torch.stack(grads).norm()) if grads else 0.0
    engine.step()
    norm = engine.get_global_grad_norm()
    if norm is None:
        return before if before is not None else 0.0
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def skipped_steps(engine) -> int:
    """How many optimizer steps the engine has skipped (its overflow check found a non-finite
    gradient: fp16's loss scaler, and ZeRO's check where its config enables it)."""
    return int(getattr(engine, "skipped_steps", 0) or 0)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer the engine was given (ZeRO steps it on its fp32 partitions)."""
    opt = getattr(engine, "basic_optimizer", None)
    if opt is None:
        opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return opt


def reset_optimizer(engine, *, lr: float, lr_lambda: Callable[[int], float] | None = None) -> None:
    """Start a new optimisation phase on the same engine (warm-up -> StepGRPO): AdamW's
    moments and step counts are dropped (re-created at the next step), every group's lr
    becomes `lr`, and the engine's scheduler becomes LambdaLR(lr_lambda) (None: constant).
    The weights (and ZeRO's fp32 master copy) are kept."""
    opt = base_optimizer(engine)
    opt.state.clear()
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):  # ZeRO-1/2 links states lazily
        engine.optimizer._hp_optimizer_states_linked = False
    for group in opt.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr
    engine.lr_scheduler = (torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None)


def current_lr(engine) -> float:
    return float(base_optimizer(engine).param_groups[0]["lr"])


# --------------------------------------------------------------------------- gathers


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], *, modifier_rank: int | None = None):
    """Full tensors of `params` inside the block. Under ZeRO-3 a collective gather
    (every rank enters together; with `modifier_rank` set, that rank's in-place edits are
    kept and re-partitioned on exit); for ordinary parameters a no-op."""
    zp = [p for p in params if hasattr(p, "ds_id")]
    if not zp:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zp, modifier_rank=modifier_rank):
        yield


def named_parameters(model: nn.Module, *, bucket_bytes: int = 512 * MiB) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF-named parameters of the policy inside `model` (engine, PolicyWithLoss or HF
    model; tied weights once, under their first name), for weight sync.

    ZeRO-3: parameters are gathered a bucket of at most `bucket_bytes` at a time (one
    collective per bucket; a larger parameter is a bucket alone), copied out and released,
    so at most one gathered bucket plus its copies exist at once. Every rank must consume
    the whole iterator together. Otherwise: the parameters themselves, detached, no copy."""
    from r1vl.models import unwrap

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    items = list(unwrap(model).named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in items):
        for name, p in items:
            yield name, p.detach()
        return
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, p in items:
        nbytes = int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield from _gather_copy(bucket)
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield from _gather_copy(bucket)


def _gather_copy(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    with gathered([p for _, p in bucket]):
        return [(name, p.data.detach().clone()) for name, p in bucket]


def _zero3_hook_owner(engine):
    """The object that owns ZeRO-3's per-module fetch/release hooks (training: the stage-3
    optimizer's parameter_offload; an engine without optimizer: the DeepSpeedZeRoOffload)."""
    opt = engine.optimizer
    return getattr(opt, "parameter_offload", opt)


@contextlib.contextmanager
def gathered_for_generation(engine, *, enabled: bool = True):
    """ZeRO-3: every parameter gathered on every rank and DeepSpeed's per-module hooks
    taken off for the block, so HF `generate` runs at full speed and each rank alone
    (no synced_gpus, ranks may call generate a different number of times inside). The
    hooks come back and the weights are re-partitioned on exit. Entering and leaving are
    collective. Needs memory for the full model on each device (2B/7B fit an H100).
    Not ZeRO-3 (or enabled=False): a no-op; without gathering, pass
    `generation_kwargs(engine)` (synced_gpus) to generate instead."""
    if not enabled or not is_engine(engine) or not is_zero3(engine):
        yield
        return
    import deepspeed

    owner = _zero3_hook_owner(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        _remove_zero3_hooks(owner)
        try:
            yield
        finally:
            owner._register_deepspeed_module(owner.module)


def _remove_zero3_hooks(owner) -> None:
    for p in owner.module.parameters():
        if hasattr(p, "ds_active_sub_modules"):
            p.ds_active_sub_modules.clear()
    for hook in owner.forward_hooks:
        hook.remove()
    for hook in owner.backward_hooks:
        hook.remove()
    owner.forward_hooks = []
    owner.backward_hooks = []


def generation_kwargs(model: Any) -> dict:
    """Extra HF `generate` kwargs for a model that is NOT inside `gathered_for_generation`:
    synced_gpus=True under ZeRO-3 with more than one rank (every rank then keeps running
    forward passes until all are done; each rank must call generate equally often)."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return {"synced_gpus": bool(multi and is_zero3(model))}


# --------------------------------------------------------------------------- reference model


def make_reference(model: nn.Module) -> nn.Module:
    """A frozen full copy (eval, no grad) of the HF policy inside `model` (engine,
    PolicyWithLoss or HF model), for the KL term. Under ZeRO-3 the copy is built on the
    meta device, allocated in the policy's parameter dtypes and filled from bucketed
    gathers (collective): no random initialisation, no fp32 detour; buffers (rotary
    tables) are copied as they are (fp32)."""
    from r1vl.models import make_reference as plain_reference
    from r1vl.models import unwrap

    hf = unwrap(model)
    if not is_zero3(hf):
        return plain_reference(hf)
    dtypes = {name: p.dtype for name, p in hf.named_parameters()}
    with torch.device("meta"):
        ref = type(hf)(copy.deepcopy(hf.config))
    tied = bool(getattr(ref.config, "tie_word_embeddings", False) or getattr(
        getattr(ref.config, "text_config", None), "tie_word_embeddings", False))
    for name, p in ref.named_parameters():  # on meta: free; parameters get the policy's dtype,
        if name in dtypes:                   # buffers (rotary tables) keep theirs
            p.data = p.data.to(dtypes[name])
    device = next((b.device for b in hf.buffers()), None) or _accelerator_device()
    ref.to_empty(device=device)
    if tied:
        ref.tie_weights()
    dst = dict(ref.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, t in named_parameters(hf, bucket_bytes=256 * MiB):
            if name not in dst:
                raise KeyError(f"make_reference: the rebuilt model has no parameter {name!r}")
            dst[name].copy_(t)
            seen.add(name)
        missing = set(dst) - seen
        if missing:
            raise KeyError(f"make_reference: parameters not filled: {sorted(missing)[:5]}")
        bufs = dict(ref.named_buffers())
        for name, b in hf.named_buffers():
            bufs[name].copy_(b)
    if hasattr(hf, "generation_config"):
        ref.generation_config = copy.deepcopy(hf.generation_config)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def _accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def reference_config(ds_config: dict) -> dict:
    """The config of the reference model's inference engine (ZeRO-3, no optimizer)."""
    out = {k: copy.deepcopy(v) for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    out["gradient_clipping"] = 0.0
    return out


def prepare_reference(ref: nn.Module, ds_config: dict):
    """The reference policy (a frozen r1vl.models.PolicyWithLoss) for this DeepSpeed run.

    ZeRO-3: a DeepSpeed inference engine (no optimizer) partitions it like the policy;
    its forward (r1vl.algo.compute_logprobs calls `.module`, i.e. PolicyWithLoss) gathers
    each module's weights, the head's included, inside the module forward. Collective.
    ZeRO-0/1/2: the module itself, on the accelerator, in the engine's bf16/fp16."""
    ref.eval()
    ref.requires_grad_(False)
    if zero_stage(ds_config) == 3:
        prepare_runtime()
        _ensure_process_group()
        import deepspeed

        cfg = fill_model_sizes(reference_config(ds_config), ref)
        engine, _, _, _ = deepspeed.initialize(model=ref, config=cfg)
        engine.eval()
        return engine
    dtype = torch.bfloat16 if _enabled(ds_config, "bf16") else torch.float16 if _enabled(ds_config, "fp16") else None
    ref.to(_accelerator_device())
    if dtype is not None:  # parameters only, as DeepSpeed does: buffers (rotary tables) stay fp32
        for p in ref.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return ref


# --------------------------------------------------------------------------- checkpoints


def _hf_prefix(engine) -> str:
    """Prefix of the HF model's keys inside the engine's module state dict ("model.")."""
    from r1vl.models import unwrap

    hf = unwrap(engine)
    for name, mod in engine.module.named_modules():
        if mod is hf:
            return f"{name}." if name else ""
    raise ValueError("the engine's module does not contain the HF model")


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The HF-named 16-bit state dict of the policy, on CPU, on rank 0 (None elsewhere).
    ZeRO-3: consolidated layer by layer (collective). Otherwise: the module's own tensors."""
    from r1vl.models import unwrap

    if is_zero3(engine):
        sd = engine._zero3_consolidated_16bit_state_dict()
        if sd is None:
            return None
        prefix = _hf_prefix(engine)
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if _rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in unwrap(engine).state_dict().items()}


def _write_pretrained(engine, processor, out_dir: Path, state_dict: dict | None) -> None:
    """Rank 0: HF layout (safetensors + config + processor); the fused head is saved as the
    standard nn.Linear lm_head; `state_dict` (ZeRO-3) replaces the partitioned weights."""
    from r1vl.models import FusedLMHead, unwrap

    hf = unwrap(engine)
    head = getattr(hf, "lm_head", None)
    if isinstance(head, FusedLMHead):
        hf.lm_head = head.as_linear()
    try:
        hf.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    finally:
        if head is not None:
            hf.lm_head = head
    if processor is not None:
        processor.save_pretrained(out_dir)


def _collective_dir_write(final: Path, write_all: Callable[[Path], None]) -> None:
    """Every rank: write_all(tmp) into one shared temporary directory, then rank 0 renames
    it onto `final` (an interrupted save leaves the previous `final` intact)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-ds"
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    from r1vl.files import saying_disk_full

    # a full disk said so (torch.save's own error names neither); the next start removes the
    # temporary (other ranks may still write in it)
    with saying_disk_full(final):
        write_all(tmp)
    _barrier()
    if _rank() == 0:
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-ds"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_pretrained(engine, processor, out_dir: str | os.PathLike) -> None:
    """A 16-bit HF checkpoint of the policy (loads with AutoModelForImageTextToText and the
    processor's Auto classes) written atomically to `out_dir` by rank 0. Collective."""
    def write(tmp: Path) -> None:
        sd = full_state_dict(engine)
        if _rank() == 0:
            _write_pretrained(engine, processor, tmp, sd if is_zero3(engine) else None)

    _collective_dir_write(Path(out_dir), write)


def save_checkpoint(engine, directory: str | os.PathLike, *, processor=None, client_state: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """A resume point in `directory`: DeepSpeed's own checkpoint under `directory/ds/`
    (bf16 module, fp32 master weights and optimizer state per rank, lr scheduler,
    `client_state`), the 16-bit HF model + processor at the top (when `processor` is
    given), and whatever rank 0's `write_extra(tmp_dir)` adds (e.g. trainer_state.pt).
    `client_state` must be the same on every rank (DeepSpeed keeps rank 0's under ZeRO-0/1/2);
    per-rank data (RNG states) belongs in `write_extra`, gathered first.
    Written to a temporary sibling and renamed when complete. Collective."""
    def write(tmp: Path) -> None:
        engine.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, client_state={"r1vl": dict(client_state or {})},
                               save_latest=False)
        if processor is not None:
            sd = full_state_dict(engine)
            if _rank() == 0:
                _write_pretrained(engine, processor, tmp, sd if is_zero3(engine) else None)
        if write_extra is not None and _rank() == 0:
            write_extra(tmp)

    directory = Path(directory)
    _collective_dir_write(directory, write)
    return directory


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CHECKPOINT_TAG).is_dir()


def universal_load_config(config: dict) -> dict:
    """`config` (an engine's) that loads DeepSpeed's universal checkpoints (`universal_checkpoint`)."""
    return {**config, "checkpoint": {**dict(config.get("checkpoint") or {}), "load_universal": True}}


def _universal_workers() -> tuple[int, int]:
    """ds_to_universal's extract / merge process counts: half the cores (at most 8) / a quarter
    (at most 4; merging holds a whole parameter and its moments in each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2)), max(1, min(4, cores // 4))


# ds_to_universal, ended by the kernel when the process that started it dies (a killed rank 0 left it
# converting beside the restarted run); its first argument is that process's pid
_CONVERTER = """
import runpy, sys
from r1vl.launch import die_with_parent
die_with_parent(int(sys.argv.pop(1)))
sys.argv[0] = "ds_to_universal"
runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
"""


def _convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's ds_to_universal from src/ds/ to dst/ds/, in a subprocess (it runs process
    pools) whose output goes to this process's stderr as it comes (its progress bars). Raises
    DeepSpeedCheckpointError with the end of that output when it fails."""
    import subprocess
    import sys

    files = [f for f in (src / CHECKPOINT_TAG).iterdir() if f.is_file()]
    optim = sum(f.stat().st_size for f in files if f.name.endswith("optim_states.pt"))  # fp32 masters + moments
    # at its peak the converter holds every fragment (its tmp/) beside the merged form, plus the model states
    need = 2 * optim + sum(f.stat().st_size for f in files if f.name.endswith("model_states.pt"))
    free = shutil.disk_usage(dst.parent).free
    if need * 1.05 > free:
        raise DeepSpeedCheckpointError(
            f"{src}: converting its DeepSpeed state to another number of ranks needs about {need / 2**30:.1f} GiB "
            f"in {dst.parent}, which has {free / 2**30:.1f} GiB free")
    extract, merge = _universal_workers()
    args = ["--input_folder", str(src / CHECKPOINT_TAG), "--output_folder", str(dst / CHECKPOINT_TAG),
            "--inject_missing_state", "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    shown = " ".join([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", *args])  # to run by hand
    # (-W: runpy's warning that the package imported the module before it ran as __main__)
    cmd = [sys.executable, "-W", "ignore::RuntimeWarning", "-c", _CONVERTER, str(os.getpid()), *args]
    tail = b""
    err = getattr(sys.stderr, "buffer", None)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            tail = (tail + chunk)[-4000:]
            if err is not None:
                err.write(chunk)
                err.flush()
    if proc.returncode != 0:
        text = tail.decode(errors="replace").strip().splitlines()
        raise DeepSpeedCheckpointError(
            f"{src}: DeepSpeed's ds_to_universal could not convert its state to another number of ranks (exit "
            f"{proc.returncode}): {' | '.join(text[-3:])} (run: {shown})")


@contextlib.contextmanager
def universal_checkpoint(directory: str | os.PathLike, work_dir: str | os.PathLike) -> Iterator[Path]:
    """`directory`'s DeepSpeed state (save_checkpoint's ds/, written by some number of ranks) in
    DeepSpeed's universal form, which an engine of any number of ranks loads when built with
    `universal_load_config`: yields a directory holding it as ds/, for load_checkpoint. Rank 0
    converts (ds_to_universal) into work_dir/.tmp-universal-<name>-<pid> (the fp32 masters
    and moments, twice over at the converter's peak; a start's clean_interrupted_saves removes
    one a killed run left) and removes it on the way out. Collective: a failure raises on every rank."""
    directory, work_dir = Path(directory), Path(work_dir)
    tmp, problem = None, None
    if _rank() == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = work_dir / f".tmp-universal-{directory.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if not has_checkpoint(directory):
                raise DeepSpeedCheckpointError(f"{directory}: no DeepSpeed state (no '{CHECKPOINT_TAG}/' folder)")
            log.info("%s: converting its DeepSpeed state (written by another number of ranks) to DeepSpeed's "
                     "universal form in %s", directory, tmp)
            _convert_to_universal(directory, tmp)
        except DeepSpeedCheckpointError as e:
            problem = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [(problem, tmp)]
        dist.broadcast_object_list(box, src=0)
        problem, tmp = box[0]
    try:
        if problem is not None:
            raise DeepSpeedCheckpointError(problem)
        yield tmp
    finally:
        _barrier()  # every rank has read it
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(engine, directory: str | os.PathLike, *, load_optimizer_states: bool = True) -> dict:
    """Restore what `save_checkpoint` wrote under `directory/ds/` into `engine` (module
    weights, fp32 masters, optimizer and scheduler state; the engine must have been
    built with the same ZeRO stage, world size and parameter set, or, for another world size,
    from `universal_checkpoint`'s directory with `universal_load_config`). Returns the
    client_state. Collective."""
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise DeepSpeedCheckpointError(
            f"{directory}: no DeepSpeed state (no '{CHECKPOINT_TAG}/' folder): the checkpoint was written by a run "
            "without deepspeed=...; resume it with the same setting")
    path, client = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                          load_optimizer_states=load_optimizer_states,
                                          load_lr_scheduler_states=load_optimizer_states)
    if path is None:
        raise DeepSpeedCheckpointError(f"{directory}: DeepSpeed could not load its checkpoint")
    return dict((client or {}).get("r1vl") or {})
