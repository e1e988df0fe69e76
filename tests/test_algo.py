"""StepGRPO algorithm pieces: advantages, batch building / slicing, log-probs, the update step."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from r1vl.algo import (SeqBatch, UpdateConfig, build_batch, compute_logprobs, group_advantages, grpo_update,
                       lr_lambda, micro_batches, sft_step)
from r1vl.models import PolicyWithLoss, build_tiny

CORPUS = [f"### Step 1: {a} + {b} = {a + b}\n### The final answer is: {a + b}" for a in range(12) for b in range(12)]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_values():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    g = r[:4]
    want = (g - g.mean()) / (g.std() + 1e-4)  # unbiased std, as TRL / the R1-VL code
    torch.testing.assert_close(a[:4], want)
    assert torch.equal(a[4:], torch.zeros(4))  # identical rewards: no signal, no NaN
    # also where float32's mean of the group is a rounding off (2.1: every answer right with every
    # key step; 1.2, 1.3: the group's advantages were ±1e-3 to ±2e-3, one sign for the whole group)
    for v in (2.1, 1.2, 1.3, 0.1, 1 / 3, 1.1 + 1.0):
        for rewards in (torch.full((8,), v), [v] * 8, torch.full((8,), v, dtype=torch.float64)):
            got = group_advantages(rewards, 8)
            assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(8)), (v, got)
    torch.testing.assert_close(group_advantages(r, 4, scale=False)[:4], g - g.mean())
    # groups are normalised independently, prompt-major
    a2 = group_advantages(torch.tensor([0.0, 1.0, 10.0, 30.0]), 2)
    s1, s2 = 0.5 ** 0.5, 200 ** 0.5
    want2 = torch.tensor([-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), -10 / (s2 + 1e-4), 10 / (s2 + 1e-4)])
    torch.testing.assert_close(a2, want2)
    # sums to zero within each group
    x = torch.randn(24)
    assert group_advantages(x, 6).view(4, 6).sum(1).abs().max() < 1e-4



def test_group_advantages_scale_modes_as_trl():
    """TRL's scale_rewards: "group" (= True), "batch" (one unbiased std over the whole batch,
    or the one given: the trainer's over all ranks) and "none" (= False)."""
    r = torch.tensor([0.0, 1.0, 1.0, 2.1, 2.1, 2.1, 2.1, 0.1])
    g = r.double().view(2, 4)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(group_advantages(r, 4, scale="group"), group_advantages(r, 4, scale=True))
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), group_advantages(r, 4, scale=False))
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), centred.float())
    batch = group_advantages(r, 4, scale="batch")
    torch.testing.assert_close(batch, (centred / (r.double().std() + 1e-4)).float())
    assert not torch.allclose(batch, group_advantages(r, 4, scale="group"))
    torch.testing.assert_close(group_advantages(r, 4, scale="batch", batch_std=2.0), (centred / (2.0 + 1e-4)).float())
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, scale="global")

