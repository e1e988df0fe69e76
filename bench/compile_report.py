"""Compile the Triton kernels for Hopper on a machine without a GPU, and report what the
compiler made of each variant: registers, spills, shared memory, occupancy, and the
instructions that matter ("read what costs no device time": the device library's METHOD.md,
which bench/NOTES.md names).

Each kernel in r1vl.kernels (triton_grpo, triton_rows) is compiled through Triton's own
JIT path, `JITFunction.warmup`, with a compile-only driver that names an sm_90 target
(Triton then picks sm_90a, uses its bundled ptxas, and specialises arguments exactly as
a launch would: 16-byte pointer alignment, integers divisible by 16). Nothing runs.
Per variant it reports
  regs, stack/local bytes (spills), static + dynamic shared memory,
  CTAs and warps per SM the resources allow (65,536 registers, 228 KiB shared, 64 warps),
  SASS counts: HGMMA (wgmma), HMMA (mma.sync), LDGSTS (cp.async), LDG by width,
  LDL/STL (local memory), ATOM/RED (atomics), MUFU (exp/log).
Variants: the forward's autotune table (`_FWD_CONFIGS`), the backward's table
(`_BWD_CONFIGS`), the GRPO objective and the row kernels, at the Qwen2-VL-2B/-7B heads,
in the dtypes the launchers pass on CUDA (flags from `triton_grpo._flags`).

    python bench/compile_report.py                       # 2b+7b, bf16, all kernels
    python bench/compile_report.py --dtypes bf16,fp32,fp16 --json bench/results/compile_sm90.json
    python bench/compile_report.py --kernels fwd --heads 7b --quick   # defaults only
    python bench/compile_report.py --all-flags --dtypes bf16,fp16,fp32 --heads 2b  # every switch

Run with the Triton the GPU image has (3.6.0) to see what the device will run:
    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python bench/compile_report.py
TRITON_INTERPRET must not be set (it turns the kernels into interpreted functions).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _cli  # noqa: E402

HEADS = {"2b": (1536, 151936), "7b": (3584, 152064)}
SM90 = dict(regs=65536, smem=228 * 1024, smem_block=227 * 1024, warps=64, ctas=32, sms=132)
# SASS opcodes counted (base names before the first '.')
COUNTED = ["HGMMA", "HMMA", "LDGSTS", "LDG", "STG", "LDL", "STL", "ATOMG", "RED", "REDG",
           "MUFU", "BAR", "LDS", "STS"]


class _CompileOnlyDriver:
    """Enough of a Triton driver for JITFunction.warmup to compile for `arch`: a
    device, a stream and a target. Anything else (launching, benchmarking) fails."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"compile-only driver: no {name!r} (nothing can run here)")


def install_driver(arch: int = 90):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_report: unset TRITON_INTERPRET (the kernels would be interpreted, "
                         "not compiled)")
    from triton.runtime import driver
    driver.set_active(_CompileOnlyDriver(arch))


def _tools():
    import triton
    base = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return base / "cuobjdump", base / "nvdisasm"


def _resources(cubin: bytes) -> dict:
    cuobjdump, nvdisasm = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(nvdisasm), "-c", str(path)],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump's output:\n{usage}")
    regs, stack, static_smem, local = map(int, m.groups())
    ops = collections.Counter()
    widths = collections.Counter()
    for line in sass.splitlines():
        mm = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if mm is None:
            continue
        full = mm.group(1)
        base = full.split(".")[0]
        ops[base] += 1
        if base == "LDG":
            w = re.search(r"\.(64|128)\b", full)
            widths[w.group(1) if w else "32-or-less"] += 1
    counts = {k: ops.get(k, 0) for k in COUNTED}
    counts["LDG_width"] = dict(widths)
    return dict(regs=regs, stack=stack, static_smem=static_smem, local=local, sass=counts,
                n_instructions=sum(ops.values()))


