"""Model speed-ups (r1vl.speedups): attention choice, gradient checkpointing, and Liger's
Qwen2-VL / Qwen2.5-VL patch with the pinned liger-kernel / transformers versions.

On CPU the patch is applied to tiny models and checked structurally (which forwards and
module functions are Liger's); Liger's RMSNorm/SwiGLU/LayerNorm kernels cannot run under
Triton's interpreter, its RoPE kernel can and is compared with transformers' RoPE on the
tiny model's real M-RoPE cos/sin. On CUDA (marked) the patched model's log-probs match.
"""
import copy
import logging
import re

import pytest
import torch

from conftest import missing_off_linux
from r1vl import speedups
from r1vl.models import PolicyWithLoss, build_tiny

CORPUS = [f"### Step 1: {a} x {b} = {a * b}\n### The final answer is: {a * b}" for a in range(10) for b in range(10)]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)

# every module-level name liger's patch (or ours) may rebind, restored after each test
PATCHED_NAMES = {
    "qwen2_vl": ("apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2VLRMSNorm",
                 "LayerNorm", "CrossEntropyLoss", "Qwen2MLP"),
    "qwen2_5_vl": ("apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2_5_VLRMSNorm",
                   "CrossEntropyLoss", "Qwen2MLP"),
}


@pytest.fixture
def restore_transformers(monkeypatch):
    """Liger patches transformers' modules for the whole process: undo it after the test
    (names that did not exist are deleted again)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    mods = {"qwen2_vl": modeling_qwen2_vl, "qwen2_5_vl": modeling_qwen2_5_vl}
    missing = object()
    saved = {(fam, name): getattr(mods[fam], name, missing) for fam, names in PATCHED_NAMES.items() for name in names}
    for cls in (modeling_qwen2_vl.Qwen2VLForConditionalGeneration, modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
        monkeypatch.setattr(cls, "forward", cls.forward)
    yield mods
    for (fam, name), value in saved.items():
        if value is missing:
            if hasattr(mods[fam], name):
                delattr(mods[fam], name)
        else:
            setattr(mods[fam], name, value)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(CORPUS, vocab_size=300, seed=0, **SIZES)


def _tiny_qwen25():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                           fullatt_block_indexes=[0], window_size=28),
        image_token_id=120, video_token_id=121, vision_start_token_id=122)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg)


# --------------------------------------------------------------------------- attention / checkpointing


def test_attention_choice(monkeypatch):
    assert speedups.resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert speedups.resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(speedups.SpeedupError, match="needs a CUDA device"):
        speedups.resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(speedups.SpeedupError, match="expected one of"):
        speedups.resolve_attn_implementation("flash", "cpu")
    monkeypatch.setattr(speedups, "flash_attn_available", lambda: False)
    assert speedups.resolve_attn_implementation("auto", "cuda") == "sdpa"
    with pytest.raises(speedups.SpeedupError, match="flash-attn is not installed"):
        speedups.resolve_attn_implementation("flash_attention_2", "cuda")
    monkeypatch.setattr(speedups, "flash_attn_available", lambda: True)
    assert speedups.resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    # flash-attn computes in 16 bits: float32 weights (the default config) take sdpa under
    # "auto" (flash-attn's first forward raised) and an explicit request is refused
    assert speedups.resolve_attn_implementation("auto", "cuda", "bfloat16") == "flash_attention_2"
    assert speedups.resolve_attn_implementation("auto", "cuda", torch.float16) == "flash_attention_2"
    assert speedups.resolve_attn_implementation("auto", "cuda", "float32") == "sdpa"
    with pytest.raises(speedups.SpeedupError, match="needs bfloat16 or float16 weights, the model's are float32"):
        speedups.resolve_attn_implementation("flash_attention_2", "cuda", torch.float32)


def test_an_impossible_attention_stops_before_the_weights_load(monkeypatch, tmp_path):
    """build_model checks model.attn_implementation first: flash_attention_2 on a CPU was
    transformers' ImportError traceback from inside from_pretrained / the tiny build."""
    from types import SimpleNamespace

    from r1vl import models, train
    from r1vl.config import load_config

    def never(*a, **k):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(models, "load_pretrained", never)
    monkeypatch.setattr(models, "load_policy", never)
    d = SimpleNamespace(device=torch.device("cpu"), main=True, barrier=lambda: None)
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(train.UserError, match="flash_attention_2 needs a CUDA device"):
        train.build_model(cfg, d, [], None)
    monkeypatch.setattr(speedups, "flash_attn_available", lambda: True)
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.attn_implementation=flash_attention_2"])
    d.device = torch.device("cuda")
    with pytest.raises(train.UserError, match="needs bfloat16 or float16 weights"):
        train.build_model(cfg, d, [], None)


