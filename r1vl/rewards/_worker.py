"""A reward worker process: `python -m r1vl.rewards._worker READ_FD WRITE_FD [PARENT_PID]` (started by pool.py).

It is a plain interpreter started with subprocess, not a multiprocessing child:
the caller's `__main__` is never re-imported (no `if __name__ == "__main__"`
guard needed in user scripts) and nothing is forked from a process with
threads. It scores each received task in its main thread, so the signal-based
math-verify deadline works, and answers every task as soon as it is scored.
"""
from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection

_PARENT_CHECK_S = 2.0


def main(read_fd: int, write_fd: int, parent: int | None = None) -> None:
    # A terminal's Ctrl-C reaches the whole process group, and a scheduler may signal every
    # process (SIGTERM, SIGUSR1); the trainer then finishes its step and saves (or stops), and
    # closes the pool itself. A worker that died of it would have its completion scored without
    # math-verify. The pool stops workers with SIGKILL; orphaned ones stop by themselves (below).
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    try:
        from r1vl.rewards.pool import _score_one
        from r1vl.rewards.verify import healthy, warm_up

        warm_up()  # import math-verify and sympy before saying ready
        outbox.send(("ready", os.getpid()))
        # the pool's process, as it said (taken here, after the start-up, a parent that died during
        # it was missed: the worker took init for its parent and ran on while its pipes were held)
        parent = os.getppid() if parent is None else parent
        while True:
            if not inbox.poll(_PARENT_CHECK_S):
                if os.getppid() != parent:  # orphaned (the pool's process died): stop
                    break
                continue
            msg = inbox.recv()
            if msg is None:  # close(): exit now, skipping the interpreter's teardown (sympy's: ~0.5 s)
                os._exit(0)
            tasks, alpha, variant, timeout_s = msg
            for task in tasks:
                result = _score_one(task, alpha, variant, timeout_s)
                outbox.send((task[0], result))
                if result[4] and not healthy():
                    # a deadline left math-verify/sympy in a broken state: say so and exit;
                    # the pool re-queues the rest of the chunk and starts a fresh worker
                    outbox.send(("recycle", os.getpid()))
                    sys.exit(3)
    except (EOFError, BrokenPipeError):
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
