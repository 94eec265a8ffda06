"""The failure model: every exception is classified once, and one policy says what to do.

The rule: a file gets an error report only when the API has said no (a job FAILED, EXPIRED
or CANCELLED; a create or upload refused as invalid) or its input is invalid. Anything time
or an operator can fix -- the network, timeouts, 408/429/5xx, replies that cannot be parsed,
a rejected key, quota and billing -- keeps the file where it is, retried with backoff.

Two questions are answered here, and nowhere else: what a failed call means (`classify`, then
`RetryPolicy.decide` for the step that made it), and what a job's final state means for its
file (`job_outcome`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pydantic
from google.auth import exceptions as auth_exceptions
from google.genai import errors

from . import logs
from .api.engine import RemoteJob, RemoteState
from .errors import BadReply
from .schedule import Backoff

log = logs.get()

API_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
"""ErrorInfo reasons of a 400 that mean the key, not the request, is wrong."""

RPC_STATUSES = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
"""google.rpc status names: an error body carrying one is the API's own verdict."""

OPERATOR_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION"})
"""A key without permission, an API not enabled, billing or location: an operator can fix it."""

MAX_BUG_RETRIES = 5
"""A step that fails this often with an unexpected error gives up (where nothing remote is at stake)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP libraries the engines use: whichever the SDK uses
    (httpx2 in 3.x, httpx before), and requests (Cloud Storage, token refreshes)."""
    found: list[type[BaseException]] = [
        ConnectionError,
        TimeoutError,
        auth_exceptions.TransportError,
    ]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


class Kind(Enum):
    """What kind of trouble a failure is; `RetryPolicy.decide` says what it means for a step."""

    TRANSIENT = "transient"  # network, timeouts, 408/429/5xx, unparseable replies
    AUTH = "auth"  # the key or its permission is rejected: pause new work
    QUOTA = "quota"  # the enqueued-token quota: the job goes back to the queue
    REFUSED = "refused"  # the API said no to this request (400, unknown model)
    NOT_FOUND = "not_found"  # 404: for a job, gone only after a grace period
    LOCAL = "local"  # our own files: disk full, permissions, a folder removed
    BUG = "bug"  # anything else: retried, a few times at most where nothing remote is at stake


@dataclass(frozen=True)
class Failure:
    kind: Kind
    message: str  # one line, secrets redacted
    code: int | None = None
    status: str | None = None
    reason: str | None = None
    cause: str | None = None  # what many files' failures share (a folder's problem)

    @property
    def server_refused(self) -> bool:
        """The API answered with its own 4xx error (a Google status): it did not act on the
        request. A proxy's 4xx page proves nothing of what lies behind it."""
        return (
            self.code is not None
            and 400 <= self.code < 500
            and self.code != 408
            and self.status in RPC_STATUSES
        )


def classify(exc: BaseException, action: str) -> Failure:
    """Turn any exception raised while doing `action` into a `Failure`.

    Its `cause` is what many files' failures share (a status, a folder's trouble, a kind of
    bad reply): the log says each cause at most once a minute, however many files meet it."""
    if isinstance(exc, errors.APIError):
        return _api_failure(exc, action)
    module = type(exc).__module__
    if module.startswith("google.api_core"):  # Cloud Storage (imported only when met)
        from google.api_core import exceptions as api_core

        if isinstance(exc, api_core.GoogleAPICallError):
            return _storage_failure(exc, action)
    if isinstance(exc, auth_exceptions.RefreshError | auth_exceptions.DefaultCredentialsError):
        text = _line(f"{action}: the credential was refused: {exc}")
        return Failure(Kind.AUTH, text, cause="the credential was refused")
    if type(exc).__name__ == "DataCorruption" and module.startswith("google."):
        text = _line(f"{action}: the checksums do not agree: {exc}")
        return Failure(Kind.TRANSIENT, text, cause="a checksum mismatch")
    if isinstance(exc, BadReply | json.JSONDecodeError | pydantic.ValidationError):
        text = _line(f"{action}: unusable reply: {exc}")
        return Failure(Kind.TRANSIENT, text, cause="an unusable reply")
    if isinstance(exc, TRANSPORT_ERRORS) or module.startswith("requests."):
        text = _line(f"{action}: {type(exc).__name__}: {exc}")
        return Failure(Kind.TRANSIENT, text, cause=f"a transport error: {type(exc).__name__}")
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        cause = str(exc.strerror or exc)
        if exc.filename:
            cause += f" in {os.path.dirname(exc.filename)}"
        return Failure(Kind.LOCAL, _line(f"{action}: {exc.strerror or exc}{where}"), cause=cause)
    text = _line(f"{action}: {type(exc).__name__}: {exc}")
    return Failure(Kind.BUG, text, cause=f"a bug: {type(exc).__name__}")


def _storage_failure(exc: Any, action: str) -> Failure:
    """Cloud Storage (and other google-api-core) errors: a missing bucket or a denied
    permission is the operator's to fix (a pause); a missing object is not found."""
    code = exc.code if isinstance(exc.code, int) else None
    message = str(exc.message or "")
    text = _line(f"{action}: {code} {message}")
    failure = functools.partial(Failure, code=code, cause=f"Cloud Storage {code}")
    if code is None or code >= 500 or code in (408, 429):
        return failure(Kind.TRANSIENT, text)
    if code in (401, 403) or "bucket does not exist" in message.lower():
        return failure(Kind.AUTH, text)
    if code == 404:
        return failure(Kind.NOT_FOUND, text)
    return failure(Kind.REFUSED, text)


