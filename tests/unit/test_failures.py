"""daemon.failures: every exception is classified once (real errors from the SDK talking to the
simulator where the simulator can make them), and the retry policy says what each kind means
for each call; `job_outcome` says what a job's final state means for its file."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pydantic
import pytest
import requests
from google.api_core import exceptions as api_core
from google.auth import exceptions as auth_exceptions
from google.cloud.storage.exceptions import DataCorruption
from google.genai import errors

from daemon import logs
from daemon.api import RemoteJob, RemoteState, http
from daemon.api.gemini import GeminiEngine
from daemon.errors import BadReply
from daemon.failures import (
    MAX_BUG_RETRIES,
    Action,
    Call,
    Failure,
    Kind,
    Outcome,
    RetryPolicy,
    classify,
    job_outcome,
)
from daemon.inputs import Defaults, prompt_request
from daemon.schedule import Backoff
from daemon.simulator import Fault, Simulator

KEY = "AIzaTEST-failures-0123456789abcdef"


@pytest.fixture
def backend(sim: Simulator) -> Iterator[GeminiEngine]:
    b = GeminiEngine(KEY, base_url=sim.base_url, retries=1, timeout_seconds=5)
    yield b
    b.close()


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    path = tmp_path / "j1.req"
    path.write_bytes(prompt_request("1", 1, "hello there", Defaults()).wire)
    return path


def raised(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


def api_error(code: int, message: str = "msg", status: str | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    if status is not None:
        body["error"]["status"] = status
    return (errors.ClientError if code < 500 else errors.ServerError)(code, body)


# ---- classify: errors as the SDK raises them talking to the simulator ---------------------------


def test_a_rejected_key_is_auth_without_the_key(
    sim: Simulator, backend: GeminiEngine, request_file: Path
) -> None:
    sim.reject_key(400)
    failure = classify(raised(lambda: backend.find_job("x")), "lookup")
    assert (failure.kind, failure.code, failure.reason) == (Kind.AUTH, 400, "API_KEY_INVALID")
    assert KEY not in failure.message


@pytest.mark.parametrize("status", [401, 403])
def test_unauthenticated_and_permission_denied_are_auth(
    sim: Simulator, backend: GeminiEngine, status: int
) -> None:
    sim.reject_key(status)
    failure = classify(raised(lambda: backend.get_job("batches/x")), "poll")
    assert (failure.kind, failure.code) == (Kind.AUTH, status)


def test_the_enqueued_token_quota_is_quota(
    sim: Simulator, backend: GeminiEngine, request_file: Path
) -> None:
    sim.enqueued_token_limit = 1
    exc = raised(lambda: backend.create_job("gemini-2.5-flash", "q", request_file, inline=True))
    failure = classify(exc, "create")
    assert (failure.kind, failure.code, failure.status) == (Kind.QUOTA, 429, "RESOURCE_EXHAUSTED")
    assert "Enqueued token quota" in failure.message


def test_an_ordinary_429_is_transient(sim: Simulator, backend: GeminiEngine) -> None:
    sim.add_fault(Fault("GET", "batches", status=429))
    failure = classify(raised(lambda: backend.find_job("x")), "lookup")
    assert (failure.kind, failure.code) == (Kind.TRANSIENT, 429)


def test_an_unknown_file_s_403_may_not_exist_is_not_found(
    sim: Simulator, backend: GeminiEngine
) -> None:
    """What the API answers for a deleted or unknown file: not a permission problem."""
    failure = classify(raised(lambda: backend.delete("files/nope")), "delete")
    assert (failure.kind, failure.code) == (Kind.NOT_FOUND, 403)


def test_an_unknown_job_is_not_found(sim: Simulator, backend: GeminiEngine) -> None:
    failure = classify(raised(lambda: backend.get_job("batches/nope")), "poll")
    assert (failure.kind, failure.code, failure.status) == (Kind.NOT_FOUND, 404, "NOT_FOUND")


def test_an_invalid_request_is_refused(
    sim: Simulator, backend: GeminiEngine, request_file: Path
) -> None:
    sim.add_fault(Fault("POST", "batchGenerateContent", status=400))
    exc = raised(lambda: backend.create_job("gemini-2.5-flash", "r", request_file, inline=True))
    failure = classify(exc, "create")
    assert (failure.kind, failure.code, failure.status) == (Kind.REFUSED, 400, "INVALID_ARGUMENT")
    assert failure.server_refused


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, Kind.TRANSIENT), (404, Kind.TRANSIENT), (413, Kind.TRANSIENT), (403, Kind.AUTH)],
)
def test_an_html_4xx_from_a_proxy_never_fails_a_file(
    sim: Simulator, backend: GeminiEngine, status: int, kind: Kind
) -> None:
    """A proxy's or gateway's error page is not the API's verdict on the request: retried, or,
    for 401/403 (a proxy that wants credentials), an operator's problem that pauses new work."""
    sim.add_fault(Fault("GET", "batches", status=status, body="html"))
    failure = classify(raised(lambda: backend.find_job("x")), "lookup")
    assert (failure.kind, failure.code) == (kind, status)
    assert not failure.server_refused  # a create that met it is looked up before another


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_and_timeouts_are_transient(
    sim: Simulator, backend: GeminiEngine, status: int
) -> None:
    sim.add_fault(Fault("GET", "batches", status=status))
    failure = classify(raised(lambda: backend.find_job("x")), "lookup")
    assert (failure.kind, failure.code) == (Kind.TRANSIENT, status)
    assert not failure.server_refused


