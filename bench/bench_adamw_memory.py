"""AdamW's extra memory during one optimizer step, per implementation (for-loop, foreach,
fused), as a multiple of the parameters' bytes: the measurement behind optim.impl's
default (bench/NOTES.md item 7). The step runs after one warm-up step, so both moments
exist; the peak is the c10 CPU allocator's live bytes above those before the step
(bench_loss.cpu_peak_bytes: torch.profiler's alloc/free events summed in time order).
On CPU, where this runs; the same implementations run on CUDA, where foreach is
PyTorch's default.

    python bench/bench_adamw_memory.py        # fp32 and bf16, 16 x 1024 x 1024 parameters
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from bench_loss import cpu_peak_bytes  # noqa: E402

IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def step_overhead(kind: str, dtype: torch.dtype, tensors: int = 16, size: int = 1024) -> float:
    """Peak extra bytes of one AdamW step / the parameters' bytes."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, size, generator=g).to(dtype)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = torch.optim.AdamW(params, lr=1e-3, **IMPLS[kind])
    opt.step()  # the moments exist from here on, as at every step after the first
    peak = cpu_peak_bytes(lambda _: opt.step(), None)
    return peak / sum(p.numel() * p.element_size() for p in params)


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="Prints a table only (no file). A bad argument is one error line and "
                                    "exit code 2.")
    ap.add_argument("--tensors", type=_cli.positive_int, default=16,
                    help="parameter tensors (default: %(default)s)")
    ap.add_argument("--size", type=_cli.positive_int, default=1024,
                    help="each parameter is size x size elements (default: %(default)s)")
    args = ap.parse_args(argv)
    from bench_loss import device_name
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}: {args.tensors} parameters of "
          f"{args.size} x {args.size}, one AdamW step after a warm-up step")
    print(f"{'dtype':<10} {'AdamW':<9} {'step extra / params':>20}")
    for dtype in (torch.float32, torch.bfloat16):
        for kind in IMPLS:
            x = step_overhead(kind, dtype, args.tensors, args.size)
            print(f"{str(dtype).replace('torch.', ''):<10} {kind:<9} {x:>19.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
