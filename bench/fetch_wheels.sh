#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels a GPU session needs that the
# device machine's image lacks or has at another version, into a git-ignored folder
# that the `run` tool carries (carry: [".whl"]). bench/gpu_session.sh installs them
# there with `pip install --no-index --no-deps --target /tmp/site`.
#
#   bash bench/fetch_wheels.sh                 # -> .whl/ for CPython 3.12, x86_64 (the image's)
#   WHL_DIR=/tmp/w PYVER=3.11 bash bench/fetch_wheels.sh   # e.g. for a local simulation
#
# Not carried: torch and triton (the image's CUDA builds are the point), nor anything
# in the image's package list (KINDS.md) whose version satisfies the pins below.
# The folder is emptied first, so exactly one version of each package is in it
# (two versions of one package stop the whole --no-deps install there).
set -euo pipefail
cd "$(dirname "$0")/.."

WHL_DIR=${WHL_DIR:-.whl}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# Cap on what travels: the tree + carried paths must stay under 64 MiB per call.
MAX_MIB=${MAX_MIB:-40}

# The versions in this project's .venv (pip list there), which the CPU suite runs on.
PKGS=(
  transformers==5.22.2            # image: 5.17.0; setup.py needs >=5.19,<5.23
  liger-kernel==0.8.5             # peer in bench_loss.py, model speed-ups
  trl==1.16.0                     # the peer trainer of issue 6, part 2
  math-verify==0.9.0              # r1vl.rewards (install_requires)
  latex2sympy2_extended==1.11.0   # math-verify ==1.11.0
  antlr4-python3-runtime==4.13.2  # latex2sympy2_extended
  datasets==5.2.0                 # trl >=4.7.0 (its GRPOTrainer imports it)
  dill==0.4.1                     # datasets
  multiprocess==0.70.19           # datasets
  regex==2026.11.15               # transformers checks regex>=2025.10.22 at import; the
                                  # image's version is not recorded, so carry ours (0.8 MiB)
)

# The image's package list (KINDS.md, read 2026-11-17), normalised names.
IMAGE_PKGS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize huggingface-hub hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

PYTAG=${PYVER/./}
PLATS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATS+=(--platform "$p")
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading ${#PKGS[@]} wheels for CPython $PYVER x86_64 ..."
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --abi "cp$PYTAG" --abi abi3 --abi none "${PLATS[@]}" -d "$tmp" \
  $(printf '%s\n' "${PKGS[@]}" | sed 's/[[:space:]]*#.*//')

mkdir -p "$WHL_DIR"
rm -f "$WHL_DIR"/*.whl "$WHL_DIR"/image_requirements.txt
cp "$tmp"/*.whl "$WHL_DIR"/

# exclude the folder from git (the run tool carries it as an ignored path)
if [ "$WHL_DIR" = .whl ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

# one version per package; every hard requirement either carried or in the image
"$PY" - "$WHL_DIR" "$PYVER" "$IMAGE_PKGS" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

whl_dir, pyver, image = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3].split())
env = default_environment()
env.update(python_version=pyver, python_full_version=pyver + ".3", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
           platform_python_implementation="CPython", os_name="posix", extra="")
carried, problems, image_reqs = {}, [], {}
for w in sorted(whl_dir.glob("*.whl")):
    name, ver, _, _ = parse_wheel_filename(w.name)
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name][0]} and {ver}")
    carried[name] = (str(ver), w)
print(f"{'wheel':<60} {'MiB':>6}")
for name, (ver, w) in sorted(carried.items()):
    print(f"{w.name:<60} {w.stat().st_size / 2**20:6.2f}")
for name, (ver, w) in sorted(carried.items()):
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue                                  # extras and other Pythons
        dep = canonicalize_name(req.name)
        if dep in carried:
            if req.specifier and not req.specifier.contains(carried[dep][0], prereleases=True):
                problems.append(f"{name} needs {req}, carried {dep}=={carried[dep][0]}")
        elif dep in image:
            if req.specifier:
                image_reqs.setdefault(dep, set()).update(str(s) for s in req.specifier)
        else:
            problems.append(f"{name} needs {req}: neither carried nor in the image list")
# what the image's own packages must satisfy: gpu_session.sh's setup stage checks it there
lines = [f"{dep}{','.join(sorted(specs))}" for dep, specs in sorted(image_reqs.items())]
(whl_dir / "image_requirements.txt").write_text("\n".join(lines) + "\n")
print("the image must satisfy (checked on the device):", " ".join(lines))
total = sum(w.stat().st_size for _, w in carried.values()) / 2**20
print(f"{len(carried)} wheels, {total:.1f} MiB in {whl_dir}")
if problems:
    print("PROBLEMS:\n  " + "\n  ".join(problems))
    sys.exit(1)
EOF

mib=$(du -sm "$WHL_DIR" | cut -f1)
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "error: $WHL_DIR is $mib MiB, over the $MAX_MIB MiB cap (the run tool carries 64 MiB in all)" >&2
  exit 1
fi
echo "ok: $WHL_DIR ($mib MiB); carry it with run(..., carry=[\"$WHL_DIR\"])"