def test_reward_std_one_process_is_unbiased():
    """scale_rewards="batch" without other ranks: the unbiased std (TRL's torch.std), by hand:
    [1, 2, 3, 4] has squared deviations 5, so sqrt(5 / 3); one reward has none (0)."""
    from r1vl.algo import reward_std

    assert reward_std(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((5 / 3) ** 0.5, rel=1e-12)
    assert reward_std(torch.tensor([2.5])) == 0.0


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_micro_batches_and_schedule():
    assert micro_batches(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        micro_batches(3, 0)
    f = lr_lambda("cosine", 10, 2, final_ratio=0.1)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert abs(f(10) - 0.1) < 1e-9
    assert lr_lambda("constant", 10, 0)(7) == 1.0
    assert lr_lambda("linear", 10, 0)(5) == pytest.approx(0.5)


# --------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny(CORPUS, vocab_size=320, seed=0, **SIZES)
    return model, proc


def _img(seed, w=56, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _batch(proc, n=6, seed=0):
    rng = np.random.default_rng(seed)
    texts = [proc.chat_prompt("What is " + " + ".join(str(x) for x in rng.integers(0, 9, size=1 + i % 3)) + "?")
             for i in range(n)]
    images = [_img(seed * 100 + i, 56 if i % 2 else 84, 56) for i in range(n)]
    hi = len(proc.tokenizer)  # ordinary tokens only (the 14 special tokens come first)
    conts = [rng.integers(20, hi, size=int(rng.integers(2, 9))).tolist() for _ in range(n)]
    return build_batch(proc, texts, images, conts), conts


def test_build_batch_layout(tiny):
    _, proc = tiny
    b, conts = _batch(proc)
    B, T = b.targets.shape
    assert B == 6 and T == max(len(c) for c in conts)
    for i, c in enumerate(conts):
        assert b.targets[i, : len(c)].tolist() == c
        assert b.mask[i].sum() == len(c)
        assert b.inputs["input_ids"][i, b.start: b.start + len(c)].tolist() == c
    assert b.inputs["input_ids"].shape == (B, b.start + T)
    assert (b.inputs["attention_mask"][:, b.start - 1] == 1).all()  # left padding: prompts end together
    assert b.inputs["image_grid_thw"].shape[0] == 6
    assert b.inputs["pixel_values"].shape[0] == int(b.inputs["image_grid_thw"].prod(-1).sum())
    # one <|image_pad|> per merged patch
    n_img_tokens = (b.inputs["input_ids"] == proc.image_token_id).sum(1)
    assert n_img_tokens.tolist() == (b.inputs["image_grid_thw"].prod(-1) // 4).tolist()


def test_compact_images_store_a_group_image_once_and_slice_as_before(tiny):
    """The trainer's StepGRPO batch: G rows per prompt share the prompt's image object.
    compact_images keeps one pixel block per image object (not G copies) and every slice, in
    any order of rows, equals the expanded batch's; tokens too (each prompt tokenised once)."""
    _, proc = tiny
    rng = np.random.default_rng(3)
    prompts = [proc.chat_prompt(f"What is {k} + {k + 1}?") for k in range(3)]
    images = [_img(300 + k, 56 if k % 2 else 84, 56) for k in range(3)]
    rows = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    texts, imgs = [prompts[r] for r in rows], [images[r] for r in rows]
    imgs[4] = _img(301, 56, 56)  # an equal image, another object: its own block
    conts = [rng.integers(20, len(proc.tokenizer), size=int(rng.integers(2, 9))).tolist() for _ in rows]
    full = build_batch(proc, texts, imgs, conts, dtype=torch.bfloat16)
    compact = build_batch(proc, texts, imgs, conts, dtype=torch.bfloat16, compact_images=True)
    sizes = full.inputs["image_grid_thw"].prod(-1)
    assert compact.inputs["pixel_values"].shape[0] == int(sizes[[0, 3, 4, 6]].sum())  # 4 objects, not 9
    assert full.inputs["pixel_values"].shape[0] == int(sizes.sum())
    assert compact.image_index == [0, 0, 0, 1, 2, 1, 3, 3, 3]
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(compact.inputs[k], full.inputs[k]), k
    for idx in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4], [8, 0, 4], [5], [2, 6, 7]):
        a, b = full.slice(idx), compact.slice(idx)
        assert a.inputs.keys() == b.inputs.keys() and b.image_index is None
        for k in a.inputs:
            assert torch.equal(a.inputs[k], b.inputs[k]), (idx, k)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
    moved = compact.to("cpu")
    assert moved.image_index == compact.image_index
    # one text given several times is tokenised once, with the padding of the whole batch
    single = proc(texts[:1], imgs[:1])
    assert torch.equal(single["input_ids"][0], full.inputs["input_ids"][0, -single["input_ids"].shape[1] - full.targets.shape[1]: -full.targets.shape[1]])


def test_slice_and_logprobs_are_padding_invariant(tiny):
    model, proc = tiny
    b, _ = _batch(proc, n=6, seed=1)
    pol = PolicyWithLoss(model)
    full = compute_logprobs(pol, b, micro_batch_size=6)
    parts = compute_logprobs(pol, b, micro_batch_size=2)
    torch.testing.assert_close(full, parts, atol=1e-5, rtol=1e-5)
    # each row alone (no padding at all) gives the same log-probs
    for i in (0, 3, 5):
        one = b.slice([i])
        lp = compute_logprobs(pol, SeqBatch(one.inputs, one.targets, one.mask, one.start, one.image_counts),
                              micro_batch_size=1)
        n = int(b.mask[i].sum())
        torch.testing.assert_close(lp[0, :n], full[i, :n], atol=1e-5, rtol=1e-5)
    assert (full[b.mask == 0] == 0).all()


def test_no_vocab_logits_in_training(tiny, monkeypatch):
    """Training and log-prob passes never call the full model forward (which computes logits)."""
    model, proc = tiny
    model = copy.deepcopy(model)
    b, _ = _batch(proc, n=4, seed=2)

    def boom(*a, **k):
        raise AssertionError("the model's logits forward was called")

    monkeypatch.setattr(type(model), "forward", boom)
    pol = PolicyWithLoss(model)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    m = grpo_update(pol, opt, None, b, torch.tensor([1.0, -1.0, 0.5, -0.5]), UpdateConfig(micro_batch_size=2),
                    ref_logprobs=compute_logprobs(pol, b, micro_batch_size=4))
    assert np.isfinite(m["loss"])
    sft_step(pol, opt, None, b, micro_batch_size=2)


# --------------------------------------------------------------------------- the update


def _loss_with_old(pol, b, adv, old):
    with torch.no_grad():
        loss, _ = pol(b.inputs, b.targets, b.mask, start=b.start, mode="grpo", advantages=adv, old_logprobs=old,
                      beta=0.0)
    return float(loss)


def test_update_decreases_loss_on_fixed_batch(tiny):
    model, proc = tiny
    model = copy.deepcopy(model)
    b, _ = _batch(proc, n=8, seed=3)
    pol = PolicyWithLoss(model)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 2.0]), 4)
    old = compute_logprobs(pol, b, micro_batch_size=8)
    before_lp = old.clone()
    opt = torch.optim.AdamW(pol.parameters(), lr=3e-3)
    cfg = UpdateConfig(beta=0.0, num_iterations=5, micro_batch_size=8, epsilon_low=10.0, epsilon_high=10.0)
    l0 = _loss_with_old(pol, b, adv, old)
    m = grpo_update(pol, opt, None, b, adv, cfg)  # 5 optimisation passes against the same old log-probs
    l1 = _loss_with_old(pol, b, adv, old)
    assert l0 == pytest.approx(-0.0, abs=1e-5)  # ratio 1: -mean(A) over each group = 0
    assert l1 < l0 - 0.05
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    # the log-likelihood of positive-advantage completions went up, negative went down
    after = compute_logprobs(pol, b, micro_batch_size=8)
    delta = ((after - before_lp) * b.mask).sum(1)
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all()


