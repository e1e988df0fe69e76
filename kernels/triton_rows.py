"""Row-wise Triton kernels over a materialised logits chunk (the one-pass path on CUDA).

onepass.py computes a chunk of raw logits y = h_c·Wᵀ [C, V] in fp32 with one GEMM,
and needs, per row, the log-sum-exp, the target's log-prob and the entropy of
z = (y + b)·inv_t, then dlogits = g·(onehot − softmax(z))·inv_t as the operand of the
two gradient GEMMs. In PyTorch that is about ten passes over the chunk (scale, bias,
logsumexp, subtract, exp, multiply, scatter, scale, cast); these two kernels do it in
two reads of the chunk and one low-precision write:

  _row_stats_kernel  one program per row: one read of y; per-lane online max/sum
                     (and Σ p·z for the entropy), folded across lanes at the end;
                     the target's logit is one scalar load. Writes lse, logp, entropy.
  _row_grad_kernel   one program per row: one read of y, one write of dlogits in the
                     GEMM operand's dtype (bf16/fp16 on CUDA, fp32 otherwise).

Bias and temperature are applied on the fly, so the GEMM writes raw y. All arithmetic
is fp32 (loads are converted before use, which the interpreter also needs).
"""
from __future__ import annotations

import os
import re

import torch
import triton
import triton.language as tl


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run these kernels here, or None. Before Triton 3.7 the
    interpreter turns a kernel's int argument into a one-element array and calls int() on it,
    which NumPy 2.4 and newer refuse ("only 0-dimensional arrays can be converted to Python
    scalars", triton-lang/triton#9171): every loop bounded by an argument fails."""
    if numpy_version is None:
        try:
            import numpy
        except ImportError:
            return None
        numpy_version = numpy.__version__
    triton_version = triton_version or triton.__version__

    def major_minor(v: str) -> tuple[int, int]:
        m = re.match(r"(\d+)\.(\d+)", v)
        return (int(m[1]), int(m[2])) if m else (0, 0)

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels under "
                f"NumPy {numpy_version} (triton-lang/triton#9171, fixed in Triton 3.7): "
                "pip install 'numpy<2.4', or a newer Triton")
    return None


if os.environ.get("TRITON_INTERPRET") == "1" and (_problem := interpreter_problem()):
    raise ImportError(_problem)  # api: "backend='triton' is unavailable: <this>"


FLOOR = tl.constexpr(-1.0e38)


@triton.jit
def _row_stats_kernel(y_ptr, b_ptr, tgt_ptr, max_ptr, logs_ptr, logp_ptr, ent_ptr, V, stride_y, inv_t,
                      HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = y_ptr + row * stride_y
    # running per-lane max, starting at a finite floor (no −inf − −inf anywhere); padded
    # lanes load the floor too, so they contribute exp(floor − m) = 0
    m_vec = tl.full((BLOCK_V,), FLOOR, dtype=tl.float32)
    s_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)                  # Σ exp(z − m_vec)
    t_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)                  # Σ exp(z − m_vec)·(z − m_vec)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z = tl.where(ok, z * inv_t, FLOOR)
        new_m = tl.maximum(m_vec, z)
        shift = m_vec - new_m                                       # ≤ 0
        scale = tl.exp(shift)
        d = z - new_m
        p = tl.where(ok, tl.exp(d), 0.0)
        if NEED_ENT:
            # entropy relative to the running max (no cancellation for large logits):
            # Σ e^(z−m')(z−m') = scale·(t + (m − m')·s) + p·(z − m')
            t_vec = scale * (t_vec + shift * s_vec) + p * d
        s_vec = s_vec * scale + p
        m_vec = new_m
    m = tl.max(m_vec, axis=0)
    gap = m_vec - m
    w = tl.exp(gap)
    s = tl.sum(s_vec * w, axis=0)
    tgt = tl.load(tgt_ptr + row)
    z_t = tl.load(base + tgt).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + tgt).to(tl.float32)
    # lse = m + log s is kept as two numbers: m + log s rounds at large |z|, and the
    # gradient kernel's (z − m) − log s then stays exact where p matters
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, tl.log(s))
    tl.store(logp_ptr + row, (z_t * inv_t - m) - tl.log(s))    # no cancellation at large |z|
    if NEED_ENT:
        # H = lse − Σ p·z = log s − Σ e^(z−m)(z−m) / s
        t = tl.sum(w * (t_vec + gap * s_vec), axis=0)
        tl.store(ent_ptr + row, tl.log(s) - t / s)


