"""One dataclass tree for the whole run; YAML files in configs/ plus dotted CLI overrides.

    cfg = load_config("configs/qwen2vl_2b.yaml", ["train.max_steps=10", "seed=3"])

The defaults of the dataclasses below ARE the embedded default run (tiny model,
built-in synthetic task, CPU-friendly sizes); configs/default.yaml spells the same
values out (a test keeps the two equal). A YAML file or an override may only name
keys that exist here; values are checked against the field's type (and, where a
field lists them, its allowed choices or its lower and upper bounds), and a mistake
is one `ConfigError` naming the key, the expected type or range and what was given.
No float field takes inf or nan. `validate` adds the cross-field checks (and warns,
through logging, of settings that run but are likely mistakes).

A YAML file (UTF-8) is read as YAML, with three exceptions: a key may not be given twice,
an int written with a leading zero (`010`, which YAML 1.1 reads as octal 8) or a number
with colons (`1:30`, `1:30.0`, base 60: 90) is refused, and a section (`model:`, `train:`, ...) must be a mapping:
left out or null it keeps its defaults, any other value (`model: false`) is an error.

An override's value is read by the type of its field, not as YAML:
  str      the text verbatim (`output_dir=runs/exp #3`, `logging.wandb_run_name=2024-06-01`,
           `output_dir=` is ''), unless wholly in YAML quotes ('...' or "..."), which are removed;
  int      decimal digits only (`_` allowed between them); a leading zero (`seed=010`) is
           refused, never read as octal;
  float    Python's float() syntax (3e-4, .5, 1);
  bool     true/false, yes/no, on/off (any case);
  null     null, none or ~ (any case), for the fields that may be null;
  bool or str (train.resume): the bool words, a number is refused, anything else is a path.
A section cannot be overridden as a whole (`model=` is an error): override its keys.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user's mistake in a config file or override (names the key)."""


def _choices(*values: str) -> dict:
    return {"choices": values}


def _min(bound: float, *, strict: bool = False) -> dict:
    return {"min": bound, "strict": strict}


def _max(bound: float, *, strict: bool = False) -> dict:
    """Upper bound; combine with a lower one as `_min(0.0) | _max(1.0, strict=True)`."""
    return {"max": bound, "max_strict": strict}


@dataclass
class TinyModelConfig:
    """Architecture and sizes of the randomly initialised model used when model.path == "tiny"."""

    # qwen2_vl, or qwen2_5_vl: Qwen2.5-VL's vision tower (SwiGLU, RMSNorm, window attention)
    arch: str = field(default="qwen2_vl", metadata=_choices("qwen2_vl", "qwen2_5_vl"))
    vocab_size: int = field(default=1024, metadata=_min(300))  # byte-level BPE incl. 256 bytes
    hidden_size: int = field(default=128, metadata=_min(32))
    intermediate_size: int = field(default=384, metadata=_min(1))
    num_hidden_layers: int = field(default=3, metadata=_min(1))
    num_attention_heads: int = field(default=4, metadata=_min(1))
    num_key_value_heads: int = field(default=2, metadata=_min(1))
    # vision tower (patch 14, 2x2 merge as in Qwen2-VL)
    vision_depth: int = field(default=2, metadata=_min(1))
    vision_embed_dim: int = field(default=64, metadata=_min(32))
    vision_num_heads: int = field(default=2, metadata=_min(1))
    vision_mlp_ratio: int = field(default=2, metadata=_min(1))
    tokenizer_corpus_size: int = field(default=2000, metadata=_min(1))  # training samples for BPE
    max_token_length: int = field(default=12, metadata=_min(0))  # BPE merges across words, <= N bytes; 0 = word-level


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" or a local HF checkpoint dir (or a hub id when the hub is reachable)
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    attn_implementation: str = field(
        default="sdpa", metadata=_choices("auto", "eager", "sdpa", "flash_attention_2")
    )
    gradient_checkpointing: bool = False
    liger: bool = True  # Liger's RMSNorm/SwiGLU/LayerNorm/RoPE kernels on CUDA (skipped on CPU)
    freeze_vision: bool = False
    # run the vision tower once per distinct image of a forward, not once per completion (exact)
    dedup_images: bool = True
    # a group's prompt runs once per forward (log-probs, update), its KV cache shared by its rows
    share_prompts: bool = True
    # the reference model's weights in host memory, copied to the GPU for the reference
    # log-prob pass only (one model's weights less on the GPU during rollout and update, one
    # host->GPU copy per step); not with ZeRO-3, which partitions the reference instead
    ref_on_host: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    # "synthetic" = the built-in task (generated into synthetic_dir), else a path the loader reads
    train: str = "synthetic"
    test: str = "synthetic"  # set it beside a data.train file: refused as the default there
    synthetic_dir: str = ""  # "" = <output_dir>/data
    synthetic_train_size: int = field(default=3000, metadata=_min(1))
    synthetic_test_size: int = field(default=400, metadata=_min(1))
    # the first N held-out rows are evaluated (file order, not a sample: shuffle a sorted file); 0 = all
    eval_size: int = field(default=400, metadata=_min(0))
    min_pixels: int = field(default=56 * 56, metadata=_min(1))
    max_pixels: int = field(default=112 * 112, metadata=_min(1))
    max_prompt_length: int = field(default=512, metadata=_min(1))  # tokens, image tokens included; never cut
    skip_bad_rows: bool = False  # leave out (and count) bad rows and training prompts over max_prompt_length
    # decode every training image and every evaluated held-out one at start-up (the ranks share
    # them): a truncated or corrupt file, whose header reads, then stops the run there (or is left
    # out, with skip_bad_rows) instead of when it is first sampled; false: headers only
    verify_images: bool = True
    # the user text of training prompts (warm-up and StepGRPO): "r1vl" = the authors' evaluation
    # instruction around the problem (kept as is when the problem already has it); "verbatim" =
    # the problem alone, as the authors' RL code sends it. Held-out evaluation always uses "r1vl"
    prompt_template: str = field(default="r1vl", metadata=_choices("r1vl", "verbatim"))


