"""The supervisor: claims inbox files and hands their steps to worker pools.

The main thread runs `tick()`: claim what the watcher says is ready, take over what no live
process owns, grant job slots in arrival order, dispatch due files. Two worker pools run the
steps (`steps.py`): one for file work (validation, writing, archiving), one for API calls, so
a slow API never holds up claiming or validation. Signal handlers only set flags and poke
the wake-up pipe.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import atomic, claims, logs
from .backend import Backend
from .config import Config, ConfigError
from .context import CallFailed, Context, LeftAlone, Next, Pool, Tracked
from .failures import Call, Health, RetryPolicy
from .inputs import Defaults
from .jobrecord import FileState, JobRecord, JobState, seconds_since, utcnow
from .notify import Notifier, SystemdStatus
from .schedule import Backoff, Scheduler, Sleeper
from .spool import Spool, is_candidate
from .steps import FILE_STEPS, advance
from .watcher import InboxWatcher

WORKERS = {Pool.LOCAL: 2, Pool.API: 4}
"""Threads per pool: file work never waits behind API calls."""

STOP_GRACE_SECONDS = 8.0
"""On SIGTERM, wait this long for steps in progress (a write finishes; an API call is cut off)."""

CLAIM_BATCH = 16
"""Files claimed per turn of the main loop before dispatching work."""

LOG_EVERY = 60.0
"""The same trouble (a folder that cannot be written, say) is logged at most this often."""

log = logs.get()


class WorkerPool:
    """Threads that run one file's steps at a time; knows how long each has been busy."""

    def __init__(self, name: str, threads: int, run: Callable[[str, Pool], None], pool: Pool):
        self.name = name
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._run = run
        self._pool = pool
        self.busy_since: dict[int, float] = {}
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"{name}-{i}")
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, name: str) -> None:
        self._queue.put(name)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def stuck(self, now: float, limit: float) -> bool:
        """Whether every thread has been on one task for longer than `limit` seconds."""
        busy = list(self.busy_since.values())
        return len(busy) == len(self._threads) and all(now - since > limit for since in busy)

    def _loop(self, number: int) -> None:
        while True:
            name = self._queue.get()
            if name is None:
                return
            self.busy_since[number] = time.monotonic()
            try:
                self._run(name, self._pool)
            finally:
                self.busy_since.pop(number, None)


@dataclass
class Outcome:
    """A finished file, for the `--once` summary and the exit status."""

    record: JobRecord


@dataclass
class _Waiting:
    """Files whose jobs wait for a slot, by arrival (a heap; stale entries skipped)."""

    heap: list[tuple[int, int, str]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, arrival: int, name: str) -> None:
        if name not in self.names:
            self.names.add(name)
            heapq.heappush(self.heap, (arrival, next(self.seq), name))


