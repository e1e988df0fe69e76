"""Writing a file whole or not at all (outputs users keep: key-step files, evaluation results),
and saying so when a save failed for want of space."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# a checkpoint's trainer state (optimizer, scheduler, RNG, data position): the file that makes a
# directory an r1vl checkpoint (here, not in r1vl.utils, for the CLI's torch-free checks)
STATE_FILE = "trainer_state.pt"


def write_replace(path: str | Path, parts: str | Iterable[str]) -> None:
    """Write `parts` (a string, or strings in order) to a temporary file beside `path`, synced,
    then rename it over `path`: a failure or Ctrl-C leaves `path` as it was and no temporary
    behind; a replaced file keeps its permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    made = False
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            made = True
            for part in [parts] if isinstance(parts, str) else parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if made:  # never another process's file of that name
            tmp.unlink(missing_ok=True)
        raise


class DiskFullError(OSError):
    """A save that failed because its file system is full (or over quota): names the path."""


FULL_BYTES = 16 << 20  # less free than this after a short write: the disk filled up
# torch.save's errors on a short write, which name no errno
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def disk_full_oserror(e: BaseException) -> OSError | None:
    """The OSError of a full disk or quota (ENOSPC, EDQUOT) in `e`'s chain, if any."""
    x: BaseException | None = e
    while x is not None:
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        x = x.__cause__ or x.__context__
    return None


def disk_full_error(path: str | Path, e: BaseException) -> DiskFullError | None:
    """`e`, raised while writing `path`, as a DiskFullError when it came from a full disk: ENOSPC
    or EDQUOT in its chain, or torch.save's short-write error with under FULL_BYTES free beside
    `path` (not any error there: a mount that reports no free space keeps its own). None
    otherwise. Call it before the partial copy is removed (that frees the space again)."""
    full = disk_full_oserror(e)
    why = None if full is None else os.strerror(full.errno)
    if why is None and "No space left on device" in str(e):  # safetensors' Rust error carries it as text
        why = "No space left on device"
    parent = Path(path).parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = None
    if why is None and (free is None or free >= FULL_BYTES or not any(m in str(e) for m in _SHORT_WRITE)):
        return None
    left = "" if free is None else f", {free / 2**20:.1f} MiB free there"
    return DiskFullError(errno.ENOSPC, f"writing {path}: {why or 'the disk is full'}{left} ({type(e).__name__}: "
                                       f"{str(e).strip()[:300]}); the previous copy, if any, is intact: free "
                                       "some space (fewer checkpoints: train.keep_checkpoints) and continue with "
                                       "train.resume=true")


@contextmanager
def saying_disk_full(path: str | Path) -> Iterator[None]:
    """Around the writing of `path`: an error from a full disk leaves as a DiskFullError naming
    it (disk_full_error); any other as it was."""
    try:
        yield
    except Exception as e:
        full = disk_full_error(path, e)
        if full is not None:
            raise full from e
        raise
