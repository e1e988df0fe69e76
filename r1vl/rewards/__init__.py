"""StepGRPO's rewards: StepRAR (`accuracy_reward`) and StepRVR (`validity_reward`), and
`score_batch`, which scores many completions in a process pool with per-call timeouts.

See `r1vl.rewards.core` for the exact rules and the two StepRAR variants.
"""
from r1vl.rewards.core import (
    DEFAULT_ALPHA,
    VARIANTS,
    AccuracyResult,
    accuracy_details,
    accuracy_reward,
    key_step_fraction,
    key_step_groups,
    validity_reward,
)
from r1vl.rewards.pool import close_pools, score_batch
from r1vl.rewards.verify import DEFAULT_TIMEOUT_S

__all__ = [
    "accuracy_reward",
    "validity_reward",
    "score_batch",
    "accuracy_details",
    "key_step_fraction",
    "key_step_groups",
    "close_pools",
    "AccuracyResult",
    "DEFAULT_ALPHA",
    "DEFAULT_TIMEOUT_S",
    "VARIANTS",
]
