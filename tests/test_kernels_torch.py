"""Chunked PyTorch backend (backend="torch") against the fp64 materialised reference.

Every test runs twice: with the one-pass token-level loss (onepass.py, the default)
and with the two-pass path (R1VL_KERNEL_ONEPASS=0: log-probs, then the objective,
recomputing logits in backward). Sequence-level cases take the two-pass path either way.

Tolerances: see kernel_cases.py (fp32: values 1e-5, gradients 1e-4 relative to the
largest reference magnitude; bf16/fp16: values 1e-4, gradients 1e-2; fp64 gradcheck:
torch.autograd.gradcheck's defaults, eps=1e-6, atol=1e-5, rtol=1e-3).
"""
import pytest
import torch

import r1vl.kernels.chunked as chunked
import r1vl.kernels.onepass as onepass
from kernel_cases import TOL, check_loss, make_case, rel_err
from r1vl.kernels import (fused_linear_grpo_loss, linear_logprobs,
                          reference_grpo_loss, reference_linear_logprobs)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


@pytest.fixture(autouse=True, params=["onepass", "twopass"])
def loss_path(request, monkeypatch):
    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "1" if request.param == "onepass" else "0")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several row blocks (5 rows) and vocabulary chunks (16 columns), ragged ends;
    one-pass chunks of 3 rows."""
    monkeypatch.setattr(chunked, "ROW_BLOCK", 5)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 5 * 16)
    monkeypatch.setattr(onepass, "CHUNK_BYTES_CPU", 1 << 40)   # MAX_ROWS binds
    monkeypatch.setattr(onepass, "MAX_ROWS", 3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("inputs", ["none", "old", "old+ref+ris"])
def test_loss_matrix(loss_type, level, inputs, small_chunks):
    seed = LOSS_TYPES.index(loss_type) * 10 + len(level) + len(inputs)
    case = make_case(seed=seed, masked_row=1)
    check_loss(case, "torch", use_old="old" in inputs, use_ref="ref" in inputs,
               use_ris="ris" in inputs, loss_type=loss_type, importance_sampling_level=level,
               temperature=0.7, max_completion_length=9, return_entropy=True)


def test_clipping_is_exercised():
    """The matrix cases really clip (both sides), so the clip branches are compared."""
    case = make_case(B=8, T=16, seed=3)
    _, m = reference_grpo_loss(case.hidden, case.weight, case.targets, case.mask,
                               case.advantages, bias=case.bias, old_logprobs=case.old)
    assert 0 < float(m["clip_ratio_low"]) < 1 and 0 < float(m["clip_ratio_high"]) < 1
    check_loss(case, "torch", use_ref=True, beta=0.1, epsilon_low=0.1, epsilon_high=0.28)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    case = make_case(dtype=dtype, seed=5, masked_row=0)
    check_loss(case, "torch", use_ris=True, temperature=1.3, return_entropy=True)


def test_dapo_num_items_and_beta_zero():
    case = make_case(seed=6)
    check_loss(case, "torch", loss_type="dapo", num_items_in_batch=40, beta=0.0)
    check_loss(case, "torch", loss_type="dapo", num_items_in_batch=torch.tensor(17.0))


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 1, 2), (4, 5, 33, 257)])
def test_odd_shapes(shape, small_chunks):
    B, T, H, V = shape
    case = make_case(B, T, H, V, seed=7, bias=V % 2 == 1)
    check_loss(case, "torch", use_ris=True, temperature=0.9, importance_sampling_level="sequence")


def test_all_masked_batch():
    """Nothing unmasked: loss 0, metrics 0, zero (finite) gradients."""
    case = make_case(seed=8)
    case.mask[:] = False
    h = case.hidden.clone().requires_grad_()
    w = case.weight.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                           old_logprobs=case.old, ref_logprobs=case.ref,
                                           backend="torch", return_entropy=True)
    loss.backward()
    assert loss.item() == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_masked_positions_ignore_nonfinite_inputs():
    """Padding may carry -inf old/ref log-probs and any target id: no NaN leaks."""
    case = make_case(seed=9, masked_row=2)
    old, ref = case.old.clone(), case.ref.clone()
    old[2] = float("-inf")
    ref[2] = float("nan")
    h = case.hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask, case.advantages,
                                     old_logprobs=old, ref_logprobs=ref, backend="torch",
                                     importance_sampling_level="sequence")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert h.grad[2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_and_entropy_grads(dtype, small_chunks):
    case = make_case(B=2, T=9, seed=10, dtype=dtype)
    h, w, b = (x.detach().clone().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    logp, ent = linear_logprobs(h, w, case.targets, bias=b, temperature=0.8,
                                return_entropy=True, backend="torch")
    assert logp.shape == case.targets.shape and logp.dtype == torch.float32
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    rlogp, rent = reference_linear_logprobs(h64, w64, case.targets, bias=b64, temperature=0.8,
                                            return_entropy=True)
    tol = TOL[dtype]
    assert rel_err(logp, rlogp) <= tol["value"] and rel_err(ent, rent) <= tol["value"]
    gl, ge = torch.randn_like(logp), torch.randn_like(ent)   # both outputs carry gradient
    grads = torch.autograd.grad((logp * gl).sum() + (ent * ge).sum(), (h, w, b))
    rgrads = torch.autograd.grad((rlogp * gl).sum() + (rent * ge).sum(), (h64, w64, b64))
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) <= tol["grad"]


def test_linear_logprobs_2d_and_no_grad_path():
    case = make_case(seed=11, bias=False)
    h2 = case.hidden.reshape(-1, case.hidden.shape[-1]).requires_grad_()
    with torch.no_grad():
        logp = linear_logprobs(h2, case.weight, case.targets.reshape(-1).clamp(min=0))
    assert logp.grad_fn is None and logp.shape == (h2.shape[0],)
    ref = reference_linear_logprobs(h2.detach(), case.weight, case.targets.reshape(-1).clamp(min=0))
    assert rel_err(logp, ref) <= 1e-5


def test_tied_embeddings():
    """lm_head tied to the input embeddings: both uses' gradients reach the weight."""
    g = torch.Generator().manual_seed(12)
    V, H, B, T = 41, 16, 2, 6
    emb = torch.randn(V, H, generator=g)
    proj = torch.randn(H, H, generator=g) / H ** 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)

    def run(weight, fn, **kw):
        hidden = torch.tanh(weight[ids] @ proj.to(weight.dtype))
        loss, _ = fn(hidden, weight, targets, mask, adv, temperature=0.9, **kw)
        return torch.autograd.grad(loss, weight)[0]

    got = run(emb.clone().requires_grad_(), fused_linear_grpo_loss, backend="torch")
    want = run(emb.double().requires_grad_(), reference_grpo_loss)
    assert rel_err(got, want) <= 1e-4


