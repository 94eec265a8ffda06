"""A loopback simulator of the Gemini Batch API, speaking Google's REST protocol.

The real google-genai SDK works against it unchanged (``HttpOptions(base_url=sim.base_url)``),
so the daemon and its tests exercise the same code paths as in production, offline. This
module owns the API state (jobs, files, keys, quota) and the routes; `simwire` owns replies,
faults and the HTTP server, `simanswers` what the model answers to each request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .answers import (
    estimate_tokens,
    pick,
    prompt_text,
    request_error,
    simulate_response,
)
from .wire import (
    NO_KEY_MESSAGE,
    ApiError,
    Fault,
    Reply,
    ReplyServer,
    error_reply,
    json_reply,
    key_error,
    take_fault,
    with_unknown_fields,
)

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations only

__all__ = [
    "ApiError",
    "Fault",
    "Simulator",
    "estimate_tokens",
    "simulate_response",
]

JSON = dict[str, Any]

log = logging.getLogger(__name__)

PENDING = "BATCH_STATE_PENDING"
RUNNING = "BATCH_STATE_RUNNING"
SUCCEEDED = "BATCH_STATE_SUCCEEDED"
FAILED = "BATCH_STATE_FAILED"
CANCELLED = "BATCH_STATE_CANCELLED"
EXPIRED = "BATCH_STATE_EXPIRED"
ACTIVE_STATES = frozenset({PENDING, RUNNING})
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
ALL_STATES = ACTIVE_STATES | FINAL_STATES

JOB_ERRORS = {
    FAILED: (13, "The batch job failed (simulated)."),
    CANCELLED: (1, "The batch job was cancelled."),
    EXPIRED: (4, "The batch job expired: it did not complete within 48 hours of its creation."),
}
"""The operation's ``error`` (google.rpc code, message) of each unsuccessful final state."""
_QUOTA_CODE = 8  # google.rpc.Code RESOURCE_EXHAUSTED, in an operation's error
QUOTA_MODES = ("refuse", "fail")

_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_PATH = re.compile(r"^/(?:(upload|download)/)?(v1beta|v1alpha|v1)/(.+)$")
_UPLOAD_GRANULARITY = 8 * 1024 * 1024
_FILE_TTL = timedelta(hours=48)
_DEFAULT_PAGE_SIZE = 50
_RATE_LIMITS_URL = "https://ai.google.dev/gemini-api/docs/rate-limits#batch-api"


@dataclass
class KeyRejection:
    """A window of the simulator's clock in which every keyed call gets a key error."""

    status: int
    start: float
    end: float | None
    message: str | None = None

    def covers(self, now: float) -> bool:
        """Whether the window is open at clock time `now` (start included, end excluded)."""
        return self.start <= now and (self.end is None or now < self.end)


@dataclass
class _Request:
    """One request of a batch: its key, the GenerateContentRequest, the inline metadata."""

    key: str | None
    request: JSON
    metadata: JSON | None = None


@dataclass
class _StoredFile:
    name: str
    display_name: str | None
    mime_type: str
    data: bytes
    created: datetime
    source: str  # UPLOADED | GENERATED


@dataclass
class _Job:
    id: str
    display_name: str
    model: str
    requests: list[_Request]
    input_file: str | None
    created: float  # injected clock
    created_wall: datetime
    pending_seconds: float
    running_seconds: float
    outcome: str
    entries: list[tuple[_Request, JSON]]  # output order; missing requests left out
    kinds: list[str]  # per input request: ok | error | missing
    tokens: int = 0  # the enqueued-token estimate
    expire_after: float | None = None
    forced_state: str | None = None
    forced_at: float = 0.0
    error_code: int | None = None  # overrides JOB_ERRORS for its final state
    error_message: str | None = None

    @property
    def name(self) -> str:
        return f"batches/{self.id}"

    def force(
        self, state: str, at: float, code: int | None = None, message: str | None = None
    ) -> None:
        """End (or move) the job by hand; `code` and `message` replace its state's usual error."""
        self.forced_state, self.forced_at = state, at
        self.error_code, self.error_message = code, message

    @property
    def output_file(self) -> str:
        return f"files/batch-{self.id}"


