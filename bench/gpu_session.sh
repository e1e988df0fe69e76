#!/usr/bin/env bash
# One GPU session's work for issue 6 (section 1), run from the repo root on the device
# machine with the wheels of bench/fetch_wheels.sh carried:
#
#   run(command="R1VL_GPU_BUDGET_S=385 bash bench/gpu_session.sh ceilings tests loss", carry=[".whl"],
#       timeout_s=400)                  # R1VL_GPU_BUDGET_S = timeout_s - 15: pack + summary fit the call
#
# (bench/NOTES.md "How to run" has the two-call plan for a 15-minute session.)
# Stages (in the order given; default: ceilings tests loss step):
#   setup     always first, ~10 s: wheels -> /tmp/site (PYTHONPATH), r1vl + r1vl.kernels
#             importable from this tree without network, image versions checked, versions
#             and nvidia-smi printed
#   ceilings  device-to-device copy TB/s and 8192^3 bf16 matmul TFLOP/s -> ceilings.json
#   tests     pytest tests/test_kernels_*.py (CUDA tensors when CUDA is present, cuda-marked
#             ones included) + the cuda-marked tests of other files -> junit_*.xml; stopped at
#             the stage's timeout by SIGINT (pytest then still writes its junit XML and the -rfEs
#             summary; KILL 10 s later), each test limited to half the stage's timeout
#             (pytest-timeout; R1VL_PYTEST_TIMEOUT sets it)
#   loss      bench/bench_loss.py, 2B + 7B heads x 4096/16384 tokens, bf16 -> loss_<dev>.json/.png
#             (the targets' shape, 7B x 16384, first; the JSON rewritten after every row)
#   loss2b, loss7b   the same for one head (-> loss_<dev>_2b.json / _7b.json), to split calls
#   long      131072 tokens at the 2B head, fused backends + floor -> loss_<dev>_long.json
#   step      bench/bench_step.py --preset 2b --out step_<dev>.json, if that file exists, with
#             --time-budget = the stage's timeout - 15 s unless R1VL_STEP_ARGS gives one
#   stepwhole the same for r1vl's fused+liger variant only, with whole rows (--no-dedup-images
#             --no-share-prompts) -> step_<dev>_whole_rows.json: what those two save
#   stepmem   the same for r1vl's fused+liger variant only, with the reference model in host
#             memory outside the logprob phase (--ref-on-host) -> step_<dev>_ref_on_host.json:
#             the update's peak without the reference's weights (bench/NOTES.md item 7)
#   share     bench/bench_share.py at the whole 2B model (28 + 32 layers), bf16 -> share_<dev>.json:
#             whole rows vs image dedup vs shared prompts, one forward+backward, with equality checks
#
# Everything goes to $OUT (./gpu_out when OUT is unset): session.log (all output),
# summary.txt, the JSON/PNG results; at the end small files are packed into more.tar.gz
# so that at most 8 files come back. The summary table is printed last.
#
# Environment:
#   R1VL_GPU_BUDGET_S   seconds this script may use in all (default 570, for timeout_s=600: set
#                       it to the call's timeout_s - 15); each stage's timeout is cut to what is
#                       left minus 25 s (pack + summary), a stage that no longer fits is skipped
#   R1VL_GPU_DRYRUN=1   CPU plumbing check here: tiny shapes, the new CUDA test file only
#   R1VL_CAP_<stage>    that stage's timeout in seconds instead of its default (still cut to
#                       what is left of the budget), e.g. R1VL_CAP_tests=200
#   R1VL_LOSS_ARGS, R1VL_STEP_ARGS, R1VL_PYTEST_ARGS   extra arguments for those stages
#   R1VL_TEST_FILES     kernel test files (default tests/test_kernels_*.py)
#   R1VL_PYTEST_TIMEOUT seconds per test (default: half the pytest stage's timeout, at least 20)
#   PYTHON              interpreter (default python3: the image's, with torch)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
DRY=${R1VL_GPU_DRYRUN:-0}
BUDGET=${R1VL_GPU_BUDGET_S:-570}
PY=${PYTHON:-python3}
PY=$(command -v "$PY") || { echo "no python at ${PYTHON:-python3}" >&2; exit 2; }
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac            # absolute: setup runs it from / too
for v in $(compgen -v R1VL_CAP_) R1VL_GPU_BUDGET_S R1VL_PYTEST_TIMEOUT; do   # checked before any device time
  [ -n "${!v+x}" ] || continue                                                # is spent
  case ${!v} in ''|*[!0-9]*) echo "gpu_session: $v=${!v}: expected whole seconds" >&2; exit 2 ;; esac
