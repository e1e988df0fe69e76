"""Triton backend (backend="triton") against the fp64 reference.

On a CPU-only machine these run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports the kernels), at small shapes. Some
tests shrink the block sizes so that several row blocks, vocabulary tiles and
hidden-size slices (with ragged edges) are exercised. On a CUDA machine the same
tests run the compiled kernels, plus the `cuda`-marked ones at larger shapes.

Tolerances: see kernel_cases.py (fp32: values 1e-5, gradients 1e-4 relative to the
largest reference magnitude; bf16/fp16: values 1e-4, gradients 1e-2). On GPU the
bf16 tensor-core path rounds dlogits to bf16 before the gradient GEMMs, so the
cuda-marked bf16 test allows 2e-2 on gradients.
"""
import pytest
import torch

from conftest import needs_linux_wheel

needs_linux_wheel("triton")

import r1vl.kernels.triton_grpo as tg  # noqa: E402
from kernel_cases import TOL, check_loss, make_case, rel_err  # noqa: E402
from r1vl.kernels import fused_linear_grpo_loss, linear_logprobs, reference_linear_logprobs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _on(case, dev=DEV):
    for name in ("hidden", "weight", "bias", "targets", "mask", "advantages", "old", "ref", "ris"):
        x = getattr(case, name)
        if x is not None:
            setattr(case, name, x.to(dev))
    return case


@pytest.fixture
def tiny_blocks(monkeypatch):
    """16-row blocks, 32-column vocab tiles, 16-wide hidden slices: many programs/tiles."""
    monkeypatch.setattr(tg, "_config", lambda n, v, d, interp: dict(BLOCK_M=16, BLOCK_V=32,
                                                                    BLOCK_K=16))


def _check_cpu(case, **kw):
    # the reference runs on CPU in fp64; compare gradients there
    return check_loss(_on(case), "triton", **kw)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_matrix(loss_type, level):
    with_old = loss_type in ("grpo", "dapo") or level == "sequence"
    case = make_case(B=3, T=9, H=24, V=61, seed=len(loss_type) + len(level), masked_row=2)
    _check_cpu(case, use_old=with_old, use_ref=loss_type != "dr_grpo", use_ris=loss_type == "bnpo",
               loss_type=loss_type, importance_sampling_level=level, temperature=0.7,
               max_completion_length=12, return_entropy=True)


@pytest.fixture(params=[True, False], ids=["flat", "nested"])
def loop_shape(request, monkeypatch):
    """The forward's two loop shapes: one loop over (vocab tile, hidden slice) pairs, or a
    hidden-slice loop nested in the vocab-tile loop (both in the GPU's autotune table)."""
    monkeypatch.setattr(tg, "INTERPRET_FLAT", request.param)
    return request.param


def test_many_blocks_and_ragged_edges(tiny_blocks, loop_shape):
    """N=40 rows (3 blocks, last partial), V=75 (3 tiles, last partial), H=37 (3 slices)."""
    case = make_case(B=4, T=10, H=37, V=75, seed=21, masked_row=1)
    _check_cpu(case, use_ris=True, temperature=1.3, return_entropy=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype, tiny_blocks, loop_shape):
    case = make_case(B=2, T=12, H=40, V=70, dtype=dtype, seed=22, masked_row=0)
    _check_cpu(case, use_ris=True, importance_sampling_level="sequence", return_entropy=True)


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 1, 2)])
def test_tiny_shapes(shape):
    B, T, H, V = shape
    _check_cpu(make_case(B, T, H, V, seed=23, bias=V % 2 == 1), temperature=0.9)


def test_no_bias_temperature_one_beta_zero():
    _check_cpu(make_case(seed=24, bias=False), beta=0.0)


