"""daemon.jobrecord: the file's and each job's checked state machines, the sidecar round trip,
sidecars of the previous version, `summarize` and display names."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from daemon.jobrecord import (
    DISPLAY_NAME_MAX,
    FILE_TRANSITIONS,
    JOB_TRANSITIONS,
    FileState,
    InvalidTransition,
    JobEntry,
    JobRecord,
    JobState,
    SidecarError,
    isotime,
    load,
    parse_isotime,
    save,
    seconds_since,
)
from tests.support.harness import CONTRACT_SIDECAR_FIELDS

F = FileState
IN_FLIGHT = (F.QUEUED, F.UPLOADING, F.SUBMITTING, F.RUNNING)
FILE_ALLOWED = {
    (F.CLAIMED, F.QUEUED),
    (F.CLAIMED, F.WRITING),
    *((a, b) for a in IN_FLIGHT for b in IN_FLIGHT if a is not b),
    *((a, F.WRITING) for a in IN_FLIGHT),
    (F.WRITING, F.DONE),
    (F.WRITING, F.FAILED),
}
"""While in flight the file's state only summarises its jobs, so it may move between any two."""

J = JobState
JOB_ALLOWED = {
    (J.QUEUED, J.UPLOADING),
    (J.QUEUED, J.SUBMITTING),
    (J.QUEUED, J.ENDED),  # cancelled before a job was made
    (J.UPLOADING, J.SUBMITTING),
    (J.UPLOADING, J.QUEUED),  # the quota refused the upload
    (J.UPLOADING, J.ENDED),  # the upload was refused
    (J.SUBMITTING, J.RUNNING),
    (J.SUBMITTING, J.QUEUED),  # the quota refused the create
    (J.SUBMITTING, J.ENDED),  # the create was refused
    (J.RUNNING, J.ENDED),
    (J.RUNNING, J.QUEUED),  # expired and resubmitted, or failed for the quota
    (J.ENDED, J.COLLECTED),
}


def pairs(states: type[FileState] | type[JobState]) -> list[tuple[Any, Any]]:
    return [(a, b) for a in states for b in states]


# ---- the file's state machine ------------------------------------------------------------


def test_file_transition_table_is_the_documented_one() -> None:
    assert {(a, b) for a, targets in FILE_TRANSITIONS.items() for b in targets} == FILE_ALLOWED
    assert set(FILE_TRANSITIONS) == set(FileState)


@pytest.mark.parametrize(("source", "target"), sorted(FILE_ALLOWED, key=str), ids=str)
def test_allowed_file_moves_succeed_and_reset_the_retries(
    source: FileState, target: FileState
) -> None:
    record = JobRecord("x.jsonl", state=source, retries=3, last_error="boom")
    record.move_to(target)
    assert record.state is target
    assert (record.retries, record.last_error) == (0, None)  # a new step starts clean


@pytest.mark.parametrize(
    ("source", "target"),
    [p for p in pairs(FileState) if p not in FILE_ALLOWED and not (p[0] is p[1] in IN_FLIGHT)],
    ids=str,
)
def test_other_file_moves_raise(source: FileState, target: FileState) -> None:
    record = JobRecord("x.jsonl", state=source, retries=2)
    with pytest.raises(InvalidTransition, match=f"{source.value} -> {target.value}"):
        record.move_to(target)
    assert (record.state, record.retries) == (source, 2)


@pytest.mark.parametrize("state", IN_FLIGHT)
def test_an_in_flight_file_moving_to_its_own_state_is_a_no_op(state: FileState) -> None:
    """`summarize` re-derives the state after every job step: staying put keeps the retries."""
    record = JobRecord("x.jsonl", state=state, retries=2, last_error="slow")
    record.move_to(state)
    assert (record.state, record.retries, record.last_error) == (state, 2, "slow")


def test_in_flight_and_finished_flags() -> None:
    assert {s for s in FileState if s.in_flight} == set(IN_FLIGHT)
    assert {s for s in FileState if s.finished} == {F.DONE, F.FAILED}


# ---- each job's state machine ------------------------------------------------------------


def test_job_transition_table_is_the_documented_one() -> None:
    assert {(a, b) for a, targets in JOB_TRANSITIONS.items() for b in targets} == JOB_ALLOWED
    assert set(JOB_TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("source", "target"), sorted(JOB_ALLOWED, key=str), ids=str)
def test_allowed_job_moves_succeed_and_reset_the_retries(
    source: JobState, target: JobState
) -> None:
    job = JobEntry(1, state=source, retries=4, last_error="x")
    job.move_to(target)
    assert (job.state, job.retries, job.last_error) == (target, 0, None)


