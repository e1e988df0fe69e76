"""Shared pytest set-up: CPU by default; GPU tests are marked `cuda` and skipped without CUDA."""
import os

import torch

# Triton on a CPU-only machine runs only through its interpreter, and the switch is
# read when kernels are decorated: set it before anything imports triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or long-running test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The synthetic task (60 train, 6 test rows, seed 0) written once for every test that runs
    the trainer or the eval CLI on files; tests read it, never write into it."""
    from r1vl.data.synthetic import prepare_task

    d = tmp_path_factory.mktemp("data")
    prepare_task(d, 60, 6, 0)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    yield d
    # a run with another seed or size regenerates the task in place: every later test would
    # read other data. Such a test copies the directory first.
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == files, \
        f"a test rewrote the shared synthetic task in {d}"
