"""`score_batch`: StepRAR + StepRVR for many completions, in a pool of worker processes.

Each worker is a separate interpreter (`r1vl.rewards._worker`) that scores one completion at a time in its
main thread, so math-verify runs under the signal-based per-call deadline of
`verify.py` (soft timeout: the call is abandoned, the completion counts as
"not verified", the worker carries on). Workers report every completion as
soon as it is scored; a worker silent for longer than a hard deadline
(`timeout_s` + a grace period) is stuck somewhere a signal cannot reach (C
code) or has died: it is killed and replaced, the completion it was on is
scored without math-verify (counted as a timeout) and the rest of its chunk is
re-queued. So a batch always finishes, in bounded time, with one result per
completion (unless the pool's workers cannot start, or it is closed under the
batch: see `score_batch`, `RewardPool.close`).

Pools are created on first use and kept (one per worker count) until
`close_pools()` or interpreter exit; the first batch pays the workers' start-up
(importing sympy, about a second, in parallel).
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Mapping, Sequence

from r1vl.rewards.core import (
    DEFAULT_ALPHA,
    VARIANTS,
    AccuracyResult,
    accuracy_details,
    as_text,
    key_step_groups,
    validity_reward,
)
from r1vl.rewards.verify import DEFAULT_TIMEOUT_S, needs_worker_process, signals_usable

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 120.0
# the directory holding the r1vl package, put on the workers' PYTHONPATH
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MIN_GRACE_S = 2.0

# One scored completion: (accuracy, validity, k, correct, timed_out)
_Result = tuple[float, float, float, bool, bool]

# One task: (index, completion, solution, key-step groups)
_Task = tuple[int, str, str, list]


def platform_problem(platform: str | None = None) -> str | None:
    """Why rewards cannot be scored with deadlines on `platform` (default: this one), or None.
    The workers are handed pipe descriptors (subprocess's pass_fds) and the in-process deadline
    is a signal timer: Windows has neither. The trainer and the evaluation check this at start,
    before a warm-up or a decoding pass that would end in a failed first scoring."""
    here = platform is None
    platform = platform or sys.platform
    if platform.startswith("win"):
        return (f"rewards cannot be scored on {platform}: the reward workers are handed pipe descriptors "
                "(subprocess pass_fds) and math-verify's deadline is a signal timer, which Windows lacks; "
                "train and evaluate on Linux or macOS (r1vl.kernels, the loss, runs here)")
    return math_verify_problem() if here else None


def math_verify_problem() -> str | None:
    """Why the installed math-verify cannot score answers, or None. Below 0.8 its parse and
    verify take no None for their own timeouts, which r1vl turns off (its deadline wraps the
    whole computation): each call failed inside math-verify, was swallowed there, and every
    answer that needs math-verify scored wrong, silently (setup.py asks for 0.8, but an
    environment built otherwise may hold 0.7)."""
    import re
    from importlib import metadata

    try:
        found = metadata.version("math-verify")
    except metadata.PackageNotFoundError:
        return "math-verify is not installed: pip install 'math-verify>=0.8,<0.10'"
    parts = tuple(int(x) for x in re.findall(r"\d+", found)[:2])
    if parts < (0, 8):
        return (f"math-verify {found} is installed, and r1vl needs 0.8 or newer: under 0.8 every answer that "
                "needs math-verify is scored wrong without an error; pip install 'math-verify>=0.8,<0.10'")
    return None


def _score_one(task: _Task, alpha: float, variant: str, timeout_s: float | None,
               use_math_verify: bool = True) -> _Result:
    _, completion, solution, groups = task
    acc = accuracy_details(completion, solution, groups, alpha=alpha, variant=variant,
                           timeout_s=timeout_s, use_math_verify=use_math_verify)
    return (acc.reward, validity_reward(completion), acc.key_step_fraction, acc.correct, acc.timed_out)


def _send_within(conn: Connection, obj, timeout_s: float | None) -> bool:
    """conn.send(obj), in Connection's framing, giving up once the pipe has not taken the rest
    for `timeout_s` (None: blocking): a worker that stopped reading (stopped, stuck before its
    next recv) blocked the parent for ever once a message outgrew the pipe's buffer. False on
    giving up: the message may be partly written, so the worker must be replaced."""
    if timeout_s is None:
        conn.send(obj)
        return True
    buf = bytes(ForkingPickler.dumps(obj))
    head = struct.pack("!i", len(buf)) if len(buf) <= 0x7FFFFFFF else struct.pack("!iQ", -1, len(buf))
    data = memoryview(head + buf)
    fd = conn.fileno()
    deadline = time.monotonic() + timeout_s
    os.set_blocking(fd, False)
    try:
        while data:
            try:
                data = data[os.write(fd, data):]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [fd], [], left)
    finally:
        os.set_blocking(fd, True)
    return True


class RewardPoolError(RuntimeError):
    """score_batch off the main thread: the pool failed, and scoring in this thread instead would
    have no math-verify deadline. The same call on the main thread falls back to scoring there."""


@dataclass
class _Worker:
    process: subprocess.Popen
    inbox: Connection  # results from the worker
    outbox: Connection  # tasks to the worker
    ready: bool = False
    recycling: bool = False  # announced its exit (broken math-verify state): nothing to blame
    pending: deque = field(default_factory=deque)  # tasks sent, not yet answered
    last_heard: float = 0.0
    spawned: float = field(default_factory=time.monotonic)  # its start-up limit counts from here


class RewardPool:
    """A fixed number of reward worker processes with soft and hard per-completion deadlines."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"RewardPool needs workers >= 1, got {workers}")
        self.size = workers
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [self._spawn() for _ in range(workers)]  # None: to start again
        self.killed = 0  # workers killed at their hard deadline, over the pool's life
        # workers that ended before their start-up since one last started (a worker's "ready" resets it):
        # over 3 x workers, a batch fails rather than start them for ever. Counted over the pool's life,
        # a few deaths at start-up a day (the OOM killer) failed every later one's batch after a week
        self._start_failures = 0
        self._pid = os.getpid()
        self._closing = False  # set by close(): a map running in another thread gives up

    def _spawn(self) -> _Worker:
        task_r, task_w = os.pipe()  # parent -> worker
        res_r, res_w = os.pipe()  # worker -> parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        inbox, outbox = Connection(res_r, writable=False), Connection(task_w, readable=False)
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "r1vl.rewards._worker", str(task_r), str(res_w), str(os.getpid())],
                    pass_fds=(task_r, res_w), stdin=subprocess.DEVNULL, env=env,
                )
            finally:
                os.close(task_r)
                os.close(res_w)
            return _Worker(process=proc, inbox=inbox, outbox=outbox, last_heard=time.monotonic())
        except BaseException:
            # interrupted once the worker may run (a Ctrl-C in Popen): its pipes closed here, it
            # ends at their end (left open, owned by nothing, it waited on them for our life)
            inbox.close()
            outbox.close()
            raise

    @staticmethod
    def _end(w: _Worker) -> None:
        """Kill the worker's process and reap it; its pipes stay open (what it wrote is still there)."""
        try:
            w.process.kill()
            w.process.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _close_pipes(w: _Worker) -> None:
        for c in (w.inbox, w.outbox):
            try:
                c.close()
            except OSError:
                pass

    @staticmethod
    def _kill(w: _Worker) -> None:
        RewardPool._end(w)
        RewardPool._close_pipes(w)

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked child: the workers are its parent's
            return
        # a map in another thread (a trainer's background scoring, left behind by an error or a
        # second Ctrl-C) holds the lock until its batch is scored: told to give up, it lets go
        # at its next wake-up (within a second) instead
        self._closing = True
        with self._lock:
            self._workers = [w for w in self._workers if w is not None]
            for w in self._workers:
                try:
                    w.outbox.send(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 2  # for them all: a worker that does not exit (starting,
            for w in self._workers:          # stuck) held the close 2 s apiece
                try:
                    w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                self._kill(w)
            self._workers = []

    def map(self, tasks: Sequence[_Task], *, alpha: float, variant: str,
            timeout_s: float | None) -> tuple[list[_Result], int]:
        """Score tasks; returns (results in task order, number of hard kills)."""
        # before the lock: a child forked while another thread's map held it inherits it held
        if os.getpid() != self._pid:
            raise RuntimeError("a RewardPool belongs to the process that made it (this is a fork)")
        with self._lock:
            try:
                return self._map(list(tasks), alpha, variant, timeout_s)
            except BaseException:
                # interrupted (KeyboardInterrupt, a caller's alarm) or failed: the workers still
                # busy with this batch would answer into the next one (task indices restart at 0),
                # so they are replaced
                self._drop_busy()
                raise

    def _drop_busy(self) -> None:
        # killed now, started again by the next map (not here: this may be a Ctrl-C on its way
        # to the interpreter's exit, which would then wait for fresh workers to start)
        for i, w in enumerate(self._workers):
            if w is not None and (w.pending or w.inbox.closed or w.outbox.closed):
                self._kill(w)
                self._workers[i] = None

    def _map(self, tasks: list[_Task], alpha, variant, timeout_s) -> tuple[list[_Result], int]:
        if self._closing:
            raise RuntimeError("the reward pool was closed")
        # an interrupted map's busy workers, where a second interrupt cut its _drop_busy short: their
        # answers to its tasks would land in this batch (indices restart at 0)
        self._drop_busy()
        self._workers = [self._spawn() if w is None else w for w in self._workers]  # dropped by an interrupted map
        n = len(tasks)
        results: list[_Result | None] = [None] * n
        slot = {t[0]: i for i, t in enumerate(tasks)}
        if n == 0:
            return [], 0
        chunk = max(1, min(16, math.ceil(n / (4 * self.size))))
        queue: deque[list[_Task]] = deque(tasks[i:i + chunk] for i in range(0, n, chunk))
        soft = float(timeout_s) if timeout_s and timeout_s > 0 else 0.0
        hard = soft + max(_MIN_GRACE_S, soft) if soft else None
        kills = 0
        remaining = n

        def send(i: int, w: _Worker, part: list[_Task]) -> bool:
            # pending first: an interrupt during the write must leave the worker counted as busy
            # (replaced by _drop_busy), not idle with tasks of this batch in its pipe
            w.pending.extend(part)
            try:
                sent = _send_within(w.outbox, (part, alpha, variant, timeout_s), hard)
            except (OSError, ValueError):
                for _ in part:
                    w.pending.pop()
                return False
            if not sent:  # not reading: replaced, its tasks (none of them to blame) queued again
                logger.warning("reward worker %s took no task for %.1fs: replaced", w.process.pid, hard)
                w.recycling = True
                replace(i, w, "not reading")
                return True
            w.last_heard = time.monotonic()
            return True

        def receive(w: _Worker) -> bool:
            """Take every message w has written so far; True at the pipe's end (or an error)."""
            nonlocal remaining
            conn = w.inbox
            try:
                while conn.poll():  # drain everything this worker has sent: fewer wake-ups
                    msg = conn.recv()
                    w.last_heard = time.monotonic()
                    if msg[0] == "ready":
                        w.ready = True
                        self._start_failures = 0
                    elif msg[0] == "recycle":
                        w.recycling = True
                    else:
                        idx, res = msg
                        if w.pending and w.pending[0][0] == idx:
                            w.pending.popleft()
                        if idx in slot and results[slot[idx]] is None:
                            results[slot[idx]] = res
                            remaining -= 1
            except (EOFError, OSError):
                return True
            return False

        def replace(i: int, w: _Worker, reason: str) -> None:
            nonlocal kills, remaining
            self._workers[i] = None  # until its successor runs: an interrupt here leaves no dead worker
            self._end(w)
            if not w.inbox.closed:
                # what it wrote before its end, seen by its exit status or its silence before its
                # messages were read (its answers, "recycle"): not blamed on the completions they answer
                receive(w)
            self._close_pipes(w)
            if not w.ready:
                # it ended before its start-up did, seen by its exit status or by its pipe's end
                # (counted on the exit status alone, a worker whose end the pipe showed first, as
                # a Python one failing at import always did, was started again for ever)
                self._start_failures += 1
                if self._start_failures > 3 * self.size:
                    raise RuntimeError("reward workers keep exiting at start-up "
                                       f"(exit code {w.process.returncode})")
            if w.recycling and w.pending:
                queue.appendleft(list(w.pending))
            elif w.pending:
                stuck = w.pending.popleft()
                logger.warning("reward worker %s (%s): completion %d scored without math-verify",
                               w.process.pid, reason, stuck[0])
                results[slot[stuck[0]]] = _score_one(stuck, alpha, variant, timeout_s,
                                                     use_math_verify=False)
                remaining -= 1
                kills += 1
                if w.pending:
                    queue.appendleft(list(w.pending))
            self._workers[i] = self._spawn()

        while remaining > 0:
            if self._closing:
                raise RuntimeError("the reward pool was closed while it scored a batch")
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and not w.pending and queue:
                    part = queue.popleft()
                    if not send(i, w, part):
                        queue.appendleft(part)
            # from each worker's own start (a worker replaced late in a long batch is new, not late)
            if not any(w.ready for w in self._workers) and all(now - w.spawned > _STARTUP_TIMEOUT_S
                                                               for w in self._workers):
                raise RuntimeError(f"no reward worker started within {_STARTUP_TIMEOUT_S:.0f}s")
            # wait for a message, at most until the nearest hard deadline
            wait_s = 1.0
            if hard is not None:
                for w in self._workers:
                    if w.pending:
                        wait_s = min(wait_s, max(0.0, w.last_heard + hard - now))
            conns = {w.inbox: i for i, w in enumerate(self._workers)}
            asleep = time.monotonic()
            readable = wait(list(conns), timeout=wait_s)
            # time this process did not run past the wait it asked for (stopped with its workers:
            # Ctrl-Z, a scheduler's suspend) is not their silence: counted, every busy worker
            # was killed at its hard deadline on resuming, though none had had a moment to run
            # (not a timer's few ms late: those, added at each deadline, would make it spin);
            # nor is it start-up time: a worker still importing when the job stopped was held to
            # the start-up limit on resuming, and with no worker ready the batch failed
            lost = time.monotonic() - asleep - wait_s
            if lost > 0.25:
                for w in self._workers:
                    w.last_heard += lost
                    w.spawned += lost
            for conn in readable:
                i = conns[conn]
                w = self._workers[i]
                if receive(w):
                    replace(i, w, "died")
            if hard is not None:
                now = time.monotonic()
                for i, w in enumerate(self._workers):
                    if w.pending and now - w.last_heard > hard:
                        replace(i, w, f"silent for more than {hard:.1f}s")
            for i, w in enumerate(self._workers):
                if w.process.poll() is not None:
                    replace(i, w, "exited")
        self.killed += kills
        return results, kills  # type: ignore[return-value]


_pools: dict[int, RewardPool] = {}
_pools_lock = threading.Lock()


def get_pool(workers: int) -> RewardPool:
    """The shared pool with `workers` processes (created on first use)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = RewardPool(workers)
        return pool


def close_pools() -> None:
    """Stop every shared reward pool (also done at interpreter exit)."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


atexit.register(close_pools)


def _forget_pools_in_child() -> None:
    """After os.fork(): the pools' workers belong to the parent. The child must neither send
    them tasks (their answers would reach the parent's next batch) nor stop them at its exit
    (close_pools from atexit); it starts its own pools when it scores."""
    global _pools_lock
    _pools_lock = threading.Lock()  # another thread may have held it at the fork
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)

