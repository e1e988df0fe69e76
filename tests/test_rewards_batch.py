"""score_batch: equal to the per-item functions, in any worker configuration, and it always finishes."""
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from r1vl.rewards import accuracy_reward, score_batch, validity_reward
from r1vl.rewards.pool import RewardPool, get_pool

SOL = ("### Image Description:\nTwo numbers: 4 and 3.\n### Rationales:\nAdd.\n### Let's think step by step.\n"
       "### Step 1:\nThe numbers are 4 and 3.\n### Step 2:\n4 + 3 = 7.\n### The final answer is: 7")
KS = {"Steps": [["4 and 3"], ["4 + 3 = 7", "4+3=7"]]}


def completions():
    out = [SOL, SOL.replace(": 7", ": 7.0"), SOL.replace(": 7", ": 8"), SOL.replace(": 7", ": eight"),
           SOL.replace("### The final answer is: 7", ""), SOL.replace("### Step 2:", "### Step 3:"),
           "", "\ud800 surrogate", "### The final answer is: \\frac{14}{2}", "garbage " * 50,
           SOL.replace("4 + 3 = 7", "4+3=7")]
    return out * 2 + ["### The final answer is: $2^{2^{2^{30}}}$"]  # the last one hits the deadline


def per_item(cs, sols, kss, variant, timeout_s=0.3):
    acc = [accuracy_reward(c, s, k, variant=variant, timeout_s=timeout_s) for c, s, k in zip(cs, sols, kss)]
    val = [validity_reward(c) for c in cs]
    return acc, val


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("workers", [0, 2])
def test_equals_per_item_functions(variant, workers):
    cs = completions()
    sols = [SOL] * len(cs)
    kss = ([KS, None, [["4 + 3 = 7"]]] * len(cs))[:len(cs)]
    res = score_batch(cs, sols, kss, workers=workers, timeout_s=0.3, variant=variant)
    acc, val = per_item(cs, sols, kss, variant)
    assert res["accuracy"] == pytest.approx(acc)
    assert res["validity"] == val
    assert res["total"] == pytest.approx([a + v for a, v in zip(acc, val)])
    n = len(cs)
    assert all(len(res[k]) == n for k in ("accuracy", "validity", "total", "key_steps", "correct", "timed_out"))
    # the $2^{2^{2^{30}}}$ answers hit the deadline: counted, scored as not verified
    assert res["num_timeouts"] == [sum(res["timed_out"])]
    if variant == "paper":
        assert res["timed_out"][-1] == 1.0
    assert res["num_killed"] == [0.0]


def test_weights_alpha_and_argument_errors():
    res = score_batch([SOL], [SOL], [KS], weights=(2.0, 0.5), workers=0, alpha=0.3)
    assert res["accuracy"] == [pytest.approx(1.3)] and res["total"] == [pytest.approx(2 * 1.3 + 0.5)]
    res = score_batch([SOL], [SOL], None, weights={"validity": 0.0}, workers=0)
    assert res["total"] == [1.0] and res["key_steps"] == [0.0] and res["correct"] == [1.0]
    with pytest.raises(ValueError, match="solutions"):
        score_batch([SOL], [], None)
    with pytest.raises(ValueError, match="key_steps"):
        score_batch([SOL], [SOL], [KS, KS])
    with pytest.raises(ValueError, match="weights"):
        score_batch([SOL], [SOL], None, weights={"acc": 1.0})
    with pytest.raises(ValueError, match="variant"):
        score_batch([SOL], [SOL], None, variant="x")
    assert score_batch([], [], [], workers=2)["total"] == []


def test_off_the_main_thread():
    out = {}

    def run():
        out["res"] = score_batch([SOL.replace(": 7", ": 7.0")], [SOL], [KS], workers=0, timeout_s=2.0)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert out["res"]["accuracy"] == [pytest.approx(1.1)]


def _wait_ready(pool, timeout=120):
    deadline = time.monotonic() + timeout
    pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=5.0)  # waits for a ready worker
    while time.monotonic() < deadline and not all(w.ready or _poll_ready(w) for w in pool._workers):
        time.sleep(0.05)


def _poll_ready(w):
    if w.inbox.poll():
        msg = w.inbox.recv()
        w.ready = msg[0] == "ready"
    return w.ready


def test_a_stuck_worker_is_killed_and_the_batch_completes():
    pool = RewardPool(2)
    try:
        _wait_ready(pool)
        victim = pool._workers[0].process.pid
        os.kill(victim, signal.SIGSTOP)  # like a worker stuck in C code: no signal handler runs
        cs = [SOL.replace(": 7", f": {i}.5") for i in range(12)]  # not plain integers: math-verify needed
        t0 = time.monotonic()
        results, kills = pool.map([(i, c, SOL, [["4 and 3"]]) for i, c in enumerate(cs)],
                                  alpha=0.1, variant="paper", timeout_s=0.5)
        assert time.monotonic() - t0 < 60
        assert kills == 1 and all(r is not None for r in results)
        victim_results = [r for r in results if r[4]]  # the stuck item: scored without math-verify
        assert len(victim_results) == 1 and victim_results[0][0] == pytest.approx(0.1)
        expected = [accuracy_reward(c, SOL, [["4 and 3"]]) for c in cs]
        for r, e in zip(results, expected):
            if not r[4]:
                assert r[0] == pytest.approx(e)
        assert all(w.process.pid != victim for w in pool._workers)
    finally:
        pool.close()