def test_linear_logprobs_entropy_grads_and_no_grad(tiny_blocks):
    case = _on(make_case(B=2, T=9, H=20, V=50, seed=25))
    h, w, b = (x.detach().clone().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    logp, ent = linear_logprobs(h, w, case.targets, bias=b, temperature=0.8,
                                return_entropy=True, backend="triton")
    h64, w64, b64 = (x.detach().cpu().double().requires_grad_() for x in (h, w, b))
    rlogp, rent = reference_linear_logprobs(h64, w64, case.targets.cpu(), bias=b64,
                                            temperature=0.8, return_entropy=True)
    assert rel_err(logp.cpu(), rlogp) <= 1e-5 and rel_err(ent.cpu(), rent) <= 1e-5
    gl = torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    ge = torch.randn(ent.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((logp * gl.to(DEV)).sum() + (ent * ge.to(DEV)).sum(), (h, w, b))
    rgrads = torch.autograd.grad((rlogp * gl).sum() + (rent * ge).sum(), (h64, w64, b64))
    for g, rg in zip(grads, rgrads):
        assert rel_err(g.cpu(), rg) <= 1e-4
    with torch.no_grad():
        lp2 = linear_logprobs(h, w, case.targets, bias=b, temperature=0.8, backend="triton")
    assert lp2.grad_fn is None and torch.allclose(lp2, logp.detach(), atol=1e-6)


def test_backends_agree_and_tied_weights():
    """Triton and chunked torch give the same loss/grads, also with an lm_head tied to
    the input embeddings (the weight gets both gradient contributions)."""
    g = torch.Generator().manual_seed(26)
    V, H, B, T = 45, 24, 2, 7
    emb = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    adv = torch.randn(B, generator=g)

    def run(backend):
        w = emb.clone().to(DEV).requires_grad_()
        hidden = torch.tanh(w[ids.to(DEV)] * 0.5)
        loss, m = fused_linear_grpo_loss(hidden, w, targets.to(DEV), mask.to(DEV), adv.to(DEV),
                                         temperature=0.9, backend=backend)
        loss.backward()
        return loss.detach().cpu(), w.grad.cpu()

    (lt, gt), (lc, gc) = run("triton"), run("torch")
    assert abs(float(lt) - float(lc)) <= 1e-5 * max(1.0, abs(float(lc)))
    assert rel_err(gt, gc) <= 1e-4


def test_rows_skip_vocab_work(monkeypatch):
    """Masked rows are not in the forward row list; rows without gradient are not
    in the backward one."""
    case = _on(make_case(B=4, T=6, seed=27, masked_row=3))
    launched = []
    for name in ("_logprob_fwd_kernel", "_logprob_bwd_kernel"):
        kern = getattr(tg, name)

        class Spy:
            def __init__(self, k, tag):
                self.k, self.tag = k, tag

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    launched.append((self.tag, args[4].numel(), args[8] if self.tag == "bwd" else None))
                    return self.k[grid](*args, **kw)
                return launch

        monkeypatch.setattr(tg, name, Spy(kern, name[9:12]))
    if not tg.INTERPRET:                       # compiled: the forward goes through the autotuner
        tuned = tg._fwd_tuned()
        monkeypatch.setattr(tg, "_fwd_tuned", lambda: Spy(tuned, "fwd"))
    h = case.hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask, case.advantages,
                                     backend="triton")
    loss.backward()
    n_on = int(case.mask.sum())
    assert [(t, n) for t, n, _ in launched] == [("fwd", n_on), ("bwd", n_on)]
    assert h.grad[3].abs().max() == 0


@pytest.mark.parametrize("per", [25, 13, 75])
def test_forward_vocabulary_splits(monkeypatch, tiny_blocks, loop_shape, per):
    """The forward grid split over the vocabulary (as on GPU for short batches): per-split
    partial max/sum/entropy/target logit folded by _combine_splits, splits not a multiple
    of the tile width, the target in any split, logits far from zero (−100: exp underflows
    without the running max)."""
    v = 75
    monkeypatch.setattr(tg, "_splits", lambda nb, vocab, interp: (-(-vocab // per), per))
    case = make_case(B=3, T=7, H=20, V=v, seed=33, masked_row=1)
    case.bias = case.bias - 100.0
    case = _on(case)
    logp, ent = linear_logprobs(case.hidden, case.weight, case.targets.clamp(min=0),
                                bias=case.bias, temperature=0.8, return_entropy=True,
                                backend="triton")
    rlogp, rent = reference_linear_logprobs(case.hidden.cpu().double(), case.weight.cpu().double(),
                                            case.targets.clamp(min=0).cpu(),
                                            bias=case.bias.cpu().double(), temperature=0.8,
                                            return_entropy=True)
    assert (logp.cpu().double() - rlogp).abs().max() <= 1e-4
    assert (ent.cpu().double() - rent).abs().max() <= 1e-4
    _check_cpu(case, use_ris=True, temperature=0.8, return_entropy=True)


def test_all_masked_and_single_token():
    case = _on(make_case(B=2, T=3, seed=28))
    case.mask[:] = False
    h = case.hidden.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask,
                                           case.advantages, backend="triton", return_entropy=True)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0
    one = make_case(B=1, T=1, H=8, V=20, seed=29)
    _check_cpu(one, return_entropy=True)


def test_matches_liger_chunked_grpo():
    """Same objective as liger-kernel's LigerFusedLinearGRPOLoss (grpo, token level,
    old + ref log-probs, β=0.04) — an independent implementation of TRL's loss."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    case = make_case(B=3, T=8, H=16, V=40, seed=30, bias=False)
    case.mask = case.mask.float()
    ours_h = case.hidden.clone().requires_grad_()
    their_h = case.hidden.clone().requires_grad_()
    loss, m = fused_linear_grpo_loss(ours_h, case.weight, case.targets, case.mask, case.advantages,
                                     old_logprobs=case.old, ref_logprobs=case.ref,
                                     temperature=0.8, backend="torch")
    mod = liger.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True,
                                         loss_type="grpo", temperature=0.8)
    out = mod(their_h, case.weight, case.targets, case.mask, case.advantages,
              ref_per_token_logps=case.ref, old_per_token_logps=case.old)
    their_loss, their_metrics = out[0], out[1]
    assert abs(loss.item() - their_loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert abs(float(m["kl"]) - float(their_metrics[0])) <= 1e-5
    assert abs(float(m["clip_ratio"]) - float(their_metrics[1])) <= 1e-6
    loss.backward()
    their_loss.backward()
    assert rel_err(ours_h.grad, their_h.grad) <= 1e-4


def test_objective_kernel_matches_torch_objective():
    """The fused Triton objective (loss, metrics, dloss/dlogp in one launch) against the
    plain-PyTorch objective on the same log-probs: every loss type and IS level, with and
    without old/ref/ris, float mask weights and an all-masked sequence. fp32: 1e-5."""
    from r1vl.kernels.objective import grpo_objective
    g = torch.Generator().manual_seed(32)
    B, T = 4, 37
    logp0 = -3.0 + torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    mask[2] = 0.0
    mask[0, :5] = 0.5                                   # weights, not just 0/1
    old = logp0 + 0.3 * torch.randn(B, T, generator=g)
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g)
    ris = 0.5 + torch.rand(B, T, generator=g)
    adv = torch.tensor([0.7, -1.1, 0.3, 0.0])
    ent = torch.rand(B, T, generator=g)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            for full in (False, True):
                kw = dict(old_logprobs=old if full else None, ref_logprobs=ref if full else None,
                          rollout_is_ratio=ris if full else None, beta=0.04, epsilon_low=0.2,
                          epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
                          max_completion_length=50, num_items_in_batch=60 if full else None,
                          entropy=ent if full else None)
                outs = []
                for fn in (grpo_objective, tg.triton_grpo_objective):
                    logp = logp0.clone().to(DEV).requires_grad_()
                    dkw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                    loss, m = fn(logp, mask.to(DEV), adv.to(DEV), **dkw)
                    (dl,) = torch.autograd.grad(loss * 3.0, logp)
                    outs.append((loss.detach().cpu(), {k: v.cpu() for k, v in m.items()}, dl.cpu()))
                (l0, m0, d0), (l1, m1, d1) = outs
                where = (loss_type, level, full)
                assert abs(float(l0) - float(l1)) <= 1e-5 * max(1.0, abs(float(l0))), where
                assert m0.keys() == m1.keys(), where
                for k in m0:
                    assert abs(float(m0[k]) - float(m1[k])) <= 1e-5, (where, k)
                assert (d0 - d1).abs().max() <= 1e-5 * max(1.0, float(d0.abs().max())), where


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernels(dtype):
    """Compiled kernels (default blocks) at a shape with many tiles, vs the fp64 reference."""
    case = make_case(B=4, T=200, H=320, V=3001, dtype=dtype, seed=31, masked_row=1)
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["grad"] = 2e-2
    elif dtype == torch.float32:
        tol["grad"] = 1e-3
    check_loss(_on(case, "cuda"), "triton", tol=tol, use_ris=True, temperature=0.7,
               importance_sampling_level="sequence", return_entropy=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", tg._FWD_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_cuda_every_forward_config(monkeypatch, cfg, dtype):
    """Each row of the forward's autotune table (both loop shapes), launched directly: the
    autotuner times them all but the suite would otherwise check only its pick."""
    bm, bv, bk, w, st, flat = cfg

    class Fixed:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                return tg._logprob_fwd_kernel[grid](*args, **kw, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
                                                    FLAT=flat, num_warps=w, num_stages=st)
            return launch

    monkeypatch.setattr(tg, "_fwd_tuned", lambda: Fixed())
    case = make_case(B=3, T=150, H=320, V=3001, dtype=dtype, seed=32, masked_row=1)
    case = _on(case, "cuda")
    tgt = case.targets.clamp(min=0)
    logp, ent = linear_logprobs(case.hidden, case.weight, tgt, bias=case.bias, temperature=0.7,
                                return_entropy=True, backend="triton")
    rlogp, rent = reference_linear_logprobs(case.hidden.cpu().double(), case.weight.cpu().double(),
                                            tgt.cpu(), bias=case.bias.cpu().double(), temperature=0.7,
                                            return_entropy=True)
    tol = 1e-3          # inputs are exact in both dtypes; bf16 products are exact in fp32
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp.cpu().double() - rlogp).abs().max() <= tol * max(1.0, float(rlogp.abs().max()))
    assert (ent.cpu().double() - rent).abs().max() <= tol * max(1.0, float(rent.abs().max()))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_loss_can_be_scaled_in_place(level):
    """`loss /= accumulation_steps` before backward, as the torch backend allows: the Triton
    objective returned a view made inside its autograd.Function, which autograd refuses to
    modify in place."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 8, device=DEV), torch.randn(16, 8, device=DEV)
    targets, mask, adv = torch.randint(0, 16, (2, 4), device=DEV), torch.ones(2, 4, device=DEV), \
        torch.randn(2, device=DEV)
    grads = []
    for scale_in_place in (False, True):
        h = hidden.clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, weight, targets, mask, adv, backend="triton",
                                         importance_sampling_level=level)
        if scale_in_place:
            loss /= 4
        else:
            loss = loss / 4
        loss.backward()
        grads.append(h.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1])
