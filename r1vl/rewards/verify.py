"""math-verify under a per-call timeout that cannot hang the caller.

math-verify's own timeout uses `signal.alarm` with whole seconds and works only
in the main thread; it also swallows its timeouts (returns "not equal"), so a
caller cannot count them. Here math-verify's timeouts are switched off and each
call (parse + parse + verify for one completion) runs under our own
`setitimer` deadline, which:

* has sub-second resolution, restores any timer/handler the caller had set,
  and raises a `BaseException` subclass so that math-verify's and sympy's
  `except Exception` blocks cannot swallow it (a flag set by the handler also
  catches a swallowed one);
* works in the main thread of any process -- in particular in the worker
  processes of `score_batch`, whose tasks run in the workers' main threads.

Off the main thread a signal cannot be used: `r1vl.rewards.accuracy_reward`
then sends the completion to a one-process sandbox (see `pool.py`). A
computation stuck inside C code that never returns to the interpreter (a
signal handler only runs between bytecodes) is caught by the pool's hard
deadline, which kills the worker.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0

_IMPORT_RETRY_S = 0.05
# after the deadline fires the alarm is re-armed at this period until the call unwinds: a
# _Deadline raised where Python swallows it (a gc callback, a __del__, a weakref callback,
# a library's bare `except:`) then interrupts the computation again instead of letting it
# run unbounded
_REFIRE_S = 0.05
# setitimer refuses inf and, on Linux, anything past ~1e9 s (OverflowError): longer deadlines are this one
_MAX_DEADLINE_S = 1e6
_CACHE_MAX_ITEMS = 4096
_CACHE_MAX_CHARS = 512


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so `except Exception` does not eat it."""


