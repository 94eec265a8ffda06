"""daemon.jobrecord: the FileState machine, sidecar round trips and display names."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from freezegun import freeze_time

from daemon.jobrecord import (
    DISPLAY_NAME_MAX,
    TRANSITIONS,
    FileState,
    InvalidTransition,
    JobRecord,
    SidecarError,
    isotime,
    load,
    parse_isotime,
    save,
    sidecar_path,
)
from tests.harness import CONTRACT_SIDECAR_FIELDS

ALLOWED = {
    (FileState.CLAIMED, FileState.QUEUED),
    (FileState.CLAIMED, FileState.WRITING),
    (FileState.QUEUED, FileState.UPLOADING),
    (FileState.QUEUED, FileState.SUBMITTING),
    (FileState.QUEUED, FileState.WRITING),
    (FileState.UPLOADING, FileState.SUBMITTING),
    (FileState.UPLOADING, FileState.QUEUED),
    (FileState.UPLOADING, FileState.WRITING),
    (FileState.SUBMITTING, FileState.RUNNING),
    (FileState.SUBMITTING, FileState.QUEUED),
    (FileState.SUBMITTING, FileState.WRITING),
    (FileState.RUNNING, FileState.WRITING),
    (FileState.RUNNING, FileState.QUEUED),
    (FileState.WRITING, FileState.DONE),
    (FileState.WRITING, FileState.FAILED),
}
ALL_PAIRS = [(a, b) for a in FileState for b in FileState]


def test_transition_table_is_the_documented_one() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED
    assert set(TRANSITIONS) == set(FileState)


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED, key=str))
def test_allowed_transitions_succeed(source: FileState, target: FileState) -> None:
    record = JobRecord("x.jsonl", state=source, retries=3)
    record.move_to(target)
    assert record.state is target
    assert record.retries == 0  # a new step starts with a clean retry count


@pytest.mark.parametrize(("source", "target"), [p for p in ALL_PAIRS if p not in ALLOWED], ids=str)
def test_other_transitions_raise(source: FileState, target: FileState) -> None:
    record = JobRecord("x.jsonl", state=source, retries=2)
    with pytest.raises(InvalidTransition, match=f"{source.value} -> {target.value}"):
        record.move_to(target)
    assert record.state is source
    assert record.retries == 2


def test_a_whole_inline_lifecycle() -> None:
    record = JobRecord("x.jsonl")
    assert record.state is FileState.CLAIMED
    for state in (
        FileState.QUEUED,
        FileState.SUBMITTING,
        FileState.RUNNING,
        FileState.WRITING,
        FileState.DONE,
    ):
        record.move_to(state)
    assert record.state.finished


def test_active_and_finished_flags() -> None:
    assert {s for s in FileState if s.active} == {
        FileState.UPLOADING,
        FileState.SUBMITTING,
        FileState.RUNNING,
    }
    assert {s for s in FileState if s.finished} == {FileState.DONE, FileState.FAILED}


# ---- sidecar ---------------------------------------------------------------------------------------


@freeze_time("2026-11-28 16:04:05")
def test_new_record_timestamps() -> None:
    record = JobRecord("x.jsonl")
    assert record.created_at == "2026-11-28T16:04:05Z"
    assert record.updated_at == "2026-11-28T16:04:05Z"


def test_sidecar_round_trip_has_the_contract_fields(tmp_path: Path) -> None:
    with freeze_time("2026-11-28 16:00:00"):
        record = JobRecord("batch.jsonl", sha256="ab" * 32, requests=3, model="gemini-2.5-flash")
    record.move_to(FileState.QUEUED)
    record.move_to(FileState.SUBMITTING)
    record.move_to(FileState.RUNNING)
    record.job_name = "batches/123"
    record.job_state = "JOB_STATE_RUNNING"
    record.polls = 4
    record.next_poll_at = "2026-11-28T16:10:00Z"
    record.progress = {"requestCount": 3}
    record.error = {"stage": "job", "message": "m", "errors": [{"line": 1, "message": "x"}]}
    path = sidecar_path(tmp_path / "batch.jsonl")
    assert path.name == "batch.jsonl.job.json"
    with freeze_time("2026-11-28 16:05:30"):
        save(record, path)

    data = json.loads(path.read_text())
    assert set(data) >= CONTRACT_SIDECAR_FIELDS
    assert data["input"] == "batch.jsonl"
    assert data["sha256"] == "ab" * 32
    assert data["requests"] == 3
    assert data["state"] == "running"
    assert data["job_name"] == "batches/123"
    assert data["job_state"] == "JOB_STATE_RUNNING"
    assert data["model"] == "gemini-2.5-flash"
    assert data["created_at"] == "2026-11-28T16:00:00Z"
    assert data["updated_at"] == "2026-11-28T16:05:30Z"
    assert data["polls"] == 4
    assert data["next_poll_at"] == "2026-11-28T16:10:00Z"
    assert data["error"]["stage"] == "job"

    loaded = load(path)
    assert loaded == record
    assert loaded.state is FileState.RUNNING


def test_save_is_atomic_and_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.job.json"
    record = JobRecord("x.jsonl")
    save(record, path)
    record.polls = 1
    save(record, path)
    assert load(path).polls == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl.job.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_unknown_sidecar_fields_are_ignored(tmp_path: Path) -> None:
    """A sidecar from a newer version still loads."""
    path = tmp_path / "x.jsonl.job.json"
    data = json.loads(JobRecord("x.jsonl").to_json())
    data["added_later"] = 1
    path.write_text(json.dumps(data))
    assert load(path).input == "x.jsonl"


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
        b'{"state": "claimed"}',
        b'{"input": "x.jsonl", "state": "exploded"}',
        b'{"input": "x.jsonl", "state": null}',
    ],
)
def test_corrupt_sidecar_raises_sidecar_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "x.jsonl.job.json"
    path.write_bytes(raw)
    with pytest.raises(SidecarError, match="unreadable sidecar"):
        load(path)


def test_isotime_helpers() -> None:
    moment = datetime(2026, 11, 28, 16, 4, 0, 999_999, tzinfo=timezone.utc)
    assert isotime(moment) == "2026-11-28T16:04:00Z"
    assert parse_isotime("2026-11-28T16:04:00Z") == moment.replace(microsecond=0)
    with freeze_time("2030-01-02 03:04:05"):
        assert isotime() == "2030-01-02T03:04:05Z"


# ---- display names ---------------------------------------------------------------------------------


def test_display_name_names_file_content_and_claim() -> None:
    record = JobRecord("report.jsonl", sha256="0123456789abcdef" + "f" * 48)
    name = record.make_display_name()
    assert name.startswith("gemini-batchd/")
    assert "report.jsonl" in name
    assert "0123456789abcdef" in name
    assert record.claim_id in name
    assert len(name) <= DISPLAY_NAME_MAX


def test_display_names_are_unique_per_claim() -> None:
    sha = "a" * 64
    names = {JobRecord("same.jsonl", sha256=sha).make_display_name() for _ in range(200)}
    assert len(names) == 200


def test_display_name_is_stable_for_one_claim() -> None:
    record = JobRecord("x.jsonl", sha256="b" * 64)
    assert record.make_display_name() == record.make_display_name()
    reloaded = JobRecord.from_json(record.to_json(), Path("x"))
    assert reloaded.make_display_name() == record.make_display_name()


def test_resubmits_get_a_new_display_name() -> None:
    record = JobRecord("x.jsonl", sha256="c" * 64)
    first = record.make_display_name()
    record.expired_resubmits = 1
    second = record.make_display_name()
    assert second != first
    assert second.endswith("/r1")


@pytest.mark.parametrize("length", [100, 128, 200, 255])
def test_long_file_names_are_truncated_keeping_hash_and_claim(length: int) -> None:
    name = "n" * (length - len(".jsonl")) + ".jsonl"
    record = JobRecord(name, sha256="d" * 64, expired_resubmits=10)
    display = record.make_display_name()
    assert len(display) <= DISPLAY_NAME_MAX
    assert "d" * 16 in display
    assert display.endswith(f"{record.claim_id}/r10")
    assert display.startswith("gemini-batchd/nnnn")


def test_display_name_before_hashing() -> None:
    record = JobRecord("x.jsonl")
    assert len(record.make_display_name()) <= DISPLAY_NAME_MAX