@triton.jit
def _row_grad_kernel(y_ptr, b_ptr, tgt_ptr, max_ptr, logs_ptr, g_ptr, dz_ptr, V, stride_y, stride_dz, inv_t,
                     HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(max_ptr + row)
    logs = tl.load(logs_ptr + row)
    g = tl.load(g_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(y_ptr + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(tl.where(ok, (z * inv_t - m) - logs, float("-inf")))
        dz = (tl.where(offs == tgt, g, 0.0) - g * p) * inv_t
        tl.store(dz_ptr + row * stride_dz + offs, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _block_v(vocab: int, interpret: bool) -> int:
    # the interpreter's cost is programs × iterations: one wide block; on GPU 4 KiB of
    # fp32 per iteration per program (tuned in bench/NOTES.md)
    hi = 1 << 16 if interpret else 2048
    return max(16, min(hi, triton.next_power_of_2(vocab)))


def _unit_stride(y: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """The kernels index targets[row], bias[col] and y[row, col] with unit steps (y's rows
    may be apart): a strided view (targets[:, ::2], a column of a [V, 2] buffer, every
    target unmasked so that nothing made a copy) is copied, else it would be misread."""
    if y.stride(1) != 1:
        y = y.contiguous()
    return y, None if bias is None else bias.contiguous(), targets.contiguous()


def row_stats(y: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, inv_t: float,
              need_entropy: bool):
    """((max, log s), logp, entropy or None), each [C] fp32, of z = (y + b)·inv_t for
    y [C, V] fp32 (row stride may exceed V), targets [C] int64 in [0, V).
    lse = max + log s; the pair is what row_grad takes."""
    c, v = y.shape
    dev = y.device
    y, bias, targets = _unit_stride(y, bias, targets)
    mx = torch.empty(c, dtype=torch.float32, device=dev)
    logs = torch.empty_like(mx)
    logp = torch.empty_like(mx)
    ent = torch.empty_like(mx) if need_entropy else None
    if c == 0:
        return (mx, logs), logp, ent
    _row_stats_kernel[(c,)](
        y, bias if bias is not None else y, targets, mx, logs, logp, ent if ent is not None else mx,
        v, y.stride(0), float(inv_t), HAS_BIAS=bias is not None, NEED_ENT=need_entropy,
        BLOCK_V=_block_v(v, dev.type != "cuda"))
    return (mx, logs), logp, ent


def row_grad(y: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: tuple,
             g: torch.Tensor, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """out[C, V] = g·(onehot(target) − softmax(z))·inv_t with z = (y + b)·inv_t, written in
    out's dtype; lse = row_stats' (max, log s) pair, g [C] fp32 (dloss/dlogp per row)."""
    c, v = y.shape
    if c == 0:
        return out
    mx, logs = lse
    y, bias, targets = _unit_stride(y, bias, targets)
    assert out.stride(1) == 1, "row_grad writes rows of unit column stride"
    _row_grad_kernel[(c,)](
        y, bias if bias is not None else y, targets, mx, logs, g.to(torch.float32).contiguous(), out,
        v, y.stride(0), out.stride(0), float(inv_t), HAS_BIAS=bias is not None,
        BLOCK_V=_block_v(v, y.device.type != "cuda"))
    return out
