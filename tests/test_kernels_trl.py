"""The fused loss against TRL's own code: GRPOTrainer._compute_loss (trl 1.16.0, pinned in
the dev extra) on the same hidden states, weights and inputs.

kernels/reference.py is our reading of TRL's objective; every other kernel test compares
with it. This module compares with TRL itself, so a misreading of TRL (a normaliser, the
sequence-level ratio, where the vLLM importance-sampling ratio or the KL term enter, a
clip-ratio metric) fails here even when the reference and the kernels agree with each other.

TRL's method is called on a stand-in for the trainer that holds only the attributes the
method reads (one process, no gradient accumulation, train mode) and whose
`_get_per_token_logps_and_entropies` returns log-probs and entropies of materialised fp64
logits, log_softmax((h·Wᵀ + b)/τ): TRL's loss aggregation and metrics, on the same values.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

try:
    from trl import GRPOTrainer  # trl==1.16.0: the dev extra
except Exception as e:  # a GPU session's image may lack trl; CI (no CUDA) must have it
    if not torch.cuda.is_available():
        raise
    pytest.skip(f"trl not importable here: {e}", allow_module_level=True)

from kernel_cases import make_case, rel_err  # noqa: E402
from r1vl.kernels import fused_linear_grpo_loss, reference_grpo_loss, reference_linear_logprobs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


class _Identity:
    """accelerate.Accelerator with one process: gather / reduce return their input."""
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(case, h, w, b, *, loss_type, level, beta, temperature, use_ris, kl_is=False, use_old=True,
              delta=None, max_completion_length=None, num_items_in_batch=None):
    """TRL's loss, its metrics and its (loss-side) per-token log-probs for `case`, with
    gradients reaching the fp64 leaves h, w, b."""
    B, T = case.targets.shape

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        assert logits_to_keep == T
        lp, ent = reference_linear_logprobs(h, w, case.targets.clamp(min=0), bias=b,
                                            temperature=temperature, return_entropy=True)
        return lp, ent, None

    args = SimpleNamespace(use_bias_correction_kl=kl_is, delta=delta, steps_per_generation=1)
    fake = SimpleNamespace(
        args=args, model=SimpleNamespace(training=True), accelerator=_Identity(),
        beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
        importance_sampling_level=level, max_completion_length=max_completion_length,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=use_ris, vllm_importance_sampling_correction=use_ris,
        current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=logps_and_entropies,
    )
    mask = case.mask.to(torch.int64)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.int64),
        "prompt_mask": torch.ones(B, 2, dtype=torch.int64),
        "completion_ids": case.targets.clamp(min=0),
        "completion_mask": mask,
        "advantages": case.advantages.double(),
    }
    if use_old:  # else TRL takes the detached current log-probs (ratio 1, live gradient)
        inputs["old_per_token_logps"] = case.old.double()
    if beta != 0.0:
        inputs["ref_per_token_logps"] = case.ref.double()
    if use_ris:
        inputs["importance_sampling_ratio"] = case.ris.double()
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch), dtype=torch.float64)
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss, metrics


# (loss_type, importance_sampling_level, beta, temperature, vLLM IS ratio,
#  use_bias_correction_kl, old log-probs given)
CASES = [
    ("grpo", "token", 0.04, 1.0, False, False, True),      # the R1-VL recipe
    ("grpo", "token", 0.0, 0.7, True, False, True),
    ("grpo", "sequence", 0.04, 0.7, True, False, True),
    ("bnpo", "token", 0.04, 1.0, True, False, True),
    ("bnpo", "sequence", 0.0, 1.0, False, False, True),
    ("dr_grpo", "token", 0.04, 0.9, False, False, True),
    ("dapo", "token", 0.04, 1.0, True, False, True),
    ("dapo", "sequence", 0.04, 0.8, False, False, True),
    # TRL's default KL (times the ratio): with old log-probs, and without (μ = 1: the ratio is
    # 1 but its gradient is not, so the KL term's gradient changes)
    ("grpo", "token", 0.04, 1.0, False, True, True),
    ("grpo", "token", 0.04, 1.0, False, True, False),
    ("grpo", "sequence", 0.04, 0.7, True, True, True),
    ("dapo", "sequence", 0.04, 1.0, False, True, False),
    ("bnpo", "token", 0.04, 0.8, True, True, True),
]
IDS = ["-".join(map(str, c[:5])) + ("-klis" if c[5] else "") + ("" if c[6] else "-noold") for c in CASES]
PARAMS = "loss_type,level,beta,temperature,use_ris,kl_is,use_old"


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton", "reference"])
@pytest.mark.parametrize(PARAMS, CASES, ids=IDS)
def test_loss_metrics_and_gradients_match_trl(backend, loss_type, level, beta, temperature,
                                              use_ris, kl_is, use_old, monkeypatch):
    """Both backends (torch: one-pass, and the two-pass path long sequences take), and the fp64
    reference the other kernel tests compare with. On CUDA tensors where there is a GPU (as
    test_kernels_triton: Triton runs on CPU tensors only in its interpreter)."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
        backend = "torch"
    # on a GPU at test_kernels_triton's CUDA sizes: their autotuning is reused (device time is short)
    size = dict(H=320, V=3001) if DEV == "cuda" else {}
    _compare(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, DEV, **size)


