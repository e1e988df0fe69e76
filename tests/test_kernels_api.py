"""Argument validation (clear ValueErrors naming the argument) and backend dispatch."""
import dataclasses
import os

import pytest
import torch

from kernel_cases import make_case
from r1vl.kernels import FusedLinearGRPOLoss, fused_linear_grpo_loss, linear_logprobs


@pytest.fixture(scope="module")
def case():
    return make_case(B=2, T=4, H=8, V=11, seed=0)


def _on_device(case, backend):
    """The case where backend="triton" runs: CUDA tensors on a GPU (there, CPU tensors are refused
    without TRITON_INTERPRET), the interpreter's CPU tensors here."""
    if backend != "triton" or not torch.cuda.is_available():
        return case
    return dataclasses.replace(case, **{f.name: None if getattr(case, f.name) is None else
                                        getattr(case, f.name).cuda() for f in dataclasses.fields(case)})


def _loss(case, **over):
    args = dict(hidden=case.hidden, weight=case.weight, targets=case.targets, mask=case.mask,
                advantages=case.advantages)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return fused_linear_grpo_loss(args["hidden"], args["weight"], args["targets"], args["mask"],
                                  args["advantages"], **kw)


BAD_LOSS_INPUTS = [
    ("backend", dict(backend="cuda")),
    ("loss_type", dict(loss_type="ppo")),
    ("importance_sampling_level", dict(importance_sampling_level="seq")),
    ("max_completion_length", dict(loss_type="dr_grpo")),
    ("max_completion_length", dict(loss_type="dr_grpo", max_completion_length=0)),
    ("num_items_in_batch", dict(loss_type="dapo", num_items_in_batch=-1)),
    ("temperature", dict(temperature=0.0)),
    ("epsilon_low", dict(epsilon_low=-0.1)),
    ("beta", dict(beta=float("nan"))),
    ("hidden", dict(hidden=torch.zeros(2, 4, 8, dtype=torch.int32))),
    ("hidden", dict(hidden=torch.zeros(8, 8))),                     # loss needs [B,T,H]
    ("weight", dict(weight=torch.zeros(11, 9))),                    # hidden size mismatch
    ("weight", dict(weight=torch.zeros(11, 8, dtype=torch.bfloat16))),  # dtype mismatch
    ("bias", dict(bias=torch.zeros(12))),
    ("targets", dict(targets=torch.zeros(2, 4, dtype=torch.int32))),
    ("targets", dict(targets=torch.zeros(2, 5, dtype=torch.int64))),
    ("targets", dict(targets=torch.full((2, 4), 11))),              # out of range
    ("targets", dict(targets=torch.full((2, 4), -1))),
    ("mask", dict(mask=torch.ones(2, 5))),
    ("advantages", dict(advantages=torch.zeros(2, 3))),
    ("advantages", dict(advantages=torch.zeros(2, dtype=torch.int64))),
    ("old_logprobs", dict(old_logprobs=torch.zeros(2, 3))),
    ("ref_logprobs", dict(ref_logprobs=torch.zeros(4, 2))),
    ("rollout_is_ratio", dict(rollout_is_ratio=torch.zeros(2))),
    ("use_bias_correction_kl", dict(use_bias_correction_kl=1)),
    ("return_entropy", dict(return_entropy="no")),                   # a truthy string: returned entropy
    ("max_completion_length", dict(loss_type="dr_grpo", max_completion_length="abc")),
    ("delta", dict(delta=1.1)),                                      # not above 1 + epsilon_high
    ("delta", dict(delta=float("inf"))),
]


@pytest.mark.parametrize("name,over", BAD_LOSS_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in
                                                            enumerate(BAD_LOSS_INPUTS)])
def test_bad_loss_inputs(case, name, over):
    with pytest.raises(ValueError, match=name):
        _loss(case, **over)


def test_masked_targets_may_be_padding(case):
    t = case.targets.clone()
    m = case.mask.clone()
    m[1, 3] = False
    t[1, 3] = -100
    loss, _ = _loss(case, targets=t, mask=m, backend="torch")
    assert torch.isfinite(loss)
    t[1, 2] = -100   # now an unmasked position is out of range
    m[1, 2] = True
    with pytest.raises(ValueError, match="targets"):
        _loss(case, targets=t, mask=m)


