"""Benchmark: the fused linear GRPO loss against its peers and the GEMM floor.

For each shape (hidden size H, vocabulary V, tokens N) one forward+backward of the
GRPO loss from the LM head (grpo, token level, β=0.04, old + ref log-probs given,
every token unmasked), timed and memory-measured for:

  fused          r1vl.kernels.fused_linear_grpo_loss (backend "auto": Triton on CUDA,
                 chunked PyTorch on CPU)
  reference      r1vl.kernels.reference_grpo_loss in fp32: materialised logits, eager
  liger_chunked  liger-kernel's LigerFusedLinearGRPOLoss (torch.compile'd on CUDA)
  liger_triton   liger-kernel's Triton GRPO loss on materialised logits (CUDA only)
  floor          the three bare LM-head GEMMs of forward+backward: h·Wᵀ, dlogits·W,
                 dlogitsᵀ·h (dlogits prepared outside the timed region)

Prints a table (median ms, peak memory, ratio to the floor, fused's speed-up over
each peer) and writes bench/results/loss_<device>.json:
  {"rows": [{"impl", "device", "hidden", "vocab", "tokens", "dtype", "ms_median",
             "peak_mem_bytes", "versions"}], "config": {...}}

Peak memory is the peak of live allocator bytes during one forward+backward, above
what was live before it (inputs): on CUDA torch.cuda.max_memory_allocated; on CPU
the c10 allocator's alloc/free events recorded by torch.profiler(profile_memory=True),
summed in time order (see bench_cpu_memory.py for a cross-check with process RSS).

    python bench/bench_loss.py            # default shapes (Qwen2-VL-2B/7B heads), bf16, CUDA
    python bench/bench_loss.py --small    # CPU-sized shapes, fp32
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from r1vl.kernels import fused_linear_grpo_loss, reference_grpo_loss

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = [(1536, 151936, 4096), (1536, 151936, 16384),
                  (3584, 152064, 4096), (3584, 152064, 16384)]
SMALL_SHAPES = [(256, 8192, 512), (512, 32000, 1024)]
IMPLS = ("fused", "reference", "liger_chunked", "liger_triton", "floor")


# ----------------------------------------------------------------------------- inputs

def make_inputs(hidden: int, vocab: int, tokens: int, dtype, device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq = min(512, tokens)
    batch = max(1, tokens // seq)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    inp = dict(
        hidden=rnd(batch, seq, hidden, scale=2.0 / math.sqrt(hidden)).requires_grad_(),
        weight=rnd(vocab, hidden).requires_grad_(),
        targets=torch.randint(0, vocab, (batch, seq), generator=g).to(device),
        mask=torch.ones(batch, seq, device=device),
        advantages=torch.randn(batch, generator=g).to(device),
        old=(-math.log(vocab) + 0.3 * torch.randn(batch, seq, generator=g)).to(device),
        ref=(-math.log(vocab) + 0.3 * torch.randn(batch, seq, generator=g)).to(device),
    )
    return inp


# ----------------------------------------------------------------------------- implementations

def _grads(loss, inp):
    torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))


def run_fused(inp):
    loss, _ = fused_linear_grpo_loss(inp["hidden"], inp["weight"], inp["targets"], inp["mask"],
                                     inp["advantages"], old_logprobs=inp["old"],
                                     ref_logprobs=inp["ref"], beta=0.04, loss_type="grpo")
    _grads(loss, inp)


def run_reference(inp):
    loss, _ = reference_grpo_loss(inp["hidden"], inp["weight"], inp["targets"], inp["mask"],
                                  inp["advantages"], old_logprobs=inp["old"],
                                  ref_logprobs=inp["ref"], beta=0.04, loss_type="grpo",
                                  dtype=torch.float32)
    _grads(loss, inp)


def make_liger_chunked(device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo", use_ref_model=True,
                                   compiled=device.type == "cuda")

    def run(inp):
        out = mod(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"],
                  ref_per_token_logps=inp["ref"], old_per_token_logps=inp["old"])
        _grads(out[0], inp)
    return run


def make_liger_triton(device):
    if device.type != "cuda":
        raise RuntimeError("liger's Triton GRPO loss needs CUDA")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def run(inp):
        h, w = inp["hidden"], inp["weight"]
        # its kernel takes logits for L+1 positions (the last is ignored)
        h_ext = torch.cat([h, h[:, -1:]], dim=1)
        logits = h_ext @ w.T
        loss, _ = triton_grpo_loss(logits, inp["old"], inp["ref"], inp["targets"],
                                   inp["advantages"], completion_mask=inp["mask"],
                                   temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.2,
                                   loss_type="grpo", reduce=True)
        _grads(loss, inp)
    return run


def make_floor(inp):
    h = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])
    w = inp["weight"].detach()
    dlogits = torch.randn(h.shape[0], w.shape[0], device=h.device).to(h.dtype)

    def run(_inp):
        _logits = h @ w.T
        _dh = dlogits @ w
        _dw = dlogits.T @ h
    return run, dlogits


# ----------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, inp, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn(inp)
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inp)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(inp)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_peak_bytes(fn, inp) -> int:
    """Peak live bytes of the c10 CPU allocator during fn(inp), above the bytes live
    before it: alloc/free events from torch.profiler, summed in time order."""
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(inp)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn, inp, device) -> int:
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(inp)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn, inp, device) -> int:
    return cuda_peak_bytes(fn, inp, device) if device.type == "cuda" else cpu_peak_bytes(fn, inp)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "liger-kernel", "transformers", "r1vl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- main

def bench_shape(hidden, vocab, tokens, dtype, device, impls, warmup, reps, vers, dev_name):
    rows = []
    inp = make_inputs(hidden, vocab, tokens, dtype, device)
    for impl in impls:
        row = dict(impl=impl, device=dev_name, hidden=hidden, vocab=vocab, tokens=tokens,
                   dtype=str(dtype).replace("torch.", ""), ms_median=None, peak_mem_bytes=None,
                   versions=vers)
        extra = None
        try:
            if impl == "fused":
                fn = run_fused
            elif impl == "reference":
                fn = run_reference
            elif impl == "liger_chunked":
                fn = make_liger_chunked(device)
            elif impl == "liger_triton":
                fn = make_liger_triton(device)
            else:
                fn, extra = make_floor(inp)
            row["ms_median"] = round(time_ms(fn, inp, device, warmup, reps), 3)
            row["peak_mem_bytes"] = int(peak_bytes(fn, inp, device))
        except (ImportError, RuntimeError, torch.OutOfMemoryError) as exc:  # peer missing / OOM
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            del extra
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        status = f"{row['ms_median']:.1f} ms" if row["ms_median"] is not None else row["error"]
        print(f"  {impl:14s} {status}", file=sys.stderr, flush=True)
    return rows


def print_table(rows):
    shapes = sorted({(r["hidden"], r["vocab"], r["tokens"], r["dtype"]) for r in rows})
    hdr = (f"{'H':>5} {'V':>7} {'N':>6} {'dtype':>8} {'impl':>14} {'ms':>10} {'peak MiB':>10} "
           f"{'x floor':>8} {'fused speed-up':>15}")
    print(hdr)
    print("-" * len(hdr))
    for shp in shapes:
        group = {r["impl"]: r for r in rows if (r["hidden"], r["vocab"], r["tokens"], r["dtype"]) == shp}
        floor = group.get("floor", {}).get("ms_median")
        fused = group.get("fused", {}).get("ms_median")
        for impl in IMPLS:
            r = group.get(impl)
            if r is None:
                continue
            ms = r["ms_median"]
            if ms is None:
                print(f"{shp[0]:>5} {shp[1]:>7} {shp[2]:>6} {shp[3]:>8} {impl:>14} "
                      f"{'n/a':>10}  ({r.get('error', '')[:60]})")
                continue
            mib = r["peak_mem_bytes"] / 2**20
            xf = f"{ms / floor:.2f}" if floor else "-"
            su = f"{ms / fused:.2f}x" if fused and impl not in ("fused", "floor") else "-"
            print(f"{shp[0]:>5} {shp[1]:>7} {shp[2]:>6} {shp[3]:>8} {impl:>14} {ms:>10.2f} "
                  f"{mib:>10.1f} {xf:>8} {su:>15}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (fp32 unless --dtype)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", default=None,
                    help="comma-separated HxVxN triples, e.g. 1536x151936x4096")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/loss_<device>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if args.small or device.type == "cpu" else "bfloat16"))
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = SMALL_SHAPES if args.small else DEFAULT_SHAPES
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad}; choose from {IMPLS}")
    reps = args.reps or (3 if device.type == "cpu" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
    vers = versions()
    dev_name = device_name(device)
    rows = []
    for hidden, vocab, tokens in shapes:
        print(f"H={hidden} V={vocab} N={tokens} {dtype} on {dev_name}", file=sys.stderr, flush=True)
        rows += bench_shape(hidden, vocab, tokens, dtype, device, impls, warmup, reps, vers, dev_name)
    print_table(rows)
    out = Path(args.out) if args.out else RESULTS / f"loss_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = dict(loss_type="grpo", importance_sampling_level="token", beta=0.04,
                  old_and_ref_logprobs=True, mask="all ones", reps=reps, warmup=warmup,
                  reference_dtype="float32", peak_mem="allocator bytes above the live inputs",
                  argv=sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps({"rows": rows, "config": config}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