def test_finite_difference_fp64(monkeypatch):
    """gradcheck through the whole op (chunked path in fp64, several row blocks and
    vocabulary chunks)."""
    case = make_case(B=2, T=3, H=4, V=6, seed=13, masked_row=None, dtype=torch.float64)
    case.mask[1, 2] = False
    old, ref = case.old.double(), case.ref.double()
    monkeypatch.setattr(chunked, "ROW_BLOCK", 2)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 2 * 4)       # 4 of the 6 columns per chunk
    for level in ("token", "sequence"):
        def f(h, w, b):
            loss, _ = fused_linear_grpo_loss(
                h, w, case.targets, case.mask, case.advantages, bias=b, old_logprobs=old,
                ref_logprobs=ref, rollout_is_ratio=case.ris.double(), temperature=0.7,
                importance_sampling_level=level, backend="torch", beta=0.3)
            return loss

        inputs = tuple(x.detach().clone().requires_grad_() for x in
                       (case.hidden, case.weight, case.bias))
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)

    def g(h, w, b):
        lp, ent = linear_logprobs(h, w, case.targets.clamp(min=0), bias=b, temperature=1.5,
                                  return_entropy=True, backend="torch")
        return lp, ent

    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_rows_without_gradient_skip_work(monkeypatch, small_chunks, loss_path):
    """Two-pass: logits are computed only for unmasked rows in forward and recomputed
    only for rows that carry gradient in backward: rows x columns = n_on x V each way.
    One-pass: n_on x V logits once, in forward, and no vocabulary work in backward."""
    case = make_case(B=4, T=8, seed=14, masked_row=3)
    seen = []
    if loss_path == "onepass":
        orig_logits = onepass._Gemms.logits

        def spy_logits(self, h_c):
            z = orig_logits(self, h_c)
            seen.append(z.numel())
            return z

        monkeypatch.setattr(onepass._Gemms, "logits", spy_logits)
        h = case.hidden.clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask,
                                         case.advantages, backend="torch")
        n_fwd = len(seen)
        loss.backward()
        n_on, vocab = int(case.mask.sum()), case.weight.shape[0]
        assert n_on < case.mask.numel() and n_fwd > 1     # several chunks
        assert sum(seen) == n_on * vocab and len(seen) == n_fwd
        return
    orig = chunked._chunk_logits

    def spy(h_rows, weight, bias, v0, v1, inv_t):
        seen.append(h_rows.shape[0] * (v1 - v0))
        return orig(h_rows, weight, bias, v0, v1, inv_t)

    monkeypatch.setattr(chunked, "_chunk_logits", spy)
    h = case.hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask, case.advantages,
                                     backend="torch")
    n_fwd = len(seen)
    loss.backward()
    n_on, vocab = int(case.mask.sum()), case.weight.shape[0]
    assert n_on < case.mask.numel()
    assert sum(seen[:n_fwd]) == n_on * vocab and sum(seen[n_fwd:]) == n_on * vocab