@dataclass
class WarmupConfig:
    """Supervised warm-up on the reference solutions (next-token cross-entropy). Its AdamW takes
    optim.beta1, beta2, eps, weight_decay and max_grad_norm; its lr and schedule are these."""

    steps: int = field(default=400, metadata=_min(0))
    batch_size: int = field(default=4, metadata=_min(1))  # per rank
    lr: float = field(default=5e-4, metadata=_min(0.0, strict=True))
    warmup_steps: int = field(default=10, metadata=_min(0))  # linear lr warm-up, then cosine to 10%
    # a reference solution's tokens learned, then the end of turn; a longer one is cut, with none
    max_length: int = field(default=1024, metadata=_min(1))


@dataclass
class VLLMConfig:
    """The colocated vLLM engine (rollout.engine=vllm). Field names are those of
    r1vl.rollout.vllm_engine.VLLMEngineConfig; model dir, dtype, seed, max_model_len
    (longest_sequence: data.max_prompt_length + the tokens of a data.max_pixels image +
    rollout.max_completion_length), pixel bounds, stop and suppressed ids come from the rest
    of the config. None (0 for kv_cache_memory_bytes) = the engine's default."""

    tensor_parallel_size: int = field(default=1, metadata=_min(1))
    # weights + KV (CUDA)
    gpu_memory_utilization: float = field(default=0.3, metadata=_min(0.0, strict=True) | _max(1.0))
    kv_cache_memory_bytes: int = field(default=0, metadata=_min(0))  # 0: from gpu_memory_utilization; CPU: 256 MiB
    max_model_len: Optional[int] = None  # None: data.max_prompt_length + image tokens + max_completion_length
    max_num_seqs: int = field(default=256, metadata=_min(1))
    # None: vLLM's default on CUDA; on CPU max_num_seqs x max_model_len (a split prefill of a seeded
    # request fails there)
    max_num_batched_tokens: Optional[int] = field(default=None, metadata=_min(1))
    enforce_eager: bool = False  # forced on CPU
    enable_sleep_mode: Optional[bool] = None  # None: on CUDA only
    sleep_level: int = field(default=1, metadata=_choices(1, 2))  # 1: weights to host RAM, 2: dropped
    enable_prefix_caching: bool = True
    limit_images_per_prompt: int = field(default=1, metadata=_min(1))
    weight_bucket_bytes: int = field(default=512 << 20, metadata=_min(1))  # bound on one weight push
    logprobs_mode: str = field(default="processed_logprobs", metadata=_choices("processed_logprobs", "raw_logprobs"))


