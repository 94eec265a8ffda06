"""daemon.schedule: backoff delays and the timer queue (an injected clock and sleeper), and the
wake-up pipe that signal handlers poke."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

import pytest

from daemon.config import PollSettings
from daemon.schedule import Backoff, Scheduler, Wakeup
from tests.support.harness import FakeClock


class FakeSleeper:
    """Records each requested sleep and advances the fake clock by it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.now += seconds


# ---- Backoff ---------------------------------------------------------------------------------


def test_exact_delays_without_jitter() -> None:
    backoff = Backoff(initial=10, maximum=600, multiplier=2.0, jitter=0)
    assert [backoff.delay(n) for n in range(8)] == [10, 20, 40, 80, 160, 320, 600, 600]


def test_fractional_delays_and_other_multipliers() -> None:
    assert [Backoff(0.05, 0.3, 2.0, 0).delay(n) for n in range(4)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.3]
    )
    assert [Backoff(1, 100, 3.0, 0).delay(n) for n in range(6)] == [1, 3, 9, 27, 81, 100]
    assert [Backoff(5, 100, 1.0, 0).delay(n) for n in range(3)] == [5, 5, 5]


def test_jitter_stays_within_bounds_with_a_seeded_rng() -> None:
    backoff = Backoff(10, 10_000, 2.0, 0.1, random.Random(42))
    for attempt in range(8):
        base = 10 * 2**attempt
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
        assert len(set(delays)) > 1  # it does vary


def test_jitter_is_reproducible_with_the_same_seed() -> None:
    first = Backoff(10, 600, 2.0, 0.2, random.Random(7))
    second = Backoff(10, 600, 2.0, 0.2, random.Random(7))
    assert [first.delay(n) for n in range(10)] == [second.delay(n) for n in range(10)]


def test_cap_holds_even_with_jitter() -> None:
    backoff = Backoff(10, 600, 2.0, 0.5, random.Random(1))
    delays = [backoff.delay(attempt) for attempt in range(6, 50) for _ in range(20)]
    assert max(delays) <= 600
    assert min(delays) >= 300  # jitter may only shorten a capped delay, by at most 50 %


@pytest.mark.parametrize("attempt", [200, 1_000, 10**9, 10**100])
def test_huge_attempt_numbers_give_the_cap(attempt: int) -> None:
    assert Backoff(10, 600, 2.0, 0).delay(attempt) == 600
    assert Backoff(0.05, 0.3, 2.0, 0).delay(attempt) == 0.3


def test_huge_multiplier_does_not_overflow() -> None:
    backoff = Backoff(10, 600, 1000.0, 0.1, random.Random(0))
    assert backoff.delay(150) <= 600
    assert backoff.delay(10**6) <= 600


def test_negative_attempt_is_treated_as_the_first() -> None:
    assert Backoff(10, 600, 2.0, 0).delay(-3) == 10


def test_from_settings() -> None:
    poll = PollSettings(initial_seconds=0.5, max_seconds=4, multiplier=3.0, jitter=0)
    backoff = Backoff.from_settings(poll)
    assert (backoff.initial, backoff.maximum, backoff.multiplier, backoff.jitter) == (
        0.5,
        4,
        3.0,
        0,
    )
    assert [backoff.delay(n) for n in range(4)] == [0.5, 1.5, 4, 4]
    rng = random.Random(3)
    assert Backoff.from_settings(PollSettings(), rng).rng is rng


# ---- Scheduler -------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeper(clock: FakeClock) -> FakeSleeper:
    return FakeSleeper(clock)


@pytest.fixture
def scheduler(clock: FakeClock, sleeper: FakeSleeper) -> Scheduler:
    return Scheduler(clock, sleeper)


def test_schedule_returns_the_due_time(scheduler: Scheduler, clock: FakeClock) -> None:
    assert scheduler.schedule("a", 5) == 1005
    assert scheduler.schedule("b", -1) == 1000  # negative delays mean now
    assert "a" in scheduler and "b" in scheduler
    assert "c" not in scheduler
    assert len(scheduler) == 2


def test_pop_due_earliest_first(scheduler: Scheduler, clock: FakeClock) -> None:
    scheduler.schedule("late", 30)
    scheduler.schedule("early", 10)
    scheduler.schedule("middle", 20)
    assert scheduler.pop_due() == []
    clock.now += 25
    assert scheduler.pop_due() == ["early", "middle"]
    assert scheduler.pop_due() == []
    assert len(scheduler) == 1
    clock.now += 5  # exactly due counts as due
    assert scheduler.pop_due() == ["late"]
    assert len(scheduler) == 0


def test_equal_times_come_out_in_scheduling_order(scheduler: Scheduler, clock: FakeClock) -> None:
    for key in ["c", "a", "b"]:
        scheduler.schedule(key, 1)
    clock.now += 1
    assert scheduler.pop_due() == ["c", "a", "b"]


def test_rescheduling_replaces_the_previous_time(scheduler: Scheduler, clock: FakeClock) -> None:
    scheduler.schedule("a", 5)
    scheduler.schedule("a", 50)
    assert len(scheduler) == 1
    assert scheduler.next_delay() == 50
    clock.now += 10
    assert scheduler.pop_due() == []
    scheduler.schedule("a", 1)  # earlier again
    clock.now += 1
    assert scheduler.pop_due() == ["a"]
    clock.now += 100
    assert scheduler.pop_due() == []  # the stale entries do not resurface


def test_rescheduling_to_the_same_time_yields_the_key_once(
    scheduler: Scheduler, clock: FakeClock
) -> None:
    scheduler.schedule("a", 5)
    scheduler.schedule("a", 5)
    clock.now += 5
    assert scheduler.pop_due() == ["a"]


