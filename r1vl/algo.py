"""StepGRPO's algorithmic pieces: group-relative advantages, batch building, micro-batching,
log-probs without grad, and the update (μ passes of the fused loss, then AdamW).

Every function takes plain inputs (tensors, lists, dataclasses) so that each stage is
testable alone; train.py strings them together.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from r1vl.models import repeat_image_blocks

# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool | str = True,
                     eps: float = 1e-4, batch_std: float | None = None) -> torch.Tensor:
    """(r - mean_group) / (std + eps) for consecutive groups of `group_size` rewards
    (prompt-major order). `scale` is TRL's scale_rewards: True or "group" divides by the
    group's std; "batch" by one std over the whole batch (`batch_std`, default: of `rewards`;
    the trainer passes all ranks' from reward_std); False or "none" only removes the mean. std
    is the unbiased sample std (as in TRL / the R1-VL code); a group of identical rewards gets
    advantage 0. Computed in float64 and returned in float32: in float32 the mean of eight
    rewards of 2.1 (a group all right with every key step) is one unit in the last place off,
    and dividing that by (std ≈ 1e-7) + eps pushed the whole group by ±2e-3."""
    mode = scale_mode(scale)
    r = torch.as_tensor(rewards).to(torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor, got shape {tuple(r.shape)}")
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"rewards: {r.numel()} values do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    adv = g - mean
    if mode == "group":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)
    elif mode == "batch":
        std = batch_std if batch_std is not None else (float(r.std()) if r.numel() > 1 else 0.0)
        adv = adv / (std + eps)
    return adv.reshape(-1).to(torch.float32)


def scale_mode(scale: bool | str) -> str:
    """algorithm.scale_rewards as TRL's word: "group", "batch" or "none"."""
    if scale is True or scale == "group":
        return "group"
    if scale is False or scale == "none":
        return "none"
    if scale == "batch":
        return "batch"
    raise ValueError(f"scale: expected True/False or 'group', 'batch', 'none', got {scale!r}")


def reward_std(rewards: torch.Tensor, device: torch.device | str | None = None) -> float:
    """The unbiased std of every rank's rewards together (scale_rewards="batch", as TRL takes
    it over the gathered batch): two all-reduces in float64 (a mean, then the squared
    deviations) on `device` (the process group's: CUDA under nccl). A collective: every rank
    calls it at the same point of the step."""
    import torch.distributed as dist

    r = torch.as_tensor(rewards).detach().to(device=device, dtype=torch.float64).reshape(-1)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(r.std()) if r.numel() > 1 else 0.0
    sums = torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
    dist.all_reduce(sums)
    n = float(sums[1])
    dev = ((r - sums[0] / n) ** 2).sum().reshape(1)
    dist.all_reduce(dev)
    return math.sqrt(float(dev) / (n - 1)) if n > 1 else 0.0


# --------------------------------------------------------------------------- batches