CUDA_CASES = [0, 2, 6, 10]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize(PARAMS, [CASES[i] for i in CUDA_CASES], ids=[IDS[i] for i in CUDA_CASES])
def test_loss_metrics_and_gradients_match_trl_cuda(backend, loss_type, level, beta, temperature,
                                                   use_ris, kl_is, use_old):
    """fp32 on the GPU: the compiled Triton kernels and the CUDA torch path (row kernels), at
    the hidden / vocabulary sizes of test_kernels_triton's CUDA cases (their autotuning is
    reused: device time is short)."""
    _compare(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, "cuda", H=320, V=3001)


# TRL's two-sided clipping: delta caps the ratio of negative-advantage tokens above it
DELTA_CASES = [("grpo", "token", 0.04, 1.0, False, False, True, 1.3),
               ("grpo", "sequence", 0.04, 1.0, True, True, True, 1.29),
               ("dapo", "token", 0.04, 0.8, True, True, True, 1.3)]


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton", "reference"])
@pytest.mark.parametrize(PARAMS + ",delta", DELTA_CASES, ids=["-".join(map(str, c[:2])) + f"-delta{c[-1]}"
                                                              for c in DELTA_CASES])
def test_delta_matches_trl(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, delta,
                           monkeypatch):
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
        backend = "torch"
    size = dict(H=320, V=3001) if DEV == "cuda" else {}
    _compare(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, DEV, delta=delta, **size)


# one advantage per token ([B, T]: TRL's GRPOTrainer takes them for its subclasses)
TOKEN_ADV_CASES = [CASES[0], CASES[2], CASES[7], CASES[12]]


@pytest.mark.parametrize("backend", ["torch", "torch-twopass", "triton", "reference"])
@pytest.mark.parametrize(PARAMS, TOKEN_ADV_CASES, ids=[IDS[CASES.index(c)] for c in TOKEN_ADV_CASES])
def test_token_level_advantages_match_trl(backend, loss_type, level, beta, temperature, use_ris, kl_is,
                                          use_old, monkeypatch):
    """advantages [B, T] varying along each sequence (signs mixed inside rows): loss,
    gradients and TRL's metrics (clip ratios then a share of tokens at both levels)."""
    if backend == "torch-twopass":
        monkeypatch.setenv("R1VL_KERNEL_ONEPASS", "0")
        backend = "torch"
    size = dict(H=320, V=3001) if DEV == "cuda" else {}
    _compare(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, DEV, token_adv=True,
             **size)


