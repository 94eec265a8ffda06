"""A loopback simulator of Vertex AI batch prediction for Gemini, with its OAuth token endpoint.

The daemon's Vertex engine talks to Vertex AI through the unmodified google-genai SDK in
Vertex mode (service-account credentials, ``HttpOptions(base_url=sim.base_url)``) and to
Cloud Storage through the unmodified google-cloud-storage client. This simulator serves the
``batchPredictionJobs`` REST resource and ``POST /token``, reads each job's JSONL input from a
`StorageEmulator` and writes its predictions back there, the way Vertex AI does: job names
with the project number, string counts, predictions in shuffled order spread over files that
may arrive late, sibling fields echoed (numeric-looking strings coerced), the request
re-serialized, a failed request's error as a ``status`` string, and the input imported by
BigQuery's rules (one bad line fails the whole job). It reuses the Gemini simulator's
machinery: the injected clock, knobs, `Fault`s, rejection windows and HTTP server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .answers import pick, request_error
from .server import KeyRejection, Simulator, _Call, _iso, _page_body, _paginate, _Request
from .wire import ApiError, Reply, json_reply, phrase, with_unknown_fields

if TYPE_CHECKING:  # the storage clients load in ~0.2 s: only when a simulator needs them
    from typing import Self

    from google.cloud import storage as gcs

    from .storage import StorageEmulator

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "VertexSimulator",
]

JSON = dict[str, Any]

log = logging.getLogger(__name__)

QUEUED = "JOB_STATE_QUEUED"
PENDING = "JOB_STATE_PENDING"
RUNNING = "JOB_STATE_RUNNING"
SUCCEEDED = "JOB_STATE_SUCCEEDED"
PARTIALLY_SUCCEEDED = "JOB_STATE_PARTIALLY_SUCCEEDED"
FAILED = "JOB_STATE_FAILED"
CANCELLING = "JOB_STATE_CANCELLING"
CANCELLED = "JOB_STATE_CANCELLED"
EXPIRED = "JOB_STATE_EXPIRED"
PAUSED = "JOB_STATE_PAUSED"
UPDATING = "JOB_STATE_UPDATING"
ACTIVE_STATES = frozenset({QUEUED, PENDING, RUNNING, PAUSED, UPDATING, CANCELLING})
FINAL_STATES = frozenset({SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED})
ALL_STATES = ACTIVE_STATES | FINAL_STATES
_EXPIRING = ACTIVE_STATES - {CANCELLING}
_STARTED = frozenset({RUNNING, PAUSED, UPDATING, SUCCEEDED, PARTIALLY_SUCCEEDED})
"""States a job forced before its start has started in (it runs, or it has results)."""
_WITH_RESULTS = frozenset({SUCCEEDED, PARTIALLY_SUCCEEDED})

JOB_ERRORS = {
    FAILED: (
        13,
        "Internal error occurred. Please retry in a few minutes. If you still experience "
        "errors, contact Vertex AI.",
    ),
    CANCELLED: (1, "CANCELED"),
    EXPIRED: (4, "The batch prediction job expired: it did not complete within 72 hours."),
}
"""The job's ``error`` (google.rpc code, message) of each unsuccessful final state."""
_ERROR_REASONS = {
    1: "CANCELLED",
    3: "INVALID_INPUT",
    4: "JOB_EXPIRED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    13: "INTERNAL_ERROR",
}

DEFAULT_PROJECT_NUMBER = "123456789012"
KEY_FIELD = "gemini_batchd_key"
"""The sibling field whose value (``k:<key>``) the per-key knobs match (prefix stripped)."""
KEY_PREFIX = "k:"
MAX_REQUESTS_PER_JOB = 200_000
MAX_INPUT_BYTES = 1 << 30
MAX_NESTING = 15
"""Levels of objects below a line's own object that BigQuery's import accepts."""

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME = 3599
AIPLATFORM = "aiplatform.googleapis.com"
MISSING_CREDENTIAL_MESSAGE = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
INVALID_CREDENTIAL_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
INVALID_GRANT_MESSAGE = "Invalid JWT Signature."

_PATH = re.compile(r"^/(v1|v1beta1)/projects/([^/]+)/locations/([^/]+)/(.+)$")
_GCS_OBJECT = re.compile(r"^gs://([a-z0-9][-_.a-z0-9]*[a-z0-9])/(.+)$")
_GCS_PREFIX = re.compile(r"^gs://([a-z0-9][-_.a-z0-9]*[a-z0-9])(?:/(.*))?$")
_MODEL = re.compile(
    r"^(?:projects/[^/]+/locations/[^/]+/)?(?:publishers/[^/]+/)?models/(?P<id>[^/@]+)(?:@[^/]+)?$"
)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_MAX_LABELS = 64
_NUMERIC = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_ROLES = frozenset({"user", "model"})
_JOB_FIELDS = frozenset(
    {
        "name",
        "displayName",
        "model",
        "modelVersionId",
        "unmanagedContainerModel",
        "inputConfig",
        "instanceConfig",
        "modelParameters",
        "outputConfig",
        "dedicatedResources",
        "serviceAccount",
        "manualBatchTuningParameters",
        "generateExplanation",
        "explanationSpec",
        "labels",
        "encryptionSpec",
        "disableContainerLogging",
        "modelMonitoringConfig",
    }
)
"""The BatchPredictionJob fields a create may set (either casing); others are a 400."""
_VERBS = {
    "_create": "create",
    "_list_jobs": "list",
    "_get_job": "get",
    "_cancel_job": "cancel",
    "_delete_job": "delete",
}
_METHODS = {
    "create": "CreateBatchPredictionJob",
    "list": "ListBatchPredictionJobs",
    "get": "GetBatchPredictionJob",
    "cancel": "CancelBatchPredictionJob",
    "delete": "DeleteBatchPredictionJob",
}
_BILLING_URL = "https://console.developers.google.com/billing/enable?project={}"
_DELETE_METADATA_TYPE = "type.googleapis.com/google.cloud.aiplatform.{}.DeleteOperationMetadata"
_IO_TIMEOUT = 30.0


def _error_info(reason: str, domain: str, metadata: dict[str, str]) -> JSON:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": domain,
        "metadata": metadata,
    }


def _failed_precondition(message: str) -> ApiError:
    return ApiError(400, message, status="FAILED_PRECONDITION")


