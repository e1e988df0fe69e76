# r1vl developer entry points. `make test` and `make train` work on a fresh machine:
# they create .venv at the repo root and install everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
PYTEST_ARGS ?=

.PHONY: venv test train bench-small clean

$(PY):
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

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench-small: venv
	$(PY) bench/bench_loss.py --small

clean:
	rm -rf $(VENV) build *.egg-info
