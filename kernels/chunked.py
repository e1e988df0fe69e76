"""Chunked PyTorch path for the linear log-prob op (the CPU backend).

Same memory bound as the Triton kernels up to one chunk: the (needed) rows are taken
in blocks of up to ROW_BLOCK rows, and for each block the vocabulary is streamed in
chunks of columns, so the largest temporary is one [rows, cols] logits block of
about CHUNK_BYTES, never [N, V]. Per row the forward keeps a running log-sum-exp,
the target logit and (when asked) the running Σ p·z for the entropy, merged across
vocabulary chunks; it saves only two numbers per row. Backward recomputes each
chunk's logits instead of storing them; dhidden is accumulated per row block, and
each vocabulary chunk's dweight / dbias rows are written once per row block (no
full-size fp32 copy of the weight is ever made). Accumulation is fp32 for
fp32/bf16/fp16 inputs, fp64 for fp64 inputs (this path alone accepts them, for
finite-difference checks).

Math (z = (h·Wᵀ + b)/τ, p = softmax(z), logp_t = z_t − lse, H = −Σ p log p):
    ∂logp_t/∂z_j = δ_jt − p_j          ∂H/∂z_j = −p_j (log p_j + H)
so with incoming gradients g (log-prob) and e (entropy) per row
    dz_j = g δ_jt − p_j (g + e (log p_j + H)),   dlogits = dz / τ.

Layout: helpers, then one autograd Function, then the functional wrapper.
"""
from __future__ import annotations

import torch

from .objective import differentiable_once, no_autocast

# Target size of one [rows, cols] logits block, and the most rows taken at once.
CHUNK_BYTES = 32 << 20
ROW_BLOCK = 4096


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) stay fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_sizes(n_rows: int, vocab: int) -> tuple[int, int]:
    rows = max(1, min(n_rows, ROW_BLOCK))
    cols = max(1, min(vocab, CHUNK_BYTES // (4 * rows)))
    return rows, cols


def _row_blocks(n_rows: int, rows: torch.Tensor | None, block: int):
    """Index objects for blocks of the selected rows (all rows when rows is None)."""
    count = n_rows if rows is None else rows.numel()
    for s in range(0, count, block):
        e = min(count, s + block)
        yield slice(s, e) if rows is None else rows[s:e]


def _chunk_logits(h_rows, weight, bias, v0: int, v1: int, inv_t: float):
    """(z, w): z = (h_rows·W[v0:v1]ᵀ + b[v0:v1]) · inv_t in h_rows' (accumulation) dtype,
    and the weight chunk in that dtype (a view when no cast is needed)."""
    w = weight[v0:v1].to(h_rows.dtype)
    z = h_rows @ w.T
    if bias is not None:
        z += bias[v0:v1].to(h_rows.dtype)
    if inv_t != 1.0:
        z *= inv_t
    return z, w


def _target_in_chunk(t, v0: int, v1: int):
    """(column index within the chunk clamped to it, whether the target lies in it)."""
    return (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1), (t >= v0) & (t < v1)


def _forward(hidden, weight, bias, targets, temperature, need_entropy, rows):
    n = hidden.shape[0]
    v = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden)
    logp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if need_entropy else None
    inv_t = 1.0 / temperature
    count = n if rows is None else rows.numel()
    rb, vc = _block_sizes(count, v)
    for r in _row_blocks(n, rows, rb):
        h = hidden[r].to(acc)
        t = targets[r]
        run_lse = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=dev)
        run_pz = torch.zeros_like(run_lse)           # Σ exp(z − run_lse)·z
        z_tgt = torch.zeros_like(run_lse)
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            z, _ = _chunk_logits(h, weight, bias, v0, v1, inv_t)
            col, inside = _target_in_chunk(t, v0, v1)
            z_tgt += torch.where(inside, z.gather(1, col).squeeze(1), 0.0)
            c_lse = torch.logsumexp(z, dim=-1)
            new_lse = torch.logaddexp(run_lse, c_lse)
            if need_entropy:
                z -= c_lse.unsqueeze(1)              # log of the chunk-local softmax
                p = torch.exp(z)
                # Σ p_c·z_raw = Σ p_c·(z + c_lse) = p_c·z + c_lse, as a batched dot product
                c_pz = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).reshape(-1) + c_lse
                run_pz = run_pz * torch.exp(run_lse - new_lse) + c_pz * torch.exp(c_lse - new_lse)
                del p
            run_lse = new_lse
            del z
        logp[r] = z_tgt - run_lse
        lse[r] = run_lse
        if need_entropy:
            ent[r] = run_lse - run_pz
    return logp, lse, ent


