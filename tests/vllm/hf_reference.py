"""Hugging Face transformers as the reference the vLLM engine is checked against."""
from __future__ import annotations

import torch


def hf_inputs(processor, text: str, image=None) -> dict:
    """The processor's expansion of one prompt (placeholders -> image tokens)."""
    kwargs = dict(text=[text], return_tensors="pt")
    if image is not None:
        kwargs["images"] = [image]
    enc = processor(**kwargs)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}


@torch.no_grad()
def hf_greedy(model, processor, text: str, image=None, max_new_tokens: int = 8) -> list[int]:
    """Greedy continuation ids (EOS included when it is produced)."""
    enc = hf_inputs(processor, text, image)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def hf_logprobs(model, processor, text: str, completion_ids: list[int], image=None) -> torch.Tensor:
    """log p(completion_ids[t] | prompt, completion_ids[:t]) under the HF model."""
    enc = hf_inputs(processor, text, image)
    prompt_len = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([completion_ids])], dim=1)
    enc["input_ids"] = ids
    enc["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in enc:  # completion tokens are text
        tt = enc["mm_token_type_ids"]
        enc["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(1, len(completion_ids))], dim=1)
    logits = model(**enc).logits[0].float()
    lp = torch.log_softmax(logits[prompt_len - 1: -1], dim=-1)
    return lp.gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def perturbed_state(model, seed: int, scale: float = 0.5) -> list[tuple[str, torch.Tensor]]:
    """New weights for every parameter (in place on `model` too), HF-named, in
    named_parameters() order (a tied head appears once, as the embeddings)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(noise * scale * (p.detach().float().std().clamp_min(1e-3)).item())
            out.append((name, p.detach().clone()))
    return out
