"""The supervisor: claims inbox files and hands their steps to worker pools.

The main thread runs `tick()`: claim what the watcher says is ready, take over what no live
process owns, grant job slots in arrival order, dispatch due files. Two worker pools run the
steps (`steps.py`): one for file work (validation, writing, archiving), one for API calls, so
a slow API never holds up claiming or validation. Signal handlers only set flags and poke
the wake-up pipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from . import atomic, claims, logs, metrics
from .api import Engine
from .config import Config
from .context import Context, Next, Pool, Tracked
from .errors import CallFailed, ConfigError, LeftAlone
from .failures import Call, RetryPolicy
from .faults import crash_point
from .health import Health
from .inputs import Defaults
from .jobrecord import FileState, JobRecord, JobState, seconds_since, utcnow
from .metrics import Counters
from .notify import Notifier, SystemdStatus
from .presence import Presence
from .schedule import Backoff, Scheduler, Sleeper
from .slots import Slots
from .spool import Spool, is_candidate
from .steps import FILE_STEPS, advance
from .watcher import InboxWatcher
from .workers import WorkerPool

WORKERS = {Pool.LOCAL: 2, Pool.API: 4}
"""Threads per pool: file work never waits behind API calls."""

STOP_GRACE_SECONDS = 8.0
"""On SIGTERM, wait this long for steps in progress (a write finishes; an API call is cut off)."""

READY_CLAIM_SECONDS = 60.0
"""At start, READY=1 waits (at most this long) until the files already in the inbox are claimed."""

CLAIM_BATCH = 16
"""Files claimed per turn of the main loop before dispatching work."""

HEAL_EVERY = 5.0
"""Seconds between checks that the spool folders exist and the inbox is the one watched (each
wake-up of an idle daemon costs CPU: this is also the idle main loop's longest sleep)."""

log = logs.get()


class Service:
    """The daemon. `run()` blocks until stopped (or, with `once`, until the inbox is done)."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        once: bool = False,
        reload_config: Callable[[], Config] | None = None,
        make_engine: Callable[[Config], Engine] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleeper: Sleeper | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        workers: dict[Pool, int] | None = None,
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.once = once
        self._reload_config = reload_config
        self._make_engine = make_engine
        self.clock = clock
        self.wall = wall
        self._rng = rng or random.Random()
        self.scheduler = Scheduler(clock, sleeper)
        self.health = Health(clock)
        self.counters = Counters()
        self.throttle = logs.Throttle(clock)
        self.systemd = SystemdStatus(notifier or Notifier())
        self._workers = WORKERS if workers is None else workers
        self._lock = threading.RLock()
        self.files: dict[str, Tracked] = {}
        self.slots = Slots()
        self._stop = False  # set by signal handlers: plain flags, no locks
        self._reload = False
        self._once_names: set[str] = set()
        self.outcomes: list[JobRecord] = []  # with `once` only: for its summary
        self.finished = metrics.Finished()
        self._probing = False
        self._claiming: set[str] = set()  # handed to a worker to claim
        self._parked: set[str] = set()  # files with steps held back by the pause
        self._next_probe = 0.0
        self._pools: dict[Pool, WorkerPool] = {}
        self.presence: Presence | None = None
        self._started_wall = time.time()
        self._next_metrics = 0.0
        # Work files hold prompts and answers: like everything the daemon writes (its folders
        # included), not for other users (as UMask=0027).
        os.umask(os.umask(0o077) | 0o027)
        self._apply_config(config)
        self.ctx = self._context()

    # ---- configuration -------------------------------------------------------------

    def _apply_config(self, config: Config) -> None:
        self.config = config
        self._config_source = config.describe_source()
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
            pause_seconds=config.api.probe_seconds,
        )
        for created in self.spool.heal():
            log.info("created a spool folder", folder=str(created))
        self.recovery = claims.Recovery(self.spool, self.engine.endpoint, self.engine.account)

    def _context(self) -> Context:
        return Context(
            config=self.config,
            engine=self.engine,
            poll=self.poll,
            policy=self.policy,
            health=self.health,
            counters=self.counters,
            throttle=self.throttle,
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

    def reload(self) -> None:
        self._reload = False
        if self._reload_config is None:
            return
        self.systemd.reloading()
        old = self.config
        try:
            new = self._reload_config()
            new.system_instruction()
            engine = self.engine
            moved = (new.api, new.backend, new.vertex) != (old.api, old.backend, old.vertex)
            if moved and self._make_engine is not None:
                engine = self._make_engine(new)
            Spool(new.inbox, new.outbox).heal()
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused", reason=str(exc), config="the old configuration stays")
            self.systemd.ready(self.status_text())
            return
        changed = sorted(k for k in type(new).model_fields if getattr(new, k) != getattr(old, k))
        self.engine = engine
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
        for folder in (
            self.spool.outbox,
            self.spool.done,
            self.spool.failed,
        ):  # processing/: _recover
            for stale in atomic.remove_stale_temps(folder):
                log.info("removed a temporary file left by a crash", path=str(stale))
        for pool, threads in self._workers.items():
            if threads:
                self._pools[pool] = WorkerPool(pool.value, threads)
                self._pools[pool].start()
        self._recover()
        self._start_watcher()
        self._report()  # the presence file: `status` shows a running daemon from here on
        if self.once:
            # Every input in the inbox now, settled or not: each is taken once it is complete.
            self._once_names = {n for n in os.listdir(self.spool.inbox) if is_candidate(n)}
            for name in self._once_names:
                self.watcher.note(name, complete=True)
        self._claim_ready(limit=None)  # READY=1 means: what was in the inbox at start is claimed
        deadline = time.monotonic() + READY_CLAIM_SECONDS
        while self._claiming and time.monotonic() < deadline:
            time.sleep(0.01)  # the file workers claim them
        self.systemd.ready(self.status_text())
        self._next_rescan = self.clock() + self.config.inbox_rescan_seconds
        self._next_heal = self.clock() + HEAL_EVERY
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
        return self.exit_status()

    def exit_status(self) -> int:
        """With `once`: 1 if a file got an error report, or waits for a quota nothing of ours
        will free (left for the next run); else 0."""
        left = any(self._quota_bound(t) for t in self.files.values())
        return 1 if self.once and (self.finished.failed or left) else 0

    def tick(self) -> None:
        """One turn of the main loop."""
        if self._reload:
            self.reload()
        if self.clock() >= self._next_heal:
            self._heal()
            if self.watcher.replaced():
                log.warning("the inbox folder was replaced; watching the new one")
                self.watcher.stop()
                self._start_watcher()
            self._next_heal = self.clock() + HEAL_EVERY
        if self.clock() >= self._next_rescan:
            self.watcher.rescan()
            self._recover()
            self._next_rescan = self.clock() + self.config.inbox_rescan_seconds
        self._claim_ready(limit=CLAIM_BATCH)
        self._take_cancel_requests()
        self._probe_if_paused()
        self._resume_parked()
        self._grant_slots()
        for name in self.scheduler.pop_due():
            self._dispatch(name)
        self.systemd.tick(self.status_text, progressing=not self._stuck())
        self._report()

    def _wait_limit(self) -> float:
        limit = max(0.0, self._next_rescan - self.clock())
        if self.watcher.pending:
            limit = min(limit, max(0.05, self.config.inbox_settle_seconds / 4))
        limit = min(limit, max(0.0, self._next_heal - self.clock()))
        return min(limit, self.systemd.next_ping_in(), 5.0)

    def _stuck(self) -> bool:
        """Every worker of a pool on one task far past any call's deadline: let systemd restart us."""
        limit = self.config.api.timeout_seconds * 2 + 60
        now = time.monotonic()
        return any(pool.stuck(now, limit) for pool in self._pools.values())

    def once_finished(self) -> bool:
        """With `once`: every file present at start has finished, or waits for a quota that
        nothing of this daemon's will free (no job of its own in flight): left for the next run."""
        with self._lock:
            if self._claiming or any(not self._quota_bound(t) for t in self.files.values()):
                return False
        if self.files and self.slots.held[0]:
            return False
        return not any(os.path.lexists(self.spool.inbox / name) for name in self._once_names)

    @staticmethod
    def _quota_bound(t: Tracked) -> bool:
        """Whether all a file's unfinished jobs wait in the queue, refused for the token quota
        since this daemon started (one restarted in such a wait tries once more first)."""
        waiting = [j for j in t.record.jobs if j.state is not JobState.COLLECTED]
        return bool(waiting) and all(
            j.state is JobState.QUEUED and j.index in t.quota_refused for j in waiting
        )

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
        self._report(final=True)
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
            quota = sum(1 for t in self.files.values() if self._quota_bound(t))
        active = sum(1 for s in states if s.in_flight and s is not FileState.QUEUED)
        queued = sum(1 for s in states if s in (FileState.CLAIMED, FileState.QUEUED))
        done, failed = self.finished.done, self.finished.failed
        text = f"{queued} queued, {active} active, {done} done, {failed} failed"
        if quota:
            text += f", {quota} waiting for quota"
        paused = self.health.paused
        return f"paused: {paused}; {text}" if paused else text

    # ---- presence (status) and metrics ---------------------------------------------

    def _report(self, *, final: bool = False) -> None:
        """Keep the presence file fresh (removed at `final`) and rewrite the metrics file when due."""
        presence = self.presence
        if presence is not None and (final or presence.spool.processing != self.spool.processing):
            presence.stop()  # a clean stop, or a reload moved the inbox
            self.presence = presence = None
        if presence is None and not final:
            presence = Presence(
                self.spool, config=self._config_source, clock=self.clock, wall=self.wall
            )
            try:
                for stale in presence.start(self.health.paused):
                    log.info("removed what a stopped daemon left", path=str(stale))
                self.presence = presence
            except OSError as exc:
                self._say("cannot write the presence file", "presence", error=str(exc))
        elif presence is not None:
            presence.beat(paused=self.health.paused, config=self._config_source)
        path = self.config.metrics_file
        if path is not None and (final or self.clock() >= self._next_metrics):
            self._next_metrics = self.clock() + metrics.METRICS_SECONDS
            try:
                metrics.write(path, self._metrics_view())
            except OSError as exc:
                self._say("cannot write the metrics file", "metrics", error=str(exc))

    def _metrics_view(self) -> metrics.View:
        with self._lock:
            in_flight = [t.record for t in self.files.values()]
        return metrics.View(
            in_flight=in_flight,
            finished=self.finished,
            health=self.health,
            counters=self.counters,
            waiting=self.watcher.pending,
            ignored=len(self.watcher.ignored),
            started=self._started_wall,
            oldest_arrival=min(
                (a for a in (self.watcher.oldest_arrival(), *(r.arrival for r in in_flight)) if a),
                default=None,
            ),
            now=time.time(),
        )

    # ---- claiming and taking over --------------------------------------------------

    def _claim_ready(self, limit: int | None) -> None:
        """Hand files that are ready to a file worker in batches, oldest first: it claims and
        validates them (claiming takes a dozen system calls a file: not a job for the main
        loop), each batch in one thread, so no work passes between threads on the way."""
        if self._stop:
            return
        batch: list[tuple[Path, int]] = []
        for path, arrival in self.watcher.ready(limit):
            name = path.name
            if self.once and name not in self._once_names:
                self.watcher.put_back(name)
                continue
            with self._lock:
                busy = name in self.files  # a same-named file is still being processed
            if busy or name in self._claiming:
                self.watcher.put_back(name)
                continue
            self._claiming.add(name)
            batch.append((path, arrival))
            if len(batch) == CLAIM_BATCH:
                self._run_in(Pool.LOCAL, functools.partial(self._claim_batch, batch), urgent=True)
                batch = []
        if batch:
            self._run_in(Pool.LOCAL, functools.partial(self._claim_batch, batch), urgent=True)

    def _claim_batch(self, batch: list[tuple[Path, int]]) -> None:
        """Claim files (in a file worker; processing/ made durable once for them all), then
        run the first steps of each."""
        taken = [t for path, arrival in batch if (t := self._claim(path, arrival)) is not None]
        if taken:
            with contextlib.suppress(OSError):  # (a claim lost to a power failure comes back)
                atomic.fsync_dir(self.spool.processing)
        for t in taken:
            crash_point("after_claim")
            self._run_steps(t.name, Pool.LOCAL)

    def _claim(self, path: Path, arrival: int) -> Tracked | None:
        """Claim one file and track it (busy: its first steps run next, in this thread)."""
        taken = None
        try:
            taken = claims.claim(self.spool, path, arrival)
        except FileNotFoundError:
            if not self.spool.processing.is_dir():
                self._heal()
        except OSError as exc:
            self._say("cannot claim", f"claim:{exc.errno}", file=path.name, error=str(exc))
        if taken is None:
            self._claiming.discard(path.name)
            if os.path.lexists(path):
                self._say(
                    "waiting: a file of the same name is still being processed",
                    f"wait:{path.name}",
                    file=path.name,
                )
                self.watcher.put_back(path.name)
            else:
                self.watcher.forget(path.name)
            return None
        self.watcher.forget(path.name)
        log.info("claimed", file=taken.record.input)
        with self._lock:  # tracked before it stops counting as being claimed (`once_finished`)
            t = self._track(taken, schedule=False)
            t.busy = True
            self._claiming.discard(path.name)
        return t

    def _recover(self) -> None:
        with self._lock:
            owned = {name: t.record.claim_id for name, t in self.files.items()}
        for stale in atomic.remove_stale_temps(self.spool.processing):
            log.info("removed a temporary file left by a crash", path=str(stale))
        for claimed in self.recovery.scan(owned):
            self._track(claimed)
            log.info("resumed", file=claimed.record.input, state=claimed.record.state.value)

    def _track(self, claimed: claims.Claimed, *, schedule: bool = True) -> Tracked:
        record = claimed.record
        defaults = self.defaults
        if record.filter_json is not None:  # results are written as the file was claimed
            defaults = dataclasses.replace(defaults, filter_json=record.filter_json)
        t = Tracked(record.input, record, claimed.lock_fd, claimed.spool, defaults)
        t.verified = claimed.fresh
        now_wall = self.ctx.wall()
        for job in record.jobs:  # wall-clock times, each kept within the wait it stands for
            if job.state is JobState.RUNNING and job.next_poll_at:
                remaining = -seconds_since(job.next_poll_at, now_wall)
                t.due[job.index] = self.clock() + min(
                    max(0.0, remaining), self.config.poll.max_seconds
                )
            elif job.state is JobState.QUEUED and job.not_before:
                remaining = -seconds_since(job.not_before, now_wall)
                t.due[job.index] = self.clock() + min(max(0.0, remaining), job.defer_seconds)
        with self._lock:
            self.files[record.input] = t
        self.slots.account(t.name, t)
        if schedule:
            self.scheduler.schedule(record.input, 0)
        return t

    def _heal(self) -> None:
        try:
            created = self.spool.heal()
        except OSError as exc:
            self._say("cannot recreate a spool folder", f"heal:{exc.errno}", error=str(exc))
            return
        for folder in created:
            log.warning("recreated a missing spool folder", folder=str(folder))

    def _say(self, event: str, cause: str, **fields: object) -> None:
        """Log `event` at most once per minute per cause."""
        if self.throttle.due(cause):
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

    def _resume_parked(self) -> None:
        """The pause is over: every step it held back runs now, not at a time of its own."""
        if not self._parked or self.health.paused:
            return
        with self._lock:
            parked, self._parked = self._parked, set()
        for name in parked:
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
                self.ctx.call(Call.PROBE, "check the API key", self.engine.probe)
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
        """Give free job slots to waiting jobs, oldest file first (see `slots.py`)."""
        if not self.slots.waiting or self._stop or self.health.paused:
            return
        granted = self.slots.grant(
            self._file, self.config.limits, self.clock(), self.counters.quota_refusals
        )
        for t in granted:
            if not t.busy:
                self.scheduler.schedule(t.name, 0)
        for name in self.slots.take_unsaved():
            self._save_if_dirty(name)

    def _file(self, name: str) -> Tracked | None:
        with self._lock:
            return self.files.get(name)

    def _save_if_dirty(self, name: str) -> None:
        """A file that waits for a slot has its validation saved (by a file worker)."""
        with self._lock:
            t = self.files.get(name)
            if t is None or not t.dirty or t.busy:
                return
            t.busy = True

        def save() -> None:
            try:
                if t.dirty:
                    self.ctx.save(t)
            except OSError as exc:
                log.warning("cannot save the sidecar", file=name, error=str(exc))
            finally:
                t.busy = False
                if t.granted:  # granted meanwhile: its dispatch found it busy
                    self.scheduler.schedule(name, 0)
                    self.scheduler.wake()

        self._run_in(Pool.LOCAL, save)

    # ---- dispatching ---------------------------------------------------------------

    def _run_in(self, pool: Pool, task: Callable[[], None], urgent: bool = False) -> None:
        """Hand `task` to the pool's workers; without threads (tests), run it here."""
        worker = self._pools.get(pool)
        if worker is None:
            task()
        else:
            worker.submit(task, urgent)

    def _dispatch(self, name: str) -> None:
        with self._lock:
            t = self.files.get(name)
            if t is None or t.busy:
                return  # a busy file is rescheduled when its step returns
            t.busy = True
        pool = FILE_STEPS[t.record.state].pool
        urgent = bool(t.granted) or any(
            j.state in (JobState.UPLOADING, JobState.SUBMITTING) for j in t.record.jobs
        )
        self._run_in(pool, functools.partial(self._run_steps, name, pool), urgent)

    def _run_steps(self, name: str, pool: Pool) -> None:
        with self._lock:
            t = self.files.get(name)
        if t is None:
            return
        result = Next.after(1.0)
        try:
            result = advance(self.ctx, t, pool)
        except LeftAlone as exc:
            self.recovery.leave(t.record, str(exc))
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
        if result.finished:
            self._forget(t)  # gives its slots back
            self.finished.add(t.record, self.config.cost_of(t.record.model, t.record.tokens))
            if self.once:
                self.outcomes.append(t.record)
            self.watcher.rescan()  # a same-named file may be waiting in the inbox
            return
        self.slots.account(t.name, t)
        if result.slot:
            self.slots.wait(t)
        if result.resume:
            with self._lock:
                self._parked.add(t.name)
        if result.seconds is None or (self._stop and not result.is_now):
            return
        self.scheduler.schedule(t.name, result.seconds)

    def _forget(self, t: Tracked) -> None:
        self.slots.account(t.name, None)
        with self._lock:
            self.files.pop(t.name, None)
        self.scheduler.cancel(t.name)
        # Closed exactly once: a second close could close a descriptor another thread has
        # just opened with the same number (a sidecar being written, another name's lock).
        fd, t.lock_fd = t.lock_fd, -1
        if fd >= 0:
            claims.release(fd)