class _DropTimeoutDisabledWarning(logging.Filter):
    # math-verify warns once per process that its own timeout is disabled: that is
    # by design here (ours replaces it), so the warning is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _importing(frame) -> bool:
    """Is the interrupted code (or a caller of it) executing an import?

    Every import runs a module body under importlib's bootstrap frames.
    """
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def signals_usable() -> bool:
    """True when this thread may install a SIGALRM handler (the main thread, on POSIX)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_deadline(fn: Callable[[], Any], seconds: float | None) -> tuple[bool, Any]:
    """Run `fn()` with a wall-clock deadline. Returns (finished, value).

    finished is False when the deadline passed (value is then None). An
    exception from fn is treated as a finished call with value None. With
    seconds None or <= 0, or where signals cannot be used, fn runs without a
    deadline (callers that need one off the main thread use the sandbox).
    """
    if not seconds or not seconds > 0 or not signals_usable():  # (NaN: no deadline either)
        try:
            return True, fn()
        except Exception:  # noqa: BLE001 -- a verifier error means "not verified"
            logger.debug("math-verify raised", exc_info=True)
            return True, None

    global _fired
    fired = False
    armed = True
    _fired = False

    def on_alarm(signum, frame):  # noqa: ARG001
        nonlocal fired
        global _fired
        if not armed:
            return
        if _importing(frame):
            # never interrupt an import: a half-executed module stays broken in
            # sys.modules (sympy would then fail on every later call). Try again soon.
            signal.setitimer(signal.ITIMER_REAL, _IMPORT_RETRY_S)
            return
        fired = _fired = True
        signal.setitimer(signal.ITIMER_REAL, _REFIRE_S)  # disarmed in the finally below
        raise _Deadline()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    old_delay, old_interval = 0.0, 0.0
    value = None
    try:
        try:
            # an infinite or huge deadline (setitimer refuses 1e12 s and inf) is a ~11-day one
            old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, min(float(seconds), _MAX_DEADLINE_S))
            value = fn()
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        value = None
    except Exception:  # noqa: BLE001
        logger.debug("math-verify raised", exc_info=True)
        value = None
    finally:
        # again here: a re-fire that landed before the inner finally disarmed left one pending
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give the caller's own timer back, minus the time we used
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)
    if fired:
        return False, None
    return True, value


# ---------------------------------------------------------------------------------
# math-verify calls (its own timeouts off: ours wraps the whole computation)

_parse_cache: dict[str, Any] = {}
_equal_cache: dict[tuple[str, str], bool] = {}  # math_equal's (gold line, answer line) -> equal
_fired = False  # set by the deadline handler: results computed after it fired are never cached


def _parse(text: str):
    from math_verify import parse

    if len(text) <= _CACHE_MAX_CHARS:
        hit = _parse_cache.get(text)
        if hit is not None:
            return hit
    parsed = parse(text, parsing_timeout=None)
    if len(text) <= _CACHE_MAX_CHARS and not _fired:
        if len(_parse_cache) >= _CACHE_MAX_ITEMS:
            _parse_cache.clear()
        _parse_cache[text] = parsed
    return parsed


def _verify(gold, target) -> bool:
    from math_verify import verify

    return bool(verify(gold, target, timeout_seconds=None))


def math_equal(gold: str, pred: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """Is the answer line `pred` mathematically equal to the answer line `gold` by math-verify?
    Returns (equal, timed_out).

    `verify(parse(gold), parse(pred))`: gold first, as math-verify expects; each line read as
    LaTeX when it carries mathematics without delimiters (`answers.latex_form`), else as is.
    """
    from r1vl.rewards.answers import latex_form

    def read(line: str):
        form = latex_form(line)
        parsed = _parse(form) if form is not None else None
        return parsed if parsed else _parse(line)

    answered = []  # set when math-verify returned (an exception it raised is not kept)

    def work() -> bool:
        g = read(gold)
        p = read(pred)
        out = _verify(g, p)
        answered.append(True)
        return out

    # a group's completions often give the same answer, and a step's prompts repeat in later
    # epochs: the comparison (sympy's, most of a reward's time) is done once per pair of lines
    key = (gold, pred)
    small = len(gold) + len(pred) <= _CACHE_MAX_CHARS
    if small:
        hit = _equal_cache.get(key)
        if hit is not None:
            return hit, False
    equal, timed_out = _run(work, timeout_s)
    if small and answered and not timed_out and not _fired:  # as the parse cache: never one after a deadline
        if len(_equal_cache) >= _CACHE_MAX_ITEMS:
            _equal_cache.clear()
        _equal_cache[key] = bool(equal)
    return equal, timed_out


def math_equal_official(completion: str, solution: str,
                        timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """The authors' check: `verify(parse(completion), parse(solution))` on the whole texts.

    The argument order (the completion in math-verify's "gold" slot) is theirs
    and is kept: math-verify is not symmetric. Returns (equal, timed_out).
    """

    def work() -> bool:
        answer = _parse(completion)
        return _verify(answer, _parse(solution))

    return _run(work, timeout_s)


_warm = False


def warm_up() -> None:
    """Import math-verify and the parts of sympy it loads lazily, without a deadline.

    Done once per process before the first deadline, so that a deadline never
    lands in the middle of those imports.
    """
    global _warm
    if _warm:
        return
    from math_verify import parse, verify

    for gold, pred in (("1", "1"), ("$\\frac{1}{2}$", "0.5"), ("x = 2", "2"), ("\\sqrt{25}", "5"),
                       ("\\{1, 2\\}", "(1, 2)"), ("30^\\circ", "\\pi/6"), ("A", "B")):
        verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None)
    _warm = True


def healthy() -> bool:
    """Does math-verify still work in this process (after a deadline interrupted it)?"""
    try:
        from math_verify import parse, verify

        return bool(verify(parse("2", parsing_timeout=None, raise_on_error=True),
                           parse("$\\frac{4}{2}$", parsing_timeout=None, raise_on_error=True),
                           timeout_seconds=None, raise_on_error=True))
    except Exception:  # noqa: BLE001
        return False


def _run(work: Callable[[], bool], timeout_s: float | None) -> tuple[bool, bool]:
    if not _warm:
        try:
            warm_up()
        except Exception:  # noqa: BLE001
            logger.warning("math-verify warm-up failed", exc_info=True)
    # A deadline that fires inside parse() unwinds through it (nothing cached); one that
    # some library code swallowed still sets _fired, which also blocks caching.
    finished, value = call_with_deadline(work, timeout_s)
    if not finished:
        global _broken
        if not _broken and not healthy():
            _broken = True
            logger.error("a math-verify deadline left sympy broken in process %d; further "
                         "accuracy_reward calls here go to a sandbox process", os.getpid())
        return False, True
    return bool(value), False


_broken = False


def verify_broken() -> bool:
    """True once a deadline has left math-verify unusable in this process."""
    return _broken


def needs_worker_process(timeout_s) -> bool:
    """Whether scoring under the deadline `timeout_s` must leave this thread for a worker
    process: there is a deadline and either no signal timer here (off the main thread) or a
    deadline has left math-verify broken in this process."""
    return bool(timeout_s) and timeout_s > 0 and (not signals_usable() or verify_broken())
