"""The vocabulary of steps: the file a worker holds, what it may use, and what it returns.

A step gets a `Context` (settings, the API, time, the API's health) and a `Tracked` file (its
sidecar record and what lives only in memory), and returns `Next`: when the file needs a
worker again. Every API call goes through `Context.call`, where the one failure model
(`failures.classify`) sorts out what went wrong, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from . import jobrecord, logs
from .api import Engine, RemoteJob
from .config import Config
from .errors import CallFailed
from .failures import Call, RetryPolicy, classify
from .health import Health
from .inputs import Defaults
from .jobrecord import JobEntry, JobRecord, isotime
from .logs import Throttle
from .metrics import Counters
from .schedule import Backoff
from .spool import Spool

T = TypeVar("T")
log = logs.get()


class Pool(Enum):
    LOCAL = "local"  # file work: validation, writing, archiving
    API = "api"  # calls to the Batch API


@dataclass(frozen=True)
class Next:
    """What a step says about when its file needs a worker again: after `seconds` (None: not
    for time's sake), and/or when a job slot is free (`slot`), and/or the moment a pause ends
    (`resume`), or never (`finished`)."""

    seconds: float | None = None
    slot: bool = False
    finished: bool = False
    resume: bool = False

    @staticmethod
    def now() -> Next:
        return Next(0.0)

    @staticmethod
    def after(seconds: float) -> Next:
        return Next(max(0.0, seconds))

    @staticmethod
    def wait_for_slot() -> Next:
        return Next(slot=True)

    @staticmethod
    def done() -> Next:
        return Next(finished=True)

    @staticmethod
    def until_resumed() -> Next:
        return Next(resume=True)

    @property
    def is_now(self) -> bool:
        return self.seconds == 0.0

    def also(self, other: Next) -> Next:
        """Both waits: the sooner time, a slot if either wants one, the end of a pause too."""
        times = [s for s in (self.seconds, other.seconds) if s is not None]
        return Next(
            min(times) if times else None,
            self.slot or other.slot,
            resume=self.resume or other.resume,
        )


UNTIL_RESUMED = float("inf")
"""What a job step returns instead of a delay while the daemon is paused: it runs again the
moment the pause ends (the supervisor's one probe finds out when), not on a timer of its own."""


@dataclass
class Tracked:
    """A file this process owns (it holds the name lock), with what lives only in memory."""

    name: str
    record: JobRecord
    lock_fd: int
    spool: Spool  # of the inbox it was claimed from (a reload may watch another)
    defaults: Defaults  # the settings it is validated with
    busy: bool = False
    granted: set[int] = field(default_factory=set)  # jobs given a slot, not yet started
    due: dict[int, float] = field(default_factory=dict)  # job -> clock time of its next step
    remote: dict[int, RemoteJob] = field(default_factory=dict)  # finished jobs, for collecting
    cancel_requested: bool = False
    dirty: bool = False  # the record has changes not saved yet (none that must be durable)
    verified: bool = True  # its work files are known to be whole (claimed by this process)
    marks: dict[tuple[int, str], float] = field(default_factory=dict)  # see `elapsed`
    quota_refused: set[int] = field(default_factory=set)  # jobs the quota refused in this run

    @property
    def sidecar(self) -> Path:
        return self.spool.sidecar(self.name)

    def elapsed(self, job: JobEntry, timer: str, now: float) -> float:
        """Seconds since `timer` of `job` was last read in this process (0 the first time).

        Grace periods, deferrals and give-up times add these up into the sidecar: measured on
        the monotonic clock, a clock step changes none of them, and the time a daemon was
        stopped counts for nothing (it waits longer after a restart, never shorter)."""
        key = (job.index, timer)
        last = self.marks.get(key, now)
        self.marks[key] = now
        return max(0.0, now - last)

    def forget_timer(self, job: JobEntry, timer: str) -> None:
        self.marks.pop((job.index, timer), None)

    def defer(self, job: JobEntry, seconds: float, now: float, wall: datetime) -> None:
        """Start `job` no sooner than `seconds` from now (a quota or follow-up round backoff)."""
        self.due[job.index] = now + seconds
        job.defer_seconds = seconds
        job.not_before = isotime(wall + timedelta(seconds=seconds))

    def deferred(self, job: JobEntry, now: float) -> float:
        """Seconds until a deferred job may start (0: it may)."""
        return max(0.0, self.due.get(job.index, now) - now) if job.not_before else 0.0

    def work(self, what: str) -> Path:
        return self.spool.work(self.record.claim_id, what)

    def job_file(self, job: JobEntry, what: str) -> Path:
        return self.work(f"j{job.index}.{what}")


@dataclass
class Context:
    """What steps need of the daemon: settings, the engine, time, the pause, counts, the log."""

    config: Config
    engine: Engine
    poll: Backoff
    policy: RetryPolicy
    health: Health
    counters: Counters
    throttle: Throttle
    clock: Callable[[], float]
    wall: Callable[[], datetime] = jobrecord.utcnow
    stopping: Callable[[], bool] = lambda: False

    def call(self, call: Call, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Make one API call; its failure is classified here, once, as `CallFailed`."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            failure = classify(exc, action)
            self.counters.call(call, failure.kind.value)
            self.health.failed(call, failure)
            raise CallFailed(call, failure) from exc
        self.counters.call(call, "ok")
        self.health.ok(call)
        return result

    def save(self, t: Tracked, *, durable: bool = False) -> None:
        """Rewrite the sidecar. `durable` (fsync) only before what must not happen twice -- a
        create or upload, choosing an outbox or archive name: anything else is found again
        after a power failure (a lost job name by looking the job up, say)."""
        t.record.summarize()
        jobrecord.save(t.record, t.sidecar, durable=durable)
        t.dirty = False

    def stamp(self, seconds: float = 0.0) -> str:
        return isotime(self.wall() + timedelta(seconds=seconds))
