"""Data for StepGRPO: the R1-VL prompt/response format, loaders, image sizing, the synthetic task.

    from r1vl.data import format_prompt, extract_final_answer, load_dataset, resize_image, smart_resize
"""
from r1vl.data.format import (
    FINAL_ANSWER,
    REASONING_INSTRUCTION,
    extract_final_answer,
    format_prompt,
    step_sections,
)
from r1vl.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    check_pixel_bounds,
    resize_image,
    smart_resize,
    to_rgb,
)
from r1vl.data.loader import DataError, R1VLDataset, Sample, load_dataset, normalize_key_steps

__all__ = [
    "format_prompt",
    "extract_final_answer",
    "step_sections",
    "smart_resize",
    "resize_image",
    "to_rgb",
    "check_pixel_bounds",
    "load_dataset",
    "Sample",
    "DataError",
    "R1VLDataset",
    "normalize_key_steps",
    "REASONING_INSTRUCTION",
    "FINAL_ANSWER",
    "DEFAULT_MIN_PIXELS",
    "DEFAULT_MAX_PIXELS",
]
