"""Shared inputs and comparisons for the kernel tests (not a test module).

Cases are seeded and realistic: logits of order one, old/ref log-probs near the
policy's (so ratios straddle the clip range), advantages of both signs. Each
comparison runs the op under test on tensors of the case's dtype and the fp64
reference on the *same values* upcast, then compares loss, metrics and gradients.

Tolerances (relative to the largest reference magnitude of each tensor):
  fp32 inputs: loss/metrics 1e-5, log-probs 1e-5, gradients 1e-4
  bf16/fp16 inputs: loss/metrics/log-probs 1e-4 (the op accumulates in fp32 from the
  same rounded inputs), gradients 1e-2 (they are returned in the input dtype:
  bf16 rounding alone is 2^-9 relative).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r1vl.kernels import fused_linear_grpo_loss, reference_grpo_loss, reference_linear_logprobs

TOL = {
    torch.float32: dict(value=1e-5, grad=1e-4),
    torch.bfloat16: dict(value=1e-4, grad=1e-2),
    torch.float16: dict(value=1e-4, grad=1e-2),
    torch.float64: dict(value=1e-10, grad=1e-9),
}


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    ris: torch.Tensor


def make_case(B=3, T=7, H=24, V=53, *, dtype=torch.float32, bias=True, seed=0,
              masked_row=None, mask_p=0.8, scale=2.0) -> Case:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * scale / math.sqrt(H)).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < mask_p
    mask[:, 0] = True
    if masked_row is not None:
        mask[masked_row] = False
        targets[masked_row, :] = -100          # padding ids are never read when masked
    with torch.no_grad():
        lp = reference_linear_logprobs(hidden, weight, targets.clamp(min=0), bias=b).float()
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    ris = 0.5 + torch.rand(B, T, generator=g)
    return Case(hidden, weight, b, targets, mask, adv, old, ref, ris)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def _leaves(case: Case, dtype=None):
    out = []
    for x in (case.hidden, case.weight, case.bias):
        out.append(None if x is None else x.detach().to(dtype or x.dtype).requires_grad_())
    return out


def check_loss(case: Case, backend: str, *, use_old=True, use_ref=True, use_ris=False,
               tol=None, **kw):
    """Fused op on `backend` vs the fp64 reference; asserts and returns the errors."""
    tol = tol or TOL[case.hidden.dtype]
    h, w, b = _leaves(case)
    h64, w64, b64 = _leaves(case, torch.float64)
    extra = dict(old_logprobs=case.old if use_old else None,
                 ref_logprobs=case.ref if use_ref else None,
                 rollout_is_ratio=case.ris if use_ris else None, **kw)
    loss, metrics = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                           bias=b, backend=backend, **extra)
    rloss, rmetrics = reference_grpo_loss(h64, w64, case.targets, case.mask, case.advantages,
                                          bias=b64, **extra)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert set(metrics) == set(rmetrics)
    errs = {"loss": abs(float(loss.detach()) - float(rloss.detach())) / max(1.0, abs(float(rloss.detach())))}
    for k in rmetrics:
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
        errs[k] = abs(float(metrics[k]) - float(rmetrics[k])) / max(1.0, abs(float(rmetrics[k])))
    for k, e in errs.items():
        assert e <= tol["value"], (k, e, errs)
    params = [x for x in (h, w, b) if x is not None]
    params64 = [x for x in (h64, w64, b64) if x is not None]
    grads = torch.autograd.grad(loss, params)
    rgrads = torch.autograd.grad(rloss, params64)
    for name, gr, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert gr.dtype == case.hidden.dtype and gr.shape == rg.shape
        assert torch.isfinite(gr).all(), name
        e = rel_err(gr, rg)
        errs["d" + name] = e
        assert e <= tol["grad"], ("d" + name, e, errs)
    return errs
