"""Model speed-ups for Qwen2-VL / Qwen2.5-VL: Liger kernels, the attention implementation,
gradient checkpointing.

    from r1vl.speedups import apply_speedups
    report = apply_speedups(model, device=d.device, attn_implementation=cfg.model.attn_implementation,
                            gradient_checkpointing=cfg.model.gradient_checkpointing)

- Liger (CUDA only): RMSNorm, SwiGLU MLP, the vision LayerNorm (Qwen2-VL) and RoPE are
  replaced by Liger's Triton kernels on the model instance (and in the transformers module,
  so models built later in the process get them too). Never Liger's cross-entropy or
  fused-linear cross-entropy: r1vl's fused GRPO loss replaces the head.
  RoPE: transformers 5.x merges Qwen2-VL's M-RoPE sections into cos/sin inside the rotary
  embedding and its attention calls the standard `apply_rotary_pos_emb`, so Liger's
  Qwen2-VL rope switch (which targets `apply_multimodal_rotary_pos_emb`, gone in 5.x) would
  patch nothing; there the standard Liger rope kernel is installed instead (same result:
  the recomposed cos/sin have equal halves, which that kernel assumes).
  On CPU Liger is skipped with one log line (its RMSNorm/SwiGLU kernels need CUDA; Triton's
  interpreter cannot run them).
- Attention: "auto" = flash_attention_2 on CUDA with 16-bit weights when flash-attn imports,
  else sdpa; an explicit flash_attention_2 without CUDA, flash-attn or 16-bit weights is a
  clear error (float32 weights: flash-attn's first forward would raise).
- Gradient checkpointing (non-reentrant, so it composes with DeepSpeed ZeRO-3's hooks) on
  the language model and the vision tower.

Tested with liger-kernel 0.8.5 and transformers 5.19-5.22 (liger 0.8.5's Qwen2-VL patch
does not work with transformers 5.23).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ATTN_CHOICES = ("auto", "eager", "sdpa", "flash_attention_2")


class SpeedupError(RuntimeError):
    """A requested speed-up cannot be applied here (names what is missing)."""


# --------------------------------------------------------------------------- attention


def flash_attn_available() -> bool:
    """flash-attn is installed and imports (a wheel built for another torch fails to import)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # ImportError, or an undefined-symbol OSError from a mismatched build
        return False
    return True


def resolve_attn_implementation(requested: str = "auto", device: torch.device | str | None = None,
                                dtype: torch.dtype | str | None = None) -> str:
    """The attention implementation to use for `requested` ("auto", "eager", "sdpa",
    "flash_attention_2") on `device` (default: CUDA when available) for weights of `dtype`
    (None: not known). flash-attn computes in fp16/bf16 only: with float32 weights (and no
    autocast, which r1vl does not use) its first forward raises, so "auto" takes sdpa there."""
    if requested not in ATTN_CHOICES:
        raise SpeedupError(f"model.attn_implementation: expected one of {list(ATTN_CHOICES)}, got {requested!r}")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash_attention_2" if cuda and half and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2":
        if not cuda:
            raise SpeedupError("model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa or auto")
        if not half:
            raise SpeedupError(f"model.attn_implementation=flash_attention_2 needs bfloat16 or float16 weights, the "
                               f"model's are {str(dtype).replace('torch.', '')} (flash-attn computes in 16 bits only); "
                               "set model.dtype=bfloat16, or use sdpa or auto")
        if not flash_attn_available():
            raise SpeedupError("model.attn_implementation=flash_attention_2: flash-attn is not installed or does not "
                               "import (pip install flash-attn --no-build-isolation); use sdpa or auto")
    return requested


def set_attn_implementation(model: nn.Module, requested: str = "auto",
                            device: torch.device | str | None = None,
                            dtype: torch.dtype | str | None = None) -> str:
    """Switch the (already built) HF model inside `model` to the resolved implementation
    (text and vision towers) for `dtype`, the dtype it will compute in (default: its own; a
    float32 model that DeepSpeed casts to bf16 passes "bfloat16"); returns it."""
    from r1vl.models import unwrap

    hf = unwrap(model)
    impl = resolve_attn_implementation(requested, device, dtype or getattr(hf, "dtype", None))
    if getattr(hf.config, "_attn_implementation", None) != impl:
        hf.set_attn_implementation(impl)
    return impl


# --------------------------------------------------------------------------- gradient checkpointing


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Non-reentrant activation checkpointing of every decoder / vision block, or off."""
    from r1vl.models import unwrap

    hf = unwrap(model)
    if enabled:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks every input embedding (the vision tower's patch embedding too)
        # to require grad, which reentrant checkpointing needs and this one does not: with
        # model.freeze_vision the frozen tower then built a graph, was recomputed and
        # back-propagated every micro-batch for no gradient
        if hasattr(hf, "disable_input_require_grads"):
            hf.disable_input_require_grads()
    elif getattr(hf, "is_gradient_checkpointing", False):
        hf.gradient_checkpointing_disable()


# --------------------------------------------------------------------------- Liger


def _family(hf: nn.Module) -> tuple[str, Any]:
    """("qwen2_vl" | "qwen2_5_vl", the transformers modeling module) of a supported model."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    if isinstance(hf, (modeling_qwen2_vl.Qwen2VLForConditionalGeneration, modeling_qwen2_vl.Qwen2VLModel)):
        return "qwen2_vl", modeling_qwen2_vl
    if isinstance(hf, (modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, modeling_qwen2_5_vl.Qwen2_5_VLModel)):
        return "qwen2_5_vl", modeling_qwen2_5_vl
    raise SpeedupError(f"Liger kernels: unsupported model {type(hf).__name__} (expected Qwen2-VL or Qwen2.5-VL)")


