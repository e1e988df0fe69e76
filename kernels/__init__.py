"""r1vl.kernels: fused linear GRPO loss and log-probs (installed from kernels/).

    from r1vl.kernels import linear_logprobs, fused_linear_grpo_loss, FusedLinearGRPOLoss

The Triton kernels (triton_grpo.py) are imported lazily, on the first call that
uses the "triton" backend, so importing this package never needs Triton.
"""
from .api import FusedLinearGRPOLoss, fused_linear_grpo_loss, linear_logprobs
from .reference import reference_grpo_loss, reference_linear_logprobs

__all__ = [
    "linear_logprobs",
    "fused_linear_grpo_loss",
    "FusedLinearGRPOLoss",
    "reference_linear_logprobs",
    "reference_grpo_loss",
]
