"""Reference implementation: materialised logits, plain PyTorch, fp64 by default.

This is the oracle the fused backends are tested against and the "reference" row of
bench/bench_loss.py. It builds the full [N, V] logits, so it is only for small
shapes (tests) or to measure what the fused op saves (benchmarks). It does no
argument validation: call it with well-formed tensors.

The objective is TRL's GRPOTrainer loss, written out as directly as possible:

    logp = log_softmax((h·Wᵀ + b) / τ)[target]
    r    = exp(logp − old)                       (token level)
         = exp(masked mean_t (logp − old))       (sequence level, same for each token)
    l    = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) · rollout_is_ratio   (r·A: min(r, δ)·A with delta)
           + β·(exp(ref − logp) − (ref − logp) − 1)       (· r with use_bias_correction_kl)
    loss = aggregate(l, mask) by loss_type

Metrics: kl and entropy are mask-weighted token means; the clip ratios are the share of
tokens clipped at token level and the share of sequences (all B rows) at sequence level,
as TRL logs them.
"""
from __future__ import annotations

import torch


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """Log-probs (and entropy) of `targets` under softmax((hidden·Wᵀ + bias)/τ), in `dtype`.

    Gradients flow back to hidden/weight/bias through the casts. Returns `logp`, or
    `(logp, entropy)` when `return_entropy`.
    """
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def reference_grpo_loss(
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
    use_bias_correction_kl: bool = False,
    delta: float | None = None,
    dtype: torch.dtype = torch.float64,
):
    """TRL's GRPO objective on materialised logits. Same signature as
    `fused_linear_grpo_loss` (hidden [B,T,H], targets/mask [B,T], advantages [B] or [B,T]),
    plus the compute `dtype`. Returns (loss, metrics)."""
    m = mask.to(dtype)
    on = mask != 0
    # masked-out targets are never read by the fused op (they may be padding ids)
    safe_targets = torch.where(on, targets, torch.zeros_like(targets))
    out = reference_linear_logprobs(
        hidden, weight, safe_targets, bias=bias, temperature=temperature,
        return_entropy=return_entropy, dtype=dtype,
    )
    logp, entropy = out if return_entropy else (out, None)

    old = logp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    log_ratio = torch.where(on, logp - old, torch.zeros_like(logp))
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        log_w = seq.expand_as(logp)
    else:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    # [B] -> [B, 1]; [B, T] (one advantage per token, TRL's subclasses) as it is, masked positions unread
    if advantages.dim() == 1 or tuple(advantages.shape) == (logp.shape[0], 1):
        adv = advantages.to(dtype).reshape(-1, 1)
    else:
        adv = torch.where(on, advantages.to(dtype), torch.zeros_like(logp))
    capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)   # TRL's two-sided clipping
    per_token = -torch.min(capped * adv, coef_2 * adv)
    if rollout_is_ratio is not None:
        per_token = per_token * torch.where(on, rollout_is_ratio.to(dtype), torch.zeros_like(logp))
    kl = None
    if ref_logprobs is not None:
        d = torch.where(on, ref_logprobs.to(dtype) - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * coef_1
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = torch.where(on, per_token * m, torch.zeros_like(per_token))

    n_tok = m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(1, per_token.shape[0])  # B = 0: 0
    elif loss_type == "bnpo":
        loss = per_token.sum() / n_tok
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (max(1, per_token.shape[0]) * max_completion_length)
    elif loss_type == "dapo":
        norm = n_tok if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype)
        loss = per_token.sum() / norm
    else:
        raise ValueError(f"loss_type={loss_type!r}")

    with torch.no_grad():
        def mean(x):
            return torch.where(on, x * m, torch.zeros_like(x)).sum() / n_tok

        low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(dtype)
        high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(dtype)
        if importance_sampling_level == "sequence" and adv.shape[1] == 1:   # share of sequences (rows) clipped
            def clip_mean(x):
                return x[:, :1].sum() / max(1, x.shape[0])
        else:                                          # share of tokens clipped (as TRL's [B, T] flags)
            clip_mean = mean
        metrics = {
            "kl": mean(kl) if kl is not None else torch.zeros((), dtype=dtype),
            "clip_ratio_low": clip_mean(low),
            "clip_ratio_high": clip_mean(high),
            "clip_ratio": clip_mean(torch.maximum(low, high)),
        }
        if return_entropy:
            metrics["entropy"] = mean(entropy)
    return loss, metrics
