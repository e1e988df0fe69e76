"""r1vl.rewards.verify.call_with_deadline: the SIGALRM deadline around math-verify calls."""
import signal
import time

import pytest

from r1vl.rewards import verify

pytestmark = pytest.mark.skipif(not verify.signals_usable(), reason="needs SIGALRM on the main thread")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_finished_call_returns_its_value_and_leaves_no_alarm_behind():
    before = signal.getsignal(signal.SIGALRM)
    assert verify.call_with_deadline(lambda: 42, 1.0) == (True, 42)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_a_call_past_its_deadline_is_interrupted():
    t0 = time.monotonic()
    assert verify.call_with_deadline(lambda: _spin(30), 0.2) == (False, None)
    assert time.monotonic() - t0 < 5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_swallowed_deadline_fires_again():
    # the deadline raised where Python drops it (a gc callback, __del__, a bare except in
    # library code) must not let the computation run on unbounded
    swallowed = []

    def work():
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                _spin(30)
            except BaseException as e:  # noqa: BLE001 -- what a careless library does
                swallowed.append(type(e).__name__)
                if len(swallowed) >= 3:
                    raise
        return "ran to the end"

    t0 = time.monotonic()
    assert verify.call_with_deadline(work, 0.2) == (False, None)
    assert time.monotonic() - t0 < 5
    assert swallowed == ["_Deadline"] * 3
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_exception_is_a_finished_call_without_value():
    def boom():
        raise ValueError("bad input")

    assert verify.call_with_deadline(boom, 1.0) == (True, None)


def test_the_callers_own_timer_is_given_back():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        assert verify.call_with_deadline(lambda: _spin(30), 0.1) == (False, None)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < remaining < 5.0
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