done
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STATUS=$(mktemp "${TMPDIR:-/tmp}/gpu_session_stages.XXXXXX")   # outside $OUT: every file there comes back
trap 'rm -f "$STATUS"' EXIT
exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!
WHL=${R1VL_WHL_DIR:-.whl}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(ceilings tests loss step)

log() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ( $(date +%s) - T0 ) )); }

# stage_limit NAME DEFAULT_TIMEOUT: the timeout NAME gets if it starts now: R1VL_CAP_<NAME> or
# the default, cut to the budget left minus 25 s (pack + summary after the last stage)
stage_limit() {
  local cap="R1VL_CAP_$1" limit=$2 rem
  [ -n "${!cap:-}" ] && limit=${!cap}                   # e.g. R1VL_CAP_tests=200
  rem=$(left)
  [ "$limit" -gt $(( rem - 25 )) ] && limit=$(( rem - 25 ))
  echo "$limit"
}

# run_stage [--signal SIG] NAME DEFAULT_TIMEOUT CMD...: timeout cut to the budget, status recorded.
# At the timeout the command gets SIG (default TERM; INT for pytest, which then still writes its
# junit XML and summary), KILL 10 s later.
run_stage() {
  local sig=TERM
  if [ "$1" = --signal ]; then sig=$2; shift 2; fi
  local name=$1 limit; limit=$(stage_limit "$1" "$2"); shift 2
  local rem; rem=$(left)
  if [ "$rem" -lt 40 ]; then
    log "SKIP $name: only ${rem}s of the ${BUDGET}s budget left"
    printf '%s\tskipped\t0\tbudget\n' "$name" >> "$STATUS"
    return 0
  fi
  log "BEGIN $name (timeout ${limit}s, then SIG$sig): $*"
  local s rc; s=$(date +%s)
  timeout --signal="$sig" --kill-after=10 "$limit" "$@"
  rc=$?
  local d=$(( $(date +%s) - s )) st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=TIMEOUT; elif [ $rc -ne 0 ]; then st=FAIL; fi
  log "END $name: $st (rc $rc, ${d}s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$d" "$rc" >> "$STATUS"
  return 0
}