@dataclass
class RolloutConfig:
    engine: str = field(default="hf", metadata=_choices("hf", "vllm"))
    num_generations: int = field(default=8, metadata=_min(1))  # G
    temperature: float = field(default=0.7, metadata=_min(0.0))
    top_p: float = field(default=1.0, metadata=_min(0.0, strict=True) | _max(1.0))
    top_k: int = field(default=0, metadata=_min(0))  # 0 = off; 1 (greedy) is refused when training
    max_completion_length: int = field(default=64, metadata=_min(1))
    batch_size: int = field(default=32, metadata=_min(1))  # sequences per HF generate() call in rollouts
    # truncated importance sampling (engine log-probs vs the trainer's; rollout.engine=vllm)
    is_cap: float = field(default=2.0, metadata=_min(0.0, strict=True))
    is_correction: bool = True  # false: no correction, the on-policy objective of the authors' code
    # TRL's vllm_importance_sampling_mode names (its default: sequence_mask with cap 3); is_cap is the cap
    is_mode: str = field(default="token_truncate",
                         metadata=_choices("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"))
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class AlgorithmConfig:
    beta: float = field(default=0.04, metadata=_min(0.0))
    # the ratio's lower clip 1 - epsilon_low must stay > 0; epsilon_high has no upper bound
    epsilon_low: float = field(default=0.2, metadata=_min(0.0) | _max(1.0, strict=True))
    epsilon_high: float = field(default=0.2, metadata=_min(0.0))
    num_iterations: int = field(default=1, metadata=_min(1))  # mu
    # as TRL's: bnpo is a token mean per micro-batch, so with it (alone) the objective depends on
    # train.micro_batch_size (TRL: on per_device_train_batch_size); grpo, dr_grpo and dapo do not
    loss_type: str = field(default="grpo", metadata=_choices("grpo", "bnpo", "dr_grpo", "dapo"))
    importance_sampling_level: str = field(default="token", metadata=_choices("token", "sequence"))
    # the KL term times the importance ratio (TRL's option; True by default in the TRL 1.16 that
    # bench_step pins); false: the R1-VL authors' code (plain k3 KL). With num_iterations=1 the
    # ratio is 1 but its gradient is not
    use_bias_correction_kl: bool = False
    # TRL's two-sided clipping: the unclipped term min(r, delta)·A (> 1 + epsilon_high); null: none
    delta: Optional[float] = None
    # TRL's scale_rewards: group (or true): divide by the group's std (+1e-4), as R1-VL; batch: by one
    # std over the step's rewards on all ranks (TRL's "batch"); none (or false): the mean alone
    scale_rewards: Union[bool, str] = field(default=True, metadata=_choices(True, False, "group", "batch", "none"))
    accuracy_weight: float = field(default=1.0, metadata=_min(0.0))  # StepRAR (the eval CLI's bounds too)
    validity_weight: float = field(default=1.0, metadata=_min(0.0))  # StepRVR
    alpha: float = field(default=0.1, metadata=_min(0.0))
    accuracy_variant: str = field(default="paper", metadata=_choices("paper", "official"))
    # temperature of the trainer's log-probs (policy, old and reference: the loss and its KL).
    # null = rollout.temperature (1.0 when greedy), as TRL (1.16) does; 1.0 = the authors'
    # released code, which samples at rollout.temperature but scores the raw logits
    logprob_temperature: Optional[float] = field(default=None, metadata=_min(0.0, strict=True))
    # reward worker processes (0 = in-process, after the log-prob pass); with workers, a step's
    # completions are scored while the batch is built and the log-probs are taken, an evaluation's
    # batch while the next is generated
    reward_workers: int = field(default=0, metadata=_min(0))
    reward_timeout_s: float = field(default=5.0, metadata=_min(0.0, strict=True))


