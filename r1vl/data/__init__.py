"""Data for StepGRPO: the R1-VL prompt/response format, loaders, image sizing, the synthetic task."""
from r1vl.data.format import (
    FINAL_ANSWER,
    REASONING_INSTRUCTION,
    extract_final_answer,
    format_prompt,
    step_sections,
)

__all__ = ["format_prompt", "extract_final_answer", "step_sections", "REASONING_INSTRUCTION", "FINAL_ANSWER"]
