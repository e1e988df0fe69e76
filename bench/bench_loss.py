"""Benchmark: the fused linear GRPO loss against its peers and the GEMM floor.

For each shape (hidden size H, vocabulary V, tokens N) one forward+backward of the
GRPO loss from the LM head (grpo, token level, β=0.04, old + ref log-probs given,
every token unmasked), timed and memory-measured for:

  fused_<backend>   r1vl.kernels.fused_linear_grpo_loss(..., backend=<backend>), one row per
                    backend named in --backends (default: auto,triton,torch on CUDA; torch on CPU)
  logprobs_<backend> forward-only r1vl.kernels.linear_logprobs under torch.no_grad (the
                    old/ref log-prob case), compared with floor_fwd
  reference         r1vl.kernels.reference_grpo_loss in fp32: materialised logits, eager
  liger_chunked     liger-kernel's LigerFusedLinearGRPOLoss (torch.compile'd on CUDA)
  liger_triton      liger-kernel's Triton GRPO loss on materialised logits (CUDA only)
  trl_chunked       TRL's chunked log-prob head (trl.kernels.ChunkedLogProbFunction, what its
                    GRPOTrainer installs: Triton on CUDA, torch tiles elsewhere; its chunk
                    width; log-probs only) + r1vl's GRPO objective on them (N-sized work)
  floor             the three bare LM-head GEMMs of forward+backward: h·Wᵀ, dlogits·W,
                    dlogitsᵀ·h in the input dtype (dlogits prepared outside the timed region;
                    taken in row chunks when [N, V] buffers would exceed --floor-chunk-gib)
  floor_fwd         the one GEMM h·Wᵀ of the forward
  fused_torch2p     fused_torch with R1VL_KERNEL_ONEPASS=0: the two-pass torch path (log-probs,
                    then the objective, logits recomputed in backward: four GEMMs)
  fused_torch_c<MB> fused_torch with R1VL_ONEPASS_CHUNK_MB=<MB>: the one-pass path at another
                    [rows, V] fp32 chunk size (CUDA only; one row per --onepass-chunk-mb value
                    other than the default CHUNK_BYTES_CUDA). These variant rows run at the
                    shape where the targets are judged only, unless --torch-variants-at all.

The reference is there for its peak memory (the ≤ 1/8 target): it runs once, untimed
(ms_median null, "timed": false), unless --time-reference. backend "auto" resolves to
another backend (kernels/api.py AUTO_CUDA on CUDA, torch on CPU): when that backend's row
is in the run, the auto row is not run again but recorded with "alias_of" naming it
(config.aliases too). Within a shape the rows run in this order: the floors, auto's own
choices (fused_torch, logprobs_triton on CUDA), the reference, liger_chunked, the other
logprobs rows, the fused_torch variants, the other fused rows, trl_chunked, liger_triton;
and the shape where the targets are judged runs first.

Inputs are random (never zeros) and the timed calls rotate among --input-sets sets of
them, so that no cache holds a previous call's operands. CUDA: median of
triton.testing.do_bench (event-timed, L2 flushed between calls); CPU: median of --reps
wall-clock repeats. Peak memory is the peak of live allocator bytes during one call,
above what was live before it (the inputs): on CUDA torch.cuda.max_memory_allocated; on
CPU the c10 allocator's alloc/free events recorded by torch.profiler(profile_memory=True),
summed in time order (bench_cpu_memory.py cross-checks that with process RSS).

Prints one progress line per row on stderr as it finishes, then a table (median ms, peak
memory, TFLOP/s, ratio to the floor, speed-up over liger's chunked loss and over TRL's
head) and the issue's targets as PASS/FAIL, and writes, after every row (a temporary file
renamed over the old one, so a run cut short keeps every finished row and the targets
judged on them), bench/results/loss_<device>.json (--out elsewhere):
  {"rows": [{"impl", "device", "hidden", "vocab", "tokens", "dtype", "ms_median",
             "peak_mem_bytes", "versions", ...}], "config": {...}, "targets": [...]}
config records the TF32 switches (torch.backends.cuda.matmul / cudnn): liger's chunked
loss runs some of its GEMMs in fp32, so its time, and the ≥ 3× target, depend on them.
<device> is "cpu", or the GPU's model ("h100", "h200") on CUDA.

    python bench/bench_loss.py                      # Qwen2-VL-2B/7B heads x 4096/16384 tokens, bf16, CUDA
    python bench/bench_loss.py --heads 7b --tokens 16384 --backends triton
    python bench/bench_loss.py --long               # + 131072 tokens at the 2B head (fused + floor)
    python bench/bench_loss.py --small              # CPU-sized shapes, fp32
    python bench/bench_loss.py --heads 7b --tokens 16384 --onepass-chunk-mb 256,512,1024
    python bench/plot_loss.py bench/results/loss_h100.json   # PNG of time and memory vs tokens
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata as md
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from r1vl.kernels import (fused_linear_grpo_loss, linear_logprobs, reference_grpo_loss)
from r1vl.kernels import onepass
from r1vl.kernels.api import _resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = {"2b": (1536, 151936), "7b": (3584, 152064)}       # Qwen2-VL-2B / -7B LM heads
DEFAULT_TOKENS = (4096, 16384)
LONG_SHAPE = (1536, 151936, 131072)                          # --long: fused + floor only
SMALL_SHAPES = [(256, 8192, 512), (512, 32000, 1024)]
KERNEL_BACKENDS = ("auto", "triton", "torch")                # r1vl.kernels.api.BACKENDS
PEERS = ("reference", "liger_chunked", "liger_triton", "trl_chunked", "floor", "floor_fwd")
LONG_IMPLS = ("fused", "floor")
DEFAULT_CHUNK_MB = onepass.CHUNK_BYTES_CUDA >> 20           # fused_torch's own chunk size on CUDA
TWO_PASS = "fused_torch2p"                                   # fused_torch, R1VL_KERNEL_ONEPASS=0
CHUNK_ROW = re.compile(r"^fused_torch_c([1-9][0-9]*)$")      # fused_torch, R1VL_ONEPASS_CHUNK_MB=<MB>
REFERENCE_NOTE = ("peak memory only: one untimed call (the targets use its peak; --time-reference "
                  "times it)")
# issue 6's targets, judged at the 7B head, 16384 tokens, bf16
TARGET_SHAPE = (3584, 152064, 16384)
TARGET_DTYPE = "bfloat16"


# ----------------------------------------------------------------------------- inputs

def make_inputs(hidden: int, vocab: int, tokens: int, dtype, device, seed: int = 0) -> dict:
    """Random inputs of the benchmark's shape: hidden [B, ≤512, H] with logits of order
    one, weight [V, H], random targets, every token unmasked, old/ref log-probs near a
    uniform policy's (so the clipped and KL terms are live)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)     # drawn on the device: fast at 7B sizes
    seq = min(512, tokens)
    batch = max(1, tokens // seq)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return dict(
        hidden=rnd(batch, seq, hidden, scale=2.0 / math.sqrt(hidden)).requires_grad_(),
        weight=rnd(vocab, hidden).requires_grad_(),
        targets=torch.randint(0, vocab, (batch, seq), generator=g, device=device),
        mask=torch.ones(batch, seq, device=device),
        advantages=torch.randn(batch, generator=g, device=device),
        old=-math.log(vocab) + 0.3 * torch.randn(batch, seq, generator=g, device=device),
        ref=-math.log(vocab) + 0.3 * torch.randn(batch, seq, generator=g, device=device),
    )