@dataclass
class OptimConfig:
    lr: float = field(default=5e-5, metadata=_min(0.0, strict=True))
    weight_decay: float = field(default=0.0, metadata=_min(0.0))
    beta1: float = field(default=0.9, metadata=_min(0.0) | _max(1.0, strict=True))  # torch AdamW's ranges
    beta2: float = field(default=0.99, metadata=_min(0.0) | _max(1.0, strict=True))
    eps: float = field(default=1e-8, metadata=_min(0.0, strict=True))  # 0: a zero gradient's update is 0/0 = NaN
    max_grad_norm: float = field(default=1.0, metadata=_min(0.0))  # 0 = no clipping
    scheduler: str = field(default="constant", metadata=_choices("constant", "linear", "cosine"))
    # linear warm-up: optimizer step k (0-based, counting each of the num_iterations passes) runs at
    # (k+1)/warmup_steps of lr, so none runs at lr 0 (transformers' schedulers start at 0: one step later)
    warmup_steps: int = field(default=0, metadata=_min(0))
    # torch AdamW's implementation. auto: fused on CUDA without DeepSpeed (one kernel, no
    # parameter-sized temporary: foreach's step allocates one), PyTorch's own default otherwise
    impl: str = field(default="auto", metadata=_choices("auto", "fused", "foreach", "for_loop"))


@dataclass
class TrainConfig:
    max_steps: int = field(default=60, metadata=_min(0))
    prompts_per_step: int = field(default=4, metadata=_min(1))  # per rank; x G completions
    # sequences per forward/backward: memory alone, except with algorithm.loss_type=bnpo (a token mean
    # per micro-batch, as TRL's), where it changes the objective
    micro_batch_size: int = field(default=16, metadata=_min(1))
    # checkpoints every N steps and at the warm-up's end; 0 = none but on a stop by SIGTERM / SIGUSR1 /
    # Ctrl-C during the steps (final/ is no resume point)
    save_every: int = field(default=0, metadata=_min(0))
    keep_checkpoints: int = field(default=2, metadata=_min(0))  # the newest N in output_dir/checkpoints; 0 = all
    save_final: bool = True
    resume: Union[bool, str] = False  # true = latest checkpoint in output_dir, or a checkpoint path
    # a fresh run (no resume) into an output_dir that holds a previous run is refused unless
    # true: then that run's outputs (checkpoints, metrics, models, TensorBoard) are removed first
    overwrite: bool = False
    eval_before: bool = True
    eval_after: bool = True
    # held-out items per rank per generate() call (HF: the decoding batch; vLLM: requests per call)
    eval_batch_size: int = field(default=64, metadata=_min(1))
    eval_every: int = field(default=0, metadata=_min(0))  # held-out evals during StepGRPO; 0 = only after
    save_eval_outputs: bool = True  # each held-out eval's completions + scores: output_dir/eval_outputs/*.jsonl


@dataclass
class LoggingConfig:
    level: str = field(default="INFO", metadata=_choices("DEBUG", "INFO", "WARNING", "ERROR"))
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    # rank 0's first group of completions (texts, rewards, advantages) every N StepGRPO steps to
    # output_dir/rollouts.jsonl; 0 = none
    rollouts_every: int = field(default=1, metadata=_min(0))
    # Weights & Biases (rank 0; pip install -e '.[wandb]'): every metrics.jsonl record, the
    # resolved config and the summary; a resumed run continues the same W&B run
    wandb: bool = False
    wandb_project: str = "r1vl"
    wandb_run_name: str = ""  # "" = output_dir's name
    wandb_mode: str = field(default="", metadata=_choices("", "online", "offline"))  # "" = WANDB_MODE, else online


@dataclass
class DistributedConfig:
    backend: str = field(default="auto", metadata=_choices("auto", "gloo", "nccl"))
    num_threads: int = field(default=0, metadata=_min(0))  # torch threads per rank; 0 = cores // ranks
    timeout_s: int = field(default=1800, metadata=_min(1))


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = field(default=0, metadata=_min(-(2**63)) | _max(2**64 - 1))  # what torch.manual_seed takes
    deepspeed: str = ""  # a DeepSpeed JSON (ZeRO-2/3); "" = plain DDP
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- loading

log = logging.getLogger(__name__)

_NULL_WORDS = ("null", "none", "~")  # an Optional field's None in an override (any case)
_TRUE_WORDS = ("true", "yes", "on")  # a bool in an override (any case): YAML 1.1's words
_FALSE_WORDS = ("false", "no", "off")
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_LEADING_ZERO_INT = re.compile(r"[-+]?0[0-9_]+")
_NUMBER = re.compile(r"[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)([eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*(:[0-9]+)+")
# a YAML file's int that YAML 1.1 reads other than a reader would: 010 (octal 8), 1:30 (base 60: 90)
_SURPRISING_YAML_INT = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-9]+)+)")


