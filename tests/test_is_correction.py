"""Truncated importance sampling helpers (r1vl.rollout.is_correction)."""
import math

import pytest
import torch

from r1vl.rollout.is_correction import is_ratio_stats, pad_engine_logprobs, truncated_is_ratio


def test_ratio_is_exp_of_difference_and_truncated():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    engine = torch.tensor([[-1.0, -2.5, -3.0, -0.1]])
    r = truncated_is_ratio(trainer, engine, cap=2.0)
    expected = torch.tensor([[1.0, math.exp(0.5), 2.0, math.exp(-2.9)]])
    torch.testing.assert_close(r, expected)


def test_in_sync_is_one_and_padding_is_one():
    lp = torch.randn(3, 5).clamp(max=0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    r = truncated_is_ratio(lp, lp.clone(), mask)
    assert torch.equal(r, torch.ones_like(r))
    r2 = truncated_is_ratio(lp, lp - 5.0, mask)  # engine far less likely: capped on real tokens
    assert torch.equal(r2[mask], torch.full_like(r2[mask], 2.0))
    assert torch.equal(r2[~mask], torch.ones_like(r2[~mask]))


def test_no_gradient_no_overflow():
    trainer = torch.tensor([0.0, -1e4, -math.inf], requires_grad=True)
    engine = torch.tensor([-1e4, 0.0, -math.inf])
    r = truncated_is_ratio(trainer, engine, cap=3.0)
    assert not r.requires_grad
    assert torch.isfinite(r).all()
    torch.testing.assert_close(r, torch.tensor([3.0, 0.0, 1.0]))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        truncated_is_ratio(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="is_cap"):
        truncated_is_ratio(torch.zeros(2), torch.zeros(2), cap=0.0)


def test_stats_over_real_tokens():
    r = torch.tensor([[1.0, 2.0, 5.0], [0.5, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    s = is_ratio_stats(r, mask, cap=2.0)
    assert s["is_ratio_mean"] == pytest.approx(1.25)
    assert s["is_ratio_max"] == 2.0 and s["is_ratio_min"] == 0.5
    assert s["is_ratio_capped_frac"] == pytest.approx(0.25)
    assert is_ratio_stats(r, torch.zeros_like(mask))["is_ratio_mean"] == 1.0


def test_pad_engine_logprobs():
    v, m = pad_engine_logprobs([[-0.1, -0.2], None, [-1.0, -2.0, -3.0, -4.0]], 3)
    assert v.shape == (3, 3) and m.dtype == torch.bool
    torch.testing.assert_close(v[0], torch.tensor([-0.1, -0.2, 0.0]))
    assert m.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    torch.testing.assert_close(v[2], torch.tensor([-1.0, -2.0, -3.0]))


def _trl_ratio(old, sampling, mask, mode, clip_max):
    """TRL 1.16's steps (GRPOTrainer._generate_and_score_completions), written out."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    r = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(r, max=clip_max)
    return r.masked_fill(r > clip_max, 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_modes_match_trl(mode):
    from r1vl.rollout.is_correction import is_ratio

    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=g) * 3
    engine = old + 0.5 * torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, :] = False
    r = is_ratio(old, engine, mask, cap=1.5, mode=mode)
    want = _trl_ratio(old, engine, mask.float(), mode, 1.5).expand(4, 6)
    torch.testing.assert_close(r[mask], want[mask])
    assert torch.equal(r[~mask], torch.ones_like(r[~mask]))
    # the cases reach the cap: some ratios truncated (or masked), some not
    acted = (r[mask] == 0) if mode.endswith("mask") else (r[mask] >= 1.5 - 1e-6)
    assert 0 < int(acted.sum()) < int(mask.sum())
    st = is_ratio_stats(r, mask, cap=1.5, mode=mode)
    assert st["is_ratio_capped_frac"] == pytest.approx(float(acted.float().mean()))


def test_unknown_mode_is_a_clear_error():
    from r1vl.rollout.is_correction import is_ratio

    with pytest.raises(ValueError, match="rollout.is_mode"):
        is_ratio(torch.zeros(1, 2), torch.zeros(1, 2), mode="sequence")
