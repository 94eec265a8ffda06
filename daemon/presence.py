"""Presence: which daemons run on a spool, told by their files and the locks they hold.

A running daemon keeps `processing/.daemon.HOST.PID.json` (who, since when, which
configuration, paused and why, a heartbeat) and holds a flock on the `.lock` beside it for its
whole life, so `status` can tell a live daemon from a dead one's leftovers by trying that lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, atomic, jobrecord, logs
from .jobrecord import isotime, utcnow
from .spool import DAEMON_PREFIX, HOST, LOCK_SUFFIX, Spool

HEARTBEAT_SECONDS = 30.0
"""A running daemon rewrites its presence file at least this often."""

SILENT_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
"""A live daemon whose heartbeat is older than this is flagged in the table (hung?)."""

LOCK_TRIES = 100
"""Attempts (10 ms apart) at our own presence lock before choosing another name."""

log = logs.get()

_held: set[Path] = set()
"""Presence files held by this process (tests run several services in one process)."""


def lock_path(presence: Path) -> Path:
    """`.daemon.HOST.PID.lock` beside `.daemon.HOST.PID.json`."""
    return presence.with_suffix(LOCK_SUFFIX)


class Presence:
    """This daemon's presence file and its lock: created at start, kept fresh, removed at stop."""

    def __init__(
        self,
        spool: Spool,
        *,
        config: str,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.spool = spool
        self.config = config
        self.paused: str | None = None
        self.interval = interval
        self.since = isotime(wall())
        self._clock = clock
        self._wall = wall
        self._fd: int | None = None
        self._next = 0.0
        self._next_complaint = 0.0
        self.path = spool.daemon_file()

    @property
    def lock(self) -> Path:
        return lock_path(self.path)

    def start(self, paused: str | None = None) -> list[Path]:
        """Remove a dead daemon's leftovers, take our lock, write the file; returns what was removed."""
        removed = remove_stale(self.spool)
        self.paused = paused
        self._acquire()
        self._write()
        return removed

    def beat(self, *, paused: str | None, config: str | None = None) -> bool:
        """Rewrite the file if the pause state or the configuration changed, or when due."""
        changed = paused != self.paused or (config is not None and config != self.config)
        if not changed and self._clock() < self._next:
            return False
        self.paused = paused
        self.config = config or self.config
        try:
            if not self._still_ours():  # processing/ was removed and healed: start afresh
                self._release()
                self._acquire()
            self._write()
        except OSError as exc:
            if self._clock() >= self._next_complaint:
                self._next_complaint = self._clock() + 60
                log.warning("cannot write the daemon's presence file", error=str(exc))
            return False
        return True

    def stop(self) -> None:
        """A clean stop: the file and the lock go (the file first: it is what status reads)."""
        for path in (self.path, self.lock):
            with contextlib.suppress(OSError):
                path.unlink()
        self._release()

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": HOST,
            "since": self.since,
            "config": self.config,
            "paused": self.paused,
            "heartbeat": isotime(self._wall()),
            "version": __version__,
            "inbox": str(self.spool.inbox),
        }

    def _write(self) -> None:
        atomic.write_bytes(self.path, json.dumps(self.as_dict(), indent=1).encode() + b"\n")
        self._next = self._clock() + self.interval

    def _acquire(self) -> None:
        """Create and flock our lock file; another name if this one is held (same pid elsewhere)."""
        for number in range(1, 100):
            host = HOST if number == 1 else f"{HOST}-{number}"
            path = self.spool.daemon_file(host=host)
            if path in _held:
                continue
            fd = _lock_exclusively(lock_path(path))
            if fd is not None:
                self.path, self._fd = path, fd
                _held.add(path)
                return
        raise OSError(f"no free presence file name in {self.spool.processing}")

    def _release(self) -> None:
        _held.discard(self.path)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _still_ours(self) -> bool:
        if self._fd is None:
            return False
        try:
            return os.path.samestat(os.fstat(self._fd), os.lstat(self.lock))
        except OSError:
            return False


def _lock_exclusively(path: Path) -> int | None:
    """Our lock on `path` (a file that is still at `path`), or None if someone else holds it."""
    for _ in range(LOCK_TRIES):  # a `status` probe holds it for microseconds
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.01)
            continue
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a cleaner removed it just before we locked it: create it again
    return None


def _probe(path: Path, *, exclusive: bool) -> tuple[str, int | None]:
    """Is the lock at `path` held? ("held" | "free" | "missing" | "unknown", our fd if free)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing", None
    except OSError:
        return "unknown", None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return "held", None
    except OSError:
        os.close(fd)
        return "unknown", None
    return "free", fd


def remove_stale(spool: Spool) -> list[Path]:
    """Presence files and locks of daemons that died without a clean stop."""
    removed: list[Path] = []
    try:
        names = os.listdir(spool.processing)
    except OSError:
        return removed
    bases = {
        name.rsplit(".", 1)[0]
        for name in names
        if name.startswith(DAEMON_PREFIX) and name.endswith((".json", LOCK_SUFFIX))
    }
    for base in sorted(bases):
        presence = spool.processing / (base + ".json")
        if presence in _held:
            continue
        lock = lock_path(presence)
        state, fd = _probe(lock, exclusive=True)
        if state in ("held", "unknown"):
            continue
        try:
            if state == "free":
                with contextlib.suppress(FileNotFoundError):
                    if fd is not None and os.path.samestat(os.fstat(fd), os.lstat(lock)):
                        lock.unlink()
                        removed.append(lock)
            with contextlib.suppress(FileNotFoundError):
                presence.unlink()
                removed.append(presence)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def read_daemons(spool: Spool, now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(live, stale) presence records, oldest first; live = its lock is held by a process."""
    live: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for path in spool.daemon_files():
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        state, fd = _probe(lock_path(path), exclusive=False)
        if fd is not None:
            os.close(fd)
        if state == "unknown":  # cannot open the lock (permissions): trust a fresh heartbeat
            fresh = jobrecord.seconds_since(data.get("heartbeat"), now) < SILENT_AFTER_SECONDS
            state = "held" if fresh else "free"
        (live if state == "held" else stale).append(data)
    live.sort(key=lambda d: str(d.get("since")))
    stale.sort(key=lambda d: str(d.get("since")))
    return live, stale