@pytest.mark.parametrize(
    ("source", "target"), [p for p in pairs(JobState) if p not in JOB_ALLOWED], ids=str
)
def test_other_job_moves_raise(source: JobState, target: JobState) -> None:
    job = JobEntry(3, state=source)
    with pytest.raises(InvalidTransition, match=f"job 3: {source.value} -> {target.value}"):
        job.move_to(target)
    assert job.state is source


def test_slots_are_held_while_a_job_is_made_or_runs() -> None:
    assert {s for s in JobState if s.holds_slot} == {J.UPLOADING, J.SUBMITTING, J.RUNNING}


def test_succeeded_needs_the_state_and_no_error() -> None:
    assert JobEntry(1, job_state="JOB_STATE_SUCCEEDED").succeeded
    assert not JobEntry(1, job_state="JOB_STATE_SUCCEEDED", error="gone").succeeded
    assert not JobEntry(1, job_state="JOB_STATE_FAILED").succeeded
    assert not JobEntry(1).succeeded


def test_leave_remote_forgets_every_remote_object() -> None:
    job = JobEntry(
        1,
        display_name="d",
        uploaded_file="files/u",
        upload_pending_since="t",
        create_pending_since="t",
        create_calls=2,
        job_name="batches/j",
        job_state="JOB_STATE_RUNNING",
        polls=5,
        next_poll_at="t",
        not_found_since="t",
        progress={"succeeded": 1},
        results_file="files/r",
        attempt=2,
        quota_waits=1,
    )
    job.leave_remote()
    assert job == JobEntry(1, attempt=2, quota_waits=1)


# ---- the sidecar ---------------------------------------------------------------------------


@freeze_time("2026-11-28 16:04:05")
def test_new_record_timestamps() -> None:
    record = JobRecord("x.jsonl")
    assert (record.created_at, record.updated_at) == ("2026-11-28T16:04:05Z",) * 2


def running_record() -> JobRecord:
    record = JobRecord("batch.jsonl", sha256="ab" * 32, requests=3, model="gemini-2.5-flash")
    record.move_to(F.QUEUED)
    job = JobEntry(1, requests=3, state=J.RUNNING, job_name="batches/123")
    job.job_state, job.polls, job.next_poll_at = "JOB_STATE_RUNNING", 4, "2026-11-28T16:10:00Z"
    job.progress = {"succeeded": 1, "failed": 0, "pending": 2}
    record.jobs.append(job)
    record.summarize()
    return record


def test_sidecar_round_trip_has_the_contract_fields_in_upper_case(tmp_path: Path) -> None:
    with freeze_time("2026-11-28 16:00:00"):
        record = running_record()
    record.error = {"stage": "job", "message": "m", "errors": [{"line": 1, "message": "x"}]}
    path = tmp_path / "batch.jsonl.job.json"
    with freeze_time("2026-11-28 16:05:30"):
        save(record, path)

    data = json.loads(path.read_text())
    assert set(data) >= CONTRACT_SIDECAR_FIELDS
    assert data["input"] == "batch.jsonl"
    assert (data["sha256"], data["requests"], data["model"]) == ("ab" * 32, 3, "gemini-2.5-flash")
    assert data["state"] == "RUNNING"
    assert [j["state"] for j in data["jobs"]] == ["RUNNING"]
    assert (data["job_name"], data["job_state"]) == ("batches/123", "JOB_STATE_RUNNING")
    assert (data["created_at"], data["updated_at"]) == (
        "2026-11-28T16:00:00Z",
        "2026-11-28T16:05:30Z",
    )
    assert (data["polls"], data["next_poll_at"]) == (4, "2026-11-28T16:10:00Z")
    assert data["error"]["stage"] == "job"

    loaded = load(path)
    assert loaded == record
    assert loaded.state is F.RUNNING and loaded.jobs[0].state is J.RUNNING


def test_save_is_atomic_and_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.job.json"
    record = JobRecord("x.jsonl")
    save(record, path)
    record.polls = 1
    save(record, path)
    assert load(path).polls == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl.job.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_lower_case_states_and_unknown_fields_still_load(tmp_path: Path) -> None:
    """A sidecar written by another version (older: lower case; newer: more fields) loads."""
    data = json.loads(running_record().to_json())
    data["state"] = "running"
    data["jobs"][0]["state"] = "running"
    data["added_later"] = 1
    data["jobs"][0]["added_later"] = {"x": 1}
    path = tmp_path / "x.jsonl.job.json"
    path.write_text(json.dumps(data))
    loaded = load(path)
    assert loaded.state is F.RUNNING and loaded.jobs[0].state is J.RUNNING
    assert loaded.jobs[0].job_name == "batches/123"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe garbage",
        b"[]",
        b'"a string"',
        b"null",
        b"{}",
        b'{"state": "CLAIMED", "jobs": []}',
        b'{"input": "x.jsonl", "state": "exploded", "jobs": []}',
        b'{"input": "x.jsonl", "state": "QUEUED", "jobs": [{"index": 1, "state": "LOST"}]}',
        b'{"input": "x.jsonl", "state": "QUEUED", "jobs": [{"state": "QUEUED"}]}',
        b'{"input": "x.jsonl", "state": "QUEUED", "jobs": [3]}',
    ],
)
def test_corrupt_sidecar_raises_sidecar_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "x.jsonl.job.json"
    path.write_bytes(raw)
    with pytest.raises(SidecarError, match="unreadable sidecar"):
        load(path)


