"""r1vl.kernels: fused linear GRPO loss and log-probs (installed from kernels/).

    from r1vl.kernels import linear_logprobs, fused_linear_grpo_loss, FusedLinearGRPOLoss

The Triton kernels (triton_grpo.py) are imported lazily, on the first call that
uses the "triton" backend, so importing this package never needs Triton.

Imported under the top-level name `kernels` instead, this directory is a source
checkout's root on sys.path (`python -m r1vl.train` or pytest run from there)
shadowing Hugging Face's `kernels` package, which transformers imports (an optional
package up to transformers 5.24, a dependency from 5.25): it then loads that package
in its own place, or, where there is none, stays an empty module without a version,
which transformers takes for "not installed". See `_step_aside`.
"""
import sys as _sys


def _step_aside() -> None:
    """Replace this module, imported as `kernels`, by the first other `kernels` that the
    import system finds with this checkout's root left out of sys.path. The import
    statement returns what sys.modules holds when the module body ends, so the importer
    gets that package. None found: this module stays, empty."""
    import importlib.util
    import os

    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))

    def is_root(entry: str) -> bool:
        try:
            return os.path.samefile(entry or os.curdir, root)
        except (OSError, TypeError):
            return False

    saved = list(_sys.path)
    spec = None
    try:
        _sys.path[:] = [p for p in saved if not is_root(p)]
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            found = find("kernels", None) if find is not None else None
            if found is not None and not (found.origin and os.path.exists(found.origin)
                                          and os.path.samefile(found.origin, here)):
                spec = found
                break
    finally:
        _sys.path[:] = saved
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    _sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _step_aside()
else:
    from .api import FusedLinearGRPOLoss, fused_linear_grpo_loss, linear_logprobs
    from .reference import reference_grpo_loss, reference_linear_logprobs

    __all__ = [
        "linear_logprobs",
        "fused_linear_grpo_loss",
        "FusedLinearGRPOLoss",
        "reference_linear_logprobs",
        "reference_grpo_loss",
    ]