@dataclass
class SeqBatch:
    """Prompt (left-padded) + continuation (right-padded) sequences.

    inputs: model inputs for the whole sequences; targets/mask [B, T]: continuation tokens
    and which are real; start: column of the first continuation token (the hidden state at
    start-1 scores it)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    mask: torch.Tensor
    start: int
    image_counts: list[int] = field(default_factory=list)  # images per sequence (for slicing)
    # build_batch(compact_images=True): pixel_values holds each distinct image once, image_index[j]
    # is image j's block; slice() gives a batch with a block per image again
    image_index: list[int] | None = None

    @property
    def size(self) -> int:
        return self.targets.shape[0]

    def slice(self, idx: Sequence[int]) -> "SeqBatch":
        """Rows `idx` (a contiguous or arbitrary list), trimmed to their longest continuation."""
        idx = list(idx)
        rows = torch.tensor(idx, dtype=torch.long)
        mask = self.mask[rows]
        t = int(mask.sum(1).max().item()) if mask.numel() else 0
        t = max(t, 1)
        end = self.start + t
        inputs = {}
        for k, v in self.inputs.items():
            if k in ("pixel_values", "image_grid_thw"):
                continue
            inputs[k] = v[rows, :end] if v.dim() == 2 else v[rows]
        if "image_grid_thw" in self.inputs:
            grid = self.inputs["image_grid_thw"]
            img_off = [0]
            for c in self.image_counts:
                img_off.append(img_off[-1] + c)
            block = list(range(grid.shape[0])) if self.image_index is None else self.image_index
            sel_img = [j for i in idx for j in range(img_off[i], img_off[i + 1])]
            if sel_img:
                inputs["image_grid_thw"] = grid[sel_img]
                inputs["pixel_values"] = repeat_image_blocks(self.inputs["pixel_values"], grid, block, sel_img)
        return SeqBatch(inputs, self.targets[rows, :t], mask[:, :t], self.start,
                        [self.image_counts[i] for i in idx] if self.image_counts else [])

    def to(self, device) -> "SeqBatch":
        return SeqBatch({k: v.to(device) for k, v in self.inputs.items()}, self.targets.to(device),
                        self.mask.to(device), self.start, self.image_counts, self.image_index)


def build_batch(processor, prompt_texts: list[str], images: list, continuations: list[list[int]],
                *, dtype: torch.dtype = torch.float32, compact_images: bool = False) -> SeqBatch:
    """Tokenise prompts (left padding) and append continuation token ids (right padding).

    images[i] is prompt i's image or None; continuations[i] the token ids after prompt i.
    compact_images: an image object given for several rows (a group's G completions) keeps one
    pixel block (SeqBatch.image_index), not G copies: G times less host memory and host-to-
    device copying; the batch is then used through slice() (the trainer's micro-batches)."""
    if len(prompt_texts) != len(continuations) or len(images) != len(prompt_texts):
        raise ValueError("build_batch: prompt_texts, images and continuations must have the same length")
    bad = set(processor.vision_token_ids()) if hasattr(processor, "vision_token_ids") else set()
    for i, c in enumerate(continuations):
        if bad.intersection(c):
            raise ValueError(f"build_batch: continuation {i} contains image placeholder tokens "
                             f"{sorted(bad.intersection(c))}; engines must suppress them")
    enc = processor(prompt_texts, [im for im in images if im is not None], padding_side="left",
                    **({"unique_images": True} if compact_images else {}))
    B, P = enc["input_ids"].shape
    T = max(1, max((len(c) for c in continuations), default=1))
    pad = processor.pad_token_id
    targets = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, c in enumerate(continuations):
        if c:
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1
    inputs = {
        "input_ids": torch.cat([enc["input_ids"], targets], dim=1),
        "attention_mask": torch.cat([enc["attention_mask"], mask], dim=1),
    }
    if "mm_token_type_ids" in enc:
        inputs["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"], torch.zeros((B, T), dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    index = None
    if "pixel_values" in enc:
        inputs["pixel_values"] = enc["pixel_values"].to(dtype)
        inputs["image_grid_thw"] = enc["image_grid_thw"]
        if "image_index" in enc:
            index = enc["image_index"].tolist()
    counts = [0 if im is None else 1 for im in images]
    return SeqBatch(inputs, targets, mask, P, counts, index)


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Consecutive index groups of at most `size` covering range(n)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


# --------------------------------------------------------------------------- log-probs


@torch.no_grad()
def compute_logprobs(policy: nn.Module, batch: SeqBatch, *, micro_batch_size: int,
                     temperature: float = 1.0, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-probs [B, T] of batch.targets (0 where mask is 0), micro-batched, no grad.
    `policy` is an r1vl.models.PolicyWithLoss (or a module wrapping one); `logit_bias` [V]
    is added to the logits (a rollout engine's, for log-probs comparable with its own)."""
    # on the batch's device: a copy to the host per micro-batch waited for the GPU each time
    out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
    inner = policy.module if hasattr(policy, "module") else policy  # no DDP hooks without grad
    was_training = inner.training
    inner.eval()
    try:
        for idx in micro_batches(batch.size, micro_batch_size):
            mb = batch.slice(idx)
            extra = {} if logit_bias is None else {"logit_bias": logit_bias}
            lp = inner(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="logprobs", temperature=temperature,
                       **extra)
            t = lp.shape[1]
            out[idx[0]: idx[-1] + 1, :t] = lp.float() * mb.mask[:, :t]
    finally:
        inner.train(was_training)
    return out


# --------------------------------------------------------------------------- update


# the loss's metrics that are means over completion tokens (TRL's definitions), and the clip ratios,
# which are shares of tokens at importance_sampling_level="token" and of sequences at "sequence":
# grpo_update averages these over its micro-batches by tokens (the others by rows), and returns
# `tokens` for the caller to weigh them across ranks the same way: one token mean per step, where
# TRL averages its per-micro-batch means (which then depend on the micro-batch size)
TOKEN_MEANS = ("kl", "entropy")
TOKEN_LEVEL_SHARES = ("clip_ratio_low", "clip_ratio_high", "clip_ratio")


@dataclass
class UpdateConfig:
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    delta: float | None = None
    temperature: float = 1.0
    max_completion_length: int | None = None
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0


def _no_sync(model: nn.Module, skip: bool):
    from r1vl.ds import is_engine

    if skip and hasattr(model, "no_sync") and not is_engine(model):  # DeepSpeed: ds.backward(last=...)
        return model.no_sync()
    return contextlib.nullcontext()


def _backward(policy: nn.Module, loss: torch.Tensor, last: bool) -> None:
    from r1vl import ds

    if ds.is_engine(policy):
        ds.backward(policy, loss, last=last)
    else:
        loss.backward()


def _optimizer_step(policy: nn.Module, params: list[torch.Tensor], optimizer, scheduler: Any,
                    max_grad_norm: float) -> tuple[float, bool]:
    """Clip, step the optimizer and the scheduler; returns the gradient norm before clipping and
    whether the update was applied. A non-finite norm steps neither (the weights stay as they
    are). A DeepSpeed engine does all three itself (gradient_clipping = optim.max_grad_norm), and
    says whether it skipped the step (its overflow check: fp16's loss scaler, ZeRO's check of the
    gradients where enabled)."""
    from r1vl import ds

    if ds.is_engine(policy):
        skipped = ds.skipped_steps(policy)
        grad_norm = ds.step(policy)
        return grad_norm, ds.skipped_steps(policy) == skipped
    grad_norm = _clip(params, max_grad_norm)
    applied = math.isfinite(grad_norm)
    # (a NaN or infinite gradient turns the weights NaN: clipping scales it by 0, AdamW's update
    # is NaN; it is not applied, and the trainer stops at this step: check_finite_loss)
    if applied:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    # the gradients go now, not at the next step's start: held through the rollouts, evaluations
    # and saves in between, they took a trainable-parameter-sized block of memory for nothing
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


def has_dropout(model: nn.Module) -> bool:
    """Whether a training-mode forward of `model` drops anything: an nn.Dropout with p > 0 or an
    attention with attention_dropout > 0 (Qwen2-VL's, from its config; 0 in the released
    checkpoints). Its log-probs then differ from an eval-mode pass's."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return True
    return False


def grpo_update(policy: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: SeqBatch,
                advantages: torch.Tensor, cfg: UpdateConfig, *, ref_logprobs: torch.Tensor | None = None,
                rollout_is_ratio: torch.Tensor | None = None,
                old_logprobs: torch.Tensor | None = None, rollout_is: Any = None) -> dict[str, Any]:
    """μ = cfg.num_iterations optimisation passes over `batch`; each pass runs the fused GRPO
    loss over micro-batches (gradients accumulated, synchronised once under DDP), clips the
    gradient norm and takes one optimizer (and scheduler) step.

    The per-micro-batch losses are weighted so that their sum equals the loss of the whole
    batch under cfg.loss_type. Returns the loss and its metrics averaged over the μ passes
    (token means weighted by tokens: TOKEN_MEANS), grad_norm, and `tokens` (this rank's
    completion tokens). Old log-probs are taken before the first pass when μ > 1
    (with μ = 1 the ratio is exactly 1 and the detached current log-probs serve); a caller
    that already has them (the IS correction needs them too) passes `old_logprobs`.

    The rollout engine's importance-sampling correction comes as `rollout_is_ratio` [B, T], or
    with μ = 1 as `rollout_is` (an r1vl.rollout.is_correction.RolloutIS): each micro-batch's
    forward then forms it from its own log-probs, which are the old ones at μ = 1, saving the
    separate no-grad pass over the whole model; the ratio formed is returned as
    "rollout_is_ratio" [B, T] (1 where no micro-batch reached). Not for a policy with dropout
    (has_dropout): its training-mode log-probs are not the old ones."""
    B = batch.size
    if rollout_is is not None and (cfg.num_iterations > 1 or rollout_is_ratio is not None):
        raise ValueError("grpo_update: rollout_is needs num_iterations=1 and no rollout_is_ratio (with mu > 1 "
                         "the old log-probs come from before the first pass: compute the ratio from them)")
    if rollout_is is not None and has_dropout(policy):
        raise ValueError("grpo_update: rollout_is with a policy that has dropout: its training-mode log-probs "
                         "are not the old ones; compute the ratio from a no-grad pass (compute_logprobs)")
    ratio_out = None if rollout_is is None else torch.ones(batch.targets.shape, dtype=torch.float32,
                                                           device=batch.targets.device)
    old = None
    if cfg.num_iterations > 1:
        old = old_logprobs if old_logprobs is not None else compute_logprobs(
            policy, batch, micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature)
    groups = micro_batches(B, cfg.micro_batch_size)
    total_tokens = local_tokens = float(batch.mask.sum().item())
    token_means = TOKEN_MEANS + (TOKEN_LEVEL_SHARES if cfg.importance_sampling_level == "token" else ())
    if cfg.loss_type == "dapo":
        total_tokens = _tokens_per_rank(batch.mask)
    params = [p for p in policy.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    passes = skipped = 0
    for _ in range(cfg.num_iterations):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        for gi, idx in enumerate(groups):
            mb = batch.slice(idx)
            t = mb.targets.shape[1]
            rows = slice(idx[0], idx[-1] + 1)
            kwargs: dict[str, Any] = dict(
                advantages=advantages[rows].float(),
                beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                temperature=cfg.temperature, loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_sampling_level, return_entropy=True,
            )
            if cfg.use_bias_correction_kl:
                kwargs["use_bias_correction_kl"] = True
            if cfg.delta is not None:
                kwargs["delta"] = cfg.delta
            if old is not None:
                kwargs["old_logprobs"] = old[rows, :t]
            if ref_logprobs is not None and cfg.beta != 0:
                kwargs["ref_logprobs"] = ref_logprobs[rows, :t]
            if rollout_is_ratio is not None:
                kwargs["rollout_is_ratio"] = rollout_is_ratio[rows, :t]
            if rollout_is is not None:
                kwargs["rollout_is"] = rollout_is.rows(rows, t)
            if cfg.loss_type == "dr_grpo":
                kwargs["max_completion_length"] = cfg.max_completion_length
                weight = len(idx) / B
            elif cfg.loss_type == "dapo":
                kwargs["num_items_in_batch"] = max(total_tokens, 1.0)
                weight = 1.0
            else:  # grpo (mean over sequences), bnpo (token mean per micro-batch, as TRL)
                weight = len(idx) / B
            with _no_sync(policy, gi < len(groups) - 1):
                loss, metrics = policy(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="grpo", **kwargs)
                _backward(policy, loss * weight, last=gi == len(groups) - 1)
            if ratio_out is not None:
                ratio_out[rows, :t] = metrics.pop("rollout_is_ratio")
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * weight
            mb_tokens = float(mb.mask.sum().item())
            for k, v in metrics.items():  # token means weighted by tokens, sequence shares by rows
                share = mb_tokens / max(local_tokens, 1.0) if k in token_means else len(idx) / B
                sums[k] = sums.get(k, 0.0) + float(v) * share
        grad_norm, applied = _optimizer_step(policy, params, optimizer, scheduler, cfg.max_grad_norm)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        passes += 1
        if not math.isfinite(grad_norm):  # the run stops at this step (check_finite_loss): no more passes
            skipped = int(not applied)
            break
    out = {k: v / passes for k, v in sums.items()}
    out["tokens"] = local_tokens
    out["updates_skipped"] = skipped
    if ratio_out is not None:
        out["rollout_is_ratio"] = ratio_out
    return out


def _tokens_per_rank(mask: torch.Tensor) -> float:
    """dapo's normaliser: the completion tokens of the whole batch, all ranks together,
    divided by the number of ranks. The ranks' gradients are averaged (DDP, DeepSpeed), so
    Σ_ranks (Σ_local / (N / world)) / world = Σ_all / N: one token mean over the global batch,
    as TRL's num_items_in_batch gives (a per-rank token count would weigh a rank's tokens by
    1 / its own count). A collective: every rank calls it at the same point of the step."""
    import torch.distributed as dist

    n = mask.detach().sum().to(torch.float64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(n)
    n = n.reshape(1)
    dist.all_reduce(n)
    return float(n) / dist.get_world_size()


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """The gradients' global L2 norm, taken in fp32 (a float16 one overflows to inf above 65504,
    finite gradients or not), and with max_norm > 0 the gradients scaled to at most max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) for g in grads]))
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def sft_step(policy: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: SeqBatch, *,
             micro_batch_size: int, max_grad_norm: float = 1.0) -> dict[str, float]:
    """One supervised step: the negative log-likelihood of the continuations (computed from
    hidden states by r1vl.kernels.linear_logprobs; no vocabulary logits) as one token mean over
    the global batch (all ranks' tokens: `_tokens_per_rank`, so that the ranks' averaged
    gradients equal one process's on the whole batch, as HF's average_tokens_across_devices),
    accumulated over micro-batches, gradient clipping, optimizer and scheduler step. Returns
    this rank's share of the loss (the ranks' mean is the global token mean) and its tokens."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    groups = micro_batches(batch.size, micro_batch_size)
    total = float(batch.mask.sum().item())
    norm = max(_tokens_per_rank(batch.mask), 1.0)
    loss_sum = 0.0
    for gi, idx in enumerate(groups):
        mb = batch.slice(idx)
        with _no_sync(policy, gi < len(groups) - 1):
            loss, n = policy(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="sft")
            w = float(n) / norm
            _backward(policy, loss * w, last=gi == len(groups) - 1)
        loss_sum += float(loss.detach()) * w
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm, applied = _optimizer_step(policy, params, optimizer, scheduler, max_grad_norm)
    return {"loss": loss_sum, "grad_norm": grad_norm, "tokens": total, "updates_skipped": int(not applied)}


def lr_lambda(kind: str, total_steps: int, warmup_steps: int, final_ratio: float = 0.0):
    """Multiplier schedule for torch.optim.lr_scheduler.LambdaLR."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return final_ratio + (1 - final_ratio) * (1.0 - progress)
        return final_ratio + (1 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
