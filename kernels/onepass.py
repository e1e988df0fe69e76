"""One-pass GRPO loss from the LM head: loss and gradients in one sweep, three GEMMs.

The two-pass paths (chunked.py, triton_grpo.py) compute log-probs in forward and
recompute every logits tile in backward: four GEMM-sized products per step
(h·Wᵀ twice, dlogits·W, dlogitsᵀ·h). At token-level importance sampling the GRPO
loss is a weighted sum of per-token terms whose weights depend on the mask alone
(objective.token_weights), so dloss/dlogp_t is known as soon as logp_t is, and the
whole gradient can be formed in forward while each chunk's logits are live:

    for each chunk of C needed rows (C·V·4 bytes ≈ CHUNK_BYTES):
        z      = (h_c·Wᵀ + b)/τ                       [C, V] fp32   GEMM 1
        logp_c = z[target] − lse(z);  entropy from the same z (metric)
        g_c    = w_c · ∂per_token/∂logp  (objective.per_token_terms, autograd on [C])
        dz     = g_c·(onehot − softmax(z))/τ          in place over z
        dh_c   = dz·W                                  GEMM 2 (each row once: final)
        dW    += dzᵀ·h_c ;  db += Σ_rows dz           GEMM 3 (fp32 accumulator)

Forward then evaluates the loss and metrics with objective.grpo_objective on the
collected log-probs (the same value as the two-pass path) and saves dh, dW, db;
backward only scales them by the incoming gradient. Memory: one [C, V] fp32 chunk
(plus its low-precision copy for the tensor-core GEMMs on CUDA), dh, and an fp32
dW [V, H] held from forward to backward and scaled in place there (a second
backward through a retained graph recomputes them); never [N, V].

On CUDA with bf16 inputs the GEMMs take bf16 operands and write fp32
(`torch.mm(..., out_dtype=torch.float32)`), so logits are not rounded to bf16;
dlogits are rounded to the input dtype as the operand of GEMMs 2 and 3 (as in the
Triton backward). The per-row softmax work runs in the two Triton row kernels of
triton_rows.py on CUDA (two reads of the chunk, one bf16 write; ROW_KERNELS), in
PyTorch ops elsewhere. On CPU the chunk and the weight are upcast to fp32 (fp64
inputs stay fp64) before any arithmetic.

Used by api.fused_linear_grpo_loss for backend "torch". A sequence-level ratio couples
all tokens of a sequence, so there the chunks hold whole sequences (their log-probs,
hence the ratio and its shared gradient, are complete inside the chunk); when one
sequence's tokens exceed a chunk (sequence_fits), the two-pass path is used.

The chunk budget on CUDA is CHUNK_BYTES_CUDA (256 MiB: 441 rows at the 7B vocabulary);
the environment variable R1VL_ONEPASS_CHUNK_MB (a positive integer, MiB), read each time
a chunk size is chosen, overrides it, so a benchmark can time other sizes in one process
(bench/bench_loss.py --onepass-chunk-mb). Larger chunks cut the fp32 dW read-modify-write
of GEMM 3 (once per chunk) but raise the peak by the chunk and its bf16 copy. Unset or
empty: the default; any other value that is not a positive integer is a ValueError
naming the variable. CPU chunks (CHUNK_BYTES_CPU) ignore it.
"""
from __future__ import annotations

import importlib
import os

import torch

from .objective import (as_token_advantages, differentiable_once, grpo_objective, no_autocast, per_token_terms,
                        token_weights)

# Size of one [rows, V] fp32 logits chunk. On CUDA larger chunks keep the GEMMs
# efficient (M = rows); the chunk and its bf16 copy are the path's only V-wide
# temporaries. Tuned on the GPU (bench/NOTES.md); CPU keeps the chunked path's size.
CHUNK_BYTES_CPU = 32 << 20
CHUNK_BYTES_CUDA = 256 << 20
CHUNK_MB_ENV = "R1VL_ONEPASS_CHUNK_MB"       # overrides CHUNK_BYTES_CUDA when set (MiB)
MAX_ROWS = 16384
SEQUENCE_CHUNK_FACTOR = 4

# Per-row softmax work on the chunk: "auto" = the Triton row kernels (triton_rows.py)
# on CUDA, PyTorch ops elsewhere; "triton" forces the kernels (on CPU only under
# TRITON_INTERPRET=1, for tests); "torch" forces PyTorch ops.
ROW_KERNELS = "auto"

_OUT_DTYPE_OK: dict[str, bool] = {}


