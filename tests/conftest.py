"""Shared pytest set-up: CPU by default; GPU tests are marked `cuda` and skipped without CUDA.
Off Linux, a test that needs Triton or liger-kernel (PyPI has Linux wheels of them only) is
skipped where it is missing (`needs` marker, `needs_linux_wheel`)."""
import importlib.util
import os
import platform

import torch

# Triton on a CPU-only machine runs only through its interpreter, and the switch is
# read when kernels are decorated: set it before anything imports triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# PyPI has wheels of these for Linux only, and setup.py requires them there alone (macOS trains
# without them; the loss's torch backend needs neither anywhere). Off Linux a test that needs a missing
# one is skipped; on Linux nothing is skipped: a missing one fails the test, as it should.
LINUX_ONLY_WHEELS = ("triton", "liger_kernel")


def missing_off_linux(module: str) -> bool:
    """True when `module` (one of LINUX_ONLY_WHEELS) is not installed and this is not Linux."""
    assert module in LINUX_ONLY_WHEELS, module
    return platform.system() != "Linux" and importlib.util.find_spec(module) is None


def needs_linux_wheel(*modules: str) -> None:
    """At the top of a test module that imports them: skip the module where missing_off_linux."""
    for module in modules:
        if missing_off_linux(module):
            pytest.skip(f"not installed: {module} (PyPI has Linux wheels only)", allow_module_level=True)


@pytest.fixture(autouse=True, scope="session")
def _children_tmpdir():
    """The processes the tests start get their own TMPDIR, removed when the session ends: torchrun's
    agent makes a /tmp/torchelastic_* folder per launch that it never removes (an audit counted
    1,000 of them, most from this suite). A short path: AF_UNIX socket paths under it stay within
    their 107 bytes."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="r1t-")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmp
    try:
        yield tmp
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or long-running test")
    config.addinivalue_line("markers", "needs(*modules): needs these LINUX_ONLY_WHEELS (skipped off Linux "
                                       "without them); a test parametrized with backend='triton' needs triton")


def _needed_wheels(item) -> set[str]:
    needed = {m for mark in item.iter_markers("needs") for m in mark.args}
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton":
        needed.add("triton")
    return needed


def pytest_collection_modifyitems(config, items):
    for item in items:
        missing = sorted(m for m in _needed_wheels(item) if missing_off_linux(m))
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"not installed: {', '.join(missing)} "
                                                    "(PyPI has Linux wheels only)"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# what torchrun gives a rank: left in os.environ by a test, it makes later in-process code think
# it was launched (accelerate, as TRL's trainer builds it, then starts a process group of its own)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A test fails (at teardown) when it leaves a process group or a launcher's variables
    behind, which is cleaned up: a later test's behaviour would depend on the order (a test that
    needs no group skipped itself in the full suite alone)."""
    import torch.distributed as dist

    env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    had_group = dist.is_available() and dist.is_initialized()
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:  # an in-process run sets its own (distributed.num_threads)
        torch.set_num_threads(threads)
    left = []
    for k, v in env.items():
        if os.environ.get(k) != v:
            left.append(f"{k}={os.environ.get(k)!r} (was {v!r})")
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not had_group and dist.is_available() and dist.is_initialized():
        left.append("an initialized process group")
        dist.destroy_process_group()
    if left:
        pytest.fail("the test left behind: " + "; ".join(left), pytrace=False)


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
