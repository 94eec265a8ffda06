"""Time: exponential backoff with jitter and a cap, one timer queue for all files, and a
wake-up pipe that signal handlers and worker threads may poke without taking a lock.

Clock, sleeper and random source are injected so tests of backoff are exact and instant.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import PollSettings

Clock = Callable[[], float]
Sleeper = Callable[[float], None]


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt `n` (0-based): initial * multiplier**n, jittered, never above max."""

    initial: float
    maximum: float
    multiplier: float = 2.0
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, poll: PollSettings, rng: random.Random | None = None) -> Backoff:
        return cls(
            poll.initial_seconds,
            poll.max_seconds,
            poll.multiplier,
            poll.jitter,
            rng or random.Random(),
        )

    def delay(self, attempt: int) -> float:
        # Huge attempt counts (or a big multiplier) must not overflow a float: that is the cap.
        try:
            base = min(self.maximum, self.initial * self.multiplier ** max(0, min(attempt, 200)))
        except OverflowError:
            base = self.maximum
        if self.jitter:
            base *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, max(0.0, base))


class Wakeup:
    """A self-pipe: `poke()` from a signal handler or any thread ends a `wait()` in the main loop.

    Writing a byte to a non-blocking pipe takes no Python lock, so it is safe inside a signal
    handler; `signal.set_wakeup_fd(wakeup.fd)` makes the interpreter poke it on every signal.
    """

    def __init__(self) -> None:
        self._read, self.fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            os.write(self.fd, b"\0")

    def wait(self, timeout: float) -> None:
        """Sleep until poked or `timeout` seconds pass; then drain the pipe."""
        if timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self._read], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read, 4096):
                pass

    def close(self) -> None:
        for fd in (self._read, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Scheduler:
    """Due times for many keys in one heap; `wait` sleeps until the next is due or a wake-up.

    Rescheduling a key replaces its previous time (stale heap entries are skipped lazily), so
    each operation costs O(log n) however many files are in flight.
    """

    def __init__(self, clock: Clock = time.monotonic, sleeper: Sleeper | None = None) -> None:
        self.clock = clock
        self.wakeup = Wakeup()
        self._sleeper = sleeper
        self._heap: list[tuple[float, int, str]] = []
        self._due_at: dict[str, float] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def schedule(self, key: str, delay: float) -> float:
        """Make `key` due `delay` seconds from now; returns the clock time it becomes due."""
        at = self.clock() + max(0.0, delay)
        with self._lock:
            self._due_at[key] = at
            heapq.heappush(self._heap, (at, next(self._seq), key))
        return at

    def cancel(self, key: str) -> None:
        with self._lock:
            self._due_at.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._due_at

    def __len__(self) -> int:
        return len(self._due_at)

    def pop_due(self) -> list[str]:
        """Remove and return every key whose time has come, earliest first."""
        now = self.clock()
        due = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                at, _, key = heapq.heappop(self._heap)
                if self._due_at.get(key) == at:
                    del self._due_at[key]
                    due.append(key)
        return due

    def next_delay(self) -> float | None:
        """Seconds until the earliest key is due (0 if overdue), None when nothing is scheduled."""
        with self._lock:
            while self._heap and self._due_at.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)
            if not self._heap:
                return None
            return max(0.0, self._heap[0][0] - self.clock())

    def wait(self, longest: float) -> None:
        """Sleep until the next key is due, `longest` passes, or `wake()` is called."""
        delay = self.next_delay()
        timeout = longest if delay is None else min(delay, longest)
        if self._sleeper is not None:
            self._sleeper(timeout)
            return
        self.wakeup.wait(timeout)

    def wake(self) -> None:
        """Interrupt `wait` (a new file, a finished step, a signal); lock-free."""
        self.wakeup.poke()