# ---- sidecars of the previous version (one job, lower-case states) ----------------------------


def version_1(state: str, **fields: Any) -> bytes:
    record = {
        "input": "old.jsonl",
        "state": state,
        "sha256": "0" * 64,
        "requests": 2,
        "mode": "file",
        "model": "gemini-2.5-flash",
        "claim_id": "abcdef012345",
        "display_name": "gemini-batchd/old.jsonl/0000000000000000/abcdef012345",
        "uploaded_file": "files/up",
        "job_name": None,
        "job_state": None,
        "created_at": "2026-11-30T10:00:00Z",
        "updated_at": "2026-11-30T10:05:00Z",
        "polls": 3,
        "next_poll_at": "2026-11-30T10:10:00Z",
        "create_calls": 0,
        "expired_resubmits": 1,
        "error": None,
        "output": None,
        **fields,
    }
    return json.dumps(record).encode()


@pytest.mark.parametrize("state", ["claimed", "queued"])
def test_version_1_before_any_job_is_validated_again(state: str) -> None:
    record = JobRecord.from_json(version_1(state), Path("x"))
    assert record.state is F.CLAIMED and record.jobs == []
    assert record.claim_id == "abcdef012345"


@pytest.mark.parametrize(
    ("state", "file_state", "job_state"),
    [
        ("uploading", F.UPLOADING, J.UPLOADING),
        ("submitting", F.SUBMITTING, J.SUBMITTING),
        ("running", F.RUNNING, J.RUNNING),
        ("writing", F.RUNNING, J.ENDED),  # the answers are collected again, then written
    ],
)
def test_version_1_with_a_job_becomes_one_job(
    state: str, file_state: FileState, job_state: JobState
) -> None:
    raw = version_1(state, job_name="batches/old", job_state="JOB_STATE_RUNNING")
    record = JobRecord.from_json(raw, Path("x"))
    assert record.state is file_state and record.rounds == 1
    (job,) = record.jobs
    assert job.state is job_state
    assert (job.index, job.requests, job.mode) == (1, 2, "file")
    assert job.display_name == "gemini-batchd/old.jsonl/0000000000000000/abcdef012345"
    assert (job.uploaded_file, job.job_name, job.polls) == ("files/up", "batches/old", 3)
    assert job.expired_resubmits == 1
    assert job.create_pending_since is None


def test_version_1_create_in_doubt_is_looked_up() -> None:
    """An old sidecar that had sent a create: the job must be looked up, never made again."""
    record = JobRecord.from_json(version_1("submitting", create_calls=1), Path("x"))
    assert record.jobs[0].create_pending_since == "2026-11-30T10:05:00Z"


@pytest.mark.parametrize(("state", "expected"), [("done", F.DONE), ("failed", F.FAILED)])
def test_version_1_finished_files_only_need_archiving(state: str, expected: FileState) -> None:
    record = JobRecord.from_json(version_1(state), Path("x"))
    assert record.state is expected and record.jobs == []


def test_version_1_writing_an_error_report_stays_writing() -> None:
    raw = version_1("writing", error={"stage": "job", "message": "it failed"})
    record = JobRecord.from_json(raw, Path("x"))
    assert record.state is F.WRITING and record.jobs == []
    assert record.error == {"stage": "job", "message": "it failed"}


# ---- summarize: the file's state and the contract's fields from its jobs ------------------------


def in_flight(*states: JobState) -> JobRecord:
    record = JobRecord("x.jsonl", state=F.QUEUED)
    record.jobs = [JobEntry(i, part=i, requests=10, state=s) for i, s in enumerate(states, 1)]
    return record


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ((J.QUEUED, J.QUEUED), F.QUEUED),
        ((J.COLLECTED, J.QUEUED), F.QUEUED),
        ((J.UPLOADING, J.QUEUED), F.UPLOADING),
        ((J.UPLOADING, J.SUBMITTING), F.SUBMITTING),
        ((J.SUBMITTING, J.RUNNING), F.RUNNING),
        ((J.ENDED, J.QUEUED), F.RUNNING),
        ((J.COLLECTED, J.COLLECTED), F.QUEUED),
    ],
)
def test_summarize_derives_the_file_state(
    states: tuple[JobState, ...], expected: FileState
) -> None:
    record = in_flight(*states)
    record.summarize()
    assert record.state is expected


