"""The fused loss on CUDA at the real LM-head shapes (issue 6): accuracy against the fp64
reference in bf16 and fp32, the long-sequence case (131,072 tokens in one call) with
flat memory, linear_logprobs for the old/ref log-prob case with masked/padded rows,
non-contiguous inputs, and a deterministic forward.

Every test is parametrised by a configuration (device, backend, shape). The CUDA ones
are marked `cuda` (skipped without a GPU) and run each backend named in
R1VL_CUDA_BACKENDS (default "triton,torch"); one tiny CPU configuration with
backend="torch" runs the same test body everywhere, so the bodies are checked on CPU.

Tolerances (relative to the largest reference magnitude, as in kernel_cases.py):
  loss and kl: fp32 1e-5, bf16 1e-4 (fp32 accumulation from the same rounded inputs);
  clip ratios: 2 tokens' worth (a ratio within rounding of 1±ε may land on either side:
  the loss is continuous there, the clip counts are not);
  gradients: fp32 1e-3 on CUDA (1e-4 on CPU), bf16 2e-2 (dlogits are rounded to bf16 as
  the tensor-core operand of the gradient GEMMs).

Peak memory of the long-sequence case (N tokens, hidden H, vocabulary V, element size E
of the input dtype), measured as allocator bytes above the live inputs during one
forward+backward that returns dhidden and dweight:
  the outputs themselves            E·(N·H + V·H)
  fp32 accumulators for them        4·(N·H + V·H)     (an implementation may need fewer)
  per-token fp32/int64 vectors      ≤ 128·N           (logp, lse, entropy, dloss/dlogp,
                                                       mask/old/ref copies, row indices)
  vocabulary-tile temporaries       a constant C that does not grow with N
                                    (C = 3 GiB on CUDA: chunked paths keep a few [rows, V]
                                    fp32 blocks of bounded size; 256 MiB on CPU)
  bound(N) = (E + 4)·(N·H + V·H) + 128·N + C
At the 2B head (H=1536, V=151,936), N=131,072, bf16 this is 2.6 GB + 17 MB + 3 GiB ≈ 5.8 GB,
while the [N, V] fp32 logits alone would be 79.7 GB. "Flat" is checked as a slope too:
peak(N) − peak(N/4) ≤ ((E + 4)·H + 128)·(3N/4) + 64 MiB, i.e. no per-token term in V
(materialised logits would add 4·V = 608 KB per token).
"""
from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from kernel_cases import Case, rel_err
from r1vl.kernels import (fused_linear_grpo_loss, linear_logprobs, reference_grpo_loss,
                          reference_linear_logprobs)

HEAD_2B = (1536, 151936)
HEAD_7B = (3584, 152064)
CUDA_BACKENDS = [b for b in os.environ.get("R1VL_CUDA_BACKENDS", "triton,torch").split(",") if b]
GiB, MiB = 2**30, 2**20


def configs(cuda_shapes, cpu_shape):
    """pytest params (device, backend, (N, H, V)): each CUDA backend x shape, marked cuda,
    plus one tiny CPU run of the torch backend."""
    out = []
    for be in CUDA_BACKENDS:
        for n, h, v in cuda_shapes:
            out.append(pytest.param(("cuda", be, (n, h, v)), marks=pytest.mark.cuda,
                                    id=f"cuda-{be}-N{n}-H{h}"))
    n, h, v = cpu_shape
    out.append(pytest.param(("cpu", "torch", (n, h, v)), id=f"cpu-torch-N{n}-H{h}-V{v}"))
    return out


