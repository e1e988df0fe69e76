"""Public API: argument validation, backend dispatch and the nn.Module.

    linear_logprobs(hidden, weight, targets, ...)             -> logp (, entropy)
    fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, ...) -> (loss, metrics)
    FusedLinearGRPOLoss(beta=..., ...)(hidden, weight, targets, mask, advantages, ...)

Backends: "triton" = the streaming Triton kernels (triton_grpo.py; on CPU only under
TRITON_INTERPRET=1, which must be set before the kernels module is first imported);
"torch" = chunked GEMMs through PyTorch: the one-pass loss (onepass.py: gradients
formed in forward, three GEMMs, with the Triton row kernels of triton_rows.py on CUDA;
at sequence level with whole sequences per chunk while they fit), else the two-pass
chunked path (chunked.py); log-probs without autograd on CUDA go through full-row
chunks, one GEMM + the row-stats kernel each (onepass.gemm_logprobs).
"auto" = "torch" on CPU; on CUDA "torch" for the loss and "triton" for log-probs alone
(AUTO_CUDA; the choice is settled by bench/bench_loss.py on the GPU, see bench/NOTES.md).
Every user mistake is a ValueError naming the offending argument.
"""
from __future__ import annotations

import numbers
import os
import sys

import torch
from torch import nn

from .chunked import chunked_linear_logprobs
from .objective import grpo_objective, no_autocast
from .onepass import gemm_logprobs, onepass_grpo_loss, sequence_fits