def test_a_worker_replaced_late_in_a_batch_has_its_own_start_up_time(monkeypatch):
    """The start-up limit counted from the batch's start: one worker killed at its hard deadline
    past that limit, its successor (not started yet) ended the batch with "no reward worker
    started", and score_batch rescored the whole batch in-process, without a hard deadline."""
    from r1vl.rewards import pool as pool_mod

    pool = RewardPool(1)
    try:
        t0 = time.monotonic()
        _wait_ready(pool)  # under the default (120 s) limit
        # the limit: well above this machine's start-up now; the hard deadline (2 * timeout_s) past it
        limit = max(5.0, 3 * (time.monotonic() - t0))
        monkeypatch.setattr(pool_mod, "_STARTUP_TIMEOUT_S", limit)
        os.kill(pool._workers[0].process.pid, signal.SIGSTOP)  # killed at its hard deadline: 2 * limit
        cs = [SOL.replace(": 7", f": {i}.5") for i in range(3)]
        results, kills = pool.map([(i, c, SOL, [["4 and 3"]]) for i, c in enumerate(cs)],
                                  alpha=0.1, variant="paper", timeout_s=limit)
        assert kills == 1 and all(r is not None for r in results)
    finally:
        pool.close()


def test_a_worker_that_stops_reading_its_tasks_is_replaced_in_bounded_time():
    """The parent wrote a chunk of tasks to an idle worker's pipe with a blocking write, outside
    any deadline: a worker not reading (stopped here) blocked the batch for ever once the chunk
    outgrew the pipe's buffer (64 KiB). The write now gives up at the hard deadline."""
    pool = RewardPool(2)
    try:
        _wait_ready(pool)
        os.kill(pool._workers[0].process.pid, signal.SIGSTOP)
        long_sol = SOL.replace("### Step 2:", "### Step 2:\n" + "word " * 2000 + "\n")  # 8 tasks: 160 kB
        tasks = [(i, long_sol.replace(": 7", f": {i}.5"), long_sol, [["4 and 3"]]) for i in range(64)]
        out = {}
        t = threading.Thread(target=lambda: out.update(r=pool.map(tasks, alpha=0.1, variant="paper",
                                                                  timeout_s=0.5)), daemon=True)
        t.start()
        t.join(90)
        blocked = t.is_alive()
        if blocked:  # let the write fail (EPIPE) so that the thread gives the pool's lock back
            for w in pool._workers:
                w.process.kill()
            t.join(30)
        assert not blocked, "the batch blocked writing to a worker that does not read"
        results, kills = out["r"]
        assert kills == 0  # no item is to blame
        assert [r[0] for r in results] == pytest.approx([accuracy_reward(c, s, k) for _, c, s, k in tasks])
    finally:
        pool.close()


def test_a_dead_worker_is_replaced():
    pool = RewardPool(1)
    try:
        _wait_ready(pool)
        os.kill(pool._workers[0].process.pid, signal.SIGKILL)
        results, _ = pool.map([(i, SOL, SOL, []) for i in range(5)], alpha=0.1, variant="paper", timeout_s=2.0)
        assert [r[0] for r in results] == [1.0] * 5
    finally:
        pool.close()


def test_shared_pool_is_reused():
    assert get_pool(2) is get_pool(2)