def occupancy(regs: int, smem: int, warps: int, sm=SM90) -> dict:
    """CTAs per SM the registers, shared memory and warp slots allow (sm_90 limits:
    registers allocated per warp in units of 256, 1 KiB of shared memory reserved per CTA)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (sm["regs"] // per_warp) // warps
    by_smem = sm["smem"] // (smem + 1024) if smem else sm["ctas"]
    by_warps = sm["warps"] // warps
    ctas = min(by_regs, by_smem, by_warps, sm["ctas"])
    limit = min(("regs", by_regs), ("smem", by_smem), ("warps", by_warps), key=lambda x: x[1])[0]
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps, limited_by=limit)


def _compile(fn, args, consts, num_warps, num_stages):
    t0 = time.perf_counter()
    k = fn.warmup(*args, **consts, num_warps=num_warps, num_stages=num_stages, grid=(1,))
    secs = time.perf_counter() - t0
    md = k.metadata
    res = _resources(k.asm["cubin"])
    res["dyn_smem"] = int(md.shared)
    smem = res["dyn_smem"] + res["static_smem"]
    res.update(occupancy(res["regs"], smem, num_warps))
    res["fits"] = smem <= SM90["smem_block"] and res["ctas_per_sm"] >= 1
    # Triton's spills land in the stack frame (LOCAL stays 0): STL stores count them
    res["spills"] = res["local"] > 0 or res["sass"]["STL"] > 0
    res["compile_s"] = round(secs, 2)
    return res


def _flag_sets(quick, all_flags, n):
    """Boolean constexpr tuples: every combination with all_flags; otherwise the first flag
    (entropy, or sequence level) both ways, or off alone with quick, and the rest off."""
    if all_flags:
        return list(itertools.product([False, True], repeat=n))
    return [(False,) * n] if quick else [(False,) * n, (True,) + (False,) * (n - 1)]


def _extra(all_flags, **flags):
    return flags if all_flags else {}


def _variants(kernels, heads, dtypes, quick, n_tokens, all_flags=False):
    """(kernel name, label dict, fn, args, constexprs, warps, stages) for each variant."""
    import torch

    from r1vl.kernels import triton_grpo as K
    from r1vl.kernels import triton_rows as R

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    f32, i64 = torch.float32, torch.int64
    # tiny placeholders: only dtype and alignment matter, nothing is launched
    t = lambda dt: torch.empty(8, dtype=dt)  # noqa: E731
    n = n_tokens
    if not K._SM_COUNT:
        K._SM_COUNT.append(SM90["sms"])        # _splits plans for the H100's 132 SMs
    out = []
    for head in heads:
        d, v = HEADS[head]
        for dn in dtypes:
            dt = tdt[dn]
            flags = dict(UPCAST=dt == torch.float16, IEEE=dt == torch.float32)
            if "fwd" in kernels:
                _, per = K._splits(-(-n // 64), v, False)
                table = K._FWD_CONFIGS
                if quick or all_flags:                    # the first config of each loop shape
                    first: dict[bool, tuple] = {}
                    for c in table:
                        first.setdefault(c[5], c)
                    table = list(first.values())
                for bm, bv, bk, w, st, flat in table:
                    for ent, bias in _flag_sets(quick, all_flags, 2):
                        args = (t(dt), t(dt), t(dt), t(i64), t(i64), t(f32), t(f32), t(f32), t(f32),
                                n, v, d, d, d, 1.0, per)
                        consts = dict(HAS_BIAS=bias, NEED_ENT=ent, **flags,
                                      BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, FLAT=flat)
                        out.append(("fwd", dict(head=head, dtype=dn, entropy=ent, BLOCK_M=bm,
                                                BLOCK_V=bv, BLOCK_K=bk, flat=flat, warps=w, stages=st,
                                                **_extra(all_flags, HAS_BIAS=bias)),
                                    K._logprob_fwd_kernel, args, consts, w, st))
            if "bwd" in kernels:
                table = K._BWD_CONFIGS[:1] if quick or all_flags else K._BWD_CONFIGS
                for bm, bv, bk, w, st in table:
                    for ent, bias, dh, dw in _flag_sets(quick, all_flags, 4):
                        if all_flags and not (dh or dw or bias):
                            continue                      # nothing to compute: never launched
                        args = (t(dt), t(dt), t(dt), t(i64), t(i64), t(f32), t(f32), t(f32), t(f32),
                                t(f32), t(f32), t(f32), n, v, d, d, d, 1.0)
                        consts = dict(HAS_BIAS=bias, HAS_ENT_GRAD=ent, NEED_DH=dh or not all_flags,
                                      NEED_DW=dw or not all_flags, NEED_DB=bias, **flags,
                                      BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
                        out.append(("bwd", dict(head=head, dtype=dn, entropy=ent, BLOCK_M=bm,
                                                BLOCK_V=bv, BLOCK_K=bk, warps=w, stages=st,
                                                **_extra(all_flags, HAS_BIAS=bias, NEED_DH=dh,
                                                         NEED_DW=dw)),
                                    K._logprob_bwd_kernel, args, consts, w, st))
            if "rows" in kernels:
                bv = R._block_v(v, False)
                for ent, bias in (_flag_sets(False, all_flags, 2) if dn == dtypes[0] else []):
                    # fp32 input: once per head
                    args = (t(f32), t(f32), t(i64), t(f32), t(f32), t(f32), t(f32), v, v, 1.0)
                    out.append(("row_stats", dict(head=head, dtype="fp32", entropy=ent, BLOCK_V=bv,
                                                  warps=4, stages=3, **_extra(all_flags, HAS_BIAS=bias)),
                                R._row_stats_kernel, args,
                                dict(HAS_BIAS=bias, NEED_ENT=ent, BLOCK_V=bv), 4, 3))
                for bias in ([False, True] if all_flags else [False]):
                    args = (t(f32), t(f32), t(i64), t(f32), t(f32), t(f32), t(dt), v, v, v, 1.0)
                    out.append(("row_grad", dict(head=head, dtype=dn, BLOCK_V=bv, warps=4, stages=3,
                                                 **_extra(all_flags, HAS_BIAS=bias)),
                                R._row_grad_kernel, args, dict(HAS_BIAS=bias, BLOCK_V=bv), 4, 3))
    if "objective" in kernels:
        bt = K._pow2(1024, 16, 1024)
        names = ("SEQ_LEVEL", "TOKEN_ADV", "HAS_OLD", "HAS_REF", "USE_KL", "HAS_RIS", "HAS_ENT", "PER_SEQ_NORM",
                 "KL_IS")
        # without --all-flags: both levels, with [B] and with [B, T] (per-token) advantages
        for vals in _flag_sets(False, all_flags, len(names)) if all_flags else \
                [(False, False), (True, False), (False, True), (True, True)]:
            fl = dict(TOKEN_ADV=False, HAS_OLD=True, HAS_REF=True, USE_KL=True, HAS_RIS=False, HAS_ENT=False,
                      PER_SEQ_NORM=True, KL_IS=False)
            fl.update(zip(names, vals))
            if fl["USE_KL"] and not fl["HAS_REF"]:
                continue                                  # the launcher never passes this
            args = tuple(t(f32) for _ in range(10)) + (1024, 0.04, 0.8, 1.2, 0.125, float("inf"))
            out.append(("objective", dict(sequence_level=fl["SEQ_LEVEL"], token_advantages=fl["TOKEN_ADV"],
                                          BLOCK_T=bt, warps=4, stages=3,
                                          **_extra(all_flags, **{k: fl[k] for k in names[2:]})),
                        K._grpo_objective_kernel, args, dict(**fl, BLOCK_T=bt), 4, 3))
    return out


def run(kernels, heads, dtypes, quick=False, n_tokens=16384, arch=90, all_flags=False, log=print):
    install_driver(arch)
    import triton
    rows = []
    variants = _variants(kernels, heads, dtypes, quick, n_tokens, all_flags)
    for i, (name, label, fn, args, consts, w, st) in enumerate(variants):
        try:
            res = _compile(fn, args, consts, w, st)
            err = None
        except Exception as exc:  # a variant that does not compile is a result, not a crash
            res, err = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        rows.append(dict(kernel=name, **label, **res, error=err))
        log(f"[{i + 1}/{len(variants)}] {name} {label} -> "
            + (f"error {err}" if err else
               f"regs {res['regs']} smem {res['dyn_smem'] + res['static_smem']} "
               f"ctas/SM {res['ctas_per_sm']} spills {res['spills']} ({res['compile_s']} s)"))
    return dict(arch=f"sm_{arch}", triton=triton.__version__, n_tokens=n_tokens, rows=rows)


def table(report) -> str:
    hdr = ("| kernel | head | dtype | ent | BM×BV×BK | flat | warps/stages | regs | stack B / STL "
           "| smem KiB | CTAs/SM (limit) | HGMMA | HMMA | LDGSTS | LDG (w) | ATOM/RED |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in report["rows"]:
        tile = "×".join(str(r[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K") if k in r) or str(r.get("BLOCK_T", ""))
        lead = (f"| {r['kernel']} | {r.get('head', '')} | {r.get('dtype', '')} | {r.get('entropy', '')} | "
                f"{tile} | {r.get('flat', '')} | {r['warps']}/{r['stages']} |")
        if r.get("error"):
            lines.append(f"{lead} error: {r['error'][:80]} |")
            continue
        s = r["sass"]
        ldg = ", ".join(f"{k}:{v}" for k, v in sorted(s["LDG_width"].items()))
        lines.append(
            f"{lead} {r['regs']} | {r['stack'] + r['local']} / {s['STL']} | "
            f"{(r['dyn_smem'] + r['static_smem']) / 1024:.0f} | {r['ctas_per_sm']} ({r['limited_by']}) | "
            f"{s['HGMMA']} | {s['HMMA']} | {s['LDGSTS']} | {ldg or 0} | "
            f"{s['ATOMG'] + s['RED'] + s['REDG']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="Exit codes: 0 every variant compiled, 1 some did not, 2 a bad argument "
                                    "(or TRITON_INTERPRET=1 set).")
    ap.add_argument("--kernels", default="fwd,bwd,objective,rows",
                    help="comma list of fwd, bwd, objective, rows (default: %(default)s)")
    ap.add_argument("--heads", default="2b,7b", help="comma list of " + ", ".join(HEADS) + " (default: %(default)s)")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32 (default: %(default)s)")
    ap.add_argument("--tokens", type=_cli.positive_int, default=16384,
                    help="rows N (sets the forward's split plan) (default: %(default)s)")
    ap.add_argument("--arch", type=_cli.positive_int, default=90,
                    help="compute capability x 10 (90: H100/H200); the CTAs/SM column always uses sm_90's "
                         "limits (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="first config of each table (of each loop shape for the forward), no entropy variants "
                         "(default: off)")
    ap.add_argument("--all-flags", action="store_true",
                    help="every combination of each kernel's boolean switches (bias, entropy, which "
                         "gradients, the objective's terms) at the first config of each table (of each loop "
                         "shape for the forward) (default: off)")
    ap.add_argument("--json", default=None,
                    help="write the full report here; missing folders are created (default: no file)")
    return ap


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
    heads = [h.strip() for h in a.heads.split(",") if h.strip()]
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for flag, got, known in (("--kernels", kernels, ("fwd", "bwd", "objective", "rows")),
                             ("--heads", heads, tuple(HEADS)), ("--dtypes", dtypes, ("bf16", "fp16", "fp32"))):
        bad = [x for x in got if x not in known]
        if bad or not got:
            ap.error(f"{flag} {getattr(a, flag[2:])!r}: " + (f"unknown {', '.join(map(repr, bad))}; " if bad else
                                                            "none given; ") + f"choose from {', '.join(known)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: unset it (the kernels would be interpreted, not compiled)")
    if a.json:
        _cli.out_file(ap, "--json", a.json)
    report = run(kernels, heads, dtypes, quick=a.quick, n_tokens=a.tokens, arch=a.arch,
                 all_flags=a.all_flags,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"Triton {report['triton']}, {report['arch']}, N = {report['n_tokens']}")
    print(table(report))
    failed = [r for r in report["rows"] if r.get("error")]
    if failed:
        print(f"{len(failed)} variant(s) failed to compile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
