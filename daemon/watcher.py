"""The inbox watcher: which files in the inbox are complete and ready to be claimed.

inotify (through watchdog) says when a file was closed after writing or renamed into the
inbox: those are ready at once. A file that was only created or modified is ready once it
has been unchanged for `inbox_settle_seconds`. A periodic full rescan catches any event the
kernel dropped (queue overflow, network filesystems).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from . import logs
from .schedule import Clock
from .spool import SPOOL_FOLDERS, Spool, is_candidate, printable, why_ignored

log = logs.get()


def open_for_writing(path: Path) -> bool | None:
    """Whether some process holds `path` open for writing (Linux read lease), None if unknown.

    A read lease can only be taken when no one has the file open for writing; taking one
    needs ownership of the file, so for other users' files the answer is unknown.
    """
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


@dataclass
class _Seen:
    signature: tuple[int, int] | None  # (size, mtime_ns) at the last look
    since: float  # clock time the signature was first seen
    complete: bool  # closed after writing or moved in: no need to wait for it to settle
    arrival: int  # when it was written or moved in (its ctime, in ns): the queue order


class InboxWatcher:
    """Tracks candidate files in one inbox folder and hands out those that are ready."""

    def __init__(
        self,
        inbox: Path,
        settle_seconds: float,
        clock: Clock,
        on_event: Callable[[], None] = lambda: None,
    ) -> None:
        self.inbox = inbox
        self._spool = Spool(inbox, inbox)  # only its names inside the inbox are used
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._on_event = on_event
        self._seen: dict[str, _Seen] = {}  # candidates not handed out yet, oldest first
        self._handed: dict[str, _Seen] = {}  # handed out by `ready`, not yet claimed
        self._cancel_requests: set[str] = set()
        self.ignored: dict[str, str] = {}  # inbox names not taken, and why (logged once each)
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._inbox_fd: int | None = None  # the inbox folder watched

    def start(self) -> None:
        """Start watching, then list what is already there (files older than the settle time are ready)."""
        observer = Observer()
        handler = _Handler(self)
        observer.schedule(handler, str(self.inbox), recursive=False)
        cancels = self.cancels
        if cancels.is_dir():  # not processing/ itself: every sidecar write would wake us
            observer.schedule(handler, str(cancels), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        with contextlib.suppress(OSError):
            # Held open so that the folder's inode cannot be reused while it is watched.
            self._inbox_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.rescan()

    def replaced(self) -> bool:
        """Whether the inbox now is another folder than the one watched (removed and made
        again): inotify watches the old one, so the caller starts watching anew."""
        if self._inbox_fd is None:
            return False
        try:
            now, watched = os.stat(self.inbox), os.fstat(self._inbox_fd)
        except OSError:
            return False  # no inbox (yet): healing makes one
        return not os.path.samestat(now, watched)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._inbox_fd is not None:
            os.close(self._inbox_fd)
            self._inbox_fd = None

    def rescan(self) -> None:
        """List the inbox: every candidate not yet known is noted (events may have been dropped)."""
        try:
            entries = list(os.scandir(self.inbox))
        except OSError:
            return
        now = self._clock()
        ignored: dict[str, str] = {}
        candidates: list[str] = []
        for entry in entries:
            reason = why_ignored(entry.name)
            if reason is None:
                candidates.append(entry.name)
            elif not entry.name.startswith(".") and entry.name not in SPOOL_FOLDERS:
                ignored[entry.name] = reason
        with self._lock:
            new = [n for n in candidates if n not in self._seen and n not in self._handed]
        # Only files not known yet are looked at: a rescan runs after every finished file.
        found = sorted((_arrival_ns(self.inbox / name), name) for name in new)
        with self._lock:
            for arrival, name in found:  # oldest first: the order files are taken in
                if name not in self._seen and name not in self._handed:
                    self._seen[name] = _Seen(None, now, False, arrival)
        for name, reason in ignored.items():
            if name not in self.ignored:
                log.warning(
                    "ignored: rename the file to have it processed",
                    file=printable(name),
                    reason=reason,
                )
        self.ignored = ignored
        self._rescan_cancel_requests()

    @property
    def cancels(self) -> Path:
        return self._spool.cancels

    def _rescan_cancel_requests(self) -> None:
        """Cancel markers written while no daemon watched (or whose events were dropped), of
        files still in processing/ (a marker for a file that has finished means nothing)."""
        try:
            names = {entry.name for entry in os.scandir(self.cancels)}
        except OSError:
            return
        live = {n for n in names if not n.startswith(".") and self._spool.input(n).exists()}
        with self._lock:
            self._cancel_requests.update(live)

    def note(self, name: str, *, complete: bool) -> None:
        """An event touched inbox/`name`."""
        if not is_candidate(name):
            return
        with self._lock:
            seen = self._seen.get(name)
            if seen is None:
                arrival = _arrival_ns(self.inbox / name)
                self._seen[name] = _Seen(None, self._clock(), complete, arrival)
            else:
                seen.complete = seen.complete or complete
                if not complete:
                    seen.signature, seen.since, seen.complete = None, self._clock(), False
        self._on_event()

    def note_cancel(self, name: str) -> None:
        with self._lock:
            self._cancel_requests.add(name)
        self._on_event()

    def take_cancel_requests(self) -> set[str]:
        with self._lock:
            requests, self._cancel_requests = self._cancel_requests, set()
        return requests

    def forget(self, name: str) -> None:
        """The file was claimed (or is gone); stop tracking it."""
        with self._lock:
            self._seen.pop(name, None)
            self._handed.pop(name, None)

    def put_back(self, name: str) -> None:
        """A file handed out by `ready` was not claimed after all (its name is busy): keep
        watching it."""
        with self._lock:
            seen = self._handed.pop(name, None)
            if seen is not None and name not in self._seen:
                self._seen[name] = seen

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._seen) + len(self._handed)

    def oldest_arrival(self) -> int | None:
        """When the longest-waiting inbox file arrived (wall-clock ns), None if none waits."""
        with self._lock:
            arrivals = [s.arrival for s in (*self._seen.values(), *self._handed.values())]
        return min(arrivals, default=None)

    def ready(self, limit: int | None = None) -> list[tuple[Path, int]]:
        """Hand out candidates that are complete now, with their arrival time, oldest first.

        A file closed after writing or moved in is complete as it is; any other must have been
        unchanged for `settle_seconds`; none may be open for writing anywhere. At most `limit`.
        What is handed out is not handed out again unless `put_back`.
        """
        now = self._clock()
        ready: list[tuple[Path, int]] = []
        with self._lock:
            pending = list(self._seen.items())
        for name, seen in pending:
            if limit is not None and len(ready) >= limit:
                break
            if not seen.complete and not self._settled(name, seen, now):
                continue
            if open_for_writing(self.inbox / name) is True:
                continue  # a writer still has it open (its events may have been dropped)
            ready.append((self.inbox / name, seen.arrival))
            with self._lock:
                if self._seen.pop(name, None) is not None:
                    self._handed[name] = seen
        return ready

    def _settled(self, name: str, seen: _Seen, now: float) -> bool:
        path = self.inbox / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            self.forget(name)
            return False
        except OSError:
            return True  # unreadable entries get an error report
        signature = (st.st_size, st.st_mtime_ns)
        if signature != seen.signature:
            # First look, or it changed: start (re)counting, unless it already looks old enough.
            age = max(0.0, _wall_age(st.st_mtime_ns))
            seen.since = now - (age if seen.signature is None else 0.0)
            seen.signature = signature
        return now - seen.since >= self.settle_seconds


def _arrival_ns(path: Path) -> int:
    """When a file arrived: its inode's change time, which a rename into place or a write
    sets. The same for files seen by an event and files found by a rescan, whichever the
    watcher heard of first, so that job slots go in the order files really arrived."""
    try:
        return path.lstat().st_ctime_ns
    except OSError:
        return time.time_ns()


def _wall_age(mtime_ns: int) -> float:
    return time.time() - mtime_ns / 1e9


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        with contextlib.suppress(Exception):  # never let a watcher thread die
            if isinstance(event, FileMovedEvent):
                self._route(os.fsdecode(event.dest_path), complete=True)
            else:
                self._route(
                    os.fsdecode(event.src_path), complete=isinstance(event, FileClosedEvent)
                )

    def _route(self, raw: str, *, complete: bool) -> None:
        path = Path(raw)
        if path.parent == self._watcher.inbox:
            self._watcher.note(path.name, complete=complete)
        elif path.parent == self._watcher.cancels and not path.name.startswith("."):
            self._watcher.note_cancel(path.name)