def _field_error(path: str, message: str) -> ApiError:
    """Vertex's wording for an invalid create request, field by field."""
    return ApiError(400, f"List of found errors:\t1.Field: {path}; Message: {message}\t")


@dataclass
class _Line:
    """One input line: where it came from, its request and the fields beside it."""

    uri: str
    number: int
    request: Any
    siblings: JSON
    key: str | None


@dataclass
class _Job:
    """A batch prediction job; its timing, outcome and predictions are fixed at creation."""

    id: str
    location: str
    display_name: str
    model: str
    model_id: str
    input_config: JSON
    output_config: JSON
    labels: dict[str, str]
    created: float  # injected clock
    created_wall: datetime
    queued_seconds: float
    pending_seconds: float
    running_seconds: float
    outcome: str
    output_dir: str
    prediction_files: int
    predictions_lag: float
    expire_after: float | None
    import_error: tuple[int, str] | None = None
    kinds: list[str] = field(default_factory=list)  # per input line: ok | error | missing
    keys: list[str | None] = field(default_factory=list)
    lines: list[JSON] = field(default_factory=list)  # predictions, in output order
    written: set[int] = field(default_factory=set)  # prediction files written so far
    forced_state: str | None = None
    forced_at: float = 0.0
    auto_cancel: bool = False  # CANCELLING that becomes CANCELLED by itself
    error_message: str | None = None

    @property
    def start_at(self) -> float:
        return self.created + self.queued_seconds + self.pending_seconds

    def force(self, state: str, at: float, message: str | None = None, auto: bool = False) -> None:
        self.forced_state, self.forced_at = state, at
        self.error_message, self.auto_cancel = message, auto

    def file_names(self) -> list[str]:
        """The prediction files' names: one ``predictions.jsonl``, or numbered ones."""
        n = self.prediction_files
        if n == 1:
            return ["predictions.jsonl"]
        return [f"predictions_{i:05d}-of-{n:05d}.jsonl" for i in range(1, n + 1)]