def test_summarize_leaves_a_writing_file_alone() -> None:
    record = in_flight(J.COLLECTED)
    record.state = F.WRITING
    record.summarize()
    assert record.state is F.WRITING


def test_summarize_fills_the_contract_fields() -> None:
    record = in_flight(J.COLLECTED, J.RUNNING, J.RUNNING, J.QUEUED)
    first, second, third, _ = record.jobs
    first.job_name, first.job_state, first.polls = "batches/1", "JOB_STATE_SUCCEEDED", 3
    second.job_name, second.job_state, second.polls = "batches/2", "JOB_STATE_RUNNING", 2
    second.next_poll_at, second.progress = "2026-12-01T10:05:00Z", {"succeeded": 4, "pending": 6}
    third.job_name, third.polls = "batches/3", 1
    third.next_poll_at = "2026-12-01T10:01:00Z"
    third.progress = {"succeeded": 1, "failed": 2, "pending": 7}
    third.round = 2
    record.summarize()
    assert (record.job_name, record.job_state) == ("batches/2", "JOB_STATE_RUNNING")
    assert record.polls == 6  # every job's polls
    assert record.next_poll_at == "2026-12-01T10:01:00Z"  # the earliest of the running jobs
    assert record.progress == {"succeeded": 5, "failed": 2, "pending": 13, "total": 20}
    assert record.round == 2


def test_summarize_names_the_last_job_once_every_job_is_collected() -> None:
    record = in_flight(J.COLLECTED, J.COLLECTED)
    record.jobs[1].job_name, record.jobs[1].job_state = "batches/2", "JOB_STATE_SUCCEEDED"
    record.progress = {"succeeded": 1}
    record.summarize()
    assert (record.job_name, record.job_state) == ("batches/2", "JOB_STATE_SUCCEEDED")
    assert record.progress is None and record.next_poll_at is None


# ---- display names --------------------------------------------------------------------------


def test_display_name_names_file_content_claim_round_part_and_attempt() -> None:
    record = JobRecord("report.jsonl", sha256="0123456789abcdef" + "f" * 48)
    job = JobEntry(3, round=2, part=4, attempt=5)
    assert record.display_name(job) == (
        f"gemini-batchd/report.jsonl/0123456789abcdef/{record.claim_id}/r2p4a5"
    )


def test_display_names_are_unique_per_claim_and_stable_across_a_reload() -> None:
    job = JobEntry(1)
    sha = "a" * 64
    assert len({JobRecord("same.jsonl", sha256=sha).display_name(job) for _ in range(200)}) == 200
    record = JobRecord("x.jsonl", sha256=sha)
    reloaded = JobRecord.from_json(record.to_json(), Path("x"))
    assert reloaded.display_name(job) == record.display_name(job)


def test_every_part_round_and_attempt_gets_its_own_name() -> None:
    record = JobRecord("x.jsonl", sha256="c" * 64)
    jobs = [JobEntry(1), JobEntry(2, part=2), JobEntry(3, round=2), JobEntry(1, attempt=2)]
    assert len({record.display_name(j) for j in jobs}) == len(jobs)


@pytest.mark.parametrize("length", [100, 128, 200, 255])
def test_long_file_names_are_cut_keeping_hash_claim_and_job(length: int) -> None:
    name = "n" * (length - len(".jsonl")) + ".jsonl"
    record = JobRecord(name, sha256="d" * 64)
    display = record.display_name(JobEntry(12, round=3, part=12, attempt=10))
    assert len(display) <= DISPLAY_NAME_MAX
    assert display.startswith("gemini-batchd/nnnn")
    assert display.endswith(f"/{'d' * 16}/{record.claim_id}/r3p12a10")


def test_display_name_before_hashing_fits() -> None:
    assert len(JobRecord("x.jsonl").display_name(JobEntry(1))) <= DISPLAY_NAME_MAX


# ---- time stamps ------------------------------------------------------------------------------


def test_isotime_helpers() -> None:
    moment = datetime(2026, 11, 28, 16, 4, 0, 999_999, tzinfo=timezone.utc)
    assert isotime(moment) == "2026-11-28T16:04:00Z"
    assert parse_isotime("2026-11-28T16:04:00Z") == moment.replace(microsecond=0)
    with freeze_time("2030-01-02 03:04:05"):
        assert isotime() == "2030-01-02T03:04:05Z"


def test_seconds_since() -> None:
    now = datetime(2026, 11, 28, 16, 4, 30, tzinfo=timezone.utc)
    assert seconds_since("2026-11-28T16:04:00Z", now) == 30.0
    assert seconds_since("2026-11-28T16:05:00Z", now) == -30.0  # in the future
    assert seconds_since(None, now) == 0.0
    assert seconds_since("yesterday", now) == 0.0
