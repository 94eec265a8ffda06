"""The batch-engine interface: what the daemon needs of a batch service, whatever the service.

Steps, publishing, `status` and the library call an `Engine` and read `RemoteJob`s; only the
modules of this package know a service's protocol. An engine's calls raise their client
library's errors unchanged (and `BadReply` for a reply it cannot use): `failures.classify`
decides what each means, in one place for every engine.

Answers come back in the daemon's own answers format whatever the engine: one JSON object per
line, `{"key", "response"}` or `{"key", "error"}` (the Gemini File API's responses format), so
that matching and merging (`answers.py`) know no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol


class RemoteState(str, Enum):
    """A remote job's state, named as both Google engines name it (`JOB_STATE_X`)."""

    UNSPECIFIED = "JOB_STATE_UNSPECIFIED"  # absent, or a state this version does not know
    QUEUED = "JOB_STATE_QUEUED"
    PENDING = "JOB_STATE_PENDING"
    RUNNING = "JOB_STATE_RUNNING"
    UPDATING = "JOB_STATE_UPDATING"
    PAUSED = "JOB_STATE_PAUSED"
    CANCELLING = "JOB_STATE_CANCELLING"
    SUCCEEDED = "JOB_STATE_SUCCEEDED"
    PARTIALLY_SUCCEEDED = "JOB_STATE_PARTIALLY_SUCCEEDED"  # some requests failed; answers exist
    FAILED = "JOB_STATE_FAILED"
    CANCELLED = "JOB_STATE_CANCELLED"
    EXPIRED = "JOB_STATE_EXPIRED"

    @property
    def ended(self) -> bool:
        """The job is over: nothing it does will change any more."""
        return self in _ENDED

    @property
    def answered(self) -> bool:
        """The job ended with answers to collect (every one, or some and errors for the rest)."""
        return self in (RemoteState.SUCCEEDED, RemoteState.PARTIALLY_SUCCEEDED)

    @classmethod
    def parse(cls, value: Any) -> tuple[RemoteState, str]:
        """`BATCH_STATE_X` (Gemini API), `JOB_STATE_X` (SDK, Vertex) or a bare `X`: the state,
        and its name as `JOB_STATE_X` (kept for display when the state is not one we know)."""
        if not isinstance(value, str) or not value.strip():
            return cls.UNSPECIFIED, cls.UNSPECIFIED.value
        name = value.strip().upper()
        for prefix in ("BATCH_STATE_", "JOB_STATE_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        text = f"JOB_STATE_{name}" if name else cls.UNSPECIFIED.value
        try:
            return cls(text), text
        except ValueError:
            return cls.UNSPECIFIED, text


_ENDED = frozenset(
    {
        RemoteState.SUCCEEDED,
        RemoteState.PARTIALLY_SUCCEEDED,
        RemoteState.FAILED,
        RemoteState.CANCELLED,
        RemoteState.EXPIRED,
    }
)


@dataclass(frozen=True, slots=True)
class Progress:
    """Request counts of a job as the engine reports them (absent counts are 0)."""

    total: int
    succeeded: int
    failed: int
    pending: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def as_dict(self) -> dict[str, int]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
            "total": self.total,
        }


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """What the daemon needs of one batch job, as an engine read it."""

    name: str
    state: RemoteState
    state_name: str  # `state` as the engine named it (an unknown state keeps its name here)
    display_name: str | None = None
    create_time: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    progress: Progress | None = None
    results: str | None = None  # where the answers are: a file or folder of the engine's
    inline_responses: list[dict[str, Any]] | None = None  # answers in the reply itself

    @property
    def done(self) -> bool:
        return self.state.ended


RequestCheck = Callable[[Mapping[str, Any]], "str | None"]
"""Why a service would refuse a request (validation then refuses that line), or None."""


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What a service takes in one job."""

    inline: bool  # requests in the create call (else every job's requests are uploaded first)
    max_job_bytes: int
    max_job_requests: int | None = None
    check: RequestCheck | None = None  # a rule of the service's own for each request


class Engine(Protocol):
    """A batch service: jobs made from request files, and their answers.

    A request file holds `{"key", "request"}` lines (a `GenerateContentRequest` each); an
    engine turns it into what its service takes, at upload or create. Names an engine returns
    (`RemoteJob.name`, an upload's name) have been checked against the service's documented
    shapes: a malformed one is a `BadReply`, never a name to call.
    """

    kind: ClassVar[str]  # what `backend:` calls it
    limits: ClassVar[EngineLimits]
    endpoint: str  # where its jobs live; a file's jobs at another endpoint are not ours to poll
    account: str  # a fingerprint of the credential the jobs belong to (never the credential)

    @staticmethod
    def is_job_name(name: str) -> bool:
        """Whether `name` has the documented shape of this service's job names."""
        ...

    def create_job(
        self, model: str, display_name: str, source: Path | str, *, inline: bool
    ) -> RemoteJob:
        """Create one job, sent once (never retried: a lost reply is looked up, not repeated).
        `source` is the request file (inline) or what `upload` returned."""
        ...

    def find_job(self, display_name: str, *, prefix: bool = False) -> RemoteJob | None:
        """The job with this display name (`prefix`: the newest whose display name starts
        so); None only when a complete listing has none (a listing that fails or cannot be
        read raises: it proves nothing)."""
        ...

    def get_job(self, name: str) -> RemoteJob: ...

    def cancel_job(self, name: str) -> None: ...

    def upload(self, path: Path, display_name: str) -> str:
        """Upload a request file for a job; returns its name at the service."""
        ...

    def find_uploads(self, display_name: str) -> list[str]:
        """Uploads of this display name that a lost reply may have left behind."""
        ...

    def download(self, results: str, destination: Path, expected_bytes: int = 0) -> None:
        """Write a job's answers (`RemoteJob.results`) to `destination` as answers lines;
        `expected_bytes` stretches the deadline."""
        ...

    def delete(self, name: str) -> None:
        """Delete an upload or a job's results at the service."""
        ...

    def probe(self) -> None:
        """One cheap authenticated call: does the service accept our credential?"""
        ...

    def check_access(self) -> None:
        """The start-up check: everything the daemon needs of the service is permitted
        (`probe`, and whatever else the engine needs besides, e.g. its staging bucket)."""
        ...

    def close(self) -> None: ...