@pytest.mark.parametrize("body", ["html", "truncated", "empty"])
def test_an_unusable_200_reply_is_transient(
    sim: Simulator, backend: GeminiEngine, body: str
) -> None:
    sim.add_fault(Fault.garbled(body, path_contains="batches"))
    exc = raised(lambda: backend.find_job("x"))
    assert isinstance(exc, BadReply)
    failure = classify(exc, "lookup")
    assert failure.kind is Kind.TRANSIENT and "unusable reply" in failure.message


def test_a_dropped_connection_and_a_deadline_are_transient(
    sim: Simulator, backend: GeminiEngine
) -> None:
    sim.add_fault(Fault.reset(path_contains="batches"))
    assert classify(raised(lambda: backend.find_job("x")), "lookup").kind is Kind.TRANSIENT
    exc = http.DeadlineExceeded("no complete reply within the 1 s deadline")
    assert classify(exc, "poll").kind is Kind.TRANSIENT


# ---- classify: the table, with constructed errors -------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (api_error(400, "Bad request", "INVALID_ARGUMENT"), Kind.REFUSED),
        (api_error(413, "Request too large", "INVALID_ARGUMENT"), Kind.REFUSED),
        (api_error(409, "exists", "ALREADY_EXISTS"), Kind.REFUSED),
        (api_error(404, "no such model", "NOT_FOUND"), Kind.NOT_FOUND),
        (
            api_error(400, "API key expired. Please renew the API key.", "INVALID_ARGUMENT"),
            Kind.AUTH,
        ),
        (
            api_error(
                400,
                "bad",
                "INVALID_ARGUMENT",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_EXPIRED",
                    }
                ],
            ),
            Kind.AUTH,
        ),
        (api_error(400, "billing", "FAILED_PRECONDITION"), Kind.AUTH),  # billing, location
        (api_error(403, "no permission", "PERMISSION_DENIED"), Kind.AUTH),
        (api_error(429, "Too many requests", "RESOURCE_EXHAUSTED"), Kind.TRANSIENT),
        (api_error(429, "enqueued tokens over the limit", "RESOURCE_EXHAUSTED"), Kind.QUOTA),
        (api_error(404, "Not Found"), Kind.TRANSIENT),  # no google status: a proxy's page
        (api_error(501, "x", "UNIMPLEMENTED"), Kind.TRANSIENT),
        (httpx2.ConnectError("refused"), Kind.TRANSIENT),
        (httpx2.ReadTimeout("slow"), Kind.TRANSIENT),
        (httpx2.RemoteProtocolError("gone"), Kind.TRANSIENT),
        (ConnectionResetError("reset"), Kind.TRANSIENT),
        (TimeoutError("slow"), Kind.TRANSIENT),
        (json.JSONDecodeError("x", "doc", 0), Kind.TRANSIENT),
        (OSError(errno.ENOSPC, "No space left on device", "/outbox/x"), Kind.LOCAL),
        (PermissionError(errno.EACCES, "Permission denied"), Kind.LOCAL),
        (KeyError("x-goog-upload-url"), Kind.BUG),
        (TypeError("oops"), Kind.BUG),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify_table(exc: BaseException, kind: Kind) -> None:
    assert classify(exc, "act").kind is kind


def test_a_pydantic_validation_error_is_an_unusable_reply() -> None:
    class Model(pydantic.BaseModel):
        n: int

    try:
        Model.model_validate({"n": "x"})
    except pydantic.ValidationError as exc:
        assert classify(exc, "read").kind is Kind.TRANSIENT


