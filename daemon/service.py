"""The service: claims inbox files and drives each through its lifecycle to the outbox.

One main thread watches the inbox, grants job slots and dispatches due work; a few worker
threads run the steps (API calls, file I/O). Each step moves a file's state machine by one
transition and saves the sidecar first, so any crash resumes at a step that is safe to redo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import itertools
import json
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from google.genai import types

from . import atomic, jobrecord, logs
from .backend import (
    BackendError,
    GeminiBackend,
    PermanentError,
    TransientError,
    file_line,
    inline_lookup,
    job_error_message,
)
from .config import Config, ConfigError
from .faults import crash_point
from .inputs import Defaults, Request, read_requests, scan_file
from .jobrecord import FileState, JobRecord, SidecarError, isotime, utcnow
from .notify import Notifier
from .results import ResponsesFileIndex, write_error_report, write_results
from .schedule import Backoff, Clock, Scheduler, Sleeper
from .watcher import CANCEL_SUFFIX, InboxWatcher, is_candidate

WORKER_THREADS = 4
"""Steps run in parallel: enough to keep polls flowing while one file uploads."""

STOP_GRACE_SECONDS = 8.0
"""On SIGTERM, wait this long for steps in progress (a write finishes; an upload is cut off)."""

UNLOCKABLE_GRACE_SECONDS = 60.0
"""A symlink in processing/ cannot be locked; another daemon only takes it over after this long."""

CLAIM_BATCH = 16
"""Files claimed per turn of the main loop (each costs a few fsyncs) before dispatching work."""

MAX_UNEXPECTED_ERRORS = 5
"""A step that fails this often with an unexpected error (a bug) gives the file an error report."""

_FAILURE_STAGE = {
    FileState.CLAIMED: "validation",
    FileState.QUEUED: "submission",
    FileState.UPLOADING: "submission",
    FileState.SUBMITTING: "submission",
    FileState.RUNNING: "job",
    FileState.WRITING: "results",
}

QUEUE = -1.0
"""Step result: wait for a free job slot."""

log = logs.get()


@dataclass
class Tracked:
    """A file this process owns (it holds the flock on processing/NAME)."""

    name: str
    record: JobRecord
    lock_fd: int | None
    # Fixed when the file is taken, so a reload (SIGHUP) changes neither where its files live
    # nor the settings its job is submitted and its results written with.
    processing: Path
    defaults: Defaults
    include_response: bool
    busy: bool = False
    slot_granted: bool = False
    job: types.BatchJob | None = None  # the last job fetched, reused when writing results
    cancel_requested: bool = False  # a cancel came while the job was being created


class Service:
    """The daemon. `run()` blocks until stopped (or, with `once`, until the inbox is done)."""

    def __init__(
        self,
        config: Config,
        backend: GeminiBackend,
        *,
        once: bool = False,
        reload_config: Callable[[], Config] | None = None,
        make_backend: Callable[[Config], GeminiBackend] | None = None,
        clock: Clock = time.monotonic,
        sleeper: Sleeper | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        workers: int = WORKER_THREADS,
    ) -> None:
        self.backend = backend
        self.once = once
        self._reload_config = reload_config
        self._make_backend = make_backend
        self._clock = clock
        self._rng = rng or random.Random()
        self.scheduler = Scheduler(clock, sleeper)
        self.notifier = notifier or Notifier()
        self._workers = workers
        self._lock = threading.RLock()
        self._work: queue.Queue[str | None] = queue.Queue()
        self.files: dict[str, Tracked] = {}
        self._slot_queue: deque[str] = deque()
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._once_names: set[str] = set()
        self.outcomes: dict[str, FileState] = {}  # outbox path (or input name) -> DONE/FAILED
        self._waiting_logged: set[str] = set()
        self._last_status = ""  # the last STATUS= sent to systemd
        self._next_status = 0.0  # time.monotonic() before which no STATUS= is computed
        self._last_ping = 0.0  # time.monotonic() of the last WATCHDOG=1
        self._apply_config(config)

    # ---- configuration -------------------------------------------------------------

    def _apply_config(self, config: Config) -> None:
        self.config = config
        self.defaults = Defaults.from_config(config)
        self.backoff = Backoff.from_settings(config.poll, self._rng)
        for folder in (
            config.inbox,
            config.processing_dir,
            config.done_dir,
            config.failed_dir,
            config.outbox,
        ):
            folder.mkdir(parents=True, exist_ok=True)

    def request_stop(self) -> None:
        """Signal-safe: stop taking files; finish steps in progress; exit."""
        self._stopping.set()
        self.scheduler.wake()

    def request_reload(self) -> None:
        """Signal-safe: reload the configuration at the next turn of the main loop."""
        self._reload_requested.set()
        self.scheduler.wake()

    def _reload(self) -> None:
        self._reload_requested.clear()
        if self._reload_config is None:
            return
        self.notifier.reloading()
        old = self.config
        saved = (self.config, self.defaults, self.backoff)
        try:
            new = self._reload_config()
            new.system_instruction()
            backend = (
                self._make_backend(new)
                if new.api != old.api and self._make_backend is not None
                else self.backend
            )
            self._apply_config(new)  # creates the new folders (on failure: restored below)
        except (ConfigError, OSError, ValueError) as exc:
            self.config, self.defaults, self.backoff = saved
            log.error(
                "reload refused",
                reason=str(exc),
                config="the old configuration stays in effect",
            )
            self.notifier.ready(self._status_text())
            return
        self.backend = backend
        if new.inbox != old.inbox:
            self.watcher.stop()
            self._start_watcher()
            self._recover()
        else:
            self.watcher.settle_seconds = new.inbox_settle_seconds
        log.info("configuration reloaded", inbox=str(new.inbox), outbox=str(new.outbox))
        self.notifier.ready(self._status_text())

    # ---- main loop -----------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; with `once`, until every file present at start has finished."""
        # Temp files (converted inputs, downloaded responses, their index) hold prompts and
        # answers: like everything the daemon writes, not for other users (as UMask=0027).
        os.umask(os.umask(0o077) | 0o027)
        for folder in (
            self.config.outbox,
            self.config.processing_dir,
            self.config.done_dir,
            self.config.failed_dir,
        ):
            for stale in atomic.remove_stale_temps(folder):
                log.info("removed a temporary file left by a crash", path=str(stale))
        threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"step-{i}")
            for i in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        self._recover()
        self._start_watcher()
        if self.once:
            self._once_names = {p.name for p in self.config.inbox.iterdir() if is_candidate(p)}
            for name in self._once_names:
                self.watcher.note(name, complete=True)
        self._claim_ready()  # READY=1 means: what was in the inbox at start is claimed
        self._last_status = self._status_text()
        self.notifier.ready(self._last_status)
        self._ping_watchdog(force=True)
        log.info(
            "started",
            inbox=str(self.config.inbox),
            outbox=str(self.config.outbox),
            once=self.once,
            resumed=len(self.files),
        )
        next_rescan = self._clock() + self.config.inbox_rescan_seconds
        try:
            while not self._stopping.is_set():
                if self._reload_requested.is_set():
                    self._reload()
                if self._clock() >= next_rescan:
                    self.watcher.rescan()
                    self._recover()
                    next_rescan = self._clock() + self.config.inbox_rescan_seconds
                self._claim_ready()
                self._handle_cancel_requests()
                self._grant_slots()
                for name in self.scheduler.pop_due():
                    self._dispatch(name)
                self._send_status()
                self._ping_watchdog()
                if self.once and self._once_finished():
                    break
                self.scheduler.wait(self._wait_limit(next_rescan))
        finally:
            self._shutdown()
        failed = any(state is FileState.FAILED for state in self.outcomes.values())
        return 1 if self.once and failed else 0

    def _wait_limit(self, next_rescan: float) -> float:
        limit = max(0.0, next_rescan - self._clock())
        if self.watcher.pending:
            limit = min(limit, max(0.05, self.config.inbox_settle_seconds / 4))
        interval = self.notifier.watchdog_interval
        if interval is not None:  # wake in time for the next ping
            limit = min(limit, max(0.0, self._last_ping + interval - time.monotonic()))
        return min(limit, 5.0)

    def _send_status(self) -> None:
        """STATUS= when the counts changed (systemctl status shows it); at most twice a second."""
        now = time.monotonic()
        if not self.notifier.enabled or now < self._next_status:
            return
        self._next_status = now + 0.5
        status = self._status_text()
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)

    def _ping_watchdog(self, *, force: bool = False) -> None:
        """WATCHDOG=1 at most every half interval; the main loop wakes for it (see _wait_limit)."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = time.monotonic()
        if force or now - self._last_ping >= interval / 2:
            self._last_ping = now
            self.notifier.watchdog()

    def _once_finished(self) -> bool:
        with self._lock:
            if self.files:
                return False
        return not any(
            (self.config.inbox / name).exists() or (self.config.inbox / name).is_symlink()
            for name in self._once_names
        )

    def _shutdown(self) -> None:
        self.notifier.stopping()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                if not any(t.busy for t in self.files.values()):
                    break
            self._ping_watchdog()
            time.sleep(0.02)
        for _ in range(self._workers):
            self._work.put(None)
        self.watcher.stop()
        log.info("stopped", in_flight=len(self.files))

    def _start_watcher(self) -> None:
        self.watcher = InboxWatcher(
            self.config.inbox,
            self.config.inbox_settle_seconds,
            self._clock,
            on_event=self.scheduler.wake,
        )
        self.watcher.start()

    def _status_text(self) -> str:
        with self._lock:
            states = [t.record.state for t in self.files.values()]
        active = sum(1 for s in states if s.active)
        done = sum(1 for s in self.outcomes.values() if s is FileState.DONE)
        return (
            f"{len(states) - active} queued, {active} active, {done} done, "
            f"{len(self.outcomes) - done} failed"
        )

    # ---- claiming and ownership -------------------------------------------------------

    def _claim_ready(self) -> None:
        if self._stopping.is_set():
            return
        ready = self.watcher.ready()
        if len(ready) > CLAIM_BATCH:
            # Claim a batch, then let the loop dispatch work before claiming more: a burst of
            # files then starts flowing at once instead of after the last claim.
            ready = ready[:CLAIM_BATCH]
            self.scheduler.wake()
        for path in ready:
            if self.once and path.name not in self._once_names:
                continue
            try:
                self._claim(path)
            except OSError as exc:  # e.g. a file we may not move: it stays in the inbox
                log.warning("cannot claim", file=path.name, error=f"{exc.strerror or exc}")
                self.watcher.forget(path.name)
            self._ping_watchdog()  # thousands of files at once take a while (an fsync each)

    def _claim(self, path: Path) -> None:
        """Move inbox/NAME into processing/ without replacing a same-named file there."""
        target = self.config.processing_dir / path.name
        try:
            os.link(path, target, follow_symlinks=False)
        except FileExistsError:
            if atomic.same_entry(path, target):  # a crash between link and unlink last time
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.watcher.forget(path.name)
            elif path.name not in self._waiting_logged:
                self._waiting_logged.add(path.name)
                log.info(
                    "waiting: a file of the same name is still being processed", file=path.name
                )
            return
        except FileNotFoundError:
            self.watcher.forget(path.name)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                log.warning("cannot claim", file=path.name, error=str(exc))
                return
            if os.path.lexists(target):
                return
            os.rename(path, target)  # a folder, or a filesystem without hard links
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        atomic.fsync_dir(self.config.processing_dir)
        crash_point("after_claim")
        # No cancel request can be meant for a file claimed just now: a marker left is stale.
        target.with_name(target.name + CANCEL_SUFFIX).unlink(missing_ok=True)
        self.watcher.forget(path.name)
        self._waiting_logged.discard(path.name)
        tracked = self._own(target, fresh=True)
        if tracked is not None:
            log.info("claimed", file=path.name)

    def _own(self, path: Path, *, fresh: bool) -> Tracked | None:
        """Take the flock on processing/NAME and start tracking it; None if another process has it."""
        name = path.name
        with self._lock:
            if name in self.files:
                return None
        fd: int | None = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:
            # Symlinks and unreadable files cannot be locked; they fail validation at once.
            if not fresh:
                try:
                    age = time.time() - path.lstat().st_ctime
                except FileNotFoundError:
                    return None
                if age < UNLOCKABLE_GRACE_SECONDS:
                    return None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _same_entry_fd(fd, path):  # archived by its owner meanwhile
                    raise BlockingIOError
            except OSError:
                os.close(fd)
                return None
        sidecar = jobrecord.sidecar_path(path)
        try:
            record = jobrecord.load(sidecar) if sidecar.exists() else JobRecord(input=name)
        except SidecarError as exc:
            record = JobRecord(input=name)
            record.error = {
                "stage": "job",
                "message": f"{exc}; the file is failed rather than risk a second job",
            }
            record.state = FileState.WRITING
        except OSError as exc:
            log.error("cannot read sidecar", file=name, error=str(exc))
            if fd is not None:
                os.close(fd)
            return None
        tracked = Tracked(
            name,
            record,
            fd,
            processing=path.parent,
            # Results are written with the settings the file was claimed with, even after a
            # restart under a changed configuration.
            defaults=self.defaults
            if record.filter_json is None
            else dataclasses.replace(self.defaults, filter_json=record.filter_json),
            include_response=self.config.include_response
            if record.include_response is None
            else record.include_response,
        )
        # Conversions and downloads a crash cut short; only the owner of NAME may remove them.
        for leftover in path.parent.glob(glob.escape(f".{name}.") + "*.tmp*"):
            leftover.unlink(missing_ok=True)
        if not sidecar.exists():
            self._save(tracked)
        with self._lock:
            self.files[name] = tracked
        if record.state is FileState.QUEUED:
            self._slot_queue.append(name)
        else:
            self.scheduler.schedule(name, self._resume_delay(record))
        return tracked

    def _resume_delay(self, record: JobRecord) -> float:
        if record.state is FileState.RUNNING and record.next_poll_at:
            with contextlib.suppress(ValueError):
                remaining = (
                    jobrecord.parse_isotime(record.next_poll_at) - utcnow()
                ).total_seconds()
                return min(max(0.0, remaining), self.config.poll.max_seconds)
        return 0.0

    def _recover(self) -> None:
        """Take over files in processing/ that no live process owns (ours after a crash, or a dead peer's)."""
        folder = self.config.processing_dir
        for temps in (folder, self.config.outbox):  # a dead peer's half-written files
            for stale in atomic.remove_stale_temps(temps):
                log.info("removed a temporary file left by a crash", path=str(stale))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        names = {e.name for e in entries}
        for entry in entries:
            path = Path(entry.path)
            if is_candidate(path):
                if self._own(path, fresh=False) is not None:
                    log.info(
                        "resumed", file=entry.name, state=self.files[entry.name].record.state.value
                    )
            elif entry.name.endswith(".jsonl" + jobrecord.SIDECAR_SUFFIX):
                input_name = entry.name[: -len(jobrecord.SIDECAR_SUFFIX)]
                if input_name not in names:
                    self._finish_orphan_sidecar(path)

    def _finish_orphan_sidecar(self, sidecar: Path) -> None:
        """The input was archived but a crash kept its sidecar from following: move it too."""
        try:
            record = jobrecord.load(sidecar)
        except (OSError, SidecarError):
            return
        if record.state.finished and record.archived_as:
            with contextlib.suppress(FileNotFoundError):
                os.replace(sidecar, record.archived_as + jobrecord.SIDECAR_SUFFIX)
        elif record.state.finished and self.config.archive == "delete":
            sidecar.unlink(missing_ok=True)
        else:
            log.error("sidecar without its input; moved to failed/", sidecar=sidecar.name)
            with contextlib.suppress(FileNotFoundError):
                atomic.move_new(sidecar, self.config.failed_dir / sidecar.name)

    # ---- dispatching ------------------------------------------------------------------

    def _grant_slots(self) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            active = self._active_jobs()
            while self._slot_queue and active < self.config.limits.max_active_jobs:
                name = self._slot_queue.popleft()
                tracked = self.files.get(name)
                if tracked is None or tracked.record.state is not FileState.QUEUED:
                    continue
                tracked.slot_granted = True
                active += 1
                self.scheduler.schedule(name, 0)

    def _active_jobs(self) -> int:
        """Files holding a job slot (call with `_lock` held)."""
        return sum(1 for t in self.files.values() if t.record.state.active or t.slot_granted)

    def _dispatch(self, name: str) -> None:
        with self._lock:
            tracked = self.files.get(name)
            if tracked is None:
                return
            if tracked.busy:  # e.g. a cancel request during a step: look again shortly
                self.scheduler.schedule(name, 0.05)
                return
            tracked.busy = True
        self._work.put(name)

    def _worker(self) -> None:
        while True:
            name = self._work.get()
            if name is None:
                return
            tracked = self.files.get(name)
            if tracked is None:
                continue
            delay: float | None = None
            try:
                delay = self._advance(tracked)
            except Exception as exc:  # a bug in error handling itself: keep the thread alive
                log.exception("step failed; will retry", file=name, error=repr(exc))
                delay = self.backoff.delay(tracked.record.retries)
            finally:
                # Clear `busy` before scheduling, or the main thread could pop the entry while
                # the file still looks busy, and drop it.
                tracked.busy = False
                if delay is not None:
                    self.scheduler.schedule(tracked.name, delay)
                self.scheduler.wake()

    def _advance(self, tracked: Tracked) -> float | None:
        """Run steps until the file must wait (a job slot; or the returned delay) or is finished."""
        while True:
            if self._stopping.is_set() and tracked.record.state is not FileState.WRITING:
                return None
            delay = self._step_safely(tracked)
            if delay is None:
                return None
            if delay == QUEUE:
                with self._lock:
                    limit = self.config.limits.max_active_jobs
                    if not self._slot_queue and self._active_jobs() < limit:
                        tracked.slot_granted = True  # no one waits ahead: submit at once
                        continue
                    tracked.slot_granted = False
                    self._slot_queue.append(tracked.name)
                return None
            if delay > 0:
                tracked.record.next_poll_at = isotime(utcnow() + timedelta(seconds=delay))
                self._save(tracked)
                return delay

    def _step_safely(self, tracked: Tracked) -> float | None:
        record = tracked.record
        bound = log.bind(file=tracked.name, job=record.job_name, state=record.state.value)
        try:
            return self._step(tracked)
        except TransientError as exc:
            record.retries += 1
            delay = self.backoff.delay(record.retries - 1)
            bound.warning(
                "transient API failure; will retry",
                error=str(exc),
                retry_in=round(delay, 2),
                retries=record.retries,
            )
            return delay
        except PermanentError as exc:
            return self._fail_permanent(tracked, exc)
        except OSError as exc:
            record.retries += 1
            delay = self.backoff.delay(record.retries - 1)
            bound.error(
                "file system error; will retry",
                error=f"{exc.strerror or exc}",
                path=exc.filename,
                retry_in=round(delay, 2),
            )
            return delay
        except Exception as exc:  # a bug must not stop the daemon or lose the file
            record.retries += 1
            bound.exception("unexpected error", error=repr(exc), retries=record.retries)
            if record.retries >= MAX_UNEXPECTED_ERRORS and record.error is None:
                stage = _FAILURE_STAGE.get(record.state, "job")
                return self._fail(tracked, stage, f"internal error: {exc!r}")
            return self.backoff.delay(record.retries - 1)

    def _fail_permanent(self, tracked: Tracked, exc: BackendError) -> float | None:
        state = tracked.record.state
        if state in (FileState.QUEUED, FileState.UPLOADING, FileState.SUBMITTING):
            return self._fail(tracked, "submission", str(exc))
        if state is FileState.RUNNING:
            if exc.code == 404:
                return self._fail(tracked, "job", f"the batch job no longer exists: {exc}")
            # A revoked key or a quota problem can be fixed by the operator: keep polling, slowly.
            tracked.record.retries += 1
            log.error(
                "API refused the poll; will retry",
                file=tracked.name,
                job=tracked.record.job_name,
                error=str(exc),
            )
            return self.backoff.delay(tracked.record.retries + 4)
        if state is FileState.WRITING and tracked.record.error is None:
            return self._fail(tracked, "results", f"could not fetch the results: {exc}")
        tracked.record.retries += 1
        return self.backoff.delay(tracked.record.retries)

    # ---- the steps of the state machine ----------------------------------------------

    def _step(self, tracked: Tracked) -> float | None:
        state = tracked.record.state
        if state is FileState.CLAIMED:
            return self._validate(tracked)
        if state is FileState.QUEUED:
            return self._start_submission(tracked) if tracked.slot_granted else QUEUE
        if state is FileState.UPLOADING:
            return self._upload(tracked)
        if state is FileState.SUBMITTING:
            return self._submit(tracked)
        if state is FileState.RUNNING:
            return self._poll(tracked)
        if state is FileState.WRITING:
            return self._write(tracked)
        self._archive(tracked)
        return None

    def _save(self, tracked: Tracked) -> None:
        jobrecord.save(tracked.record, jobrecord.sidecar_path(self._path(tracked)))

    def _path(self, tracked: Tracked) -> Path:
        return tracked.processing / tracked.name

    def _fail(
        self,
        tracked: Tracked,
        stage: str,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        error_count: int | None = None,
    ) -> float:
        record = tracked.record
        if record.state is FileState.WRITING and record.output and os.path.lexists(record.output):
            # Results are already published: finishing the file beats a second outbox file.
            return self.backoff.delay(record.retries)
        record.error = {"stage": stage, "message": logs.redact(message)}
        if errors:
            record.error["errors"] = errors
        if error_count is not None:
            record.error["error_count"] = error_count
        record.output = None
        if record.state is FileState.WRITING:
            record.retries = 0
        else:
            record.move_to(FileState.WRITING)
        self._save(tracked)
        log.warning(
            "failed",
            file=tracked.name,
            job=record.job_name,
            stage=stage,
            reason=record.error["message"],
        )
        return 0.0

    def _validate(self, tracked: Tracked) -> float | None:
        record, path = tracked.record, self._path(tracked)
        st = path.lstat()
        if path.is_symlink():
            return self._fail(
                tracked,
                "validation",
                f"{tracked.name} is a symbolic link; links are never followed",
            )
        if not path.is_file():
            return self._fail(tracked, "validation", f"{tracked.name} is not a regular file")
        limit = self.config.limits.max_file_bytes
        if st.st_size > limit:
            return self._fail(
                tracked,
                "validation",
                f"{tracked.name} is {st.st_size} bytes, over limits.max_file_bytes ({limit})",
            )
        try:
            scan = scan_file(path, tracked.defaults)
        except PermissionError as exc:
            return self._fail(tracked, "validation", f"{tracked.name}: cannot read: {exc.strerror}")
        errors = [e.as_dict() for e in scan.errors]
        if scan.error_count and (self.config.on_invalid_line == "reject_file" or not scan.requests):
            return self._fail(
                tracked, "validation", f"{tracked.name}: {scan.summary()}", errors, scan.error_count
            )
        if not scan.requests:
            return self._fail(
                tracked,
                "validation",
                f"{tracked.name} holds no requests (empty or only blank lines)",
            )
        record.sha256, record.size_bytes, record.requests = scan.sha256, scan.size, scan.requests
        record.mode = scan.mode(self.config.limits.inline_max_bytes)
        record.model = self.config.model
        record.filter_json = tracked.defaults.filter_json
        record.include_response = tracked.include_response
        record.move_to(FileState.QUEUED)
        self._save(tracked)
        log.info(
            "validated",
            file=tracked.name,
            requests=scan.requests,
            bytes=scan.size,
            mode=record.mode,
            skipped_lines=scan.error_count,
        )
        return QUEUE

    def _start_submission(self, tracked: Tracked) -> float:
        record = tracked.record
        if tracked.cancel_requested:  # requested while the file was being validated
            tracked.cancel_requested = False
            return self._fail_cancelled(tracked)
        record.display_name = record.make_display_name()
        record.move_to(FileState.UPLOADING if record.mode == "file" else FileState.SUBMITTING)
        tracked.slot_granted = False
        self._save(tracked)
        return 0.0

    def _requests(self, tracked: Tracked) -> Iterator[Request]:
        """The file's valid requests, read again from disk (memory does not grow with the file)."""
        return (
            r
            for r in read_requests(self._path(tracked), tracked.defaults)
            if isinstance(r, Request)
        )

    def _upload(self, tracked: Tracked) -> float:
        """File API path: stream the input into batch JSONL, upload it, then submit."""
        record = tracked.record
        converted = self._path(tracked).parent / f".{tracked.name}.{record.claim_id}.upload.tmp"
        try:
            with converted.open("wb") as handle:
                for request in self._requests(tracked):
                    handle.write(file_line(request))
            started = time.monotonic()
            record.uploaded_file = self.backend.upload(
                converted, record.display_name or tracked.name
            )
        finally:
            converted.unlink(missing_ok=True)
        record.move_to(FileState.SUBMITTING)
        self._save(tracked)
        log.info(
            "uploaded",
            file=tracked.name,
            uploaded_file=record.uploaded_file,
            seconds=round(time.monotonic() - started, 2),
        )
        return 0.0

    def _submit(self, tracked: Tracked) -> float:
        """Create the job exactly once: after any doubt (a crash, a lost reply) look it up first."""
        record = tracked.record
        assert record.display_name and record.model
        job = self.backend.find_job(record.display_name) if record.create_calls else None
        if job is not None:
            log.warning(
                "adopted a job created before a crash or a lost reply",
                file=tracked.name,
                job=job.name,
            )
        else:
            record.create_calls += 1
            self._save(tracked)
            src: list[Request] | str = record.uploaded_file or list(self._requests(tracked))
            crash_point("before_create")
            job = self.backend.create_job(record.model, record.display_name, src)
            crash_point("after_create")
        record.job_name = job.name
        record.job_state = job.state.value if job.state else None
        record.submitted_at = isotime()
        record.polls = 0
        record.move_to(FileState.RUNNING)
        self._save(tracked)
        log.info(
            "submitted", file=tracked.name, job=job.name, requests=record.requests, mode=record.mode
        )
        if tracked.cancel_requested:
            return 0.0  # a cancel request came meanwhile: the poll step cancels the job now
        return self.backoff.delay(0)

    def _poll(self, tracked: Tracked) -> float | None:
        record = tracked.record
        assert record.job_name
        job = self.backend.get_job(record.job_name)
        crash_point("while_polling")
        if tracked.cancel_requested and not job.done:
            self.backend.cancel_job(record.job_name)  # a cancel request came during submission
            log.info("cancelled the job", file=tracked.name, job=record.job_name)
            tracked.cancel_requested = False
            return 0.0  # poll again at once to see the job end
        tracked.cancel_requested = False
        record.polls += 1
        record.retries = 0
        state = job.state.value if job.state else None
        if state != record.job_state:
            log.info(
                "job state changed",
                file=tracked.name,
                job=record.job_name,
                job_state=state,
                previous=record.job_state,
                polls=record.polls,
            )
        record.job_state = state
        if job.completion_stats is not None:
            stats = job.completion_stats
            record.progress = {
                "succeeded": stats.successful_count or 0,
                "failed": stats.failed_count or 0,
                "incomplete": stats.incomplete_count or 0,
            }
        if not job.done:
            self._save(tracked)
            return self.backoff.delay(record.polls)
        record.finished_at = isotime()
        if job.state is types.JobState.JOB_STATE_SUCCEEDED:
            tracked.job = job
            record.move_to(FileState.WRITING)
            self._save(tracked)
            return 0.0
        if (
            job.state is types.JobState.JOB_STATE_EXPIRED
            and record.expired_resubmits < self.config.expired_resubmits
        ):
            record.expired_resubmits += 1
            log.warning(
                "job expired; resubmitting",
                file=tracked.name,
                job=record.job_name,
                resubmit=record.expired_resubmits,
            )
            record.job_name = record.job_state = record.uploaded_file = None
            record.create_calls = 0
            record.move_to(FileState.QUEUED)
            self._save(tracked)
            return QUEUE
        message = job_error_message(job) or "no message from the API"
        record.error = {
            "stage": "job",
            "message": logs.redact(f"the batch job ended {state}: {message}"),
        }
        record.move_to(FileState.WRITING)
        self._save(tracked)
        log.warning("failed", file=tracked.name, job=record.job_name, stage="job", job_state=state)
        return 0.0

    def _write(self, tracked: Tracked) -> float | None:
        """Publish the results or the error report under a name chosen (and recorded) first."""
        record = tracked.record
        stem = tracked.name[: -len(".jsonl")]
        if record.output is None:
            suffix = ".error.json" if record.error else ".jsonl"
            record.output = str(atomic.free_name(self.config.outbox / (stem + suffix)))
            self._save(tracked)
        output = Path(record.output)
        if os.path.lexists(output) and not self._output_is_ours(tracked, output):
            log.warning(
                "the outbox name chosen before a crash was taken by another file; choosing again",
                file=tracked.name,
                output=output.name,
            )
            record.output = None
            self._save(tracked)
            return 0.0
        if not os.path.lexists(output):  # else: written before a crash
            try:
                if record.error:
                    write_error_report(output, self._report(record))
                else:
                    self._write_results(tracked, output)
            except FileExistsError:  # someone took the name meanwhile
                record.output = None
                return 0.0
            crash_point("after_write")
        self._cleanup_remote(tracked)
        record.move_to(FileState.FAILED if record.error else FileState.DONE)
        self._save(tracked)
        return 0.0

    def _output_is_ours(self, tracked: Tracked, output: Path) -> bool:
        """Whether an outbox file found at our recorded name holds our results (published just
        before a crash) rather than another input's that took the free name while we were down:
        an error report names its input; results records follow the input's keys and lines."""
        record = tracked.record
        try:
            if record.error:
                with output.open("rb") as handle:
                    return bool(json.load(handle).get("input") == record.input)
            items = read_requests(self._path(tracked), tracked.defaults)
            with output.open("rb") as handle:
                for item, raw in itertools.zip_longest(items, handle):
                    if item is None or raw is None:
                        return False
                    key = item.key if isinstance(item, Request) else None
                    found = json.loads(raw)
                    if (found.get("key"), found.get("line")) != (key, item.line):
                        return False
            return True
        except (ValueError, AttributeError):  # not JSON records: not ours
            return False
        except OSError:  # cannot tell: keep it, as before (never two outbox files for one input)
            return True

    def _write_results(self, tracked: Tracked, output: Path) -> None:
        record = tracked.record
        assert record.job_name
        job = tracked.job or self.backend.get_job(record.job_name)
        tracked.job = None
        crash_point("while_fetching")
        half = (record.requests or 0) // 2

        def progress(written: int) -> None:
            if written == half:
                crash_point("mid_write")

        started = time.monotonic()
        responses_file = job.dest.file_name if job.dest else None
        if not responses_file:
            tally = write_results(
                output,
                self._path(tracked),
                tracked.defaults,
                inline_lookup(job),
                include_response=tracked.include_response,
                progress=progress,
            )
        else:
            download = (
                self._path(tracked).parent / f".{tracked.name}.{record.claim_id}.responses.tmp"
            )
            try:
                self.backend.download(responses_file, download)
                index = ResponsesFileIndex(download)
                try:
                    tally = write_results(
                        output,
                        self._path(tracked),
                        tracked.defaults,
                        index,
                        include_response=tracked.include_response,
                        progress=progress,
                    )
                finally:
                    index.close()
            finally:
                download.unlink(missing_ok=True)
            self._delete_remote_file(tracked, responses_file)
        bound = log.bind(file=tracked.name, job=record.job_name, output=output.name)
        if tally.total and not tally.ok:
            bound.warning("the job succeeded but every request failed", errors=tally.errors)
        bound.info(
            "results written",
            ok=tally.ok,
            errors=tally.errors,
            seconds=round(time.monotonic() - started, 3),
        )

    def _cleanup_remote(self, tracked: Tracked) -> None:
        """Uploaded inputs count against the project's storage quota: delete them once finished."""
        if tracked.record.uploaded_file:
            self._delete_remote_file(tracked, tracked.record.uploaded_file)

    def _delete_remote_file(self, tracked: Tracked, name: str) -> None:
        """Best effort: the API sometimes cannot delete output files (their IDs are too long)."""
        try:
            self.backend.delete_file(name)
        except BackendError as exc:
            log.warning(
                "could not delete a file at the API; it expires after 48 h",
                file=tracked.name,
                job=tracked.record.job_name,
                remote_file=name,
                error=str(exc),
            )

    def _report(self, record: JobRecord) -> dict[str, Any]:
        assert record.error is not None
        report: dict[str, Any] = {
            "input": record.input,
            "stage": record.error["stage"],
            "message": record.error["message"],
            "job_name": record.job_name,
            "job_state": record.job_state,
        }
        if "errors" in record.error:
            report["errors"] = record.error["errors"]
            report["error_count"] = record.error.get("error_count", len(record.error["errors"]))
        report["time"] = isotime()
        return report

    def _archive(self, tracked: Tracked) -> None:
        """Move the input and its sidecar to done/ or failed/ (or delete them), then forget the file."""
        record, path = tracked.record, self._path(tracked)
        sidecar = jobrecord.sidecar_path(path)
        if self.config.archive == "delete":
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        else:
            if record.archived_as is None:
                # done/ or failed/ beside processing/: of the inbox the file was claimed from,
                # which a reload may have replaced since
                folder = path.parent.parent / (
                    self.config.done_dir.name
                    if record.state is FileState.DONE
                    else self.config.failed_dir.name
                )
                record.archived_as = str(
                    next(
                        p
                        for p in atomic.unique_names(folder / tracked.name)
                        if not os.path.lexists(p) and not os.path.lexists(jobrecord.sidecar_path(p))
                    )
                )
                self._save(tracked)
            archived = Path(record.archived_as)
            if os.path.lexists(path):
                try:
                    os.link(path, archived, follow_symlinks=False)
                except FileExistsError:
                    if not atomic.same_entry(path, archived):
                        record.archived_as = None
                        self._archive(tracked)
                        return
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                        raise
                    os.rename(path, archived)
                if os.path.lexists(path):
                    path.unlink()
            archived_sidecar = Path(record.archived_as + jobrecord.SIDECAR_SUFFIX)
            try:
                os.replace(sidecar, archived_sidecar)
            except FileNotFoundError:  # a peer's rescan saw it orphaned and moved it for us
                if not archived_sidecar.exists():
                    raise
            atomic.fsync_dir(path.parent)
        # A cancel request that came too late (or while the daemon was down) goes too.
        path.with_name(tracked.name + CANCEL_SUFFIX).unlink(missing_ok=True)
        with self._lock:
            self.files.pop(tracked.name, None)
            # Keyed by the outbox file: two inputs of the same name are two outcomes.
            self.outcomes[record.output or tracked.name] = record.state
        if tracked.lock_fd is not None:
            os.close(tracked.lock_fd)
        log.info(
            "archived",
            file=tracked.name,
            job=record.job_name,
            outcome=record.state.value,
            output=record.output,
            archived_as=record.archived_as,
        )
        self.watcher.rescan()  # a same-named file may be waiting in the inbox
        return None

    # ---- cancel requests ------------------------------------------------------------

    def _handle_cancel_requests(self) -> None:
        for name in self.watcher.take_cancel_requests():
            with self._lock:
                tracked = self.files.get(name)
            if tracked is None:
                continue
            marker = self._path(tracked).with_name(name + CANCEL_SUFFIX)
            if not marker.exists():
                continue
            record = tracked.record
            log.info("cancel requested", file=name, job=record.job_name, state=record.state.value)
            if record.state in (FileState.CLAIMED, FileState.QUEUED) and not tracked.busy:
                try:
                    self._fail_cancelled(tracked)
                except OSError as exc:  # the sidecar could not be saved: try at the next rescan
                    log.error("cannot record the cancel", file=name, error=str(exc))
                    continue
                marker.unlink(missing_ok=True)
                with contextlib.suppress(ValueError):
                    self._slot_queue.remove(name)
                self.scheduler.schedule(name, 0)
            # Otherwise the marker stays until the file is archived, so a crash before the job
            # is cancelled cannot forget the request (rescans deliver it again).
            elif not record.state.finished and record.state is not FileState.WRITING:
                # The CLI cancelled the job if it knew its name; if the job was still being
                # created, the next poll cancels it (see _poll). Poll now to see the end.
                tracked.cancel_requested = True
                if record.state is FileState.RUNNING:
                    self.scheduler.schedule(name, 0)

    def _fail_cancelled(self, tracked: Tracked) -> float:
        tracked.record.job_state = types.JobState.JOB_STATE_CANCELLED.value
        return self._fail(tracked, "job", "cancelled before a job was created")


def _same_entry_fd(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.lstat())
    except OSError:
        return False