@dataclass
class _Upload:
    file: _StoredFile
    size: int | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Call:
    """A parsed HTTP request as the route handlers see it."""

    method: str
    path: str
    version: str
    args: tuple[str, ...]
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> JSON:
        if not self.body.strip():
            return {}
        try:
            obj = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"Invalid JSON payload received. {exc}") from exc
        if not isinstance(obj, dict):
            raise ApiError(400, "Invalid JSON payload received. Expected an object.")
        return obj


Route = Callable[[_Call], Reply]


class Simulator:
    """An in-process Gemini Batch API on a loopback port, with knobs for tests.

    State is computed lazily from the injected clock, so tests need no sleeps and no
    background threads run besides the HTTP server. Every knob is also a plain attribute
    that a test may change while the simulator runs:

    - ``pending_seconds``, ``running_seconds``: each new job's timing.
    - ``outcome``: the final state of new jobs (SUCCEEDED when None).
    - ``shuffle_output``: entries in a seeded random order instead of input order.
    - ``api_key``: the only key accepted (any key when None).
    - ``fail_keys``: key -> error code, on every submission of that key.
    - ``missing_keys``: keys whose entry is left out of every job.
    - ``fail_keys_times``: key -> (code, n): fail the first n submissions of that key
      (counted across jobs), answer it after that.
    - ``missing_keys_times``: key -> n: leave out the first n submissions' entries.
    - ``list_lag_seconds``: a new job appears in ``batches.list`` only this long after its
      creation; GET by name works at once.
    - ``expire_after_seconds``: a job still pending or running this long after its creation
      becomes EXPIRED (no results; the operation's ``error`` says why).
    - ``enqueued_token_limit``, ``quota_mode``: the enqueued-token quota (see `_admit`).
    - ``extra_fields``: unknown fields in every object of every JSON reply and result line.
    - ``echo_metadata``: False leaves ``metadata`` out of inline responses.
    - ``errors_as_status``: result lines carry a failed request's error as ``"status"``.
    - ``inline_results_in_file``: inline jobs answer through a responses file too.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        pending_seconds: float = 0.0,
        running_seconds: float = 0.0,
        seed: int = 0,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        outcome: str | None = None,
        shuffle_output: bool = False,
        fail_keys: dict[str, int] | None = None,
        missing_keys: set[str] | None = None,
        fail_keys_times: dict[str, tuple[int, int]] | None = None,
        missing_keys_times: dict[str, int] | None = None,
        list_lag_seconds: float = 0.0,
        expire_after_seconds: float | None = None,
        enqueued_token_limit: int | None = None,
        quota_mode: str = "refuse",
        extra_fields: bool = False,
        echo_metadata: bool = True,
        errors_as_status: bool = False,
        inline_results_in_file: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.pending_seconds = pending_seconds
        self.running_seconds = running_seconds
        self.outcome = outcome
        self.shuffle_output = shuffle_output
        self.api_key = api_key
        self.fail_keys: dict[str, int] = dict(fail_keys or {})
        self.missing_keys: set[str] = set(missing_keys or ())
        self.fail_keys_times: dict[str, tuple[int, int]] = dict(fail_keys_times or {})
        self.missing_keys_times: dict[str, int] = dict(missing_keys_times or {})
        self.list_lag_seconds = list_lag_seconds
        self.expire_after_seconds = expire_after_seconds
        self.enqueued_token_limit = enqueued_token_limit
        self.quota_mode = quota_mode
        self.extra_fields = extra_fields
        self.echo_metadata = echo_metadata
        self.errors_as_status = errors_as_status
        self.inline_results_in_file = inline_results_in_file
        self.clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, _StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}
        self._faults: list[Fault] = []
        self._rejections: list[KeyRejection] = []
        self._log: list[tuple[str, str, int]] = []
        self._created_by_name: dict[str, int] = {}
        self._submissions: Counter[str] = Counter()
        self._peak_enqueued = 0
        self._create_calls = 0
        self._server: ReplyServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("POST", re.compile(r"models/([^/:]+):batchGenerateContent"), self._create),
            ("GET", re.compile(r"batches"), self._list_batches),
            ("GET", re.compile(r"batches/([^/:]+)"), self._get_batch),
            ("DELETE", re.compile(r"batches/([^/:]+)"), self._delete_batch),
            ("POST", re.compile(r"batches/([^/:]+):cancel"), self._cancel_batch),
            ("POST", re.compile(r"files"), self._upload),
            ("GET", re.compile(r"files"), self._list_files),
            ("GET", re.compile(r"files/([^/:]+)"), self._get_file),
            ("DELETE", re.compile(r"files/([^/:]+)"), self._delete_file),
            ("GET", re.compile(r"files/([^/:]+):download"), self._download),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Serve in a daemon thread; after a stop() it comes back on the same port and state."""
        if self._server is not None:
            return self
        self._server = ReplyServer((self.host, self.port), self.handle)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
            name=f"gemini-sim:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut keep-alive connections, as an outage would."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``, without a trailing slash or version."""
        if not self.port:
            raise RuntimeError("the simulator has not been started")
        return f"http://{self.host}:{self.port}"

    # -- knobs and observation -------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; faults are matched in the order they were added."""
        with self._lock:
            self._faults.append(fault)

    def reject_key(
        self,
        status: int = 400,
        *,
        start: float | None = None,
        end: float | None = None,
        seconds: float | None = None,
        message: str | None = None,
    ) -> KeyRejection:
        """Answer every keyed call with a key error from `start` (default now) until `end`.

        On the simulator's clock; `seconds` sets ``end = start + seconds``; no end means until
        `accept_key`. 400 is Google's INVALID_ARGUMENT / API_KEY_INVALID ("API key not valid.
        Please pass a valid API key."), 401 UNAUTHENTICATED, 403 PERMISSION_DENIED.
        """
        key_error(status)  # checks the status
        with self._lock:
            begin = self.clock() if start is None else start
            if seconds is not None:
                end = begin + seconds
            rejection = KeyRejection(status, begin, end, message)
            self._rejections.append(rejection)
        return rejection

    def accept_key(self) -> None:
        """End every key rejection window (a key fixed by the operator)."""
        with self._lock:
            self._rejections.clear()

    @property
    def jobs(self) -> dict[str, JSON]:
        """A snapshot of every job: name -> record with its current state."""
        with self._lock:
            now = self.clock()
            return {name: self._record(job, now) for name, job in self._jobs.items()}

    @property
    def create_calls(self) -> int:
        """Create requests received, faulted and refused ones included."""
        with self._lock:
            return self._create_calls

    @property
    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of every request; status 0: connection dropped."""
        with self._lock:
            return list(self._log)

    @property
    def uploaded_files(self) -> dict[str, bytes]:
        with self._lock:
            return {n: f.data for n, f in self._files.items() if f.source == "UPLOADED"}

    @property
    def files(self) -> dict[str, bytes]:
        """Every stored file, uploads and generated responses files alike."""
        with self._lock:
            return {n: f.data for n, f in self._files.items()}

    @property
    def key_submissions(self) -> dict[str, int]:
        """How many created jobs carried each request key (what the ``*_times`` knobs count)."""
        with self._lock:
            return dict(self._submissions)

    @property
    def enqueued_tokens(self) -> int:
        """Estimated tokens of the jobs pending or running now (see `estimate_tokens`)."""
        with self._lock:
            return self._enqueued(self.clock())

    @property
    def peak_enqueued_tokens(self) -> int:
        """The most estimated tokens ever pending or running at once."""
        with self._lock:
            return self._peak_enqueued

    def jobs_created_for(self, display_name: str) -> int:
        """Jobs ever created with this display name (deleted ones included)."""
        with self._lock:
            return self._created_by_name.get(display_name, 0)

    def set_job_state(self, name: str, state: str, message: str | None = None) -> None:
        """Force a job's state; FAILED, CANCELLED and EXPIRED jobs carry ``message`` as error."""
        state = "BATCH_STATE_" + state.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
        if state not in ALL_STATES:
            raise ValueError(f"unknown batch state {state!r}")
        with self._lock:
            self._jobs[name].force(state, self.clock(), message=message)

    def forget_job(self, name: str) -> None:
        """Drop a job without an API call: later GETs answer 404."""
        with self._lock:
            self._jobs.pop(name, None)

    # -- request handling ------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Reply | None:
        """Answer one HTTP request; None means drop the connection."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        route, call = self._resolve(method, path, url.query, headers, body)
        with self._lock:
            if route == self._create:
                self._create_calls += 1
            fault = take_fault(self._faults, method, raw_path)
            extra = self.extra_fields
        reply: Reply | None
        if fault is None:
            reply = self._run(route, call).serialise(extra)
        elif fault.does_work:
            reply = fault.shape(self._run(route, call).serialise(extra), extra)
        else:
            reply = fault.shape(None, extra)
        with self._lock:
            self._log.append((method, raw_path, reply.status if reply else 0))
        return reply

    def _resolve(
        self, method: str, path: str, query: str, headers: Message, body: bytes
    ) -> tuple[Route | None, _Call]:
        m = _PATH.match(path)
        rest, version = (m.group(3), m.group(2)) if m else ("", "")
        call = _Call(method, path, version, (), parse_qs(query), headers, body)
        for route_method, pattern, route in self._routes:
            found = pattern.fullmatch(rest) if m else None
            if found and route_method == method:
                call.args = found.groups()
                return route, call
        return None, call

    def _run(self, route: Route | None, call: _Call) -> Reply:
        try:
            if route is None:
                raise ApiError(404, f"Method not found: {call.method} {call.path}")
            if not (route == self._upload and call.param("upload_id")):
                self._check_key(call)
            return route(call)
        except ApiError as exc:
            return exc.reply()
        except Exception as exc:  # a simulator bug must still answer like a server
            log.exception("simulator handler failed")
            return error_reply(500, f"Internal error in the simulator: {exc}")

    def _check_key(self, call: _Call) -> None:
        key = call.headers.get("x-goog-api-key") or call.param("key")
        if not key:
            raise ApiError(403, NO_KEY_MESSAGE)
        with self._lock:
            now = self.clock()
            rejection = next((r for r in self._rejections if r.covers(now)), None)
        if rejection is not None:
            raise key_error(rejection.status, rejection.message)
        if self.api_key is not None and key != self.api_key:
            raise key_error(400)

    # -- batches ---------------------------------------------------------------------------

    def _create(self, call: _Call) -> Reply:
        model = f"models/{call.args[0]}"
        if "does-not-exist" in model:
            raise ApiError(
                404,
                f"{model} is not found for API version {call.version}, or is not supported "
                "for batchGenerateContent. Call ListModels to see the list of available models.",
            )
        batch = call.json().get("batch")
        if not isinstance(batch, dict):
            raise ApiError(400, "Invalid value at 'batch': a batch is required.")
        config = pick(batch, "inputConfig")
        inline = pick(config, "requests")
        file_name = pick(config, "fileName")
        if (inline is None) == (file_name is None):
            raise ApiError(400, "batch.input_config must set exactly one of requests, file_name.")
        if inline is not None:
            requests = self._inline_requests(inline)
        else:
            requests = self._file_requests(str(file_name))
        for i, req in enumerate(requests):
            contents = pick(req.request, "contents")
            if not contents or not isinstance(contents, list | str):
                raise ApiError(400, f"requests[{i}]: GenerateContentRequest.contents is required.")
        display_name = str(pick(batch, "displayName") or "")
        with self._lock:
            now = self.clock()
            tokens = sum(estimate_tokens(req.request) for req in requests)
            quota_error = self._admit(model, tokens, now)
            job = self._new_job(
                display_name, model, requests, None if inline else file_name, tokens, quota_error
            )
            self._peak_enqueued = max(self._peak_enqueued, self._enqueued(now))
            return json_reply(self._operation(job, call.version, now, fresh=True))

    def _admit(self, model: str, tokens: int, now: float) -> str | None:
        """The enqueued-token quota: None if a new job of `tokens` fits, else the error message.

        The budget is ``enqueued_token_limit`` estimated tokens (`estimate_tokens`: characters
        of the prompt and system texts / 4) over all pending and running jobs; it frees as jobs
        end. Over it, ``quota_mode`` "refuse" answers the create with 429 RESOURCE_EXHAUSTED;
        "fail" creates the job, which then FAILS with the same message.
        """
        limit = self.enqueued_token_limit
        if limit is None:
            return None
        enqueued = self._enqueued(now)
        if enqueued + tokens <= limit:
            return None
        message = (
            f"Enqueued token quota exceeded for model {model.removeprefix('models/')}: "
            f"{enqueued} tokens are enqueued and this batch adds about {tokens}; the limit is "
            f"{limit}. Retry when running batch jobs have finished. For more information on "
            f"this error, head to: {_RATE_LIMITS_URL}"
        )
        if self.quota_mode == "fail":
            return message
        if self.quota_mode != "refuse":
            raise ApiError(
                500, f"simulator quota_mode {self.quota_mode!r} is not one of {QUOTA_MODES}"
            )
        violation = {
            "quotaMetric": "generativelanguage.googleapis.com/batch_enqueued_tokens",
            "quotaId": "BatchEnqueuedTokensPerModel",
            "quotaDimensions": {"model": model.removeprefix("models/")},
            "quotaValue": str(limit),
        }
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [violation],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {"description": "Learn more about Gemini API quotas", "url": _RATE_LIMITS_URL}
                ],
            },
        ]
        raise ApiError(429, message, details=details)

    def _enqueued(self, now: float) -> int:
        return sum(j.tokens for j in self._jobs.values() if self._state(j, now)[0] in ACTIVE_STATES)

    @staticmethod
    def _inline_requests(inline: Any) -> list[_Request]:
        items = pick(inline, "requests")
        if not isinstance(items, list) or not items:
            raise ApiError(400, "batch.input_config.requests.requests must not be empty.")
        out: list[_Request] = []
        for i, item in enumerate(items):
            request = pick(item, "request")
            if not isinstance(request, dict):
                raise ApiError(400, f"requests[{i}].request is required.")
            metadata = pick(item, "metadata")
            key = pick(metadata, "key")
            meta = metadata if isinstance(metadata, dict) else None
            out.append(_Request(None if key is None else str(key), request, meta))
        return out

    def _file_requests(self, file_name: str) -> list[_Request]:
        with self._lock:
            stored = self._files.get(file_name)
        if stored is None:
            raise ApiError(400, f"Input file {file_name} was not found or is not accessible.")
        out: list[_Request] = []
        for number, line in enumerate(stored.data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"{file_name} line {number}: invalid JSON ({exc}).") from exc
            request = pick(item, "request")
            if not isinstance(request, dict):
                raise ApiError(400, f"{file_name} line {number}: a 'request' object is required.")
            key = item.get("key")
            out.append(_Request(None if key is None else str(key), request))
        if not out:
            raise ApiError(400, f"Input file {file_name} holds no requests.")
        return out

    def _new_job(
        self,
        display_name: str,
        model: str,
        requests: list[_Request],
        input_file: str | None,
        tokens: int,
        quota_error: str | None,
    ) -> _Job:
        """Register a job, fixing its timing, outcome and per-request output now."""
        job_id = uuid.uuid4().hex[:24]
        entries: list[tuple[_Request, JSON]] = []
        kinds: list[str] = []
        for i, req in enumerate(requests):
            kind, entry = self._entry(req, model, f"sim-{job_id[:8]}-{i}", quota_error is None)
            kinds.append(kind)
            if entry is not None:
                entries.append((req, entry))
        if self.shuffle_output:
            self._rng.shuffle(entries)
        outcome = SUCCEEDED
        if self.outcome:
            outcome = "BATCH_STATE_" + self.outcome.upper().removeprefix("BATCH_STATE_")
            if outcome not in FINAL_STATES:
                raise ApiError(500, f"simulator outcome {self.outcome!r} is not a final state")
        now = self.clock()
        job = _Job(
            id=job_id,
            display_name=display_name,
            model=model,
            requests=requests,
            input_file=input_file,
            created=now,
            created_wall=datetime.now(timezone.utc),
            pending_seconds=self.pending_seconds,
            running_seconds=self.running_seconds,
            outcome=outcome,
            entries=entries,
            kinds=kinds,
            tokens=tokens,
            expire_after=self.expire_after_seconds,
        )
        if quota_error is not None:
            job.force(FAILED, now, _QUOTA_CODE, quota_error)
        self._jobs[job.name] = job
        self._created_by_name[display_name] = self._created_by_name.get(display_name, 0) + 1
        return job

    def _entry(
        self, req: _Request, model: str, response_id: str, runs: bool
    ) -> tuple[str, JSON | None]:
        """One request's kind (ok | error | missing) and output entry (None when missing).

        `runs` is False for a job the quota fails: its requests do not count as submitted.
        """
        key = req.key or ""
        seen = self._submissions[key]
        if runs and req.key is not None:
            self._submissions[key] += 1
        if (
            key in self.missing_keys
            or "[[sim:missing]]" in prompt_text(req.request)
            or seen < self.missing_keys_times.get(key, 0)
        ):
            return "missing", None
        code: int | None = self.fail_keys.get(key)
        if code is None and key in self.fail_keys_times:
            times_code, times = self.fail_keys_times[key]
            code = times_code if seen < times else None
        if code is not None:
            entry: JSON = {"error": request_error(code, f"Simulated failure of {key!r}.")}
        else:
            entry = simulate_response(req.request, model, response_id)
        return ("error" if "error" in entry else "ok"), entry

    def _job(self, call: _Call) -> _Job:
        job = self._jobs.get(f"batches/{call.args[0]}")
        if job is None:
            raise ApiError(404, "Requested entity was not found.")
        return job

    def _get_batch(self, call: _Call) -> Reply:
        with self._lock:
            return json_reply(self._operation(self._job(call), call.version, self.clock()))

    def _list_batches(self, call: _Call) -> Reply:
        with self._lock:
            now = self.clock()
            lag = self.list_lag_seconds
            jobs = [j for j in reversed(self._jobs.values()) if now - j.created >= lag]
            page, token = _paginate(jobs, call)
            ops = [self._operation(job, call.version, now, listing=True) for job in page]
        return json_reply(_page_body("operations", ops, token))

    def _cancel_batch(self, call: _Call) -> Reply:
        with self._lock:
            job = self._job(call)
            now = self.clock()
            if self._state(job, now)[0] not in FINAL_STATES:
                job.force(CANCELLED, now)
        return json_reply({})

    def _delete_batch(self, call: _Call) -> Reply:
        with self._lock:
            del self._jobs[self._job(call).name]
        return json_reply({})

    @staticmethod
    def _natural_state(job: _Job, at: float) -> tuple[str, float]:
        """Where the job's own timeline is at clock time `at`, and since when."""
        elapsed = at - job.created
        if elapsed < job.pending_seconds:
            return PENDING, job.created
        started = job.created + job.pending_seconds
        if elapsed < job.pending_seconds + job.running_seconds:
            return RUNNING, started
        return job.outcome, started + job.running_seconds

    @classmethod
    def _state(cls, job: _Job, now: float) -> tuple[str, float]:
        """The job's state and the clock time it entered that state (expiry included)."""
        deadline = math.inf if job.expire_after is None else job.created + job.expire_after
        if job.forced_state is not None:
            state, since = job.forced_state, job.forced_at
            if state in ACTIVE_STATES and now >= deadline:
                return EXPIRED, max(deadline, since)
            return state, since
        if now >= deadline and cls._natural_state(job, deadline)[0] in ACTIVE_STATES:
            return EXPIRED, deadline
        return cls._natural_state(job, now)

    def _stats(self, job: _Job, state: str, since: float, now: float) -> JSON:
        total = len(job.requests)
        if state == RUNNING and job.running_seconds > 0:
            done = int(total * min(1.0, (now - since) / job.running_seconds))
        else:
            done = total if state == SUCCEEDED else 0
        kinds = job.kinds[:done]
        counts = {
            "requestCount": total,
            "successfulRequestCount": kinds.count("ok"),
            "failedRequestCount": total if state == FAILED else kinds.count("error"),
            "pendingRequestCount": total - done if state in ACTIVE_STATES else 0,
        }
        return {k: str(v) for k, v in counts.items() if v}

    @staticmethod
    def _job_error(job: _Job, state: str) -> JSON | None:
        """The operation's ``error`` for an unsuccessful final state."""
        if state not in JOB_ERRORS:
            return None
        code, message = JOB_ERRORS[state]
        return {"code": job.error_code or code, "message": job.error_message or message}

    def _operation(
        self, job: _Job, version: str, now: float, *, fresh: bool = False, listing: bool = False
    ) -> JSON:
        """The Operation JSON for a job (``fresh``: as create returns it, still pending)."""
        state, since = (PENDING, job.created) if fresh else self._state(job, now)

        def wall(t: float) -> str:
            return _iso(job.created_wall + timedelta(seconds=t - job.created))

        meta: JSON = {
            "@type": _BATCH_TYPE,
            "name": job.name,
            "model": job.model,
            "displayName": job.display_name,
            "createTime": wall(job.created),
            "updateTime": wall(since),
            "state": state,
            "batchStats": self._stats(job, state, since, now),
        }
        if not job.display_name:
            del meta["displayName"]
        if job.input_file is not None:
            meta["inputConfig"] = {"fileName": job.input_file}
        op: JSON = {"name": job.name, "metadata": meta}
        if state not in FINAL_STATES:
            return op
        meta["endTime"] = wall(since)
        op["done"] = True
        error = self._job_error(job, state)
        if error is not None:
            op["error"] = error
            return op
        output: JSON
        if job.input_file is not None or self.inline_results_in_file:
            self._ensure_output_file(job, wall(since))
            output = {"responsesFile": job.output_file}
        elif listing:
            return op
        else:
            entries = [self._inline_entry(req, entry) for req, entry in job.entries]
            output = {"inlinedResponses": {"inlinedResponses": entries} if entries else {}}
        meta["output"] = output
        op["response"] = {"@type": _OUTPUT_TYPE, **output}
        return op

    def _inline_entry(self, req: _Request, entry: JSON) -> JSON:
        if req.metadata is None or not self.echo_metadata:
            return dict(entry)
        return {**entry, "metadata": req.metadata}

    def _ensure_output_file(self, job: _Job, end_time: str) -> None:
        if job.output_file in self._files:
            return
        lines = []
        for req, entry in job.entries:
            line: JSON = {"key": req.key} if req.key is not None else {}
            if "error" in entry and self.errors_as_status:
                line["status"] = entry["error"]
            else:
                line.update(entry)
            if self.extra_fields:
                line = with_unknown_fields(line)
            lines.append(json.dumps(line, separators=(",", ":")) + "\n")
        self._files[job.output_file] = _StoredFile(
            name=job.output_file,
            display_name=f"{job.name} responses",
            mime_type="application/jsonl",
            data="".join(lines).encode(),
            created=datetime.fromisoformat(end_time.replace("Z", "+00:00")),
            source="GENERATED",
        )

    def _record(self, job: _Job, now: float) -> JSON:
        state = self._state(job, now)[0]
        error = self._job_error(job, state)
        return {
            "name": job.name,
            "display_name": job.display_name,
            "model": job.model,
            "state": state,
            "requests": [{"key": r.key, "request": r.request} for r in job.requests],
            "input_file": job.input_file,
            "output_file": (
                job.output_file if job.input_file or self.inline_results_in_file else None
            ),
            "outcome": job.outcome,
            "error": error["message"] if error else None,
            "create_time": _iso(job.created_wall),
            "tokens": job.tokens,
        }

    # -- files -----------------------------------------------------------------------------

    def _file_json(self, stored: _StoredFile, version: str) -> JSON:
        file_id = stored.name.removeprefix("files/")
        out: JSON = {
            "name": stored.name,
            "displayName": stored.display_name,
            "mimeType": stored.mime_type,
            "sizeBytes": str(len(stored.data)),
            "createTime": _iso(stored.created),
            "updateTime": _iso(stored.created),
            "expirationTime": _iso(stored.created + _FILE_TTL),
            "sha256Hash": base64.b64encode(
                hashlib.sha256(stored.data).hexdigest().encode()
            ).decode(),
            "uri": f"{self.base_url}/{version}/{stored.name}",
            "state": "ACTIVE",
            "source": stored.source,
        }
        if stored.source == "GENERATED":
            out["downloadUri"] = (
                f"{self.base_url}/download/{version}/files/{file_id}:download?alt=media"
            )
        if not stored.display_name:
            del out["displayName"]
        return out

    def _stored(self, call: _Call) -> _StoredFile:
        name = f"files/{call.args[0]}"
        stored = self._files.get(name)
        if stored is None and name.startswith("files/batch-"):
            job = self._jobs.get("batches/" + name.removeprefix("files/batch-"))
            if job is not None and job.input_file is not None:
                self._operation(job, call.version, self.clock())  # materialises when finished
                stored = self._files.get(name)
        if stored is None:
            # What the real API answers for an unknown or deleted file (python-genai #1218).
            raise ApiError(
                403,
                f"You do not have permission to access the File {call.args[0]} "
                "or it may not exist.",
            )
        return stored

    def _list_files(self, call: _Call) -> Reply:
        """files.list: uploaded files, newest first (generated responses files are not listed)."""
        with self._lock:
            uploaded = [f for f in reversed(self._files.values()) if f.source == "UPLOADED"]
            page, token = _paginate(uploaded, call)
            items = [self._file_json(stored, call.version) for stored in page]
        return json_reply(_page_body("files", items, token))

    def _get_file(self, call: _Call) -> Reply:
        with self._lock:
            return json_reply(self._file_json(self._stored(call), call.version))

    def _delete_file(self, call: _Call) -> Reply:
        with self._lock:
            del self._files[self._stored(call).name]
        return json_reply({})

    def _download(self, call: _Call) -> Reply:
        with self._lock:
            data = self._stored(call).data
        return Reply(200, data, content_type="application/octet-stream")

    def _upload(self, call: _Call) -> Reply:
        """The resumable protocol: a ``start`` call, then chunks posted to the upload URL."""
        upload_id = call.param("upload_id")
        command = {
            c.strip().lower() for c in (call.headers.get("X-Goog-Upload-Command") or "").split(",")
        }
        if upload_id is None:
            if "start" not in command:
                raise ApiError(
                    400, "Only resumable uploads are supported (X-Goog-Upload-Command: start)."
                )
            return self._start_upload(call)
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise ApiError(404, f"Upload session {upload_id} not found.")
            received = len(upload.data)
            offset = call.headers.get("X-Goog-Upload-Offset")
            if offset is None or not offset.isdigit() or int(offset) != received:
                raise ApiError(
                    400, f"Upload offset {offset} does not match {received} bytes received."
                )
            upload.data += call.body
            if "finalize" not in command:
                return Reply(200, headers={"X-Goog-Upload-Status": "active"})
            if upload.size is not None and len(upload.data) != upload.size:
                raise ApiError(
                    400, f"Upload finalized at {len(upload.data)} of {upload.size} bytes."
                )
            del self._uploads[upload_id]
            stored = upload.file
            stored.data = bytes(upload.data)
            stored.created = datetime.now(timezone.utc)
            self._files[stored.name] = stored
            body = {"file": self._file_json(stored, call.version)}
        return json_reply(body, headers={"X-Goog-Upload-Status": "final"})

    def _start_upload(self, call: _Call) -> Reply:
        meta = pick(call.json(), "file") or {}
        name = str(pick(meta, "name") or f"files/{uuid.uuid4().hex[:12]}")
        if not name.startswith("files/"):
            name = f"files/{name}"
        mime = pick(meta, "mimeType") or call.headers.get("X-Goog-Upload-Header-Content-Type")
        size = call.headers.get("X-Goog-Upload-Header-Content-Length") or pick(meta, "sizeBytes")
        if not mime:
            raise ApiError(400, "The file's mime type is required.")
        stored = _StoredFile(
            name=name,
            display_name=pick(meta, "displayName"),
            mime_type=str(mime),
            data=b"",
            created=datetime.now(timezone.utc),
            source="UPLOADED",
        )
        upload_id = uuid.uuid4().hex
        with self._lock:
            if name in self._files:
                raise ApiError(409, f"File {name} already exists.")
            self._uploads[upload_id] = _Upload(stored, int(size) if size is not None else None)
        query = f"upload_id={upload_id}&upload_protocol=resumable"
        url = f"{self.base_url}/upload/{call.version}/files?{query}"
        headers = {
            "X-Goog-Upload-URL": url,
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Chunk-Granularity": str(_UPLOAD_GRANULARITY),
        }
        return Reply(200, headers=headers)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _paginate(items: list[Any], call: _Call) -> tuple[list[Any], str | None]:
    """One page and the next token; never an empty page that carries a token."""
    size_param, token = call.param("pageSize"), call.param("pageToken")
    try:
        size = int(size_param) if size_param else _DEFAULT_PAGE_SIZE
        offset = int(token.removeprefix("offset-")) if token else 0
    except ValueError as exc:
        raise ApiError(400, f"Invalid page size or page token: {exc}") from exc
    if size <= 0:
        size = _DEFAULT_PAGE_SIZE
    page = items[offset : offset + size]
    more = bool(page) and offset + size < len(items)
    return page, f"offset-{offset + size}" if more else None


def _page_body(key: str, items: list[JSON], token: str | None) -> JSON:
    body: JSON = {key: items} if items else {}
    if token:
        body["nextPageToken"] = token
    return body