def test_cancel(scheduler: Scheduler, clock: FakeClock) -> None:
    scheduler.schedule("a", 1)
    scheduler.schedule("b", 2)
    scheduler.cancel("a")
    scheduler.cancel("never-scheduled")
    assert "a" not in scheduler
    assert scheduler.next_delay() == 2
    clock.now += 10
    assert scheduler.pop_due() == ["b"]
    scheduler.schedule("a", 0)  # a cancelled key can come back
    assert scheduler.pop_due() == ["a"]


def test_next_delay(scheduler: Scheduler, clock: FakeClock) -> None:
    assert scheduler.next_delay() is None
    scheduler.schedule("a", 7.5)
    assert scheduler.next_delay() == 7.5
    clock.now += 2.5
    assert scheduler.next_delay() == 5
    clock.now += 100
    assert scheduler.next_delay() == 0  # overdue
    scheduler.cancel("a")
    assert scheduler.next_delay() is None


def test_wait_sleeps_until_the_next_due_time(
    scheduler: Scheduler, sleeper: FakeSleeper, clock: FakeClock
) -> None:
    scheduler.schedule("a", 3)
    scheduler.wait(60)
    assert sleeper.calls == [3]
    assert scheduler.pop_due() == ["a"]


def test_wait_is_bounded_by_longest(scheduler: Scheduler, sleeper: FakeSleeper) -> None:
    scheduler.schedule("a", 300)
    scheduler.wait(30)
    assert sleeper.calls == [30]
    assert scheduler.pop_due() == []


def test_wait_with_nothing_scheduled_waits_longest(
    scheduler: Scheduler, sleeper: FakeSleeper
) -> None:
    scheduler.wait(12.5)
    assert sleeper.calls == [12.5]


def test_wait_for_an_overdue_key_does_not_sleep(
    scheduler: Scheduler, sleeper: FakeSleeper, clock: FakeClock
) -> None:
    scheduler.schedule("a", 1)
    clock.now += 5
    scheduler.wait(60)
    assert sleeper.calls == [0]


def test_wait_ignores_cancelled_and_replaced_entries(
    scheduler: Scheduler, sleeper: FakeSleeper
) -> None:
    scheduler.schedule("a", 1)
    scheduler.schedule("b", 2)
    scheduler.cancel("a")
    scheduler.schedule("b", 9)
    scheduler.wait(60)
    assert sleeper.calls == [9]


def test_a_day_of_backoff_polls_runs_instantly(
    scheduler: Scheduler, sleeper: FakeSleeper, clock: FakeClock
) -> None:
    backoff = Backoff(10, 600, 2.0, 0)
    polls = 0
    scheduler.schedule("job", backoff.delay(0))
    while clock.now < 1000 + 86_400:
        scheduler.wait(3600)
        for _key in scheduler.pop_due():
            polls += 1
            scheduler.schedule("job", backoff.delay(polls))
    assert sleeper.calls[:7] == [10, 20, 40, 80, 160, 320, 600]
    assert polls == 6 + (86_400 - 630) // 600 + 1


# ---- real waiting (short) ----------------------------------------------------------------------


def test_wake_interrupts_a_real_wait() -> None:
    scheduler = Scheduler()
    threading.Timer(0.05, scheduler.wake).start()
    started = time.monotonic()
    scheduler.wait(10)
    assert time.monotonic() - started < 2


def test_wake_before_wait_makes_it_return_at_once_and_is_consumed() -> None:
    scheduler = Scheduler()
    scheduler.wake()
    started = time.monotonic()
    scheduler.wait(10)
    assert time.monotonic() - started < 1
    started = time.monotonic()
    scheduler.wait(0.05)  # the wake was used up: this one times out
    assert time.monotonic() - started >= 0.04


def test_real_wait_returns_when_the_next_key_is_due() -> None:
    scheduler = Scheduler()
    scheduler.schedule("a", 0.05)
    started = time.monotonic()
    scheduler.wait(10)
    assert 0.04 <= time.monotonic() - started < 2
    assert scheduler.pop_due() == ["a"]


# ---- the wake-up pipe ------------------------------------------------------------------------


def _poke_by_signal(handler: Any) -> float:
    """Wait on a Wakeup while SIGUSR1 arrives 50 ms in; seconds until the wait returned."""
    wakeup = Wakeup()
    previous = signal.signal(signal.SIGUSR1, handler(wakeup))
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        started = time.monotonic()
        wakeup.wait(10)
        return time.monotonic() - started
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
        wakeup.close()


def test_a_signal_handler_that_pokes_ends_a_wait() -> None:
    """What SIGTERM and SIGHUP do in the daemon: the handler only pokes the pipe."""
    assert _poke_by_signal(lambda wakeup: lambda *_: wakeup.poke()) < 2


def test_set_wakeup_fd_makes_every_signal_end_a_wait() -> None:
    """The interpreter writes to the pipe itself, even while the handler cannot run yet."""

    def handler(wakeup: Wakeup) -> Any:
        previous = signal.set_wakeup_fd(wakeup.fd, warn_on_full_buffer=False)
        assert previous == -1
        return lambda *_: None

    try:
        assert _poke_by_signal(handler) < 2
    finally:
        signal.set_wakeup_fd(-1)


def test_poking_a_full_pipe_never_blocks_or_raises() -> None:
    wakeup = Wakeup()
    try:
        for _ in range(100_000):  # far past a pipe's 64 KiB
            wakeup.poke()
        started = time.monotonic()
        wakeup.wait(10)  # drains everything
        assert time.monotonic() - started < 2
        started = time.monotonic()
        wakeup.wait(0.05)
        assert time.monotonic() - started >= 0.04  # nothing left over
    finally:
        wakeup.close()
    wakeup.close()  # twice is harmless