# ----------------------------------------------------------------------------- setup
setup() {
  log "setup: repo $ROOT, OUT=$OUT, dry run=$DRY, budget ${BUDGET}s (the run() call's timeout_s must be" \
      ">= $(( BUDGET + 15 )) for pack + summary to run), python $(command -v "$PY")"
  if ls "$WHL"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHL"/*.whl || { log "FATAL: wheel install failed"; return 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    log "installed $(ls "$WHL"/*.whl | wc -l) wheels from $WHL to /tmp/site"
  else
    log "no $WHL/*.whl here: using the interpreter's own packages (carry .whl on the device)"
  fi
  # r1vl from this tree, without network or a build: a meta-path finder maps r1vl ->
  # ./r1vl and r1vl.kernels -> ./kernels (setup.py's package_dir), loaded by a .pth in
  # the interpreter's site-packages; plus a dist-info so importlib.metadata knows r1vl.
  # Only on the device (a fresh machine each session): a dry run writes into no interpreter.
  if (cd / && "$PY" -c "import r1vl.kernels, os, sys; sys.exit(0 if os.path.realpath(r1vl.kernels.__file__).startswith(os.path.realpath('$ROOT')) else 1)" 2>/dev/null); then
    log "r1vl.kernels already importable from this tree"
  elif [ "$DRY" = 1 ]; then
    # a dry run is on a development machine: its interpreter is shared (another checkout's venv,
    # a clone pointing at it), and the finder below would send every `import r1vl` there to this
    # tree until removed by hand
    log "FATAL: $PY imports r1vl from elsewhere ($(cd / && "$PY" -c 'import r1vl, os; print(os.path.dirname(r1vl.__file__))' 2>&1 | tail -1));" \
        "a dry run never writes into an interpreter: use one with r1vl installed from $ROOT (pip install -e .)"
    return 1
  else
    "$PY" - "$ROOT" <<'EOF' || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      || { log "FATAL: could not make r1vl importable"; return 1; }
import re, sys, sysconfig
from pathlib import Path
root = Path(sys.argv[1]).resolve()
site = Path(sysconfig.get_paths()["purelib"])
if Path(sys.prefix).resolve().is_relative_to(root):
    sys.exit(f"refusing to write into {site}: a virtual environment inside this repository "
             "(install r1vl there with pip install -e . instead)")
finder = f'''"""Maps r1vl and r1vl.kernels to the source tree {root} (bench/gpu_session.sh)."""
import importlib.util
import sys

_MAP = {{"r1vl": {str(root / "r1vl")!r}, "r1vl.kernels": {str(root / "kernels")!r}}}


class R1vlSourceFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        d = _MAP.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, d + "/__init__.py",
                                                      submodule_search_locations=[d])


if R1vlSourceFinder not in sys.meta_path:
    sys.meta_path.insert(0, R1vlSourceFinder)
'''
(site / "_r1vl_source_finder.py").write_text(finder)
(site / "r1vl_source.pth").write_text("import _r1vl_source_finder\n")
version = re.search(r'version="([^"]+)"', (root / "setup.py").read_text()).group(1)
if not any(site.glob("r1vl-*.dist-info")):       # never touch a real install's metadata
    dist = site / f"r1vl-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: r1vl\nVersion: {version}\n")
    (dist / "top_level.txt").write_text("r1vl\n")
print(f"r1vl {version}: finder + .pth + dist-info in {site}")
EOF
  fi
  "$PY" - "$WHL" <<'EOF' || { log "FATAL: imports failed"; return 1; }
import importlib, importlib.metadata as md, os, sys, time
from pathlib import Path
ok = True
req = Path(sys.argv[1]) / "image_requirements.txt"
if req.exists():
    from packaging.requirements import Requirement
    bad = []
    for line in req.read_text().split():
        r = Requirement(line)
        try:
            v = md.version(r.name)
        except md.PackageNotFoundError:
            v = None
        if v is None or not r.specifier.contains(v, prereleases=True):
            bad.append(f"{r.name}=={v} (carried wheels need {r.specifier})")
    print("image requirements:", "all satisfied" if not bad else "MISMATCH " + "; ".join(bad))
for mod in ("torch", "triton", "r1vl", "r1vl.kernels", "transformers", "liger_kernel", "math_verify",
            "trl", "datasets"):
    t = time.time()
    try:
        m = importlib.import_module(mod)
        where = os.path.dirname(getattr(m, "__file__", "") or "")
        print(f"  import {mod:<14} ok  {getattr(m, '__version__', ''):<14} {time.time() - t:5.1f}s  {where}")
    except Exception as exc:
        print(f"  import {mod:<14} FAILED: {type(exc).__name__}: {exc}")
        ok = ok and mod not in ("torch", "r1vl", "r1vl.kernels")
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, sm_{p.major}{p.minor}")
sys.exit(0 if ok else 1)
EOF
  if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else log "no nvidia-smi"; fi
}

# ----------------------------------------------------------------------------- stages
DEV=cpu
device_slug() {
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import torch; from bench_loss import device_slug; print(device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown
}

stage_ceilings() {
  local extra=(); [ "$DRY" = 1 ] && extra=(--small --reps 3)
  run_stage ceilings 120 "$PY" bench/gpu_ceilings.py --out "$OUT/ceilings.json" "${extra[@]}"
}

# per_test_timeout NAME DEFAULT_TIMEOUT: pytest-timeout's option for a pytest stage: half the
# stage's timeout (at least 20 s), or R1VL_PYTEST_TIMEOUT; none without pytest-timeout
per_test_timeout() {
  "$PY" -c "import pytest_timeout" 2>/dev/null || return 0
  local t=${R1VL_PYTEST_TIMEOUT:-$(( $(stage_limit "$1" "$2") / 2 ))}
  [ "$t" -lt 20 ] && t=20
  echo "--timeout=$t"
}

stage_tests() {
  local files=() timeout_opt=() extra=()
  if [ -n "${R1VL_TEST_FILES:-}" ]; then read -r -a files <<< "$R1VL_TEST_FILES"
  elif [ "$DRY" = 1 ]; then files=(tests/test_kernels_cuda.py)
  else files=(tests/test_kernels_*.py); fi
  read -r -a timeout_opt <<< "$(per_test_timeout tests 330)"
  [ -n "${R1VL_PYTEST_ARGS:-}" ] && read -r -a extra <<< "$R1VL_PYTEST_ARGS"
  run_stage --signal INT tests 330 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${timeout_opt[@]}" \
    --junitxml="$OUT/junit_kernels.xml" -o junit_family=xunit2 "${extra[@]}" "${files[@]}"
  # cuda-marked tests in the other files (the kernel files ran whole above)
  local others=()
  for f in $(grep -l "mark.cuda" tests/test_*.py 2>/dev/null); do
    case " ${files[*]} " in *" $f "*) ;; *) others+=("$f") ;; esac
  done
  if [ ${#others[@]} -gt 0 ]; then
    read -r -a timeout_opt <<< "$(per_test_timeout tests_cuda_other 180)"
    run_stage --signal INT tests_cuda_other 180 "$PY" -m pytest -q -rfEs -p no:cacheprovider -m cuda \
      "${timeout_opt[@]}" --junitxml="$OUT/junit_cuda_other.xml" -o junit_family=xunit2 "${others[@]}"
  fi
}

stage_loss() {   # stage_loss NAME SUFFIX TIMEOUT ARGS...
  local name=$1 suffix=$2 limit=$3; shift 3
  local extra=(); [ -n "${R1VL_LOSS_ARGS:-}" ] && read -r -a extra <<< "$R1VL_LOSS_ARGS"
  if [ "$DRY" = 1 ]; then   # tiny CPU shapes; the targets judged at the largest one
    case $name in
      long) set -- --shapes 64x1000x4096 --impls fused,floor ;;
      *) set -- --small --shapes 64x1000x128,64x1000x512,128x2000x512 --reps 2 --targets-at 128x2000x512 ;;
    esac
  fi
  run_stage "$name" "$limit" "$PY" bench/bench_loss.py "$@" "${extra[@]}" \
    --out "$OUT/loss_${DEV}${suffix}.json" --png "$OUT/loss_${DEV}${suffix}.png"
}

stage_step() {  # stage_step NAME SUFFIX [fixed bench_step.py arguments...]
  local name=$1 suffix=$2; shift 2
  if [ ! -f bench/bench_step.py ]; then
    log "SKIP $name: bench/bench_step.py is not in this tree"
    printf '%s\tskipped\t0\tno bench/bench_step.py\n' "$name" >> "$STATUS"
    return 0
  fi
  local help args=() extra=()
  help=$(timeout 120 "$PY" bench/bench_step.py --help 2>&1) || true
  if [ "$DRY" = 1 ]; then
    if grep -q -- "--small" <<< "$help"; then args+=(--small)
    elif grep -q "tiny" <<< "$help"; then args+=(--preset tiny)
    else
      log "SKIP $name (dry run): bench_step.py has no --small or tiny preset"
      printf '%s\tskipped\t0\tdry run\n' "$name" >> "$STATUS"; return 0
    fi
  else
    grep -q -- "--preset" <<< "$help" && args+=(--preset 2b)
  fi
  grep -q -- "--out" <<< "$help" && args+=(--out "$OUT/step_${DEV}${suffix}.json")
  [ -n "${R1VL_STEP_ARGS:-}" ] && read -r -a extra <<< "$R1VL_STEP_ARGS"
  # bench_step.py ends its own runs (keeping their finished steps) 15 s before the stage's timeout
  local lim; lim=$(stage_limit "$name" 540)
  if grep -q -- "--time-budget" <<< "$help" && [[ " $* ${extra[*]} " != *" --time-budget "* ]] \
     && [ "$lim" -gt 30 ]; then
    args+=(--time-budget $(( lim - 15 )))
  fi
  run_stage "$name" 540 "$PY" bench/bench_step.py "${args[@]}" "$@" "${extra[@]}"
}

# ----------------------------------------------------------------------------- pack + summary
pack() {
  # At most 8 files come back: summary.txt (written next) + more.tar.gz + 6 kept as files,
  # in this order of priority: session.log, loss/step JSON, PNGs; the rest goes into the tar.
  local files=() keep=() rest=() f
  mapfile -t files < <(cd "$OUT" && find . -type f ! -name more.tar.gz ! -name summary.txt -printf '%P\n' | sort)
  for pat in '^session\.log$' '^(loss|step|share)_[^/]*\.json$' '^[^/]*\.png$'; do
    for f in "${files[@]}"; do
      [[ $f =~ $pat ]] && [ ${#keep[@]} -lt 6 ] && [[ " ${keep[*]} " != *" $f "* ]] && keep+=("$f")
    done
  done
  for f in "${files[@]}"; do [[ " ${keep[*]} " == *" $f "* ]] || rest+=("$f"); done
  if [ ${#rest[@]} -gt 0 ]; then
    (cd "$OUT" && tar czf more.tar.gz "${rest[@]}" && rm -f "${rest[@]}" && find . -mindepth 1 -type d -empty -delete)
    log "packed ${#rest[@]} files into more.tar.gz: ${rest[*]}"
  fi
}

summary() {
  "$PY" - "$OUT" "$STATUS" "$(( $(date +%s) - T0 ))" "$DEV" <<'EOF'
import json, sys, tarfile, xml.etree.ElementTree as ET
from pathlib import Path
out, status, total, dev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = ["", "=" * 78, f"SUMMARY ({total}s in all; files in {out})", "=" * 78]
lines.append(f"{'stage':<18} {'status':<8} {'s':>5}  result")
tars = {}
if (out / "more.tar.gz").exists():
    with tarfile.open(out / "more.tar.gz") as t:
        for m in t.getmembers():
            if m.isfile():
                tars[m.name] = t.extractfile(m).read()

def read(name):
    p = out / name
    return p.read_bytes() if p.exists() else tars.get(name)

def junit(name):
    data = read(name)
    if not data:
        return "no junit file"
    root = ET.fromstring(data)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"

def loss(name):
    data = read(name)
    if not data:
        return ["no JSON"]
    d = json.loads(data)
    res = []
    rows = d["rows"]
    errs = [r["impl"] for r in rows if r.get("error")]
    res.append(f"{len(rows)} rows" + (f", errors: {', '.join(sorted(set(errs)))}" if errs else ""))
    for t in d.get("targets", []):
        v = "n/a " if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        res.append(f"  {v} {t['impl']:<16} {t['target']} = {val} (target {t['op']} {t['limit']:.3g})")
    return res

def step(name):
    rows = json.loads(read(name)).get("rows", [])
    res = [f"{len(rows)} rows in {name}"]
    upd = [r for r in rows if r["phase"] == "update" and r["seconds"]]
    trl = next((r for r in upd if r["impl"] == "trl"), None)
    for r in upd:
        c = r["config"]
        peak = f", peak {r['peak_mem_bytes'] / 2**30:.1f} GiB" if r["peak_mem_bytes"] else ""
        how = ("warm-up step only" if c.get("warmup_only") else
               f"{c.get('timed_steps', '?')} timed step(s)" + (", cut short" if c.get("cut_short") else ""))
        ratio = ""
        if trl is not None and r is not trl:
            ratio = f"; r1vl/TRL tok/s x{r['tokens_per_s'] / trl['tokens_per_s']:.2f} (goal >= 2)"
            if r["peak_mem_bytes"] and trl["peak_mem_bytes"]:
                ratio += f", peak x{r['peak_mem_bytes'] / trl['peak_mem_bytes']:.2f} (goal <= 0.6)"
        res.append(f"  {r['impl']} {c['variant']}: update {r['seconds']:.2f} s (min {c.get('seconds_min', r['seconds']):.2f})"
                   f"{peak} [{how}]{ratio}")
    for r in rows:
        if r["seconds"] is None:
            c = r["config"]
            why = c.get("skipped") or (str(c.get("error") or "?").strip().splitlines() or ["?"])[-1]
            res.append(f"  {r['impl']} {c['variant']}: {why[:100]}")
    return res

for line in status.read_text().splitlines():
    name, st, secs, rc = line.split("\t")
    res = [rc if st == "skipped" else ""]
    if st == "skipped":
        pass
    elif name == "ceilings" and read("ceilings.json"):
        c = json.loads(read("ceilings.json"))
        res = [f"copy {c['copy']['tb_per_s']:.2f} TB/s, mm {c['mm']['tflops']:.0f} TFLOP/s ({c['device']})"]
    elif name == "tests":
        res = [junit("junit_kernels.xml")]
    elif name == "tests_cuda_other":
        res = [junit("junit_cuda_other.xml")]
    elif name.startswith(("loss", "long")):
        suffix = {"loss": "", "loss2b": "_2b", "loss7b": "_7b", "long": "_long"}.get(name, "")
        res = loss(f"loss_{dev}{suffix}.json")
    elif name == "share" and read(f"share_{dev}.json"):
        d = json.loads(read(f"share_{dev}.json"))
        base = d["rows"][0]
        res = [f"{r['setting']}: update x{r['update_seconds'] / base['update_seconds']:.2f}, log-probs "
               f"x{r['logprobs_seconds'] / base['logprobs_seconds']:.2f}, grad err {r['grad_max_rel_err_vs_whole']:.1e}"
               for r in d["rows"][1:]]
    elif name in ("step", "stepwhole", "stepmem") and st != "skipped":
        fname = f"step_{dev}" + {"step": "", "stepwhole": "_whole_rows", "stepmem": "_ref_on_host"}[name] + ".json"
        if read(fname):
            res = step(fname)
    lines.append(f"{name:<18} {st:<8} {secs:>5}  {res[0]}")
    lines += [f"{'':<34}{r}" for r in res[1:]]
files = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.txt"})
lines.append(f"files back: {', '.join(files)}")
text = "\n".join(lines)
(out / "summary.txt").write_text(text + "\n")
print(text)
EOF
}

# ----------------------------------------------------------------------------- main
if ! setup; then
  printf 'setup\tFAIL\t%s\t1\n' "$(( $(date +%s) - T0 ))" >> "$STATUS"
  pack; summary; exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null; exit 1
fi
printf 'setup\tok\t%s\t0\n' "$(( $(date +%s) - T0 ))" >> "$STATUS"
DEV=$(device_slug)
[ "$DRY" = 1 ] && DEV="${DEV}_dryrun"
for st in "${STAGES[@]}"; do
  case $st in
    setup) ;;
    ceilings) stage_ceilings ;;
    tests) stage_tests ;;
    loss) stage_loss loss "" 480 ;;
    loss2b) stage_loss loss2b _2b 300 --heads 2b ;;
    loss7b) stage_loss loss7b _7b 420 --heads 7b ;;
    long) stage_loss long _long 300 --shapes 1536x151936x131072 --impls fused,floor ;;
    step) stage_step step "" ;;
    share)
      if [ "$DRY" = 1 ]; then share_args=(--device cpu --layers 1 --vision-layers 1 --image 56 --reps 1)
      else share_args=(--device cuda --layers 28 --vision-layers 32 --dtype bfloat16 --attn auto); fi
      run_stage share 240 "$PY" bench/bench_share.py "${share_args[@]}" --out "$OUT/share_${DEV}.json" ;;
    stepwhole) stage_step stepwhole _whole_rows --impls r1vl --variants fused+liger --no-dedup-images \
                 --no-share-prompts ;;
    stepmem) stage_step stepmem _ref_on_host --impls r1vl --variants fused+liger --ref-on-host ;;
    *) log "unknown stage '$st' (setup ceilings tests loss loss2b loss7b long step stepwhole stepmem share)"
       printf '%s\tFAIL\t0\tunknown stage\n' "$st" >> "$STATUS" ;;
  esac
done
pack
summary
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
