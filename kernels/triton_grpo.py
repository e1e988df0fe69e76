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

The GRPO maths on top (`_grpo_objective_kernel`: ratio, clip, KL, aggregation and
metrics, O(tokens) work, no [N, V] buffer) is one more launch with one program per
sequence; it computes dloss/dlogp in its forward, so its backward is a scale, and
feeds that per-token gradient to the log-prob backward above. objective.py is the
same maths in plain PyTorch for the chunked path.

Interpreter (CPU, TRITON_INTERPRET=1 set before this module is imported): the
interpreter's bf16/fp16 arithmetic is unreliable, so with UPCAST every loaded tile
is converted to fp32 before any arithmetic. On GPU, bf16 tiles feed tl.dot directly
(fp32 accumulator), fp16 tiles are upcast (TF32 dots: fp16 dlogits would underflow)
and fp32 tiles use IEEE fp32 dots (see `_flags`).

Layout: kernels, then the autograd Functions that launch them, each followed by
its functional wrapper.
"""
from __future__ import annotations

import importlib
import os

import torch
import triton
import triton.language as tl

from .objective import differentiable_once, no_autocast

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# an interpreter that cannot run these kernels either: triton_rows' import raises an ImportError
# naming the fix (triton_rows.interpreter_problem), which api turns into "backend='triton' is
# unavailable: ..."
importlib.import_module(".triton_rows", __package__)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, m_ok, offs_v, v_ok, D, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows]·W[offs_v]ᵀ + b[offs_v]) · inv_t as an fp32 [BLOCK_M, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        acc = _dot_slice(acc, h_ptr, w_ptr, rows, m_ok, offs_v, v_ok, k0, D, stride_h, stride_w,
                         UPCAST, IEEE, BLOCK_K)
    return _finish_tile(acc, b_ptr, offs_v, v_ok, inv_t, HAS_BIAS)


@triton.jit
def _dot_slice(acc, h_ptr, w_ptr, rows, m_ok, offs_v, v_ok, k0, D, stride_h, stride_w,
               UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + h[rows, k0:k0+BLOCK_K]·W[offs_v, k0:k0+BLOCK_K]ᵀ."""
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
        return tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(h, tl.trans(w), acc)


@triton.jit
def _finish_tile(acc, b_ptr, offs_v, v_ok, inv_t, HAS_BIAS: tl.constexpr):
    """(h·Wᵀ accumulator + b) · inv_t."""
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_t


