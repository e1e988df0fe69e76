"""Triton row kernels of the one-pass path (kernels/triton_rows.py).

On a CPU-only machine they run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1), at small shapes; on CUDA the compiled kernels. Compared with
fp64 PyTorch on the same values: lse/log-prob/entropy to 1e-5 relative (fp32
arithmetic), dlogits to 1e-5 in fp32 and to bf16 rounding in bf16 (2^-8 relative; 2^-7 in the
interpreter, whose fp32→bf16 conversion truncates).
Then the whole one-pass loss with the row kernels against the fp64 reference.
"""
import pytest
import torch

from conftest import needs_linux_wheel

needs_linux_wheel("triton")

import r1vl.kernels.onepass as onepass  # noqa: E402
from kernel_cases import check_loss, make_case, rel_err  # noqa: E402
from r1vl.kernels import triton_rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.0", True), ("3.2.0", "2.5.5", True), ("3.5.1", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False), ("3.7.1", "2.5.5", False), ("3.10.0", "2.4.6", False),
])
def test_interpreter_problem(triton_v, numpy_v, broken):
    """Triton before 3.7 under NumPy 2.4+: its interpreter fails on every loop bounded by a
    kernel argument (seen here: 3.2.0, 3.5.1 and 3.6.0 fail, 3.7.1 and 3.8.0 run, under 2.4.6),
    so the Triton modules refuse to import with the fix instead of a TypeError per kernel."""
    msg = triton_rows.interpreter_problem(triton_v, numpy_v)
    assert (msg is not None) == broken, msg
    if broken:
        assert f"Triton {triton_v}" in msg and "pip install 'numpy<2.4'" in msg and "triton#9171" in msg


def _torch_rows(y, bias, tgt, inv_t, g):
    z = (y.double() + (0 if bias is None else bias.double())) * inv_t
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, tgt.unsqueeze(1)).squeeze(1) - lse
    p = torch.softmax(z, -1)
    ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    onehot = torch.nn.functional.one_hot(tgt, z.shape[1]).double()
    dz = g.double().unsqueeze(1) * (onehot - p) * inv_t
    return lse, logp, ent, dz


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_match_torch(with_bias, inv_t, out_dtype, monkeypatch):
    # several vocabulary blocks per row with a ragged last one
    monkeypatch.setattr(triton_rows, "_block_v", lambda v, interp: 64)
    g0 = torch.Generator().manual_seed(int(with_bias) + int(inv_t * 10))
    C, V = 7, 203
    y = (torch.randn(C, V, generator=g0) * 3).to(DEV)
    y[2, :] -= 100.0                    # exp(z) underflows in fp32 without the running max
    bias = (torch.randn(V, generator=g0)).to(DEV) if with_bias else None
    tgt = torch.randint(0, V, (C,), generator=g0).to(DEV)
    g = torch.randn(C, generator=g0).to(DEV)
    (mx, logs), logp, ent = triton_rows.row_stats(y, bias, tgt, inv_t, True)
    lse = mx + logs
    out = torch.full((C, V), float("nan"), dtype=out_dtype, device=DEV)   # poisoned
    triton_rows.row_grad(y, bias, tgt, (mx, logs), g, inv_t, out)
    r_lse, r_logp, r_ent, r_dz = _torch_rows(y.cpu(), None if bias is None else bias.cpu(),
                                            tgt.cpu(), inv_t, g.cpu())
    # fp32 rounding of (y + b)·inv_t scales with |z|: 1e-6 of the row's largest |z|, plus 1e-5
    zmax = ((y.cpu().double() + (0 if bias is None else bias.cpu().double())) * inv_t).abs().amax(1)
    for got, want in ((lse, r_lse), (logp, r_logp), (ent, r_ent)):
        assert ((got.cpu().double() - want).abs() <= 1e-5 + 1e-6 * zmax).all(), (got, want)
    assert torch.isfinite(out).all()
    # bf16: one rounding, 2^-8 relative; the interpreter's fp32→bf16 store truncates
    # instead of rounding, up to one bf16 ulp (2^-7 relative at the bottom of a binade)
    bf16_tol = 2 ** -8 if DEV == "cuda" else 2 ** -7
    assert rel_err(out.cpu(), r_dz) < (1e-5 if out_dtype == torch.float32 else bf16_tol)


def test_row_kernels_strided_rows_and_no_entropy():
    """A chunk that is a row-slice of a wider buffer (stride > V); entropy not asked."""
    g0 = torch.Generator().manual_seed(3)
    big = torch.randn(5, 80, generator=g0).to(DEV)
    y = big[:, :50]
    tgt = torch.tensor([0, 49, 7, 7, 20]).to(DEV)
    (mx, logs), logp, ent = triton_rows.row_stats(y, None, tgt, 1.0, False)
    lse = mx + logs
    assert ent is None
    r_lse, r_logp, _, _ = _torch_rows(y.cpu(), None, tgt.cpu(), 1.0, torch.zeros(5))
    assert rel_err(lse.cpu(), r_lse) < 1e-6 and rel_err(logp.cpu(), r_logp) < 1e-5


