"""r1vl: StepGRPO (R1-VL, arXiv 2503.12937) for Qwen2-VL / Qwen2.5-VL."""

__version__ = "0.1.0"