@triton.jit
def _online_update(z, v_ok, offs_v, tgt, run_max, run_sum, run_t, z_tgt, NEED_ENT: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_V] logits tile into the running per-row max, Σ exp(z − max),
    Σ exp(z − max)·(z − max) and target logit."""
    z = tl.where(v_ok[None, :], z, -1.0e38)
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    shift = run_max - new_max                           # ≤ 0
    scale = tl.exp(shift)
    d = z - new_max[:, None]
    p = tl.where(v_ok[None, :], tl.exp(d), 0.0)
    if NEED_ENT:
        # relative to the running max: no cancellation at large |z|
        run_t = scale * (run_t + shift * run_sum) + tl.sum(p * d, axis=1)
    run_sum = run_sum * scale + tl.sum(p, axis=1)
    hit = (offs_v[None, :] == tgt[:, None]) & v_ok[None, :]
    z_tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    return new_max, run_sum, run_t, z_tgt


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, m_out, s_out, t_out, zt_out,
    n_rows, V, D, stride_h, stride_w, inv_t, v_per_split,
    HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr = False,
):
    """Program (i, j): rows block i × vocabulary split j (columns [j·v_per_split, …)).
    Writes per row, for its split, at [j, row position]: the max m, Σ exp(z − m), the
    entropy partial Σ exp(z − m)·(z − m) and the target's logit (0 when the target lies
    outside the split); `_combine_splits` folds the splits."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=m_ok, other=0)
    v_lo = split * v_per_split
    v_hi = v_lo + v_per_split            # may pass V in the last split: masked below

    # running max from a finite floor: no −inf − −inf, and empty columns add exp(floor − m) = 0
    run_max = tl.full((BLOCK_M,), -1.0e38, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)       # Σ exp(z − run_max)
    run_t = tl.zeros((BLOCK_M,), dtype=tl.float32)         # Σ exp(z − run_max)·(z − run_max)
    z_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if FLAT:
        # one loop over (vocabulary tile, hidden slice) pairs, the softmax update on each
        # tile's last slice: the software pipeline keeps loads in flight across tile
        # boundaries instead of draining and refilling once per vocabulary tile
        n_k = (D + BLOCK_K - 1) // BLOCK_K
        n_it = (v_per_split + BLOCK_V - 1) // BLOCK_V * n_k
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for it in range(0, n_it):
            vi = it // n_k
            ki = it - vi * n_k
            offs_v = (v_lo + vi * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_ok = (offs_v < v_hi) & (offs_v < V)
            acc = _dot_slice(acc, h_ptr, w_ptr, rows, m_ok, offs_v, v_ok, ki * BLOCK_K, D, stride_h,
                             stride_w, UPCAST, IEEE, BLOCK_K)
            if ki == n_k - 1:
                z = _finish_tile(acc, b_ptr, offs_v, v_ok, inv_t, HAS_BIAS)
                run_max, run_sum, run_t, z_tgt = _online_update(
                    z, v_ok, offs_v, tgt, run_max, run_sum, run_t, z_tgt, NEED_ENT)
                acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    else:
        for i0 in range(0, v_per_split, BLOCK_V):     # plain-int bounds (Triton 3.6's interpreter)
            offs_v = (v_lo + i0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_ok = (offs_v < v_hi) & (offs_v < V)
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, m_ok, offs_v, v_ok, D, stride_h, stride_w,
                             inv_t, HAS_BIAS, UPCAST, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
            run_max, run_sum, run_t, z_tgt = _online_update(
                z, v_ok, offs_v, tgt, run_max, run_sum, run_t, z_tgt, NEED_ENT)
    out = split * n_rows + offs_m
    tl.store(m_out + out, run_max, mask=m_ok)
    tl.store(s_out + out, run_sum, mask=m_ok)
    tl.store(zt_out + out, z_tgt, mask=m_ok)
    if NEED_ENT:
        tl.store(t_out + out, run_t, mask=m_ok)


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


@triton.jit
def _grpo_objective_kernel(
    logp_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, ris_ptr, ent_ptr, norm_ptr,
    dlogp_ptr, out_ptr,
    T, beta, lo, hi, inv_b, dmax,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr, HAS_RIS: tl.constexpr,
    HAS_ENT: tl.constexpr, SEQ_LEVEL: tl.constexpr, PER_SEQ_NORM: tl.constexpr,
    KL_IS: tl.constexpr, TOKEN_ADV: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per sequence: the GRPO per-token loss, its masked aggregation and
    dloss/dlogp for every token (written to dlogp_ptr), from [B, T] fp32 inputs.

    out[b] = (loss share, Σ kl·m, Σ low·m, Σ high·m, Σ either·m, Σ entropy·m).
    The loss weight of token t is c·m_t with c = inv_b / max(1, Σ_t m) (grpo,
    PER_SEQ_NORM) or 1 / norm (bnpo, dr_grpo, dapo; norm precomputed on the host side).
    d(−min(rA, clip(r)A))/dr follows torch.minimum/clamp's conventions at ties. KL_IS: the
    KL term is β·KL·r (TRL's use_bias_correction_kl), its gradient through r included. dmax:
    TRL's delta (the unclipped term is min(r, dmax)·A; +inf: none). TOKEN_ADV: advantages
    [B, T], one per token (else [B])."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    if not TOKEN_ADV:
        adv = tl.load(adv_ptr + b)
        adv_neg = tl.where(adv < 0.0, 1.0, 0.0)
        adv_pos = tl.where(adv > 0.0, 1.0, 0.0)

    # pass 1: the sequence's mask count (and its mean log-ratio at sequence level)
    cnt = 0.0
    lr_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < T
        m = tl.load(mask_ptr + base + offs, mask=ok, other=0.0)
        cnt += tl.sum(m, axis=0)
        if SEQ_LEVEL and HAS_OLD:
            lp = tl.load(logp_ptr + base + offs, mask=ok, other=0.0)
            old = tl.load(old_ptr + base + offs, mask=ok, other=0.0)
            lr_sum += tl.sum(tl.where(m != 0, (lp - old) * m, 0.0), axis=0)
    denom = tl.maximum(cnt, 1.0)
    if PER_SEQ_NORM:
        c = inv_b / denom
    else:
        c = 1.0 / tl.load(norm_ptr)
    r_seq = tl.exp(lr_sum / denom)

    # pass 2: per-token loss, metrics, and the token-local part of dloss/dlogp
    acc_loss = 0.0
    acc_kl = 0.0
    acc_low = 0.0
    acc_high = 0.0
    acc_clip = 0.0
    acc_ent = 0.0
    acc_s = 0.0        # Σ m·ris·dpg: the sequence-level ratio's shared gradient factor
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ok = offs < T
        m = tl.load(mask_ptr + base + offs, mask=ok, other=0.0)
        on = m != 0
        lp = tl.load(logp_ptr + base + offs, mask=ok, other=0.0)
        if TOKEN_ADV:
            adv = tl.where(on, tl.load(adv_ptr + base + offs, mask=ok, other=0.0), 0.0)
            adv_neg = tl.where(adv < 0.0, 1.0, 0.0)
            adv_pos = tl.where(adv > 0.0, 1.0, 0.0)
        if SEQ_LEVEL:
            r = tl.zeros((BLOCK_T,), dtype=tl.float32) + r_seq
        elif HAS_OLD:
            old = tl.load(old_ptr + base + offs, mask=ok, other=0.0)
            r = tl.exp(tl.where(on, lp - old, 0.0))
        else:
            r = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
        clipped = tl.minimum(tl.maximum(r, lo), hi)
        pg1 = tl.minimum(r, dmax) * adv
        pg2 = clipped * adv
        inside = tl.where(r >= lo, 1.0, 0.0) * tl.where(r <= hi, 1.0, 0.0)
        below = tl.where(r <= dmax, 1.0, 0.0)  # min(r, dmax) passes the gradient (clamp's convention)
        dpg = tl.where(pg1 < pg2, -adv * below,
                       tl.where(pg1 > pg2, -adv * inside, -adv * (below + inside) * 0.5))
        loss_tok = -tl.minimum(pg1, pg2)
        if HAS_RIS:
            ris = tl.where(on, tl.load(ris_ptr + base + offs, mask=ok, other=0.0), 0.0)
            loss_tok = loss_tok * ris
            dpg = dpg * ris
        if SEQ_LEVEL:
            acc_s += tl.sum(tl.where(on, m * dpg, 0.0), axis=0)
            dtok = tl.zeros((BLOCK_T,), dtype=tl.float32)
        else:
            dtok = dpg * r
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=ok, other=0.0)
            d = tl.where(on, ref - lp, 0.0)
            kl = tl.exp(d) - d - 1.0
            if KL_IS:
                # β·KL·r: ∂/∂logp = β(1 − e^d)·r + β·KL·∂r/∂logp; ∂r/∂logp = r at token level,
                # at sequence level the shared r_seq·m_t/Σm part goes through acc_s (pass 3)
                if USE_KL:
                    loss_tok += beta * kl * r
                    dtok += beta * (1.0 - tl.exp(d)) * r
                    if SEQ_LEVEL:
                        acc_s += tl.sum(tl.where(on, m * beta * kl, 0.0), axis=0)
                    else:
                        dtok += beta * kl * r
                kl = kl * r
            elif USE_KL:
                loss_tok += beta * kl
                dtok += beta * (1.0 - tl.exp(d))
            acc_kl += tl.sum(tl.where(on, kl * m, 0.0), axis=0)
        acc_loss += tl.sum(tl.where(on, loss_tok * m, 0.0), axis=0)
        low = tl.where(r < lo, adv_neg, 0.0)
        high = tl.where(r > hi, adv_pos, 0.0)
        acc_low += tl.sum(tl.where(on, low * m, 0.0), axis=0)
        acc_high += tl.sum(tl.where(on, high * m, 0.0), axis=0)
        acc_clip += tl.sum(tl.where(on, tl.maximum(low, high) * m, 0.0), axis=0)
        if HAS_ENT:
            ent = tl.load(ent_ptr + base + offs, mask=ok, other=0.0)
            acc_ent += tl.sum(tl.where(on, ent * m, 0.0), axis=0)
        tl.store(dlogp_ptr + base + offs, tl.where(on, c * m * dtok, 0.0), mask=ok)

    if SEQ_LEVEL:
        # pass 3: r_seq = exp(Σ m(logp − old) / max(1, Σ m)) ⇒ ∂r_seq/∂logp_t = r_seq·m_t / max(1, Σ m)
        shared = c * acc_s * r_seq / denom
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < T
            m = tl.load(mask_ptr + base + offs, mask=ok, other=0.0)
            dl = tl.load(dlogp_ptr + base + offs, mask=ok, other=0.0)
            tl.store(dlogp_ptr + base + offs, dl + tl.where(m != 0, shared * m, 0.0), mask=ok)

    tl.store(out_ptr + b * 6 + 0, acc_loss * c)
    tl.store(out_ptr + b * 6 + 1, acc_kl)
    tl.store(out_ptr + b * 6 + 2, acc_low)
    tl.store(out_ptr + b * 6 + 3, acc_high)
    tl.store(out_ptr + b * 6 + 4, acc_clip)
    tl.store(out_ptr + b * 6 + 5, acc_ent)


# ----------------------------------------------------------------------------- launch

def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _config(n_rows: int, vocab: int, hdim: int, interpret: bool) -> dict:
    if interpret:
        # the interpreter's cost is programs × loop iterations: few, large blocks
        return dict(BLOCK_M=_pow2(n_rows, 16, 64), BLOCK_V=_pow2(vocab, 16, 512),
                    BLOCK_K=_pow2(hdim, 16, 64))
    bm, bv, bk, w, st = _BWD_CONFIGS[0]
    return dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=w, num_stages=st)


def _flags(hidden: torch.Tensor) -> dict:
    """UPCAST: convert tiles to fp32 before any arithmetic (always in the interpreter; for
    fp16 on GPU too, where dlogits of order 1e-9 would underflow as fp16 GEMM operands —
    fp32 tiles then use TF32 dots). IEEE: exact fp32 dots for fp32 inputs. bf16 on GPU
    feeds bf16 tiles (and bf16-rounded dlogits) to tensor-core dots with fp32 accumulators."""
    interpret = hidden.device.type != "cuda"
    return dict(UPCAST=interpret or hidden.dtype == torch.float16,
                IEEE=(not interpret) and hidden.dtype == torch.float32)


def _splits(n_row_blocks: int, vocab: int, interpret: bool) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split) for the forward grid. Few row
    blocks (short batches) leave SMs idle, so the vocabulary is split until there are
    about 2 programs per SM; each split is a whole number of 256-column tiles (any
    BLOCK_V <= 256 divides it). The interpreter keeps one split (cost = programs)."""
    if interpret:
        return 1, vocab
    target = 2 * _sm_count()
    n = max(1, min(-(-target // max(1, n_row_blocks)), -(-vocab // 2048)))
    per = -(-vocab // n)
    per = -(-per // 256) * 256
    return -(-vocab // per), per


_SM_COUNT: list[int] = []
# The forward's loop shape under the interpreter (tests set both); on the GPU it is an
# autotuned choice (the FLAT entry of each _FWD_CONFIGS row).
INTERPRET_FLAT = True


def _sm_count() -> int:
    if not _SM_COUNT:
        _SM_COUNT.append(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return _SM_COUNT[0]


def _combine_splits(m, s, t, zt, need_entropy):
    """Fold [splits, n] partials: lse = M + log Σ s_j e^(m_j − M), logp = Σ zt_j − lse,
    entropy = log S − Σ e^(m_j − M)(t_j + (m_j − M) s_j) / S."""
    mx = m.max(0).values
    gap = m - mx
    w = torch.exp(gap)
    tot = (s * w).sum(0)
    log_s = torch.log(tot)
    logp = (zt.sum(0) - mx) - log_s
    lse = mx + log_s
    ent = None
    if need_entropy:
        ent = log_s - (w * (t + gap * s)).sum(0) / tot
    return logp, lse, ent


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
    if INTERPRET:
        cfg = {"FLAT": INTERPRET_FLAT, **_config(n_act, v, d, INTERPRET)}
        kernel, bm = _logprob_fwd_kernel, cfg["BLOCK_M"]
    else:
        # autotuned over _FWD_CONFIGS, keyed on (V, D, split width, dtype); the split count is planned
        # for BLOCK_M = 64, the table's smallest (a tuned 128 halves the row blocks, so
        # about one program per SM instead of two)
        cfg, kernel, bm = {}, _fwd_tuned(), 64
    n_split, per = _splits(triton.cdiv(n_act, bm), v, INTERPRET)
    part = torch.empty(4, n_split, n_act, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(n_act, meta["BLOCK_M"]), n_split)  # noqa: E731
    kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, rows,
        part[0], part[1], part[2], part[3],
        n_act, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature, per,
        HAS_BIAS=bias is not None, NEED_ENT=need_entropy, **_flags(hidden), **cfg,
    )
    lp_a, lse_a, ent_a = _combine_splits(part[0], part[1], part[2], part[3], need_entropy)
    logp[rows] = lp_a
    lse[rows] = lse_a
    if need_entropy:
        ent[rows] = ent_a
    return logp, lse, ent


# Forward configs tried on the GPU (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages, FLAT); results
# are cached per (V, D, vocabulary split, dtype) in-process and, where this Triton supports it,
# on disk.
_FWD_CONFIGS = [(bm, bv, bk, w, st, flat)
                for flat in (True, False)
                for bm, bv, bk, w, st in [(64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
                                          (128, 128, 128, 8, 3), (64, 128, 128, 4, 3)]]
# (128, 256, 64, 8, 3) left the table: it spills under both loop shapes (bench/NOTES.md,
# compile report)
_FWD_TUNED: list = []
# Backward config on the GPU (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages): `_config` takes the
# first; bench/compile_report.py reports each.
_BWD_CONFIGS = [(64, 128, 64, 8, 2)]


def _fwd_tuned():
    if not _FWD_TUNED:
        import inspect
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, FLAT=flat), num_warps=w,
                                 num_stages=st)
                   for bm, bv, bk, w, st, flat in _FWD_CONFIGS]
        kw = {}
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            kw["cache_results"] = True
        # v_per_split in the key: the split count follows the number of row blocks, so a choice
        # tuned on a short batch (many splits, small programs) is not reused for a long one
        _FWD_TUNED.append(triton.autotune(configs=configs, key=["V", "D", "v_per_split", "UPCAST", "IEEE"],
                                          **kw)(_logprob_fwd_kernel))
    return _FWD_TUNED[0]


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
    @differentiable_once
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with no_autocast(hidden.device):
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


class TritonGRPOObjectiveFunction(torch.autograd.Function):
    """The GRPO objective on per-token log-probs in one Triton launch. Forward also
    computes dloss/dlogp (one fp32 per token), so backward is a scale."""

    @staticmethod
    def forward(ctx, logp, mask, advantages, old, ref, ris, entropy, norm, beta, lo, hi,
                seq_level, per_seq_norm, kl_is=False, dmax=float("inf")):
        token_adv = advantages.dim() == 2
        bsz, t = logp.shape
        dlogp = torch.empty_like(logp)
        out = torch.empty(bsz, 6, dtype=torch.float32, device=logp.device)
        dummy = logp
        _grpo_objective_kernel[(bsz,)](
            logp, mask, advantages,
            old if old is not None else dummy, ref if ref is not None else dummy,
            ris if ris is not None else dummy, entropy if entropy is not None else dummy,
            norm, dlogp, out, t, beta, lo, hi, 1.0 / max(1, bsz), dmax,
            HAS_OLD=old is not None, HAS_REF=ref is not None, USE_KL=ref is not None and beta != 0.0,
            HAS_RIS=ris is not None, HAS_ENT=entropy is not None, SEQ_LEVEL=seq_level,
            PER_SEQ_NORM=per_seq_norm, KL_IS=bool(kl_is), TOKEN_ADV=token_adv,
            BLOCK_T=_pow2(t, 16, 1024),
        )
        sums = out.sum(0)
        ctx.save_for_backward(dlogp)
        stats = sums[1:] / mask.sum().clamp(min=1.0)
        if seq_level and not token_adv:
            # out[b, 2:5] = flag_b · Σ_t m: the clip ratios are the share of sequences
            # (with [B, T] advantages the flags vary along a sequence: the share of tokens, as TRL)
            cnt = mask.sum(-1, keepdim=True)
            flags = torch.where(cnt > 0, out[:, 2:5] / torch.where(cnt > 0, cnt, 1.0), 0.0)
            stats = torch.cat([stats[:1], flags.sum(0) / max(1, bsz), stats[4:]])
        ctx.mark_non_differentiable(stats)
        return sums[0].clone(), stats  # not a view: the caller may scale the loss in place (loss /= k)

    @staticmethod
    @differentiable_once
    def backward(ctx, g_loss, _g_stats):
        (dlogp,) = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 15
        return (dlogp * g_loss,) + (None,) * 14


def triton_grpo_objective(logp, mask, advantages, *, old_logprobs, ref_logprobs, rollout_is_ratio,
                          beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level,
                          max_completion_length, num_items_in_batch, entropy=None,
                          use_bias_correction_kl=False, delta=None):
    """Same contract as objective.grpo_objective (validated arguments; old/ref/ris and
    advantages are constants). Returns (0-dim loss, metrics dict of 0-dim fp32 tensors)."""
    f32 = dict(dtype=torch.float32)

    def prep(x):
        return None if x is None else x.detach().to(**f32).contiguous()

    m = mask.to(**f32).contiguous()
    if loss_type == "grpo":
        norm = torch.ones(1, device=logp.device, **f32)                 # unused
    elif loss_type == "dr_grpo":
        norm = torch.full((1,), float(max(1, logp.shape[0]) * max_completion_length), device=logp.device, **f32)
    elif loss_type == "dapo" and num_items_in_batch is not None:
        norm = torch.as_tensor(num_items_in_batch, device=logp.device, **f32).reshape(1)
    else:                                                               # bnpo, dapo default
        norm = m.sum().clamp(min=1.0).reshape(1)
    loss, stats = TritonGRPOObjectiveFunction.apply(
        logp.contiguous(), m, prep(advantages), prep(old_logprobs), prep(ref_logprobs),
        prep(rollout_is_ratio), prep(entropy), norm, float(beta), 1.0 - float(epsilon_low),
        1.0 + float(epsilon_high), importance_sampling_level == "sequence", loss_type == "grpo",
        bool(use_bias_correction_kl), float("inf") if delta is None else float(delta))
    metrics = {"kl": stats[0], "clip_ratio_low": stats[1], "clip_ratio_high": stats[2],
               "clip_ratio": stats[3]}
    if entropy is not None:
        metrics["entropy"] = stats[4]
    return loss, metrics
