"""Truncated importance sampling for the rollout-engine / trainer mismatch.

The engine samples with its own kernels (vLLM: other attention, other matmul
order, maybe another dtype), so the log-probability it assigns to a sampled token
is not exactly the trainer's. With

    ratio_t = exp(logp_old_trainer_t - logp_engine_t),  truncated at `cap`,

the policy-gradient estimate built from engine samples is re-weighted towards
what the trainer's policy would have sampled (truncation bounds the variance).
The ratio is a constant (no gradient) that multiplies each token's loss term;
it is ≈ 1 when engine and trainer agree, and it is passed to the fused loss as
`rollout_is_ratio`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch


def truncated_is_ratio(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    cap: float = 2.0,
) -> torch.Tensor:
    """min(exp(trainer_logp - engine_logp), cap), elementwise, without gradient.

    trainer_logp, engine_logp: same shape (e.g. [B, T]); mask: 1 on real
    completion tokens, 0 on padding (padding positions get ratio 1). is_ratio's
    token_truncate mode.
    """
    return is_ratio(trainer_logp, engine_logp, mask, cap=cap, mode="token_truncate")


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def is_ratio(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor | None = None,
             cap: float = 2.0, mode: str = "token_truncate") -> torch.Tensor:
    """The correction of rollout.is_mode, as TRL's vllm_importance_sampling_mode with `cap` for
    its clip_max (no lower bound), [B, T], without gradient:

    token_truncate   min(exp(d_t), cap)                       (truncated_is_ratio)
    token_mask       exp(d_t), or 0 where it exceeds cap
    sequence_*       the same on exp(Σ_t d_t), one value per sequence over its tokens

    d_t = trainer_logp − engine_logp on the tokens `mask` marks (0 elsewhere; NaN counts as
    agreement); positions outside `mask` get 1."""
    if mode not in IS_MODES:
        raise ValueError(f"rollout.is_mode: expected one of {IS_MODES}, got {mode!r}")
    if trainer_logp.shape != engine_logp.shape:
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)} and engine_logp "
                         f"{tuple(engine_logp.shape)} must have the same shape")
    if not cap > 0:
        raise ValueError(f"rollout.is_cap must be > 0, got {cap}")
    with torch.no_grad():
        d = trainer_logp.detach().float() - engine_logp.detach().to(trainer_logp.device).float()
        on = torch.ones_like(d, dtype=torch.bool) if mask is None else mask.to(d.device).bool()
        d = torch.where(on, torch.nan_to_num(d, nan=0.0), torch.zeros_like(d))
        if mode.startswith("sequence"):
            d = d.sum(-1, keepdim=True).expand_as(on)
        log_cap = math.log(cap)  # clamped in log space: exp never overflows
        if mode.endswith("truncate"):
            ratio = torch.exp(d.clamp(max=log_cap))
        else:  # mask: the sequence (or token) is dropped from the loss
            ratio = torch.where(d > log_cap, torch.zeros_like(d), torch.exp(d.clamp(max=log_cap)))
        return torch.where(on, ratio, torch.ones_like(ratio))


@dataclass(frozen=True)
class RolloutIS:
    """The correction formed by the update itself (r1vl.algo.grpo_update with μ = 1): the
    trainer's old log-probs are then the update's own log-probs (the same weights, the same
    batch), so its forward gives them, from the hidden states it computes anyway, by one more
    forward-only pass of the LM head, where a separate pass would run the whole model again.

    engine_logprobs / engine_mask [B, T] (pad_engine_logprobs), rollout.is_cap and is_mode,
    and the temperature and logit bias [V] the trainer's log-probs are taken at to compare
    like with like (r1vl.train.logprob_temperatures, engine_logit_bias)."""

    engine_logprobs: torch.Tensor
    engine_mask: torch.Tensor
    cap: float = 2.0
    mode: str = "token_truncate"
    temperature: float = 1.0
    logit_bias: torch.Tensor | None = None

    def rows(self, rows: slice, length: int) -> "RolloutIS":
        """This correction for rows `rows` of the batch, cut to a micro-batch's `length` tokens."""
        return replace(self, engine_logprobs=self.engine_logprobs[rows, :length],
                       engine_mask=self.engine_mask[rows, :length])

    def ratio(self, trainer_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """is_ratio of `trainer_logp` against the engine's, on the tokens both `mask` and the
        engine's mask mark."""
        on = self.engine_mask.to(mask.device).bool() & mask.bool()
        return is_ratio(trainer_logp, self.engine_logprobs, on, cap=self.cap, mode=self.mode)


def is_ratio_stats(ratio: torch.Tensor, mask: torch.Tensor | None = None, cap: float = 2.0,
                   mode: str = "token_truncate") -> dict:
    """mean / max / min of the ratio over real tokens and the fraction the cap acted on
    (truncated to cap, or masked to 0 in the *_mask modes)."""
    with torch.no_grad():
        r = ratio.float()
        if mask is not None:
            r = r[mask.to(r.device).bool()]
        else:
            r = r.reshape(-1)
        if r.numel() == 0:
            return {"is_ratio_mean": 1.0, "is_ratio_max": 1.0, "is_ratio_min": 1.0, "is_ratio_capped_frac": 0.0}
        return {
            "is_ratio_mean": r.mean().item(),
            "is_ratio_max": r.max().item(),
            "is_ratio_min": r.min().item(),
            "is_ratio_capped_frac": ((r == 0) if mode.endswith("_mask") else (r >= cap * (1 - 1e-6)))
            .float().mean().item(),
        }


def pad_engine_logprobs(
    logprobs: Sequence[Sequence[float] | None],
    length: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-completion engine log-probs to [len(logprobs), length].

    Returns (values, mask): mask is 1 where the engine gave a log-prob. A
    completion without log-probs (None) is all-masked, so its ratio is 1.
    Longer rows are cut to `length` (the trainer's completion length).
    """
    values = torch.zeros(len(logprobs), length, dtype=torch.float32)
    mask = torch.zeros(len(logprobs), length, dtype=torch.bool)
    for i, row in enumerate(logprobs):
        if row is None:
            continue
        row = list(row)[:length]
        if row:
            values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
            mask[i, : len(row)] = True
    return values.to(device), mask.to(device)