def _compare(backend, loss_type, level, beta, temperature, use_ris, kl_is, use_old, device, H=32, V=64,
             delta=None, token_adv=False):
    # a fully masked row (padding ids -100) and partial masks: TRL's clamp(min=1) paths
    case = make_case(B=4, T=6, H=H, V=V, seed=6, masked_row=2)
    B, T = case.targets.shape
    # old / ref log-probs near the policy's at the sampling temperature, as in a run
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lp = reference_linear_logprobs(case.hidden, case.weight, case.targets.clamp(min=0),
                                       bias=case.bias, temperature=temperature).float()
    case.old = lp + 0.3 * torch.randn(B, T, generator=g)
    case.ref = lp + 0.2 * torch.randn(B, T, generator=g)
    if delta is not None:
        # delta acts on negative advantages: make the row whose sequence ratio is largest one
        case.advantages = -case.advantages
    if token_adv:
        case.advantages = case.advantages[:, None] + torch.randn(B, T, generator=g)
        live = case.advantages[case.mask]
        assert (live > 0).any() and (live < 0).any()
    extra = {}
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = T + 2
    if loss_type == "dapo":
        # TRL's dapo divides by num_items_in_batch (the generation batch's tokens) / processes
        extra["num_items_in_batch"] = int(case.mask.sum()) + 5

    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    common = dict(loss_type=loss_type, level=level, beta=beta, temperature=temperature, use_ris=use_ris,
                  kl_is=kl_is, use_old=use_old, **extra)
    tloss, tmetrics = _trl_loss(case, h64, w64, b64, delta=delta, **common)
    if delta is not None:  # the case must reach the cap, or the delta checks prove little
        with torch.no_grad():
            undelta, _ = _trl_loss(case, h64, w64, b64, **common)
        assert abs(float(undelta) - float(tloss.detach())) > 1e-6, "delta changed nothing in this case"

    h, w, b = (x.detach().clone().to(device).requires_grad_() for x in (case.hidden, case.weight, case.bias))
    on = {k: getattr(case, k).to(device) for k in ("targets", "mask", "advantages", "old", "ref", "ris")}
    args = (h, w, on["targets"], on["mask"], on["advantages"])
    kw = dict(bias=b, old_logprobs=on["old"] if use_old else None, ref_logprobs=on["ref"] if beta != 0.0 else None,
              beta=beta, epsilon_low=0.2, epsilon_high=0.28, temperature=temperature, loss_type=loss_type,
              importance_sampling_level=level, rollout_is_ratio=on["ris"] if use_ris else None,
              return_entropy=True, use_bias_correction_kl=kl_is, delta=delta, **extra)
    if backend == "reference":
        loss, metrics = reference_grpo_loss(*args, **kw)
    else:
        loss, metrics = fused_linear_grpo_loss(*args, backend=backend, **kw)

    lv, tv = float(loss.detach()), float(tloss.detach())
    assert abs(lv - tv) <= 1e-5 * max(1.0, abs(tv)), (lv, tv)
    # TRL's metric names -> ours (TRL logs kl only when beta != 0, entropy always)
    pairs = {"entropy": "entropy", "clip_ratio/low_mean": "clip_ratio_low",
             "clip_ratio/high_mean": "clip_ratio_high", "clip_ratio/region_mean": "clip_ratio"}
    if beta != 0.0:
        pairs["kl"] = "kl"
    assert set(pairs) <= set(tmetrics), sorted(tmetrics)
    for tk, ok in pairs.items():
        assert abs(float(metrics[ok]) - tmetrics[tk]) <= 1e-5, (tk, float(metrics[ok]), tmetrics[tk])
    # the case must clip on both sides, or the clip checks prove little (without old log-probs
    # the ratio is 1: nothing clips)
    if not use_old:
        assert tmetrics["clip_ratio/region_mean"] == 0, tmetrics
    elif delta is not None:
        pass  # checked above: the cap changed the loss
    elif level == "token":
        assert tmetrics["clip_ratio/low_mean"] > 0 and tmetrics["clip_ratio/high_mean"] > 0, tmetrics
    else:
        assert tmetrics["clip_ratio/region_mean"] > 0, tmetrics

    grads = torch.autograd.grad(loss, (h, w, b))
    tgrads = torch.autograd.grad(tloss, (h64, w64, b64))
    for name, g, tg in zip(("hidden", "weight", "bias"), grads, tgrads):
        assert float(tg.abs().max()) > 0, name
        assert rel_err(g.cpu(), tg) <= 1e-4, (name, rel_err(g.cpu(), tg))
