"""daemon.claims: name locks, claiming inbox files, and the recovery of files in processing/ that
no live process owns -- ours after a crash, a dead peer's, or a peer's of another key/endpoint --
with the leftovers of finished names cleaned up."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import claims, jobrecord
from daemon.claims import Recovery, claim, claimed_input, has_remote, lock_name, release
from daemon.jobrecord import FileState, JobEntry, JobRecord, JobState
from daemon.spool import Spool

ENDPOINT = "http://127.0.0.1:1/v1beta"
KEY_ID = "aaaaaaaaaaaa"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    folder = Spool(tmp_path / "inbox", tmp_path / "outbox")
    folder.heal()
    return folder


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors taken in a test (name locks), closed after it."""
    held: list[int] = []
    yield held
    for fd in held:
        release(fd)


def drop(folder: Spool, name: str, data: bytes = b'"x"\n') -> Path:
    path = folder.inbox / name
    path.write_bytes(data)
    return path


def in_processing(
    folder: Spool, name: str, record: JobRecord | None = None, data: bytes | None = b'"x"\n'
) -> None:
    """A file as a daemon that crashed left it in processing/."""
    if data is not None:
        folder.input(name).write_bytes(data)
    if record is not None:
        jobrecord.save(record, folder.sidecar(name))


def running(name: str, **fields: object) -> JobRecord:
    record = JobRecord(name, state=FileState.RUNNING, endpoint=ENDPOINT, key_id=KEY_ID)
    record.jobs = [JobEntry(1, state=JobState.RUNNING, job_name="batches/j1")]
    for key, value in fields.items():
        setattr(record, key, value)
    return record


# ---- name locks ---------------------------------------------------------------------------------


def test_a_name_lock_has_one_holder(spool: Spool, fds: list[int]) -> None:
    fd = lock_name(spool, "a.jsonl")
    assert fd is not None
    fds.append(fd)
    assert spool.lock("a.jsonl").exists()
    assert lock_name(spool, "a.jsonl") is None  # another open file: flock says no
    other = lock_name(spool, "b.jsonl")
    assert other is not None
    fds.append(other)
    release(fd)
    again = lock_name(spool, "a.jsonl")
    assert again is not None
    fds.append(again)