def test_messages_are_one_line_redacted_and_name_the_action() -> None:
    logs.add_secret(KEY)  # as `run` does with the key it uses
    exc = api_error(400, f"key {KEY} refused\n  on two lines", "INVALID_ARGUMENT")
    failure = classify(exc, "create batch job")
    assert failure.message.startswith("create batch job: 400 INVALID_ARGUMENT key ")
    assert "\n" not in failure.message and KEY not in failure.message
    local = classify(OSError(errno.ENOSPC, "No space left on device", "/outbox/x"), "write")
    assert local.message == "write: No space left on device (/outbox/x)"
    assert len(classify(ValueError("x" * 5000), "act").message) <= 2000


def test_server_refused_means_a_well_formed_4xx() -> None:
    assert Failure(Kind.REFUSED, "m", 400, "INVALID_ARGUMENT").server_refused
    assert Failure(Kind.QUOTA, "m", 429, "RESOURCE_EXHAUSTED").server_refused
    assert not Failure(Kind.TRANSIENT, "m", 404).server_refused  # a proxy's page
    assert not Failure(Kind.TRANSIENT, "m", 408).server_refused  # a timeout: it may have acted
    assert not Failure(Kind.TRANSIENT, "m", 503).server_refused
    assert not Failure(Kind.TRANSIENT, "m", None).server_refused


# ---- RetryPolicy: what a failure means for each call -------------------------------------------

POLICY = RetryPolicy(Backoff(1.0, 60.0, 2.0, 0.0), pause_seconds=30.0)


def decide(kind: Kind, call: Call, attempt: int = 1) -> tuple[Action, float]:
    decision = POLICY.decide(Failure(kind, "m"), call, attempt)
    return decision.action, decision.delay


@pytest.mark.parametrize("call", list(Call))
def test_transient_and_local_failures_retry_with_backoff(call: Call) -> None:
    for kind in (Kind.TRANSIENT, Kind.LOCAL):
        assert [decide(kind, call, n) for n in (1, 2, 3, 8)] == [
            (Action.RETRY, 1.0),
            (Action.RETRY, 2.0),
            (Action.RETRY, 4.0),
            (Action.RETRY, 60.0),
        ]


@pytest.mark.parametrize("call", list(Call))
def test_auth_pauses_until_the_probe_finds_the_key_works(call: Call) -> None:
    """The step waits for the pause to end (the daemon's one probe, every pause_seconds)."""
    assert decide(Kind.AUTH, call, 1) == (Action.PAUSE, 30.0)
    assert decide(Kind.AUTH, call, 8) == (Action.PAUSE, 30.0)


def test_quota_requeues_a_create_or_upload_and_retries_elsewhere() -> None:
    assert decide(Kind.QUOTA, Call.CREATE)[0] is Action.REQUEUE
    assert decide(Kind.QUOTA, Call.UPLOAD)[0] is Action.REQUEUE
    assert decide(Kind.QUOTA, Call.POLL)[0] is Action.RETRY


@pytest.mark.parametrize(
    ("kind", "call"),
    [(Kind.REFUSED, Call.CREATE), (Kind.REFUSED, Call.UPLOAD), (Kind.NOT_FOUND, Call.CREATE)],
)
def test_the_api_saying_no_to_a_create_or_upload_gives_up(kind: Kind, call: Call) -> None:
    assert decide(kind, call) == (Action.GIVE_UP, 0.0)


def test_a_404_from_an_upload_session_is_tried_again() -> None:
    """The SDK retries a chunk whose reply was lost; the session is then gone: not a refusal."""
    assert decide(Kind.NOT_FOUND, Call.UPLOAD)[0] is Action.RETRY


@pytest.mark.parametrize("call", [Call.POLL, Call.COLLECT])
def test_a_404_for_a_job_or_its_file_may_be_gone(call: Call) -> None:
    assert decide(Kind.NOT_FOUND, call, 2) == (Action.MAYBE_GONE, 2.0)


def test_a_refused_poll_or_lookup_retries() -> None:
    """Only creates and uploads are refused for good: a job once made is never abandoned."""
    for call in (Call.POLL, Call.LOOKUP, Call.COLLECT, Call.PROBE):
        assert decide(Kind.REFUSED, call)[0] is Action.RETRY
    assert decide(Kind.NOT_FOUND, Call.LOOKUP)[0] is Action.RETRY


