"""The GRPO objective on per-token log-probs: ratio, clip, KL, aggregation, metrics.

Everything here works on [B, T] tensors (O(tokens) memory): the vocabulary-sized
work happens before, in a backend's log-prob op, which never materialises [N, V].
Autograd differentiates these few element-wise ops; the gradient that reaches the
log-prob op is one fp32 number per token.

Semantics are TRL's GRPOTrainer loss (see reference.py for the formula). Masked-out
positions (mask == 0) never contribute, not even NaN/inf: old/ref log-probs and
ratios there are replaced by zeros before any arithmetic.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def no_autocast(device: torch.device):
    """A context in which autocast is off for `device` (a no-op when it is not on): the log-prob
    GEMMs must give fp32 logits from the caller's dtypes, as every backend promises, also when
    the caller runs under torch.autocast (which would make them bf16 and the log-probs wrong)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, enabled=False)
    except (TypeError, RuntimeError):  # a device type autocast does not know: nothing to turn off
        pass
    return contextlib.nullcontext()


def differentiable_once(backward):
    """For a custom Function's backward: under create_graph=True (gradients of gradients, grad
    mode on in backward) a RuntimeError saying so. The gradients are formed without a graph, so
    a gradient penalty would get no second-order term, silently."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("r1vl.kernels: the fused log-probs / GRPO loss are differentiable once; "
                               "create_graph=True (gradients of gradients) is not supported")
        return backward(ctx, *grads)
    return wrapper


def grpo_objective(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    rollout_is_ratio: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    importance_sampling_level: str,
    max_completion_length: int | None,
    num_items_in_batch,
    entropy: torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) from fp32 (or fp64) log-probs `logp` [B, T] (differentiable).

    Arguments are assumed validated by the caller (api.py)."""
    acc = logp.dtype  # fp32 (fp64 when the inputs were fp64)
    on = mask != 0
    m = mask.to(acc)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    adv = as_token_advantages(advantages, acc)
    per_token, ratio, kl = per_token_terms(
        logp, on, m, adv, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        rollout_is_ratio=rollout_is_ratio, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, importance_sampling_level=importance_sampling_level,
        use_bias_correction_kl=use_bias_correction_kl, delta=delta)

    n_tok = m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        # a mean over the sequences; an empty batch (B = 0: a rank left without rows) gives 0, not NaN
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(1, per_token.shape[0])
    elif loss_type == "bnpo":
        loss = per_token.sum() / n_tok
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / float(max(1, per_token.shape[0]) * max_completion_length)
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            loss = per_token.sum() / n_tok
        else:
            loss = per_token.sum() / torch.as_tensor(
                num_items_in_batch, dtype=acc, device=logp.device)
    else:  # validated upstream
        raise ValueError(f"loss_type={loss_type!r}")

    with torch.no_grad():
        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(on, x * m, zero).sum() / n_tok

        low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(acc)
        high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(acc)
        # token level: the share of (mask-weighted) tokens clipped; sequence level, where a
        # sequence has one ratio, the share of sequences, every row counted (TRL's metrics)
        # ([B, T] advantages: of tokens at both levels, as TRL's [B, T]-shaped flags)
        clip_mean = masked_mean if importance_sampling_level == "token" or advantages.dim() == 2 \
            else sequence_mean
        metrics = {
            "kl": masked_mean(kl) if kl is not None else zero.clone(),
            "clip_ratio_low": clip_mean(low),
            "clip_ratio_high": clip_mean(high),
            "clip_ratio": clip_mean(torch.maximum(low, high)),
        }
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy)
    return loss, metrics


def as_token_advantages(advantages: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Advantages broadcastable to [B, T] in `dtype`, constants: [B] -> [B, 1]; [B, T]
    (one per token, masked positions zeroed by api.py) as they are."""
    adv = advantages.detach().to(dtype)
    return adv.unsqueeze(1) if adv.dim() == 1 else adv


def sequence_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of a [B, T] tensor that is constant along each row (a per-sequence
    flag expanded over its tokens); a fully masked row counts (its ratio is 1)."""
    return x[:, :1].sum() / max(1, x.shape[0])


def per_token_terms(logp, on, m, adv, *, old_logprobs, ref_logprobs, rollout_is_ratio, beta,
                    epsilon_low, epsilon_high, importance_sampling_level, use_bias_correction_kl=False,
                    delta=None):
    """(masked per-token loss, ratio, k3 KL or None) on [B, T] (or any shape at token level).

    `on` = mask != 0, `m` = mask in logp's dtype, `adv` broadcastable to logp. The
    per-token loss is −min(r·A, clip(r)·A)·ris + β·KL, times m, zero where masked;
    with use_bias_correction_kl the KL term (and the returned KL) is KL·r, as TRL's option;
    with delta (TRL's two-sided clipping) the unclipped term is min(r, delta)·A;
    r = exp(logp − old) (sequence level: exp of the sequence's masked mean log-ratio),
    r ≡ 1 with a live gradient when old is None. The loss's value and its gradient
    w.r.t. logp both come from these ops (the one-pass path differentiates them on
    chunks of rows), so every path shares torch.minimum/clamp's conventions at ties."""
    acc = logp.dtype
    zero = torch.zeros((), dtype=acc, device=logp.device)
    # old/ref log-probs and rollout_is_ratio are constants of the objective
    old_logprobs, ref_logprobs, rollout_is_ratio = (
        None if x is None else x.detach() for x in (old_logprobs, ref_logprobs, rollout_is_ratio))
    old = logp.detach() if old_logprobs is None else old_logprobs.to(acc)
    log_ratio = torch.where(on, logp - old, zero)
    if importance_sampling_level == "sequence":
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.minimum(capped * adv, clipped * adv)
    if rollout_is_ratio is not None:
        per_token = per_token * torch.where(on, rollout_is_ratio.to(acc), zero)
    kl = None
    if ref_logprobs is not None:
        diff = torch.where(on, ref_logprobs.to(acc) - logp, zero)
        kl = torch.exp(diff) - diff - 1.0
        if use_bias_correction_kl:  # importance-weighted: the KL's gradient also flows through r
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    return torch.where(on, per_token * m, zero), ratio, kl


def token_weights(mask, *, loss_type, max_completion_length, num_items_in_batch, dtype):
    """w [B, T] with loss = Σ per_token·w for every loss type (per_token already masked):
    grpo 1/(B·max(1, Σ_t m)) per sequence; bnpo and dapo without num_items 1/max(1, Σ m);
    dr_grpo 1/(B·max_completion_length); dapo with num_items_in_batch 1/num_items."""
    m = mask.to(dtype)
    bsz = mask.shape[0]
    if loss_type == "grpo":
        return (1.0 / (bsz * m.sum(-1, keepdim=True).clamp(min=1.0))).expand_as(m)
    if loss_type == "dr_grpo":
        return torch.full_like(m, 1.0 / float(max(1, bsz) * max_completion_length))
    if loss_type == "dapo" and num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=dtype, device=mask.device)
        return (1.0 / n).expand_as(m)
    return (1.0 / m.sum().clamp(min=1.0)).expand_as(m)
