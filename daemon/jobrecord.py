"""The sidecar: a file's lifecycle state and its batch jobs, saved atomically beside the input.

The sidecar is the daemon's only memory. Every step first records what it is about to do, so
that a restart after `kill -9` at any point can finish the step without repeating an effect
that must not happen twice (creating a job, publishing results). Two checked state machines
live here: the file's (`FileState`) and, inside it, each remote job's (`JobState`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from . import atomic
from .api.engine import RemoteState
from .errors import InvalidTransition, SidecarError

ANSWERED_STATES = frozenset(state.value for state in RemoteState if state.answered)
"""Remote job states whose answers are collected, as the sidecar writes them."""

DISPLAY_NAME_MAX = 128
"""Longest display name we send; the API's own limit is not documented, so stay short."""

ATTEMPT_DIGITS = 4
"""Room kept for a job's attempt number at the end of its display name."""


class FileState(str, Enum):
    """Where an input file is in its lifecycle; the sidecar's `state` field."""

    CLAIMED = "CLAIMED"  # moved into processing/, not yet read
    QUEUED = "QUEUED"  # valid; its jobs wait for a free job slot
    UPLOADING = "UPLOADING"  # a job's input is being uploaded (File API)
    SUBMITTING = "SUBMITTING"  # a job is being created (or looked up after a lost reply)
    RUNNING = "RUNNING"  # jobs exist; polled with backoff
    WRITING = "WRITING"  # every job ended; results or an error report go to the outbox
    DONE = "DONE"  # results written; input archived to done/
    FAILED = "FAILED"  # error report written; input archived to failed/

    @property
    def in_flight(self) -> bool:
        """Validated and not yet writing: its jobs are queued, being made or running."""
        return self in _IN_FLIGHT

    @property
    def finished(self) -> bool:
        return self in (FileState.DONE, FileState.FAILED)


_IN_FLIGHT = frozenset(
    {FileState.QUEUED, FileState.UPLOADING, FileState.SUBMITTING, FileState.RUNNING}
)

FILE_TRANSITIONS: dict[FileState, frozenset[FileState]] = {
    FileState.CLAIMED: frozenset({FileState.QUEUED, FileState.WRITING}),
    **{s: (_IN_FLIGHT - {s}) | {FileState.WRITING} for s in _IN_FLIGHT},
    FileState.WRITING: frozenset({FileState.DONE, FileState.FAILED}),
    FileState.DONE: frozenset(),
    FileState.FAILED: frozenset(),
}
"""The file's moves. While in flight its state summarises its jobs (see `JobRecord.summarize`)."""


