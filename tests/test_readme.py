"""The README's code runs as written (docs that match the code)."""
import re
import types
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_fused_loss_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (example,) = [b for b in blocks if "fused_linear_grpo_loss" in b]
    torch.manual_seed(0)
    B, T, H, V = 2, 5, 16, 50
    lm_head = torch.nn.Linear(H, V, bias=False)
    ns = {
        "torch": torch,
        "model": types.SimpleNamespace(lm_head=lm_head),
        "hidden": torch.randn(B, T, H, requires_grad=True),
        "weight": lm_head.weight,
        "targets": torch.randint(0, V, (B, T)),
        "mask": torch.ones(B, T),
        "advantages": torch.randn(B),
    }
    ns["ref"] = torch.randn(B, T) - 4.0
    exec(compile(example, "README.md", "exec"), ns)
    assert ns["old"].shape == (B, T) and ns["old"].dtype == torch.float32
    assert torch.isfinite(ns["loss"]) and ns["loss"].ndim == 0
    assert ns["hidden"].grad is not None and lm_head.weight.grad is not None
    assert {"kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio"} <= set(ns["metrics"])