class _SurprisingInt:
    """A YAML file's 010 or 1:30, kept as written: every field refuses it (see the module docstring)."""

    def __init__(self, text: str, value: int):
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return repr(self.text)

    def __str__(self) -> str:
        return self.text


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int→float widening only)."""
    if isinstance(value, _SurprisingInt):
        base = "base 60" if ":" in value.text else "octal"
        raise ConfigError(f"{key}: expected {_type_name(tp)} (decimal, no leading zeros), got {value.text!r}, "
                          f"which YAML 1.1 reads as {base} {value.value}; write the number you mean in decimal")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, list):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unquote(raw: str) -> str:
    """An override's text for a str field: verbatim, but for a value wholly in YAML quotes ('...'
    with '' for a quote, or "..." with backslash escapes), which is unquoted as YAML would."""
    if re.fullmatch(r"'(?:[^']|'')*'", raw):
        return raw[1:-1].replace("''", "'")
    if re.fullmatch(r'"(?:[^"\\]|\\.)*"', raw):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return raw


def _parse_value(raw: str, tp: Any, key: str) -> Any:
    """An override's text read by the type of its field (not as YAML: see the module docstring)."""
    text = raw.strip()
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in _NULL_WORDS:
            return None
        if bool in args and str in args and _NUMBER.fullmatch(text):
            # train.resume=1: a number is no checkpoint path; quote it ('1') to mean the path
            raise ConfigError(f"{key}: expected {_type_name(tp)} (true/false or text: a path, a word), got "
                              f"{text!r}, a number: quote it ('{text}') to mean the text")
        for arg in args:
            if arg is not type(None):
                try:
                    return _parse_value(raw, arg, key)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {raw!r}")
    if tp is str:
        return _unquote(raw)
    if tp is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: expected bool (true/false, yes/no, on/off), got {raw!r}")
    if tp is int:
        if _LEADING_ZERO_INT.fullmatch(text):
            raise ConfigError(f"{key}: expected int (decimal, no leading zeros: YAML 1.1 reads 010 as octal 8), "
                              f"got {raw!r}")
        if _DECIMAL_INT.fullmatch(text):
            try:
                return int(text)
            except ValueError:  # 1__0
                pass
        raise ConfigError(f"{key}: expected int, got {raw!r}")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {raw!r}") from None
    # anything else (a list, a dict): YAML, checked against the type by _coerce
    try:
        return yaml.safe_load(raw) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: not valid YAML ({_one_line(str(e))}), got {raw!r}") from None


def _value_range(meta: dict) -> str | None:
    lo, hi = meta.get("min"), meta.get("max")
    lo_strict, hi_strict = meta.get("strict", False), meta.get("max_strict", False)
    if lo is not None and hi is not None:
        fmt = (lambda v: str(v)) if isinstance(lo, int) and isinstance(hi, int) else (lambda v: f"{v:g}")
        return f"in {'(' if lo_strict else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_strict else ']'}"
    if lo is not None:
        return f"{'>' if lo_strict else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_strict else '<='} {hi}"
    return None


