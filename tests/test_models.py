"""The tiny Qwen2-VL + processor: shapes, tokenizer, save / load with the Auto classes,
the fused head against materialised logits, bad model paths."""
import numpy as np
import pytest
import torch
from PIL import Image

from r1vl.models import (SPECIAL_TOKENS, FusedLMHead, ModelLoadError, PolicyWithLoss, VLProcessor, build_tiny,
                         load_pretrained, save_pretrained)

CORPUS = [f"### Step 1: the bar for {c} reads {v}\n### The final answer is: {v}"
          for c in ("red", "blue", "green", "orange") for v in range(40)]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(CORPUS, vocab_size=360, seed=0, **SIZES)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_arch(request, tiny):
    """The tiny model of each architecture that model.tiny.arch offers (Qwen2.5-VL with two
    vision blocks: the first windowed, the last full attention)."""
    if request.param == "qwen2_vl":
        return tiny
    return build_tiny(CORPUS, vocab_size=360, seed=0, arch=request.param, **{**SIZES, "vision_depth": 2})


def _img(w=56, h=84):
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def test_tiny_shape(tiny):
    model, proc = tiny
    cfg = model.config
    text = cfg.text_config
    assert text.hidden_size // text.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert text.vocab_size == len(proc.tokenizer) <= 360
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert model.config.vision_config.embed_dim // model.config.vision_config.num_heads >= 32


