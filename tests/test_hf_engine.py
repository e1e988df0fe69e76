"""The Hugging Face rollout engine: left padding, EOS / stop strings, n per prompt, greedy
determinism, seeded sampling, engine log-probs vs the trainer's, load_weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from r1vl.algo import build_batch, compute_logprobs
from r1vl.models import PolicyWithLoss, build_tiny
from r1vl.rollout import Completion, Prompt, RolloutEngine, SamplingConfig
from r1vl.rollout.hf_engine import HFEngine

CORPUS = [
    f"### Step {i % 3 + 1}: count the {c} shapes: {i} + {i % 7} = {i + i % 7}\n### The final answer is: {i}"
    for i in range(60) for c in ("red", "blue", "green")
] + ["How many red circles are there? Describe the image, then think step by step."] * 20

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)


def _image(seed, w=56, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _diversify(model, seed):
    """A freshly initialised tied-embedding model greedily repeats its last token; larger
    random weights make its outputs depend on the prompt (what these tests need)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _tiny(seed):
    model, proc = build_tiny(CORPUS, vocab_size=400, seed=seed, **SIZES)
    return _diversify(model, seed).eval(), proc


@pytest.fixture(scope="module")
def tiny():
    return _tiny(0)


def _prompts(proc):
    return [
        Prompt(proc.chat_prompt("How many red circles?"), _image(1)),
        Prompt(proc.chat_prompt("Describe the image, then think step by step about the blue shapes."),
               _image(2, 84, 56)),
        Prompt(proc.chat_prompt("count"), _image(3)),
    ]


def test_interface(tiny):
    model, proc = tiny
    assert isinstance(HFEngine(model, proc), RolloutEngine)


def test_left_padding_batch_equals_single(tiny):
    model, proc = tiny
    eng = HFEngine(model, proc, batch_size=8)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    prompts = _prompts(proc)
    batched = eng.generate(prompts, 1, greedy)
    single = [eng.generate([p], 1, greedy)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert len({tuple(c.token_ids) for c in batched}) == len(prompts)  # outputs depend on the prompt
    # prompts of different lengths really were padded
    enc = proc([p.text for p in prompts], [p.image for p in prompts], padding_side="left")
    assert (enc["attention_mask"][:, 0] == 0).any() and (enc["attention_mask"][:, -1] == 1).all()


def test_n_per_prompt_order_and_seeded_sampling(tiny):
    model, proc = tiny
    eng = HFEngine(model, proc, batch_size=4)  # 2 prompts x 3 = 6 sequences: two generate() calls
    prompts = _prompts(proc)[:2]
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=123)
    a = eng.generate(prompts, 3, s)
    assert [c.prompt_index for c in a] == [0, 0, 0, 1, 1, 1]
    assert all(isinstance(c, Completion) and 1 <= len(c.token_ids) <= 8 for c in a)
    assert all(c.finish_reason in ("stop", "length") for c in a)
    b = eng.generate(prompts, 3, s)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # same seed, same samples
    c = eng.generate(prompts, 3, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=7))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) > 1  # samples within a group differ
    # the global RNG stream is left alone by seeded sampling
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    eng.generate(prompts, 1, s)
    assert torch.equal(torch.rand(1), before)


def test_greedy_is_deterministic(tiny):
    model, proc = tiny
    eng = HFEngine(model, proc)
    g = SamplingConfig(max_new_tokens=10, temperature=0.0)
    a = eng.generate(_prompts(proc), 2, g)
    b = eng.generate(_prompts(proc), 2, g)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].token_ids == a[1].token_ids  # greedy: the n copies agree


def test_eos_stops_and_is_kept(tiny):
    model, proc = tiny
    g = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = HFEngine(model, proc).generate(_prompts(proc)[:1], 1, g)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    k = 4
    eng = HFEngine(model, proc, eos_token_ids=[free.token_ids[k]])
    out = eng.generate(_prompts(proc)[:1], 1, g)[0]
    first = free.token_ids.index(free.token_ids[k])
    assert out.token_ids == free.token_ids[: first + 1]  # EOS included, nothing after it
    assert out.finish_reason == "stop"