def _check_meta(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {list(meta['choices'])}, got {value!r}")
    want = _value_range(meta)
    if isinstance(value, float) and not math.isfinite(value):  # no field gives inf or nan a meaning
        raise ConfigError(f"{key}: expected a finite {'value ' + want if want else 'float'}, got {value!r}")
    if want is not None and isinstance(value, (int, float)):
        lo, hi = meta.get("min"), meta.get("max")
        ok_lo = lo is None or (value > lo if meta.get("strict", False) else value >= lo)
        ok_hi = hi is None or (value < hi if meta.get("max_strict", False) else value <= hi)
        if not (ok_lo and ok_hi):
            raise ConfigError(f"{key}: expected a value {want}, got {value!r}")


def _unknown_key(cls: type, prefix: str, name: Any) -> ConfigError:
    where = prefix.rstrip(".") or "the top level"
    keys = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return ConfigError(f"unknown config key '{prefix}{name}' (keys in {where}: {keys})")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping (the section's keys), "
                          f"got {data!r} ({type(data).__name__})")
    for name in data:
        if name not in fields:
            raise _unknown_key(cls, prefix, name)
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            sub = data.get(name)  # left out, or null in a YAML file: the section's defaults
            kwargs[name] = _build(tp, {} if sub is None else sub, key + ".")
        elif name in data:
            value = _coerce(data[name], tp, key)
            _check_meta(value, f, key)
            kwargs[name] = value
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], str]:
    """`dotted.key=value` -> (key parts, the value's text, unparsed)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    return key.split("."), raw


def _override_target(parts: list[str], item: str) -> Any:
    """The annotation of the field an override names (unknown keys and non-sections refused)."""
    cls, prefix = Config, ""
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown_key(cls, prefix, part)
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return tp
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {item!r}: '{prefix}{part}' is a value ({_type_name(tp)}), not a section")
        cls, prefix = tp, f"{prefix}{part}."
    raise AssertionError("unreachable")


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return _build(Config, data, "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_yaml_int(node)
    if _SURPRISING_YAML_INT.fullmatch(node.value):
        return _SurprisingInt(node.value, value)
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one), a
    list or mapping as a key, and keeps 010 / 1:30 as written (_SurprisingInt)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be overridden by the mapping's own keys
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise ConfigError(f"not valid YAML at {_at(key_node.start_mark)}: a key must be a single "
                                  f"value, got a {kind}")
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error follows
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {first_line[key]})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_yaml_float(node)
    if ":" in node.value:  # 1:30.0, base 60: 90.0, as the int form
        return _SurprisingInt(node.value, value)
    return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """PyYAML's several-line error as one line: where, the problem and what it was doing."""
    if isinstance(e, yaml.MarkedYAMLError) and (e.problem_mark or e.context_mark):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "error"
        problem = problem[4:] if problem.startswith("but ") else problem
        msg = f"at {_at(mark)}: {problem}"
        if e.context and e.problem:
            where = ""
            if e.context_mark is not None and e.problem_mark is not None and \
                    (e.context_mark.line, e.context_mark.column) != (mark.line, mark.column):
                where = f" at {_at(e.context_mark)}"
            msg += f" ({e.context}{where})"
        return _one_line(msg)
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return f"at line {line}, column {column}: character #x{e.character:04x} ({_one_line(e.reason)})"
    return _one_line(str(e))


