"""The sidecar: a file's lifecycle state and its batch job, saved atomically beside the input.

The sidecar is the daemon's only memory. Every step first records what it is about to do,
so that a restart after `kill -9` at any point can finish the step without repeating an
effect that must not happen twice (creating a job, publishing results).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from . import atomic

SIDECAR_SUFFIX = ".job.json"
"""`inbox/processing/NAME.jsonl.job.json` belongs to `inbox/processing/NAME.jsonl`."""

DISPLAY_NAME_MAX = 128
"""Longest display name we send; the API's own limit is not documented, so stay short."""


class FileState(str, Enum):
    """Where an input file is in its lifecycle; what the sidecar's `state` field records."""

    CLAIMED = "claimed"  # moved into processing/, not yet read
    QUEUED = "queued"  # valid; waiting for a free job slot (limits.max_active_jobs)
    UPLOADING = "uploading"  # File API path: converting and uploading the input
    SUBMITTING = "submitting"  # a create call may be under way for `display_name`
    RUNNING = "running"  # the job exists; polled with backoff
    WRITING = "writing"  # finished; results or an error report go to `output`
    DONE = "done"  # results written; input archived to done/
    FAILED = "failed"  # error report written; input archived to failed/

    @property
    def active(self) -> bool:
        """Whether a remote job may exist for the file in this state (it holds a job slot)."""
        return self in (FileState.UPLOADING, FileState.SUBMITTING, FileState.RUNNING)

    @property
    def finished(self) -> bool:
        return self in (FileState.DONE, FileState.FAILED)


TRANSITIONS: dict[FileState, frozenset[FileState]] = {
    FileState.CLAIMED: frozenset({FileState.QUEUED, FileState.WRITING}),
    FileState.QUEUED: frozenset({FileState.UPLOADING, FileState.SUBMITTING, FileState.WRITING}),
    FileState.UPLOADING: frozenset({FileState.SUBMITTING, FileState.QUEUED, FileState.WRITING}),
    FileState.SUBMITTING: frozenset({FileState.RUNNING, FileState.QUEUED, FileState.WRITING}),
    FileState.RUNNING: frozenset({FileState.WRITING, FileState.QUEUED}),
    FileState.WRITING: frozenset({FileState.DONE, FileState.FAILED}),
    FileState.DONE: frozenset(),
    FileState.FAILED: frozenset(),
}
"""The state machine: every allowed move. RUNNING -> QUEUED resubmits an expired job."""


class InvalidTransition(Exception):
    """A bug: code tried a move the state machine does not allow."""


class SidecarError(Exception):
    """A sidecar exists but cannot be read; its file is failed rather than risk a second job."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isotime(moment: datetime | None = None) -> str:
    return (moment or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_isotime(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


@dataclass
class JobRecord:
    """Everything the daemon knows about one input file; saved as JSON at every change."""

    input: str
    state: FileState = FileState.CLAIMED
    sha256: str | None = None
    size_bytes: int | None = None
    requests: int | None = None
    mode: str | None = None  # "inline" or "file" (File API)
    model: str | None = None
    filter_json: bool | None = None  # the configuration's default when the file was claimed
    include_response: bool | None = None  # likewise: results are written as claimed
    claim_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    display_name: str | None = None
    uploaded_file: str | None = None
    job_name: str | None = None
    job_state: str | None = None
    progress: dict[str, int] | None = None
    created_at: str = field(default_factory=isotime)
    updated_at: str = field(default_factory=isotime)
    submitted_at: str | None = None
    finished_at: str | None = None
    polls: int = 0
    next_poll_at: str | None = None
    retries: int = 0  # consecutive failed attempts at the current step (API, disk, bugs)
    create_calls: int = (
        0  # create requests sent for `display_name`; > 0 means look the job up first
    )
    expired_resubmits: int = 0
    error: dict[str, Any] | None = None  # the error report's stage, message, errors
    output: str | None = None  # outbox path chosen for the results or report
    archived_as: str | None = None  # done/ or failed/ path chosen for the input

    def move_to(self, state: FileState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.input}: {self.state.value} -> {state.value}")
        self.state = state
        self.retries = 0

    def make_display_name(self) -> str:
        """Names the file, its content and this claim, so the job can be found again after a crash."""
        resubmit = f"/r{self.expired_resubmits}" if self.expired_resubmits else ""
        suffix = f"/{(self.sha256 or '')[:16]}/{self.claim_id}{resubmit}"
        return "gemini-batchd/" + self.input[: DISPLAY_NAME_MAX - len(suffix) - 14] + suffix

    def to_json(self) -> bytes:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, source: Path) -> JobRecord:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            known = {f.name for f in fields(cls)}
            record = cls(**{k: v for k, v in data.items() if k in known})
            record.state = FileState(record.state)
        except (ValueError, TypeError) as exc:
            raise SidecarError(f"{source}: unreadable sidecar: {exc}") from exc
        return record


def sidecar_path(input_path: Path) -> Path:
    return input_path.with_name(input_path.name + SIDECAR_SUFFIX)


def save(record: JobRecord, path: Path) -> None:
    """Atomically rewrite the sidecar at `path`."""
    record.updated_at = isotime()
    atomic.write_bytes(path, record.to_json())


def load(path: Path) -> JobRecord:
    return JobRecord.from_json(path.read_bytes(), path)
