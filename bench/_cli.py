"""Argument checks shared by the scripts in bench/: a bad argument is one line on stderr
(argparse's "<prog>: error: ..."), exit code 2, before any work starts.

Output paths: a missing folder is created (as every script does when it writes), but a
path that cannot be written (a file in the way, no permission, a directory given for a
file, the wrong suffix) is an error before the run, not a traceback after it.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block): "<prog>: error: <what>
    (see --help)", exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, ok, what):
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")


def int_list(ap: argparse.ArgumentParser, flag: str, text: str, sep: str = ",") -> list[int]:
    """'1,2,3' -> [1, 2, 3], each an integer >= 1; anything else is an error naming the flag."""
    items = [t.strip() for t in text.split(sep) if t.strip()]
    try:
        out = [int(t) for t in items]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected integers >= 1 separated by {sep!r}")
    if not out or min(out) < 1:
        ap.error(f"{flag} {text!r}: expected integers >= 1 separated by {sep!r}")
    return out


def out_file(ap: argparse.ArgumentParser, flag: str, path, suffix: str | None = None) -> Path:
    """Check that a file can be written at `path` (creating its missing folders now)."""
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        ap.error(f"{flag} {path}: expected a {suffix} file name")
    if p.is_dir():
        ap.error(f"{flag} {path}: is a directory, expected a file path")
    _make_dir(ap, flag, path, p.parent)
    if p.exists() and not os.access(p, os.W_OK):
        ap.error(f"{flag} {path}: not writable")
    return p


def out_dir(ap: argparse.ArgumentParser, flag: str, path) -> Path:
    """Check that files can be written in the folder `path` (creating it now if missing)."""
    p = Path(path)
    _make_dir(ap, flag, path, p)
    return p


def _make_dir(ap, flag, given, d: Path) -> None:
    for q in (d, *d.parents):
        if q.exists():
            if not q.is_dir():
                ap.error(f"{flag} {given}: {q} is a file, not a folder")
            break
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"{flag} {given}: cannot create the folder {d} ({e.strerror or e})")
    if not os.access(d, os.W_OK | os.X_OK):
        ap.error(f"{flag} {given}: the folder {d} is not writable")


def device(ap: argparse.ArgumentParser, flag: str, value: str | None):
    """torch.device of --device (None: cuda when available, else cpu); cpu or cuda only, and
    cuda only where CUDA is available."""
    import torch

    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        ap.error(f"{flag} {value!r}: expected cpu or cuda")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"{flag} {value!r}: expected cpu or cuda")
    if dev.type == "cuda":
        require_cuda(ap, flag, value)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            ap.error(f"{flag} {value}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def require_cuda(ap: argparse.ArgumentParser, flag: str, value: str = "cuda") -> None:
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        ap.error(f"{flag} {value}: CUDA is not available here (torch {torch.__version__}, {build})")


def r1vl_commit() -> str | None:
    """This tree's commit: git's, else R1VL_COMMIT (the device machine's copy of the tree has no
    .git: bench/NOTES.md's commands pass it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("R1VL_COMMIT") or None