def test_a_lock_file_removed_by_its_owner_is_no_lock(
    spool: Spool, fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner removes the lock file when done. A waiter that opened the old file gets its
    flock, but on a removed file: that must not count as owning the name."""
    owner = lock_name(spool, "a.jsonl")
    assert owner is not None
    real_flock = fcntl.flock

    def owner_finishes_first(fd: int, operation: int) -> None:
        spool.lock("a.jsonl").unlink()
        release(owner)
        monkeypatch.setattr(fcntl, "flock", real_flock)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", owner_finishes_first)
    assert lock_name(spool, "a.jsonl") is None
    fresh = lock_name(spool, "a.jsonl")  # a new file, a new lock: taken
    assert fresh is not None
    fds.append(fresh)


def test_lock_name_without_processing_raises_for_the_caller_to_heal(spool: Spool) -> None:
    shutil.rmtree(spool.processing)
    with pytest.raises(FileNotFoundError):
        lock_name(spool, "a.jsonl")


# ---- claim --------------------------------------------------------------------------------------


def test_claim_moves_the_file_and_keeps_a_second_link(spool: Spool, fds: list[int]) -> None:
    path = drop(spool, "a.jsonl", b'"hello"\n')
    spool.cancel_marker("a.jsonl").write_bytes(
        b""
    )  # stale: no cancel is for a file not yet claimed
    claimed = claim(spool, path, arrival_ns=123)
    assert claimed is not None
    fds.append(claimed.lock_fd)
    record = claimed.record
    assert claimed.fresh and claimed.spool is spool
    assert (record.input, record.arrival, record.state) == ("a.jsonl", 123, FileState.CLAIMED)
    assert not path.exists()
    kept = spool.work(record.claim_id, "input")
    assert spool.input("a.jsonl").read_bytes() == kept.read_bytes() == b'"hello"\n'
    st = spool.input("a.jsonl").lstat()
    assert record.inode == [st.st_dev, st.st_ino] and kept.lstat().st_ino == st.st_ino
    assert not spool.cancel_marker("a.jsonl").exists()
    assert not spool.sidecar("a.jsonl").exists()  # the validation step writes it


def test_a_busy_name_waits_in_the_inbox(spool: Spool, fds: list[int]) -> None:
    path = drop(spool, "a.jsonl")
    fd = lock_name(spool, "a.jsonl")
    assert fd is not None
    fds.append(fd)
    assert claim(spool, path, 1) is None
    assert path.exists()


@pytest.mark.parametrize("left", ["input", "sidecar"])
def test_a_name_still_in_processing_waits(spool: Spool, left: str) -> None:
    """A previous file of the same name (a crashed daemon's) is taken over by recovery first."""
    if left == "input":
        in_processing(spool, "a.jsonl")
    else:
        in_processing(spool, "a.jsonl", running("a.jsonl"), data=None)
    path = drop(spool, "a.jsonl", b'"second"\n')
    assert claim(spool, path, 1) is None
    assert path.read_bytes() == b'"second"\n'
    fd = lock_name(spool, "a.jsonl")  # the lock was given back
    assert fd is not None
    release(fd)


def test_a_file_linked_into_processing_before_a_crash_is_not_claimed_twice(spool: Spool) -> None:
    """A crash between the claim's link and unlink leaves one file under both names: the inbox
    name goes, recovery answers for processing/NAME, and no second claim ever follows."""
    path = drop(spool, "a.jsonl")
    os.link(path, spool.input("a.jsonl"))
    assert claim(spool, path, 1) is None
    assert not path.exists() and spool.input("a.jsonl").exists()
    (taken,) = Recovery(spool, ENDPOINT, KEY_ID).scan({})
    assert taken.record.input == "a.jsonl"
    release(taken.lock_fd)


def test_a_file_gone_before_the_claim_raises(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        claim(spool, spool.inbox / "gone.jsonl", 1)
    fd = lock_name(spool, "gone.jsonl")
    assert fd is not None
    release(fd)


def test_claimed_input_prefers_the_second_link(spool: Spool, fds: list[int]) -> None:
    claimed = claim(spool, drop(spool, "a.jsonl", b'"mine"\n'), 1)
    assert claimed is not None
    fds.append(claimed.lock_fd)
    record = claimed.record
    intruder = spool.inbox / "other"
    intruder.write_bytes(b'"renamed over it"\n')
    os.replace(intruder, spool.input("a.jsonl"))
    assert claimed_input(spool, record).read_bytes() == b'"mine"\n'
    spool.work(record.claim_id, "input").unlink()
    assert claimed_input(spool, record) == spool.input("a.jsonl")


def test_has_remote() -> None:
    record = JobRecord("a.jsonl")
    assert not has_remote(record)
    record.jobs = [JobEntry(1, state=JobState.COLLECTED, job_name="batches/done")]
    assert not has_remote(record)  # collected: nothing left at the API
    for fields in (
        {"job_name": "batches/x"},
        {"create_pending_since": "t"},
        {"uploaded_file": "files/u"},
        {"upload_pending_since": "t"},
    ):
        record.jobs = [JobEntry(1, state=JobState.SUBMITTING, **fields)]  # type: ignore[arg-type]
        assert has_remote(record), fields


# ---- recovery -----------------------------------------------------------------------------------


def recover(
    spool: Spool, fds: list[int], owned: dict[str, str] | None = None
) -> dict[str, claims.Claimed]:
    taken = Recovery(spool, ENDPOINT, KEY_ID).scan(owned or {})
    fds.extend(c.lock_fd for c in taken)
    assert all(not c.fresh for c in taken)
    return {c.record.input: c for c in taken}


def test_recovery_takes_over_a_crashed_file_with_its_record(spool: Spool, fds: list[int]) -> None:
    record = running("a.jsonl")
    in_processing(spool, "a.jsonl", record)
    taken = recover(spool, fds)
    assert list(taken) == ["a.jsonl"]
    assert taken["a.jsonl"].record == jobrecord.load(spool.sidecar("a.jsonl"))
    assert recover(spool, fds) == {}  # now owned: a second scan takes nothing


def test_recovery_skips_names_a_live_process_owns(spool: Spool, fds: list[int]) -> None:
    in_processing(spool, "theirs.jsonl", running("theirs.jsonl"))
    in_processing(spool, "ours.jsonl", running("ours.jsonl"))
    fd = lock_name(spool, "theirs.jsonl")  # a live peer
    assert fd is not None
    fds.append(fd)
    assert recover(spool, fds, owned={"ours.jsonl": "c"}) == {}


def test_a_crash_right_after_the_claim_leaves_an_input_without_sidecar(
    spool: Spool, fds: list[int]
) -> None:
    in_processing(spool, "a.jsonl")
    record = recover(spool, fds)["a.jsonl"].record
    st = spool.input("a.jsonl").lstat()
    assert record.state is FileState.CLAIMED and record.inode == [st.st_dev, st.st_ino]
    assert record.arrival == st.st_mtime_ns


def test_a_crash_right_after_the_claim_keeps_the_claim_and_its_work_files(
    spool: Spool, fds: list[int]
) -> None:
    """The second link, a partial index: the claim's own work files, removed when the file is
    archived -- not an unknown claim's, left in processing/ for an hour."""
    claimed = claim(spool, drop(spool, "a.jsonl"), 1)
    assert claimed is not None
    claim_id = claimed.record.claim_id
    spool.work(claim_id, "index").write_bytes(b"[1, ")  # validation cut short
    release(claimed.lock_fd)  # the process died
    record = recover(spool, fds)["a.jsonl"].record
    assert record.claim_id == claim_id
    assert sorted(p.name for p in spool.work_files(claim_id)) == [
        f"{claim_id}.index",
        f"{claim_id}.input",
    ]


def test_an_input_gone_before_anything_happened_is_forgotten(spool: Spool, fds: list[int]) -> None:
    in_processing(spool, "a.jsonl", JobRecord("a.jsonl"), data=None)
    assert recover(spool, fds) == {}


def test_an_input_replaced_while_no_daemon_ran_is_answered_from_the_claim(
    spool: Spool, fds: list[int]
) -> None:
    """An intruder renamed over processing/NAME while the daemon was down: recovery takes the
    file over, and the claimed bytes (the second link) are what it answers for; the intruder
    is given its own report when the file is archived (publish.intruder)."""
    claimed = claim(spool, drop(spool, "a.jsonl", b'"claimed"\n'), 1)
    assert claimed is not None
    record = claimed.record
    record.state = FileState.RUNNING
    jobrecord.save(record, spool.sidecar("a.jsonl"))
    release(claimed.lock_fd)  # the daemon stopped
    intruder = spool.inbox / "intruder"
    intruder.write_bytes(b'"never submitted"\n')
    os.replace(intruder, spool.input("a.jsonl"))
    taken = recover(spool, fds)["a.jsonl"].record
    assert taken.claim_id == record.claim_id
    assert claimed_input(spool, taken).read_bytes() == b'"claimed"\n'
    assert spool.input("a.jsonl").read_bytes() == b'"never submitted"\n'


def test_an_input_gone_with_jobs_in_flight_is_still_answered(spool: Spool, fds: list[int]) -> None:
    """Its jobs exist: their results are written even though the input went away."""
    in_processing(spool, "a.jsonl", running("a.jsonl"), data=None)
    assert list(recover(spool, fds)) == ["a.jsonl"]


def test_a_corrupt_sidecar_fails_the_file_rather_than_risk_a_second_job(
    spool: Spool, fds: list[int]
) -> None:
    in_processing(spool, "a.jsonl")
    spool.sidecar("a.jsonl").write_bytes(b"{half a sidec")
    record = recover(spool, fds)["a.jsonl"].record
    assert record.state is FileState.WRITING
    assert record.error is not None and record.error["stage"] == "job"
    assert "rather than risk a second job" in record.error["message"]


def test_a_finished_file_whose_archiving_was_cut_short_is_taken(
    spool: Spool, fds: list[int]
) -> None:
    in_processing(spool, "a.jsonl", JobRecord("a.jsonl", state=FileState.DONE), data=None)
    assert recover(spool, fds)["a.jsonl"].record.state is FileState.DONE


def test_jobs_of_another_endpoint_are_left_alone(spool: Spool, fds: list[int]) -> None:
    in_processing(spool, "a.jsonl", running("a.jsonl", endpoint="https://other/v1beta"))
    nothing_remote = JobRecord("b.jsonl", state=FileState.QUEUED, endpoint="https://other/v1beta")
    nothing_remote.jobs = [JobEntry(1)]
    in_processing(spool, "b.jsonl", nothing_remote)
    assert list(recover(spool, fds)) == ["b.jsonl"]  # nothing at the other API: ours to do
    fd = lock_name(spool, "a.jsonl")  # and the lock of the one left alone was given back
    assert fd is not None
    release(fd)


def test_a_create_in_doubt_under_another_key_is_left_alone(spool: Spool, fds: list[int]) -> None:
    """Only the key that created a job can find it by listing; a named job any key can poll."""
    unnamed = running("a.jsonl", key_id="bbbbbbbbbbbb")
    unnamed.jobs = [JobEntry(1, state=JobState.SUBMITTING, create_pending_since="t")]
    in_processing(spool, "a.jsonl", unnamed)
    in_processing(spool, "b.jsonl", running("b.jsonl", key_id="bbbbbbbbbbbb"))
    assert list(recover(spool, fds)) == ["b.jsonl"]


def test_leftover_locks_of_finished_names_are_removed(spool: Spool, fds: list[int]) -> None:
    for name in ("done.jsonl", "busy.jsonl", "ours.jsonl", "waiting.jsonl"):
        spool.lock(name).write_bytes(b"")
    fd = lock_name(spool, "busy.jsonl")
    assert fd is not None
    fds.append(fd)
    in_processing(spool, "waiting.jsonl", running("waiting.jsonl"))
    taken = recover(spool, fds, owned={"ours.jsonl": "cccccccccccc"})
    assert list(taken) == ["waiting.jsonl"]
    assert not spool.lock("done.jsonl").exists()
    for name in ("busy.jsonl", "ours.jsonl", "waiting.jsonl"):
        assert spool.lock(name).exists(), name


def test_work_files_no_owner_answers_for_are_removed_once_stale(
    spool: Spool, fds: list[int]
) -> None:
    record = running("a.jsonl")
    in_processing(spool, "a.jsonl", record)
    kept = [
        spool.work(record.claim_id, "index"),  # the claim of a file taken over now
        spool.work("cccccccccccc", "j1.out"),  # a claim we own
        spool.work("dddddddddddd", "index"),  # nobody's, but young: a peer may be writing it
    ]
    stale = spool.work("eeeeeeeeeeee", "j2.req")
    old = time.time() - claims.STALE_WORK_SECONDS - 10
    for path in [*kept, stale]:
        path.write_bytes(b"")
    os.utime(stale, (old, old))
    os.utime(kept[0], (old, old))
    os.utime(kept[1], (old, old))
    recover(spool, fds, owned={"ours.jsonl": "cccccccccccc"})
    assert all(path.exists() for path in kept)
    assert not stale.exists()