def test_workers_exit_when_their_parent_dies(tmp_path):
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from r1vl.rewards.pool import RewardPool\n"
            "p = RewardPool(1)\n"
            "p.map([(0, 'a', 'a', [])], alpha=0.1, variant='paper', timeout_s=2.0)\n"
            "print(p._workers[0].process.pid, flush=True)\n"
            "os._exit(0)\n")  # no atexit: the worker is orphaned
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[-1])
    if not _ends_within(pid, 30):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("an orphaned reward worker kept running")


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` is gone within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


# a Python stand-in's start (os and sys imported): its pipes from the worker's arguments, and "ready"
_STAND_IN_READY = ("from multiprocessing.connection import Connection\n"
                   "inbox = Connection(int(sys.argv[3]), writable=False)\n"
                   "outbox = Connection(int(sys.argv[4]), readable=False)\n"
                   "outbox.send(('ready', os.getpid()))\n")


def _stand_in_worker(monkeypatch, path, script: str) -> None:
    """The pool starts `script` (written to `path`, made executable) in its workers' place, with
    the worker's arguments (`-m r1vl.rewards._worker READ_FD WRITE_FD PARENT_PID`)."""
    from r1vl.rewards import pool as pool_mod

    path.write_text(script)
    path.chmod(0o755)
    monkeypatch.setattr(pool_mod, "sys", types.SimpleNamespace(executable=str(path), platform=sys.platform))


# Each completion below needs math-verify (\frac{2i}{2} against i): right answers, so a result
# that leaked from one batch into the next shows as a 1 where the next batch expects 0.
def _right(n):
    return [SOL.replace(": 7", f": \\frac{{{2 * i}}}{{2}}") for i in range(n)], [str(i) for i in range(n)]


def test_an_interrupted_batch_leaves_nothing_for_the_next(monkeypatch):
    """A batch interrupted while workers hold its tasks (Ctrl-C caught in a notebook, a caller's
    alarm): those workers are replaced, so their answers never land in the next batch, whose
    task indices start at 0 again (they did: old results taken as new, or a KeyError)."""
    from r1vl.rewards import pool as pool_mod

    pool = RewardPool(2)
    try:
        _wait_ready(pool)
        _wait_ready_all(pool)
        real_wait = pool_mod.wait

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(pool_mod, "wait", interrupted)
        cs, sols = _right(64)
        with pytest.raises(KeyboardInterrupt):
            pool.map([(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))], alpha=0.1, variant="paper",
                     timeout_s=3.0)
        monkeypatch.setattr(pool_mod, "wait", real_wait)
        time.sleep(1.0)  # time for any worker left with the old tasks to answer them
        wrong = [(i, SOL.replace(": 7", ": wrong"), "12345", []) for i in range(64)]
        for _ in range(2):
            results, kills = pool.map(wrong, alpha=0.1, variant="paper", timeout_s=3.0)
            assert [r[3] for r in results] == [False] * 64 and kills == 0
    finally:
        pool.close()


def _wait_ready_all(pool, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(w.ready for w in pool._workers) and time.monotonic() < deadline:
        pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=2.0)


def test_a_forked_child_neither_uses_nor_stops_the_parents_pool():
    """After os.fork() the child scores with pools of its own and its exit (atexit's
    close_pools) leaves the parent's workers running; it used to send tasks down the inherited
    pipes, whose answers reached the parent's next batch, and to stop the parent's workers."""
    import atexit

    cs, sols = _right(48)
    assert score_batch(cs, sols, workers=2, timeout_s=3.0)["correct"] == [1.0] * 48
    parent_pids = [w.process.pid for w in get_pool(2)._workers]
    pid = os.fork()
    if pid == 0:  # the child: score wrong answers, exit through atexit as a script would
        code = 0
        try:
            res = score_batch([SOL.replace(": 7", ": wrong")] * 48, ["12345"] * 48, workers=2, timeout_s=3.0)
            code = 0 if res["correct"] == [0.0] * 48 else 3
            atexit._run_exitfuncs()
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [w.process.poll() for w in get_pool(2)._workers] == [None, None]
    assert [w.process.pid for w in get_pool(2)._workers] == parent_pids
    res = score_batch(cs, sols, workers=2, timeout_s=3.0)
    assert res["correct"] == [1.0] * 48 and res["num_killed"] == [0.0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_workers_ignore_the_stop_signals(signum):
    """A terminal's Ctrl-C goes to the whole process group, and a scheduler may signal every
    process (SIGTERM, SIGUSR1): the trainer finishes its step on the first one, so the reward
    workers must not die of it (their completions were scored without math-verify)."""
    pool = RewardPool(2)
    try:
        _wait_ready(pool)
        _wait_ready_all(pool)
        pids = [w.process.pid for w in pool._workers]
        for p in pids:
            os.kill(p, signum)
        time.sleep(0.5)
        cs, sols = _right(16)
        results, kills = pool.map([(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))], alpha=0.1,
                                  variant="paper", timeout_s=3.0)
        assert kills == 0 and [r[3] for r in results] == [True] * 16
        assert [w.process.pid for w in pool._workers] == pids
    finally:
        pool.close()


class _Text(str):
    """A str subclass from a module the workers cannot import (a caller's own type)."""


def test_str_subclasses_are_scored_as_text():
    cs, sols = _right(4)
    res = score_batch([_Text(c) for c in cs], [_Text(s) for s in sols], workers=1, timeout_s=3.0)
    assert res["correct"] == [1.0] * 4 and res["num_killed"] == [0.0]


@pytest.mark.parametrize("timeout_s", [float("inf"), 1e12, float("nan")])
@pytest.mark.parametrize("workers", [0, 1])
def test_huge_or_odd_deadlines_mean_no_deadline(timeout_s, workers):
    """setitimer refuses inf and more than ~1e9 s: such a deadline made every answer that needs
    math-verify wrong, with no timeout reported."""
    cs, sols = _right(3)
    res = score_batch(cs, sols, workers=workers, timeout_s=timeout_s)
    assert res["correct"] == [1.0] * 3
    assert accuracy_reward(cs[2], sols[2], timeout_s=timeout_s) == 1.0


def test_in_process_scoring_leaves_a_broken_math_verify(monkeypatch):
    """workers=0 goes to a worker process once a deadline has left math-verify broken here,
    as accuracy_reward does (simulated: math-verify raising, the flag verify._run sets)."""
    import math_verify

    from r1vl.rewards import verify

    cs, sols = _right(2)
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(verify, "_broken", True)
    verify._parse_cache.clear()
    verify._equal_cache.clear()
    assert score_batch(cs, sols, workers=0, timeout_s=3.0)["correct"] == [1.0, 1.0]
    verify._parse_cache.clear()
    verify._equal_cache.clear()


def test_an_empty_key_step_phrasing_matches_nothing():
    """"" is a substring of every text: as a phrasing it matched every completion, even one
    without steps (k = 1); now it matches none, and an empty key-steps value is no key steps."""
    from r1vl.rewards import key_step_fraction
    from r1vl.rewards.core import key_step_groups

    no_steps = "### The final answer is: 7"
    assert key_step_fraction(no_steps, [[""]]) == 0.0
    assert key_step_fraction(no_steps, [["  "], ["7"]]) == 0.0
    assert key_step_fraction(SOL, [["", "4 and 3"], [b""]]) == 0.5
    assert key_step_groups("") == [] and key_step_groups({"Steps": " "}) == []


def test_an_interrupt_between_the_write_and_the_bookkeeping_leaks_nothing(monkeypatch):
    """Tasks already in a worker's pipe when the interrupt lands count as that worker's: it is
    replaced, so its answers never reach the next batch (pending was extended after the write)."""
    from r1vl.rewards import pool as pool_mod

    pool = RewardPool(1)
    try:
        _wait_ready(pool)
        real = pool_mod._send_within

        def write_then_interrupt(conn, obj, timeout_s):
            real(conn, obj, timeout_s)
            monkeypatch.setattr(pool_mod, "_send_within", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(pool_mod, "_send_within", write_then_interrupt)
        cs, sols = _right(8)
        with pytest.raises(KeyboardInterrupt):
            pool.map([(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))], alpha=0.1, variant="paper",
                     timeout_s=3.0)
        time.sleep(1.0)
        wrong = [(i, SOL.replace(": 7", ": wrong"), "12345", []) for i in range(8)]
        results, _ = pool.map(wrong, alpha=0.1, variant="paper", timeout_s=3.0)
        assert [r[3] for r in results] == [False] * 8
    finally:
        pool.close()


def test_an_interrupt_while_a_dead_worker_is_replaced_leaves_a_usable_pool():
    """A worker that died while idle is replaced at the next map; an interrupt during that
    replacement left the dead worker (closed pipes) in place and every later map raised."""
    pool = RewardPool(2)
    try:
        _wait_ready_all(pool)
        victim = pool._workers[1]
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        real_spawn = pool._spawn

        def interrupted():
            raise KeyboardInterrupt

        pool._spawn = interrupted
        with pytest.raises(KeyboardInterrupt):
            pool.map([(i, SOL, SOL, []) for i in range(4)], alpha=0.1, variant="paper", timeout_s=3.0)
        pool._spawn = real_spawn
        for _ in range(2):
            results, _ = pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)
            assert results[0][3] is True
    finally:
        pool.close()


def test_a_failed_pool_is_scored_in_process_on_the_main_thread_and_handed_back_off_it(monkeypatch):
    """Off the main thread, the in-process fallback would run math-verify with no deadline (signals
    are the main thread's): RewardPoolError tells the caller to score on its main thread."""
    from r1vl.rewards import pool as pool_mod

    class Broken:
        def map(self, *a, **k):
            raise RuntimeError("no reward worker started within 120s")

    monkeypatch.setattr(pool_mod, "get_pool", lambda workers: Broken())
    texts, sols = ["### The final answer is: 4", "### The final answer is: 5"], ["4", "4"]
    expected = score_batch(texts, sols, workers=0, timeout_s=5.0)
    assert score_batch(texts, sols, workers=2, timeout_s=5.0) == dict(expected, num_killed=[0.0])
    caught: list[BaseException] = []

    def run():
        try:
            score_batch(texts, sols, workers=2, timeout_s=5.0)
        except BaseException as e:  # noqa: BLE001
            caught.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], pool_mod.RewardPoolError)
    # without a deadline nothing needs a signal: scored in the thread
    assert score_batch(texts, sols, workers=2, timeout_s=None)["total"] == expected["total"]


def test_closing_the_pools_does_not_wait_for_a_batch_scored_in_another_thread():
    """At exit (close_pools, atexit) after an error or a second Ctrl-C, a trainer's background
    scoring may still hold its pool: the close tells it to give up and goes on within about a
    second, where it waited for the whole batch; the thread hears RewardPoolError."""
    from r1vl.rewards.pool import RewardPoolError, close_pools
    from r1vl.utils import Background

    n = 30000  # half a minute or more of scoring in 2 workers
    texts = [f"### Step 1: {i} + 1 = {i + 1}\n### The final answer is: \\frac{{{i}}}{{7}}" for i in range(n)]
    sols = [f"### The final answer is: \\frac{{{i + 1}}}{{7}}" for i in range(n)]
    score_batch(texts[:2], sols[:2], workers=2, timeout_s=5.0)  # the workers' start-up, before the clock
    pool = get_pool(2)
    job = Background(lambda: score_batch(texts, sols, workers=2, timeout_s=5.0), "scoring")
    # close once the batch holds the pool: closed before (the 30,000 tasks still being built on a
    # busy machine), the thread would start a new pool and score the whole batch there
    deadline = time.monotonic() + 60
    while not pool._lock.locked():
        assert time.monotonic() < deadline, "the background batch never reached the pool"
        time.sleep(0.01)
    time.sleep(0.2)
    t = time.monotonic()
    close_pools()
    assert time.monotonic() - t < 10  # (about 1 s; a busy machine took 3.7)
    with pytest.raises(RewardPoolError):
        job.result()
    assert score_batch(texts[:2], sols[:2], workers=2, timeout_s=5.0)["total"] == [0.0, 0.0]  # a new pool


def test_score_batch_counts_a_worker_killed_at_its_hard_deadline():
    """num_killed / num_timeouts of score_batch when a worker is stuck."""
    score_batch([SOL], [SOL], workers=1, timeout_s=0.5)  # the shared 1-worker pool, started and ready
    os.kill(get_pool(1)._workers[0].process.pid, signal.SIGSTOP)
    cs = [SOL.replace(": 7", f": {i}.5") for i in range(3)]
    res = score_batch(cs, [SOL] * 3, [[["4 and 3"]]] * 3, workers=1, timeout_s=0.5)
    assert res["num_killed"] == [1.0]
    assert res["timed_out"].count(1.0) == 1 and res["num_timeouts"] == [1.0]


def test_a_worker_that_died_idle_blames_no_completion():
    """The send to a dead idle worker fails: its tasks go back to the queue, none is counted
    as the dead worker's (none scored without math-verify)."""
    pool = RewardPool(1)
    try:
        pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)  # ready
        w = pool._workers[0]
        os.kill(w.process.pid, signal.SIGKILL)
        w.process.wait()
        cs, sols = _right(6)
        results, kills = pool.map([(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))], alpha=0.1,
                                  variant="paper", timeout_s=3.0)
        assert kills == 0 and [r[3] for r in results] == [True] * 6 and not any(r[4] for r in results)
    finally:
        pool.close()


def test_one_worker_that_never_starts_does_not_fail_a_pool_whose_others_run(monkeypatch):
    """The start-up limit fails a batch only when no worker is ready."""
    from r1vl.rewards import pool as pool_mod

    pool = RewardPool(2)
    try:
        os.kill(pool._workers[1].process.pid, signal.SIGSTOP)  # before its start-up: never ready
        pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)  # worker 0 ready (120 s limit)
        # a short limit only now, when worker 0 is ready (its start-up under load took 8 s), passed for worker 1
        monkeypatch.setattr(pool_mod, "_STARTUP_TIMEOUT_S", 1.0)
        time.sleep(max(0.0, 1.5 - (time.monotonic() - pool._workers[1].spawned)))
        results, kills = pool.map([(i, SOL, SOL, []) for i in range(4)], alpha=0.1, variant="paper",
                                  timeout_s=3.0)
        assert [r[3] for r in results] == [True] * 4 and kills == 0
    finally:
        pool.close()


@pytest.mark.parametrize("after", [None, 0.05])
def test_workers_that_keep_exiting_at_start_up_fail_the_batch(monkeypatch, tmp_path, after):
    """A map does not respawn workers that exit at start-up for ever: the batch fails. after:
    None, /bin/false, gone before the parent looks; 0.05, a worker that ends 50 ms in (as a
    Python one failing at import): its pipe's end was seen first and it was not counted."""
    from r1vl.rewards import pool as pool_mod

    if after is None:
        monkeypatch.setattr(pool_mod, "sys", types.SimpleNamespace(executable="/bin/false", platform=sys.platform))
    else:
        _stand_in_worker(monkeypatch, tmp_path / "late_false", f"#!/bin/sh\nsleep {after}\nexit 1\n")
    pool = RewardPool(1)
    out = {}

    def go():
        try:
            pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=2.0)
        except Exception as e:  # noqa: BLE001
            out["e"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    stuck = t.is_alive()
    if stuck:
        pool._closing = True  # let the thread go
        t.join(10)
    pool.close()
    assert not stuck, "the batch kept respawning workers that exit at start-up"
    assert isinstance(out.get("e"), RuntimeError) and "keep exiting at start-up" in str(out["e"])


def test_start_up_deaths_far_apart_do_not_fail_a_later_batch(monkeypatch, tmp_path):
    """The limit on workers that end before their start-up counts those since a worker last
    started: counted over the pool's life, a few such deaths spread over days (the OOM killer at a
    worker's start) failed every later batch that met one. Here every other start fails."""
    _stand_in_worker(monkeypatch, tmp_path / "every_other",
                     f"#!/bin/sh\nn=$(cat {tmp_path}/starts 2>/dev/null || echo 0); n=$((n + 1)); "
                     f"echo $n > {tmp_path}/starts\n"
                     f"if [ $((n % 2)) -eq 1 ]; then sleep 0.05; exit 1; fi\nexec {sys.executable} \"$@\"\n")
    pool = RewardPool(1)  # start 1 fails, start 2 runs
    try:
        for _ in range(5):  # 5 deaths at start-up in all, over 3 x 1 workers
            results, kills = pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)
            assert results[0][3] and kills == 0
            w = pool._workers[0]
            w.process.kill()  # between batches: its successor's start fails, the next one's runs
            w.process.wait()
        assert int((tmp_path / "starts").read_text()) == 10
    finally:
        pool.close()


def test_a_weights_mapping_defaults_the_missing_weight_to_one():
    """A weights mapping without "validity" weighs StepRVR by 1."""
    res = score_batch([SOL], [SOL], None, weights={"accuracy": 2.0}, workers=0)
    assert res["total"] == [pytest.approx(2 * res["accuracy"][0] + res["validity"][0])]
    assert res["validity"][0] > 0


def test_close_stops_idle_workers_at_once_and_cleanly():
    """close() tells idle workers to exit (None): quick, exit code 0, not killed after a 2 s
    wait each. Exit code 0 is the proof (a worker not told is killed, -9); the time only
    has to be under that 2 s wait for each worker, 4 s (it was 1.5 s: a close took 0.19 s
    on an idle machine, and 10 times that on a loaded one is not unusual)."""
    pool = RewardPool(2)
    pool.map([(i, SOL, SOL, []) for i in range(8)], alpha=0.1, variant="paper", timeout_s=3.0)
    procs = [w.process for w in pool._workers]
    t0 = time.monotonic()
    pool.close()
    assert [p.returncode for p in procs] == [0, 0]
    assert time.monotonic() - t0 < 4.0


def test_a_worker_silent_for_less_than_the_grace_period_is_not_killed():
    """The hard deadline is timeout_s + max(2 s, timeout_s): a worker silent for 1.3 s at
    timeout_s=0.5 is waited for (a mutant with timeout_s + min(2, timeout_s) = 1 s killed it)."""
    pool = RewardPool(1)
    try:
        pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)  # ready
        pid = pool._workers[0].process.pid
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(1.3, os.kill, (pid, signal.SIGCONT)).start()
        results, kills = pool.map([(i, SOL, SOL, []) for i in range(3)], alpha=0.1, variant="paper",
                                  timeout_s=0.5)
        assert kills == 0 and pool._workers[0].process.pid == pid
        assert [r[3] for r in results] == [True] * 3
    finally:
        pool.close()


def test_background_is_a_daemon_thread():
    """An interpreter whose Background job still runs exits without waiting for it.
    Timed from the child's line "started" (its job running), not from its start: importing
    r1vl.utils (torch) took 6.7 s of the old 15 s limit on a loaded machine. The job outlasts
    the 120 s safety net by far, so a non-daemon thread fails this on any machine."""
    code = ("import time\nfrom r1vl.utils import Background\n"
            "Background(lambda: time.sleep(3600), 'x')\nprint('started', flush=True)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout.readline() == "started\n"
            try:
                assert p.wait(timeout=120) == 0
            except subprocess.TimeoutExpired:
                pytest.fail("the interpreter waited for its Background job")
        finally:
            p.kill()


def test_a_worker_seen_ended_before_its_last_messages_are_read_blames_no_completion(monkeypatch, tmp_path):
    """A worker that answers its completion (math-verify hit its deadline), says "recycle" and
    exits: a parent that saw its exit status (poll) before it read those messages replaced it
    with them unread in the pipe and blamed the first completion it had not read an answer for:
    scored again without math-verify (a right answer needing it scores 0), counted as a kill.
    Unread answer and "recycle": the answered completion was blamed; answer read, "recycle" not:
    the next one of its chunk, which it never started. (An OOM-killed worker lost the answers it
    had written the same way.) Here the parent's wait() comes back empty just before the
    stand-in writes (as when another worker woke it) and it sees the exit first: what the
    worker left in its pipe is read before it is replaced, and nothing is blamed."""
    from r1vl.rewards import pool as pool_mod

    first = tmp_path / "first"
    _stand_in_worker(
        monkeypatch, tmp_path / "recycler",
        f"#!{sys.executable}\nimport os, sys\n"
        f"if os.path.exists({str(first)!r}):  # every worker after the first: the real one\n"
        "    os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
        f"open({str(first)!r}, 'w').close()\n"
        + _STAND_IN_READY +
        "tasks = inbox.recv()[0]\n"
        "outbox.send((tasks[0][0], (0.0, 0.0, 0.0, False, True)))  # its deadline hit\n"
        "outbox.send(('recycle', os.getpid()))\n"
        "os._exit(3)\n")
    pool = RewardPool(1)
    try:
        w = pool._workers[0]
        real_poll, real_wait = w.process.poll, pool_mod.wait
        w.process.poll = lambda: w.process.wait() if w.pending else real_poll()  # its exit, seen first
        late = []

        def wait(conns, timeout=None):
            if w.pending and not late:  # the wake-up before its messages came
                late.append(1)
                return []
            return real_wait(conns, timeout)

        monkeypatch.setattr(pool_mod, "wait", wait)
        cs, sols = _right(8)  # one worker: chunks of 2, a completion after the one it answers
        tasks = [(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))]
        results, kills = pool.map(tasks, alpha=0.1, variant="paper", timeout_s=3.0)
        assert late, "the stand-in never got its chunk"
        assert kills == 0
        assert results[0] == (0.0, 0.0, 0.0, False, True)  # its own answer, not a rescoring
        assert [r[3] for r in results[1:]] == [True] * 7 and not any(r[4] for r in results[1:])
    finally:
        pool.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_an_interrupt_as_a_worker_starts_leaves_no_worker_behind(monkeypatch):
    """Ctrl-C (caught, as in a notebook) landing while a worker was started, once its process
    ran but before the pool held its pipes: their parent ends stayed open in this process, owned
    by nothing, so the worker (which stops at its pipe's end or its parent's death) waited on
    them for the process's life; two descriptors and a worker leaked per interrupt."""
    from r1vl.rewards import pool as pool_mod

    real_popen = subprocess.Popen
    started = []

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        raise KeyboardInterrupt  # the signal, handled just as the fork and exec are done

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(pool_mod.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        RewardPool(1)
    monkeypatch.setattr(pool_mod.subprocess, "Popen", real_popen)
    leaked = set(os.listdir("/proc/self/fd")) - fds
    try:
        assert not leaked, "the worker's pipes stayed open in this process"
        started[0].wait(timeout=60)  # it ends at its pipe's end, once started (importing sympy)
    finally:
        started[0].kill()
        started[0].wait()


def test_a_second_interrupt_during_the_clean_up_leaves_nothing_for_the_next_batch(monkeypatch):
    """An interrupted batch replaces the workers holding its tasks (_drop_busy); a second
    interrupt landing there (Ctrl-C pressed twice, caught in a notebook) left a worker running
    with tasks of the old batch, and the next map took its answers as its own (task indices
    restart at 0: a wrong answer of the new batch scored right). A map now replaces a worker
    still holding another batch's tasks before it starts."""
    from r1vl.rewards import pool as pool_mod

    pool = RewardPool(1)
    try:
        _wait_ready(pool)
        real_wait, real_kill = pool_mod.wait, RewardPool._kill
        second = []

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        def kill_interrupted(w):
            if not second:  # the second Ctrl-C, before the busy worker is killed
                second.append(1)
                raise KeyboardInterrupt
            real_kill(w)

        monkeypatch.setattr(pool_mod, "wait", interrupted)
        monkeypatch.setattr(RewardPool, "_kill", staticmethod(kill_interrupted))
        cs, sols = _right(8)
        with pytest.raises(KeyboardInterrupt):
            pool.map([(i, c, s, []) for i, (c, s) in enumerate(zip(cs, sols))], alpha=0.1, variant="paper",
                     timeout_s=3.0)
        assert second
        monkeypatch.setattr(pool_mod, "wait", real_wait)
        time.sleep(1.0)  # time for the worker left with the old tasks to answer them
        wrong = [(i, SOL.replace(": 7", ": wrong"), "12345", []) for i in range(8)]
        results, kills = pool.map(wrong, alpha=0.1, variant="paper", timeout_s=3.0)
        assert [r[3] for r in results] == [False] * 8 and kills == 0
    finally:
        pool.close()


def test_a_worker_whose_parent_dies_during_its_start_up_exits(tmp_path):
    """A worker took its parent to be whoever its parent was once it had started (after
    importing sympy, seconds under load): one whose parent had died by then took its new
    parent (init) for it and never saw itself orphaned; with its pipes also held by another
    process (a fork of the parent: no end of pipe), it ran on for as long as that one did."""
    exe = tmp_path / "slow_worker"
    exe.write_text(f"#!/bin/sh\nsleep 1\nexec {sys.executable} \"$@\"\n")  # a slow start
    exe.chmod(0o755)
    code = ("import os, sys, time, types\n"
            "from r1vl.rewards import pool as pool_mod\n"
            f"pool_mod.sys = types.SimpleNamespace(executable={str(exe)!r}, platform=sys.platform)\n"
            "p = pool_mod.RewardPool(1)\n"
            "holder = os.fork()\n"
            "if holder == 0:\n"  # keeps the pool (p), and so its pipes, open
            "    time.sleep(120)\n"
            "    os._exit(0)\n"
            "print(p._workers[0].process.pid, holder, flush=True)\n"
            "os._exit(0)\n")  # dies while its worker starts
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        line = p.stdout.readline()  # (not to its end: the worker and the holder keep it open)
        p.wait(timeout=120)
    worker, holder = (int(x) for x in line.split())
    try:
        assert _ends_within(worker, 30), "a reward worker orphaned during its start-up kept running"
    finally:
        for pid in (worker, holder):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_close_waits_two_seconds_in_all_not_two_for_each_worker_that_does_not_exit():
    """close() gives workers 2 s to exit when told, then kills them: the 2 s were each worker's
    in turn, so workers still starting (importing sympy, seconds under load) or stuck held the
    close, and with it the interpreter's exit, for 2 s apiece (16 s for the recipes' 8)."""
    pool = RewardPool(3)
    for w in pool._workers:  # before their start-up: they never read the close's None
        os.kill(w.process.pid, signal.SIGSTOP)
    procs = [w.process for w in pool._workers]
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 4.0  # (one 2 s wait; it was 3 of them, 6 s)
    assert all(p.returncode is not None for p in procs)


_ANSWER = (1.0, 0.5, 1.0, True, False)


def _answerer(monkeypatch, tmp_path, delay_s: float) -> None:
    """Stand-in workers that answer each task `_ANSWER` after delay_s."""
    _stand_in_worker(
        monkeypatch, tmp_path / "answerer",
        f"#!{sys.executable}\nimport os, sys, time\n"
        + _STAND_IN_READY +
        "while True:\n"
        "    msg = inbox.recv()\n"
        "    if msg is None:\n"
        "        os._exit(0)\n"
        "    for task in msg[0]:\n"
        f"        time.sleep({delay_s})\n"
        f"        outbox.send((task[0], {_ANSWER}))\n")


def test_a_job_stopped_and_resumed_whole_kills_no_worker(monkeypatch, tmp_path):
    """Ctrl-Z then fg (SIGTSTP reaches the workers too), or a scheduler's suspend, stops this
    process and its workers together; past the hard deadline, the resumed parent found every
    busy worker silent for longer than it and killed it (its completion scored without
    math-verify), though none had had a moment to run. Time this process did not run, over
    the wait it asked for, is not counted as the workers' silence. Here a stand-in that answers
    each task after 0.1 s is stopped with the parent (its wait() stops it, sleeps past the hard
    deadline and resumes it) and comes back as it went: nothing readable yet."""
    from r1vl.rewards import pool as pool_mod

    _answerer(monkeypatch, tmp_path, delay_s=0.1)
    pool = RewardPool(1)
    try:
        w = pool._workers[0]
        pid, real_wait, stopped = w.process.pid, pool_mod.wait, []

        def wait(conns, timeout=None):
            if w.pending and not stopped:  # the whole job stopped, past the hard deadline (0.5 + 2 s)
                stopped.append(1)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(3.0)
                os.kill(pid, signal.SIGCONT)
                return []
            return real_wait(conns, timeout)

        monkeypatch.setattr(pool_mod, "wait", wait)
        results, kills = pool.map([(i, "x", "y", []) for i in range(4)], alpha=0.1, variant="paper",
                                  timeout_s=0.5)
        assert stopped
        assert pool._workers[0].process.pid == pid and kills == 0
        assert results == [_ANSWER] * 4
    finally:
        pool.close()


def test_a_job_stopped_while_its_workers_start_up_is_not_failed_by_the_start_up_limit(monkeypatch, tmp_path):
    """The same suspend before any worker was ready: on resuming, the start-up limit had passed
    for every worker, counted in time none of them ran, and the batch failed ("no reward worker
    started within 120s"). Time this process did not run is not start-up time either. Here the
    worker is stopped before its start-up; the parent's first wait sleeps past the (shortened)
    limit, as the stopped job would, and resumes it."""
    from r1vl.rewards import pool as pool_mod

    _answerer(monkeypatch, tmp_path, delay_s=0.0)
    monkeypatch.setattr(pool_mod, "_STARTUP_TIMEOUT_S", 6.0)  # (about 5 s left for the stand-in's start on resuming)
    pool = RewardPool(1)
    try:
        pid, real_wait, stopped = pool._workers[0].process.pid, pool_mod.wait, []
        os.kill(pid, signal.SIGSTOP)  # not ready yet: the stand-in has not started

        def wait(conns, timeout=None):
            if not stopped:  # the whole job stopped until 8 s (past the limit) after the spawn, in its first wait
                stopped.append(1)
                time.sleep(max(0.0, 8.0 - (time.monotonic() - pool._workers[0].spawned)))
                os.kill(pid, signal.SIGCONT)
                return []
            return real_wait(conns, timeout)

        monkeypatch.setattr(pool_mod, "wait", wait)
        results, kills = pool.map([(i, "x", "y", []) for i in range(3)], alpha=0.1, variant="paper",
                                  timeout_s=3.0)
        assert stopped and kills == 0 and pool._workers[0].process.pid == pid
        assert results == [_ANSWER] * 3
    finally:
        pool.close()


def test_a_child_forked_while_a_batch_runs_is_refused_the_parents_pool_at_once():
    """A RewardPool used in a process forked from its own refuses (RuntimeError); forked while
    another thread's map held the pool's lock (a trainer's background scoring), the child took
    the lock first, inherited held by a thread it does not have, and blocked for ever."""
    pool = RewardPool(1)
    pool._lock.acquire()  # as a map in another thread holds it
    try:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                signal.alarm(20)  # blocked: killed by it
                pool.map([(0, SOL, SOL, [])], alpha=0.1, variant="paper", timeout_s=3.0)
            except RuntimeError:
                code = 0
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        pool._lock.release()
        pool.close()