class VertexSimulator(Simulator):
    """Vertex AI batch prediction for Gemini on a loopback port, backed by a `StorageEmulator`.

    Like the Gemini `Simulator`, state follows the injected clock lazily and every knob is a
    plain attribute a test may change while it runs (timing, outcome and prediction layout
    are fixed when a job is created):

    - ``queued_seconds``, ``pending_seconds``, ``running_seconds``: a new job is QUEUED (when
      ``queued_seconds`` > 0), PENDING, RUNNING, then ends with ``outcome``.
    - ``outcome``: SUCCEEDED (None), FAILED, EXPIRED, CANCELLED or PARTIALLY_SUCCEEDED;
      ``partial_on_errors`` turns SUCCEEDED into PARTIALLY_SUCCEEDED when a request failed.
    - ``cancelling_seconds``: how long a cancelled job is CANCELLING before CANCELLED.
    - ``expire_after_seconds``: a job not ended this long after creation becomes EXPIRED.
    - ``shuffle_output`` (default on), ``prediction_files``, ``predictions_lag_seconds``: the
      predictions' order, how many files they are spread over, and how long after the job's
      end they are all there (before that only the first of several files, or none).
    - ``coerce_numeric_strings`` (default on): echoed sibling strings like ``"007"`` come
      back as numbers.
    - ``fail_keys``, ``fail_keys_times``, ``missing_keys``, ``missing_keys_times``: as in the
      Gemini simulator, matched on the ``KEY_FIELD`` sibling with its ``k:`` prefix stripped;
      a missing request has no prediction line (and counts as successful).
    - ``list_lag_seconds``: a new job shows in listings only this long after its creation.
    - ``strict_tokens``: only tokens issued by ``/token`` are accepted (else any bearer).
    - ``billing_disabled``: every API call gets 403 BILLING_DISABLED.
    - ``project``, ``location``: when set, calls for another project (id or number) or
      location get 403 PERMISSION_DENIED.
    - ``error_details``: job errors carry ErrorInfo ``details``.
    - ``null_completion_stats``: ``completionStats: null`` instead of no field.
    - ``extra_fields``: unknown fields in every object of every reply and prediction line.
    - ``max_requests_per_job``, ``max_input_bytes``: the import limits (200,000; 1 GB).

    Rejection windows (`reject_key`) take 401 or 403 for API calls, and 400 for the token
    endpoint (``invalid_grant``, as for a revoked key; see `reject_tokens`).
    """

    def __init__(
        self,
        storage: StorageEmulator | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        project_number: str = DEFAULT_PROJECT_NUMBER,
        project: str | None = None,
        location: str | None = None,
        queued_seconds: float = 0.0,
        pending_seconds: float = 0.0,
        running_seconds: float = 0.0,
        cancelling_seconds: float = 1.0,
        outcome: str | None = None,
        partial_on_errors: bool = False,
        expire_after_seconds: float | None = None,
        shuffle_output: bool = True,
        prediction_files: int = 1,
        predictions_lag_seconds: float = 0.0,
        coerce_numeric_strings: bool = True,
        fail_keys: dict[str, int] | None = None,
        missing_keys: set[str] | None = None,
        fail_keys_times: dict[str, tuple[int, int]] | None = None,
        missing_keys_times: dict[str, int] | None = None,
        list_lag_seconds: float = 0.0,
        strict_tokens: bool = False,
        billing_disabled: bool = False,
        error_details: bool = False,
        null_completion_stats: bool = False,
        extra_fields: bool = False,
        max_requests_per_job: int = MAX_REQUESTS_PER_JOB,
        max_input_bytes: int = MAX_INPUT_BYTES,
    ) -> None:
        super().__init__(
            host,
            port,
            pending_seconds,
            running_seconds,
            seed,
            None,
            clock,
            outcome=outcome,
            shuffle_output=shuffle_output,
            fail_keys=fail_keys,
            missing_keys=missing_keys,
            fail_keys_times=fail_keys_times,
            missing_keys_times=missing_keys_times,
            list_lag_seconds=list_lag_seconds,
            expire_after_seconds=expire_after_seconds,
            extra_fields=extra_fields,
        )
        _final_state(outcome)  # checks it
        if storage is None:
            from .storage import StorageEmulator

            storage = StorageEmulator()
        self.storage = storage
        self.project_number = project_number
        self.project = project
        self.location = location
        self.queued_seconds = queued_seconds
        self.cancelling_seconds = cancelling_seconds
        self.partial_on_errors = partial_on_errors
        self.prediction_files = prediction_files
        self.predictions_lag_seconds = predictions_lag_seconds
        self.coerce_numeric_strings = coerce_numeric_strings
        self.strict_tokens = strict_tokens
        self.billing_disabled = billing_disabled
        self.error_details = error_details
        self.null_completion_stats = null_completion_stats
        self.max_requests_per_job = max_requests_per_job
        self.max_input_bytes = max_input_bytes
        self._vjobs: dict[str, _Job] = {}
        self._issued: list[str] = []
        self._token_requests = 0
        self._authorizations: list[str | None] = []
        self._owns_storage = False
        self._catching_up = False
        self._catch_up_lock = threading.Lock()
        self._gcs: gcs.Client | None = None
        self._routes = [
            ("POST", re.compile(r"batchPredictionJobs"), self._create),
            ("GET", re.compile(r"batchPredictionJobs"), self._list_jobs),
            ("GET", re.compile(r"batchPredictionJobs/([^/:]+)"), self._get_job),
            ("DELETE", re.compile(r"batchPredictionJobs/([^/:]+)"), self._delete_job),
            ("POST", re.compile(r"batchPredictionJobs/([^/:]+):cancel"), self._cancel_job),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Serve; the storage emulator is started too if it is not running (and then owned)."""
        if not self.storage.running:
            self.storage.start()
            self._owns_storage = True
        if self._catch_up not in self.storage.before_request:
            self.storage.before_request.append(self._catch_up)
        super().start()
        return self

    def _catch_up(self) -> None:
        """Someone reads the bucket: predictions that are due by now get written, as Vertex
        writes them whether or not anyone asks about the job. (In a thread of its own: the
        emulator serves one request at a time, and is serving this one.)"""
        with self._catch_up_lock:  # never the simulator's lock: it may be waiting on us
            if self._catching_up:
                return
            self._catching_up = True

        def write_due() -> None:
            try:
                with self._lock:
                    now = self.clock()
                    for job in list(self._vjobs.values()):
                        state, since = self._state_at(job, now)
                        if state in _WITH_RESULTS and job.import_error is None:
                            self._write_predictions(job, since, now)
            finally:
                self._catching_up = False

        threading.Thread(target=write_due, name="vertex-sim-catch-up", daemon=True).start()

    def stop(self) -> None:
        """Stop serving, and stop the storage emulator if `start` started it."""
        super().stop()
        if self._owns_storage:
            self._owns_storage = False
            self.storage.stop()

    @property
    def token_uri(self) -> str:
        """Where a service-account key's ``token_uri`` should point."""
        return f"{self.base_url}/token"

    # -- knobs and observation -------------------------------------------------------------

    def reject_key(
        self,
        status: int = 401,
        *,
        start: float | None = None,
        end: float | None = None,
        seconds: float | None = None,
        message: str | None = None,
    ) -> KeyRejection:
        """Reject the credential from `start` (default now) until `end` (or for `seconds`).

        401: every API call gets UNAUTHENTICATED ("Request had invalid authentication
        credentials..."); 403: PERMISSION_DENIED on the call's permission (IAM_PERMISSION_DENIED);
        400: the token endpoint answers ``invalid_grant`` (existing tokens still work).
        `message` replaces the usual wording; `accept_key` ends every window.
        """
        return super().reject_key(status, start=start, end=end, seconds=seconds, message=message)

    def reject_tokens(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        seconds: float | None = None,
        message: str | None = None,
    ) -> KeyRejection:
        """Answer token requests with 400 ``invalid_grant`` for a while (see `reject_key`)."""
        return self.reject_key(400, start=start, end=end, seconds=seconds, message=message)

    @property
    def token_requests(self) -> int:
        """Requests received by ``/token``, refused ones included."""
        with self._lock:
            return self._token_requests

    @property
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    @property
    def authorizations(self) -> list[str | None]:
        """The Authorization header of every API call (not token requests), in order."""
        with self._lock:
            return list(self._authorizations)

    @property
    def jobs(self) -> dict[str, JSON]:
        """A snapshot of every job: name -> record with its current state."""
        with self._lock:
            now = self.clock()
            return {self._name(job): self._record_of(job, now) for job in self._vjobs.values()}

    def set_job_state(self, name: str, state: str, message: str | None = None) -> None:
        """Force a job's state (any state); FAILED, CANCELLED and EXPIRED carry `message`."""
        forced = _state_name(state)
        with self._lock:
            self._lookup(name).force(forced, self.clock(), message)

    def forget_job(self, name: str) -> None:
        """Drop a job without an API call: later GETs answer 404."""
        with self._lock:
            self._vjobs.pop(name.rsplit("/", 1)[-1], None)

    def predictions(self, name: str) -> dict[str, bytes]:
        """The prediction files of a job in the storage emulator now: file name -> content."""
        with self._lock:
            job = self._lookup(name)
        bucket, _, folder = job.output_dir.removeprefix("gs://").partition("/")
        return {
            path.rsplit("/", 1)[-1]: data
            for path, data in self.storage.objects(bucket, folder + "/").items()
        }

    # -- request handling ------------------------------------------------------------------

    def _resolve(
        self, method: str, path: str, query: str, headers: Message, body: bytes
    ) -> tuple[Callable[[_Call], Reply] | None, _Call]:
        call = _Call(method, path, "", (), parse_qs(query), headers, body)
        if path == "/token":
            return (self._token if method == "POST" else None), call
        found = _PATH.match(path)
        if found is None:
            return None, call
        call.version = found[1]
        for route_method, pattern, route in self._routes:
            match = pattern.fullmatch(found[4])
            if match and route_method == method:
                call.args = (found[2], found[3], *match.groups())
                return route, call
        return None, call

    def _run(self, route: Callable[[_Call], Reply] | None, call: _Call) -> Reply:
        try:
            if route is None:
                raise ApiError(404, f"The requested URL {call.path} was not found.")
            if route != self._token:
                self._check_auth(call, _VERBS[getattr(route, "__name__", "")])
            return route(call)
        except ApiError as exc:
            return exc.reply()
        except Exception as exc:  # a simulator bug must still answer like a server
            log.exception("vertex simulator handler failed")
            return ApiError(500, f"Internal error in the simulator: {exc}").reply()

    def _check_auth(self, call: _Call, verb: str) -> None:
        """Bearer token, rejection windows, the project and location, billing, in that order."""
        header = call.headers.get("Authorization")
        scheme, _, token = (header or "").partition(" ")
        project, location = call.args[0], call.args[1]
        method = f"google.cloud.aiplatform.{call.version}.JobService.{_METHODS[verb]}"
        with self._lock:
            self._authorizations.append(header)
            now = self.clock()
            rejection = next(
                (r for r in self._rejections if r.status != 400 and r.covers(now)), None
            )
            issued = self.strict_tokens and token.strip() in self._issued
        meta = {"service": AIPLATFORM, "method": method}
        if scheme.lower() != "bearer" or not token.strip():
            details = [_error_info("CREDENTIALS_MISSING", "googleapis.com", meta)]
            raise ApiError(401, MISSING_CREDENTIAL_MESSAGE, details=details)
        if rejection is not None and rejection.status == 401:
            details = [_error_info("ACCESS_TOKEN_EXPIRED", "googleapis.com", meta)]
            raise ApiError(401, rejection.message or INVALID_CREDENTIAL_MESSAGE, details=details)
        if self.strict_tokens and not issued:
            details = [_error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED", "googleapis.com", meta)]
            raise ApiError(401, INVALID_CREDENTIAL_MESSAGE, details=details)
        wrong_project = self.project is not None and project not in (
            self.project,
            self.project_number,
        )
        wrong_location = self.location is not None and location != self.location
        if (rejection is not None and rejection.status == 403) or wrong_project or wrong_location:
            permission = f"aiplatform.batchPredictionJobs.{verb}"
            resource = f"//{AIPLATFORM}/projects/{project}/locations/{location}"
            if verb in ("get", "cancel", "delete"):
                resource += f"/batchPredictionJobs/{call.args[2]}"
            message = (
                f"Permission '{permission}' denied on resource '{resource}' (or it may not exist)."
            )
            if rejection is not None and rejection.message:
                message = rejection.message
            details = [_error_info("IAM_PERMISSION_DENIED", AIPLATFORM, {"permission": permission})]
            raise ApiError(403, message, details=details)
        if self.billing_disabled:
            number = self.project_number
            url = _BILLING_URL.format(number)
            message = (
                f"This API method requires billing to be enabled. Please enable billing on "
                f"project #{number} by visiting {url} then retry. If you enabled billing for "
                "this project recently, wait a few minutes for the action to propagate to our "
                "systems and retry."
            )
            details = [
                _error_info(
                    "BILLING_DISABLED",
                    "googleapis.com",
                    {"consumer": f"projects/{number}", "service": AIPLATFORM},
                ),
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{"description": "Google developers console billing", "url": url}],
                },
            ]
            raise ApiError(403, message, details=details)

    # -- the token endpoint ----------------------------------------------------------------

    def _token(self, call: _Call) -> Reply:
        """OAuth 2 JWT-bearer grant: any well-formed assertion gets a new access token."""
        form = parse_qs(call.body.decode("utf-8", "replace"))
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        with self._lock:
            self._token_requests += 1
            now = self.clock()
            rejection = next(
                (r for r in self._rejections if r.status == 400 and r.covers(now)), None
            )
            if rejection is not None:
                return _oauth_error("invalid_grant", rejection.message or INVALID_GRANT_MESSAGE)
            if grant != JWT_BEARER:
                return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
            parts = assertion.split(".")
            if len(parts) != 3 or not all(parts):
                return _oauth_error("invalid_grant", "Invalid JWT: the assertion is not a JWS.")
            token = f"ya29.sim-{len(self._issued) + 1}"
            self._issued.append(token)
        body = {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}
        return json_reply(body)

    # -- batch prediction jobs -------------------------------------------------------------

    def _name(self, job: _Job) -> str:
        return (
            f"projects/{self.project_number}/locations/{job.location}/batchPredictionJobs/{job.id}"
        )

    def _lookup(self, name_or_id: str) -> _Job:
        job = self._vjobs.get(name_or_id.rsplit("/", 1)[-1])
        if job is None:
            raise KeyError(name_or_id)
        return job

    def _vjob(self, call: _Call) -> _Job:
        job = self._vjobs.get(call.args[2])
        if job is None:
            raise ApiError(404, "The BatchPredictionJob does not exist.")
        return job

    def _create(self, call: _Call) -> Reply:
        project, location = call.args[0], call.args[1]
        body = call.json()
        for key in body:
            if _camel(key) not in _JOB_FIELDS:
                raise ApiError(
                    400, f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
                )
        display_name = pick(body, "displayName")
        if not isinstance(display_name, str) or not display_name:
            raise _field_error("batch_prediction_job.display_name", "Required field is not set.")
        model, model_id = _check_model(pick(body, "model"), project, location)
        input_config, uris = _check_input(pick(body, "inputConfig"))
        output_config, prefix = _check_output(pick(body, "outputConfig"))
        labels = _check_labels(pick(body, "labels"))
        with self._lock:
            now = self.clock()
            created_wall = datetime.now(timezone.utc)
            job_id = self._new_id()
            folder_time = created_wall + timedelta(microseconds=self._rng.randint(2000, 40000))
            output_dir = (
                f"{prefix.rstrip('/')}/prediction-model-"
                f"{folder_time.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
            )
            job = _Job(
                id=job_id,
                location=location,
                display_name=display_name,
                model=model,
                model_id=model_id,
                input_config=input_config,
                output_config=output_config,
                labels=labels,
                created=now,
                created_wall=created_wall,
                queued_seconds=self.queued_seconds,
                pending_seconds=self.pending_seconds,
                running_seconds=self.running_seconds,
                outcome=_final_state(self.outcome),
                output_dir=output_dir,
                prediction_files=max(1, self.prediction_files),
                predictions_lag=self.predictions_lag_seconds,
                expire_after=self.expire_after_seconds,
            )
            self._import(job, uris, prefix)
            self._vjobs[job_id] = job
            self._created_by_name[display_name] = self._created_by_name.get(display_name, 0) + 1
            return json_reply(self._job_json(job, now, fresh=True))

    def _new_id(self) -> str:
        while True:
            job_id = str(self._rng.randrange(10**18, 10**19))
            if job_id not in self._vjobs:
                return job_id

    def _client(self) -> gcs.Client:
        if self._gcs is None:
            self._gcs = self.storage.client()
        return self._gcs

    def _import(self, job: _Job, uris: list[str], output_prefix: str) -> None:
        """Read the input and fix every request's outcome and prediction line now.

        Any failure to read or import becomes the job's ``import_error``: the job then fails
        when it leaves PENDING.
        """
        try:
            self._check_output_bucket(output_prefix)
            lines = self._read_lines(uris)
        except ApiError as exc:
            job.import_error = (exc.code, exc.message)
            return
        if len(lines) > self.max_requests_per_job:
            job.import_error = (
                3,
                f"The batch prediction job has {len(lines)} requests; the limit is "
                f"{self.max_requests_per_job:,} requests per job.",
            )
            return
        self._build_predictions(job, lines)
        if job.outcome == SUCCEEDED and self.partial_on_errors and "error" in job.kinds:
            job.outcome = PARTIALLY_SUCCEEDED

    def _check_output_bucket(self, prefix: str) -> None:
        from google.api_core import exceptions as gcs_errors

        found = _GCS_PREFIX.match(prefix)
        bucket = found[1] if found else ""
        try:
            exists = self._client().lookup_bucket(bucket, timeout=_IO_TIMEOUT, retry=None)
        except gcs_errors.Forbidden as exc:
            raise ApiError(7, f"Permission denied on the output {prefix}: {exc.message}") from exc
        except (gcs_errors.GoogleAPICallError, OSError) as exc:
            raise ApiError(13, f"Failed to check the output {prefix}: {exc}") from exc
        if exists is None:
            raise ApiError(5, f"The output bucket gs://{bucket} does not exist.")

    def _read_lines(self, uris: list[str]) -> list[_Line]:
        """Every line of every input object, imported by BigQuery's rules (code 3 if not)."""
        from google.api_core import exceptions as gcs_errors

        client = self._client()
        lines: list[_Line] = []
        for uri in uris:
            found = _GCS_OBJECT.match(uri)
            assert found is not None  # checked at create
            bucket, name = found[1], found[2]
            try:
                blob = client.bucket(bucket).get_blob(name, timeout=_IO_TIMEOUT, retry=None)
                if blob is not None and (blob.size or 0) > self.max_input_bytes:
                    raise ApiError(
                        3, f"The input file {uri} is {blob.size} bytes; the limit is 1 GB a file."
                    )
                data = (
                    None
                    if blob is None
                    else blob.download_as_bytes(timeout=_IO_TIMEOUT, retry=None)
                )
            except gcs_errors.NotFound:
                data = None
            except gcs_errors.Forbidden as exc:
                raise ApiError(
                    7,
                    f"Failed to import data: the Vertex AI service agent cannot read {uri}: "
                    f"{exc.message}",
                ) from exc
            except (gcs_errors.GoogleAPICallError, OSError) as exc:
                raise ApiError(13, f"Failed to import data from {uri}: {exc}") from exc
            if data is None:
                raise ApiError(
                    5, f"Failed to import data: the input file {uri} not found (or not readable)."
                )
            lines.extend(self._parse(uri, data))
        if not lines:
            raise ApiError(3, f"Failed to import data: {', '.join(uris)} holds no requests.")
        return lines

    def _parse(self, uri: str, data: bytes) -> Iterator[_Line]:
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _import_error(uri, number, f"invalid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise _import_error(uri, number, "the line is not a JSON object")
            problem = _import_problem(obj, "", 0)
            if problem is not None:
                raise _import_error(uri, number, problem)
            siblings = {k: v for k, v in obj.items() if k != "request"}
            yield _Line(uri, number, obj.get("request"), siblings, self._key_of(siblings))

    def _key_of(self, siblings: JSON) -> str | None:
        value = siblings.get(KEY_FIELD)
        if value is None:
            return None
        text = value if isinstance(value, str) else json.dumps(value)
        return text.removeprefix(KEY_PREFIX)

    def _build_predictions(self, job: _Job, lines: list[_Line]) -> None:
        total = len(lines)
        fields: dict[tuple[str, ...], set[str]] = {}
        for line in lines:
            _repeated_fields(line.request, (), False, fields)
        start_wall = job.created_wall + timedelta(seconds=job.start_at - job.created)
        predictions: list[JSON] = []
        for i, line in enumerate(lines):
            response_id = _response_id(job.id, i)
            problem = _request_problem(line.request)
            if problem is not None:
                kind, entry = "error", {"error": request_error(400, problem)}
            else:
                kind, found = self._entry(
                    _Request(line.key, line.request), job.model_id, response_id, True
                )
                entry = found or {}
            job.kinds.append(kind)
            job.keys.append(line.key)
            if kind == "missing":
                continue
            offset = job.running_seconds * (i + 1) / total + 0.001 * (i + 1)
            processed = start_wall + timedelta(seconds=offset)
            siblings = line.siblings
            if self.coerce_numeric_strings:
                siblings = {k: _coerce(v) for k, v in siblings.items()}
            prediction: JSON = dict(siblings)
            if kind == "error":
                error = entry["error"]
                prediction["status"] = f"{phrase(error['code'])}: " + json.dumps({"error": error})
                response: JSON = {}
            else:
                prediction["status"] = ""
                created = processed + timedelta(milliseconds=100 + i % 50)
                response = _vertex_response(entry["response"], job.model_id, response_id, created)
            prediction["processed_time"] = _processed_time(processed)
            prediction["request"] = _reserialize(line.request, (), False, fields)
            prediction["response"] = response
            predictions.append(prediction)
        if self.shuffle_output:
            self._rng.shuffle(predictions)
        job.lines = predictions

    def _get_job(self, call: _Call) -> Reply:
        with self._lock:
            return json_reply(self._job_json(self._vjob(call), self.clock()))

    def _list_jobs(self, call: _Call) -> Reply:
        matches = _parse_filter(call.param("filter") or "")
        with self._lock:
            now = self.clock()
            lag = self.list_lag_seconds
            listed = [
                job
                for job in reversed(self._vjobs.values())
                if now - job.created >= lag
                and all(match(job, self._state_at(job, now)[0]) for match in matches)
            ]
            page, token = _paginate(listed, call)
            items = [self._job_json(job, now) for job in page]
        return json_reply(_page_body("batchPredictionJobs", items, token))

    def _cancel_job(self, call: _Call) -> Reply:
        with self._lock:
            job = self._vjob(call)
            now = self.clock()
            state = self._state_at(job, now)[0]
            if state in FINAL_STATES:
                raise _failed_precondition(
                    f"Cannot cancel BatchPredictionJob {self._name(job)}: it is in state "
                    f"{state}, which is not cancellable."
                )
            if state != CANCELLING:
                job.force(CANCELLING, now, auto=True)
        return json_reply({})

    def _delete_job(self, call: _Call) -> Reply:
        with self._lock:
            job = self._vjob(call)
            now = self.clock()
            state = self._state_at(job, now)[0]
            if state not in FINAL_STATES:
                raise _failed_precondition(
                    f"BatchPredictionJob {self._name(job)} is in state {state}; only a job that "
                    "has ended can be deleted. Cancel it first."
                )
            del self._vjobs[job.id]
            stamp = _iso(datetime.now(timezone.utc))
            operation = str(self._rng.randrange(10**18, 10**19))
        return json_reply(
            {
                "name": f"projects/{self.project_number}/locations/{job.location}"
                f"/operations/{operation}",
                "metadata": {
                    "@type": _DELETE_METADATA_TYPE.format(call.version),
                    "genericMetadata": {"createTime": stamp, "updateTime": stamp},
                },
                "done": True,
                "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
            }
        )

    # -- a job's state over time -----------------------------------------------------------

    def _natural(self, job: _Job, at: float) -> tuple[str, float]:
        """Where the job's own timeline is at clock time `at`, and since when."""
        if at < job.created + job.queued_seconds:
            return QUEUED, job.created
        if at < job.start_at:
            return PENDING, job.created + job.queued_seconds
        if job.import_error is not None:
            return FAILED, job.start_at
        if at < job.start_at + job.running_seconds:
            return RUNNING, job.start_at
        return job.outcome, job.start_at + job.running_seconds

    def _state_at(self, job: _Job, now: float) -> tuple[str, float]:
        """The job's state and the clock time it entered that state (expiry included)."""
        deadline = math.inf if job.expire_after is None else job.created + job.expire_after
        if job.forced_state is not None:
            state, since = job.forced_state, job.forced_at
            if state == CANCELLING and job.auto_cancel:
                done = since + self.cancelling_seconds
                return (CANCELLED, done) if now >= done else (CANCELLING, since)
            if state in _EXPIRING and now >= deadline:
                return EXPIRED, max(deadline, since)
            return state, since
        if now >= deadline and self._natural(job, deadline)[0] in _EXPIRING:
            return EXPIRED, deadline
        return self._natural(job, now)

    @staticmethod
    def _started_at(job: _Job, state: str, since: float) -> float | None:
        """When the job started running (None: it never did)."""
        if state in (QUEUED, PENDING):
            return None
        if job.forced_state is not None and job.forced_at < job.start_at:
            return job.forced_at if job.forced_state in _STARTED else None
        if state == EXPIRED and since < job.start_at:
            return None
        return job.start_at

    @staticmethod
    def _done(job: _Job, at: float) -> int:
        """Requests processed by clock time `at`."""
        total = len(job.kinds)
        if at < job.start_at:
            return 0
        if job.running_seconds <= 0:
            return total
        return int(total * min(1.0, (at - job.start_at) / job.running_seconds))

    def _completion_stats(
        self, job: _Job, state: str, since: float, now: float, started: float | None
    ) -> JSON | None:
        """completionStats: string counts, zero counts left out; None before the start."""
        if started is None or job.import_error is not None or state == CANCELLED:
            return None
        total = len(job.kinds)
        if state == FAILED:
            return {"failedCount": str(total)}
        if state in _WITH_RESULTS:
            done = total
        else:
            done = self._done(job, now if state == RUNNING else since)
        kinds = job.kinds[:done]
        counts = {
            "successfulCount": kinds.count("ok") + kinds.count("missing"),
            "failedCount": kinds.count("error"),
            "incompleteCount": total - done,
        }
        return {k: str(v) for k, v in counts.items() if v}

    def _error_of(self, job: _Job, state: str) -> JSON | None:
        if state == FAILED and job.import_error is not None and job.forced_state is None:
            code, message = job.import_error
        elif state in JOB_ERRORS:
            code, message = JOB_ERRORS[state]
            message = job.error_message or message
        else:
            return None
        error: JSON = {"code": code, "message": message}
        if self.error_details:
            reason = _ERROR_REASONS.get(code, "UNKNOWN")
            error["details"] = [_error_info(reason, AIPLATFORM, {"job": self._name(job)})]
        return error

    def _job_json(self, job: _Job, now: float, *, fresh: bool = False) -> JSON:
        """The BatchPredictionJob JSON (``fresh``: as create returns it)."""
        if fresh:
            state, since = (QUEUED if job.queued_seconds > 0 else PENDING), job.created
        else:
            state, since = self._state_at(job, now)

        def wall(t: float) -> str:
            return _iso(job.created_wall + timedelta(seconds=t - job.created))

        started = None if fresh else self._started_at(job, state, since)
        out: JSON = {
            "name": self._name(job),
            "displayName": job.display_name,
            "model": job.model,
            "inputConfig": job.input_config,
            "outputConfig": job.output_config,
            "state": state,
        }
        error = self._error_of(job, state)
        if error is not None:
            out["error"] = error
        if started is not None and job.import_error is None:
            out["outputInfo"] = {"gcsOutputDirectory": job.output_dir}
        stats = self._completion_stats(job, state, since, now, started)
        if stats is not None:
            out["completionStats"] = stats
        elif self.null_completion_stats:
            out["completionStats"] = None
        out["createTime"] = wall(job.created)
        if started is not None:
            out["startTime"] = wall(started)
        if state in FINAL_STATES:
            out["endTime"] = wall(since)
        out["updateTime"] = wall(since)
        if job.labels:
            out["labels"] = dict(job.labels)
        out["modelVersionId"] = "1"
        if state in _WITH_RESULTS and job.import_error is None:
            self._write_predictions(job, since, now)
        return out

    def _write_predictions(self, job: _Job, ended: float, now: float) -> None:
        """Write the prediction files due by now: all once the lag is over, else only the
        first of several (none of one). A file that fails to write is tried again later."""
        from google.api_core import exceptions as gcs_errors

        names = job.file_names()
        due = len(names) if now >= ended + job.predictions_lag else (1 if len(names) > 1 else 0)
        if len(job.written) >= due:
            return
        bucket_name, _, folder = job.output_dir.removeprefix("gs://").partition("/")
        bucket = self._client().bucket(bucket_name)
        count, total = len(names), len(job.lines)
        for index in range(due):
            if index in job.written:
                continue
            chunk = job.lines[index * total // count : (index + 1) * total // count]
            if self.extra_fields:
                chunk = [with_unknown_fields(line) for line in chunk]
            data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in chunk)
            try:
                bucket.blob(f"{folder}/{names[index]}").upload_from_string(
                    data.encode(),
                    content_type="application/json",
                    timeout=_IO_TIMEOUT,
                    retry=None,
                )
            except (gcs_errors.GoogleAPICallError, OSError) as exc:
                log.debug("writing %s/%s failed: %s", job.output_dir, names[index], exc)
                return
            job.written.add(index)

    def _record_of(self, job: _Job, now: float) -> JSON:
        state = self._state_at(job, now)[0]
        error = self._error_of(job, state)
        names = job.file_names()
        return {
            "name": self._name(job),
            "id": job.id,
            "display_name": job.display_name,
            "model": job.model,
            "state": state,
            "labels": dict(job.labels),
            "keys": list(job.keys),
            "kinds": list(job.kinds),
            "input_uris": list(pick(pick(job.input_config, "gcsSource"), "uris") or []),
            "output_directory": job.output_dir,
            "prediction_files": [names[i] for i in sorted(job.written)],
            "outcome": job.outcome,
            "error": error["message"] if error else None,
            "create_time": _iso(job.created_wall),
        }


# -- create requests ---------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _check_model(model: Any, project: str, location: str) -> tuple[str, str]:
    if not isinstance(model, str) or not model:
        raise _field_error("batch_prediction_job.model", "Required field is not set.")
    found = _MODEL.match(model)
    if found is None or not (model.startswith(("publishers/", "projects/"))):
        raise _field_error("batch_prediction_job.model", f"Invalid model name: {model}.")
    model_id = found["id"]
    if "does-not-exist" in model_id:
        raise ApiError(
            404,
            f"Publisher Model `projects/{project}/locations/{location}/publishers/google/models/"
            f"{model_id}` not found.",
        )
    return model, model_id


def _check_format(config: Any, where: str, field: str, snake: str) -> None:
    """An input or output config is there and says `jsonl` in `field` (the only format here)."""
    if not isinstance(config, dict) or not config:
        raise _field_error(where, "Required field is not set.")
    fmt = pick(config, field)
    if not fmt:
        raise _field_error(f"{where}.{snake}", "Required field is not set.")
    if fmt != "jsonl":
        what = snake.split("_")[0]
        raise _field_error(f"{where}.{snake}", f"Unsupported {what} format {fmt!r}: use jsonl.")


def _check_input(config: Any) -> tuple[JSON, list[str]]:
    where = "batch_prediction_job.input_config"
    _check_format(config, where, "instancesFormat", "instances_format")
    uris = pick(pick(config, "gcsSource"), "uris")
    if uris is None:
        raise _field_error(f"{where}.gcs_source", "Required field is not set.")
    if not isinstance(uris, list) or not uris:
        raise _field_error(f"{where}.gcs_source.uris", "At least one input URI is required.")
    for uri in uris:
        if not isinstance(uri, str) or not _GCS_OBJECT.match(uri) or "*" in uri:
            raise _field_error(f"{where}.gcs_source.uris", f"Invalid Cloud Storage URI: {uri}.")
    return config, list(uris)


def _check_output(config: Any) -> tuple[JSON, str]:
    where = "batch_prediction_job.output_config"
    _check_format(config, where, "predictionsFormat", "predictions_format")
    prefix = pick(pick(config, "gcsDestination"), "outputUriPrefix")
    if prefix is None:
        raise _field_error(f"{where}.gcs_destination", "Required field is not set.")
    if not isinstance(prefix, str) or not _GCS_PREFIX.match(prefix):
        raise _field_error(
            f"{where}.gcs_destination.output_uri_prefix", f"Invalid Cloud Storage URI: {prefix}."
        )
    return config, prefix


def _check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise _field_error("batch_prediction_job.labels", "Labels must be a map.")
    if len(labels) > _MAX_LABELS:
        raise ApiError(
            400, f"Too many labels: {len(labels)}; a resource can have at most {_MAX_LABELS}."
        )
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ApiError(
                400,
                f"Invalid label key {key!r}: a key starts with a lowercase letter and holds at "
                "most 63 lowercase letters, digits, underscores and dashes.",
            )
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ApiError(
                400,
                f"Invalid label value {value!r} of {key!r}: a value holds at most 63 lowercase "
                "letters, digits, underscores and dashes.",
            )
    return dict(labels)


# -- the import (BigQuery's rules) -------------------------------------------------------------


def _import_error(uri: str, number: int, problem: str) -> ApiError:
    return ApiError(3, f"Failed to import data from {uri}: line {number}: {problem}.")


def _import_problem(value: Any, path: str, depth: int) -> str | None:
    """Why BigQuery would not import a line: an empty object, nesting deeper than
    `MAX_NESTING` objects below the line's own, a field name that is not a column name, an
    array inside an array or a null in an array."""
    if isinstance(value, dict):
        if not value:
            return f"an empty object ({{}}) at {path or 'the top level'} cannot be imported"
        if depth > MAX_NESTING:
            return f"objects are nested deeper than {MAX_NESTING} levels (at {path})"
        for key, item in value.items():
            if not _FIELD_NAME.fullmatch(key):
                return (
                    f'invalid field name "{key}": fields must contain only letters, numbers '
                    "and underscores, start with a letter or underscore, and be at most 300 "
                    "characters long"
                )
            problem = _import_problem(item, f"{path}.{key}" if path else key, depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            if isinstance(item, list):
                return f"nested arrays are not allowed (at {where})"
            if item is None:
                return f"an array cannot hold null (at {where})"
            problem = _import_problem(item, where, depth)
            if problem is not None:
                return problem
    return None


# -- predictions -------------------------------------------------------------------------------


def _request_problem(request: Any) -> str | None:
    """The 400 that Vertex gives a request it cannot run, or None."""
    if not isinstance(request, dict):
        return "The request field is missing or is not a GenerateContentRequest object."
    contents = pick(request, "contents")
    if not isinstance(contents, list) or not contents:
        return "Unable to submit request because it has an empty contents field."
    for content in contents:
        if not isinstance(content, dict) or not pick(content, "parts"):
            return "Unable to submit request because at least one contents field is empty."
        role = pick(content, "role")
        if role is not None and role not in _ROLES:
            return "Please use a valid role: user, model."
    return None


def _repeated_fields(
    value: Any, path: tuple[str, ...], repeated: bool, out: dict[tuple[str, ...], set[str]]
) -> None:
    """The fields of objects inside arrays, by schema path, over all requests of a job."""
    if isinstance(value, dict):
        if repeated:
            out.setdefault(path, set()).update(value)
        for key, item in value.items():
            _repeated_fields(item, (*path, key), repeated, out)
    elif isinstance(value, list):
        for item in value:
            _repeated_fields(item, (*path, "[]"), True, out)


def _reserialize(
    value: Any, path: tuple[str, ...], repeated: bool, fields: dict[tuple[str, ...], set[str]]
) -> Any:
    """The request as Vertex echoes it: keys sorted, integral floats as integers, and null
    for the fields that other objects of the same array field have (a table's schema)."""
    if isinstance(value, dict):
        keys = set(value) | (fields.get(path, set()) if repeated else set())
        return {
            key: _reserialize(value[key], (*path, key), repeated, fields) if key in value else None
            for key in sorted(keys)
        }
    if isinstance(value, list):
        return [_reserialize(item, (*path, "[]"), True, fields) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _coerce(value: Any) -> Any:
    """A string that looks like a number becomes that number (BigQuery's type inference)."""
    if isinstance(value, dict):
        return {key: _coerce(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_coerce(item) for item in value]
    if not isinstance(value, str) or not _NUMERIC.fullmatch(value):
        return value
    if _INTEGER.fullmatch(value):
        number = int(value)
        return number if -(2**63) <= number < 2**63 else value
    real = float(value)
    return real if math.isfinite(real) else value


def _vertex_response(response: JSON, model_id: str, response_id: str, created: datetime) -> JSON:
    """The simulated GenerateContentResponse in Vertex's shape, keys sorted."""
    out = json.loads(json.dumps(response))
    for number, candidate in enumerate(out.get("candidates") or []):
        candidate.pop("index", None)
        if (candidate.get("content") or {}).get("parts"):
            digest = hashlib.sha256(f"{response_id}/{number}".encode()).digest()
            candidate["avgLogprobs"] = -(0.05 + int.from_bytes(digest[:4], "big") / 2**32)
    usage = out.setdefault("usageMetadata", {})
    usage.pop("serviceTier", None)
    if usage.get("candidatesTokenCount"):
        usage["candidatesTokensDetails"] = [
            {"modality": "TEXT", "tokenCount": usage["candidatesTokenCount"]}
        ]
    usage["trafficType"] = "ON_DEMAND"
    out["createTime"] = _iso(created)
    out["modelVersion"] = model_id
    out["responseId"] = response_id
    shaped: JSON = _sorted(out)
    return shaped


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def _response_id(job_id: str, index: int) -> str:
    digest = hashlib.sha256(f"{job_id}/{index}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:23]


def _processed_time(when: datetime) -> str:
    """``2025-07-09T19:57:43.558+00:00``: milliseconds and an offset, as predictions carry."""
    when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+00:00"


# -- listing filters ---------------------------------------------------------------------------

_TERM = re.compile(
    r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)?)\s*(?P<op>!=|=|:)\s*"
    r'(?P<value>"(?:[^"\\]|\\.)*"|[^\s"]+)$'
)
_AND = re.compile(r'\s+AND\s+(?=(?:[^"]*"[^"]*")*[^"]*$)')

Match = Callable[[_Job, str], bool]


def _parse_filter(text: str) -> list[Match]:
    """AIP-160 filters that batchPredictionJobs.list documents, joined with AND:
    ``display_name`` (or ``displayName``) ``=``, ``!=``, ``:"prefix*"``; ``state`` ``=``,
    ``!=``; ``labels.KEY`` ``=``, ``!=``, ``:*``."""
    if not text.strip():
        return []
    return [_term(term.strip(), text) for term in _AND.split(text.strip())]


def _term(term: str, text: str) -> Match:
    found = _TERM.match(term)
    if found is None:
        raise ApiError(400, f"Unsupported filter: {text!r} (at {term!r}).")
    name, op, raw = found["field"], found["op"], found["value"]
    value = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
    negate = op == "!="
    if name in ("display_name", "displayName"):
        if op == ":" and value.endswith("*") and "*" not in value[:-1]:
            prefix = value[:-1]
            return lambda job, _state: job.display_name.startswith(prefix)
        if "*" in value:
            raise ApiError(400, f"Unsupported filter: {text!r} (a wildcard ends a ':' term).")
        return lambda job, _state: (job.display_name == value) != negate
    if name == "state" and op != ":":
        if value not in ALL_STATES:
            raise ApiError(400, f"Invalid filter: {text!r}: unknown state {value!r}.")
        return lambda _job, state: (state == value) != negate
    if name.startswith("labels."):
        key = name.removeprefix("labels.")
        if op == ":":
            if value != "*":
                raise ApiError(400, f"Unsupported filter: {text!r} (labels.KEY:* only).")
            return lambda job, _state: key in job.labels
        return lambda job, _state: (job.labels.get(key) == value) != negate
    raise ApiError(400, f"Unsupported filter: {text!r} (at {term!r}).")


# -- replies -----------------------------------------------------------------------------------


def _oauth_error(error: str, description: str) -> Reply:
    """The token endpoint's error body (RFC 6749), not Google's API error body."""
    return json_reply({"error": error, "error_description": description}, 400)


def _state_name(state: str) -> str:
    name = "JOB_STATE_" + state.upper().removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")
    if name not in ALL_STATES:
        raise ValueError(f"unknown job state {state!r}")
    return name


def _final_state(outcome: str | None) -> str:
    """The job state an ``outcome`` knob names (SUCCEEDED when None)."""
    state = _state_name(outcome or "SUCCEEDED")
    if state not in FINAL_STATES:
        raise ValueError(f"outcome {outcome!r} is not a final state")
    return state