class Service:
    """The daemon. `run()` blocks until stopped (or, with `once`, until the inbox is done)."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        *,
        once: bool = False,
        reload_config: Callable[[], Config] | None = None,
        make_backend: Callable[[Config], Backend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleeper: Sleeper | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        workers: dict[Pool, int] | None = None,
        config_source: Path | None = None,
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        self.backend = backend
        self.once = once
        self._reload_config = reload_config
        self._make_backend = make_backend
        self.clock = clock
        self.wall = wall
        self._rng = rng or random.Random()
        self.scheduler = Scheduler(clock, sleeper)
        self.health = Health(clock)
        self.systemd = SystemdStatus(notifier or Notifier())
        self.config_source = config_source
        self._workers = WORKERS if workers is None else workers
        self._lock = threading.RLock()
        self.files: dict[str, Tracked] = {}
        self._waiting = _Waiting()
        self._quota_hold: int | None = None  # jobs in flight when the quota refused one
        self._quota_seen = 0
        self._stop = False  # set by signal handlers: plain flags, no locks
        self._reload = False
        self._once_names: set[str] = set()
        self.outcomes: list[Outcome] = []
        self._said: dict[str, float] = {}
        self._probing = False
        self._next_probe = 0.0
        self._pools: dict[Pool, WorkerPool] = {}
        self._apply_config(config)
        self.ctx = self._context()

    # ---- configuration -------------------------------------------------------------

    def _apply_config(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.inbox, config.outbox)
        self.defaults = Defaults.from_config(config)
        self.poll = Backoff.from_settings(config.poll, self._rng)
        self.policy = RetryPolicy(
            Backoff(
                config.api.backoff_initial_seconds,
                config.api.backoff_max_seconds,
                2.0,
                0.1,
                self._rng,
            ),
            pause_seconds=min(60.0, config.api.backoff_max_seconds),
        )
        for created in self.spool.heal():
            log.info("created a spool folder", folder=str(created))
        self.recovery = claims.Recovery(self.spool, self.backend.endpoint, self.backend.key_id)

    def _context(self) -> Context:
        return Context(
            config=self.config,
            backend=self.backend,
            poll=self.poll,
            policy=self.policy,
            health=self.health,
            clock=self.clock,
            wall=self.wall,
            stopping=lambda: self._stop,
        )

    def request_stop(self) -> None:
        """Signal-safe: stop taking files; finish steps in progress; exit."""
        self._stop = True
        self.scheduler.wake()

    def request_reload(self) -> None:
        """Signal-safe: reload the configuration at the next turn of the main loop."""
        self._reload = True
        self.scheduler.wake()

    @property
    def stopping(self) -> bool:
        return self._stop

    def reload(self) -> None:
        self._reload = False
        if self._reload_config is None:
            return
        self.systemd.reloading()
        old = self.config
        try:
            new = self._reload_config()
            new.system_instruction()
            backend = self.backend
            if new.api != old.api and self._make_backend is not None:
                backend = self._make_backend(new)
            Spool(new.inbox, new.outbox).heal()
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused", reason=str(exc), config="the old configuration stays")
            self.systemd.ready(self.status_text())
            return
        changed = sorted(key for key in new.model_fields if getattr(new, key) != getattr(old, key))
        self.backend = backend
        self._apply_config(new)
        self.ctx = self._context()
        if new.inbox != old.inbox:
            self.watcher.stop()
            self._start_watcher()
            self._recover()
        else:
            self.watcher.settle_seconds = new.inbox_settle_seconds
        log.info("configuration reloaded", changed=changed or "nothing")
        self.systemd.ready(self.status_text())

    # ---- main loop -----------------------------------------------------------------

    def start(self) -> None:
        """Clean up after a crash, start workers and the watcher, take what is there."""
        # Work files hold prompts and answers: like everything the daemon writes, not for
        # other users (as UMask=0027).
        os.umask(os.umask(0o077) | 0o027)
        for folder in (
            self.spool.outbox,
            self.spool.processing,
            self.spool.done,
            self.spool.failed,
        ):
            for stale in atomic.remove_stale_temps(folder):
                log.info("removed a temporary file left by a crash", path=str(stale))
        for pool, threads in self._workers.items():
            if threads:
                self._pools[pool] = WorkerPool(pool.value, threads, self._run_steps, pool)
                self._pools[pool].start()
        self._recover()
        self._start_watcher()
        if self.once:
            # Every input in the inbox now, settled or not: each is taken once it is complete.
            self._once_names = {n for n in os.listdir(self.spool.inbox) if is_candidate(n)}
            for name in self._once_names:
                self.watcher.note(name, complete=True)
        self._claim_ready(limit=None)  # READY=1 means: what was in the inbox at start is claimed
        self.systemd.ready(self.status_text())
        self._next_rescan = self.clock() + self.config.inbox_rescan_seconds
        log.info(
            "started",
            inbox=str(self.config.inbox),
            outbox=str(self.config.outbox),
            once=self.once,
            taken_over=len(self.files),
        )

    def run(self) -> int:
        """Run until stopped; with `once`, until every file present at start has finished."""
        self.start()
        try:
            while not self._stop:
                self.tick()
                if self.once and self.once_finished():
                    break
                self.scheduler.wait(self._wait_limit())
        finally:
            self.shutdown()
        failed = any(o.record.state is FileState.FAILED for o in self.outcomes)
        return 1 if self.once and failed else 0

    def tick(self) -> None:
        """One turn of the main loop."""
        if self._reload:
            self.reload()
        if self.clock() >= self._next_rescan:
            self._heal()
            self.watcher.rescan()
            self._recover()
            self._next_rescan = self.clock() + self.config.inbox_rescan_seconds
        self._claim_ready(limit=CLAIM_BATCH)
        self._take_cancel_requests()
        self._probe_if_paused()
        self._grant_slots()
        for name in self.scheduler.pop_due():
            self._dispatch(name)
        self.systemd.tick(self.status_text, progressing=not self._stuck())

    def _wait_limit(self) -> float:
        limit = max(0.0, self._next_rescan - self.clock())
        if self.watcher.pending:
            limit = min(limit, max(0.05, self.config.inbox_settle_seconds / 4))
        return min(limit, self.systemd.next_ping_in(), 5.0)

    def _stuck(self) -> bool:
        """Every worker of a pool on one task far past any call's deadline: let systemd restart us."""
        limit = self.config.api.timeout_seconds * 2 + 60
        now = time.monotonic()
        return any(pool.stuck(now, limit) for pool in self._pools.values())

    def once_finished(self) -> bool:
        with self._lock:
            if self.files:
                return False
        return not any(os.path.lexists(self.spool.inbox / name) for name in self._once_names)

    def shutdown(self) -> None:
        self._stop = True
        self.systemd.stopping()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and self._pools:
            with self._lock:
                if not any(t.busy for t in self.files.values()):
                    break
            self.systemd.tick(self.status_text, progressing=True)
            time.sleep(0.02)
        for pool in self._pools.values():
            pool.stop()
        self.watcher.stop()
        self.scheduler.wakeup.close()
        log.info("stopped", in_flight=len(self.files))

    def _start_watcher(self) -> None:
        self.watcher = InboxWatcher(
            self.config.inbox,
            self.config.inbox_settle_seconds,
            self.clock,
            on_event=self.scheduler.wake,
        )
        self.watcher.start()

    def status_text(self) -> str:
        with self._lock:
            states = [t.record.state for t in self.files.values()]
        active = sum(1 for s in states if s.in_flight and s is not FileState.QUEUED)
        queued = sum(1 for s in states if s in (FileState.CLAIMED, FileState.QUEUED))
        done = sum(1 for o in self.outcomes if o.record.state is FileState.DONE)
        text = f"{queued} queued, {active} active, {done} done, {len(self.outcomes) - done} failed"
        paused = self.health.paused
        return f"paused: {paused}; {text}" if paused else text

    # ---- claiming and taking over --------------------------------------------------

    def _claim_ready(self, limit: int | None) -> None:
        if self._stop:
            return
        ready = self.watcher.ready()
        if limit is not None and len(ready) > limit:
            ready = ready[:limit]
            self.scheduler.wake()  # claim more at the next turn, after dispatching work
        for path, arrival in ready:
            if self.once and path.name not in self._once_names:
                continue
            with self._lock:
                if path.name in self.files:
                    continue  # a same-named file is still being processed: it waits
            try:
                claimed = claims.claim(self.spool, path, arrival)
            except FileNotFoundError as exc:
                if not self.spool.processing.is_dir():
                    self._heal()
                    continue
                if exc.filename and Path(exc.filename) == path:
                    self.watcher.forget(path.name)
                continue
            except OSError as exc:
                self._say("cannot claim", f"claim:{exc.errno}", file=path.name, error=str(exc))
                continue
            if claimed is None:
                self._say(
                    "waiting: a file of the same name is still being processed",
                    f"wait:{path.name}",
                    file=path.name,
                )
                continue
            self.watcher.forget(path.name)
            self._track(claimed)
            log.info("claimed", file=path.name)

    def _recover(self) -> None:
        with self._lock:
            owned = {name: t.record.claim_id for name, t in self.files.items()}
        for stale in atomic.remove_stale_temps(self.spool.processing):
            log.info("removed a temporary file left by a crash", path=str(stale))
        for claimed in self.recovery.scan(owned):
            self._track(claimed)
            log.info("resumed", file=claimed.record.input, state=claimed.record.state.value)

    def _track(self, claimed: claims.Claimed) -> None:
        record = claimed.record
        t = Tracked(record.input, record, claimed.lock_fd, claimed.spool, self.defaults)
        now_wall = self.ctx.wall()
        for job in record.jobs:
            if job.state is JobState.RUNNING and job.next_poll_at:
                remaining = -seconds_since(job.next_poll_at, now_wall)
                t.due[job.index] = self.clock() + min(
                    max(0.0, remaining), self.config.poll.max_seconds
                )
        with self._lock:
            self.files[record.input] = t
        self.scheduler.schedule(record.input, 0)

    def _heal(self) -> None:
        for created in self.spool.heal():
            log.warning("recreated a missing spool folder", folder=str(created))

    def _say(self, event: str, cause: str, **fields: object) -> None:
        """Log `event` at most once per minute per cause."""
        now = self.clock()
        if now - self._said.get(cause, -1e18) >= LOG_EVERY:
            self._said[cause] = now
            log.warning(event, **fields)

    # ---- cancel requests -----------------------------------------------------------

    def _take_cancel_requests(self) -> None:
        for name in self.watcher.take_cancel_requests():
            with self._lock:
                t = self.files.get(name)
            if t is None or t.cancel_requested or not t.spool.cancel_marker(name).exists():
                continue
            if t.record.state in (FileState.WRITING, FileState.DONE, FileState.FAILED):
                continue
            log.info("cancel requested", file=name, state=t.record.state.value)
            t.cancel_requested = True
            t.granted.clear()
            for job in t.record.jobs:
                t.due[job.index] = self.clock()
            if not t.busy:
                self.scheduler.schedule(name, 0)

    def _probe_if_paused(self) -> None:
        """While paused, one cheap call now and then finds out when the key works again."""
        if not self.health.paused or self._probing or self._stop:
            return
        if self.clock() < self._next_probe:
            return
        self._next_probe = self.clock() + self.policy.pause_seconds
        self._probing = True

        def probe() -> None:
            try:
                self.ctx.call(Call.PROBE, "check the API key", self.backend.probe)
            except CallFailed:
                pass
            finally:
                self._probing = False
                self.scheduler.wake()

        if self._pools:
            threading.Thread(target=probe, name="probe", daemon=True).start()
        else:
            probe()

    # ---- job slots -----------------------------------------------------------------

    def _grant_slots(self) -> None:
        """Give free job slots to waiting jobs, oldest file first."""
        waiting = self._waiting
        if not waiting.heap or self._stop or self.health.paused:
            return
        limits = self.config.limits
        with self._lock:
            files = list(self.files.values())
        jobs = [(t, j) for t in files for j in t.record.jobs]
        active = sum(1 for t, j in jobs if j.state.holds_slot or j.index in t.granted)
        tokens = sum(j.tokens for t, j in jobs if j.state.holds_slot or j.index in t.granted)
        if self.health.quota_refusals != self._quota_seen:
            self._quota_seen = self.health.quota_refusals
            self._quota_hold = active
        if self._quota_hold is not None:
            if active >= self._quota_hold and active > 0:
                return  # wait until a job in flight has ended
            self._quota_hold = None
        now_wall = self.ctx.wall()
        deferred: list[tuple[int, int, str]] = []
        while waiting.heap and active < limits.max_active_jobs:
            arrival, seq, name = heapq.heappop(waiting.heap)
            waiting.names.discard(name)
            with self._lock:
                t = self.files.get(name)
            if t is None:
                continue
            granted = False
            blocked = False
            for job in t.record.jobs:
                if job.state is not JobState.QUEUED or job.index in t.granted:
                    continue
                if job.not_before and seconds_since(job.not_before, now_wall) < 0:
                    blocked = True
                    continue
                budget = limits.max_enqueued_tokens
                if budget is not None and tokens + job.tokens > budget and active > 0:
                    blocked = True
                    break
                if active >= limits.max_active_jobs:
                    blocked = True
                    break
                t.granted.add(job.index)
                active += 1
                tokens += job.tokens
                granted = True
            if blocked:
                deferred.append((arrival, seq, name))
            if granted and not t.busy:
                self.scheduler.schedule(name, 0)
            if blocked and budget_full(limits.max_enqueued_tokens, tokens):
                break
        for item in deferred:
            heapq.heappush(waiting.heap, item)
            waiting.names.add(item[2])

    # ---- dispatching ---------------------------------------------------------------

    def _dispatch(self, name: str) -> None:
        with self._lock:
            t = self.files.get(name)
            if t is None or t.busy:
                return  # a busy file is rescheduled when its step returns
            t.busy = True
        pool = FILE_STEPS[t.record.state].pool
        worker = self._pools.get(pool)
        if worker is None:
            self._run_steps(name, pool)  # no threads (tests): run it here
        else:
            worker.submit(name)

    def _run_steps(self, name: str, pool: Pool) -> None:
        with self._lock:
            t = self.files.get(name)
        if t is None:
            return
        result = Next.after(1.0)
        try:
            result = advance(self.ctx, t, pool)
        except LeftAlone as exc:
            log.warning("left alone", file=name, reason=str(exc))
            self._forget(t)
            return
        except Exception as exc:  # a bug in the failure handling itself: keep the thread alive
            log.exception("step failed; will retry", file=name, error=repr(exc))
            result = Next.after(self.policy.backoff.delay(min(t.record.retries, 10)))
        finally:
            t.busy = False
        self._after_step(t, result)
        self.scheduler.wake()

    def _after_step(self, t: Tracked, result: Next) -> None:
        if result.kind == "finished":
            self._forget(t)
            self.outcomes.append(Outcome(t.record))
            self.watcher.rescan()  # a same-named file may be waiting in the inbox
            return
        if result.kind == "slot":
            self._waiting.add(t.record.arrival, t.name)
            return
        if self._stop and result.kind != "now":
            return
        self.scheduler.schedule(t.name, result.seconds)

    def _forget(self, t: Tracked) -> None:
        with self._lock:
            self.files.pop(t.name, None)
        self.scheduler.cancel(t.name)
        claims.release(t.lock_fd)


def budget_full(budget: int | None, tokens: int) -> bool:
    return budget is not None and tokens >= budget