@pytest.mark.parametrize("backend", ["onepass", "gemm"])
def test_row_kernels_read_strided_targets_and_bias(backend, monkeypatch):
    """targets a stride-2 view (ids[:, ::2]) with no masked token, bias a column of a [V, 2]
    buffer: the row kernels (CUDA's default) read them with unit steps, which gave another
    loss (0.90 vs 0.86) and log-probs off by up to 4.9; == the contiguous copies' results."""
    from r1vl.kernels import fused_linear_grpo_loss
    monkeypatch.setattr(onepass, "ROW_KERNELS", "triton")
    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "1")
    g0 = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 6, 8, 23
    h = torch.randn(B, T, H, generator=g0).to(DEV)
    w = torch.randn(V, H, generator=g0).to(DEV)
    tgt = torch.randint(0, V, (B, 2 * T), generator=g0).to(DEV)[:, ::2]
    bias = torch.randn(V, 2, generator=g0).to(DEV)[:, 0]
    assert not tgt.is_contiguous() and not bias.is_contiguous()
    if backend == "gemm":
        lp, _ = onepass.gemm_logprobs(h.reshape(-1, H), w, bias, tgt.reshape(-1))
        want, _ = onepass.gemm_logprobs(h.reshape(-1, H), w, bias.contiguous(), tgt.contiguous().reshape(-1))
        assert torch.allclose(lp, want, rtol=1e-6, atol=1e-6)
        return
    mask, adv = torch.ones(B, T, device=DEV), torch.randn(B, generator=g0).to(DEV)
    old = torch.full((B, T), -3.0, device=DEV)
    kw = dict(backend="torch", old_logprobs=old, ref_logprobs=old, return_entropy=True)
    loss, m = fused_linear_grpo_loss(h, w, tgt, mask, adv, bias=bias, **kw)
    want, wm = fused_linear_grpo_loss(h, w, tgt.contiguous(), mask, adv, bias=bias.contiguous(), **kw)
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(m["kl"], wm["kl"], rtol=1e-5) and torch.allclose(m["entropy"], wm["entropy"], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onepass_with_row_kernels(dtype, monkeypatch):
    """The one-pass loss with the row kernels (as on CUDA) == fp64 reference, in several
    chunks, with masked rows, bias, temperature and entropy."""
    monkeypatch.setattr(onepass, "ROW_KERNELS", "triton")
    monkeypatch.setattr(onepass, "MAX_ROWS", 4)
    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "1")
    case = make_case(B=3, T=6, H=24, V=61, seed=41, dtype=dtype, masked_row=1)
    for name in ("hidden", "weight", "bias", "targets", "mask", "advantages", "old", "ref", "ris"):
        setattr(case, name, getattr(case, name).to(DEV))
    check_loss(case, "torch", use_ris=True, temperature=0.7, return_entropy=True,
               loss_type="bnpo")


@pytest.mark.parametrize("row_kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_logprobs(row_kernels, dtype, monkeypatch):
    """Forward-only log-probs through full-row chunks (the no-grad path on CUDA), with
    PyTorch ops and with the row kernels, several chunks, a row subset: == fp64 reference."""
    from r1vl.kernels import reference_linear_logprobs
    monkeypatch.setattr(onepass, "ROW_KERNELS", row_kernels)
    monkeypatch.setattr(onepass, "MAX_ROWS", 4)
    case = make_case(B=3, T=5, H=24, V=61, seed=42, dtype=dtype)
    h2 = case.hidden.reshape(-1, 24).to(DEV)
    tg = case.targets.reshape(-1).to(DEV)
    rows = torch.tensor([0, 2, 3, 7, 8, 9, 14]).to(DEV)
    logp, ent = onepass.gemm_logprobs(h2, case.weight.to(DEV), case.bias.to(DEV), tg,
                                      temperature=0.7, return_entropy=True, rows=rows)
    rlogp, rent = reference_linear_logprobs(h2.cpu().double(), case.weight.double(),
                                            tg.cpu(), bias=case.bias.double(), temperature=0.7,
                                            return_entropy=True)
    keep = torch.zeros(15, dtype=torch.bool)
    keep[rows.cpu()] = True
    assert logp.dtype == torch.float32 and (logp.cpu()[~keep] == 0).all()
    assert rel_err(logp.cpu()[keep], rlogp[keep]) <= 1e-5
    assert rel_err(ent.cpu()[keep], rent[keep]) <= 1e-5


@pytest.mark.parametrize("row_kernels", ["torch", "triton"])
def test_onepass_sequence_chunks_larger_than_budget(row_kernels, monkeypatch):
    """At sequence level a chunk grows past the row budget to hold a whole sequence
    (up to SEQUENCE_CHUNK_FACTOR × the budget): budget 3 rows, sequences of up to 9."""
    monkeypatch.setattr(onepass, "ROW_KERNELS", row_kernels)
    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "1")
    V = 61
    monkeypatch.setattr(onepass, "CHUNK_BYTES_CUDA" if DEV == "cuda" else "CHUNK_BYTES_CPU",
                        4 * V * 3)
    case = make_case(B=3, T=9, H=24, V=V, seed=45, masked_row=1)
    for name in ("hidden", "weight", "bias", "targets", "mask", "advantages", "old", "ref", "ris"):
        setattr(case, name, getattr(case, name).to(DEV))
    assert onepass.sequence_fits(case.mask, V, case.hidden.device)
    assert onepass._chunk_rows(int(case.mask.sum()), V, case.hidden.device) == 3
    check_loss(case, "torch", use_ris=True, importance_sampling_level="sequence",
               temperature=0.9, return_entropy=True)