@pytest.mark.parametrize("setting, says", [
    ("model.attn_implementation=flash_attention_2", "flash_attention_2 needs a CUDA device"),
    # under torchrun: torch's "Distributed package doesn't have NCCL built in" traceback
    ("distributed.backend=nccl", "distributed.backend=nccl needs CUDA GPUs"),
])
def test_what_needs_cuda_stops_the_run_before_the_data_and_check_says_it(tmp_path, capsys, caplog, setting, says):
    """flash_attention_2 or NCCL on a machine without CUDA: --check said "config OK" (it now says
    what a run here would refuse, without failing: it may run on a login node for a GPU job), and
    a run refused flash_attention_2 only after generating and decoding the data."""
    from r1vl.train import main

    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="r1vl.train"):  # --check sets up no logging: Python's last resort prints it
        assert main(["--check", f"output_dir={tmp_path / 'check'}", setting, "data.synthetic_train_size=4",
                     "data.synthetic_test_size=2", "model.tiny.tokenizer_corpus_size=4"]) == 0
    said = [r.getMessage() for r in caplog.records if says in r.getMessage()]
    assert len(said) == 1 and "not refused by --check on a machine without CUDA" in said[0]
    capsys.readouterr()
    assert main([f"output_dir={out}", setting, "logging.progress=false", "warmup.steps=0", "train.max_steps=0",
                 "train.eval_before=false", "train.eval_after=false", "data.synthetic_train_size=4",
                 "data.synthetic_test_size=2", "model.tiny.tokenizer_corpus_size=4"]) == 2
    assert says in capsys.readouterr().err
    assert not (out / "data").exists()


