"""The colocated vLLM engine on the real vLLM CPU backend, in this process (one
gloo rank): generation against Hugging Face transformers, weight pushes (tied and
untied heads; Qwen2-VL and Qwen2.5-VL), cache resets, sleep/wake call sequence, IS ratio ≈ 1."""
from __future__ import annotations

import logging

import pytest
import torch

from vllm_test_utils import engine_config
from hf_reference import hf_greedy, hf_logprobs, perturb_
from tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS, noise_image

from r1vl.rollout.base import Prompt, SamplingConfig
from r1vl.rollout.is_correction import is_ratio_stats, pad_engine_logprobs, truncated_is_ratio

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0, return_logprobs=True)
LP_ATOL = 1e-4  # float32 on both sides; measured differences are ~1e-6


def prompts_for(processor):
    """A text prompt and two image prompts; images go through the trainer's resize
    (r1vl.data.resize_image), one of them from an odd size that must be resized."""
    from r1vl.data import resize_image

    def fit(img):
        return resize_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

    return [
        Prompt(processor.chat_prompt("What shapes are in the picture?"), fit(noise_image(0, (131, 45)))),
        Prompt(processor.chat_prompt("What is the sum of 3 and 4?", with_image=False)),
        Prompt(processor.chat_prompt("Count the squares.", with_image=True), fit(noise_image(1, (56, 112)))),
    ]


def assert_matches_hf(engine, model, processor, prompts, sampling=GREEDY):
    comps = engine.generate(prompts, 1, sampling)
    assert [c.prompt_index for c in comps] == list(range(len(prompts)))
    for p, c in zip(prompts, comps):
        ref = hf_greedy(model, processor, p.text, p.image, sampling.max_new_tokens)
        assert c.token_ids == ref, f"greedy tokens differ from HF for {p.text!r}"
        lp = hf_logprobs(model, processor, p.text, c.token_ids, p.image)
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=LP_ATOL, rtol=0)
        assert c.text == processor.decode(c.token_ids)
    return comps


@pytest.fixture(scope="module")
def tied_engine(process_group, tiny_tied):
    from r1vl.rollout.vllm_engine import VLLMEngine

    path, _, _ = tiny_tied
    # a small bucket bound: a push spans several buckets (each layer whole)
    return VLLMEngine(engine_config(path, weight_bucket_bytes=300_000))


@pytest.fixture(scope="module")
def untied_engine(process_group, tiny_untied):
    from r1vl.rollout.vllm_engine import VLLMEngine

    path, _, _ = tiny_untied
    return VLLMEngine(engine_config(path, weight_bucket_bytes=300_000))


@pytest.fixture(scope="module")
def qwen25_engine(process_group, tiny_qwen25):
    from r1vl.rollout.vllm_engine import VLLMEngine

    path, _, _ = tiny_qwen25
    return VLLMEngine(engine_config(path, weight_bucket_bytes=300_000))


def test_engine_reports_head_tying(tied_engine, untied_engine):
    assert tied_engine.tie_word_embeddings is True
    assert untied_engine.tie_word_embeddings is False
    assert tied_engine.sleep_mode is False  # CPU: no sleep mode


@pytest.mark.parametrize("which", ["tied", "qwen25"])
def test_text_and_image_generation_match_hf(which, request):
    engine = request.getfixturevalue(f"{which}_engine")
    _, model, processor = request.getfixturevalue(f"tiny_{which}")
    prompts = prompts_for(processor)
    assert_matches_hf(engine, model, processor, prompts)
    # the engine expanded each image exactly as the trainer's processor does
    for p in (prompts[0], prompts[2]):
        out = engine.llm.generate({"prompt": p.text, "multi_modal_data": {"image": p.image}},
                                       use_tqdm=False)[0]
        assert out.prompt_token_ids == processor([p.text], [p.image])["input_ids"][0].tolist()
    assert prompts[0].image.size != (131, 45)  # it was resized on the way