def _backward(hidden, weight, bias, targets, lse, ent, g, e, temperature, need):
    """Gradients for (hidden, weight, bias) given per-row grads g (logp) and e (entropy)."""
    need_h, need_w, need_b = need
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden)
    active = torch.zeros(n, dtype=torch.bool, device=dev)
    if g is not None:
        active |= g != 0
    else:
        g = torch.zeros(n, dtype=acc, device=dev)
    if e is not None:
        active |= e != 0
    rows = active.nonzero().squeeze(1)           # rows with no gradient skip the vocab work
    rb, vc = _block_sizes(rows.numel(), v)
    one_block = rows.numel() <= rb

    dh = torch.zeros_like(hidden) if need_h else None
    # dweight: with one row block each chunk's rows are final after one GEMM and are cast
    # straight into the output; with several, accumulate in fp32 first.
    dw = torch.zeros_like(weight) if need_w else None
    dw_acc = None
    if need_w and not one_block:
        dw_acc = dw if weight.dtype == acc else torch.zeros(v, hdim, dtype=acc, device=dev)
    db_acc = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    inv_t = 1.0 / temperature
    for r in _row_blocks(n, rows, rb):
        h = hidden[r].to(acc)
        t = targets[r]
        gr = g[r].to(acc).unsqueeze(1)
        lse_r = lse[r].unsqueeze(1)
        if e is not None:
            er = e[r].to(acc).unsqueeze(1)
            ent_r = ent[r].unsqueeze(1)
        dh_r = torch.zeros_like(h) if need_h else None
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            z, w = _chunk_logits(h, weight, bias, v0, v1, inv_t)
            z -= lse_r                               # log p
            if e is None:
                z.exp_()
                z *= -gr                             # −g p
            else:
                p = torch.exp(z)
                z += ent_r                           # log p + H
                z *= er
                z += gr                              # g + e (log p + H)
                z *= p
                z.neg_()
                del p
            col, inside = _target_in_chunk(t, v0, v1)
            z.scatter_add_(1, col, torch.where(inside.unsqueeze(1), gr, 0.0))   # + g δ_t
            if inv_t != 1.0:
                z *= inv_t                           # dlogits
            if need_h:
                dh_r.addmm_(z, w)
            if need_w:
                if dw_acc is None and weight.dtype == acc:
                    torch.mm(z.T, h, out=dw[v0:v1])
                elif dw_acc is None:
                    dw[v0:v1] = (z.T @ h).to(weight.dtype)
                else:
                    dw_acc[v0:v1].addmm_(z.T, h)
            if need_b:
                db_acc[v0:v1] += z.sum(0)
            del z
        if need_h:
            dh[r] = dh_r.to(hidden.dtype)
    if dw_acc is not None and dw_acc is not dw:
        dw.copy_(dw_acc)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    """logp[N] (and entropy[N]) of targets under softmax((h·Wᵀ+b)/τ), chunked over rows.

    Saves only the inputs and two fp32 numbers per row; backward recomputes logits."""

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
        if g_logp is None and (g_ent is None or ent is None):
            return None, None, None, None, None, None, None
        if ent is None:
            g_ent = None
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with no_autocast(hidden.device):  # backward called under autocast: fp32 logits still
            dh, dw, db = _backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                                   ctx.temperature, need)
        return dh, dw, db, None, None, None, None


def chunked_linear_logprobs(hidden, weight, bias, targets, *, temperature=1.0,
                            return_entropy=False, rows=None):
    """Functional wrapper. hidden [N,H], weight [V,H], bias [V] or None, targets [N] int64;
    `rows` (int64 indices) restricts the work to those rows (others get logp 0).

    Returns (logp [N] fp32, entropy [N] fp32 or None). Without autograd (no_grad, or no
    input requiring grad) it runs the forward alone and saves nothing."""
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not tracked:
        logp, _, ent = _forward(hidden, weight, bias, targets, temperature, return_entropy, rows)
        return logp, ent
    logp, ent = ChunkedLinearLogprobsFunction.apply(
        hidden, weight, bias, targets, rows, float(temperature), bool(return_entropy))
    return logp, (ent if return_entropy else None)
