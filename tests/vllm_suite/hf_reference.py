"""Hugging Face transformers (with the trainer's VLProcessor) as the reference the
vLLM engine is checked against."""
from __future__ import annotations

import torch


def hf_inputs(processor, text: str, image=None) -> dict:
    """The trainer's expansion of one prompt (placeholder -> image tokens)."""
    return processor([text], [image] if image is not None else None)


@torch.no_grad()
def hf_greedy(model, processor, text: str, image=None, max_new_tokens: int = 8, *,
              eos_ids: list[int] | None = None, suppress_ids: list[int] | None = None) -> list[int]:
    """Greedy continuation ids (EOS included when it is produced)."""
    enc = hf_inputs(processor, text, image)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, eos_token_id=eos_ids or [processor.tokenizer.eos_token_id],
                         suppress_tokens=suppress_ids or None, pad_token_id=processor.pad_token_id)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    stops = set(eos_ids or [processor.tokenizer.eos_token_id])
    for k, t in enumerate(ids):  # generate pads after EOS: cut there
        if t in stops:
            return ids[: k + 1]
    return ids


@torch.no_grad()
def hf_logprobs(model, processor, text: str, completion_ids: list[int], image=None,
                temperature: float = 1.0, suppress_ids: list[int] | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) at each completion token, under the HF model
    (over the vocabulary without `suppress_ids` when given)."""
    enc = hf_inputs(processor, text, image)
    prompt_len = enc["input_ids"].shape[1]
    extra = torch.tensor([completion_ids])
    enc["input_ids"] = torch.cat([enc["input_ids"], extra], dim=1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra, dtype=torch.int32)],
                                         dim=1)
    logits = model(**enc).logits[0].float() / temperature
    if suppress_ids:
        logits[:, suppress_ids] = float("-inf")
    lp = torch.log_softmax(logits[prompt_len - 1: -1], dim=-1)
    return lp.gather(1, extra[0][:, None])[:, 0]


def perturb_(model, seed: int, scale: float = 0.5) -> list[tuple[str, torch.Tensor]]:
    """Move every parameter (in place) by scale x its std of Gaussian noise; returns
    the new HF-named tensors in named_parameters() order (a tied head appears once,
    as the embeddings)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(noise * scale * p.detach().float().std().clamp_min(1e-3).item())
            out.append((name, p.detach().clone()))
    return out
