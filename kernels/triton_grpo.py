"""Triton kernels for the linear log-prob op behind the fused GRPO loss.

    z = (h·Wᵀ + b) / τ          (never stored: streamed in [BLOCK_M, BLOCK_V] tiles)
    logp = z[target] − lse(z),  H = lse − Σ softmax(z)·z

Forward (`_logprob_fwd_kernel`): a 1-D grid over blocks of BLOCK_M rows (only the
rows that are needed: masked-out tokens are left out of the row list). Each program
streams the vocabulary in BLOCK_V tiles, computing each logits tile with tl.dot over
BLOCK_K slices of the hidden size, and keeps per row, in fp32, an online
log-sum-exp (running max m and scaled sum s), the target logit and, when asked, the
running Σ exp(z−m)·z for the entropy. Writes three fp32 numbers per row.

Backward (`_logprob_bwd_kernel`): the same grid over the rows that carry gradient
(rows with zero incoming gradient skip all vocabulary work). Each program recomputes
its logits tiles, forms dz = g·(onehot − p) − e·p·(log p + H), scaled by 1/τ, and
  - adds dz·W_tile into its own rows of an fp32 dhidden buffer (no other program
    touches those rows, so plain loads/stores),
  - adds dzᵀ·h into an fp32 dweight buffer and Σ_rows dz into an fp32 dbias buffer
    with atomic adds (rows blocks share vocabulary columns).
Gradients are accumulated in fp32 and cast to the parameters' dtypes at the end.
Tied embeddings need nothing special: the op returns dweight to autograd, which
adds it to the embedding's gradient.

The GRPO maths on top (ratio, clip, KL, aggregation: O(tokens) work, no [N, V]
buffer) is objective.py, shared with the chunked path.

Interpreter (CPU, TRITON_INTERPRET=1 set before this module is imported): the
interpreter's bf16/fp16 arithmetic is unreliable, so with UPCAST every loaded tile
is converted to fp32 before any arithmetic; on GPU, half-precision tiles feed
tl.dot directly (fp32 accumulator) and fp32 tiles use IEEE fp32 dots.

Layout: kernels, then the autograd Function that launches them, then the
functional wrapper.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, m_ok, offs_v, v_ok, D, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows]·W[offs_v]ᵀ + b[offs_v]) · inv_t as an fp32 [BLOCK_M, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                    mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_t


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, logp_ptr, lse_ptr, ent_ptr,
    n_rows, V, D, stride_h, stride_w, inv_t,
    HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=m_ok, other=0)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)       # Σ exp(z − run_max)
    run_zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)      # Σ exp(z − run_max)·z
    z_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, m_ok, offs_v, v_ok, D, stride_h, stride_w,
                         inv_t, HAS_BIAS, UPCAST, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])                    # 0 in padded columns
        run_sum = run_sum * scale + tl.sum(p, axis=1)
        if NEED_ENT:
            run_zsum = run_zsum * scale + tl.sum(p * tl.where(v_ok[None, :], z, 0.0), axis=1)
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(logp_ptr + rows, z_tgt - lse, mask=m_ok)
    tl.store(lse_ptr + rows, lse, mask=m_ok)
    if NEED_ENT:
        tl.store(ent_ptr + rows, lse - run_zsum / run_sum, mask=m_ok)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
    dh_ptr, dw_ptr, db_ptr,
    n_rows, V, D, stride_h, stride_w, inv_t,
    HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=m_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=m_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=m_ok, other=0.0)
    if HAS_ENT_GRAD:
        ge = tl.load(ge_ptr + rows, mask=m_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=m_ok, other=0.0)

    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, m_ok, offs_v, v_ok, D, stride_h, stride_w,
                         inv_t, HAS_BIAS, UPCAST, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
        valid = m_ok[:, None] & v_ok[None, :]
        logp = tl.where(valid, z - lse[:, None], 0.0)
        p = tl.where(valid, tl.exp(logp), 0.0)
        if HAS_ENT_GRAD:
            dz = -p * (g[:, None] + ge[:, None] * (logp + ent[:, None]))
        else:
            dz = -p * g[:, None]
        dz += tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0)
        dz = tl.where(valid, dz * inv_t, 0.0)              # dlogits, fp32
        if NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok)
        if UPCAST or IEEE:
            dz_op = dz
        else:
            dz_op = dz.to(w_ptr.dtype.element_ty)         # tensor-core operand; fp32 accumulate
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D
            if NEED_DH:
                w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                            mask=v_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh_ptrs = dh_ptr + rows[:, None] * D + offs_k[None, :]
                dh_mask = m_ok[:, None] & k_ok[None, :]
                if IEEE:
                    part = tl.dot(dz_op, w, input_precision="ieee")
                else:
                    part = tl.dot(dz_op, w)
                # this program owns these rows: a plain read-modify-write is race-free
                tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dh_mask, other=0.0) + part, mask=dh_mask)
            if NEED_DW:
                h = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                if IEEE:
                    part_w = tl.dot(tl.trans(dz_op), h, input_precision="ieee")
                else:
                    part_w = tl.dot(tl.trans(dz_op), h)
                tl.atomic_add(dw_ptr + offs_v[:, None] * D + offs_k[None, :], part_w,
                              mask=v_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- launch

def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _config(n_rows: int, vocab: int, hdim: int, interpret: bool) -> dict:
    if interpret:
        # the interpreter's cost is programs × loop iterations: few, large blocks
        return dict(BLOCK_M=_pow2(n_rows, 16, 64), BLOCK_V=_pow2(vocab, 16, 512),
                    BLOCK_K=_pow2(hdim, 16, 64))
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2)


def _flags(hidden: torch.Tensor) -> dict:
    interpret = hidden.device.type != "cuda"
    return dict(UPCAST=interpret, IEEE=(not interpret) and hidden.dtype == torch.float32)


def _forward(hidden, weight, bias, targets, temperature, need_entropy, rows):
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n, dtype=torch.float32, device=dev) if need_entropy else None
    if rows is None:
        rows = torch.arange(n, device=dev)
    n_act = rows.numel()
    if n_act == 0:
        return logp, lse, ent
    cfg = _config(n_act, v, d, INTERPRET)
    grid = (triton.cdiv(n_act, cfg["BLOCK_M"]),)
    _logprob_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, rows,
        logp, lse, ent if ent is not None else lse,
        n_act, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, NEED_ENT=need_entropy, **_flags(hidden), **cfg,
    )
    return logp, lse, ent


def _backward(hidden, weight, bias, targets, lse, ent, g, e, temperature, need):
    need_h, need_w, need_b = need
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    active = torch.zeros(n, dtype=torch.bool, device=dev)
    if g is not None:
        active |= g != 0
    else:
        g = torch.zeros(n, dtype=torch.float32, device=dev)
    if e is not None:
        active |= e != 0
    rows = active.nonzero().squeeze(1)              # rows with no gradient skip the vocab work
    dh32 = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_h else None
    dw32 = torch.zeros(v, d, dtype=torch.float32, device=dev) if need_w else None
    db32 = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    n_act = rows.numel()
    if n_act > 0:
        cfg = _config(n_act, v, d, INTERPRET)
        grid = (triton.cdiv(n_act, cfg["BLOCK_M"]),)
        dummy = lse
        _logprob_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, rows, lse,
            ent if e is not None else dummy, g.to(torch.float32).contiguous(),
            e.to(torch.float32).contiguous() if e is not None else dummy,
            dh32 if need_h else dummy, dw32 if need_w else dummy, db32 if need_b else dummy,
            n_act, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_ENT_GRAD=e is not None,
            NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, **_flags(hidden), **cfg,
        )
    dh = None if dh32 is None else dh32.to(hidden.dtype)
    dw = None if dw32 is None else dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return dh, dw, db


class TritonLinearLogprobsFunction(torch.autograd.Function):
    """logp[N] (and entropy[N]) via the streaming Triton kernels; saves the inputs and
    two fp32 numbers per row, and recomputes the logits tiles in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, temperature, need_entropy):
        logp, lse, ent = _forward(hidden, weight, bias, targets, temperature, need_entropy, rows)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = logp.new_zeros(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        dh, dw, db = _backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                               ctx.temperature, need)
        return dh, dw, db, None, None, None, None


def triton_linear_logprobs(hidden, weight, bias, targets, *, temperature=1.0,
                           return_entropy=False, rows=None):
    """Functional wrapper (same contract as chunked.chunked_linear_logprobs).

    hidden [N,H], weight [V,H], bias [V] or None, targets [N] int64, rows: optional int64
    indices of the rows to compute (others get logp 0). Returns (logp, entropy or None),
    fp32. Without autograd it runs the forward kernel alone and saves nothing."""
    if hidden.device.type != "cuda" and not INTERPRET:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "r1vl.kernels.triton_grpo is first imported")
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    targets = targets.contiguous()
    if rows is not None:
        rows = rows.contiguous()
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not tracked:
        logp, _, ent = _forward(hidden, weight, bias, targets, temperature, return_entropy, rows)
        return logp, ent
    logp, ent = TritonLinearLogprobsFunction.apply(
        hidden, weight, bias, targets, rows, float(temperature), bool(return_entropy))
    return logp, (ent if return_entropy else None)