def test_module_matches_function():
    from r1vl.kernels import FusedLinearGRPOLoss
    case = make_case(seed=15)
    mod = FusedLinearGRPOLoss(beta=0.1, loss_type="bnpo", temperature=0.8, backend="torch",
                              return_entropy=True)
    a, ma = mod(case.hidden, case.weight, case.targets, case.mask, case.advantages,
                bias=case.bias, old_logprobs=case.old, ref_logprobs=case.ref)
    b, mb = fused_linear_grpo_loss(case.hidden, case.weight, case.targets, case.mask,
                                   case.advantages, bias=case.bias, old_logprobs=case.old,
                                   ref_logprobs=case.ref, beta=0.1, loss_type="bnpo",
                                   temperature=0.8, backend="torch", return_entropy=True)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in mb)
    assert "entropy" in ma and "bnpo" in repr(mod)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a dev extra
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(B=st.integers(1, 4), T=st.integers(1, 9), H=st.integers(1, 20), V=st.integers(2, 70),
           loss_type=st.sampled_from(LOSS_TYPES), level=st.sampled_from(["token", "sequence"]),
           temperature=st.sampled_from([0.5, 1.0, 1.7]), flags=st.integers(0, 15),
           seed=st.integers(0, 10_000))
    def test_property_random_configs(small_chunks, B, T, H, V, loss_type, level, temperature,
                                     flags, seed):
        """Random shapes and options (fp32, forced multi-chunk): torch backend == reference."""
        case = make_case(B, T, H, V, seed=seed, bias=bool(flags & 1),
                         masked_row=0 if (flags & 8 and B > 1) else None)
        check_loss(case, "torch", use_old=bool(flags & 2), use_ref=bool(flags & 4),
                   use_ris=bool(flags & 8), loss_type=loss_type, importance_sampling_level=level,
                   temperature=temperature, max_completion_length=T + 3,
                   return_entropy=bool(flags & 2))