class JobState(str, Enum):
    """Where one remote job of a file is."""

    QUEUED = "QUEUED"  # waiting for a job slot (or for `not_before`)
    UPLOADING = "UPLOADING"  # File API: uploading its request file
    SUBMITTING = "SUBMITTING"  # a create call may be under way for `display_name`
    RUNNING = "RUNNING"  # the job exists; polled
    ENDED = "ENDED"  # the job is over (or was never made); its answers not yet collected
    COLLECTED = "COLLECTED"  # answers saved locally (`jN.out`), remote files deleted

    @property
    def holds_slot(self) -> bool:
        """Whether a job in this state counts against `limits.max_active_jobs`."""
        return self in (JobState.UPLOADING, JobState.SUBMITTING, JobState.RUNNING)


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.UPLOADING, JobState.SUBMITTING, JobState.ENDED}),
    JobState.UPLOADING: frozenset({JobState.SUBMITTING, JobState.QUEUED, JobState.ENDED}),
    JobState.SUBMITTING: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.ENDED}),
    JobState.RUNNING: frozenset({JobState.ENDED, JobState.QUEUED}),
    JobState.ENDED: frozenset({JobState.COLLECTED}),
    JobState.COLLECTED: frozenset(),
}
"""A job's moves. Back to QUEUED: refused for the token quota, or EXPIRED and resubmitted."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isotime(moment: datetime | None = None) -> str:
    return (moment or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_isotime(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def seconds_since(stamp: str | None, now: datetime) -> float:
    """Seconds from `stamp` to `now` (0 for no or a bad stamp)."""
    if not stamp:
        return 0.0
    try:
        return (now - parse_isotime(stamp)).total_seconds()
    except ValueError:
        return 0.0


@dataclass
class JobEntry:
    """One remote batch job of a file: part `part` of round `round` (round 1 is the input
    itself; later rounds are follow-up jobs for requests that failed retryably)."""

    index: int  # N in the work files `jN.req`, `jN.out`
    round: int = 1
    part: int = 1
    requests: int = 0
    bytes: int = 0
    tokens: int = 0  # estimated input tokens (characters / 4)
    mode: str = "inline"  # "inline" or "file" (File API)
    state: JobState = JobState.QUEUED
    attempt: int = 1  # resubmits after expiry or the token quota make a new attempt
    display_name: str | None = None
    uploaded_file: str | None = None
    upload_pending_since: str | None = None  # an upload may have happened: find and delete it
    create_pending_since: str | None = None  # a create may have happened: look it up first
    lookups: int = 0  # complete listings that did not show the job, since the create in doubt
    lookup_seconds: float = 0.0  # ... and for how long (elapsed time, never a clock difference)
    create_calls: int = 0
    job_name: str | None = None
    job_state: str | None = None
    polls: int = 0
    next_poll_at: str | None = None
    progress: dict[str, int] | None = None
    not_found_since: str | None = None  # first of a run of 404s for the job (shown)
    not_found_seconds: float = 0.0  # how long that run has lasted (elapsed time)
    results_file: str | None = None  # the API's responses file (File API), until deleted
    ended_at: str | None = None
    collect_failing_seconds: float = 0.0  # how long fetching its answers has failed
    unreadable_results: int = 0  # downloads in a row whose results could not be read whole
    final_answers: int | None = None  # answers another try would not change (counted once)
    error: str | None = None  # why the job ended without answers (FAILED, EXPIRED, refused...)
    stage: str | None = None  # the error report's stage for `error`: submission, job, results
    not_before: str | None = None  # not started again before (quota, round backoff): shown
    defer_seconds: float = 0.0  # ... the length of that wait, which a restart keeps to
    quota_waits: int = 0
    quota_wait_seconds: float = 0.0  # how long it has waited for the token quota (elapsed)
    expired_resubmits: int = 0
    retries: int = 0  # consecutive failed attempts at this job's current step
    last_error: str | None = None

    def move_to(self, state: JobState) -> None:
        if state not in JOB_TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.index}: {self.state.value} -> {state.value}")
        self.state = state
        self.retries = 0
        self.last_error = None

    @property
    def succeeded(self) -> bool:
        """The job ended with answers (all of them, or some and errors for the rest)."""
        return self.job_state in ANSWERED_STATES and self.error is None

    def leave_remote(self) -> None:
        """Forget this job's remote objects (after deleting them, or before a resubmit)."""
        self.display_name = self.job_name = self.job_state = None
        self.uploaded_file = self.results_file = self.create_pending_since = None
        self.upload_pending_since = None
        self.create_calls = self.polls = self.lookups = 0
        self.lookup_seconds = self.not_found_seconds = self.collect_failing_seconds = 0.0
        self.next_poll_at = self.not_found_since = self.progress = None
        self.final_answers = None