# A one-process pool that runs StepRAR for callers off the main thread (no signals there).
_SANDBOX_WORKERS = -1


def sandbox_accuracy(completion: Any, solution: Any, key_steps: Any, *, alpha: float,
                     variant: str, timeout_s: float | None) -> AccuracyResult:
    with _pools_lock:
        pool = _pools.get(_SANDBOX_WORKERS)
        if pool is None:
            pool = _pools[_SANDBOX_WORKERS] = RewardPool(1)
    task = (0, as_text(completion), as_text(solution), key_step_groups(key_steps))
    (res,), _ = pool.map([task], alpha=alpha, variant=variant, timeout_s=timeout_s)
    return AccuracyResult(res[0], res[2], res[3], res[4])


def default_workers() -> int:
    """min(4, CPUs available to this process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _weights(weights: Any) -> tuple[float, float]:
    if isinstance(weights, Mapping):
        unknown = set(weights) - {"accuracy", "validity"}
        if unknown:
            raise ValueError(f"weights: unknown keys {sorted(unknown)}; expected 'accuracy', 'validity'")
        return float(weights.get("accuracy", 1.0)), float(weights.get("validity", 1.0))
    w = tuple(weights)
    if len(w) != 2:
        raise ValueError(f"weights must be (w_acc, w_val), got {weights!r}")
    return float(w[0]), float(w[1])


def score_batch(completions: Sequence[Any], solutions: Sequence[Any], key_steps: Sequence[Any] | None = None,
                *, weights: Any = (1.0, 1.0), workers: int | None = None,
                timeout_s: float | None = DEFAULT_TIMEOUT_S, alpha: float = DEFAULT_ALPHA,
                variant: str = "paper") -> dict[str, list[float]]:
    """Score completion i against solutions[i] / key_steps[i] (lists of equal length).

    Returns, per completion (lists in input order):
      "accuracy"  StepRAR        "validity"  StepRVR
      "total"     w_acc*StepRAR + w_val*StepRVR
      "key_steps" k (fraction of key-step groups matched)
      "correct"   1.0 if the answer was judged right
      "timed_out" 1.0 if math-verify hit its deadline, or an item whose worker was killed needed
                  it (rescored without it; an answer read without math-verify keeps its score)
    and the batch counts "num_timeouts" = [sum of timed_out] and
    "num_killed" = [workers killed at the hard deadline], as one-element lists.

    weights: (w_acc, w_val) or {"accuracy": w, "validity": w}; both 1 as in the paper.
    workers: processes (default min(4, CPUs)); 0 scores in this process
    (signal deadlines; off the main thread that falls back to the sandbox).
    timeout_s: per-completion math-verify deadline; None or 0 disables it
    (and with it the hard deadline) -- only for trusted input.
    Equal, item by item, to `accuracy_reward` / `validity_reward`.
    A pool that fails (its workers cannot start) is replaced by scoring in this process,
    except off the main thread with a deadline, where that would have none: RewardPoolError
    then says to score on the main thread.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n = len(completions)
    if len(solutions) != n:
        raise ValueError(f"score_batch: {n} completions but {len(solutions)} solutions")
    if key_steps is None:
        key_steps = [None] * n
    elif len(key_steps) != n:
        raise ValueError(f"score_batch: {n} completions but {len(key_steps)} key_steps")
    w_acc, w_val = _weights(weights)
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    tasks = [(i, as_text(c), as_text(s), key_step_groups(k))
             for i, (c, s, k) in enumerate(zip(completions, solutions, key_steps))]

    kills = 0
    if n and workers == 0 and needs_worker_process(timeout_s):
        # no signal deadline off the main thread, or a deadline left math-verify broken in this
        # process (as accuracy_reward): use a worker process
        workers = 1
    if workers == 0 or n == 0:
        results = [_score_one(t, alpha, variant, timeout_s) for t in tasks]
    else:
        try:
            results, kills = get_pool(workers).map(tasks, alpha=alpha, variant=variant,
                                                   timeout_s=timeout_s)
        except RuntimeError as e:
            if timeout_s and timeout_s > 0 and not signals_usable():
                # in-process scoring here would run math-verify without its deadline (signals are
                # the main thread's): the caller scores on its main thread instead
                raise RewardPoolError(f"reward pool failed ({e}); off the main thread math-verify has no "
                                      "deadline in this process: score these on the main thread") from e
            logger.exception("reward pool failed; scoring %d completions in this process", n)
            results = [_score_one(t, alpha, variant, timeout_s) for t in tasks]

    acc = [r[0] for r in results]
    val = [r[1] for r in results]
    timed_out = [1.0 if r[4] else 0.0 for r in results]
    return {
        "accuracy": acc,
        "validity": val,
        "total": [w_acc * a + w_val * v for a, v in zip(acc, val)],
        "key_steps": [r[2] for r in results],
        "correct": [1.0 if r[3] else 0.0 for r in results],
        "timed_out": timed_out,
        "num_timeouts": [float(sum(timed_out))],
        "num_killed": [float(kills)],
    }
