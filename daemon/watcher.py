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
from .spool import CANCEL_SUFFIX, is_candidate, why_ignored

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
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._on_event = on_event
        self._seen: dict[str, _Seen] = {}
        self._cancel_requests: set[str] = set()
        self.ignored: dict[str, str] = {}  # inbox names not taken, and why (logged once each)
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> None:
        """Start watching, then list what is already there (files older than the settle time are ready)."""
        observer = Observer()
        handler = _Handler(self)
        observer.schedule(handler, str(self.inbox), recursive=False)
        processing = self.inbox / "processing"
        if processing.is_dir():
            observer.schedule(handler, str(processing), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.rescan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def rescan(self) -> None:
        """List the inbox: every candidate not yet known is noted (events may have been dropped)."""
        try:
            entries = list(os.scandir(self.inbox))
        except OSError:
            return
        now = self._clock()
        ignored: dict[str, str] = {}
        with self._lock:
            for entry in entries:
                if is_candidate(entry.name):
                    if entry.name not in self._seen:
                        arrival = _arrival_ns(self.inbox / entry.name)
                        self._seen[entry.name] = _Seen(None, now, False, arrival)
                elif not entry.name.startswith(".") and entry.name not in _SPOOL_FOLDERS:
                    ignored[entry.name] = why_ignored(entry.name) or "not a file the daemon takes"
        for name, reason in ignored.items():
            if name not in self.ignored:
                log.warning(
                    "ignored: rename the file to have it processed", file=name, reason=reason
                )
        self.ignored = ignored
        self._rescan_cancel_requests()

    def _rescan_cancel_requests(self) -> None:
        """Cancel markers written while no daemon watched (or whose events were dropped)."""
        try:
            names = {entry.name for entry in os.scandir(self.inbox / "processing")}
        except OSError:
            return
        with self._lock:
            for name in names:
                target = name[: -len(CANCEL_SUFFIX)]
                if name.endswith(CANCEL_SUFFIX) and not name.startswith(".") and target in names:
                    self._cancel_requests.add(target)

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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._seen)

    def ready(self) -> list[tuple[Path, int]]:
        """Candidates that are complete now, with their arrival time, in arrival order."""
        now = self._clock()
        ready: list[tuple[int, str]] = []
        with self._lock:
            for name, seen in list(self._seen.items()):
                path = self.inbox / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._seen[name]
                    continue
                except OSError:
                    ready.append((seen.arrival, name))  # unreadable entries get an error report
                    continue
                signature = (st.st_size, st.st_mtime_ns)
                if signature != seen.signature:
                    # First look, or it changed: start (re)counting, unless it already looks old enough.
                    age = max(0.0, _wall_age(st.st_mtime_ns))
                    seen.since = now - (age if seen.signature is None else 0.0)
                    seen.signature = signature
                settled = now - seen.since >= self.settle_seconds
                if (seen.complete or settled) and open_for_writing(path) is not True:
                    ready.append((seen.arrival, name))
        ready.sort()
        return [(self.inbox / name, arrival) for arrival, name in ready]


def _arrival_ns(path: Path) -> int:
    """When a file arrived: its inode's change time, which a rename into place or a write
    sets. The same for files seen by an event and files found by a rescan, whichever the
    watcher heard of first, so that job slots go in the order files really arrived."""
    try:
        return path.lstat().st_ctime_ns
    except OSError:
        return time.time_ns()


_SPOOL_FOLDERS = frozenset({"processing", "done", "failed"})


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
        elif path.name.endswith(CANCEL_SUFFIX):
            self._watcher.note_cancel(path.name[: -len(CANCEL_SUFFIX)])