def test_stop_strings(tiny):
    """A stop string ends the completion at the first token that completes it; text is
    decode(token_ids), the stop string included, as the vLLM engine keeps it."""
    model, proc = tiny
    g = SamplingConfig(max_new_tokens=12, temperature=0.0)
    eng = HFEngine(model, proc)
    free = eng.generate(_prompts(proc)[:1], 1, g)[0]
    text = free.text
    stop = next(text[i: i + 2] for i in range(3, len(text) - 2) if text[i: i + 2].isalnum())
    out = eng.generate(_prompts(proc)[:1], 1, SamplingConfig(max_new_tokens=12, temperature=0.0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == proc.decode(out.token_ids) and stop in out.text and text.startswith(out.text)
    assert stop not in proc.decode(out.token_ids[:-1])
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(free.token_ids)


def test_model_generation_config_does_not_change_sampling(tiny, caplog):
    """A checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size, ...) is
    not applied: generate() would take it for every setting the engine does not pass, and the
    samples would come from another distribution than the log-probs that score them."""
    import copy
    import logging

    model, proc = tiny
    prompts = _prompts(proc)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5, return_logprobs=True)
    plain = HFEngine(model, proc)
    want = [plain.generate(prompts, 2, s) for s in (greedy, sampled)]
    own = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.repetition_penalty = 3.0
        model.generation_config.no_repeat_ngram_size = 1
        model.generation_config.min_new_tokens = 12
        banned = want[0][0].token_ids[0]  # greedy's first token: banning it must change the output
        model.generation_config.bad_words_ids = [[banned]]
        with caplog.at_level(logging.INFO, logger="r1vl.rollout.hf_engine"):
            eng = HFEngine(model, proc)
        assert "not applying the model's generation_config settings bad_words_ids=" in caplog.text
        assert "min_new_tokens=12, no_repeat_ngram_size=1, repetition_penalty=3.0" in caplog.text
        got = [eng.generate(prompts, 2, s) for s in (greedy, sampled)]
        assert model.generation_config.repetition_penalty == 3.0  # the model's own config is restored
    finally:
        model.generation_config = own
    for a, b in zip(want, got):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in want[1]] == [c.logprobs for c in got[1]]


def test_engine_logprobs_match_trainer(tiny):
    model, proc = tiny
    eng = HFEngine(model, proc)
    prompts = _prompts(proc)
    comps = eng.generate(prompts, 2, SamplingConfig(max_new_tokens=8, temperature=0.7, seed=3,
                                                    return_logprobs=True))
    batch = build_batch(proc, [prompts[c.prompt_index].text for c in comps],
                        [prompts[c.prompt_index].image for c in comps], [c.token_ids for c in comps])
    lp = compute_logprobs(PolicyWithLoss(model), batch, micro_batch_size=4, temperature=0.7)
    for i, c in enumerate(comps):
        n = len(c.token_ids)
        torch.testing.assert_close(lp[i, :n], torch.tensor(c.logprobs), atol=2e-4, rtol=1e-4)


def test_load_weights(tiny):
    model, proc = tiny
    other, _ = _tiny(1)
    g = SamplingConfig(max_new_tokens=8, temperature=0.0)
    want = HFEngine(other, proc).generate(_prompts(proc), 1, g)
    fresh, _ = _tiny(2)
    eng = HFEngine(fresh, proc)
    eng.sleep()
    eng.wake()
    eng.load_weights(other.named_parameters())
    assert [c.token_ids for c in eng.generate(_prompts(proc), 1, g)] == [c.token_ids for c in want]
    with pytest.raises(KeyError, match="no tensor named"):
        eng.load_weights([("not.a.weight", torch.zeros(1))])


def test_bad_sampling(tiny):
    model, proc = tiny
    eng = HFEngine(model, proc)
    with pytest.raises(ValueError, match="n must be"):
        eng.generate(_prompts(proc), 0, SamplingConfig())
    with pytest.raises(ValueError, match="temperature"):
        eng.generate(_prompts(proc), 1, SamplingConfig(temperature=-1.0))
    with pytest.raises(ValueError, match="top_p"):
        eng.generate(_prompts(proc), 1, SamplingConfig(top_p=0.0))


def test_a_prompts_image_is_sent_once_for_its_n_rows(tiny, monkeypatch):
    """The n rows of a prompt share its image: the processor hands over each image's pixels once
    (a host-to-device copy of one block, not n), repeated on the device; the samples are those of
    one block per row (seeded sampling and greedy)."""
    model, proc = tiny
    eng = HFEngine(model, proc, batch_size=8)
    prompts = _prompts(proc)[:2]
    real = type(proc).__call__
    sent = []

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        sent.append(out["pixel_values"].shape[0])
        return out

    monkeypatch.setattr(type(proc), "__call__", spy)
    configs = (SamplingConfig(max_new_tokens=8, temperature=1.0, seed=11), SamplingConfig(max_new_tokens=8,
                                                                                        temperature=0.0))
    got = [eng.generate(prompts, 3, s) for s in configs]
    one_each = sum(int(real(proc, [p.text], [p.image])["image_grid_thw"].prod()) for p in prompts)
    assert sent == [one_each] * 2
    monkeypatch.setattr(type(proc), "__call__", lambda self, *a, unique_images=False, **k: real(self, *a, **k))
    want = [eng.generate(prompts, 3, s) for s in configs]
    for g, w in zip(got, want):
        assert [c.token_ids for c in g] == [c.token_ids for c in w]
    assert len({tuple(c.token_ids) for c in got[0]}) > 1  # sampled rows differ: the seed is what makes them equal
