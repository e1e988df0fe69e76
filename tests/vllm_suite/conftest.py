"""The real-engine vLLM suite: runs in .venv-vllm (`make test-vllm`), nowhere else.

Without an importable vllm (the main .venv) these files are not collected, and the
run's header says so; with R1VL_REQUIRE_VLLM=1 (set by `make test-vllm`) a missing
vllm is an error instead.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from r1vl.rollout.vllm_engine import vllm_installed


HAVE_VLLM = vllm_installed()  # a real package (this directory was named vllm until it fooled TRL)
REQUIRED = os.environ.get("R1VL_REQUIRE_VLLM") == "1"
SKIP_REASON = "tests/vllm_suite not collected: vllm is not importable here (run `make test-vllm`, which uses .venv-vllm)"

if not HAVE_VLLM:
    if REQUIRED:
        raise pytest.UsageError(
            f"R1VL_REQUIRE_VLLM=1 but vllm is not importable by {sys.executable}: "
            "build the virtualenv with `make venv-vllm`"
        )
    collect_ignore_glob = ["test_*.py"]

# vLLM switches torch's trace logging on: keep failure reports readable
logging.getLogger("torch").setLevel(logging.WARNING)

HERE = Path(__file__).parent
if str(HERE) not in sys.path:  # the helper modules beside the tests
    sys.path.insert(0, str(HERE))


def pytest_terminal_summary(terminalreporter):
    if not HAVE_VLLM:
        terminalreporter.write_line(SKIP_REASON)


@pytest.fixture(scope="session", autouse=True)
def process_group():
    """A one-rank gloo group: the engine runs with distributed_executor_backend=external_launcher.
    Made before any test runs (autouse), so that tests/conftest.py's check sees it there already:
    a test that asks for an engine by name (request.getfixturevalue) made it during its run, as
    if it had left a group behind."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from vllm_test_utils import free_port

        port = free_port()
        # LOCAL_WORLD_SIZE: vLLM sets it when it builds an engine (a launcher's variable appearing
        # during a test that builds one)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    # the group lives until the interpreter exits: vLLM's engines hold on to it


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    from tiny_qwen2vl import build_tiny_qwen2vl

    path = tmp_path_factory.mktemp("tiny_tied")
    model, processor = build_tiny_qwen2vl(path, tie_word_embeddings=True)
    return path, model, processor


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    from tiny_qwen2vl import build_tiny_qwen2vl

    path = tmp_path_factory.mktemp("tiny_untied")
    model, processor = build_tiny_qwen2vl(path, tie_word_embeddings=False, seed=1)
    return path, model, processor


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory):
    """Qwen2.5-VL's architecture (window-attention vision tower, SwiGLU, RMSNorm), tied head."""
    from tiny_qwen2vl import build_tiny_qwen2vl

    path = tmp_path_factory.mktemp("tiny_qwen25")
    model, processor = build_tiny_qwen2vl(path, tie_word_embeddings=True, seed=2, arch="qwen2_5_vl")
    return path, model, processor