def test_a_bug_in_local_work_gives_up_after_a_few_tries() -> None:
    assert decide(Kind.BUG, Call.LOCAL, MAX_BUG_RETRIES - 1)[0] is Action.RETRY
    assert decide(Kind.BUG, Call.LOCAL, MAX_BUG_RETRIES)[0] is Action.GIVE_UP
    assert decide(Kind.BUG, Call.POLL, 100)[0] is Action.RETRY  # a job exists: never given up


# ---- job_outcome: what a job's state means for its file ----------------------------------------


def job(state: str, code: int | None = None, message: str | None = None) -> RemoteJob:
    parsed, name = RemoteState.parse(state)
    return RemoteJob("batches/x", parsed, name, error_code=code, error_message=message)


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("JOB_STATE_QUEUED", Outcome.RUNNING),
        ("BATCH_STATE_PENDING", Outcome.RUNNING),
        ("JOB_STATE_RUNNING", Outcome.RUNNING),
        ("JOB_STATE_UPDATING", Outcome.RUNNING),
        ("JOB_STATE_PAUSED", Outcome.RUNNING),
        ("JOB_STATE_CANCELLING", Outcome.RUNNING),
        ("JOB_STATE_SOMETHING_NEW", Outcome.RUNNING),
        ("", Outcome.RUNNING),
        ("BATCH_STATE_SUCCEEDED", Outcome.ANSWERED),
        ("JOB_STATE_PARTIALLY_SUCCEEDED", Outcome.ANSWERED),
        ("BATCH_STATE_FAILED", Outcome.FAILED),
        ("JOB_STATE_CANCELLED", Outcome.FAILED),
        ("BATCH_STATE_EXPIRED", Outcome.EXPIRED),
    ],
)
def test_every_state_has_an_outcome(state: str, outcome: Outcome) -> None:
    assert job_outcome(job(state)) is outcome


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (8, "Enqueued token quota exceeded for this model."),  # as the live service sends it
        (None, "Enqueued token quota exceeded for model gemini-2.5-flash: ..."),
        (8, None),  # RESOURCE_EXHAUSTED alone
    ],
)
def test_a_job_failed_for_the_token_quota_is_quota(code: int | None, message: str | None) -> None:
    assert job_outcome(job("BATCH_STATE_FAILED", code, message)) is Outcome.QUOTA


def test_other_failed_jobs_fail() -> None:
    assert job_outcome(job("BATCH_STATE_FAILED", 13, "internal")) is Outcome.FAILED
    assert job_outcome(job("BATCH_STATE_EXPIRED", 8, "Enqueued token")) is Outcome.EXPIRED


# ---- Cloud Storage and Google credentials (backend: vertex) ----------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (api_core.Forbidden("sa does not have storage.objects.create access"), Kind.AUTH),
        (api_core.Unauthorized("no credentials"), Kind.AUTH),
        (api_core.NotFound("The specified bucket does not exist."), Kind.AUTH),
        (api_core.NotFound("No such object: b/o"), Kind.NOT_FOUND),
        (api_core.TooManyRequests("slow down"), Kind.TRANSIENT),
        (api_core.ServiceUnavailable("try again"), Kind.TRANSIENT),
        (api_core.InternalServerError("oops"), Kind.TRANSIENT),
        (api_core.BadRequest("bad"), Kind.REFUSED),
        (auth_exceptions.RefreshError("invalid_grant: Invalid JWT Signature."), Kind.AUTH),
        (auth_exceptions.TransportError("connection refused"), Kind.TRANSIENT),
        (requests.ConnectionError("connection reset"), Kind.TRANSIENT),
        (requests.Timeout("read timed out"), Kind.TRANSIENT),
        (DataCorruption(None, "Checksum mismatch"), Kind.TRANSIENT),
    ],
)
def test_storage_and_credential_errors_are_classified(exc: BaseException, kind: Kind) -> None:
    failure = classify(exc, "stage")
    assert failure.kind is kind, failure
    assert failure.cause  # said once a minute, however many files meet it


def test_a_missing_bucket_pauses_rather_than_fails() -> None:
    failure = classify(api_core.NotFound("The specified bucket does not exist."), "upload")
    assert POLICY.decide(failure, Call.UPLOAD, 1).action is Action.PAUSE


def test_vertex_s_permission_denied_or_it_may_not_exist_is_a_permission_to_grant() -> None:
    """Not the Gemini API's unknown file, whose 403 also says "may not exist"."""
    message = (
        "Permission 'aiplatform.batchPredictionJobs.create' denied on resource "
        "'//aiplatform.googleapis.com/projects/p/locations/l' (or it may not exist)."
    )
    body = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}
    assert classify(errors.ClientError(403, body), "create").kind is Kind.AUTH