def test_tokenizer_specials_and_template(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    for s in SPECIAL_TOKENS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == s
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = proc.chat_prompt("How many?")
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    # byte-level BPE: any text round-trips, digits are single tokens
    s = "### Step 2: 12 + 7 = 19 ✓ ünïcode"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert all(len(tok(d, add_special_tokens=False)["input_ids"]) == 1 for d in "0123456789")


def test_processor_expands_image_tokens(tiny):
    _, proc = tiny
    enc = proc([proc.chat_prompt("a"), proc.chat_prompt("bb")], [_img(56, 84), _img(112, 56)])
    grid = enc["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 4], [1, 4, 8]]
    counts = (enc["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert counts == [6, 8]
    assert enc["mm_token_type_ids"].sum().item() == 14
    assert enc["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    with pytest.raises(ValueError, match="placeholders"):
        proc([proc.chat_prompt("a")], [_img(), _img()])


def test_save_and_load_with_auto_classes(tiny_arch, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model, proc = tiny_arch
    PolicyWithLoss(model)  # installs the fused head: saving must still give the standard layout
    assert isinstance(model.lm_head, FusedLMHead)
    save_pretrained(model, proc, tmp_path)
    assert isinstance(model.lm_head, FusedLMHead)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again) is type(model)  # Qwen2VL... or Qwen2_5_VLForConditionalGeneration
    assert isinstance(again.lm_head, torch.nn.Linear)
    sd0, sd1 = model.state_dict(), again.state_dict()
    assert set(sd0) == set(sd1)
    for k in sd0:
        torch.testing.assert_close(sd0[k], sd1[k], rtol=0, atol=0)
    assert again.lm_head.weight is again.model.language_model.embed_tokens.weight
    # generate() or vLLM on the saved model stops where r1vl's engines do, as on Qwen2-VL's own
    assert again.generation_config.eos_token_id == proc.stop_token_ids() and len(proc.stop_token_ids()) == 2
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab() == proc.tokenizer.get_vocab() and tok.chat_template == proc.tokenizer.chat_template
    ip = AutoImageProcessor.from_pretrained(tmp_path)
    assert ip.merge_size == 2 and ip.patch_size == 14
    p2 = VLProcessor.from_pretrained(tmp_path)
    e1 = proc([proc.chat_prompt("x")], [_img()])
    e2 = p2([p2.chat_prompt("x")], [_img()])
    for k in e1:
        torch.testing.assert_close(e1[k], e2[k])
    m2, _ = load_pretrained(tmp_path)
    x = {k: v for k, v in e1.items()}
    with torch.no_grad():
        h1 = model.model(**x).last_hidden_state
        h2 = m2.model(**x).last_hidden_state
    torch.testing.assert_close(h1, h2)


def test_fused_head_matches_logits(tiny_arch):
    model, proc = tiny_arch
    pol = PolicyWithLoss(model)
    enc = proc([proc.chat_prompt("read the bar")], [_img()])
    with torch.no_grad():
        h = pol.hidden_states(enc)
        targets = enc["input_ids"][:, 1:]
        lp = model.lm_head(h[:, :-1], targets, mode="logprobs")
        logits = model.lm_head(h[:, :-1])  # no targets: the plain linear head (generation)
        want = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        model.lm_head(h, targets, mode="nope")


@pytest.mark.parametrize("path, words", [
    ("/nonexistent/dir/model", ["no such directory"]),
    ("not a hub id", ["no such directory"]),
])
def test_bad_model_paths(path, words):
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(path)
    for w in words:
        assert w in str(e.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_pretrained(tmp_path)


def test_model_path_naming_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        load_pretrained(f)


# --------------------------------------------------------------------------- repeated images


def _patch_counter(model):
    """Patches the vision tower embeds per call (a hook on its patch embedding)."""
    counts: list[int] = []
    model.model.visual.patch_embed.register_forward_hook(lambda m, a, o: counts.append(o.shape[0]))
    return counts


def _grpo_grads(pol, batch, adv):
    """The update's loss and gradients; with a KL term to a fixed reference the loss value
    depends on the model too (at beta 0 and ratio 1 it is a function of the advantages alone)."""
    pol.zero_grad(set_to_none=True)
    ref = torch.full(batch.targets.shape, -3.0)
    loss, _ = pol(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="grpo", advantages=adv,
                  beta=0.04, ref_logprobs=ref)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None}


def test_image_dedup_same_loss_and_grads_fewer_patches(tiny_arch):
    import copy

    from r1vl.algo import build_batch

    model, proc = tiny_arch
    on_model, off_model = copy.deepcopy(model), copy.deepcopy(model)
    # whole rows on both sides (a shared prompt forward would also drop the repeats)
    on = PolicyWithLoss(on_model, share_prompts=False)
    off = PolicyWithLoss(off_model, dedup_images=False, share_prompts=False)
    a, b = _img(), _img(84, 56)
    c = Image.fromarray(np.asarray(a)[:, ::-1].copy())  # a's size and grid, other pixels
    # groups of a prompt's copies, a text-only row, then a and c: same grid, different pixels
    images = [a, a, a, None, b, b, a, c]
    batch = build_batch(proc, [proc.chat_prompt("read the bar", im is not None) for im in images], images,
                        [[50 + i, 60, 70 + i][: 1 + i % 3] for i in range(len(images))])
    adv = torch.linspace(-1, 1, len(images))
    n_on, n_off = _patch_counter(on_model), _patch_counter(off_model)
    loss_on, g_on = _grpo_grads(on, batch, adv)
    loss_off, g_off = _grpo_grads(off, batch, adv)
    per_image = [int(g.prod()) for g in batch.inputs["image_grid_thw"]]
    assert n_off == [sum(per_image)]
    assert n_on == [per_image[0] + per_image[3] + per_image[5] + per_image[6]]  # a, b, a, c
    torch.testing.assert_close(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and any("visual" in k for k in g_on)
    for k in g_on:
        torch.testing.assert_close(g_on[k], g_off[k], atol=1e-6, rtol=1e-5, msg=k)


def test_image_dedup_travels_with_deepcopy_and_stays_out_of_unknown_calls(tiny_arch):
    from r1vl.models import make_reference

    model, proc = tiny_arch
    pol = PolicyWithLoss(model)
    ref = make_reference(pol)  # copies the hooks; they must act on the copy, not on `model`
    n_model, n_ref = _patch_counter(model), _patch_counter(ref)
    enc = proc([proc.chat_prompt("read the bar")] * 3, [_img()] * 3, padding_side="left")
    with torch.no_grad():
        h_ref = PolicyWithLoss(ref).hidden_states(enc)
        h = pol.hidden_states(enc)
    per_image = int(enc["image_grid_thw"][0].prod())
    assert n_ref == [per_image] and n_model == [per_image]
    torch.testing.assert_close(h_ref, h)
    # a keyword the hooks do not know (hidden states asked for): all three images go through
    n_model.clear()
    with torch.no_grad():
        out = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"], output_hidden_states=True)
    assert n_model == [3 * per_image] and out.pooler_output.shape[0] == 3 * per_image // 4


def test_image_dedup_in_generation(tiny_arch):
    model, proc = tiny_arch
    PolicyWithLoss(model)
    counts = _patch_counter(model)
    enc = proc([proc.chat_prompt("read the bar")] * 4, [_img()] * 4, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert counts == [int(enc["image_grid_thw"][0].prod())]  # prefill: one image's patches, not four
    assert (out[:, -2:] == out[:1, -2:]).all()  # greedy: the four copies agree


def test_processor_processes_a_repeated_image_once(tiny, monkeypatch):
    model, proc = tiny
    a, b = _img(), _img(84, 56)
    b2 = b.copy()  # equal pixels, another object: processed on its own
    images = [a, a, b, a, b2, b2]
    texts = [proc.chat_prompt("read the bar")] * len(images)
    one_by_one = [proc([t], [im]) for t, im in zip(texts, images)]
    want = {k: torch.cat([enc[k] for enc in one_by_one]) for k in ("pixel_values", "image_grid_thw")}
    calls: list[int] = []
    inner = proc.image_processor.__class__.__call__
    monkeypatch.setattr(proc.image_processor.__class__, "__call__",
                        lambda self, images=None, **kw: (calls.append(len(images)), inner(self, images=images, **kw))[1])
    got = proc(texts, images)
    assert calls == [3]  # a, b, b2
    for k in ("pixel_values", "image_grid_thw"):
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    assert got["input_ids"].shape[0] == len(images)


# --------------------------------------------------------------------------- shared prompt forward


def _lm_calls(model):
    """(rows, positions) of each language-model call."""
    calls: list[tuple[int, int]] = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True)
    return calls


@pytest.mark.parametrize("micro", [10, 4, 3])
def test_shared_prompt_logprobs_match_the_plain_forward(tiny_arch, micro):
    import copy

    from r1vl.algo import build_batch, compute_logprobs

    model, proc = tiny_arch
    on_model = copy.deepcopy(model)
    on, off = PolicyWithLoss(on_model), PolicyWithLoss(copy.deepcopy(model), share_prompts=False)
    a, b = _img(), _img(84, 56)
    c = Image.fromarray(np.asarray(a)[:, ::-1].copy())
    # groups of one prompt; a text-only pair; same text, other image; same image, other text
    images = [a, a, a, None, None, b, b, a, c, c]
    questions = ["read the bar"] * 8 + ["what colour"] * 2
    prompts = [proc.chat_prompt(q, im is not None) for q, im in zip(questions, images)]
    batch = build_batch(proc, prompts, images, [[50 + i, 60, 70 + i, 80, 81][: 1 + i % 5] for i in range(10)])
    calls = _lm_calls(on_model)
    got = compute_logprobs(on, batch, micro_batch_size=micro)
    want = compute_logprobs(off, batch, micro_batch_size=micro)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (want != 0).sum() == batch.mask.sum()
    # prompt-only forwards: one row per group of repeated prompts within a micro-batch; a
    # micro-batch without repeats runs whole rows. micro 4: [a a a -] [- b b a] [c c];
    # micro 3: [a a a] [- - b] [b a c] (no repeat) [c] (one row)
    prompt_rows = sum(r for r, n in calls if n == batch.start)
    whole_rows = sum(r for r, n in calls if n > batch.start)
    assert (prompt_rows, whole_rows) == {10: (5, 0), 4: (2 + 3 + 1, 0), 3: (1 + 2, 3 + 1)}[micro]


def test_shared_rope_positions_are_the_plain_forwards(tiny_arch):
    """The shared path numbers each group's prompt once and each continuation on from it: the
    same 3-D positions as get_rope_index over whole rows, on every real token (rows with two
    image sizes, text-only rows among them, left padding, continuations of 1 to 5 tokens)."""
    from r1vl.algo import build_batch
    from r1vl.models import _prompt_groups, _rope_positions, _shared_rope_positions

    model, proc = tiny_arch
    a, b = _img(), _img(84, 56)
    images = [a, a, a, None, None, b, b, a]
    questions = ["read the bar"] * 6 + ["what colour is the longest bar of the chart"] * 2
    prompts = [proc.chat_prompt(q, im is not None) for q, im in zip(questions, images)]
    batch = build_batch(proc, prompts, images, [[50 + i, 60, 70 + i, 80, 81][: 1 + i % 5] for i in range(8)])
    inputs, start = batch.inputs, batch.start
    base = model.model
    keep, index, image_rows, _ = _prompt_groups(inputs, start, model.config)
    assert len(keep) == 5  # a a a | - - | b | b, another question | a, another question
    prompt_pos, cont_pos = _shared_rope_positions(base, inputs, start, keep, index, image_rows)
    full = _rope_positions(base, inputs)
    am = inputs["attention_mask"].bool()
    for k, r in enumerate(keep):
        on = am[r, :start]
        assert torch.equal(prompt_pos[:, k, :start][:, on], full[:, r, :start][:, on]), r
    real = am[:, start:]
    assert torch.equal(cont_pos[:, real], full[:, :, start:][:, real])
    assert (inputs["attention_mask"][:, 0] == 0).any() and cont_pos.shape == (3, 8, full.shape[2] - start)


def test_shared_prompt_needs_the_same_image_grid(tiny_arch):
    """Two blank pages of as many patches but other layouts (112x56 and 224x28: grids 4x8 and
    2x16) hold equal pixel blocks under the same question: no repeat (the grid sets the vision
    tower's and the rope's positions), so each row runs its own prompt."""
    import copy

    from r1vl.algo import build_batch, compute_logprobs

    model, proc = tiny_arch
    on, off = PolicyWithLoss(copy.deepcopy(model)), PolicyWithLoss(copy.deepcopy(model), share_prompts=False)
    images = [Image.new("RGB", (112, 56), "white"), Image.new("RGB", (224, 28), "white")]
    batch = build_batch(proc, [proc.chat_prompt("read the page", True)] * 2, images, [[50, 60, 70], [51, 61, 71]])
    grids = batch.inputs["image_grid_thw"].tolist()
    assert grids[0] != grids[1] and torch.equal(*batch.inputs["pixel_values"].split(
        [t * h * w for t, h, w in grids])) and torch.equal(*batch.inputs["input_ids"][:, :batch.start])
    got = compute_logprobs(on, batch, micro_batch_size=2)
    want = compute_logprobs(off, batch, micro_batch_size=2)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("checkpointing, attn", [(False, "sdpa"), (True, "sdpa"), (True, "eager")])
def test_shared_prompt_update_same_loss_and_grads(tiny_arch, checkpointing, attn):
    """With autograd (the update), under HF's non-reentrant gradient checkpointing too: the
    shared prompt's gradient is the sum over its rows, as with whole rows."""
    import copy

    from r1vl.algo import build_batch
    from r1vl.speedups import set_attn_implementation, set_gradient_checkpointing

    model, proc = tiny_arch
    on_model, off_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    for m in (on_model, off_model):
        set_gradient_checkpointing(m, checkpointing)
        set_attn_implementation(m, attn, "cpu")
    on, off = PolicyWithLoss(on_model), PolicyWithLoss(off_model, share_prompts=False)
    a, b = _img(), _img(84, 56)
    images = [a, a, a, b, b, None, None]
    prompts = [proc.chat_prompt("read the bar", im is not None) for im in images]
    batch = build_batch(proc, prompts, images, [[50 + i, 60, 70 + i, 80][: 1 + i % 4] for i in range(7)])
    # forward: the three prompts, then seven continuations; the recompute repeats each under checkpointing
    g_on = _shared_matches_whole_rows(on, off, on_model, batch, groups=3)
    assert any("visual" in k for k in g_on)


def _shared_matches_whole_rows(on, off, on_model, batch, groups: int) -> dict:
    """The update's loss and every gradient, then the log-probs, with the shared prompt
    forward (on) and whole rows (off); the language model first runs `groups` prompt rows,
    then every row's continuation. Returns the shared side's gradients."""
    n = batch.targets.shape[0]
    adv = torch.linspace(-1, 1, n)
    calls = _lm_calls(on_model)
    loss_on, g_on = _grpo_grads(on, batch, adv)
    loss_off, g_off = _grpo_grads(off, batch, adv)
    assert calls[:2] == [(groups, batch.start), (n, batch.targets.shape[1] - 1)]
    torch.testing.assert_close(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and any("embed" in k for k in g_on)
    for k in g_on:
        torch.testing.assert_close(g_on[k], g_off[k], atol=1e-6, rtol=1e-4, msg=k)
    # sft and log-probs take the same path
    with torch.no_grad():
        lp_on = on(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="logprobs")
        lp_off = off(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="logprobs")
    torch.testing.assert_close(lp_on * batch.mask, lp_off * batch.mask, atol=2e-5, rtol=1e-5)
    return g_on


@pytest.mark.parametrize("stale_deltas", [False, True])
def test_shared_prompt_text_only_batch(tiny_arch, stale_deltas):
    """A batch without images shares its prompts too, at the positions the plain forward
    uses (0..L-1, left padding included), also once a rollout has left rope_deltas on the
    model (the continuation forward must not take positions from the mask plus them)."""
    import copy

    from r1vl.algo import build_batch

    model, proc = tiny_arch
    on_model, off_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    on, off = PolicyWithLoss(on_model), PolicyWithLoss(off_model, share_prompts=False)
    questions = ["read the bar"] * 3 + ["what colour is the longest bar of the chart"] * 2 + ["count"]
    prompts = [proc.chat_prompt(q, False) for q in questions]
    batch = build_batch(proc, prompts, [None] * 6, [[50 + i, 60, 70 + i, 80][: 1 + i % 4] for i in range(6)])
    assert "pixel_values" not in batch.inputs and (batch.inputs["attention_mask"][:, 0] == 0).any()
    if stale_deltas:  # what HF generate leaves behind after a text-only rollout
        for m in (on_model, off_model):
            m.model.rope_deltas = torch.full((6, 1), 7, dtype=torch.long)
    _shared_matches_whole_rows(on, off, on_model, batch, groups=3)  # three groups, six rows


# --------------------------------------------------------------------------- reference weights in host memory


def _frozen_copy(model):
    from r1vl.models import make_reference

    return make_reference(model)


def test_host_weights_on_device_only_inside(tiny):
    from r1vl.models import HostWeights

    model, _ = tiny
    ref = _frozen_copy(model)
    want = {n: p.detach().clone() for n, p in ref.named_parameters()}
    tied = ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    # on CPU the device is the host: the bookkeeping is checked here, the moves by the CUDA test
    hw = HostWeights(ref, "cpu")
    assert len(hw.params) == len(list(ref.named_parameters(remove_duplicate=False))) - tied  # tied: moved once
    assert hw.nbytes == sum(p.numel() * p.element_size() for p in ref.parameters())
    with hw.on_device() as m:
        assert m is ref
        assert (ref.lm_head.weight is ref.model.language_model.embed_tokens.weight) == tied
    for p, h in zip(hw.params, hw.host):
        assert p.data_ptr() == h.data_ptr()  # outside: the host copies
    for n, p in ref.named_parameters():
        assert p.device.type == "cpu" and not p.requires_grad
        torch.testing.assert_close(p.detach(), want[n], atol=0, rtol=0, msg=n)
    try:  # an exception inside still points them back
        with hw.on_device():
            for p in hw.params:
                p.data = p.data.clone()
            raise KeyError("boom")
    except KeyError:
        pass
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(hw.params, hw.host))
    with pytest.raises(ValueError, match="frozen"):
        HostWeights(model, "cpu")


@pytest.mark.cuda
def test_host_weights_cuda_frees_and_matches(tiny):
    """On CUDA: the reference's weights leave the GPU until the pass that reads them, and its
    log-probs are those of the reference kept on the GPU."""
    import copy

    from r1vl.algo import build_batch, compute_logprobs
    from r1vl.models import HostWeights

    model, proc = tiny
    dev = torch.device("cuda")
    ref = _frozen_copy(copy.deepcopy(model)).to(dev)
    images = [_img(), _img(), None]
    prompts = [proc.chat_prompt("read the bar", im is not None) for im in images]
    batch = build_batch(proc, prompts, images, [[50, 60, 70], [51], [52, 53]]).to(dev)
    pol = PolicyWithLoss(ref)
    want = compute_logprobs(pol, batch, micro_batch_size=2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    hw = HostWeights(pol, dev)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated(dev) >= hw.nbytes
    assert all(p.device.type == "cpu" and p.is_pinned() for p in ref.parameters())
    with hw.on_device():
        got = compute_logprobs(pol, batch, micro_batch_size=2)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated(dev) >= hw.nbytes - 2**20  # the device copies went back


def test_a_reference_with_grounding_markers_is_matched_by_its_own_tokens(tiny):
    """Qwen2-VL's grounding markers are special tokens: the engines decode completions without
    them. A completion that reproduces the reference token for token is scored right, with its
    key steps (it scored 0: the reference's text kept <|box_start|>)."""
    from r1vl.rewards import accuracy_reward, key_step_fraction

    _, proc = tiny
    solution = ("### Step 1:\nThe cup is at <|box_start|>(10,20),(30,40)<|box_end|>.\n"
                "### The final answer is: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>")
    ids = proc.tokenizer(solution, add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.convert_tokens_to_ids("<|box_start|>") in ids  # one special token each
    decoded = proc.decode(ids)
    assert "<|box_start|>" not in decoded
    steps = [["at <|box_start|>(10,20),(30,40)<|box_end|>"]]
    assert key_step_fraction(decoded, steps) == 1.0
    assert accuracy_reward(decoded, solution, steps, variant="paper") == pytest.approx(1.1)
    assert accuracy_reward(decoded, solution, steps, variant="official") == pytest.approx(1.1)
    assert accuracy_reward(decoded.replace("(30,40)", "(30,41)"), solution, steps) == pytest.approx(0.0)
