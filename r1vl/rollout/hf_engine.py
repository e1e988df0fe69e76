"""The Hugging Face rollout engine: batched `generate` with the policy itself.

Left-padded batches, a KV cache, temperature / top-p / top-k sampling or greedy decoding
(temperature 0), stopping on the model's EOS ids and on stop strings, and (when asked)
the per-token log-probs of the sampled tokens under the sampling temperature.

The engine holds the very model the trainer optimises, so `load_weights` only copies
tensors that are not already the model's own, and `sleep` / `wake` have nothing to free
(the colocated vLLM engine is where they matter). Sampling is reproducible: with
`SamplingConfig.seed` set, the call runs under its own forked RNG stream.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable

import torch
from torch import nn

from r1vl.models import repeat_image_blocks
from r1vl.rollout.base import Completion, Prompt, SamplingConfig

log = logging.getLogger(__name__)


class _StopOnStrings:
    """A transformers StoppingCriteria: a row is done once its generated text holds a stop string."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        gen = input_ids[:, self.prompt_len:].tolist()
        for i, ids in enumerate(gen):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            done[i] = any(s in text for s in self.stops)
        return done


def _checked_batch_size(n: int) -> int:
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {n}")
    return n


class HFEngine:
    """generate(prompts, n, sampling) -> n completions per prompt, prompt-major.

    model: a Qwen2-VL-style HF model (its lm_head may be r1vl.models.FusedLMHead);
    processor: r1vl.models.VLProcessor; batch_size: sequences per generate() call;
    synced_gpus: pass-through for ZeRO-3 (every rank must then call generate equally often);
    eos_token_ids: ids that end a completion (default: the processor's <|im_end|>, <|endoftext|>)."""

    def __init__(self, model: nn.Module, processor, *, batch_size: int = 32, synced_gpus: bool = False,
                 eos_token_ids: list[int] | None = None):
        self.model = model
        self.processor = processor
        self.batch_size = _checked_batch_size(batch_size)
        self.synced_gpus = synced_gpus
        self.eos_ids = list(eos_token_ids) if eos_token_ids else processor.stop_token_ids()
        self.pad_id = processor.pad_token_id
        self.suppress_ids = processor.vision_token_ids()  # image placeholders never appear in outputs
        self.last_stats: dict[str, float] = {}
        self._neutral = _neutral_generation_config(model)

    @contextlib.contextmanager
    def batch_size_of(self, batch_size: int):
        """generate() splits its sequences `batch_size` at a time inside the block (the trainer's
        held-out evaluations: train.eval_batch_size, where rollouts take rollout.batch_size)."""
        before, self.batch_size = self.batch_size, _checked_batch_size(batch_size)
        try:
            yield self
        finally:
            self.batch_size = before

    # -- interface
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"HFEngine.load_weights: the model has no tensor named {name!r}")
                dst = state[name]
                if dst.data_ptr() == tensor.data_ptr():
                    continue  # the engine shares the trainer's parameters
                if dst.shape != tensor.shape:
                    raise ValueError(f"HFEngine.load_weights: {name}: shape {tuple(tensor.shape)} != "
                                     f"{tuple(dst.shape)}")
                dst.copy_(tensor)

    def sleep(self) -> None:  # shares the trainer's memory: nothing to release
        pass

    def wake(self) -> None:
        pass

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingConfig) -> list[Completion]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if sampling.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[Completion] = []
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=self._rng_devices(), enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for s in range(0, len(flat), self.batch_size):
                    out.extend(self._generate_batch(flat[s: s + self.batch_size], sampling))
        finally:
            self.model.train(was_training)
        n_tok = sum(len(c.token_ids) for c in out)
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "tokens": float(n_tok), "tokens_per_s": n_tok / max(dt, 1e-9)}
        return out

    # -- internals
    def _takes_mm_types(self) -> bool:
        if not hasattr(self, "_mm_types"):
            import inspect

            self._mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        return self._mm_types

    def _rng_devices(self) -> list:
        dev = next(self.model.parameters()).device
        return [dev] if dev.type == "cuda" else []

    @torch.no_grad()
    def _generate_batch(self, items: list[tuple[int, Prompt]], sampling: SamplingConfig) -> list[Completion]:
        from transformers import StoppingCriteriaList

        texts = [p.text for _, p in items]
        images = [p.image for _, p in items if p.image is not None]
        # each prompt's image once (its n rows share it): copied to the device once, repeated there
        batch = self.processor(texts, images, padding_side="left", unique_images=True)
        index = batch.pop("image_index", None)
        if not self._takes_mm_types():  # transformers releases whose Qwen2-VL has no such input
            batch.pop("mm_token_type_ids", None)
        device = next(self.model.parameters()).device
        grid = batch.get("image_grid_thw")
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            pixels = batch["pixel_values"].to(next(self.model.parameters()).dtype)
            batch["pixel_values"] = pixels if index is None else repeat_image_blocks(pixels, grid, index.tolist())
        prompt_len = batch["input_ids"].shape[1]
        greedy = sampling.temperature == 0
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=sampling.return_logprobs,
            synced_gpus=self.synced_gpus,
            suppress_tokens=self.suppress_ids or None,
        )
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        stops = [s for s in sampling.stop if s]
        if stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnStrings(self.processor.tokenizer, stops, prompt_len)]
            )
        # generate() takes every setting not passed here from the model's generation_config, which a
        # checkpoint's generation_config.json fills (repetition_penalty, no_repeat_ngram_size, ...):
        # samples would then come from another distribution than the log-probs that score them
        saved, self.model.generation_config = self.model.generation_config, self._neutral
        try:
            res = self.model.generate(**batch, **kwargs)
        finally:
            self.model.generation_config = saved
        seqs = res.sequences[:, prompt_len:].tolist()
        logps = None
        if sampling.return_logprobs:
            logits = torch.stack(res.logits, dim=1).float()  # [B, steps, V] (raw, this batch only)
            temp = sampling.temperature if sampling.temperature > 0 else 1.0
            tok = res.sequences[:, prompt_len:]
            logps = torch.log_softmax(logits / temp, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1).tolist()
        out = []
        eos = set(self.eos_ids)
        for row, ((pidx, _), ids) in enumerate(zip(items, seqs)):
            finish = "length"
            cut = len(ids)
            for j, t in enumerate(ids):
                if t in eos:
                    cut, finish = j + 1, "stop"
                    break
            ids = ids[:cut]
            text = self.processor.decode(ids)
            if stops and any(s in text for s in stops):
                finish = "stop"
                # the shortest token prefix that holds a stop string; text stays decode(token_ids)
                # (the stop string included, as vLLM's engine keeps it): what is scored is what is trained
                for k in range(1, len(ids) + 1):
                    if any(s in self.processor.decode(ids[:k]) for s in stops):
                        ids = ids[:k]
                        break
                text = self.processor.decode(ids)
            out.append(Completion(
                prompt_index=pidx,
                token_ids=ids,
                text=text,
                finish_reason=finish,
                logprobs=None if logps is None else logps[row][: len(ids)],
            ))
        return out


