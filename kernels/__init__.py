"""r1vl.kernels: fused linear GRPO loss and log-probs (installed from kernels/)."""