def test_sft_loss_decreases(tiny):
    model, proc = tiny
    model = copy.deepcopy(model)
    b, _ = _batch(proc, n=4, seed=4)
    pol = PolicyWithLoss(model)
    opt = torch.optim.AdamW(pol.parameters(), lr=3e-3)
    losses = [sft_step(pol, opt, None, b, micro_batch_size=4)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] * 0.8


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batching_matches_one_batch(tiny, loss_type):
    """Gradient accumulation over micro-batches gives the full batch's loss and step."""
    model, proc = tiny
    b, _ = _batch(proc, n=6, seed=5)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.3, 2.0, -2.0])
    results = []
    for mbs in (6, 2):
        pol = PolicyWithLoss(copy.deepcopy(model))
        gap = torch.rand(b.mask.shape, generator=torch.Generator().manual_seed(0)) * 0.4
        ref = compute_logprobs(pol, b, micro_batch_size=6) - gap * b.mask  # a reference that differs, unevenly
        opt = torch.optim.SGD(pol.parameters(), lr=0.1)
        m = grpo_update(pol, opt, None, b, adv, UpdateConfig(micro_batch_size=mbs, loss_type=loss_type,
                                                              max_completion_length=8, max_grad_norm=0.0),
                        ref_logprobs=ref)
        results.append((m, [p.detach().clone() for p in pol.parameters()]))
    (m6, p6), (m2, p2) = results
    if loss_type in ("grpo", "dr_grpo", "dapo"):  # bnpo normalises per micro-batch (as TRL does)
        assert m2["loss"] == pytest.approx(m6["loss"], rel=1e-4, abs=1e-6)
        for x, y in zip(p6, p2):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    # token means (TRL's kl, entropy, clip ratios) over the batch's tokens, whatever the micro-batches
    assert b.mask[:2].sum() != b.mask[2:4].sum()  # micro-batches of unequal token counts
    for k in ("kl", "entropy", "clip_ratio"):
        assert m2[k] == pytest.approx(m6[k], rel=1e-4, abs=1e-7), k
    assert m2["tokens"] == m6["tokens"] == float(b.mask.sum())