def test_sampling_n_prompt_major_and_seeded(tied_engine, tiny_tied):
    _, _, processor = tiny_tied
    prompts = prompts_for(processor)[:2]
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=7, return_logprobs=True)
    a = tied_engine.generate(prompts, 3, s)
    assert [c.prompt_index for c in a] == [0, 0, 0, 1, 1, 1]
    for c in a:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in c.logprobs)
    assert len({tuple(c.token_ids) for c in a[:3]}) > 1, "the 3 samples of one prompt are identical"
    b = tied_engine.generate(prompts, 3, s)
    assert [c.token_ids for c in a] == [c.token_ids for c in b], "same seed, different samples"
    # greedy with n > 1: n identical copies (vLLM itself refuses n > 1 without sampling)
    g = tied_engine.generate(prompts[:1], 2, SamplingConfig(max_new_tokens=4, temperature=0.0))
    assert len(g) == 2 and g[0].token_ids == g[1].token_ids and g[0].logprobs is None


@pytest.mark.parametrize("which", ["tied", "untied", "qwen25"])
def test_weight_update_matches_hf(which, request):
    engine = request.getfixturevalue(f"{which}_engine")
    _, model, processor = request.getfixturevalue(f"tiny_{which}")
    prompts = prompts_for(processor)
    before = engine.generate(prompts, 1, GREEDY)  # fills the prefix and encoder caches
    for step in range(2):
        new = perturb_(model, seed=100 + step)
        engine.wake()
        engine.load_weights(iter(new))  # a one-shot iterator: consumed lazily, bucket by bucket
        after = assert_matches_hf(engine, model, processor, prompts)
        engine.sleep()
    assert [c.token_ids for c in after] != [c.token_ids for c in before], "the update changed nothing"
    assert engine.weights_version >= 2


def test_stop_ids_stop_strings_and_suppressed_tokens(tied_engine, tiny_tied):
    """The HF engine's rules, as from_config sets them: extra stop ids end a completion
    (the id included), stop strings end it (kept in text and token_ids), suppressed
    ids are never sampled (greedy then equals HF's greedy with suppress_tokens)."""
    import dataclasses

    _, model, processor = tiny_tied
    prompt = prompts_for(processor)[1]
    free = tied_engine.generate([prompt], 1, GREEDY)[0]
    first, second = free.token_ids[0], free.token_ids[1]
    e = tied_engine
    saved = e.config
    try:
        e.config = dataclasses.replace(saved, stop_token_ids=[second])
        c = e.generate([prompt], 1, GREEDY)[0]
        assert c.token_ids == [first, second] and c.finish_reason == "stop"
        e.config = dataclasses.replace(saved, suppress_token_ids=[first])
        c = e.generate([prompt], 1, GREEDY)[0]
        assert first not in c.token_ids
        assert c.token_ids == hf_greedy(model, processor, prompt.text, None, 8, suppress_ids=[first])
        lp = hf_logprobs(model, processor, prompt.text, c.token_ids, suppress_ids=[first])
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=LP_ATOL, rtol=0)
    finally:
        e.config = saved
    stop = processor.decode(free.token_ids[:3])[-2:]
    c = e.generate([prompt], 1, SamplingConfig(max_new_tokens=8, temperature=0.0, stop=[stop]))[0]
    assert c.finish_reason == "stop" and c.text.endswith(stop) and len(c.token_ids) <= 3
    assert c.text == processor.decode(c.token_ids)


def test_prefix_cache_reset_on_weight_push(tied_engine, tiny_tied):
    """A long prompt is served from the prefix cache on a repeat; a weight push must
    drop those blocks (else the KV of the old weights would be reused)."""
    from vllm import SamplingParams

    from r1vl.rollout.vllm_engine import _vllm_worker_refresh_tied_head, iter_weight_buckets

    _, model, processor = tiny_tied
    text = processor.chat_prompt("Step 1: look at the image. Step 2: count the shapes. " * 12, with_image=False)
    sp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)

    def run():
        return tied_engine.llm.generate([text], sp, use_tqdm=False)[0]

    run()
    cached = run()
    assert cached.num_cached_tokens > 0, "the prefix cache is not in use: this test would prove nothing"
    new = perturb_(model, seed=200)
    # the push alone (no reset) keeps serving the old KV blocks: stale log-probs
    for bucket in iter_weight_buckets(new, bucket_bytes=1 << 30, tie_word_embeddings=True):
        tied_engine._push_bucket(bucket)
    tied_engine.llm.collective_rpc(_vllm_worker_refresh_tied_head)
    stale = run()
    assert stale.num_cached_tokens > 0
    ref = hf_logprobs(model, processor, text, list(stale.outputs[0].token_ids))
    stale_lp = torch.tensor([d[t].logprob for d, t in zip(stale.outputs[0].logprobs, stale.outputs[0].token_ids)])
    assert (stale_lp - ref).abs().max() > 1e-2, "stale prefix KV went unnoticed"
    # load_weights resets the caches: nothing cached, HF's numbers again
    tied_engine.load_weights(new)
    fresh = run()
    assert fresh.num_cached_tokens == 0
    ref = hf_logprobs(model, processor, text, list(fresh.outputs[0].token_ids))
    fresh_lp = torch.tensor([d[t].logprob for d, t in zip(fresh.outputs[0].logprobs, fresh.outputs[0].token_ids)])
    torch.testing.assert_close(fresh_lp, ref, atol=LP_ATOL, rtol=0)
    assert list(fresh.outputs[0].token_ids) == hf_greedy(model, processor, text, None, 4)