def test_onepass_upstream_gradient_and_partial_needs(small_chunks, loss_path):
    """The gradients are scaled by the incoming gradient; only the inputs that require
    grad get one. A second backward through a retained graph gives the same gradients
    (the one-pass path hands its forward-time gradients over in the first backward and
    recomputes them for the second)."""
    case = make_case(B=3, T=6, seed=31, masked_row=1)
    kw = dict(bias=None, old_logprobs=case.old, ref_logprobs=case.ref, backend="torch")

    def grads(scale, retain=False):
        h = case.hidden.clone().requires_grad_()
        w = case.weight.clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages, **kw)
        return torch.autograd.grad(scale * loss, (h, w), retain_graph=retain), loss, (h, w)

    g1, _, _ = grads(1.0)
    g3, _, _ = grads(-3.0)
    for a, b in zip(g1, g3):
        assert a.abs().max() > 0
        assert torch.allclose(b, -3.0 * a, rtol=1e-6, atol=1e-7)
    h2 = case.hidden.clone().requires_grad_()
    loss2, _ = fused_linear_grpo_loss(h2, case.weight, case.targets, case.mask, case.advantages,
                                      **kw)
    (gh,) = torch.autograd.grad(loss2, (h2,))
    assert torch.allclose(gh, g1[0], rtol=1e-6, atol=1e-7)
    again, loss, leaves = grads(1.0, retain=True)
    for a, b in zip(again, torch.autograd.grad(2.0 * loss, leaves)):
        assert torch.allclose(b, 2.0 * a, rtol=1e-6, atol=1e-7)


def test_onepass_matches_twopass(monkeypatch):
    """Both torch paths agree to fp32 rounding on the same inputs (bf16 inputs too)."""
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(B=4, T=9, H=32, V=97, seed=32, dtype=dtype, masked_row=2)
        out = {}
        for flag in ("1", "0"):
            monkeypatch.setenv("R1VL_KERNEL_ONEPASS", flag)
            h = case.hidden.clone().requires_grad_()
            w = case.weight.clone().requires_grad_()
            b = case.bias.clone().requires_grad_()
            loss, m = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                             bias=b, old_logprobs=case.old, ref_logprobs=case.ref,
                                             rollout_is_ratio=case.ris, temperature=0.8,
                                             loss_type="bnpo", return_entropy=True)
            loss.backward()
            out[flag] = (loss.detach(), m, h.grad, w.grad, b.grad)
        (l1, m1, *g1), (l0, m0, *g0) = out["1"], out["0"]
        assert abs(float(l1) - float(l0)) <= 1e-6 * max(1.0, abs(float(l0)))
        assert all(abs(float(m1[k]) - float(m0[k])) <= 1e-6 for k in m0)
        for a, b in zip(g1, g0):
            assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fractional_mask_weights(loss_type):
    """A float mask weights tokens (0.5, 0.25), not just selects them: both torch paths
    match the reference's weighting in loss and gradients."""
    case = make_case(B=3, T=7, seed=43, masked_row=2)
    w = case.mask.float()
    w[0, 1:4] *= 0.5
    w[1, 2] *= 0.25
    case.mask = w
    check_loss(case, "torch", use_ris=True, loss_type=loss_type, max_completion_length=9,
               temperature=0.9)