def test_bias_correction_kl_changes_the_step_at_mu_1(tiny):
    """use_bias_correction_kl at mu = 1: the ratio is 1, so the KL metric is unchanged, but the
    KL term's gradient gains KL * grad(logp): the step differs."""
    model, proc = tiny
    b, _ = _batch(proc, n=4, seed=7)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    out = {}
    for flag in (False, True):
        pol = PolicyWithLoss(copy.deepcopy(model))
        ref = compute_logprobs(pol, b, micro_batch_size=4) - 0.3 * b.mask  # a reference that differs
        opt = torch.optim.SGD(pol.parameters(), lr=0.1)
        m = grpo_update(pol, opt, None, b, adv, UpdateConfig(micro_batch_size=2, beta=0.5, max_grad_norm=0.0,
                                                             use_bias_correction_kl=flag), ref_logprobs=ref)
        out[flag] = (m, [p.detach().clone() for p in pol.parameters()])
    assert out[True][0]["kl"] == pytest.approx(out[False][0]["kl"], rel=1e-6) and out[True][0]["kl"] > 0.01
    assert any(not torch.allclose(x, y, atol=1e-7, rtol=0) for x, y in zip(out[False][1], out[True][1]))


def test_logprobs_with_an_engine_logit_bias(tiny):
    """compute_logprobs(logit_bias=...) scores under softmax(logits + bias), the distribution the
    vLLM engine samples from (its processed log-probs include its -100 on the suppressed image
    placeholders); train.engine_logit_bias builds that bias, None for raw log-probs."""
    import types

    from r1vl.train import engine_logit_bias

    model, proc = tiny
    pol = PolicyWithLoss(model)
    b, _ = _batch(proc, n=3, seed=4)
    V = model.get_output_embeddings().weight.shape[0]
    ids = proc.vision_token_ids()
    engine = types.SimpleNamespace(config=types.SimpleNamespace(suppress_token_ids=ids))
    cfg = types.SimpleNamespace(rollout=types.SimpleNamespace(vllm=types.SimpleNamespace(
        logprobs_mode="processed_logprobs")))
    bias = engine_logit_bias(engine, model, cfg)
    assert bias.shape == (V,) and bias[ids].eq(-100).all() and bias.count_nonzero() == len(ids)
    got = compute_logprobs(pol, b, micro_batch_size=2, temperature=0.7, logit_bias=bias)
    with torch.no_grad():
        logits = model(**b.inputs).logits[:, b.start - 1: b.start - 1 + b.targets.shape[1]].float()
    want = torch.log_softmax((logits + bias) / 0.7, -1).gather(-1, b.targets.unsqueeze(-1)).squeeze(-1) * b.mask
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    plain = compute_logprobs(pol, b, micro_batch_size=2, temperature=0.7)
    assert (got - plain)[b.mask.bool()].min() > 0  # the placeholders' mass moved onto the rest
    cfg.rollout.vllm.logprobs_mode = "raw_logprobs"
    assert engine_logit_bias(engine, model, cfg) is None


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_importance_correction_formed_in_the_update_equals_a_separate_pass(tiny, mode):
    """At mu = 1 grpo_update(rollout_is=...) forms the engine/trainer importance ratio from each
    micro-batch's own forward (the old log-probs are the update's): the ratio, the loss, the
    metrics and the step equal those of the separate no-grad pass before the update (what the
    trainer ran before), with a temperature and a logit bias; the separate pass is not run."""
    from r1vl.rollout.is_correction import RolloutIS, is_ratio

    model, proc = tiny
    b, _ = _batch(proc, n=4, seed=11)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    V = model.get_output_embeddings().weight.shape[0]
    bias = torch.zeros(V)
    bias[proc.vision_token_ids()] = -100.0
    g = torch.Generator().manual_seed(3)
    trainer_lp = compute_logprobs(PolicyWithLoss(copy.deepcopy(model)), b, micro_batch_size=4, temperature=0.7,
                                  logit_bias=bias)
    # the engine's log-probs: off the trainer's by up to +-1.2 (ratios from 0.3 to 3.3: some capped),
    # and missing on the last real token of row 1
    eng = trainer_lp + (torch.rand(b.mask.shape, generator=g) - 0.5) * 2.4
    eng_mask = b.mask.bool().clone()
    eng_mask[1, int(b.mask[1].sum()) - 1] = False
    spec = RolloutIS(eng, eng_mask, cap=2.0, mode=mode, temperature=0.7, logit_bias=bias)
    cfg = UpdateConfig(micro_batch_size=2, beta=0.1, max_grad_norm=0.0)
    ref = trainer_lp - 0.2 * b.mask
    out = {}
    for how in ("pass", "update"):
        pol = PolicyWithLoss(copy.deepcopy(model))
        opt = torch.optim.SGD(pol.parameters(), lr=0.1)
        if how == "pass":
            lp = compute_logprobs(pol, b, micro_batch_size=2, temperature=0.7, logit_bias=bias)
            ratio = is_ratio(lp, eng, eng_mask & b.mask.bool(), cap=2.0, mode=mode)
            m = grpo_update(pol, opt, None, b, adv, cfg, ref_logprobs=ref, rollout_is_ratio=ratio)
        else:
            calls = []
            orig = pol.forward

            def counting(*a, **k):
                calls.append(k["mode"])
                return orig(*a, **k)

            pol.forward = counting
            m = grpo_update(pol, opt, None, b, adv, cfg, ref_logprobs=ref, rollout_is=spec)
            assert calls == ["grpo", "grpo"]  # two micro-batches, no log-prob pass
            ratio = m.pop("rollout_is_ratio")
        out[how] = (ratio, m, [p.detach().clone() for p in pol.parameters()])
    (r0, m0, p0), (r1, m1, p1) = out["pass"], out["update"]
    on = eng_mask & b.mask.bool()
    torch.testing.assert_close(r1[on], r0[on], atol=1e-5, rtol=1e-5)
    assert (r0[on] != 1).all() and (r0[on] < 1).any()  # a correction that acts, both ways
    assert ((r0[on] == 2.0).any() if mode == "token_truncate" else (r0[on] == 0).any())  # the cap acted
    for k in ("loss", "kl", "entropy", "clip_ratio"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    for x, y in zip(p0, p1):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    # what the update would have done without the correction differs
    pol = PolicyWithLoss(copy.deepcopy(model))
    plain = grpo_update(pol, torch.optim.SGD(pol.parameters(), lr=0.1), None, b, adv, cfg, ref_logprobs=ref)
    assert plain["loss"] != pytest.approx(m0["loss"], rel=1e-3)
    with pytest.raises(ValueError, match="num_iterations=1"):
        grpo_update(pol, None, None, b, adv, UpdateConfig(micro_batch_size=2, num_iterations=2), rollout_is=spec)


def test_dropout_keeps_the_importance_correction_out_of_the_update(tiny):
    """A policy with dropout (a checkpoint whose config sets attention_dropout, or an nn.Dropout):
    its training-mode log-probs are not the old ones, so grpo_update refuses to form the ratio
    from them and the trainer takes it from a no-grad pass (has_dropout); the released
    Qwen2-VL configs have none."""
    from r1vl.algo import has_dropout
    from r1vl.rollout.is_correction import RolloutIS

    model, proc = tiny
    assert not has_dropout(model)
    drop = copy.deepcopy(model)
    for m in drop.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.3
    assert has_dropout(drop) and has_dropout(PolicyWithLoss(drop))
    other = copy.deepcopy(model)
    other.model.visual.blocks[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert has_dropout(other)
    b, _ = _batch(proc, n=2, seed=1)
    spec = RolloutIS(torch.zeros(b.mask.shape), b.mask.bool())
    with pytest.raises(ValueError, match="dropout"):
        grpo_update(PolicyWithLoss(drop), None, None, b, torch.tensor([1.0, -1.0]), UpdateConfig(micro_batch_size=2),
                    rollout_is=spec)


# --------------------------------------------------------------------------- the update's arithmetic, by hand


def _update(model, b, adv, *, lr=0.0, old_shift=None, **cfg):
    """grpo_update on a fresh copy of `model`; old_shift: old log-probs = current - old_shift (on
    real tokens), taken at cfg's temperature."""
    pol = PolicyWithLoss(copy.deepcopy(model))
    kw = {}
    if old_shift is not None:
        kw["old_logprobs"] = compute_logprobs(pol, b, micro_batch_size=b.size,
                                              temperature=cfg.get("temperature", 1.0)) - old_shift * b.mask
    return grpo_update(pol, torch.optim.SGD(pol.parameters(), lr=lr), None, b, adv, UpdateConfig(**cfg), **kw)


def test_update_loss_by_hand_over_uneven_micro_batches_and_passes(tiny):
    """Values derived from the objective, not from the code: with ratio 1 and beta 0 the grpo
    loss is -mean(A) whatever the micro-batches (6 rows in 4 + 2: each weighted by its rows);
    with mu = 2 the old log-probs are taken at the update's temperature (ratio exactly 1 with lr 0);
    bnpo is each micro-batch's token mean, weighted by its share of rows, as TRL."""
    model, proc = tiny
    b, _ = _batch(proc, n=6, seed=5)
    adv = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    m = _update(model, b, adv, micro_batch_size=4, beta=0.0)
    assert m["loss"] == pytest.approx(-3.5, abs=1e-5)
    m = _update(model, b, adv, micro_batch_size=6, beta=0.0, num_iterations=2, temperature=0.7)
    assert m["loss"] == pytest.approx(-3.5, abs=1e-5) and m["clip_ratio"] == 0.0
    n = b.mask.sum(1).double()
    assert len(set(n.tolist())) > 2  # rows of different lengths: bnpo differs from grpo
    want = sum(len(g) / 6 * -(adv.double()[g] * n[g]).sum() / n[g].sum() for g in ([0, 1], [2, 3], [4, 5]))
    m = _update(model, b, adv, micro_batch_size=2, beta=0.0, loss_type="bnpo")
    assert m["loss"] == pytest.approx(float(want), abs=1e-5)


def test_update_uses_the_old_logprobs_and_both_clip_bounds(tiny):
    """mu > 1: the caller's old log-probs are the ones used (ratio e^0.1 on every token with lr 0:
    loss -e^0.1 for A = 1); epsilon_low and epsilon_high reach the loss in their places (ratio
    e^0.26 = 1.297: inside 1 + 0.5, outside 1 + 0.1); a real step moves the policy so far that
    the second pass clips against the first pass's log-probs."""
    import math

    model, proc = tiny
    b, _ = _batch(proc, n=6, seed=5)
    ones = torch.ones(6)
    m = _update(model, b, ones, micro_batch_size=6, beta=0.0, num_iterations=2, old_shift=0.1)
    assert m["loss"] == pytest.approx(-math.exp(0.1), abs=1e-4)
    m = _update(model, b, ones, micro_batch_size=6, beta=0.0, num_iterations=2, old_shift=0.26,
                epsilon_low=0.1, epsilon_high=0.5)
    assert m["loss"] == pytest.approx(-math.exp(0.26), abs=1e-4) and m["clip_ratio_high"] == 0.0
    m = _update(model, b, ones, micro_batch_size=6, beta=0.0, num_iterations=2, old_shift=0.26,
                epsilon_low=0.5, epsilon_high=0.1)
    assert m["loss"] == pytest.approx(-1.1, abs=1e-4) and m["clip_ratio_high"] == pytest.approx(1.0)
    m = _update(model, b, torch.tensor([1.0, -1.0] * 3), lr=0.5, micro_batch_size=6, beta=0.0, num_iterations=2,
                epsilon_low=0.01, epsilon_high=0.01, max_grad_norm=0.0)
    assert m["clip_ratio"] > 0.1  # averaged over the two passes: the first never clips


def test_sequence_level_clip_share_is_a_share_of_rows(tiny):
    """importance_sampling_level="sequence": the clip ratios are shares of sequences (one clipped
    row of 6 is 1/6, whatever its length and the micro-batches), not of tokens."""
    model, proc = tiny
    b, _ = _batch(proc, n=6, seed=5)
    pol = PolicyWithLoss(copy.deepcopy(model))
    old = compute_logprobs(pol, b, micro_batch_size=6)
    old[0] -= 0.5 * b.mask[0]  # row 0's sequence ratio e^0.5 > 1.2
    m = grpo_update(pol, torch.optim.SGD(pol.parameters(), lr=0.0), None, b, torch.ones(6),
                    UpdateConfig(num_iterations=2, micro_batch_size=2, beta=0.0, importance_sampling_level="sequence"),
                    old_logprobs=old)
    assert b.mask[0].sum() != b.mask.sum() / 6  # a token share would differ
    assert m["clip_ratio_high"] == pytest.approx(1 / 6, abs=1e-6)


def test_gradient_norm_is_the_global_l2_norm():
    from r1vl.algo import _clip

    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([0.0, 4.0])
    assert _clip([a, b], 0.0) == pytest.approx(5.0)
    assert _clip([a, b], 1.0) == pytest.approx(5.0)  # the norm before clipping
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]))
