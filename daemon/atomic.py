"""Crash-safe file writes: a dot-file beside the target, fsync, then link or rename into place."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

FILE_MODE = 0o640
"""Files the daemon writes are never world-readable; the umask can only narrow this."""

STALE_TEMP_SECONDS = 3600
"""A temp file from another host (shared folder) is assumed abandoned after this long."""

TEMP_PREFIX_CHARS = 48
"""How much of the target's name a temp file's name repeats."""

_MULTI_SUFFIXES = (".jsonl.job.json", ".error.json", ".jsonl")
_HOST = socket.gethostname().replace(".", "_")
_STARTED_NS = time.monotonic_ns()
_STARTED = time.time()
"""When this process started (near enough): a temp file with our pid from before then is a
predecessor's, whose pid we were given again (containers restart the daemon as pid 1)."""


def temp_name(target: Path) -> Path:
    """A dot-file in the target's folder that names its writer, so leftovers can be cleaned."""
    # Only a prefix of the target's name, so long names leave room for the rest (NAME_MAX 255).
    prefix = target.name[:TEMP_PREFIX_CHARS]
    return target.with_name(f".{prefix}.{_HOST}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def write_file(
    target: Path,
    chunks: Iterable[bytes],
    *,
    replace: bool = True,
    durable: bool = True,
    mode: int | None = None,
) -> None:
    """Write `chunks` so that `target` appears complete or not at all.

    `replace=False` never overwrites: an existing `target` raises FileExistsError.
    `durable=False` skips the fsyncs: still atomic for readers and across a crash of the
    process, but a power failure may bring back the previous version. `mode`: exactly these
    permissions, whatever the umask (else FILE_MODE under the umask).
    """
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
            os.unlink(tmp)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Atomically replace `target` with `data` (sidecars, cancel markers)."""
    write_file(target, [data], durable=durable)


def free_name(target: Path) -> Path:
    """`target`, or the first `target-N` name not taken yet."""
    return next(p for p in unique_names(target) if not os.path.lexists(p))


_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
)
"""`os.link` errors of filesystems (or files) that cannot take another hard link."""


def link_or_rename(source: Path, target: Path) -> bool:
    """Move `source` to `target` without replacing anything there; False if `target` is taken.

    A hard link then an unlink, so a crash leaves the file under both names, never under none;
    a `target` that already is `source` (linked before a crash) counts as moved. Filesystems
    without hard links fall back to a rename after a check (a small race accepted).
    """
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        if not same_entry(source, target):
            return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):
            return False
        os.rename(source, target)
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(source)
    return True


def move_new(source: Path, target: Path) -> Path:
    """Move `source` to `target` or a free `target-N` name, never replacing a file there."""
    for candidate in unique_names(target):
        if link_or_rename(source, candidate):
            fsync_dir(target.parent)
            return candidate
    raise AssertionError("unreachable: unique_names is endless")


def same_entry(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (hard links of one inode); False if either is gone."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def unique_names(target: Path) -> Iterator[Path]:
    """`x.jsonl`, `x-2.jsonl`, `x-3.jsonl`, ...: the suffix goes before the extension."""
    yield target
    name = target.name
    suffix = next(
        (s for s in _MULTI_SUFFIXES if name.endswith(s) and len(name) > len(s)), target.suffix
    )
    stem = name[: len(name) - len(suffix)] if suffix else name
    n = 2
    while True:
        yield target.with_name(f"{stem}-{n}{suffix}")
        n += 1


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files a crashed writer left behind (ours by pid, other hosts' by age)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp"):
        parts = path.name.rsplit(".", 4)
        if len(parts) != 5:
            continue
        host, pid = parts[1], parts[2]
        if host == _HOST:
            stale = not pid.isdigit() or not _alive(int(pid))
            if not stale and int(pid) == os.getpid():
                stale = _before_this_process(path, parts[3])
        else:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS
            except FileNotFoundError:
                continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _before_this_process(path: Path, stamp: str) -> bool:
    if stamp.isdigit() and int(stamp) < _STARTED_NS:  # same boot: monotonic clocks compare
        return True
    try:
        return path.stat().st_mtime < _STARTED - 1  # an earlier boot
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GroupCommit:
    """Files that must be durable before something that must not happen twice (a sidecar
    before a create), made durable together: each writer writes its temp file, and one of the
    writers waiting at that moment -- the leader -- fsyncs every waiting file, renames each into
    place and fsyncs each folder once, as databases batch their log flushes. A writer returns
    only once its own file's round has finished (or raises what that round met for it)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pending: list[_Commit] = []
        self._leading = False

    def write(self, target: Path, data: bytes) -> None:
        """Replace `target` with `data` atomically and durably (as `write_bytes`)."""
        tmp = temp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        commit = _Commit(target, tmp, fd)
        try:
            _write_all(fd, data)
        except BaseException:
            commit.discard()
            raise
        with self._lock:
            self._pending.append(commit)
            while not commit.done:
                if self._leading:
                    self._lock.wait()
                    continue
                self._leading = True
                round_, self._pending = self._pending, []
                self._lock.release()
                try:
                    _commit_round(round_)
                finally:
                    self._lock.acquire()
                    self._leading = False
                    self._lock.notify_all()
        if commit.error is not None:
            raise commit.error


class _Commit:
    __slots__ = ("done", "error", "fd", "target", "tmp")

    def __init__(self, target: Path, tmp: Path, fd: int) -> None:
        self.target, self.tmp = target, tmp
        self.fd: int | None = fd  # None once closed: a closed number may be another file's now
        self.done = False
        self.error: BaseException | None = None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _commit_round(round_: list[_Commit]) -> None:
    """fsync each file, rename each into place, fsync each folder once. Every commit of the
    round ends done, with the error it met if any (what escapes counts for all: its waiters
    must not wait for ever, nor take a file not known durable for one)."""
    folders: dict[Path, list[_Commit]] = {}
    try:
        for commit in round_:
            try:
                assert commit.fd is not None
                os.fsync(commit.fd)
                commit.close()
                os.replace(commit.tmp, commit.target)
                folders.setdefault(commit.target.parent, []).append(commit)
            except OSError as exc:
                commit.error = exc
                commit.discard()
        for folder, commits in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for commit in commits:
                    commit.error = exc
    except BaseException as exc:
        for commit in round_:
            commit.error = commit.error or exc
            commit.discard()  # (a file renamed already has no temp name left to remove)
        raise
    finally:
        for commit in round_:
            commit.done = True


GROUP = GroupCommit()
"""The daemon's one group of durable writes (sidecars before creates and uploads)."""