# the settings of a generation_config that change which tokens are drawn (the engine sets temperature,
# top_p, top_k and do_sample itself on every call)
_SAMPLING_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_new_tokens",
                    "min_length", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "top_h", "bad_words_ids",
                    "force_words_ids", "sequence_bias", "begin_suppress_tokens", "forced_bos_token_id",
                    "forced_eos_token_id", "exponential_decay_length_penalty", "renormalize_logits",
                    "num_beams", "num_beam_groups", "penalty_alpha", "diversity_penalty", "length_penalty",
                    "guidance_scale", "low_memory", "watermarking_config",
                    "prompt_lookup_num_tokens")


def _neutral_generation_config(model: nn.Module):
    """A GenerationConfig with the model's special-token ids and nothing else, for generate() to
    fall back on; the model's own settings that would change sampling are named once in the log."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    ids = {k: getattr(own, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if own is not None:
        default = GenerationConfig()
        changed = {k: getattr(own, k) for k in _SAMPLING_FIELDS
                   if hasattr(own, k) and getattr(own, k) != getattr(default, k, None)}
        if changed:
            log.info("HF engine: not applying the model's generation_config settings %s (rollouts and "
                     "evaluation sample with the configured temperature / top_p / top_k alone, as the "
                     "trainer's log-probs assume)", ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
    return GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
