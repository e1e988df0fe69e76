"""Rollout engines behind one interface (see base.py)."""
from r1vl.rollout.base import Completion, Prompt, RolloutEngine, SamplingConfig

__all__ = ["Completion", "Prompt", "RolloutEngine", "SamplingConfig"]