def _api_failure(exc: errors.APIError, action: str) -> Failure:
    code = exc.code if isinstance(exc.code, int) else None
    status = exc.status if isinstance(exc.status, str) else None
    message = exc.message if isinstance(exc.message, str) else ""
    reason = _reason(exc.details)
    text = _line(f"{action}: {code} {status or ''} {message}".replace("  ", " "))
    google = status in RPC_STATUSES
    cause = f"{code} {status or ''}".strip()  # many files meet the same status at once
    failure = functools.partial(Failure, code=code, status=status, reason=reason, cause=cause)
    if code == 429 and is_token_quota(message):
        return failure(Kind.QUOTA, text)
    if code is None or code >= 500 or code in (408, 429):
        return failure(Kind.TRANSIENT, text)
    if code == 403 and _unknown_file(message):
        return failure(Kind.NOT_FOUND, text)
    if code in (401, 403) or reason in API_KEY_REASONS or status in OPERATOR_STATUSES:
        return failure(Kind.AUTH, text)
    if code == 400 and "api key" in message.lower():
        return failure(Kind.AUTH, text)
    if not google:  # a 4xx page from a proxy or gateway, not the API's verdict
        return failure(Kind.TRANSIENT, text)
    if code == 404:
        return failure(Kind.NOT_FOUND, text)
    if 400 <= code < 500:
        return failure(Kind.REFUSED, text)
    return failure(Kind.TRANSIENT, text)


def _unknown_file(message: str) -> bool:
    """What the Gemini API answers for an upload or results file it does not know (a 403:
    "You do not have permission to access the File x or it may not exist."). Vertex's "(or it
    may not exist)" after a denied permission is a permission to grant, not a missing file."""
    text = message.lower()
    return "access the file" in text and "may not exist" in text


def is_token_quota(message: str | None) -> bool:
    """Whether an error names the enqueued-token quota ("Enqueued token quota exceeded ...")."""
    text = (message or "").lower()
    return "enqueued" in text and "token" in text


RESOURCE_EXHAUSTED = 8
"""google.rpc.Code of a quota failure, as an operation's `error.code` carries it."""


class Outcome(Enum):
    """What a job's state means for its file (see `job_outcome`)."""

    RUNNING = "running"  # not over (queued, running, paused, cancelling, unknown): poll again
    ANSWERED = "answered"  # answers to collect (all of them, or some and errors for the rest)
    QUOTA = "quota"  # failed for the enqueued-token quota: created again later, with backoff
    EXPIRED = "expired"  # not done in time: created again while `expired_resubmits` allows
    FAILED = "failed"  # the engine said no (FAILED, CANCELLED): the file's error report


def job_outcome(job: RemoteJob) -> Outcome:
    """The one place that decides how a job's state ends (or does not end) its part of a file."""
    state = job.state
    if not state.ended:
        return Outcome.RUNNING
    if state.answered:
        return Outcome.ANSWERED
    if state is RemoteState.FAILED and (
        is_token_quota(job.error_message) or job.error_code == RESOURCE_EXHAUSTED
    ):
        return Outcome.QUOTA
    if state is RemoteState.EXPIRED:
        return Outcome.EXPIRED
    return Outcome.FAILED


def _reason(details: object) -> str | None:
    """The ErrorInfo reason of a Google error body, e.g. API_KEY_INVALID."""
    if not isinstance(details, dict):
        return None
    body = details.get("error", details)
    items = body.get("details") if isinstance(body, dict) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("reason"), str):
            return str(item["reason"])
    return None


def _line(text: str) -> str:
    return logs.redact(" ".join(str(text).split()))[:2000]


class Call(Enum):
    """Which kind of work failed: the same failure means different things for each."""

    LOCAL = "local"  # validation, writing, archiving
    UPLOAD = "upload"
    CREATE = "create"
    LOOKUP = "lookup"  # batches.list after a create whose outcome is unknown
    POLL = "poll"
    COLLECT = "collect"  # downloading answers, deleting remote files
    PROBE = "probe"


class Action(Enum):
    RETRY = "retry"  # the same step again after `delay`
    PAUSE = "pause"  # an operator problem: no new work until a call succeeds; retry slowly
    REQUEUE = "requeue"  # the token quota: back to the queue until jobs in flight end
    GIVE_UP = "give_up"  # the API said no (or a bug persists with nothing remote at stake)
    MAYBE_GONE = "maybe_gone"  # 404 for an existing job: gone only after a grace period


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    delay: float
    failure: Failure


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for failed calls, separate from the poll schedule; what each failure means."""

    backoff: Backoff
    pause_seconds: float = 60.0  # how often a paused daemon probes the API (api.probe_seconds)

    def decide(self, failure: Failure, call: Call, attempt: int) -> RetryDecision:
        """`attempt`: failed attempts at this step so far, this one included (1-based)."""
        delay = self.backoff.delay(attempt - 1)
        kind = failure.kind
        if kind is Kind.AUTH:
            return RetryDecision(Action.PAUSE, self.pause_seconds, failure)
        if kind is Kind.QUOTA and call in (Call.CREATE, Call.UPLOAD):
            return RetryDecision(Action.REQUEUE, delay, failure)
        if kind is Kind.REFUSED and call in (Call.CREATE, Call.UPLOAD):
            return RetryDecision(Action.GIVE_UP, 0.0, failure)
        if kind is Kind.NOT_FOUND and call is Call.CREATE:  # an unknown model (or input file)
            return RetryDecision(Action.GIVE_UP, 0.0, failure)
        if kind is Kind.NOT_FOUND and call in (Call.POLL, Call.COLLECT):
            return RetryDecision(Action.MAYBE_GONE, delay, failure)
        if kind is Kind.BUG and call is Call.LOCAL and attempt >= MAX_BUG_RETRIES:
            return RetryDecision(Action.GIVE_UP, 0.0, failure)
        return RetryDecision(Action.RETRY, delay, failure)