def _read_yaml(p: Path) -> Any:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = len(data[start:e.start].decode("utf-8", "replace")) + 1
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, column {column}); "
                          "save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML {_yaml_problem(e, text)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                training: bool = True) -> Config:
    """Defaults ← YAML file (if any) ← `dotted.key=value` overrides; validated. training=False
    (a run's saved config read for its evaluation settings, an evaluation's engine): without
    the checks and warnings of what a training run would do with it."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config {p}: is a directory; expected a YAML file (e.g. configs/qwen2vl_2b.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = _read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        try:
            from_dict(loaded)  # the file alone: its unknown keys, types and ranges, named with the file
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        tree = loaded
    for item in overrides:
        parts, raw = _parse_override(item)
        tp = _override_target(parts, item)
        key = ".".join(parts)
        if dataclasses.is_dataclass(tp):
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(f"{key}: expected a mapping (a section: override its keys, e.g. {key}.{first}=...), "
                              f"got {raw!r}")
        _set_dotted(tree, parts, _parse_value(raw, tp, key))
    cfg = from_dict(tree)
    validate(cfg, training=training)
    return cfg


def longest_sequence(cfg: Config) -> int:
    """The most tokens a rollout can hold (the vLLM engine's max_model_len when not set):
    data.max_prompt_length (a training prompt's tokens, its image's included) + the tokens of a
    data.max_pixels image (one per 28x28 pixels: 14-pixel patches merged 2x2; headroom for the
    held-out prompts, which max_prompt_length does not limit) + rollout.max_completion_length."""
    return cfg.data.max_prompt_length + cfg.data.max_pixels // (28 * 28) + cfg.rollout.max_completion_length


# why AdamW on float16 weights (no fp32 master copy) is refused, whatever optim.impl and optim.eps
FLOAT16_ADAMW = (
    "AdamW keeps its moments in float16, where a squared gradient below 6e-8 (|g| < 2.4e-3 at beta2=0.99) is 0, "
    "and such a weight's update is then about lr * g / optim.eps: hundreds of times AdamW's, fused or not (the "
    "weights are ruined in a step or two, or turn NaN). Use model.dtype=bfloat16 or float32, or deepspeed= with a "
    "config whose fp16.enabled is true or \"auto\" (fp32 master weights and moments)")


def validate(cfg: Config, training: bool = True) -> None:
    """Cross-field checks (single fields are checked while loading); warns of settings that run
    but are likely mistakes. training=False: only what any use of the config needs (the checks
    and warnings of a training run's choices are skipped)."""
    for key, want in (("output_dir", "a non-empty directory path"),
                      ("data.train", "a non-empty path (or 'synthetic')"),
                      ("data.test", "a non-empty path (or 'synthetic')"),
                      ("model.path", "a non-empty checkpoint path or hub id (or 'tiny')")):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not value.strip():
            raise ConfigError(f"{key}: expected {want}, got {value!r}")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"output_dir: {cfg.output_dir!r} exists and is not a directory")
    blocked = next((p for p in Path(cfg.output_dir).parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # else a NotADirectoryError traceback once the run makes it
        raise ConfigError(f"output_dir: {cfg.output_dir!r} lies below {str(blocked)!r}, which is a file")
    a = cfg.algorithm
    if a.delta is not None and not a.delta > 1.0 + a.epsilon_high:
        raise ConfigError(f"algorithm.delta={a.delta}: must exceed 1 + algorithm.epsilon_high = "
                          f"{1.0 + a.epsilon_high} (or be null)")
    if cfg.algorithm.loss_type == "dr_grpo" and cfg.rollout.max_completion_length <= 0:
        raise ConfigError("algorithm.loss_type=dr_grpo needs rollout.max_completion_length > 0")
    if cfg.model.tiny.hidden_size % cfg.model.tiny.num_attention_heads:
        raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_attention_heads")
    head_dim = cfg.model.tiny.hidden_size // cfg.model.tiny.num_attention_heads
    if head_dim < 32 or head_dim % 8:
        raise ConfigError(
            f"model.tiny: head_dim = hidden_size / num_attention_heads = {head_dim}; expected a multiple"
            " of 8 and >= 32 (vLLM's CPU attention refuses smaller heads)"
        )
    if cfg.model.tiny.num_attention_heads % cfg.model.tiny.num_key_value_heads:
        raise ConfigError("model.tiny.num_attention_heads must be divisible by model.tiny.num_key_value_heads")
    if cfg.model.tiny.vision_embed_dim % cfg.model.tiny.vision_num_heads:
        raise ConfigError("model.tiny.vision_embed_dim must be divisible by model.tiny.vision_num_heads")
    vision_head = cfg.model.tiny.vision_embed_dim // cfg.model.tiny.vision_num_heads
    if vision_head % 4:  # the vision rotary embedding splits each head in two halves of (h, w) pairs
        raise ConfigError(f"model.tiny: vision head_dim = vision_embed_dim / vision_num_heads = {vision_head}; "
                          "expected a multiple of 4 (the vision tower's 2-D rotary embedding)")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(
            f"data.min_pixels ({cfg.data.min_pixels}) must not exceed data.max_pixels ({cfg.data.max_pixels})"
        )
    try:
        from r1vl.data.images import check_pixel_bounds

        check_pixel_bounds(cfg.data.min_pixels, cfg.data.max_pixels)
    except ValueError as e:
        raise ConfigError(f"data.min_pixels / data.max_pixels: {e}") from None
    mml, need = cfg.rollout.vllm.max_model_len, longest_sequence(cfg)
    if cfg.rollout.engine == "vllm" and mml is not None and mml < need:
        raise ConfigError(
            f"rollout.vllm.max_model_len: expected >= {need} (data.max_prompt_length + the tokens of a "
            f"data.max_pixels image + rollout.max_completion_length), got {mml}: completions would be cut "
            "short and long prompts refused; raise it or leave it null (computed)")
    if not training:  # the checks and warnings below are of what a training run would do
        return
    t, ro = cfg.train, cfg.rollout
    if cfg.data.train != "synthetic" and cfg.data.test == "synthetic" and (
            t.eval_before or t.eval_after or t.eval_every):
        # data.test's default: a run on one's own data would be scored on the built-in task
        raise ConfigError(f"data.test: 'synthetic' (the built-in task, the default) while data.train is "
                          f"{cfg.data.train!r}: the held-out evaluations would score the built-in task; set "
                          "data.test to your held-out file (or turn the evaluations off: train.eval_before=false "
                          "train.eval_after=false); to score the built-in task on purpose, write it with "
                          "`python -m r1vl.data.synthetic --out DIR` and pass data.test=DIR/test.jsonl")
    if ro.num_generations < 2 and t.max_steps > 0:
        raise ConfigError("rollout.num_generations: expected >= 2 (group-relative advantages need a group)")
    if ro.temperature == 0 and t.max_steps > 0:
        raise ConfigError(
            f"rollout.temperature: expected > 0 when train.max_steps > 0, got {ro.temperature!r} "
            "(greedy: a prompt's G completions would be equal, every advantage 0, and StepGRPO would learn nothing)"
        )
    if ro.top_k == 1 and t.max_steps > 0:
        raise ConfigError("rollout.top_k: expected 0 (off) or >= 2 when train.max_steps > 0, got 1 (greedy: a "
                          "prompt's G completions would be equal, every advantage 0, and StepGRPO would learn nothing)")
    if (ro.engine == "vllm" and ro.is_correction and ro.vllm.logprobs_mode == "processed_logprobs"
            and (ro.top_p < 1 or ro.top_k > 0) and t.max_steps > 0):
        # vLLM's processed log-probs are those of the distribution after the top-p / top-k cut,
        # renormalised; the trainer's are of the whole one: every ratio is the kept mass (0.9 at
        # top_p 0.9), whole sequences nearly 0 in the sequence modes, with the engine in sync
        raise ConfigError(f"rollout.top_p={ro.top_p} / rollout.top_k={ro.top_k} with rollout.is_correction and vLLM's "
                          "processed log-probs: the engine's are of the cut, renormalised distribution and the "
                          "trainer's of the whole one, so the importance ratio is the kept mass, not 1; set "
                          "rollout.vllm.logprobs_mode=raw_logprobs (both compared at temperature 1, uncut), "
                          "rollout.is_correction=false, or top_p=1 and top_k=0")
    trains = [lr for n, lr in ((cfg.warmup.steps, cfg.warmup.lr), (cfg.train.max_steps, cfg.optim.lr)) if n > 0]
    if cfg.model.dtype == "float16" and not cfg.deepspeed and trains:
        raise ConfigError("model.dtype=float16 without DeepSpeed: " + FLOAT16_ADAMW)
    w = cfg.warmup
    if os.environ.get("RANK", "0") != "0":  # the warnings below: once, not once per rank
        return
    if w.steps > 0 and w.warmup_steps > w.steps:
        log.warning("warmup.warmup_steps=%d exceeds warmup.steps=%d: the warm-up lr never reaches warmup.lr "
                    "(its last step runs at %.0f%% of it)", w.warmup_steps, w.steps, 100 * w.steps / w.warmup_steps)
    if cfg.model.dtype == "bfloat16" and not cfg.deepspeed and trains:  # (float16 is refused above)
        # AdamW's step is about lr per element; a bf16 weight keeps it only when it exceeds half a
        # unit in the last place: 2^-9..2^-8 of the weight
        log.warning("model.dtype=bfloat16 without DeepSpeed: AdamW updates the 16-bit weights themselves (no fp32 "
                    "master copy), so a step smaller than about 0.4%% of a weight is rounded away, as most are at "
                    "lr=%g; deepspeed=configs/ds_zero2.json keeps fp32 master weights (on one GPU too), or use "
                    "model.dtype=float32", min(trains))
    total = cfg.train.max_steps * cfg.algorithm.num_iterations
    if total > 0 and cfg.optim.warmup_steps > total:
        log.warning("optim.warmup_steps=%d exceeds the StepGRPO optimizer steps (train.max_steps x "
                    "algorithm.num_iterations = %d): the lr never reaches optim.lr (its last step runs at %.0f%% of it)",
                    cfg.optim.warmup_steps, total, 100 * total / cfg.optim.warmup_steps)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
