"""Writing a file whole or not at all (outputs users keep: key-step files, evaluation results)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


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