def test_is_ratio_is_one_when_in_sync(tied_engine, tiny_tied):
    """Sampled completions at temperature 0.7: the trainer-side log-probs (HF, on
    logits / T) against the engine's processed log-probs give ratios ≈ 1."""
    _, model, processor = tiny_tied
    prompts = prompts_for(processor)
    T = 0.7
    comps = tied_engine.generate(prompts, 2, SamplingConfig(max_new_tokens=6, temperature=T, seed=3,
                                                            return_logprobs=True))
    L = max(len(c.token_ids) for c in comps)
    engine_lp, mask = pad_engine_logprobs([c.logprobs for c in comps], L)
    trainer_lp = torch.zeros_like(engine_lp)
    for i, c in enumerate(comps):
        p = prompts[c.prompt_index]
        trainer_lp[i, : len(c.token_ids)] = hf_logprobs(model, processor, p.text, c.token_ids, p.image,
                                                        temperature=T)
    ratio = truncated_is_ratio(trainer_lp, engine_lp, mask, cap=2.0)
    stats = is_ratio_stats(ratio, mask, cap=2.0)
    assert abs(stats["is_ratio_mean"] - 1) < 1e-3 and abs(stats["is_ratio_max"] - 1) < 1e-3
    assert abs(stats["is_ratio_min"] - 1) < 1e-3 and stats["is_ratio_capped_frac"] == 0.0
    # out of sync (the trainer moved on, the engine did not): ratios leave 1, capped at 2
    perturb_(model, seed=300)
    moved = torch.zeros_like(engine_lp)
    for i, c in enumerate(comps):
        p = prompts[c.prompt_index]
        moved[i, : len(c.token_ids)] = hf_logprobs(model, processor, p.text, c.token_ids, p.image, temperature=T)
    r2 = truncated_is_ratio(moved, engine_lp, mask, cap=2.0)
    assert (r2[mask] - 1).abs().max() > 1e-2 and r2.max() <= 2.0
    tied_engine.load_weights(model.named_parameters())  # back in sync for the next tests


def test_sleep_wake_sequence_on_cpu(tied_engine, tiny_tied, caplog):
    """CPU has no sleep mode: the calls keep their order and state, release nothing,
    and say so once."""
    _, model, processor = tiny_tied
    e = tied_engine
    e._noop_logged = False
    e.calls.clear()
    with caplog.at_level(logging.INFO, logger="r1vl.rollout.vllm_engine"):
        e.sleep()
        assert e.state == "asleep"
        e.sleep()  # idempotent
        e.wake()
        assert e.state == "weights"
        e.load_weights(model.named_parameters())
        comps = e.generate(prompts_for(processor)[:1], 1, GREEDY)
        assert e.state == "awake" and comps
        e.sleep(level=2)
        e.generate(prompts_for(processor)[1:2], 1, GREEDY)  # wakes by itself
        assert e.state == "awake"
    noops = [r for r in caplog.records if "sleep mode is not available" in r.getMessage()]
    assert len(noops) == 1
    assert list(e.calls) == ["sleep1", "sleep1", "wake", "load_weights", "generate", "sleep2", "generate", "wake"]
    with pytest.raises(ValueError, match="sleep level"):
        e.sleep(level=3)