def make_case_on(device, n, h, v, dtype, *, seed=0, seq=512, mask_p=0.9, masked_row=None,
                 near_policy=True) -> Case:
    """Random inputs built on `device`: hidden [B, T, H] (T = min(seq, N/4)) with logits of order one, no bias
    (Qwen2-VL's head has none), some masked tokens, padding ids (-100) in a masked row.
    old/ref are the policy's fp64 log-probs plus noise when `near_policy` (so clipping and
    KL are live), else noise around -log V (for shapes where [N, V] cannot be built)."""
    t = min(seq, max(1, n // 4))          # at least 4 sequences
    b = n // t
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    hidden = (randn(b, t, h) * (2.0 / math.sqrt(h))).to(dtype)
    weight = randn(v, h).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    mask = torch.rand(b, t, generator=g, device=device) < mask_p
    mask[:, 0] = True
    if masked_row is not None:
        mask[masked_row] = False
        targets[masked_row] = -100
    if near_policy:
        with torch.no_grad():
            lp = reference_linear_logprobs(hidden, weight, targets.clamp(min=0)).float()
    else:
        lp = torch.full((b, t), -math.log(v), device=device)
    old = lp + 0.3 * randn(b, t)
    ref = lp + 0.2 * randn(b, t)
    adv = randn(b)
    ris = 0.5 + torch.rand(b, t, generator=g, device=device)
    return Case(hidden, weight, None, targets, mask, adv, old, ref, ris)


def _tols(device, dtype, n_on):
    value = 1e-5 if dtype == torch.float32 else 1e-4
    if dtype == torch.float32:
        grad = 1e-3 if device == "cuda" else 1e-4
    else:
        grad = 2e-2 if device == "cuda" else 1e-2
    return dict(value=value, clip=2.0 / max(1, n_on), grad=grad)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _loss(case, h, w, backend, **kw):
    return fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                  old_logprobs=case.old, ref_logprobs=case.ref, backend=backend, **kw)


# ----------------------------------------------------------------------------- accuracy

ACC_CUDA = [(2048, *HEAD_2B)]
ACC_CPU = (96, 32, 1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cfg", configs(ACC_CUDA, ACC_CPU))
def test_against_fp64_reference(cfg, dtype):
    """Loss, metrics, dhidden and dweight at the 2B head, N=2048 (4 x 512, one sequence
    fully masked with padding ids), vs the fp64 reference on the same device."""
    device, backend, (n, h, v) = cfg
    _compare_with_reference(make_case_on(device, n, h, v, dtype, seed=1, masked_row=1), backend,
                            temperature=0.9, return_entropy=True)


@pytest.mark.parametrize("cfg", configs([(1024, *HEAD_7B)], (64, 48, 1500)))
def test_against_fp64_reference_7b_bf16(cfg):
    """The 7B head in bf16 (the issue's target shape's head)."""
    device, backend, (n, h, v) = cfg
    _compare_with_reference(make_case_on(device, n, h, v, torch.bfloat16, seed=2, masked_row=0),
                            backend)


def _compare_with_reference(case, backend, **kw):
    device, dtype = case.hidden.device.type, case.hidden.dtype
    tol = _tols(device, dtype, int(case.mask.sum()))
    h = case.hidden.detach().clone().requires_grad_()
    w = case.weight.detach().clone().requires_grad_()
    loss, metrics = _loss(case, h, w, backend, **kw)
    dh, dw = torch.autograd.grad(loss, (h, w))
    loss, metrics = float(loss.detach()), {k: float(x) for k, x in metrics.items()}
    del h, w
    h64 = case.hidden.detach().double().requires_grad_()
    w64 = case.weight.detach().double().requires_grad_()
    rloss, rmetrics = reference_grpo_loss(h64, w64, case.targets, case.mask, case.advantages,
                                          old_logprobs=case.old, ref_logprobs=case.ref, **kw)
    rdh, rdw = torch.autograd.grad(rloss, (h64, w64))
    rloss = float(rloss.detach())
    rmetrics = {k: float(x) for k, x in rmetrics.items()}
    del h64, w64
    _free()
    assert math.isfinite(loss)
    assert abs(loss - rloss) <= tol["value"] * max(1.0, abs(rloss)), (loss, rloss)
    assert set(metrics) == set(rmetrics)
    for k, rv in rmetrics.items():
        t = tol["clip"] if k.startswith("clip_ratio") else tol["value"]
        assert abs(metrics[k] - rv) <= t * max(1.0, abs(rv)), (k, metrics[k], rv)
    for name, gr, rg in (("dhidden", dh, rdh), ("dweight", dw, rdw)):
        assert gr.dtype == dtype and gr.shape == rg.shape, name
        assert torch.isfinite(gr).all(), name
        e = rel_err(gr, rg)
        assert e <= tol["grad"], (name, e)
    # masked tokens (the whole padded sequence included) get no gradient
    off = ~case.mask
    assert dh[off].abs().max() == 0 if off.any() else True


# ----------------------------------------------------------------------------- long sequences

def _peak_extra_bytes(fn, device):
    """(peak allocator bytes above those live before fn() during fn(), fn's result).
    CUDA: the caching allocator's peak statistic; CPU: torch.profiler's alloc/free
    events summed in time order."""
    _free()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out


def memory_bound(n, h, v, elem, const):
    """The documented bound (module docstring) on the peak extra bytes at N=n."""
    return (elem + 4) * (n * h + v * h) + 128 * n + const


LONG_CUDA = [(131072, *HEAD_2B)]
LONG_CPU = (65536, 32, 1000)


@pytest.mark.parametrize("cfg", configs(LONG_CUDA, LONG_CPU))
def test_long_sequence_flat_memory(cfg):
    """One forward+backward over N tokens in a single call (N=131,072 at the 2B head in
    bf16 on CUDA): no launch-grid failure, finite loss and gradients, log-probs of the
    first and last rows right, and peak memory under the bound and flat in N."""
    device, backend, (n, h, v) = cfg
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    const = 3 * GiB if device == "cuda" else 256 * MiB
    peaks = {}
    for count in (n // 4, n):
        case = make_case_on(device, count, h, v, dtype, seed=3, seq=1024, mask_p=1.0,
                            near_policy=False)
        hid = case.hidden.detach().requires_grad_()
        wt = case.weight.detach().requires_grad_()

        def step():
            loss, metrics = _loss(case, hid, wt, backend)
            return (loss.detach(),) + torch.autograd.grad(loss, (hid, wt))

        peak, (loss, dh, dw) = _peak_extra_bytes(step, device)
        peaks[count] = peak
        assert torch.isfinite(loss), count
        assert torch.isfinite(dh).all() and torch.isfinite(dw).all(), count
        assert dh.abs().sum() > 0 and dw.abs().sum() > 0, count
        bound = memory_bound(count, h, v, hid.element_size(), const)
        assert peak <= bound, (count, peak / MiB, bound / MiB)
        del dh, dw, loss
        if count == n:
            # the first and last 128 rows against the fp64 reference (indexing past 2^31
            # elements of a [N, V] space, or a grid cut short, would show here)
            h2 = hid.detach().reshape(-1, h)
            t2 = case.targets.reshape(-1)
            with torch.no_grad():
                lp = linear_logprobs(h2, wt.detach(), t2, backend=backend)
                for sl in (slice(0, 128), slice(count - 128, count)):
                    ref = reference_linear_logprobs(h2[sl], wt.detach(), t2[sl])
                    assert rel_err(lp[sl], ref) <= (1e-4 if dtype != torch.float32 else 1e-5), sl
        case = hid = wt = None  # free them: step() holds them only through closure cells
        _free()
    lo, hi = n // 4, n
    per_token = (torch.empty(0, dtype=dtype).element_size() + 4) * h + 128
    slope_bound = per_token * (hi - lo) + 64 * MiB
    assert peaks[hi] - peaks[lo] <= slope_bound, (
        f"peak grew by {(peaks[hi] - peaks[lo]) / MiB:.1f} MiB from N={lo} to N={hi}: "
        f"more than {slope_bound / MiB:.1f} MiB (no per-token term in V allowed)")


# ----------------------------------------------------------------------------- log-probs (old/ref case)

LP_CUDA = [(2048, *HEAD_2B)]
LP_CPU = (96, 32, 1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cfg", configs(LP_CUDA, LP_CPU))
def test_linear_logprobs_no_grad_with_padded_rows(cfg, dtype):
    """Old/ref log-probs under no_grad: a batch whose last sequence is padding (target 0,
    as a trainer passes after masking -100) and scattered padded tokens. Every row matches
    the fp64 reference, the padded rows do not change the others (same values as the
    real rows alone), nothing is saved for backward, and the output is fp32."""
    device, backend, (n, h, v) = cfg
    case = make_case_on(device, n, h, v, dtype, seed=4, masked_row=-1, near_policy=False)
    targets = torch.where(case.mask, case.targets, torch.zeros_like(case.targets))
    with torch.no_grad():
        lp = linear_logprobs(case.hidden, case.weight, targets, backend=backend)
        lp_real = linear_logprobs(case.hidden[:-1], case.weight, targets[:-1], backend=backend)
        ref = reference_linear_logprobs(case.hidden, case.weight, targets)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape and lp.grad_fn is None
    assert torch.isfinite(lp).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert rel_err(lp, ref) <= tol
    assert rel_err(lp[:-1], lp_real) <= 1e-6


# ----------------------------------------------------------------------------- layouts, determinism

NC_CUDA = [(1024, *HEAD_2B)]
NC_CPU = (64, 24, 700)


def _strided(x, dim=-1):
    """A non-contiguous view equal to x: every other element along `dim` of a buffer twice
    as long there (the elements between are poison: NaN, or -7 for integer/bool dtypes)."""
    shape = list(x.shape)
    shape[dim] *= 2
    fill = float("nan") if x.is_floating_point() else (True if x.dtype == torch.bool else -7)
    buf = torch.full(shape, fill, dtype=x.dtype, device=x.device)
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(0, None, 2)
    view = buf[tuple(idx)]
    view.copy_(x)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("cfg", configs(NC_CUDA, NC_CPU))
def test_noncontiguous_inputs(cfg):
    """Strided hidden (inner stride 2), a transposed-storage weight (a [H, V] leaf passed
    as .T), strided targets/mask/advantages/old/ref: same loss and gradients as the
    contiguous call (fp32; backward accumulation order may differ: 1e-5), and the same
    log-probs."""
    device, backend, (n, h, v) = cfg
    case = make_case_on(device, n, h, v, torch.float32, seed=5, masked_row=0, near_policy=False)

    def run(hid, w_leaf, w, tgt, mask, adv, old, ref):
        loss, m = fused_linear_grpo_loss(hid, w, tgt, mask, adv, old_logprobs=old, ref_logprobs=ref,
                                         backend=backend)
        g = torch.autograd.grad(loss, (hid, w_leaf))
        with torch.no_grad():
            lp = linear_logprobs(hid, w, torch.where(mask, tgt, torch.zeros_like(tgt)), backend=backend)
        return loss.detach(), m, g, lp

    hid = case.hidden.detach().clone().requires_grad_()
    w = case.weight.detach().clone().requires_grad_()
    a = run(hid, w, w, case.targets, case.mask, case.advantages, case.old, case.ref)

    hid_nc = _strided(case.hidden.detach()).requires_grad_()
    w_t = case.weight.detach().T.contiguous().requires_grad_()     # [H, V] storage
    w_nc = w_t.T
    assert not w_nc.is_contiguous() and not hid_nc.is_contiguous()
    b = run(hid_nc, w_t, w_nc, _strided(case.targets), _strided(case.mask), _strided(case.advantages, 0),
            _strided(case.old), _strided(case.ref))
    assert abs(float(a[0]) - float(b[0])) <= 1e-6 * max(1.0, abs(float(a[0])))
    for k in a[1]:
        assert abs(float(a[1][k]) - float(b[1][k])) <= 1e-6, k
    assert rel_err(b[2][0], a[2][0]) <= 1e-5
    assert rel_err(b[2][1].T, a[2][1]) <= 1e-5
    assert b[2][0].shape == hid_nc.shape and b[2][1].shape == w_t.shape
    assert rel_err(b[3], a[3]) <= 1e-6


DET_CUDA = [(2048, *HEAD_2B)]
DET_CPU = (96, 32, 1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cfg", configs(DET_CUDA, DET_CPU))
def test_forward_is_deterministic(cfg, dtype):
    """The same inputs twice give bit-identical forward results: log-probs under no_grad,
    and the fused loss and metrics with gradients enabled (the training call)."""
    device, backend, (n, h, v) = cfg
    case = make_case_on(device, n, h, v, dtype, seed=6, masked_row=1, near_policy=False)
    tgt = torch.where(case.mask, case.targets, torch.zeros_like(case.targets))
    outs = []
    for _ in range(2):
        with torch.no_grad():
            lp = linear_logprobs(case.hidden, case.weight, tgt, backend=backend)
        hid = case.hidden.detach().requires_grad_()
        wt = case.weight.detach().requires_grad_()
        loss, m = _loss(case, hid, wt, backend, return_entropy=True)
        outs.append((lp, loss.detach(), {k: x.detach() for k, x in m.items()}))
        del loss, m, hid, wt
    (lp1, l1, m1), (lp2, l2, m2) = outs
    assert torch.equal(lp1, lp2)
    assert torch.equal(l1, l2)
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