BACKENDS = ("auto", "triton", "torch")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp64 is accepted by the torch backend only (finite-difference checks); it computes in fp64.
INPUT_DTYPES = FLOAT_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, x, *, shape=None, dtypes=None, device=None, float_ok=False):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if float_ok and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected device {device} (hidden's), got {x.device}")


def _as_number(x):
    """A Python number from a real number of any kind (numpy scalars, 0-dim tensors: what
    other trainers' configs hold); other values are returned as they are, for the checks."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool:
        return x.item()
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, int, float)):
        return float(x)
    return x


def _check_number(name: str, x, *, positive=False, nonneg=False):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(x).__name__}")
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    if positive and not x > 0:
        raise ValueError(f"{name}: expected > 0, got {x}")
    if nonneg and not x >= 0:
        raise ValueError(f"{name}: expected >= 0, got {x}")


def _check_bool(name: str, x) -> None:
    if not isinstance(x, bool):
        raise ValueError(f"{name}: expected a bool, got {type(x).__name__}")


def _as_bool(x):
    """A Python bool from numpy's bool_ (and a 1-element bool tensor); other values as they are."""
    np = sys.modules.get("numpy")
    if (np is not None and isinstance(x, np.bool_)) or (
            isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype == torch.bool):
        return bool(x)
    return x


def _as_count(name: str, x):
    """max_completion_length: a positive int (numpy's integers and 1-element integer tensors too)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        x = int(x.item())
    elif isinstance(x, numbers.Integral) and not isinstance(x, (bool, int)):
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return x


def _constant(x):
    """A constant input made under torch.inference_mode (rollout code often makes old/ref
    log-probs, the mask and advantages there) cannot be saved for backward: a plain copy is."""
    if isinstance(x, torch.Tensor) and x.is_inference() and not torch.is_inference_mode_enabled():
        return x.clone()
    return x


def _check_delta(delta, epsilon_high) -> None:
    if delta is None:
        return
    _check_number("delta", delta)
    if not delta > 1.0 + epsilon_high:
        raise ValueError(f"delta: expected > 1 + epsilon_high = {1.0 + epsilon_high} (the two-sided clip sits "
                         f"above the upper clip), got {delta}")


def _hyperparameters(beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level,
                     max_completion_length, return_entropy, use_bias_correction_kl, delta) -> tuple:
    """The loss's hyper-parameters, checked (a ValueError naming the bad one) and normalised (numbers
    of any kind as Python numbers, numpy bools as bool), returned in the order of the arguments:
    what fused_linear_grpo_loss and FusedLinearGRPOLoss (at construction) both take."""
    beta, epsilon_low, epsilon_high, temperature = map(_as_number, (beta, epsilon_low, epsilon_high, temperature))
    delta = None if delta is None else _as_number(delta)
    return_entropy, use_bias_correction_kl = _as_bool(return_entropy), _as_bool(use_bias_correction_kl)
    for name, x in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        _check_number(name, x, nonneg=True)
    _check_number("temperature", temperature, positive=True)
    _check_bool("use_bias_correction_kl", use_bias_correction_kl)
    _check_bool("return_entropy", return_entropy)
    _check_delta(delta, epsilon_high)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length: required when loss_type='dr_grpo'")
    if max_completion_length is not None:
        max_completion_length = _as_count("max_completion_length", max_completion_length)
    return (beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level,
            max_completion_length, return_entropy, use_bias_correction_kl, delta)


def _sharded(x) -> bool:
    """A torch.distributed DTensor (FSDP2's parameters, tensor parallelism), by class name:
    importing torch.distributed.tensor to ask would cost every caller its import."""
    return any(c.__name__ == "DTensor" for c in type(x).__mro__)


def _zero3_partition(x) -> bool:
    """A DeepSpeed ZeRO-3 parameter not gathered on this rank: its data is an empty placeholder,
    its whole shape in ds_shape."""
    return isinstance(x, torch.Tensor) and x.numel() == 0 and getattr(x, "ds_shape", None) is not None


def _check_linear(hidden, weight, bias, targets, temperature, *, hidden_ndims):
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if _sharded(x):
            raise ValueError(f"{name}: a DTensor (sharded: FSDP2's fully_shard, tensor parallelism); the kernel "
                             "takes plain tensors: call it inside the forward of the module FSDP wrapped (its "
                             "parameters are unsharded there), after the LM head's module.unshard(), or with "
                             f"{name}.full_tensor()")
        if _zero3_partition(x):
            raise ValueError(f"{name}: a DeepSpeed ZeRO-3 partition, empty on this rank until gathered (whole shape "
                             f"{list(x.ds_shape)}); the kernel takes the whole tensor: read it inside a forward that "
                             "runs under the DeepSpeed engine (ZeRO-3 gathers a parameter read there and reduces its "
                             "gradient to the partitions; docs/examples/trl_fused_grpo.py does so), or, without "
                             f"gradients, inside deepspeed.zero.GatheredParameters([{name}])")
    _check_tensor("hidden", hidden, dtypes=INPUT_DTYPES)
    if hidden.dim() not in hidden_ndims:
        want = " or ".join(f"{d}-D" for d in hidden_ndims)
        raise ValueError(f"hidden: expected {want}, got shape {tuple(hidden.shape)}")
    dev = hidden.device
    _check_tensor("weight", weight, device=dev)
    if weight.dtype != hidden.dtype:  # e.g. autocast: a bf16 backbone output beside an fp32 head
        raise ValueError(f"weight: expected hidden's dtype {hidden.dtype} (one dtype for both), got {weight.dtype}: "
                         f"cast one to the other's, e.g. hidden.to(weight.dtype) (under autocast the backbone's "
                         "output is 16-bit while the parameters stay fp32; the logits are fp32 either way)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (hidden size last), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: vocabulary size must be > 0")
    if bias is not None:
        _check_tensor("bias", bias, shape=(weight.shape[0],), dtypes=(hidden.dtype,), device=dev)
    _check_tensor("targets", targets, shape=hidden.shape[:-1], dtypes=(torch.int64,), device=dev)
    _check_number("temperature", temperature, positive=True)


def _check_target_range(targets, vocab, where=None):
    t = targets if where is None else targets[where]
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"targets: token ids must lie in [0, {vocab}) (weight has {vocab} rows)"
                         f"{' at unmasked positions' if where is not None else ''}; got min {lo}, max {hi}")


# backend="auto" on CUDA, per operation: the streaming kernels never write logits, which
# suits forward-only log-probs; the one-pass loss does three GEMMs where the streaming
# forward+backward recomputes logits (four) and accumulates dW with atomics (at sequence
# level too, with whole sequences per chunk, while onepass.sequence_fits).
AUTO_CUDA = {"logprobs": "triton", "loss_token": "torch", "loss_sequence": "torch"}


def _resolve_backend(backend, device, dtype, op="logprobs"):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = AUTO_CUDA[op] if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton" and dtype == torch.float64:
        raise ValueError("hidden: float64 is supported by backend='torch' only")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "r1vl.kernels' Triton module is imported; use backend='torch' or 'auto'")
    return backend


def _onepass_enabled() -> bool:
    """The torch backend's token-level loss forms its gradients in forward (onepass.py,
    three GEMMs instead of four); R1VL_KERNEL_ONEPASS=0 selects the two-pass path
    (log-probs, then the objective, recomputing logits in backward) for comparisons."""
    return os.environ.get("R1VL_KERNEL_ONEPASS", "1") != "0"


def _backend_fns(backend):
    """(log-prob op, GRPO objective) of a backend."""
    if backend == "torch":
        return chunked_linear_logprobs, grpo_objective
    try:
        from .triton_grpo import triton_grpo_objective, triton_linear_logprobs
    except ImportError as exc:  # triton missing or broken
        raise ValueError(f"backend='triton' is unavailable: {exc}") from exc
    return triton_linear_logprobs, triton_grpo_objective


# ----------------------------------------------------------------------------- functions

def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Log-probs of `targets` under softmax((hidden·Wᵀ + bias)/temperature), without logits.

    hidden [B,T,H] or [N,H] (fp32/bf16/fp16; fp64 on the torch backend), weight [V,H] (same
    dtype), targets int64 with hidden's leading shape. Returns fp32 log-probs (fp64 for fp64
    inputs) shaped like targets, and each row's entropy (same dtype) when `return_entropy`.
    Differentiable w.r.t. hidden, weight and bias (logp and entropy); under torch.no_grad
    nothing is saved.
    """
    temperature, return_entropy = _as_number(temperature), _as_bool(return_entropy)
    _check_bool("return_entropy", return_entropy)  # a truthy "no" returned a tuple, as the loss refuses it
    _check_linear(hidden, weight, bias, targets, temperature, hidden_ndims=(2, 3))
    be = _resolve_backend(backend, hidden.device, hidden.dtype)
    _check_target_range(targets, weight.shape[0])
    with no_autocast(hidden.device):  # fp32 logits from the inputs' dtypes, under autocast too
        h2 = hidden.reshape(-1, hidden.shape[-1])
        logprob_fn = _backend_fns(be)[0]
        tracked = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        if be == "torch" and hidden.device.type == "cuda" and not tracked:
            # forward only on CUDA: full-row chunks, one cuBLAS GEMM + the row-stats kernel each
            logprob_fn = gemm_logprobs
        logp, ent = logprob_fn(h2, weight, bias, targets.reshape(-1), temperature=temperature,
                               return_entropy=bool(return_entropy))
        logp = logp.view(targets.shape)
        if return_entropy:
            return logp, ent.view(targets.shape)
        return logp


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    use_bias_correction_kl: bool = False,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO loss straight from the LM head, never materialising [tokens, vocab] logits.

    hidden [B,T,H], weight [V,H], targets/mask [B,T], advantages [B] (or [B,1]; or [B,T],
    one per token, as TRL allows for its subclasses); optional
    old/ref log-probs [B,T] and rollout_is_ratio [B,T] (or [B,1], one per sequence); without
    ref_logprobs there is no KL term, whatever beta. Returns (0-dim loss, metrics) with
    metrics kl, clip_ratio_low, clip_ratio_high, clip_ratio (and entropy) as detached
    0-dim fp32 tensors (fp64 for fp64 inputs) (kl, entropy: token means; clip ratios: share of tokens, at sequence
    level share of sequences, or of tokens with [B,T] advantages, as TRL). use_bias_correction_kl: the KL term (and the kl metric) is
    KL·r, r the importance ratio, as TRL's GRPOConfig option of that name (TRL's default is
    True; R1-VL's code has no correction, the default here). delta: TRL's two-sided clipping,
    the unclipped term min(r, delta)·A (a number > 1 + epsilon_high; None: none). Gradients flow to hidden, weight and bias only: advantages,
    old/ref log-probs and rollout_is_ratio are constants. Masked-out positions are never
    read from the vocabulary: their targets may be any id (padding) and they cost no
    vocabulary work.
    """
    (beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level, max_completion_length,
     return_entropy, use_bias_correction_kl, delta) = _hyperparameters(
        beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level, max_completion_length,
        return_entropy, use_bias_correction_kl, delta)
    _check_linear(hidden, weight, bias, targets, temperature, hidden_ndims=(3,))
    targets, mask, advantages, old_logprobs, ref_logprobs, rollout_is_ratio, bias = map(
        _constant, (targets, mask, advantages, old_logprobs, ref_logprobs, rollout_is_ratio, bias))
    b, t = targets.shape
    dev = hidden.device
    _check_tensor("mask", mask, shape=(b, t), device=dev)
    if mask.is_complex():
        raise ValueError(f"mask: expected bool, integer or float, got {mask.dtype}")
    # TRL's shapes: advantages[:, None] and a sequence-level importance_sampling_ratio [B, 1]
    if isinstance(advantages, torch.Tensor) and tuple(advantages.shape) == (b, 1):
        advantages = advantages.reshape(b)
    if isinstance(rollout_is_ratio, torch.Tensor) and tuple(rollout_is_ratio.shape) == (b, 1):
        rollout_is_ratio = rollout_is_ratio.expand(b, t)
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 2 and tuple(advantages.shape) == (b, t):
        # one advantage per token (TRL accepts [B, T] for its subclasses): masked positions
        # are never read, as old/ref log-probs there (a NaN there would poison the gradient)
        _check_tensor("advantages", advantages, device=dev, float_ok=True)
        advantages = torch.where(mask != 0, advantages.detach(), 0.0)
    else:
        try:
            _check_tensor("advantages", advantages, shape=(b,), device=dev, float_ok=True)
        except ValueError as e:
            raise ValueError(f"{e} (or [B, 1], or [B, T] = {(b, t)}: one per token)") from None
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("rollout_is_ratio", rollout_is_ratio)):
        if x is not None:
            _check_tensor(name, x, shape=(b, t), device=dev, float_ok=True)
    if num_items_in_batch is not None:
        n_items = num_items_in_batch
        if isinstance(n_items, torch.Tensor) and n_items.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a scalar, got shape {tuple(n_items.shape)}")
        n_items = _as_number(n_items)
        _check_number("num_items_in_batch", n_items, nonneg=True)
        # a Python number from here on (a 1-element tensor made a [1]-shaped loss on one path);
        # 0 (no completion token in the whole batch) counts as 1, as TRL clamps the count; a
        # fraction is a normaliser already divided (TRL's count / num_processes): kept
        num_items_in_batch = float(n_items) if n_items > 0 else 1.0
    be = _resolve_backend(backend, dev, hidden.dtype, op="loss_" + importance_sampling_level)

    with no_autocast(dev):  # fp32 logits from the inputs' dtypes, under autocast too
        on = (mask != 0).reshape(-1)
        _check_target_range(targets.reshape(-1), weight.shape[0], where=on)
        n_on = int(on.sum())
        rows = None if n_on == on.numel() else on.nonzero().squeeze(1)
        safe_targets = targets.reshape(-1) if rows is None else torch.where(on, targets.reshape(-1), 0)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        if be == "torch" and _onepass_enabled() and (
                importance_sampling_level == "token" or sequence_fits(mask, weight.shape[0], dev)):
            return onepass_grpo_loss(
                h2, weight, bias, safe_targets, rows, mask, advantages, old_logprobs=old_logprobs,
                ref_logprobs=ref_logprobs, rollout_is_ratio=rollout_is_ratio, beta=beta,
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, temperature=temperature,
                loss_type=loss_type, max_completion_length=max_completion_length,
                num_items_in_batch=num_items_in_batch, return_entropy=return_entropy,
                importance_sampling_level=importance_sampling_level,
                use_bias_correction_kl=use_bias_correction_kl, delta=delta)
        logprob_fn, objective_fn = _backend_fns(be)
        logp, ent = logprob_fn(h2, weight, bias, safe_targets, temperature=temperature,
                               return_entropy=bool(return_entropy), rows=rows)
        return objective_fn(
            logp.view(b, t), mask, advantages,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_is_ratio=rollout_is_ratio,
            beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
            loss_type=loss_type, importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
            entropy=None if ent is None else ent.view(b, t).detach(),
            use_bias_correction_kl=use_bias_correction_kl, delta=delta,
        )


class FusedLinearGRPOLoss(nn.Module):
    """nn.Module form of `fused_linear_grpo_loss`: hyper-parameters in __init__, tensors in forward.

    forward(hidden, weight, targets, mask, advantages, bias=None, old_logprobs=None,
            ref_logprobs=None, rollout_is_ratio=None, num_items_in_batch=None) -> (loss, metrics)
    """

    def __init__(
        self,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        temperature: float = 1.0,
        loss_type: str = "grpo",
        importance_sampling_level: str = "token",
        max_completion_length: int | None = None,
        return_entropy: bool = False,
        backend: str = "auto",
        use_bias_correction_kl: bool = False,
        delta: float | None = None,
    ):
        super().__init__()
        # validate early (a bad config should fail at construction, not at step 1), as the function does
        (beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level, max_completion_length,
         return_entropy, use_bias_correction_kl, delta) = _hyperparameters(
            beta, epsilon_low, epsilon_high, temperature, loss_type, importance_sampling_level, max_completion_length,
            return_entropy, use_bias_correction_kl, delta)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.use_bias_correction_kl = use_bias_correction_kl
        self.delta = delta
        self.beta = beta
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.temperature = temperature
        self.loss_type = loss_type
        self.importance_sampling_level = importance_sampling_level
        self.max_completion_length = max_completion_length
        self.return_entropy = return_entropy
        self.backend = backend

    def forward(self, hidden, weight, targets, mask, advantages, bias=None, old_logprobs=None,
                ref_logprobs=None, rollout_is_ratio=None, num_items_in_batch=None):
        return fused_linear_grpo_loss(
            hidden, weight, targets, mask, advantages, bias=bias,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            temperature=self.temperature, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items_in_batch, rollout_is_ratio=rollout_is_ratio,
            return_entropy=self.return_entropy, backend=self.backend,
            use_bias_correction_kl=self.use_bias_correction_kl, delta=self.delta,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}, "
                f"temperature={self.temperature}, loss_type={self.loss_type!r}, "
                f"importance_sampling_level={self.importance_sampling_level!r}, backend={self.backend!r}"
                + (", use_bias_correction_kl=True" if self.use_bias_correction_kl else "")
                + (f", delta={self.delta}" if self.delta is not None else ""))