def test_cpu_speedups_skip_liger_in_one_line_and_checkpointing_keeps_gradients(tiny, caplog):
    model, proc = tiny
    from r1vl.algo import build_batch

    batch = build_batch(proc, [proc.chat_prompt("What is 2 x 3?", with_image=False)] * 2, [None, None],
                        [[30, 31, 32], [40, 41]])

    def grads(m):
        pol = PolicyWithLoss(m)
        pol.train()
        loss, _ = pol(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="sft")
        loss.backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    plain = copy.deepcopy(model)
    fast = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="r1vl.speedups"):
        report = speedups.apply_speedups(fast, device="cpu", attn_implementation="eager", gradient_checkpointing=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "r1vl.speedups"]
    assert len(lines) == 1 and "Liger kernels skipped on cpu" in lines[0]
    assert report == {"device": "cpu", "attn_implementation": "eager", "gradient_checkpointing": True, "liger": []}
    assert fast.config._attn_implementation == "eager" and fast.model.visual.config._attn_implementation == "eager"
    assert fast.is_gradient_checkpointing and fast.model.language_model.gradient_checkpointing
    assert type(fast.model.language_model.norm).forward is type(plain.model.language_model.norm).forward
    g0, g1 = grads(plain), grads(fast)
    assert sorted(g0) == sorted(g1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    speedups.set_gradient_checkpointing(fast, False)
    assert not fast.is_gradient_checkpointing


# --------------------------------------------------------------------------- Liger


def test_pinned_versions():
    import importlib.metadata as md

    from packaging.version import Version

    tv = Version(md.version("transformers"))
    assert Version("5.19") <= tv < Version("5.23"), f"transformers {tv}: liger-kernel 0.8.5's Qwen2-VL patch is tested on 5.19-5.22"
    if not missing_off_linux("liger_kernel"):  # on Linux always
        lv = Version(md.version("liger-kernel"))
        assert Version("0.8.5") <= lv < Version("0.9"), f"liger-kernel {lv}"


@pytest.mark.needs("liger_kernel")
def test_liger_patches_qwen2_vl(tiny, restore_transformers):
    from liger_kernel.transformers.layer_norm import LigerLayerNorm
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    mod = restore_transformers["qwen2_vl"]
    hf_rope = mod.apply_rotary_pos_emb
    model = copy.deepcopy(tiny[0])
    cls_forward = type(model).forward
    patched = speedups.apply_liger(PolicyWithLoss(model))  # finds the HF model inside the wrapper
    assert patched == ["rms_norm", "swiglu", "layer_norm", "rope"]
    text, vision = model.model.language_model, model.model.visual
    for norm in [text.norm] + [m for layer in text.layers for m in (layer.input_layernorm,
                                                                    layer.post_attention_layernorm)]:
        assert norm.forward.__func__ is LigerRMSNorm.forward and norm.forward.__self__ is norm
    for layer in text.layers:
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    for block in vision.blocks:
        assert block.norm1.forward.__func__ is LigerLayerNorm.forward
        assert block.norm2.forward.__func__ is LigerLayerNorm.forward
    # the attention's RoPE (transformers 5.x: standard rope on recomposed M-RoPE cos/sin) is Liger's
    assert mod.apply_rotary_pos_emb is liger_rotary_pos_emb
    # models built later get Liger's classes; the head / loss are never Liger's
    assert mod.Qwen2VLRMSNorm is LigerRMSNorm and mod.Qwen2MLP is LigerSwiGLUMLP
    assert type(model).forward is cls_forward and "forward" not in vars(model)
    assert getattr(mod, "CrossEntropyLoss", None) is None or "liger" not in mod.CrossEntropyLoss.__module__
    # the trainer's reference model is a deepcopy: its patched forwards are bound to the copy
    ref = copy.deepcopy(model)
    assert ref.model.language_model.norm.forward.__self__ is ref.model.language_model.norm
    assert ref.model.language_model.norm.forward.__func__ is LigerRMSNorm.forward

    # Liger's RoPE kernel (runs under Triton's interpreter on CPU) = transformers' on the
    # tiny model's own M-RoPE cos/sin, values and gradients
    torch.manual_seed(0)
    B, T, D = 2, 7, model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    position_ids = torch.stack([torch.arange(T).expand(B, T), torch.arange(T).flip(0).expand(B, T),
                                (torch.arange(T) % 3).expand(B, T)])
    cos, sin = text.rotary_emb(torch.zeros(1, dtype=torch.float32), position_ids)
    assert torch.equal(cos[..., : D // 2], cos[..., D // 2:])  # the layout Liger's kernel assumes
    # laid out as in the attention: projections viewed as [B, T, H, D], then transposed (not contiguous)
    q = torch.randn(B, T, 2, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, 1, D).transpose(1, 2).requires_grad_()
    w = torch.randn(B, 2, T, D)
    outs = []
    for fn in (hf_rope, liger_rotary_pos_emb):
        qe, ke = fn(q, k, cos, sin)
        gq, gk = torch.autograd.grad((qe * w).sum() + (ke * w[:, :1]).sum() * 0.5, (q, k))
        outs.append((qe.detach(), ke.detach(), gq, gk))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.needs("liger_kernel")
def test_liger_patches_qwen2_5_vl(restore_transformers):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    mod = restore_transformers["qwen2_5_vl"]
    model = _tiny_qwen25()
    assert speedups.apply_liger(model) == ["rms_norm", "swiglu", "rope"]  # its vision norms are RMSNorms
    text, vision = model.model.language_model, model.model.visual
    assert text.norm.forward.__func__ is LigerRMSNorm.forward
    assert text.layers[0].mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert vision.blocks[0].norm1.forward.__func__ is LigerRMSNorm.forward
    assert mod.apply_rotary_pos_emb is liger_rotary_pos_emb and "forward" not in vars(model)


@pytest.mark.needs("liger_kernel")
def test_liger_refuses_a_transformers_without_its_targets(tiny, restore_transformers, monkeypatch):
    mod = restore_transformers["qwen2_vl"]
    monkeypatch.delattr(mod, "Qwen2VLRMSNorm")
    with pytest.raises(speedups.SpeedupError, match=re.escape("modeling_qwen2_vl.Qwen2VLRMSNorm")):
        speedups.apply_liger(copy.deepcopy(tiny[0]))
    with pytest.raises(speedups.SpeedupError, match="unsupported model"):
        speedups.apply_liger(torch.nn.Linear(2, 2))


@pytest.mark.cuda
def test_liger_on_cuda_keeps_logprobs(tiny, restore_transformers):
    from r1vl.algo import build_batch, compute_logprobs

    model, proc = tiny
    batch = build_batch(proc, [proc.chat_prompt("What is 2 x 3?", with_image=False)] * 2, [None, None],
                        [[30, 31, 32], [40, 41]]).to("cuda")
    plain = PolicyWithLoss(copy.deepcopy(model).cuda())
    fast_model = copy.deepcopy(model).cuda()
    report = speedups.apply_speedups(fast_model, device="cuda", attn_implementation="sdpa")
    assert report["liger"] == ["rms_norm", "swiglu", "layer_norm", "rope"]
    want = compute_logprobs(plain, batch, micro_batch_size=2)
    got = compute_logprobs(PolicyWithLoss(fast_model), batch, micro_batch_size=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_shared_prompt_logprobs_on_cuda(tiny, attn):
    """The shared prompt forward (a KV cache over left-padded prompts, right-padded
    continuations) against whole rows, with CUDA's attention kernels."""
    import numpy as np
    from PIL import Image

    from r1vl.algo import build_batch, compute_logprobs

    def _img(w=56, h=84, seed=0):
        return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))

    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model, proc = tiny
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    speedups.set_attn_implementation(model, attn, torch.device("cuda"))
    images = [_img()] * 3 + [_img(84, 56)] * 3
    prompts = [proc.chat_prompt("read the bar")] * 3 + [proc.chat_prompt("what colour")] * 3
    batch = build_batch(proc, prompts, images, [[30, 31, 32], [40], [41, 42], [43, 44, 45, 46], [47], [48, 49]],
                        dtype=torch.bfloat16).to("cuda")
    got = compute_logprobs(PolicyWithLoss(model), batch, micro_batch_size=6)
    want = compute_logprobs(PolicyWithLoss(model, share_prompts=False), batch, micro_batch_size=6)
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2)


def test_image_dedup_qwen2_5_vl_window_attention():
    """Qwen2.5-VL's tower reorders patches into windows: the de-duplicated call must still
    give each image its own block, in the original order (pooler_output and last_hidden_state)."""
    import copy

    from r1vl.models import install_image_dedup

    plain = _tiny_qwen25().eval()
    plain.model.visual.window_size = 56  # windows of 2x2 merged tokens: a real reordering
    model = copy.deepcopy(plain)
    assert install_image_dedup(model)
    vis, cfg = model.model.visual, model.config.vision_config
    grid = torch.tensor([[1, 8, 12]] * 2 + [[1, 12, 8]] + [[1, 8, 12]] * 2)
    per = 8 * 12
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(per, dim, generator=g) for _ in range(3))
    pixels = torch.cat([a, a, b, c, c])
    seen: list[int] = []
    vis.patch_embed.register_forward_hook(lambda m, args, o: seen.append(o.shape[0]))
    with torch.no_grad():
        got = vis(pixels, grid_thw=grid)
        want = plain.model.visual(pixels, grid_thw=grid)
    assert seen == [3 * per]
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("images", [True, False])
def test_shared_prompt_logprobs_qwen2_5_vl(images):
    """Qwen2.5-VL's rope positions (get_rope_index with its own arguments; text-only: the
    text model's 0..L-1) through the shared prompt forward: the same log-probs as whole
    rows, with left-padded prompts, and one prompt row per group."""
    import copy

    model = _tiny_qwen25().eval()
    cfg = model.config
    vc = cfg.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    grids = [[1, 4, 4], [1, 4, 6]]
    pix = [torch.randn(t * h * w, dim, generator=g) for t, h, w in grids]

    def prompt(img, text):
        if not images:
            return [cfg.vision_start_token_id] * (img + 1) + text
        return [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(torch.tensor(grids[img]).prod()) // 4) + text

    rows = [(0, [5, 6]), (0, [5, 6]), (1, [7]), (1, [7]), (1, [7])]
    prompts = [prompt(i, t) for i, t in rows]
    conts = [[10, 11, 12], [13], [14, 15], [16, 17, 18], [19]]
    P, T = max(map(len, prompts)), max(map(len, conts))
    ids = torch.zeros(len(rows), P + T, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, (p, c) in enumerate(zip(prompts, conts)):
        ids[r, P - len(p): P] = torch.tensor(p)
        ids[r, P: P + len(c)] = torch.tensor(c)
        am[r, P - len(p): P + len(c)] = 1
    batch = {"input_ids": ids, "attention_mask": am, "mm_token_type_ids": (ids == cfg.image_token_id).int()}
    if images:
        batch.update(pixel_values=torch.cat([pix[i] for i, _ in rows]),
                     image_grid_thw=torch.tensor([grids[i] for i, _ in rows]))
    targets, mask = ids[:, P:], am[:, P:]
    on, off = PolicyWithLoss(model), PolicyWithLoss(copy.deepcopy(model), share_prompts=False)
    calls: list[tuple[int, int]] = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True)
    with torch.no_grad():
        got = on(batch, targets, mask, start=P, mode="logprobs")
        want = off(batch, targets, mask, start=P, mode="logprobs")
    torch.testing.assert_close(got * mask, want * mask, atol=2e-5, rtol=1e-5)
    assert calls[0] == (2, P)  # the two groups' prompts, once each


def test_deepspeed_bf16_makes_a_float32_model_16_bit(monkeypatch, tmp_path):
    """DeepSpeed's bf16 casts the policy (and the reference) whatever model.dtype says: flash-attn
    runs there, so "auto" takes it and an explicit request is not refused (both went wrong when
    only model.dtype was read)."""
    from pathlib import Path

    from r1vl import train
    from r1vl.config import load_config

    monkeypatch.setattr(speedups, "flash_attn_available", lambda: True)
    ds = Path(__file__).resolve().parents[1] / "configs" / "ds_zero2.json"   # bf16.enabled: true
    cuda = torch.device("cuda")
    for attn in ("auto", "flash_attention_2"):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"model.attn_implementation={attn}", f"deepspeed={ds}"])
        assert cfg.model.dtype == "float32"
        assert train.attn_implementation(cfg, cuda) == "flash_attention_2"
    fp32 = tmp_path / "ds_fp32.json"
    fp32.write_text(ds.read_text().replace('"bf16": {"enabled": true}', '"bf16": {"enabled": false}'))
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.attn_implementation=auto", f"deepspeed={fp32}"])
    assert train.attn_implementation(cfg, cuda) == "sdpa"
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.attn_implementation=auto"])
    assert train.attn_implementation(cfg, cuda) == "sdpa"
