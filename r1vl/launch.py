"""What a torchrun worker does first, before its heavy imports: no torch here."""
from __future__ import annotations

import os
import sys


def die_with_launcher() -> bool:
    """Under torchrun on Linux: have the kernel SIGKILL this process when its launcher (torchrun's
    agent, the parent) dies. A torchrun killed with SIGKILL (or OOM-killed) could not stop its
    workers: they went on, holding the GPUs and the output_dir's lock, until each was killed by
    hand. The graceful paths are unchanged: a torchrun that is signalled passes the signal on and
    waits for its workers (30 s) before it exits. Called at the top of `python -m r1vl.train` and
    `r1vl.eval` (a launcher killed during the imports is seen) and again by init_distributed.
    True when set up."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return die_with_parent(os.getppid())


def die_with_parent(parent: int) -> bool:
    """Linux: have the kernel SIGKILL this process when its parent, pid `parent`, dies (prctl's
    PR_SET_PDEATHSIG); SIGKILLed now if it is gone already. False where there is no prctl."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):  # no prctl here
        return False
    # the parent died between its pid's read and the prctl: no signal will come. (One that died
    # before is not seen by die_with_launcher: it runs first thing for that. Parent pid 1 is no
    # sign: torchrun may be a container's first process.)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return True
