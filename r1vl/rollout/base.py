"""The rollout-engine interface every engine implements (hf: embedded default; vllm: colocated).

An engine turns prompts into G completions each. The trainer only talks to this
interface, so engines are interchangeable behind `rollout.engine` in the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

import torch


@dataclass
class SamplingConfig:
    """How to sample. temperature == 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    return_logprobs: bool = False  # ask the engine for per-token log-probs of sampled tokens


@dataclass
class Prompt:
    """One prompt: chat text (already passed through the chat template, image
    placeholders NOT expanded) and the already-resized PIL image (or None)."""

    text: str
    image: Any = None  # PIL.Image.Image | None
    meta: dict = field(default_factory=dict)


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to generate()
    token_ids: list[int]  # generated ids (EOS included when generation stopped on it)
    text: str  # decoded text, special tokens skipped
    finish_reason: str  # "stop" (EOS / stop string) or "length"
    logprobs: list[float] | None = None  # engine's per-token log-probs of token_ids


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingConfig) -> list[Completion]:
        """n completions per prompt, ordered prompt-major: [p0c0, p0c1, ..., p1c0, ...]. An engine
        whose generate() is a collective across ranks says so with a true `collective_generate`
        attribute: callers then call it as often on every rank, an empty list where a rank has none."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push (HF-named) policy weights into the engine."""

    def sleep(self) -> None:
        """Release generation memory (weights/KV) while the trainer runs."""

    def wake(self) -> None:
        """Re-acquire generation memory before generate()."""