def _use_row_kernels(hidden: torch.Tensor) -> bool:
    if hidden.dtype == torch.float64 or ROW_KERNELS == "torch":
        return False
    if ROW_KERNELS == "triton":
        return True
    if hidden.device.type != "cuda":
        return False
    try:
        importlib.import_module(".triton_rows", __package__)  # Triton present and importable
    except ImportError:
        return False
    return True


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _budget(device: torch.device) -> int:
    if device.type != "cuda":
        return CHUNK_BYTES_CPU
    text = os.environ.get(CHUNK_MB_ENV, "").strip()
    mb = None
    if text:
        try:
            mb = int(text)
        except ValueError:
            mb = 0
        if mb < 1:
            raise ValueError(f"{CHUNK_MB_ENV}={os.environ[CHUNK_MB_ENV]!r}: expected a positive integer "
                             "(MiB of one fp32 logits chunk on CUDA), or unset")
    return CHUNK_BYTES_CUDA if mb is None else mb << 20


def _chunk_rows(count: int, vocab: int, device: torch.device) -> int:
    return max(1, min(count, MAX_ROWS, _budget(device) // (4 * vocab)))


def _out_dtype_ok(device: torch.device) -> bool:
    """Whether torch.mm/addmm accept out_dtype=fp32 for half inputs on this device
    (CUDA builds since torch 2.8); checked once per device type with a tiny product."""
    key = device.type
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_OK[key] = bool(acc[0, 0] == 2.0)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


class _Gemms:
    """The three products in the right precision for the inputs' device and dtype.

    half_ops (bf16 on CUDA): operands stay bf16 (tensor cores) with fp32 outputs;
    otherwise operands are upcast to the accumulation dtype first. fp16 is upcast: as an
    fp16 GEMM operand, dlogits of order 1e-9 would underflow (the streaming Triton
    kernels upcast fp16 tiles for the same reason)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.acc = _acc_dtype(hidden)
        self.half_ops = (hidden.device.type == "cuda" and hidden.dtype == torch.bfloat16
                         and _out_dtype_ok(hidden.device))
        self.w = weight if (self.half_ops or weight.dtype == self.acc) else weight.to(self.acc)
        self.row_kernels = _use_row_kernels(hidden)
        if self.row_kernels:
            from . import triton_rows
            self.rowk = triton_rows

    def rows(self, h_c: torch.Tensor) -> torch.Tensor:
        return h_c if self.half_ops else h_c.to(self.acc)

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        if self.half_ops:
            return torch.mm(h_c, self.w.T, out_dtype=torch.float32)
        return h_c @ self.w.T

    def operand(self, dz: torch.Tensor) -> torch.Tensor:
        return dz.to(self.w.dtype) if self.half_ops else dz

    def dhidden(self, dz_op: torch.Tensor) -> torch.Tensor:
        if self.half_ops:
            return torch.mm(dz_op, self.w, out_dtype=torch.float32)
        return dz_op @ self.w

    def add_dweight(self, dw: torch.Tensor, dz_op: torch.Tensor, h_c: torch.Tensor) -> None:
        if self.half_ops:
            torch.addmm(dw, dz_op.T, h_c, out_dtype=torch.float32, out=dw)
        else:
            dw.addmm_(dz_op.T, h_c)


def _dh_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float32 if hidden.dtype == torch.float16 else hidden.dtype


def _same(x):
    return x


def _terms_grad(lp, on, m, adv, old, ref, ris, w, hp, level) -> torch.Tensor:
    """w · ∂per_token/∂logp by autograd on objective.per_token_terms (the same ops as the
    loss value, hence the same tie conventions), for a chunk's log-probs `lp`: a flat
    chunk of unmasked rows at token level, [k, T] whole sequences at sequence level. The
    small graph lives inside this call: identity saved-tensor hooks keep a caller's (non-reentrant
    torch.utils.checkpoint around the loss) out of it, whose unpacking re-ran the whole loss
    function at every chunk (5 sweeps instead of 1 at 4 chunks)."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        lp = lp.detach().requires_grad_()
        per_tok, _, _ = per_token_terms(
            lp, on, m, adv, old_logprobs=old, ref_logprobs=ref, rollout_is_ratio=ris,
            beta=hp["beta"], epsilon_low=hp["epsilon_low"], epsilon_high=hp["epsilon_high"],
            importance_sampling_level=level, use_bias_correction_kl=hp["use_bias_correction_kl"],
            delta=hp["delta"])
        (g,) = torch.autograd.grad((per_tok * w).sum(), lp)
    return g


def _chunk_logprobs(ops, h_c, tgt, bias, b_acc, inv_t, need_ent):
    """One chunk's logits and per-row statistics: (y, lse, logp [C], entropy [C] or None).
    Row kernels: y = raw h_c·Wᵀ (bias and 1/τ are applied in-kernel), lse = (max, log s).
    PyTorch ops: y = log p (overwritten in place), lse [C, 1]."""
    if ops.row_kernels:
        y = ops.logits(h_c)
        lse, logp_c, ent_c = ops.rowk.row_stats(y, bias, tgt, inv_t, need_ent)
        return y, lse, logp_c.to(ops.acc), None if ent_c is None else ent_c.to(ops.acc)
    z = ops.logits(h_c)
    if b_acc is not None:
        z += b_acc
    if inv_t != 1.0:
        z *= inv_t
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logp_c = (z.gather(1, tgt.unsqueeze(1)) - lse).squeeze(1)
    z -= lse                                             # log p
    ent_c = None
    if need_ent:
        p = torch.exp(z)
        ent_c = -torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
    return z, lse, logp_c, ent_c


def gemm_logprobs(hidden, weight, bias, targets, *, temperature=1.0, return_entropy=False,
                  rows=None):
    """Forward-only log-probs (no autograd) through full-row chunks: one GEMM per chunk and
    the row-stats kernel on CUDA. Same contract as chunked.chunked_linear_logprobs without
    gradients: (logp [N], entropy [N] or None), fp32 (fp64 for fp64 inputs)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    ops = _Gemms(hidden, weight)
    logp = torch.zeros(n, dtype=ops.acc, device=hidden.device)
    ent = torch.zeros(n, dtype=ops.acc, device=hidden.device) if return_entropy else None
    b_acc = None if bias is None else bias.to(ops.acc)
    count = n if rows is None else rows.numel()
    step = _chunk_rows(count, v, hidden.device)
    with torch.no_grad():
        for s in range(0, count, step):
            r = slice(s, min(count, s + step)) if rows is None else rows[s:s + step]
            y, _, logp_c, ent_c = _chunk_logprobs(ops, ops.rows(hidden[r]), targets[r], bias, b_acc,
                                                  1.0 / temperature, return_entropy)
            del y
            logp[r] = logp_c
            if return_entropy:
                ent[r] = ent_c
    return logp, ent


def _sequence_chunks(mask, step):
    """Chunks of whole sequences for the sequence-level ratio: [(start, end, (b0, b1))]
    over positions in the list of unmasked rows (row-major, as nonzero() orders them),
    each holding sequences b0..b1-1 and at most `step` rows where a sequence fits;
    a longer sequence gets a chunk of its own (sequence_fits says when that happens)."""
    counts = (mask != 0).sum(1).tolist()
    chunks, b0, start, rows = [], 0, 0, 0
    for b, c in enumerate(counts):
        if rows and rows + c > step:
            chunks.append((start, start + rows, (b0, b)))
            b0, start, rows = b, start + rows, 0
        rows += c
    if rows:
        chunks.append((start, start + rows, (b0, len(counts))))
    return chunks


def sequence_fits(mask, vocab, device) -> bool:
    """Whether the one-pass loss can keep each sequence's logits live at once: a chunk may
    grow past the usual size to hold the longest sequence, up to SEQUENCE_CHUNK_FACTOR ×
    the chunk budget (at 256 MiB on CUDA and the 7B vocabulary: 1,765 tokens). Otherwise
    the sequence-level loss takes the two-pass path."""
    counts = (mask != 0).sum(1)
    longest = int(counts.max()) if counts.numel() else 0
    return longest <= min(MAX_ROWS, max(1, SEQUENCE_CHUNK_FACTOR * _budget(device) // (4 * vocab)))


def _sequence_grad(logp, r, seqs, mask, advantages, old, ref, ris, w, hp):
    """w · ∂per_token/∂logp for the unmasked rows `r` of sequences b0..b1-1 at sequence
    level: their [k, T] log-probs are complete here, so the sequence ratio (and its
    gradient shared by all the sequence's tokens) is exact."""
    b0, b1 = seqs
    t = mask.shape[1]
    acc = logp.dtype
    local = (torch.arange(r.start, r.stop, device=logp.device) if isinstance(r, slice) else r) - b0 * t
    part = lambda x: None if x is None else x.detach()[b0:b1].to(acc)  # noqa: E731
    lp = torch.zeros((b1 - b0) * t, dtype=acc, device=logp.device)
    lp[local] = logp[r]
    m = mask[b0:b1]
    g = _terms_grad(lp.view(b1 - b0, t), m != 0, m.to(acc),
                    as_token_advantages(advantages[b0:b1], acc), part(old), part(ref), part(ris),
                    w[b0:b1], hp, "sequence")
    return g.reshape(-1)[local]


def _sweep(hidden, weight, bias, targets, rows, mask, advantages, old, ref, ris, hp, need):
    """The chunk loop: (logp [N], entropy [N] or None, dh, dW (fp32), db (fp32)); the
    gradients (of the inputs flagged in `need`) are those of Σ per_token·w, unscaled."""
    need_h, need_w, need_b = need
    n, hdim = hidden.shape
    v = weight.shape[0]
    bsz, t = mask.shape
    dev = hidden.device
    ops = _Gemms(hidden, weight)
    acc = ops.acc
    inv_t = 1.0 / hp["temperature"]
    need_ent = hp["return_entropy"]

    flat = lambda x: None if x is None else x.detach().reshape(-1)  # noqa: E731
    w_tok = flat(token_weights(mask, loss_type=hp["loss_type"],
                               max_completion_length=hp["max_completion_length"],
                               num_items_in_batch=hp["num_items_in_batch"], dtype=acc))
    adv_tok = as_token_advantages(advantages, acc).expand(bsz, t).reshape(-1)
    m_tok = mask.detach().to(acc).reshape(-1)
    old_f, ref_f, ris_f = flat(old), flat(ref), flat(ris)

    logp = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if need_ent else None
    # dhidden before backward's scale: in hidden's dtype, except fp16, whose range would
    # underflow the unscaled per-token gradients (bf16 has fp32's exponent range)
    dh = torch.zeros(hidden.shape, dtype=_dh_dtype(hidden), device=dev) if need_h else None
    dw = torch.zeros(v, hdim, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    b_acc = None if bias is None else bias.to(acc)

    count = n if rows is None else rows.numel()
    step = _chunk_rows(count, v, dev)
    seq_level = hp["importance_sampling_level"] == "sequence"
    chunks = _sequence_chunks(mask, step) if seq_level else \
        [(s, min(count, s + step), None) for s in range(0, count, step)]
    need_grad = need_h or need_w or need_b
    buf = None
    if ops.row_kernels and need_grad and chunks:  # no chunk: every row masked out
        buf = torch.empty(min(max(e - s for s, e, _ in chunks), count), v, dtype=ops.w.dtype,
                          device=dev)
    for s, e, seqs in chunks:
        r = slice(s, e) if rows is None else rows[s:e]
        h_c = ops.rows(hidden[r])
        tgt = targets[r]
        y, lse, logp_c, ent_c = _chunk_logprobs(ops, h_c, tgt, bias, b_acc, inv_t, need_ent)
        logp[r] = logp_c
        if need_ent:
            ent[r] = ent_c
        if not need_grad:
            del y
            continue
        if seqs is None:
            # unmasked rows only (all `on`); m weights them when the mask is fractional
            lp_c = logp[r]
            g = _terms_grad(lp_c, torch.ones_like(lp_c, dtype=torch.bool), m_tok[r], adv_tok[r],
                            None if old_f is None else old_f[r].to(acc),
                            None if ref_f is None else ref_f[r].to(acc),
                            None if ris_f is None else ris_f[r].to(acc), w_tok[r], hp, "token")
        else:
            g = _sequence_grad(logp, r, seqs, mask, advantages, old, ref, ris,
                               w_tok.view(bsz, t), hp)
        if ops.row_kernels:
            dz_op = ops.rowk.row_grad(y, bias, tgt, lse, g, inv_t, out=buf[:y.shape[0]])
            del y
            if need_b:
                db += dz_op.to(acc).sum(0)
        else:
            dz = y.exp_()                                # y = log p: p, in place
            dz *= -g.unsqueeze(1)
            dz.scatter_add_(1, tgt.unsqueeze(1), g.unsqueeze(1))   # g·(onehot − p)
            if inv_t != 1.0:
                dz *= inv_t                              # dlogits
            if need_b:
                db += dz.sum(0)
            dz_op = ops.operand(dz)
            del y, dz
        if need_h:
            dh[r] = ops.dhidden(dz_op).to(dh.dtype)
        if need_w:
            ops.add_dweight(dw, dz_op, h_c)
        del dz_op

    return logp, ent, dh, dw, db


class OnePassGRPOLossFunction(torch.autograd.Function):
    """(loss, kl, clip_low, clip_high, clip, entropy) with gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, mask, advantages, old, ref, ris, hp):
        # no gradients formed when the call was made without autograd (no_grad, inference_mode:
        # needs_input_grad only says the inputs require grad)
        on = hp["grad_enabled"]
        need = (on and ctx.needs_input_grad[0], on and ctx.needs_input_grad[1],
                on and bias is not None and ctx.needs_input_grad[2])
        bsz, t = mask.shape
        logp, ent, dh, dw, db = _sweep(hidden, weight, bias, targets, rows, mask, advantages,
                                       old, ref, ris, hp, need)
        loss, metrics = grpo_objective(
            logp.view(bsz, t), mask, advantages, old_logprobs=old, ref_logprobs=ref,
            rollout_is_ratio=ris, beta=hp["beta"], epsilon_low=hp["epsilon_low"],
            epsilon_high=hp["epsilon_high"], loss_type=hp["loss_type"],
            importance_sampling_level=hp["importance_sampling_level"],
            max_completion_length=hp["max_completion_length"],
            num_items_in_batch=hp["num_items_in_batch"],
            entropy=None if ent is None else ent.view(bsz, t),
            use_bias_correction_kl=hp["use_bias_correction_kl"], delta=hp["delta"])
        stats = [metrics[k] for k in ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio")]
        stats.append(metrics["entropy"] if ent is not None else loss.new_zeros(()))
        ctx.mark_non_differentiable(*stats)
        # the gradients ride on ctx (not save_for_backward: backward scales them in place)
        ctx.grads = (dh, dw, db)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, mask, advantages, old, ref, ris)
        ctx.hp, ctx.need = hp, need
        # (kept here: reading ctx.saved_tensors would make a non-reentrant checkpoint recompute)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (loss, *stats)

    @staticmethod
    @differentiable_once
    def backward(ctx, g_loss, *_g_stats):
        # The gradients were formed in forward. The first backward scales them in place and
        # hands them over (no second V×H copy at the peak); a later one through a retained
        # graph (gradcheck, retain_graph=True) recomputes them from the saved inputs.
        none = (None,) * 8
        if g_loss is None:
            return (None, None, None) + none
        if ctx.grads is None:
            saved = ctx.saved_tensors
            with no_autocast(saved[0].device):
                _, _, dh, dw, db = _sweep(*saved, ctx.hp, ctx.need)
        else:
            (dh, dw, db), ctx.grads = ctx.grads, None
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # the scale in fp32: cast to a 16-bit dh it could overflow (fp16 loss scaling: 65536)
        # or be rounded (bf16: 1/3 -> 0.333984, a bias on every element)
        g32 = g_loss.to(torch.promote_types(g_loss.dtype, torch.float32))
        if dh is None:
            out_h = None
        elif dh.dtype == g32.dtype:
            out_h = dh.mul_(g32).to(h_dtype)     # fp32 (fp64) hidden: in place, as dW
        else:
            out_h = (dh.to(g32.dtype) * g32).to(h_dtype)
        out_w = None if dw is None else dw.mul_(g_loss.to(dw.dtype)).to(w_dtype)
        out_b = None if db is None else db.mul_(g_loss.to(db.dtype)).to(b_dtype)
        return (out_h, out_w, out_b) + none


def onepass_grpo_loss(hidden, weight, bias, targets, rows, mask, advantages, *, old_logprobs,
                      ref_logprobs, rollout_is_ratio, beta, epsilon_low, epsilon_high,
                      temperature, loss_type, max_completion_length, num_items_in_batch,
                      return_entropy, importance_sampling_level="token", use_bias_correction_kl=False,
                      delta=None):
    """GRPO loss of validated inputs (api.py); at sequence level only when
    sequence_fits(mask, V, device): hidden [N, H] (N = B·T),
    targets [N] (safe ids at masked rows), rows = indices of the unmasked rows or None
    when all are unmasked, mask/old/ref/ris [B, T], advantages [B] or [B, T].
    Returns (0-dim loss, metrics dict) as grpo_objective: fp32 (fp64 for fp64 inputs)."""
    hp = dict(beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
              temperature=float(temperature), loss_type=loss_type,
              max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
              return_entropy=bool(return_entropy),
              importance_sampling_level=importance_sampling_level,
              use_bias_correction_kl=bool(use_bias_correction_kl),
              delta=None if delta is None else float(delta), grad_enabled=torch.is_grad_enabled())
    loss, kl, low, high, clip, ent = OnePassGRPOLossFunction.apply(
        hidden, weight, bias, targets, rows, mask, advantages, old_logprobs, ref_logprobs,
        rollout_is_ratio, hp)
    metrics = {"kl": kl, "clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio": clip}
    if return_entropy:
        metrics["entropy"] = ent
    return loss, metrics
