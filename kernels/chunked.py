"""Chunked PyTorch path for the linear log-prob op (the CPU backend).

Same memory bound as the Triton kernels up to one chunk: rows are processed in
chunks of `rows_per_chunk(V)` rows, so the largest temporary is a [chunk, V] fp32
block (about CHUNK_BYTES), never [N, V]. Forward keeps per row only the fp32
log-sum-exp (and entropy); backward recomputes each chunk's logits instead of
storing them, and accumulates dhidden / dweight / dbias in fp32 (fp64 for fp64 inputs, which this
path alone accepts, for finite-difference checks).

Math (z = (h·Wᵀ + b)/τ, p = softmax(z), logp_t = z_t − lse, H = −Σ p log p):
    ∂logp_t/∂z_j = δ_jt − p_j          ∂H/∂z_j = −p_j (log p_j + H)
so with incoming gradients g (log-prob) and e (entropy) per row
    dz_j = g δ_jt − p_j (g + e (log p_j + H)),   dlogits = dz / τ.

Layout: helpers, then one autograd Function, then the functional wrapper.
"""
from __future__ import annotations

import torch

# Target size of one [chunk, V] fp32 logits block.
CHUNK_BYTES = 32 << 20


def rows_per_chunk(vocab: int) -> int:
    return max(1, min(8192, CHUNK_BYTES // (4 * vocab)))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) stay fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_logits(h_rows, w32, b32, inv_t: float) -> torch.Tensor:
    z = h_rows.to(w32.dtype) @ w32.T
    if b32 is not None:
        z += b32
    if inv_t != 1.0:
        z *= inv_t
    return z


def _row_chunks(n_rows: int, rows: torch.Tensor | None, chunk: int):
    """Yield index objects for chunks of the selected rows (all rows when rows is None)."""
    count = n_rows if rows is None else rows.numel()
    for s in range(0, count, chunk):
        e = min(count, s + chunk)
        yield slice(s, e) if rows is None else rows[s:e]


def _forward(hidden, weight, bias, targets, temperature, need_entropy, rows):
    n = hidden.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden)
    logp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if need_entropy else None
    w32 = weight.to(acc)
    b32 = None if bias is None else bias.to(acc)
    inv_t = 1.0 / temperature
    for r in _row_chunks(n, rows, rows_per_chunk(weight.shape[0])):
        z = _chunk_logits(hidden[r], w32, b32, inv_t)
        l = torch.logsumexp(z, dim=-1)
        logp[r] = z.gather(1, targets[r].unsqueeze(1)).squeeze(1) - l
        lse[r] = l
        if need_entropy:
            z -= l.unsqueeze(1)                      # log p
            p = torch.exp(z)
            # H = -Σ p log p as a batched dot product (no third [chunk, V] temporary)
            ent[r] = -torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
        del z
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

    dh = torch.zeros_like(hidden) if need_h else None
    w32 = weight.to(acc)
    b32 = None if bias is None else bias.to(acc)
    dw32 = torch.zeros(v, hdim, dtype=acc, device=dev) if need_w else None
    db32 = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    inv_t = 1.0 / temperature
    for r in _row_chunks(n, rows, rows_per_chunk(v)):
        h_rows = hidden[r]
        gr = g[r].to(acc).unsqueeze(1)
        z = _chunk_logits(h_rows, w32, b32, inv_t)
        z -= lse[r].unsqueeze(1)                     # log p
        if e is None:
            z.exp_()
            z *= -gr                                 # −g p
        else:
            p = torch.exp(z)
            z += ent[r].unsqueeze(1)                 # log p + H
            z *= e[r].to(acc).unsqueeze(1)
            z += gr                                  # g + e (log p + H)
            z *= p
            z.neg_()
            del p
        z.scatter_add_(1, targets[r].unsqueeze(1), gr)   # + g δ_t
        if inv_t != 1.0:
            z *= inv_t                               # dlogits
        if need_h:
            dh[r] = (z @ w32).to(hidden.dtype)
        if need_w:
            dw32.addmm_(z.T, h_rows.to(acc))
        if need_b:
            db32 += z.sum(0)
        del z
    dw = None if dw32 is None else dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
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
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and (g_ent is None or ent is None):
            return None, None, None, None, None, None, None
        if ent is None:
            g_ent = None
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
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