def test_bad_linear_logprobs_inputs(case):
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(case.hidden, case.weight, case.targets[:, :2])
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(case.hidden, case.weight, torch.full((2, 4), 11))
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(case.hidden[0, 0], case.weight, case.targets[0, 0])
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(case.hidden.double(), case.weight.double(), case.targets, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(case.hidden, case.weight, case.targets, backend="cpu")
    with pytest.raises(ValueError, match="return_entropy: expected a bool"):
        linear_logprobs(case.hidden, case.weight, case.targets, return_entropy="no")
    import numpy as np

    assert isinstance(linear_logprobs(case.hidden, case.weight, case.targets, return_entropy=np.bool_(False)),
                      torch.Tensor)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearGRPOLoss(loss_type="x")
    with pytest.raises(ValueError, match="backend"):
        FusedLinearGRPOLoss(backend="x")
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearGRPOLoss(temperature=-1.0)


def test_triton_on_cpu_requires_interpreter(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_logprobs(case.hidden, case.weight, case.targets, backend="triton")


def test_auto_is_torch_on_cpu(case, monkeypatch):
    import r1vl.kernels.api as api
    assert api._resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    cuda = torch.device("cuda", 0)
    assert api._resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert api._resolve_backend("auto", cuda, torch.bfloat16, op="loss_token") == "torch"
    assert api._resolve_backend("auto", cuda, torch.bfloat16, op="loss_sequence") == "torch"
    assert api._resolve_backend("auto", cuda, torch.float64, op="loss_token") == "torch"
    a = linear_logprobs(case.hidden, case.weight, case.targets)
    b = linear_logprobs(case.hidden, case.weight, case.targets, backend="torch")
    assert torch.equal(a, b)


def test_interpreter_flag_set_by_conftest():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_device_mismatch(case):
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(case.hidden, case.weight.to("meta"), case.targets)
    with pytest.raises(ValueError, match="advantages"):
        _loss(case, advantages=case.advantages.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_views(backend):
    """A sliced [B, T, H] view of a longer sequence (the usual completion slice) and a
    transposed-storage weight give the same results as contiguous copies."""
    from r1vl.kernels import reference_grpo_loss
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    big = make_case(B=2, T=9, H=16, V=30, seed=40)
    hidden = big.hidden.to(dev)[:, 2:8]              # non-contiguous view
    weight = big.weight.to(dev).T.contiguous().T     # column-major storage
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    tg, m, adv = big.targets[:, 2:8].to(dev), big.mask[:, 2:8].to(dev), big.advantages.to(dev)
    h = hidden.detach().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, weight, tg, m, adv, backend=backend)
    (gh,) = torch.autograd.grad(loss, h)
    h64 = hidden.detach().double().requires_grad_()
    rloss, _ = reference_grpo_loss(h64, weight.double(), tg, m, adv)
    (rgh,) = torch.autograd.grad(rloss, h64)
    assert abs(loss.item() - rloss.item()) <= 1e-5
    assert float((gh.double() - rgh).abs().max()) <= 1e-4 * float(rgh.abs().max())


@pytest.mark.parametrize("onepass", ["1", "0"])
def test_autocast_does_not_change_the_result(case, monkeypatch, onepass):
    """Under torch.autocast (as a trainer's forward often runs) the LM-head GEMMs still give fp32
    logits from fp32 inputs: loss, metrics, gradients and log-probs as without autocast (the
    one-pass path crashed in scatter_add_, the two-pass path was silently ~3% off)."""
    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", onepass)

    def run(autocast):
        h = case.hidden.detach().clone().requires_grad_()
        w = case.weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, m = fused_linear_grpo_loss(h, w, case.targets, case.mask, case.advantages,
                                             old_logprobs=case.old, ref_logprobs=case.ref, backend="torch")
            loss.backward()  # backward under autocast too
            lp = linear_logprobs(h.detach(), w.detach(), case.targets, backend="torch")
        return loss.detach(), {k: v for k, v in m.items()}, h.grad, w.grad, lp

    plain, cast = run(False), run(True)
    assert cast[0].dtype == torch.float32
    torch.testing.assert_close(cast[0], plain[0], rtol=1e-6, atol=1e-7)
    for k in plain[1]:
        torch.testing.assert_close(cast[1][k], plain[1][k], rtol=1e-6, atol=1e-7)
    for a, b in zip(cast[2:], plain[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_numbers_of_other_kinds_and_num_items(case, monkeypatch):
    """Hyper-parameters as numpy scalars or 0-dim tensors (other trainers' configs hold them);
    num_items_in_batch as a 1-element tensor gives a 0-dim loss on every path, and 0 (no
    completion token anywhere) counts as 1, as TRL clamps it."""
    import numpy as np

    base, _ = _loss(case, loss_type="dapo", num_items_in_batch=7.0, old_logprobs=case.old, ref_logprobs=case.ref)
    for beta in (np.float32(0.04), torch.tensor(0.04)):
        got, _ = _loss(case, loss_type="dapo", num_items_in_batch=7.0, old_logprobs=case.old,
                       ref_logprobs=case.ref, beta=beta, epsilon_low=np.float64(0.2), temperature=torch.tensor(1.0))
        torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-7)
    for onepass in ("1", "0"):
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", onepass)
        got, _ = _loss(case, loss_type="dapo", num_items_in_batch=torch.tensor([7.0]), old_logprobs=case.old,
                       ref_logprobs=case.ref)
        assert got.shape == () and torch.allclose(got, base)
        zero, _ = _loss(case, loss_type="dapo", num_items_in_batch=0)
        one, _ = _loss(case, loss_type="dapo", num_items_in_batch=1)
        assert torch.equal(zero, one)


def test_module_takes_numbers_as_the_function_does(case):
    """FusedLinearGRPOLoss took numpy scalars / 0-dim tensors as "expected a number" (the
    function takes them), no numpy integer max_completion_length (neither did the function), and
    a bad max_completion_length only at the first call; num_items_in_batch below 1 (TRL's count
    already divided by the processes) was raised to 1."""
    import numpy as np

    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, delta=1.5, loss_type="dr_grpo",
              max_completion_length=7)
    want, _ = FusedLinearGRPOLoss(**kw)(case.hidden, case.weight, case.targets, case.mask, case.advantages,
                                        old_logprobs=case.old, ref_logprobs=case.ref)
    odd = dict(kw, beta=np.float32(0.04), epsilon_high=np.float32(0.28), temperature=torch.tensor(0.7),
               delta=np.float32(1.5), max_completion_length=np.int64(7), return_entropy=np.bool_(False))
    got, m = FusedLinearGRPOLoss(**odd)(case.hidden, case.weight, case.targets, case.mask, case.advantages,
                                        old_logprobs=case.old, ref_logprobs=case.ref)
    torch.testing.assert_close(got, want)
    assert "entropy" not in m
    got, _ = _loss(case, **dict(odd, old_logprobs=case.old, ref_logprobs=case.ref))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="max_completion_length: expected a positive int, got 'abc'"):
        FusedLinearGRPOLoss(loss_type="dr_grpo", max_completion_length="abc")
    with pytest.raises(ValueError, match="return_entropy: expected a bool"):
        FusedLinearGRPOLoss(return_entropy="no")
    one, _ = _loss(case, loss_type="dapo", num_items_in_batch=1.0, old_logprobs=case.old, ref_logprobs=case.ref)
    half, _ = _loss(case, loss_type="dapo", num_items_in_batch=0.5, old_logprobs=case.old, ref_logprobs=case.ref)
    torch.testing.assert_close(half, 2 * one)


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton"])
def test_constants_made_under_inference_mode(case, backend, monkeypatch):
    """Rollout code often makes old/ref log-probs, the mask and advantages under
    torch.inference_mode: "Inference tensors cannot be saved for backward" on the one-pass
    path (old/ref/mask/advantages) and the two-pass one (advantages); now the same loss and
    gradients as with ordinary tensors."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
    be = "triton" if backend == "triton" else "torch"
    case = _on_device(case, be)
    with torch.inference_mode():
        inf = [x.clone() for x in (case.targets, case.mask, case.advantages, case.old, case.ref, case.bias)]
    assert all(x.is_inference() for x in inf)
    out = []
    for targets, mask, adv, old, ref, bias in ((case.targets, case.mask, case.advantages, case.old, case.ref,
                                                case.bias), inf):
        h = case.hidden.clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, case.weight, targets, mask, adv, bias=bias, old_logprobs=old,
                                         ref_logprobs=ref, backend=be)
        loss.backward()
        out.append((loss.detach(), h.grad))
    torch.testing.assert_close(out[1], out[0])


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton"])
def test_double_backward_is_a_clear_error(case, backend, monkeypatch):
    """create_graph=True: the gradient had no graph (one-pass, Triton: a gradient penalty got a
    zero second-order term, silently) or failed with "modified by an inplace operation"
    (two-pass); now a RuntimeError says the loss is differentiable once."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
    be = "triton" if backend == "triton" else "torch"
    case = _on_device(case, be)
    h = case.hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, case.weight, case.targets, case.mask, case.advantages,
                                     old_logprobs=case.old, ref_logprobs=case.ref, backend=be)
    with pytest.raises(RuntimeError, match="differentiable once; create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)
    lp = linear_logprobs(h, case.weight, case.targets, backend=be)
    with pytest.raises(RuntimeError, match="differentiable once; create_graph=True"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)
    (g,) = torch.autograd.grad(lp.sum(), h)  # once: as before
    assert g.shape == h.shape and not g.requires_grad


def test_chunk_size_variable_is_not_read_on_cpu(monkeypatch):
    """R1VL_ONEPASS_CHUNK_MB sizes CUDA chunks; CPU chunks ignore it (a bad value raised there)."""
    from r1vl.kernels import onepass

    monkeypatch.setenv("R1VL_ONEPASS_CHUNK_MB", "lots")
    assert onepass._budget(torch.device("cpu")) == onepass.CHUNK_BYTES_CPU
    with pytest.raises(ValueError, match="R1VL_ONEPASS_CHUNK_MB='lots'"):
        onepass._budget(torch.device("cuda"))


def test_trl_shapes_of_advantages_and_the_sequence_ratio(case):
    """advantages [B, 1] (TRL's advantages[:, None]) and a rollout ratio [B, 1] (TRL's
    sequence-level importance_sampling_ratio) are the [B] and [B, T] forms."""
    ris = torch.tensor([[0.8], [1.3]])
    for level in ("token", "sequence"):
        want, wm = _loss(case, old_logprobs=case.old, rollout_is_ratio=ris.expand(2, 4).contiguous(),
                         importance_sampling_level=level)
        got, gm = _loss(case, old_logprobs=case.old, rollout_is_ratio=ris, advantages=case.advantages[:, None],
                        importance_sampling_level=level)
        torch.testing.assert_close(got, want)
        for k in wm:
            torch.testing.assert_close(gm[k], wm[k])


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_token_level_advantages(case, backend, level, monkeypatch):
    """advantages [B, T] equal along each row give the [B] results, at either importance-sampling
    level (loss, metrics, gradients); what they hold at masked positions (NaN, inf) is never read."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
        backend = "torch"
    case = _on_device(case, backend)
    mask = case.mask.clone()
    mask[0, 2:] = False
    kw = dict(old_logprobs=case.old, ref_logprobs=case.ref, mask=mask, backend=backend,
              importance_sampling_level=level)

    def run(adv):
        h, w = (x.detach().clone().requires_grad_() for x in (case.hidden, case.weight))
        loss, metrics = _loss(case, hidden=h, weight=w, advantages=adv, **kw)
        loss.backward()
        return loss, metrics, h.grad, w.grad

    want = run(case.advantages)
    rows = case.advantages[:, None].expand(2, 4).clone()
    rows[0, 2] = float("nan")
    rows[0, 3] = float("inf")
    got = run(rows)
    assert torch.isfinite(got[0]) and torch.isfinite(got[3]).all()
    torch.testing.assert_close(got[0], want[0])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])
    # and a per-token change moves the loss (the tokens' own advantages are used)
    other = rows.clone()
    other[1, 0] += 1.0   # mask[:, 0] is on in every case
    assert abs(run(other)[0].item() - want[0].item()) > 1e-4


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_an_empty_batch_gives_zero(backend, level, monkeypatch):
    """B = 0 (a data-parallel rank left without rows, e.g. after zero-advantage groups were
    filtered): loss 0 and empty gradients for every loss type, not NaN (grpo's mean over no
    sequences, dr_grpo's 0·L normaliser) or a ZeroDivisionError (Triton's 1/B)."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
        backend = "torch"
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        h = torch.zeros(0, 4, 8, device=dev, requires_grad=True)
        w = torch.randn(11, 8, device=dev, requires_grad=True)
        z = torch.zeros(0, 4, device=dev)
        loss, metrics = fused_linear_grpo_loss(
            h, w, torch.zeros(0, 4, dtype=torch.int64, device=dev), torch.ones(0, 4, device=dev),
            torch.zeros(0, device=dev), old_logprobs=z, ref_logprobs=z, backend=backend,
            loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
        loss.backward()
        assert loss.item() == 0.0, (loss_type, loss)
        assert all(float(v) == 0.0 for v in metrics.values()), (loss_type, metrics)
        assert h.grad.shape == (0, 4, 8) and float(w.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_non_reentrant_checkpoint_around_the_loss_runs_its_sweep_once(monkeypatch, level):
    """torch.utils.checkpoint(use_reentrant=False) around the one-pass loss: one sweep over the
    chunks, the same gradients. Its saved-tensor hooks reached the small per-chunk graph the
    loss differentiates inside forward, and each chunk's unpacking re-ran the whole function
    (5 sweeps at 4 chunks, quadratic in the token count); backward's read of ctx.saved_tensors
    (for a dtype) re-ran it once more."""
    import r1vl.kernels.onepass as onepass
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "1")
    case = make_case(B=3, T=9, H=24, V=61, seed=7)
    monkeypatch.setattr(onepass, "CHUNK_BYTES_CPU", 4 * 61 * 4)  # 4 rows a chunk: several chunks
    sweeps = []
    sweep = onepass._sweep
    monkeypatch.setattr(onepass, "_sweep", lambda *a, **k: sweeps.append(1) or sweep(*a, **k))

    def loss(h, w, b):
        return fused_linear_grpo_loss(h * 1.0, w, case.targets, case.mask, case.advantages, bias=b,
                                      old_logprobs=case.old, ref_logprobs=case.ref, beta=0.04,
                                      importance_sampling_level=level, backend="torch")[0]

    grads = []
    for wrap in (False, True):
        leaves = [x.detach().clone().requires_grad_() for x in (case.hidden, case.weight, case.bias)]
        sweeps.clear()
        out = checkpoint(loss, *leaves, use_reentrant=False) if wrap else loss(*leaves)
        out.backward()
        assert len(sweeps) == 1, (wrap, len(sweeps))
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_a_sharded_dtensor_weight_is_refused_with_the_ways_out(tmp_path):
    """FSDP2's parameters are DTensors outside the forward of the module it wrapped: torch's
    "got mixed torch.Tensor and DTensor" came from deep inside the kernel. (A one-process gloo
    group in a subprocess, so that this process's tests keep no process group.)"""
    import subprocess
    import sys

    script = tmp_path / "dtensor.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import Shard, distribute_tensor\n"
        "from r1vl.kernels import fused_linear_grpo_loss, linear_logprobs\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "w = distribute_tensor(torch.randn(20, 8), init_device_mesh('cpu', (1,)), [Shard(0)])\n"
        "h, t = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)\n"
        "for call in (lambda: fused_linear_grpo_loss(h, w, t, torch.ones(2, 3), torch.zeros(2)),\n"
        "             lambda: linear_logprobs(h, w, t)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print('refused:', e)\n"
        "print('plain:', linear_logprobs(h, w.full_tensor(), t).shape)\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "plain: torch.Size([2, 3])", r.stdout
    for line in lines[:2]:
        assert line.startswith("refused: weight: a DTensor (sharded: FSDP2's fully_shard, tensor parallelism)") \
            and "module.unshard()" in line and "weight.full_tensor()" in line, line


def test_a_deepspeed_zero3_partition_is_refused_with_the_ways_out(tmp_path):
    """A ZeRO-3 parameter read outside a forward under the engine is an empty placeholder on
    every rank: the kernel said only "expected shape [V, 8], got (0,)". Gathered, the same call
    runs. (A one-process gloo group in a subprocess, so that this process keeps no group.)"""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3.py"
    script.write_text(
        "import os, torch, deepspeed\n"
        "from r1vl.ds import prepare_runtime\n"
        "from r1vl.kernels import fused_linear_grpo_loss, linear_logprobs\n"
        "prepare_runtime()  # (no shared-memory op built on CPU)\n"
        f"torch.distributed.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, "
        "world_size=1)\n"
        "with deepspeed.zero.Init(config_dict_or_path={'zero_optimization': {'stage': 3}, "
        "'train_micro_batch_size_per_gpu': 1}):\n"
        "    head = torch.nn.Linear(8, 20, bias=True)\n"
        "h, t = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)\n"
        "for call in (lambda: fused_linear_grpo_loss(h, head.weight, t, torch.ones(2, 3), torch.zeros(2)),\n"
        "             lambda: linear_logprobs(h, head.weight, t)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print('refused:', e)\n"
        "with deepspeed.zero.GatheredParameters([head.weight]):\n"
        "    print('gathered:', linear_logprobs(h, head.weight, t).shape)\n"
        "torch.distributed.destroy_process_group()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
                            "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "LOCAL_RANK": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "gathered: torch.Size([2, 3])", r.stdout
    for line in lines[:2]:
        assert line.startswith("refused: weight: a DeepSpeed ZeRO-3 partition, empty on this rank until gathered "
                               "(whole shape [20, 8])") and "deepspeed.zero.GatheredParameters([weight])" in line, line


def test_hidden_and_weight_of_two_dtypes_are_refused_with_the_cast():
    case = make_case()
    with pytest.raises(ValueError, match=r"weight: expected hidden's dtype torch.bfloat16 \(one dtype for both\), "
                                         r"got torch.float32: cast one to the other's, e.g. hidden.to\(weight.dtype\)"):
        fused_linear_grpo_loss(case.hidden.bfloat16(), case.weight, case.targets.clamp(min=0), case.mask,
                               case.advantages)


def test_the_loss_inside_an_fsdp2_forward_trains_as_the_unsharded_model(tmp_path):
    """What the DTensor refusal above tells a caller to do: compute the loss inside the forward of
    the module FSDP2 wrapped, here the LM head's own (fully_shard'ed by itself: its hooks unshard
    its weight there, and reduce-scatter its gradient after). Two CPU processes under torchrun
    (tests/fsdp2_kernel_worker.py), each on its own batch, take 2 SGD steps that must end where
    one unsharded model ends on the mean of the two losses; the forward-only log-probs (old /
    reference) taken the same way must equal the unsharded model's."""
    import subprocess
    import sys
    from pathlib import Path

    from ports import free_port

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), str(root / "tests" / "fsdp2_kernel_worker.py"), str(tmp_path)],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(tmp_path / "fsdp2.pt")
    torch.testing.assert_close(res["old_fsdp"], res["old_unsharded"], rtol=0, atol=1e-6)
    assert (res["unsharded"] - res["init"]).abs().max() > 1e-2  # the steps moved the weights
    assert (res["head_fsdp"] - res["head_init"]).abs().max() > 1e-2  # the sharded head's too
    torch.testing.assert_close(res["fsdp"], res["unsharded"], rtol=0, atol=1e-6)
