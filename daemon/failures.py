"""The failure model: every exception is classified once, and one policy says what to do.

The rule: a file gets an error report only when the API has said no (a job FAILED, EXPIRED
or CANCELLED; a create or upload refused as invalid) or its input is invalid. Anything time
or an operator can fix -- the network, timeouts, 408/429/5xx, replies that cannot be parsed,
a rejected key, quota and billing -- keeps the file where it is, retried with backoff.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import pydantic
from google.genai import errors

from . import logs
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
    """Connection-level errors of whichever HTTP library the SDK uses (httpx2 in 3.x, httpx before)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
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
    """Turn any exception raised while doing `action` into a `Failure`."""
    if isinstance(exc, errors.APIError):
        return _api_failure(exc, action)
    if isinstance(exc, BadReply | json.JSONDecodeError | pydantic.ValidationError):
        return Failure(Kind.TRANSIENT, _line(f"{action}: unusable reply: {exc}"))
    if isinstance(exc, TRANSPORT_ERRORS):
        return Failure(Kind.TRANSIENT, _line(f"{action}: {type(exc).__name__}: {exc}"))
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        cause = (
            f"{exc.strerror or exc} in {os.path.dirname(exc.filename)}" if exc.filename else None
        )
        return Failure(Kind.LOCAL, _line(f"{action}: {exc.strerror or exc}{where}"), cause=cause)
    return Failure(Kind.BUG, _line(f"{action}: {type(exc).__name__}: {exc}"))


def _api_failure(exc: errors.APIError, action: str) -> Failure:
    code = exc.code if isinstance(exc.code, int) else None
    status = exc.status if isinstance(exc.status, str) else None
    message = exc.message if isinstance(exc.message, str) else ""
    reason = _reason(exc.details)
    text = _line(f"{action}: {code} {status or ''} {message}".replace("  ", " "))
    google = status in RPC_STATUSES
    if code is None or code >= 500 or (code in (408, 429) and "enqueued" not in message.lower()):
        return Failure(Kind.TRANSIENT, text, code, status, reason)
    if code == 429:
        return Failure(Kind.QUOTA, text, code, status, reason)
    if code == 403 and "may not exist" in message:  # what the API says of an unknown file
        return Failure(Kind.NOT_FOUND, text, code, status, reason)
    if code in (401, 403) or reason in API_KEY_REASONS or status in OPERATOR_STATUSES:
        return Failure(Kind.AUTH, text, code, status, reason)
    if code == 400 and "api key" in message.lower():
        return Failure(Kind.AUTH, text, code, status, reason)
    if not google:  # a 4xx page from a proxy or gateway, not the API's verdict
        return Failure(Kind.TRANSIENT, text, code, status, reason)
    if code == 404:
        return Failure(Kind.NOT_FOUND, text, code, status, reason)
    if 400 <= code < 500:
        return Failure(Kind.REFUSED, text, code, status, reason)
    return Failure(Kind.TRANSIENT, text, code, status, reason)


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
    pause_seconds: float = 60.0  # how often a paused daemon tries again

    def decide(self, failure: Failure, call: Call, attempt: int) -> RetryDecision:
        """`attempt`: failed attempts at this step so far, this one included (1-based)."""
        delay = self.backoff.delay(attempt - 1)
        kind = failure.kind
        if kind is Kind.AUTH:
            return RetryDecision(Action.PAUSE, max(delay, self.pause_seconds), failure)
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


class Health:
    """The daemon's view of the API: paused or not (and why), and counts of call outcomes.

    Workers report every call here; the supervisor reads it for status, metrics and the pause
    rule: while the API rejects the key or its permission no new work starts, and one clear
    error is logged per minute, until any call succeeds.
    """

    LOG_EVERY = 60.0

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.paused: str | None = None
        self.paused_since: float | None = None
        self.last_ok_wall: float | None = None  # time.time() of the last successful call
        self.calls: Counter[tuple[str, str]] = Counter()  # (call, outcome) -> count
        self.quota_refusals = 0
        self.jobs_ended = 0
        self._last_pause_log = -1e18
        self._last_said: dict[str, float] = {}

    def ok(self, call: Call) -> None:
        with self._lock:
            self.calls[(call.value, "ok")] += 1
            self.last_ok_wall = time.time()
            resumed = self.paused
            self.paused = self.paused_since = None
            if resumed:
                self._last_pause_log = -1e18  # a new pause is news again
        if resumed:
            log.warning("resumed: the API accepts calls again", was=resumed)

    def failed(self, call: Call, failure: Failure) -> None:
        now = self._clock()
        with self._lock:
            self.calls[(call.value, failure.kind.value)] += 1
            if failure.kind is not Kind.AUTH:
                return
            if self.paused is None:
                self.paused_since = now
            self.paused = f"API key or permission rejected: {failure.message}"
            due = now - self._last_pause_log >= self.LOG_EVERY
            if due:
                self._last_pause_log = now
        if due:
            log.error(
                "paused: the API rejects the key or its permission; no new work starts until "
                "a call succeeds",
                reason=failure.message,
            )

    def call_counts(self) -> dict[tuple[str, str], int]:
        """A copy of `calls`, taken under the lock the workers update it under."""
        with self._lock:
            return dict(self.calls)

    def loud(self, failure: Failure) -> bool:
        """Whether to log this failure as a warning: always, unless its cause (a folder every
        file writes to, say) was logged in the last minute."""
        return failure.cause is None or self.due(failure.cause)

    def due(self, cause: str) -> bool:
        """Whether `cause` was not logged in the last minute (and counts as logged from now)."""
        now = self._clock()
        with self._lock:
            if now - self._last_said.get(cause, -1e18) < self.LOG_EVERY:
                return False
            self._last_said[cause] = now
        return True

    def job_ended(self) -> None:
        with self._lock:
            self.jobs_ended += 1

    def quota_refused(self) -> None:
        with self._lock:
            self.quota_refusals += 1