# names in the transformers module that liger-kernel's patch replaces, per switch
_TARGETS = {
    "qwen2_vl": {"rms_norm": ("Qwen2VLRMSNorm",), "swiglu": ("Qwen2MLP",), "layer_norm": ("LayerNorm",)},
    "qwen2_5_vl": {"rms_norm": ("Qwen2_5_VLRMSNorm",), "swiglu": ("Qwen2MLP",)},
}


def _rope_mode(mod) -> str:
    """Which RoPE function the text attention of `mod` calls (the global names its forward
    looks up): "multimodal" (transformers 4.x: apply_multimodal_rotary_pos_emb, which Liger's
    own switch patches), "standard" (5.x: apply_rotary_pos_emb on cos/sin whose M-RoPE
    sections the rotary embedding already recomposed, equal halves), "none" (unknown)."""
    names: set[str] = set()
    for attr in dir(mod):
        cls = getattr(mod, attr)
        if isinstance(cls, type) and attr.endswith("Attention") and "Vision" not in attr and hasattr(cls, "forward"):
            names.update(getattr(cls.forward, "__code__", None).co_names if hasattr(cls.forward, "__code__") else ())
    if "apply_multimodal_rotary_pos_emb" in names:
        return "multimodal"
    rotary = [getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and "Vision" not in n]
    if "apply_rotary_pos_emb" in names and any(hasattr(c, "recomposition_frequencies") for c in rotary):
        return "standard"
    return "none"


def apply_liger(model: nn.Module, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True,
                layer_norm: bool = True) -> list[str]:
    """Patch the Qwen2-VL / Qwen2.5-VL inside `model` with Liger's kernels (see the module
    docstring); returns what was patched, e.g. ["rms_norm", "swiglu", "layer_norm", "rope"].
    Runs anywhere (the patch only rebinds forwards); the patched model needs CUDA to run.
    Raises SpeedupError when liger-kernel is missing or the installed transformers lacks a
    class the patch replaces (a version outside the tested range)."""
    from r1vl.models import unwrap

    hf = unwrap(model)
    family, mod = _family(hf)
    try:
        from liger_kernel.transformers import monkey_patch
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as e:
        raise SpeedupError(f"Liger kernels: liger-kernel is not installed ({e}); pip install 'liger-kernel>=0.8.5,<0.9'") \
            from None
    wanted = {"rms_norm": rms_norm, "swiglu": swiglu, "layer_norm": layer_norm and family == "qwen2_vl"}
    for switch, on in wanted.items():
        for name in _TARGETS[family].get(switch, ()) if on else ():
            if not hasattr(mod, name):
                import transformers

                raise SpeedupError(f"Liger kernels: transformers {transformers.__version__} has no "
                                   f"{mod.__name__}.{name} (liger's {switch} patch targets it); use "
                                   "transformers>=5.19,<5.23 with liger-kernel 0.8.5")
    mode = _rope_mode(mod) if rope else "none"
    kwargs: dict[str, Any] = dict(rope=mode == "multimodal", cross_entropy=False, fused_linear_cross_entropy=False,
                                  rms_norm=rms_norm, swiglu=swiglu, model=hf)
    if family == "qwen2_vl":
        kwargs["layer_norm"] = layer_norm
        monkey_patch.apply_liger_kernel_to_qwen2_vl(**kwargs)
    else:
        monkey_patch.apply_liger_kernel_to_qwen2_5_vl(**kwargs)
    if mode == "standard":
        mod.apply_rotary_pos_emb = liger_rotary_pos_emb
    elif rope and mode == "none":
        log.warning("Liger kernels: %s has an unknown RoPE layout; rope left as it is", mod.__name__)
    return [k for k, on in (("rms_norm", rms_norm), ("swiglu", swiglu), ("layer_norm", wanted["layer_norm"]),
                            ("rope", mode != "none")) if on]


# --------------------------------------------------------------------------- all together


def apply_speedups(model: nn.Module, *, device: torch.device | str, attn_implementation: str | None = "auto",
                   gradient_checkpointing: bool = False, liger: bool = True,
                   dtype: torch.dtype | str | None = None) -> dict:
    """Attention implementation (None: leave as loaded), gradient checkpointing, and Liger's
    kernels on CUDA (skipped elsewhere, in one log line). Call before DeepSpeed / DDP wrap
    the model; `dtype`: the one it will compute in, when DeepSpeed casts it (default: its own).
    Returns {"device", "attn_implementation", "gradient_checkpointing", "liger"}."""
    from r1vl.models import unwrap

    device = torch.device(device)
    hf = unwrap(model)
    impl = set_attn_implementation(hf, attn_implementation, device, dtype) if attn_implementation is not None else \
        getattr(hf.config, "_attn_implementation", "eager")
    set_gradient_checkpointing(hf, gradient_checkpointing)
    patched: list[str] = []
    if liger and device.type == "cuda":
        patched = apply_liger(hf)
        log.info("speed-ups: Liger %s; attention %s; gradient checkpointing %s", "+".join(patched), impl,
                 "on" if gradient_checkpointing else "off")
    else:
        why = "off" if not liger else f"skipped on {device.type} (its RMSNorm/SwiGLU kernels need CUDA)"
        log.info("speed-ups: Liger kernels %s; attention %s; gradient checkpointing %s", why, impl,
                 "on" if gradient_checkpointing else "off")
    return {"device": str(device), "attn_implementation": impl, "gradient_checkpointing": bool(gradient_checkpointing),
            "liger": patched}