@dataclass
class JobRecord:
    """Everything the daemon knows about one input file; saved as JSON at every change."""

    input: str
    state: FileState = FileState.CLAIMED
    claim_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    arrival: int = 0  # wall-clock ns when the file was first seen: queue order
    sha256: str | None = None
    size_bytes: int | None = None
    inode: list[int] | None = None  # (st_dev, st_ino) of the claimed input
    requests: int | None = None
    invalid_lines: int = 0  # lines skipped under on_invalid_line: skip_line
    index_bytes: int | None = None  # size of the work file `index`: whole after a power failure?
    model: str | None = None
    filter_json: bool | None = None  # the configuration's default when the file was claimed
    include_response: bool | None = None  # likewise: results are written as claimed
    endpoint: str | None = None  # the API endpoint (base URL and version) its jobs belong to
    key_id: str | None = None  # a fingerprint of the API key its jobs belong to (never the key)
    in_doubt: bool = False  # its sidecar was lost: any job of this claim may exist already
    rounds: int = 1  # 1 + retry_requests when validated
    jobs: list[JobEntry] = field(default_factory=list)
    created_at: str = field(default_factory=isotime)
    updated_at: str = field(default_factory=isotime)
    finished_at: str | None = None
    # A summary of the jobs, for status and the contract's fields:
    job_name: str | None = None
    job_state: str | None = None
    polls: int = 0
    next_poll_at: str | None = None
    progress: dict[str, int] | None = None
    round: int = 1
    retries: int = 0  # consecutive failed attempts at the file's current step
    last_error: str | None = None
    error: dict[str, Any] | None = None  # the error report's stage, message, errors
    output: str | None = None  # outbox path chosen for the results
    report: str | None = None  # outbox path chosen for the error report
    archived_as: str | None = None  # done/ or failed/ path chosen for the input
    ok: int | None = None  # records written: ok, and errors
    errors: int | None = None
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def move_to(self, state: FileState) -> None:
        if state is self.state and state.in_flight:
            return
        if state not in FILE_TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.input}: {self.state.value} -> {state.value}")
        self.state = state
        self.retries = 0
        self.last_error = None

    def display_name(self, job: JobEntry) -> str:
        """Names the file, its content, this claim and the job, so it can be found after a crash."""
        return self.job_prefix(job) + str(job.attempt)

    def job_prefix(self, job: JobEntry) -> str:
        """How the display name of every attempt of `job` starts (`.../r1p2a`)."""
        suffix = f"/{(self.sha256 or '')[:16]}/{self.claim_id}/r{job.round}p{job.part}a"
        room = DISPLAY_NAME_MAX - len(suffix) - len("gemini-batchd/") - ATTEMPT_DIGITS
        return "gemini-batchd/" + self.input[:room] + suffix

    def summarize(self) -> None:
        """Derive the file's in-flight state and its summary fields from its jobs."""
        live = [j for j in self.jobs if j.state is not JobState.COLLECTED] or self.jobs[-1:]
        if self.state.in_flight and self.jobs:
            states = {j.state for j in self.jobs}
            if JobState.RUNNING in states or JobState.ENDED in states:
                self.move_to(FileState.RUNNING)
            elif JobState.SUBMITTING in states:
                self.move_to(FileState.SUBMITTING)
            elif JobState.UPLOADING in states:
                self.move_to(FileState.UPLOADING)
            elif states <= {JobState.QUEUED, JobState.COLLECTED}:
                self.move_to(FileState.QUEUED)
        named = [j for j in live if j.job_name] or [j for j in self.jobs if j.job_name]
        self.job_name = named[0].job_name if named else None
        self.job_state = named[0].job_state if named else None
        self.polls = sum(j.polls for j in self.jobs)
        due = sorted(j.next_poll_at for j in live if j.next_poll_at and j.state is JobState.RUNNING)
        self.next_poll_at = due[0] if due else None
        self.round = max((j.round for j in self.jobs), default=1)
        stats = [j.progress for j in live if j.progress]
        if stats:
            self.progress = {
                k: sum(s.get(k, 0) for s in stats) for k in ("succeeded", "failed", "pending")
            }
            self.progress["total"] = sum(j.requests for j in live if j.progress)
        elif not any(j.state is JobState.RUNNING for j in self.jobs):
            self.progress = None

    def to_json(self) -> bytes:
        return orjson.dumps(self, option=orjson.OPT_INDENT_2) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, source: Path) -> JobRecord:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if "jobs" not in data:
                data = _from_version_1(data)
            known = {f.name for f in fields(cls)}
            jobs = data.get("jobs") or []
            record = cls(**{k: v for k, v in data.items() if k in known and k != "jobs"})
            record.state = FileState(str(record.state).upper())
            job_fields = {f.name for f in fields(JobEntry)}
            for job in jobs:
                entry = JobEntry(**{k: v for k, v in dict(job).items() if k in job_fields})
                entry.state = JobState(str(entry.state).upper())
                record.jobs.append(entry)
        except (ValueError, TypeError, KeyError) as exc:
            raise SidecarError(f"{source}: unreadable sidecar: {exc}") from exc
        return record


_V1_JOB_STATES = {
    "uploading": JobState.UPLOADING,
    "submitting": JobState.SUBMITTING,
    "running": JobState.RUNNING,
    "writing": JobState.ENDED,
}


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A sidecar written before files had several jobs: its one job becomes `jobs[0]`.

    Its work files do not exist yet; the first step rebuilds them from the claimed input.
    """
    state = str(data.get("state", "claimed")).lower()
    data = dict(data)
    if state in ("claimed", "queued"):
        data["state"] = FileState.CLAIMED.value  # validated again: nothing remote exists yet
        return data
    job_state = _V1_JOB_STATES.get(state)
    if job_state is not None and not (state == "writing" and data.get("error")):
        job = {
            "index": 1,
            "requests": data.get("requests") or 0,
            "mode": data.get("mode") or "inline",
            "state": job_state.value,
            "display_name": data.get("display_name"),
            "uploaded_file": data.get("uploaded_file"),
            "job_name": data.get("job_name"),
            "job_state": data.get("job_state"),
            "polls": data.get("polls") or 0,
            "next_poll_at": data.get("next_poll_at"),
            "expired_resubmits": data.get("expired_resubmits") or 0,
        }
        if state == "submitting" and data.get("create_calls"):
            job["create_pending_since"] = data.get("updated_at") or isotime()
        data["jobs"] = [job]
        data["state"] = FileState.RUNNING.value if state == "writing" else state.upper()
        data["rounds"] = 1
    else:
        data["state"] = state.upper()
    return data


def save(record: JobRecord, path: Path, *, durable: bool = True) -> None:
    """Atomically rewrite the sidecar at `path`; `durable`: also through a power failure (made
    durable with whatever other sidecars are being saved durably at the same moment)."""
    record.updated_at = isotime()
    if durable:
        atomic.GROUP.write(path, record.to_json())
    else:
        atomic.write_bytes(path, record.to_json(), durable=False)


def load(path: Path) -> JobRecord:
    return JobRecord.from_json(path.read_bytes(), path)
