"""The device's two ceilings, measured once per GPU session (the "two numbers" of the device
library's METHOD.md, which bench/NOTES.md names):

  copy   device-to-device copy bandwidth: dst.copy_(src) of a large random buffer,
         bytes read + bytes written over the median time (TB/s)
  mm     an 8192 x 8192 x 8192 bf16 matrix product on random data (TFLOP/s, median)

Both timed with triton.testing.do_bench (CUDA events, L2 flushed between calls, median).
Writes JSON (default bench/results/ceilings_<device>.json) and prints one line each.
bench/NOTES.md turns them into floor times for the loss benchmark's shapes.

    python bench/gpu_ceilings.py --out $OUT/ceilings.json
    python bench/gpu_ceilings.py --small        # CPU plumbing check (64 MiB, 512^3 fp32)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402
from bench_loss import device_name, device_slug, versions  # noqa: E402


def _median_ms(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=50, rep=max(200, reps * 10), return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _smi() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,"
             "power.draw,power.limit,temperature.gpu,memory.used,memory.total", "--format=csv"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0].rstrip(":") + ".",
                             epilog="A bad argument is one error line and exit code 2, before anything runs.")
    ap.add_argument("--small", action="store_true",
                    help="small sizes: 64 MiB copy, 512^3 product (default: off; always on for CPU)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    ap.add_argument("--copy-gib", type=_cli.positive_float, default=None,
                    help="copy buffer size in GiB (default: 4 on CUDA, 1/16 with --small or on CPU)")
    ap.add_argument("--mm", type=_cli.positive_int, default=None,
                    help="matrix size n of the n^3 product, bf16 on CUDA, fp32 on CPU "
                         "(default: 8192 on CUDA, 512 with --small or on CPU)")
    ap.add_argument("--reps", type=_cli.positive_int, default=20,
                    help="CPU: timed repeats, median taken; CUDA: do_bench gets max(200, 10 x reps) ms "
                         "(default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help="JSON path; missing folders are created (default: bench/results/ceilings_<device>.json)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    device = _cli.device(ap, "--device", args.device)
    out = _cli.out_file(ap, "--out", args.out or Path(__file__).resolve().parent / "results"
                        / f"ceilings_{device_slug(device)}.json")
    small = args.small or device.type == "cpu"
    copy_bytes = int((args.copy_gib or (1 / 16 if small else 4.0)) * 2**30)
    n = args.mm or (512 if small else 8192)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    res = dict(device=device_name(device), versions=versions(), host=platform.node(),
               config=dict(small=small, reps=args.reps,
                           timing="triton.testing.do_bench median (CUDA events, L2 flushed)"
                           if device.type == "cuda" else "median of wall-clock repeats after one warm-up call"))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res.update(sm_count=p.multi_processor_count, total_mem_bytes=p.total_memory,
                   l2_bytes=getattr(p, "L2_cache_size", None), capability=f"{p.major}.{p.minor}")
        res["nvidia_smi_before"] = _smi()

    src = torch.randint(0, 256, (copy_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, args.reps)
    res["copy"] = dict(bytes_each_way=copy_bytes, ms_median=ms, tb_per_s=2 * copy_bytes / (ms * 1e-3) / 1e12)
    src = dst = None  # free them: the lambda holds them only through closure cells

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: torch.mm(a, b, out=c), device, args.reps)
    res["mm"] = dict(n=n, dtype=str(dtype).replace("torch.", ""), ms_median=ms,
                     tflops=2 * n**3 / (ms * 1e-3) / 1e12, data="randn")
    a = b = c = None
    if device.type == "cuda":
        res["nvidia_smi_after"] = _smi()

    print(f"device: {res['device']}")
    print(f"copy: {res['copy']['tb_per_s']:.4g} TB/s (read+write, {copy_bytes / 2**30:.2f} GiB each way, "
          f"{res['copy']['ms_median']:.3f} ms median)")
    print(f"mm:   {res['mm']['tflops']:.4g} TFLOP/s ({n}^3 {res['mm']['dtype']}, random, "
          f"{res['mm']['ms_median']:.3f} ms median)")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