@pytest.mark.parametrize("max_rows", [7, 12, 100])
@pytest.mark.parametrize("masked", [None, 1])
def test_onepass_sequence_level(monkeypatch, loss_path, max_rows, masked):
    """Sequence-level ratios on the one-pass path: chunks of whole sequences (one, several,
    or all per chunk; with a fully masked sequence and partial masks), == fp64 reference.
    A sequence longer than a chunk falls back to the two-pass path (same result)."""
    monkeypatch.setattr(onepass, "CHUNK_BYTES_CPU", 1 << 40)   # MAX_ROWS binds
    monkeypatch.setattr(onepass, "MAX_ROWS", max_rows)
    calls = []
    orig = onepass._sequence_grad
    monkeypatch.setattr(onepass, "_sequence_grad", lambda *a: calls.append(a[2]) or orig(*a))
    case = make_case(B=5, T=7, seed=44, masked_row=masked)
    for loss_type in ("grpo", "bnpo"):
        calls.clear()
        check_loss(case, "torch", use_ris=True, loss_type=loss_type,
                   importance_sampling_level="sequence", temperature=0.8, return_entropy=True)
        if loss_path == "onepass":
            seqs = [b for b0, b1 in calls for b in range(b0, b1)]
            assert seqs == list(range(5))                # each sequence in exactly one chunk
            assert len(calls) > 1 or max_rows == 100
        else:
            assert calls == []
    monkeypatch.setattr(onepass, "MAX_ROWS", 3)          # every sequence has > 3 tokens
    calls.clear()
    check_loss(case, "torch", importance_sampling_level="sequence")
    assert calls == []


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 65536.0), (torch.float16, 1024.0),
                                         (torch.bfloat16, 1 / 3)])
def test_upstream_scale_is_applied_in_fp32(dtype, scale):
    """backward's incoming gradient (an fp16 GradScaler's 65536, a 1/3 averaging factor) scales
    dhidden in fp32: cast to fp16 first, 65536 is inf (every gradient inf/NaN); cast to bf16,
    1/3 becomes 0.333984 (a +0.2% bias on every element)."""
    case = make_case(B=3, T=5, H=16, V=40, seed=12)
    h = case.hidden.to(dtype).requires_grad_()
    w = case.weight.to(dtype).requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                     old_logprobs=case.old, ref_logprobs=case.ref, backend="torch")
    (loss * scale).backward()
    hr = h.detach().double().requires_grad_()  # the same (rounded) inputs, in fp64
    wr = w.detach().double().requires_grad_()
    ref, _ = reference_grpo_loss(hr, wr, case.targets, case.mask, case.advantages,
                                 old_logprobs=case.old, ref_logprobs=case.ref)
    (ref * scale).backward()
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert torch.isfinite(got).all()
        g, r = got.double(), want
        fitted = float((g * r).sum() / (r * r).sum())  # the scale the gradient carries, vs the reference
        assert abs(fitted - 1.0) < 5e-4, fitted
        assert rel_err(g, r) < 2e-2


@pytest.mark.needs("triton")
def test_all_masked_batch_with_the_row_kernels(monkeypatch):
    """On CUDA the one-pass path uses the Triton row kernels (here the same code under the
    interpreter): a batch with nothing unmasked gives loss 0 and zero gradients there too."""
    monkeypatch.setattr(onepass, "ROW_KERNELS", "triton")
    case = make_case(B=2, T=3, H=8, V=16, seed=8)
    case.mask[:] = False
    h = case.hidden.clone().requires_grad_()
    w = case.weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_no_gradient_work_without_autograd(monkeypatch, loss_path):
    """Called under torch.inference_mode (an evaluation step with a trainable lm_head) it runs;
    under torch.no_grad with inputs that require grad, no dW GEMM is formed."""
    case = make_case(B=2, T=4, H=8, V=16, seed=13)
    w = case.weight.clone().requires_grad_()
    with torch.inference_mode():
        loss, _ = fused_linear_grpo_loss(case.hidden, w, case.targets, case.mask, case.advantages,
                                         old_logprobs=case.old, backend="torch")
    plain, _ = fused_linear_grpo_loss(case.hidden, case.weight, case.targets, case.mask, case.advantages,
                                      old_logprobs=case.old, backend="torch")
    torch.testing.assert_close(loss, plain.detach())
    calls = []
    real = onepass._Gemms.add_dweight
    monkeypatch.setattr(onepass._Gemms, "add_dweight", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        fused_linear_grpo_loss(case.hidden.clone().requires_grad_(), w, case.targets, case.mask,
                               case.advantages, old_logprobs=case.old, backend="torch")
    assert calls == []
