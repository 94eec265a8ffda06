"""Claiming and ownership: which process answers for which input name in processing/.

A name is owned by the process holding the flock on `processing/.NAME.lock` -- a file of its
own, so that replacing the input cannot hand the name to a second owner. Claiming moves an
inbox file into processing/ (link, then unlink: never replacing anything) and keeps a second
hard link, `.{claim}.input`, so the daemon still has the bytes it claimed if someone renames
another file over `processing/NAME`. Recovery takes over files no live process owns: ours
after a crash, or a dead peer's -- but only where this daemon can reach the file's jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import atomic, jobrecord, logs, spool
from .errors import SidecarError
from .jobrecord import FileState, JobRecord, JobState
from .spool import Spool

STALE_WORK_SECONDS = 3600
"""Work files of a claim no sidecar names are removed once this old (a peer may be writing them)."""

log = logs.get()


@dataclass
class Claimed:
    """A file this process now owns: its record and the descriptor of its name lock."""

    record: JobRecord
    lock_fd: int
    spool: Spool
    fresh: bool  # claimed from the inbox just now (else taken over from processing/)


def lock_name(folder: Spool, name: str) -> int | None:
    """Take the name lock of `name`; None when another process holds it."""
    path = folder.lock(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except FileNotFoundError:
        raise  # processing/ is gone: the caller heals the spool
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The owner removes the lock file when it is done: a lock on a removed file is no lock.
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            raise BlockingIOError
    except OSError:
        os.close(fd)
        return None
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def claim(folder: Spool, path: Path, arrival_ns: int) -> Claimed | None:
    """Move inbox/NAME into processing/ and own it; None if the name is busy (it waits).

    The caller makes processing/ durable (once for a batch of claims) and then meets the
    crash point `after_claim`."""
    name = path.name
    fd = lock_name(folder, name)
    if fd is None:
        return None
    target = folder.input(name)
    try:
        if os.path.lexists(target) or folder.sidecar(name).exists():
            release(fd)  # a previous owner's file: recovery takes it over; this one waits
            if atomic.same_entry(path, target):  # unless it is this file, linked before a crash
                path.unlink(missing_ok=True)
            return None
        if not atomic.link_or_rename(path, target):
            release(fd)
            return None
        record = JobRecord(input=name, arrival=arrival_ns)
        with contextlib.suppress(OSError):  # filesystems without hard links: no second name
            os.link(target, folder.work(record.claim_id, "input"), follow_symlinks=False)
        st = target.lstat()
        record.inode = [st.st_dev, st.st_ino]
    except BaseException:
        release(fd)
        raise
    # No cancel request can be meant for a file claimed just now: a marker left is stale.
    folder.cancel_marker(name).unlink(missing_ok=True)
    return Claimed(record, fd, folder, fresh=True)


def claimed_input(folder: Spool, record: JobRecord) -> Path:
    """The bytes this claim answers for: the second link if it exists, else processing/NAME."""
    kept = folder.work(record.claim_id, "input")
    return kept if os.path.lexists(kept) else folder.input(record.input)


def has_remote(record: JobRecord) -> bool:
    """Whether a job or an upload may exist at the API for this file."""
    return any(
        j.job_name or j.create_pending_since or j.uploaded_file or j.upload_pending_since
        for j in record.jobs
        if j.state is not JobState.COLLECTED
    )


class Recovery:
    """Takes over files in processing/ that no live process owns."""

    def __init__(self, folder: Spool, endpoint: str, key_id: str) -> None:
        self.spool = folder
        self.endpoint = endpoint
        self.key_id = key_id
        self._said: set[tuple[str, str]] = set()
        self._left: set[tuple[str, str]] = set()  # (name, claim id) whose jobs we cannot reach
        self._claims_of_inputs: dict[tuple[int, int], str] = {}

    def scan(self, owned: dict[str, str]) -> list[Claimed]:
        """Take over what no live process owns; `owned`: our names and their claim ids."""
        folder = self.spool
        try:
            entries = {e.name: e for e in os.scandir(folder.processing)}
        except FileNotFoundError:
            return []
        names = set()
        for entry in entries:
            if spool.is_candidate(entry):
                names.add(entry)
            elif entry.endswith(spool.INPUT_SUFFIX + spool.SIDECAR_SUFFIX):
                names.add(entry[: -len(spool.SIDECAR_SUFFIX)])
            elif spool.not_utf8(entry) and entry.endswith(spool.INPUT_SUFFIX):
                self._put_back(entry)
        self._claims_of_inputs = _claims_of_inputs(folder.workdir)
        taken: list[Claimed] = []
        for name in sorted(names - owned.keys()):
            claimed = self._take(name)
            if claimed is not None:
                taken.append(claimed)
        keep = {**owned, **{c.record.input: c.record.claim_id for c in taken}}
        self._remove_leftovers(entries, keep)
        return taken

    def _put_back(self, name: str) -> None:
        """An input whose name is not UTF-8, claimed by a version that took such names: back
        to the inbox, where it is listed as ignored (it can have no sidecar, hence no job)."""
        fd = lock_name(self.spool, name)
        if fd is None:
            return
        try:
            moved = atomic.move_new(self.spool.input(name), self.spool.inbox / name)
            log.warning(
                "put back into the inbox: its name is not UTF-8",
                file=spool.printable(name),
                moved_to=spool.printable(str(moved)),
            )
        except OSError as exc:
            log.warning("cannot put back", file=spool.printable(name), error=str(exc))
        finally:
            self.spool.lock(name).unlink(missing_ok=True)
            release(fd)

    def _take(self, name: str) -> Claimed | None:
        folder = self.spool
        try:
            fd = lock_name(folder, name)
        except FileNotFoundError:
            return None
        if fd is None:
            return None  # a live process owns it
        try:
            record = self._load(name)
        except OSError as exc:
            log.error("cannot read sidecar", file=name, error=str(exc))
            release(fd)
            return None
        if record is None or (name, record.claim_id) in self._left:
            release(fd)
            return None
        if record.endpoint and record.endpoint != self.endpoint and has_remote(record):
            self._say_once(name, "endpoint", record.endpoint)
            release(fd)
            return None
        if record.key_id and record.key_id != self.key_id and _unnamed_remote(record):
            self._say_once(name, "key", record.key_id)
            release(fd)
            return None
        return Claimed(record, fd, folder, fresh=False)

    def _load(self, name: str) -> JobRecord | None:
        folder = self.spool
        sidecar = folder.sidecar(name)
        has_input = os.path.lexists(folder.input(name))
        try:
            record = jobrecord.load(sidecar)
        except FileNotFoundError:
            if not has_input:
                return None  # archived meanwhile
            st = folder.input(name).lstat()
            record = JobRecord(input=name, arrival=st.st_mtime_ns, inode=[st.st_dev, st.st_ino])
            # Claimed just before a crash: keep that claim, so its work files are its own.
            claim_id = self._claims_of_inputs.get((st.st_dev, st.st_ino))
            if claim_id is not None:
                record.claim_id = claim_id
                # Validated once (its index exists), so its sidecar existed and was lost: jobs
                # may have been made. Each is looked up before it is made (again).
                record.in_doubt = os.path.lexists(folder.work(claim_id, "index"))
                if record.in_doubt:
                    log.warning(
                        "the sidecar is gone but the claim's work files remain; its jobs are "
                        "looked up before any is made",
                        file=spool.printable(name),
                        claim=claim_id,
                    )
            return record
        except SidecarError as exc:
            record = JobRecord(input=name, state=FileState.WRITING)
            record.error = {
                "stage": "job",
                "message": f"{exc}; the file is failed rather than risk a second job",
            }
            return record
        if record.state.finished:
            return record  # archiving was cut short: finish it
        if not has_input and not os.path.lexists(folder.work(record.claim_id, "input")):
            if record.state is FileState.CLAIMED:
                return None  # the input went away before anything happened: nothing to answer for
            log.warning("the claimed input is gone; its jobs are still answered", file=name)
        return record

    def leave(self, record: JobRecord, reason: str) -> None:
        """A file taken over whose jobs this daemon's key cannot reach (404 for the key of
        another project): left to its owner from now on, and said once."""
        if (record.input, record.claim_id) in self._left:
            return
        self._left.add((record.input, record.claim_id))
        log.warning("left alone", file=record.input, reason=reason)

    def _say_once(self, name: str, what: str, value: str) -> None:
        if (name, value) in self._said:
            return
        self._said.add((name, value))
        log.warning(
            f"left alone: its jobs belong to another API {what}",
            file=name,
            **{what: value},
            ours=self.endpoint if what == "endpoint" else self.key_id,
        )

    def _remove_leftovers(
        self, entries: dict[str, os.DirEntry[str]], owned: dict[str, str]
    ) -> None:
        """Lock files of finished names; work files of claims no owner answers for any more."""
        folder = self.spool
        claims = set(owned.values())
        now = time.time()
        for entry_name, entry in entries.items():
            if entry_name.startswith(spool.DAEMON_PREFIX):
                continue  # a daemon's presence file and lock: see status.remove_stale
            if entry_name.startswith(".") and entry_name.endswith(spool.LOCK_SUFFIX):
                name = entry_name[1 : -len(spool.LOCK_SUFFIX)]
                if name in owned or os.path.lexists(folder.input(name)):
                    continue
                if folder.sidecar(name).exists():
                    continue
                fd = lock_name(folder, name)
                if fd is not None:
                    Path(entry.path).unlink(missing_ok=True)
                    release(fd)
                continue
        try:
            work = list(os.scandir(folder.workdir))
        except FileNotFoundError:
            return
        for entry in work:
            match = spool.WORK_FILE.match(entry.name.lstrip("."))
            if match is not None and match.group(1) in claims:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_WORK_SECONDS:
                    Path(entry.path).unlink()


def _claims_of_inputs(workdir: Path) -> dict[tuple[int, int], str]:
    """(device, inode) of each claim's second link to its input -> the claim id."""
    found: dict[tuple[int, int], str] = {}
    try:
        entries = list(os.scandir(workdir))
    except FileNotFoundError:
        return found
    for entry in entries:
        match = spool.WORK_FILE.match(entry.name)
        if match is None or match.group(2) != "input":
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            found[(st.st_dev, st.st_ino)] = match.group(1)
    return found


def _unnamed_remote(record: JobRecord) -> bool:
    """A create or upload whose result only the original key can find (a listing per project)."""
    return any(
        (j.create_pending_since and not j.job_name) or j.upload_pending_since
        for j in record.jobs
        if j.state is not JobState.COLLECTED
    )