# ----------------------------------------------------------------------------- implementations
# Each factory returns fn(inp) -> loss tensor (or None) doing one call on one input set.

def _grads(loss, inp):
    torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))
    return loss


@contextlib.contextmanager
def _environ(env: dict):
    """os.environ updated by `env` inside the block, restored after (kernels/api.py and
    kernels/onepass.py read their switches at each call)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fused_env(impl: str) -> dict:
    """The environment a fused_torch variant row runs under ({} for the others)."""
    if impl == TWO_PASS:
        return {"R1VL_KERNEL_ONEPASS": "0"}
    m = CHUNK_ROW.match(impl)
    return {onepass.CHUNK_MB_ENV: m.group(1)} if m else {}


def make_fused(backend, env=None):
    def run(inp):
        with _environ(env or {}):
            loss, _ = fused_linear_grpo_loss(inp["hidden"], inp["weight"], inp["targets"], inp["mask"],
                                             inp["advantages"], old_logprobs=inp["old"],
                                             ref_logprobs=inp["ref"], beta=0.04, loss_type="grpo",
                                             backend=backend)
            return _grads(loss, inp)
    return run


def make_logprobs(backend):
    def run(inp):
        with torch.no_grad():
            logp = linear_logprobs(inp["hidden"], inp["weight"], inp["targets"], backend=backend)
        return logp.sum()
    return run


def run_reference(inp):
    loss, _ = reference_grpo_loss(inp["hidden"], inp["weight"], inp["targets"], inp["mask"],
                                  inp["advantages"], old_logprobs=inp["old"],
                                  ref_logprobs=inp["ref"], beta=0.04, loss_type="grpo",
                                  dtype=torch.float32)
    return _grads(loss, inp)


def make_liger_chunked(device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo", use_ref_model=True,
                                   compiled=device.type == "cuda")

    def run(inp):
        out = mod(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"],
                  ref_per_token_logps=inp["ref"], old_per_token_logps=inp["old"])
        return _grads(out[0], inp)
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
        return _grads(loss, inp)
    return run


def _row_chunks(n: int, vocab: int, elem: int, max_bytes: int) -> list[tuple[int, int]]:
    """Equal row chunks whose [rows, V] buffer stays under max_bytes."""
    k = max(1, math.ceil(n * vocab * elem / max_bytes))
    rows = math.ceil(n / k)
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


class Floor:
    """The bare LM-head GEMMs in the input dtype, on per-input-set buffers made outside
    the timed region: h·Wᵀ (forward), and with `backward` dlogits·W and dlogitsᵀ·h too.
    Output buffers are allocated inside the call (so the peak counts them), [rows, V]
    ones per row chunk; dlogits is one random [rows, V] chunk reused for every chunk."""

    def __init__(self, backward: bool, max_bytes: int):
        self.backward = backward
        self.max_bytes = max_bytes
        self.dlogits = {}

    def prepare(self, inp):
        if not self.backward:
            return
        h, w = inp["hidden"], inp["weight"]
        n, v = h.numel() // h.shape[-1], w.shape[0]
        chunks = _row_chunks(n, v, h.element_size(), self.max_bytes)
        rows = chunks[0][1]
        g = torch.Generator(device=h.device).manual_seed(123)
        dl = torch.empty(rows, v, dtype=h.dtype, device=h.device)
        for s in range(0, rows, 1024):                      # random, in bounded fp32 pieces
            e = min(rows, s + 1024)
            dl[s:e] = torch.randn(e - s, v, generator=g, device=h.device) / v
        self.dlogits[id(inp)] = dl

    def __call__(self, inp):
        h = inp["hidden"].detach()
        h = h.reshape(-1, h.shape[-1])
        w = inp["weight"].detach()
        n, v = h.shape[0], w.shape[0]
        chunks = _row_chunks(n, v, h.element_size(), self.max_bytes)
        logits = torch.empty(chunks[0][1], v, dtype=h.dtype, device=h.device)
        if not self.backward:
            for s, e in chunks:
                torch.mm(h[s:e], w.T, out=logits[: e - s])
            return None
        dl = self.dlogits[id(inp)]
        dh = torch.empty_like(h)
        dw = torch.empty_like(w)
        for i, (s, e) in enumerate(chunks):
            torch.mm(h[s:e], w.T, out=logits[: e - s])
            torch.mm(dl[: e - s], w, out=dh[s:e])
            if i == 0:
                torch.mm(dl[: e - s].T, h[s:e], out=dw)
            else:
                dw.addmm_(dl[: e - s].T, h[s:e])
        return None


# ----------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, sets, device, warmup: int, reps: int, max_ms: float = 4000.0) -> float:
    """Median milliseconds of fn over calls that rotate among the input sets. On CUDA
    do_bench gets about `reps` calls' worth of time, at most max_ms (slow peers)."""
    state = {"i": 0}

    def call():
        inp = sets[state["i"] % len(sets)]
        state["i"] += 1
        fn(inp)

    for _ in range(max(1, warmup)):          # compile / autotune / handle creation
        call()
    _sync(device)
    if device.type == "cuda":
        import triton.testing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end), 1e-3)
        # do_bench runs about rep / est timed calls after about warmup / est warm ones
        return float(triton.testing.do_bench(call, warmup=max(10.0, est),
                                             rep=min(max(50.0, reps * est), max_ms),
                                             return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
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


def peak_and_output(fn, inp, device):
    """(peak bytes, fn's result) of one call: the untimed reference's single call."""
    box = []
    peak = peak_bytes(lambda x: box.append(fn(x)), inp, device)
    return peak, box[0]


def tf32_settings() -> dict:
    """The switches that let fp32 matmuls and convolutions run as TF32 on CUDA."""
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return {"cuda.matmul.allow_tf32": bool(mm.allow_tf32), "cudnn.allow_tf32": bool(cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.fp32_precision": getattr(mm, "fp32_precision", None),
            "cudnn.fp32_precision": getattr(cudnn, "fp32_precision", None)}


def autotune_choices() -> dict:
    """The Triton forward's autotuned config per key (V, D, v_per_split, UPCAST, IEEE, and the
    argument dtypes Triton appends), as tuned so far in this process: which tile and loop shape
    (FLAT) won on this device. Empty when the Triton forward did not run compiled."""
    tg = sys.modules.get("r1vl.kernels.triton_grpo")
    if tg is None or not getattr(tg, "_FWD_TUNED", None):
        return {}
    return {str(k): str(v) for k, v in getattr(tg._FWD_TUNED[0], "cache", {}).items()}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "liger-kernel", "transformers", "trl", "r1vl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["r1vl_commit"] = _cli.r1vl_commit()
    return out


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device) -> str:
    """'cpu', or the GPU model in lower case ('NVIDIA H100 80GB HBM3' -> 'h100')."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return m.group(1) if m else (re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "cuda")


def make_trl_chunked(device):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise _Unavailable(f"TRL's chunked log-prob head is not importable ({e}): pip install trl>=1.16") from e
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    from r1vl.kernels.objective import grpo_objective

    def run(inp):
        h, t = inp["hidden"], inp["targets"]
        logp = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), inp["weight"], None, t.reshape(-1), 1.0,
                                            chunk, None, 1.0, ())[0].view(t.shape)
        loss, _ = grpo_objective(logp.float(), inp["mask"], inp["advantages"], old_logprobs=inp["old"],
                                 ref_logprobs=inp["ref"], rollout_is_ratio=None, beta=0.04, epsilon_low=0.2,
                                 epsilon_high=0.2, loss_type="grpo", importance_sampling_level="token",
                                 max_completion_length=None, num_items_in_batch=None)
        return _grads(loss, inp)
    return run


def gemm_flops(impl: str, hidden: int, vocab: int, tokens: int) -> float:
    """FLOPs of the LM-head GEMMs the impl must do at least: one for forward-only
    (logprobs_*, floor_fwd), three for forward+backward."""
    one = 2.0 * tokens * vocab * hidden
    return one if impl.startswith(("logprobs_", "floor_fwd")) else 3.0 * one


# ----------------------------------------------------------------------------- main

def build(impl, device, floor_chunk_bytes):
    """(fn, prepare-or-None) of an impl name."""
    if impl == TWO_PASS or CHUNK_ROW.match(impl):
        return make_fused("torch", fused_env(impl)), None
    if impl.startswith("fused_"):
        return make_fused(impl[len("fused_"):]), None
    if impl.startswith("logprobs_"):
        return make_logprobs(impl[len("logprobs_"):]), None
    if impl == "reference":
        return run_reference, None
    if impl == "liger_chunked":
        return make_liger_chunked(device), None
    if impl == "liger_triton":
        return make_liger_triton(device), None
    if impl == "trl_chunked":
        return make_trl_chunked(device), None
    if impl in ("floor", "floor_fwd"):
        f = Floor(backward=impl == "floor", max_bytes=floor_chunk_bytes)
        return f, f.prepare
    raise ValueError(f"unknown impl {impl!r}")


class _Unavailable(Exception):
    """An impl that cannot run here (peer not installed, CUDA-only on CPU)."""


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_aliases(impls, device, dtype) -> dict:
    """{auto row: the row it would repeat}: fused_auto / logprobs_auto whose backend "auto"
    resolves to (kernels/api.py: AUTO_CUDA on CUDA, torch on CPU) is also among `impls`."""
    out = {}
    for kind, op in (("fused", "loss_token"), ("logprobs", "logprobs")):
        auto = f"{kind}_auto"
        if auto in impls:
            same = f"{kind}_{_resolve_backend('auto', device, dtype, op)}"
            if same != auto and same in impls:
                out[auto] = same
    return out


def order_impls(impls, device, dtype) -> list:
    """The rows of one shape in the order they run: what the targets need first (floors,
    auto's own choices, the reference's peak, liger's chunked loss), the slow or optional
    rows last. Stable for rows of one rank (the --impls / --backends order)."""
    first = {f"fused_{_resolve_backend('auto', device, dtype, 'loss_token')}", "fused_auto",
             f"logprobs_{_resolve_backend('auto', device, dtype, 'logprobs')}", "logprobs_auto"}

    def rank(impl):
        if impl in ("floor", "floor_fwd"):
            return (0, impl != "floor")
        if impl in first:
            return (1, not impl.startswith("fused_"))
        if impl == "reference":
            return (2, 0)
        if impl == "liger_chunked":
            return (3, 0)
        if impl.startswith("logprobs_"):
            return (4, 0)
        if impl == TWO_PASS or CHUNK_ROW.match(impl):
            return (5, 0)
        if impl.startswith("fused_"):
            return (6, 0)
        return (7, ("trl_chunked", "liger_triton").index(impl) if impl in ("trl_chunked", "liger_triton") else 2)
    return sorted(impls, key=rank)


def bench_shape(hidden, vocab, tokens, dtype, device, impls, args, vers, dev_name, on_row=None):
    """Rows of one shape, in `impls` order; on_row(row) after each (bench_loss.main writes
    the JSON there, so a run cut off keeps what it measured)."""
    rows = []
    aliases = auto_aliases(impls, device, dtype)

    def emit(row, status):
        rows.append(row)
        if on_row is not None:
            on_row(row)
        print(f"  {row['impl']:16s} {status}", file=sys.stderr, flush=True)

    sets = [make_inputs(hidden, vocab, tokens, dtype, device, seed=s) for s in range(args.input_sets)]
    for impl in impls:
        if impl in aliases:
            continue
        row = dict(impl=impl, device=dev_name, hidden=hidden, vocab=vocab, tokens=tokens,
                   dtype=str(dtype).replace("torch.", ""), ms_median=None, peak_mem_bytes=None,
                   versions=vers, input_sets=len(sets))
        env = fused_env(impl)
        if env:
            row["env"] = env
            if onepass.CHUNK_MB_ENV in env and device.type != "cuda":
                row["note"] = (f"{onepass.CHUNK_MB_ENV} sets the CUDA chunk only: on {device.type} this row "
                               "runs fused_torch's chunks")
        timed = impl != "reference" or args.time_reference
        fn = prepare = out = None
        try:
            try:
                fn, prepare = build(impl, device, int(args.floor_chunk_gib * 2**30))
            except (ImportError, RuntimeError) as exc:   # a peer missing or not for this device
                raise _Unavailable(f"{type(exc).__name__}: {exc}") from exc
            if prepare is not None:
                for inp in sets:
                    prepare(inp)
            if timed:
                ms = time_ms(fn, sets, device, args.warmup, args.reps, args.max_ms)
                row["ms_median"] = round(ms, 4)
                row["tflops"] = round(gemm_flops(impl, hidden, vocab, tokens) / (ms * 1e-3) / 1e12, 3)
                row["peak_mem_bytes"] = int(peak_bytes(fn, sets[0], device))
                out = fn(sets[1 % len(sets)])
            else:                                       # one call: its peak, and the loss value
                row["timed"] = False
                row["note"] = REFERENCE_NOTE
                peak, out = peak_and_output(fn, sets[1 % len(sets)], device)
                row["peak_mem_bytes"] = int(peak)
            if out is not None:
                row["loss_value"] = float(out.detach().float())
        except Exception as exc:  # noqa: BLE001 - a peer missing, OOM, a kernel failing: record, go on
            name = "unavailable" if isinstance(exc, _Unavailable) else type(exc).__name__
            row["error"] = f"{name}: {(str(exc).splitlines() or [''])[0][:300]}"
            if not isinstance(exc, (_Unavailable, torch.OutOfMemoryError)):
                traceback.print_exc(limit=4, file=sys.stderr)
        finally:
            fn = prepare = out = None
            for inp in sets:
                for t in (inp["hidden"], inp["weight"]):
                    t.grad = None
            _free(device)
        if row.get("error"):
            status = row["error"]
        elif row["ms_median"] is None:
            status = f"untimed, {row['peak_mem_bytes'] / 2**20:.1f} MiB"
        else:
            status = f"{row['ms_median']:.3f} ms, {row['peak_mem_bytes'] / 2**20:.1f} MiB"
        emit(row, status)
        for auto, same in aliases.items():
            if same == impl:
                emit(dict(impl=auto, device=dev_name, hidden=hidden, vocab=vocab, tokens=tokens,
                          dtype=row["dtype"], ms_median=None, peak_mem_bytes=None, versions=vers,
                          alias_of=same, note=f"not run: backend 'auto' runs {same}'s code here "
                                              "(kernels/api.py AUTO_CUDA); see that row"),
                     f"= {same} (not run again)")
    del sets
    _free(device)
    return rows


def _key(r):
    return (r["hidden"], r["vocab"], r["tokens"], r["dtype"])


def _by_impl(rows, shape):
    return {r["impl"]: r for r in rows if _key(r) == shape}


def print_table(rows):
    shapes = sorted({_key(r) for r in rows})
    hdr = (f"{'H':>5} {'V':>7} {'N':>7} {'dtype':>8} {'impl':>16} {'ms':>10} {'peak MiB':>10} "
           f"{'TFLOP/s':>8} {'x floor':>8} {'vs liger':>9} {'vs trl':>7}")
    print(hdr)
    print("-" * len(hdr))
    for shp in shapes:
        group = _by_impl(rows, shp)

        def ms_of(name):
            return group.get(name, {}).get("ms_median")

        liger, trl = ms_of("liger_chunked"), ms_of("trl_chunked")
        for impl, r in group.items():
            ms = r["ms_median"]
            lead = f"{shp[0]:>5} {shp[1]:>7} {shp[2]:>7} {shp[3]:>8} {impl:>16}"
            if r.get("alias_of"):
                print(f"{lead} {'= ' + r['alias_of']:>21}  (the same code: not run again)")
                continue
            if ms is None and r.get("peak_mem_bytes") is not None and not r.get("error"):
                print(f"{lead} {'untimed':>10} {r['peak_mem_bytes'] / 2**20:>10.1f}  (peak only)")
                continue
            if ms is None:
                print(f"{lead} {'n/a':>10}  ({r.get('error', '')[:70]})")
                continue
            floor = ms_of("floor_fwd") if impl.startswith(("logprobs_", "floor_fwd")) else ms_of("floor")
            xf = f"{ms / floor:.2f}" if floor else "-"
            vs = f"{liger / ms:.2f}x" if liger and impl.startswith("fused_") else "-"
            vt = f"{trl / ms:.2f}x" if trl and impl.startswith("fused_") else "-"
            print(f"{lead} {ms:>10.3f} {r['peak_mem_bytes'] / 2**20:>10.1f} {r.get('tflops', 0):>8.3g} "
                  f"{xf:>8} {vs:>9} {vt:>7}")


def check_targets(rows, shape, dtype_name, note=""):
    """The issue's targets at `shape` (H, V, N) and dtype, per fused_/logprobs_ row (the
    fused_torch variants too; not the auto rows recorded as another row's alias): list of dicts."""
    group = {k: r for k, r in _by_impl(rows, (*shape, dtype_name)).items() if not r.get("alias_of")}
    out = []

    def ms(name):
        return group.get(name, {}).get("ms_median")

    def peak(name):
        return group.get(name, {}).get("peak_mem_bytes")

    def add(name, impl, value, op, limit, why_missing):
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append(dict(target=name, impl=impl, value=None if value is None else round(value, 4),
                        op=op, limit=limit, passed=ok, missing=why_missing if value is None else None,
                        shape=list(shape), dtype=dtype_name, note=note or None))

    backends = sorted({r["impl"].split("_", 1)[1] for r in group.values()
                       if r["impl"].startswith(("fused_", "logprobs_"))})
    for be in backends:
        f, lp = f"fused_{be}", f"logprobs_{be}"
        if ms(f) is not None or f in group:
            add("fwd+bwd time / floor (3 GEMMs)", f,
                ms(f) / ms("floor") if ms(f) and ms("floor") else None, "<=", 1.5,
                "fused or floor not measured")
            add("liger_chunked time / fused time", f,
                ms("liger_chunked") / ms(f) if ms(f) and ms("liger_chunked") else None, ">=", 3.0,
                "fused or liger_chunked not measured")
            add("peak memory / reference's", f,
                peak(f) / peak("reference") if peak(f) is not None and peak("reference") else None,
                "<=", 1 / 8, "fused or reference not measured")
        if ms(lp) is not None or lp in group:
            add("logprobs time / one GEMM", lp,
                ms(lp) / ms("floor_fwd") if ms(lp) and ms("floor_fwd") else None, "<=", 1.2,
                "logprobs or floor_fwd not measured")
    return out


def print_targets(targets, shape, dtype_name, note=""):
    print(f"\ntargets at H={shape[0]} V={shape[1]} N={shape[2]} {dtype_name}{note}:")
    if not targets:
        print("  n/a: no fused_/logprobs_ row at this shape and dtype (--targets-at HxVxN judges a measured one)")
    for t in targets:
        verdict = "n/a " if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        val = f"{t['value']:.3f}" if t["value"] is not None else f"({t['missing']})"
        print(f"  {verdict}  {t['impl']:<16} {t['target']:<34} {val:>8}  (target {t['op']} {t['limit']:.3g})")


def _triple(text: str, what: str) -> tuple[int, int, int]:
    """'HxVxN' -> (H, V, N): three integers >= 1, N at most 512 or a multiple of 512 (the
    inputs are [N / 512, 512] rows; any other N would time fewer tokens than it records)."""
    parts = text.strip().lower().split("x")
    try:
        vals = tuple(int(x) for x in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"{what} {text!r}: expected HxVxN, three integers >= 1 (e.g. 1536x151936x4096)")
    if vals[2] > 512 and vals[2] % 512:
        raise ValueError(f"{what} {text!r}: N = {vals[2]} tokens must be at most 512 or a multiple of 512 "
                         "(the inputs are rows of 512 tokens)")
    return vals


def parse_shapes(args) -> list[tuple[int, int, int]]:
    """The (H, V, N) shapes of --shapes, or --heads x --tokens; ValueError naming the flag."""
    if args.shapes:
        shapes = [_triple(s, "--shapes") for s in args.shapes.split(",") if s.strip()]
        if not shapes:
            raise ValueError(f"--shapes {args.shapes!r}: no shape given")
        return shapes
    if args.small and not (args.heads or args.tokens):
        return list(SMALL_SHAPES)
    heads = []
    for h in (args.heads or "2b,7b").split(","):
        h = h.strip().lower()
        if not h:
            continue
        if h in HEADS:
            heads.append(HEADS[h])
            continue
        try:
            hv = tuple(int(x) for x in h.split("x"))
        except ValueError:
            hv = ()
        if len(hv) != 2 or min(hv) < 1:
            raise ValueError(f"--heads {args.heads!r}: {h!r} is neither {' nor '.join(HEADS)} nor HxV "
                             "(two integers >= 1, e.g. 1536x151936)")
        heads.append(hv)
    tokens = list(DEFAULT_TOKENS)
    if args.tokens:
        try:
            tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            tokens = [0]
        if not tokens or min(tokens) < 1:
            raise ValueError(f"--tokens {args.tokens!r}: expected integers >= 1 separated by ','")
        for n in tokens:
            if n > 512 and n % 512:
                raise ValueError(f"--tokens {args.tokens!r}: N = {n} tokens must be at most 512 or a multiple "
                                 "of 512 (the inputs are rows of 512 tokens)")
    if not heads or not tokens:
        raise ValueError("--heads/--tokens: no shape given")
    return [(hd, v, n) for hd, v in heads for n in tokens]


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="A bad argument is one error line and exit code 2, before anything runs.")
    ap.add_argument("--small", action="store_true",
                    help=f"CPU-sized shapes HxVxN {', '.join('x'.join(map(str, s)) for s in SMALL_SHAPES)}, "
                         "fp32 unless --dtype (default: off)")
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="input dtype (default: bfloat16 on CUDA, float32 on CPU or with --small)")
    ap.add_argument("--heads", default=None,
                    help="comma-separated LM heads: 2b (1536x151936), 7b (3584x152064) or HxV "
                         "(default: 2b,7b)")
    ap.add_argument("--tokens", default=None,
                    help=f"comma-separated token counts N, each at most 512 or a multiple of 512 "
                         f"(default: {','.join(map(str, DEFAULT_TOKENS))})")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated HxVxN triples, e.g. 1536x151936x4096; overrides --heads/--tokens "
                         "(default: none)")
    ap.add_argument("--long", action="store_true",
                    help=f"also {LONG_SHAPE[2]} tokens at the 2B head: fused backends and floor only "
                         "(default: off)")
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated fused backends among {', '.join(KERNEL_BACKENDS)}, one fused_<b> "
                         "and logprobs_<b> row each; triton on CPU needs TRITON_INTERPRET=1 "
                         "(default: auto,triton,torch on CUDA, torch on CPU)")
    ap.add_argument("--impls", default=None,
                    help="comma-separated subset of rows: fused, logprobs (all backends), "
                         f"fused_<b>, logprobs_<b>, {', '.join(PEERS)}, {TWO_PASS}, fused_torch_c<MB> "
                         "(default: all, the fused_torch variants per --onepass-chunk-mb)")
    ap.add_argument("--input-sets", type=_cli.positive_int, default=2,
                    help="input sets the timed calls rotate among (default: %(default)s)")
    ap.add_argument("--reps", type=_cli.positive_int, default=None,
                    help="CPU: timed wall-clock repeats, median taken; CUDA: about that many calls' worth of "
                         "do_bench time (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=_cli.nonneg_int, default=None,
                    help="untimed calls first (compilation, autotuning); at least one runs even with 0 "
                         "(default: 1 on CPU, 2 on CUDA)")
    ap.add_argument("--max-ms", type=_cli.positive_float, default=4000.0,
                    help="CUDA: most do_bench time per impl and shape, in ms (caps slow peers' repeats) "
                         "(default: %(default)s)")
    ap.add_argument("--onepass-chunk-mb", default=f"{DEFAULT_CHUNK_MB},1024",
                    help="comma-separated [rows, V] fp32 chunk sizes in MiB at which fused_torch is timed: "
                         f"{DEFAULT_CHUNK_MB} (CHUNK_BYTES_CUDA) is the fused_torch row itself, each other "
                         "value a fused_torch_c<MB> row run with R1VL_ONEPASS_CHUNK_MB=<MB> (CUDA only) "
                         "(default: %(default)s)")
    ap.add_argument("--torch-variants-at", choices=("target", "all"), default="target",
                    help=f"where the fused_torch variant rows ({TWO_PASS}: the two-pass path, "
                         "R1VL_KERNEL_ONEPASS=0; fused_torch_c<MB>) run: target = only at the shape where "
                         "the targets are judged, all = at every shape (default: %(default)s)")
    ap.add_argument("--time-reference", action="store_true",
                    help="time the fp32 reference too (by default it runs once, untimed: the targets use "
                         "only its peak memory) (default: off)")
    ap.add_argument("--floor-chunk-gib", type=_cli.positive_float, default=8.0,
                    help="largest [rows, V] buffer of the floor's GEMMs, in GiB (row chunks beyond) "
                         "(default: %(default)s)")
    ap.add_argument("--targets-at", default=None,
                    help="HxVxN where the targets are judged, in the run's dtype (default: the issue's "
                         f"{'x'.join(map(str, TARGET_SHAPE))} in {TARGET_DTYPE})")
    ap.add_argument("--out", default=None,
                    help="JSON path; missing folders are created (default: bench/results/loss_<device>.json)")
    ap.add_argument("--png", default=None,
                    help="also plot time and memory against tokens to this .png (default: no plot)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)

    device = _cli.device(ap, "--device", args.device)
    dtype = getattr(torch, args.dtype or ("float32" if args.small or device.type == "cpu" else "bfloat16"))
    dtype_name = str(dtype).replace("torch.", "")
    backends = [b.strip() for b in (args.backends or ("auto,triton,torch" if device.type == "cuda" else "torch")
                                    ).split(",") if b.strip()]
    for b in backends:
        if b not in KERNEL_BACKENDS:
            ap.error(f"--backends: unknown backend {b!r}; choose from {', '.join(KERNEL_BACKENDS)}")
    if not backends:
        ap.error("--backends: no backend given")
    if device.type != "cuda" and "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--backends triton on CPU runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
                 "(or use --backends torch)")
    chunk_mbs = list(dict.fromkeys(_cli.int_list(ap, "--onepass-chunk-mb", args.onepass_chunk_mb)))
    variants = ([TWO_PASS] + [f"fused_torch_c{mb}" for mb in chunk_mbs if mb != DEFAULT_CHUNK_MB]
                if "torch" in backends else [])
    all_impls = ([f"fused_{b}" for b in backends] + [f"logprobs_{b}" for b in backends] + list(PEERS)
                 + variants)
    if args.impls:
        impls = []
        for i in (x.strip() for x in args.impls.split(",") if x.strip()):
            if i in ("fused", "logprobs"):
                impls += [f"{i}_{b}" for b in backends]
            elif i in all_impls or i == TWO_PASS or CHUNK_ROW.match(i) or (
                    i.startswith(("fused_", "logprobs_")) and i.split("_", 1)[1] in KERNEL_BACKENDS):
                impls.append(i)
            else:
                ap.error(f"--impls: unknown {i!r}; choose from fused, logprobs, {', '.join(all_impls)}, "
                         "fused_torch_c<MB>")
        impls = list(dict.fromkeys(impls))
        if not impls:
            ap.error("--impls: no row given")
    else:
        impls = all_impls
    if (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and any(i in ("fused_triton", "logprobs_triton") for i in impls)):
        ap.error("--impls *_triton on CPU runs only under Triton's interpreter: set TRITON_INTERPRET=1")
    try:
        shapes = parse_shapes(args)
        tshape = _triple(args.targets_at, "--targets-at") if args.targets_at else None
    except ValueError as e:
        ap.error(str(e))
    if args.png:
        _cli.out_file(ap, "--png", args.png, suffix=".png")
    out = _cli.out_file(ap, "--out", args.out or RESULTS / f"loss_{device_slug(device)}.json")
    if tshape is not None:
        tdtype, tnote = dtype_name, " (--targets-at: not the issue's shape)"
    else:
        tshape, tdtype, tnote = TARGET_SHAPE, TARGET_DTYPE, ""
    at_target = tdtype == dtype_name                        # the targets are judged at (tshape, tdtype)
    shapes = list(dict.fromkeys(shapes))
    shapes.sort(key=lambda shp: not (at_target and shp == tshape))     # the judged shape first

    def is_variant(i):
        return i == TWO_PASS or bool(CHUNK_ROW.match(i))

    def for_shape(shp, names):
        if args.torch_variants_at == "target" and not (at_target and shp == tshape):
            names = [i for i in names if not is_variant(i)]
        return order_impls(names, device, dtype)

    plan = [(shp, for_shape(shp, impls)) for shp in shapes]
    if args.long:
        plan.append((LONG_SHAPE, for_shape(LONG_SHAPE, [i for i in impls if i.startswith("fused_") or i == "floor"])))
    plan = [(shp, names) for shp, names in plan if names]
    if any(is_variant(i) for i in impls) and not any(is_variant(i) for _, names in plan for i in names):
        print(f"bench_loss: the fused_torch variant rows run only at the targets' shape "
              f"{'x'.join(map(str, tshape))} {tdtype}, which this run does not measure "
              "(--torch-variants-at all runs them everywhere)", file=sys.stderr)
    reps = args.reps or (3 if device.type == "cpu" else 20)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 2)
    args.reps, args.warmup = reps, warmup
    vers = versions()
    dev_name = device_name(device)
    config = dict(loss_type="grpo", importance_sampling_level="token", beta=0.04,
                  old_and_ref_logprobs=True, mask="all ones", backends=backends, reps=reps,
                  warmup=warmup, input_sets=args.input_sets, max_ms=args.max_ms,
                  timing="triton.testing.do_bench median" if device.type == "cuda"
                  else "median of wall-clock repeats",
                  reference_dtype="float32",
                  reference_timed=bool(args.time_reference),
                  floor="bare GEMMs in the input dtype",
                  floor_chunk_gib=args.floor_chunk_gib,
                  peak_mem="allocator bytes above the live inputs",
                  aliases=auto_aliases(impls, device, dtype),
                  onepass_chunk_mb=chunk_mbs, onepass_default_chunk_mb=DEFAULT_CHUNK_MB,
                  torch_variants_at=args.torch_variants_at,
                  tf32=tf32_settings(),
                  argv=sys.argv[1:] if argv is None else argv)
    rows, targets = [], []

    def write():
        """The JSON as it stands: every row so far and the targets judged on them, written to
        a temporary file and renamed over the old one (never a half-written file)."""
        nonlocal targets
        targets = check_targets(rows, tshape, tdtype, tnote.strip(" ()"))
        now = tf32_settings()
        if now != config["tf32"]:
            config["tf32_at_last_row"] = now            # something switched TF32 during the run
        text = json.dumps({"rows": rows, "config": config, "targets": targets,
                           "triton_autotune": autotune_choices()}, indent=2) + "\n"
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)

    def on_row(row):
        rows.append(row)
        write()

    for (hidden, vocab, tokens), shape_impls in plan:
        print(f"H={hidden} V={vocab} N={tokens} {dtype_name} on {dev_name}", file=sys.stderr, flush=True)
        bench_shape(hidden, vocab, tokens, dtype, device, shape_impls, args, vers, dev_name, on_row=on_row)
    write()
    print_table(rows)
    print_targets(targets, tshape, tdtype, tnote)
    for key, cfg in autotune_choices().items():
        print(f"triton forward autotune {key}: {cfg}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    if args.png:
        from plot_loss import plot  # bench/ is on sys.path when run as a script
        plot([out], Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
