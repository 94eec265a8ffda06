"""Job slots: at most `limits.max_active_jobs` jobs -- and `limits.max_enqueued_tokens`
estimated input tokens -- are in flight at once; files whose jobs wait for a slot are served
oldest first (by arrival in the inbox).

The supervisor's main loop is the only one that grants slots; workers report, after each
step, how many slots a file holds (`account`), so no turn of the loop has to count them all.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

from .config import Limits
from .context import Tracked
from .jobrecord import JobState


class Slots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[tuple[int, int, str]] = []  # (arrival, seq, name); stale ones skipped
        self._queued: set[str] = set()
        self._seq = itertools.count()
        self._held: dict[str, tuple[int, int]] = {}  # name -> (slots, estimated tokens)
        self._total = (0, 0)
        self._unsaved: set[str] = set()  # joined the queue with unsaved changes
        self._quota_hold: int | None = None  # jobs in flight when the quota refused one
        self._quota_seen = 0

    @property
    def waiting(self) -> bool:
        return bool(self._heap)

    @property
    def held(self) -> tuple[int, int]:
        """Slots and estimated tokens held now."""
        with self._lock:
            return self._total

    def wait(self, t: Tracked) -> None:
        """`t` has a job waiting for a slot."""
        with self._lock:
            if t.name not in self._queued:
                self._queued.add(t.name)
                heapq.heappush(self._heap, (t.record.arrival, next(self._seq), t.name))
            if t.dirty:
                self._unsaved.add(t.name)

    def account(self, name: str, t: Tracked | None) -> None:
        """Record what `t` holds now (None: it holds nothing any more)."""
        held = (0, 0)
        if t is not None:
            jobs = [j for j in t.record.jobs if j.state.holds_slot or j.index in t.granted]
            held = (len(jobs), sum(j.tokens for j in jobs))
        with self._lock:
            old = self._held.pop(name, (0, 0))
            if held != (0, 0):
                self._held[name] = held
            slots, tokens = self._total
            self._total = (slots - old[0] + held[0], tokens - old[1] + held[1])

    def grant(
        self,
        lookup: Callable[[str], Tracked | None],
        limits: Limits,
        now: float,
        quota_refusals: int,
    ) -> list[Tracked]:
        """Give free slots to waiting jobs, oldest file first; the files that got one."""
        active, tokens = self.held
        if quota_refusals != self._quota_seen:  # the quota refused a job: hold back until
            self._quota_seen = quota_refusals  # a job in flight has ended
            self._quota_hold = active
        if self._quota_hold is not None:
            if 0 < self._quota_hold <= active:
                return []
            self._quota_hold = None
        budget = limits.max_enqueued_tokens
        granted: list[Tracked] = []
        deferred: list[tuple[int, int, str]] = []
        while self._heap and active < limits.max_active_jobs:
            with self._lock:
                item = heapq.heappop(self._heap)
                self._queued.discard(item[2])
            t = lookup(item[2])
            if t is None:
                continue
            blocked = False
            before = len(t.granted)
            for job in t.record.jobs:
                if job.state is not JobState.QUEUED or job.index in t.granted:
                    continue
                if t.deferred(job, now) > 0:
                    blocked = True  # not yet (a quota or round backoff): later jobs may go
                    continue
                if active >= limits.max_active_jobs or (
                    budget is not None and active > 0 and tokens + job.tokens > budget
                ):
                    blocked = True
                    break
                t.granted.add(job.index)
                active += 1
                tokens += job.tokens
            if len(t.granted) > before:
                self.account(t.name, t)
                granted.append(t)
            if blocked:
                deferred.append(item)
                if budget is not None and tokens >= budget:
                    break
        with self._lock:
            for item in deferred:
                heapq.heappush(self._heap, item)
                self._queued.add(item[2])
        return granted

    def take_unsaved(self) -> set[str]:
        """Files still waiting whose validation is not saved yet (it is worth saving now)."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, set()
            return unsaved & self._queued
