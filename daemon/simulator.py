"""A loopback simulator of the Gemini Batch API, speaking Google's REST protocol.

The real google-genai SDK works against it unchanged (``HttpOptions(base_url=sim.base_url)``),
so the daemon and its tests exercise the same code paths as in production, offline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

JSON = dict[str, Any]

log = logging.getLogger(__name__)

PENDING = "BATCH_STATE_PENDING"
RUNNING = "BATCH_STATE_RUNNING"
SUCCEEDED = "BATCH_STATE_SUCCEEDED"
FAILED = "BATCH_STATE_FAILED"
CANCELLED = "BATCH_STATE_CANCELLED"
EXPIRED = "BATCH_STATE_EXPIRED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
ALL_STATES = frozenset({PENDING, RUNNING}) | FINAL_STATES

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_PATH = re.compile(r"^/(?:(upload|download)/)?(v1beta|v1alpha|v1)/(.+)$")
_MARKER = re.compile(r"\[\[sim:([a-z_]+)(?:=([^\]]*))?\]\]")
_WRITE_CHUNK = 1 << 20
_UPLOAD_GRANULARITY = 8 * 1024 * 1024
_FILE_TTL = timedelta(hours=48)
_DEFAULT_PAGE_SIZE = 50


def status_name(code: int) -> str:
    """Canonical google.rpc status name for an HTTP-style code."""
    return STATUS_NAMES.get(code, "INTERNAL" if code >= 500 else "UNKNOWN")


@dataclass
class Fault:
    """An injected HTTP failure for the next `times` requests that match.

    ``status`` 0 drops the connection without a response. ``after`` does the work first,
    then fails the response (a lost response: e.g. the job exists but the client saw an error).
    """

    method: str | None = None
    path_contains: str | None = None
    status: int = 503
    times: int = 1
    after: bool = False
    message: str = "Simulated fault injected by the test."

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request (method compared case-insensitively)."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains is None or self.path_contains in path


class ApiError(Exception):
    """Raised by handlers to answer with a Google-style error body."""

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=UTF-8"
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(
    obj: JSON, status: int = 200, headers: dict[str, str] | None = None
) -> _Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _Response(status, body, headers=headers or {})


def _error_response(code: int, message: str, reason: str | None = None) -> _Response:
    err: JSON = {"code": code, "message": message, "status": status_name(code)}
    if reason:
        err["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return _json_response({"error": err}, code)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pick(obj: Any, camel: str) -> Any:
    """Read a field in either casing: the real server accepts camelCase and snake_case."""
    if not isinstance(obj, dict):
        return None
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def _texts(contents: Any) -> list[str]:
    """All text parts of a Content list (or a bare string / single Content)."""
    if isinstance(contents, str):
        return [contents]
    if isinstance(contents, dict):
        contents = [contents]
    out: list[str] = []
    for content in contents if isinstance(contents, list) else []:
        for part in _pick(content, "parts") or []:
            text = _pick(part, "text")
            if isinstance(text, str):
                out.append(text)
    return out


def _word_count(text: str) -> int:
    return len(text.split())


def simulate_response(request: JSON, model: str, response_id: str) -> JSON:
    """The deterministic GenerateContentResponse (or ``{"error": ...}``) for one request.

    Prompt markers script behaviour per request: ``[[sim:error=CODE]]``, ``[[sim:fenced]]``,
    ``[[sim:thought]]``, ``[[sim:finish=REASON]]`` (``[[sim:missing]]`` is handled by the caller).
    """
    prompt = "\n".join(_texts(_pick(request, "contents")))
    markers = {m.group(1): m.group(2) or "" for m in _MARKER.finditer(prompt)}
    if "error" in markers:
        code = int(markers["error"]) if markers["error"].isdigit() else 500
        return {"error": _request_error(code, "Simulated error requested by the prompt.")}
    system_words = _word_count(" ".join(_texts(_pick(request, "systemInstruction"))))
    prompt_tokens = _word_count(prompt) + system_words
    config = _pick(request, "generationConfig") or {}
    mime = str(_pick(config, "responseMimeType") or "").lower()
    payload = {"echo": prompt, "words": prompt_tokens}
    if "fenced" in markers:
        body = json.dumps(payload, separators=(",", ":"))[:-1] + ",}"
        text = f"Here you go:\n```json\n{body}\n```\nLet me know if you need more."
    elif mime.startswith("application/json"):
        text = json.dumps(payload, separators=(",", ":"))
    else:
        text = f"Simulated answer: {prompt}"
    parts: list[JSON] = [{"text": text}]
    usage: JSON = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": _word_count(text)}
    if "thought" in markers:
        parts.insert(0, {"text": "thinking...", "thought": True})
        usage["thoughtsTokenCount"] = 1
    usage["totalTokenCount"] = sum(usage.values())
    candidate: JSON = {
        "content": {"role": "model", "parts": parts},
        "finishReason": markers.get("finish") or "STOP",
        "index": 0,
    }
    return {
        "response": {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": f"{model.removeprefix('models/')}-sim-001",
            "responseId": response_id,
        }
    }


def _request_error(code: int, message: str) -> JSON:
    return {"code": code, "message": message, "status": status_name(code)}


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
    forced_state: str | None = None
    forced_at: float = 0.0
    error_message: str | None = None

    @property
    def name(self) -> str:
        return f"batches/{self.id}"

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


Route = Callable[[_Call], _Response]


class Simulator:
    """An in-process Gemini Batch API on a loopback port, with knobs for tests.

    State is computed lazily from the injected clock, so tests need no sleeps and no
    background threads run besides the HTTP server.
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
    ) -> None:
        self.host = host
        self.port = port
        self.pending_seconds = pending_seconds
        self.running_seconds = running_seconds
        self.outcome: str | None = None
        self.shuffle_output = False
        self.api_key = api_key
        self.fail_keys: dict[str, int] = {}
        self.missing_keys: set[str] = set()
        self.clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, _StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}
        self._faults: list[Fault] = []
        self._log: list[tuple[str, str, int]] = []
        self._created_by_name: dict[str, int] = {}
        self._create_calls = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("POST", re.compile(r"models/([^/:]+):batchGenerateContent"), self._create),
            ("GET", re.compile(r"batches"), self._list_batches),
            ("GET", re.compile(r"batches/([^/:]+)"), self._get_batch),
            ("DELETE", re.compile(r"batches/([^/:]+)"), self._delete_batch),
            ("POST", re.compile(r"batches/([^/:]+):cancel"), self._cancel_batch),
            ("POST", re.compile(r"files"), self._upload),
            ("GET", re.compile(r"files/([^/:]+)"), self._get_file),
            ("DELETE", re.compile(r"files/([^/:]+)"), self._delete_file),
            ("GET", re.compile(r"files/([^/:]+):download"), self._download),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Serve in a daemon thread; after a stop() it comes back on the same port and state."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
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
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
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
        with self._lock:
            self._faults.append(fault)

    @property
    def jobs(self) -> dict[str, JSON]:
        """A snapshot of every job: name -> record with its current state."""
        with self._lock:
            now = self.clock()
            return {name: self._record(job, now) for name, job in self._jobs.items()}

    @property
    def create_calls(self) -> int:
        with self._lock:
            return self._create_calls

    @property
    def requests_log(self) -> list[tuple[str, str, int]]:
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

    def jobs_created_for(self, display_name: str) -> int:
        """Jobs ever created with this display name (deleted ones included)."""
        with self._lock:
            return self._created_by_name.get(display_name, 0)

    def set_job_state(self, name: str, state: str, message: str | None = None) -> None:
        """Force a job's state; FAILED jobs carry ``message`` as their error."""
        state = "BATCH_STATE_" + state.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
        if state not in ALL_STATES:
            raise ValueError(f"unknown batch state {state!r}")
        with self._lock:
            job = self._jobs[name]
            job.forced_state, job.forced_at = state, self.clock()
            if state == FAILED:
                job.error_message = message or "The batch job failed (simulated)."

    def forget_job(self, name: str) -> None:
        """Drop a job without an API call: later GETs answer 404."""
        with self._lock:
            self._jobs.pop(name, None)

    # -- request handling ------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> _Response | None:
        """Answer one HTTP request; None means drop the connection."""
        url = urlsplit(raw_path)
        path = unquote(url.path)
        route, call = self._resolve(method, path, url.query, headers, body)
        with self._lock:
            if route == self._create:
                self._create_calls += 1
            fault = self._take_fault(method, raw_path)
        response: _Response | None
        if fault is not None and not fault.after:
            response = self._fault_response(fault)
        else:
            response = self._run(route, call)
            if fault is not None:
                response = self._fault_response(fault)
        with self._lock:
            self._log.append((method, raw_path, response.status if response else 0))
        return response

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

    def _run(self, route: Route | None, call: _Call) -> _Response:
        try:
            if route is None:
                raise ApiError(404, f"Method not found: {call.method} {call.path}")
            if not (route == self._upload and call.param("upload_id")):
                self._check_key(call)
            return route(call)
        except ApiError as exc:
            return _error_response(exc.code, exc.message, exc.reason)
        except Exception as exc:  # a simulator bug must still answer like a server
            log.exception("simulator handler failed")
            return _error_response(500, f"Internal error in the simulator: {exc}")

    def _check_key(self, call: _Call) -> None:
        key = call.headers.get("x-goog-api-key") or call.param("key")
        if not key:
            raise ApiError(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if self.api_key is not None and key != self.api_key:
            raise ApiError(
                400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID"
            )

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self._faults:
            if fault.times > 0 and fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _fault_response(fault: Fault) -> _Response | None:
        return _error_response(fault.status, fault.message) if fault.status else None

    # -- batches ---------------------------------------------------------------------------

    def _create(self, call: _Call) -> _Response:
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
        config = _pick(batch, "inputConfig")
        inline = _pick(config, "requests")
        file_name = _pick(config, "fileName")
        if (inline is None) == (file_name is None):
            raise ApiError(400, "batch.input_config must set exactly one of requests, file_name.")
        if inline is not None:
            requests = self._inline_requests(inline)
        else:
            requests = self._file_requests(str(file_name))
        for i, req in enumerate(requests):
            contents = _pick(req.request, "contents")
            if not contents or not isinstance(contents, list | str):
                raise ApiError(400, f"requests[{i}]: GenerateContentRequest.contents is required.")
        display_name = str(_pick(batch, "displayName") or "")
        with self._lock:
            job = self._new_job(display_name, model, requests, None if inline else file_name)
            return _json_response(self._operation(job, call.version, self.clock(), fresh=True))

    @staticmethod
    def _inline_requests(inline: Any) -> list[_Request]:
        items = _pick(inline, "requests")
        if not isinstance(items, list) or not items:
            raise ApiError(400, "batch.input_config.requests.requests must not be empty.")
        out: list[_Request] = []
        for i, item in enumerate(items):
            request = _pick(item, "request")
            if not isinstance(request, dict):
                raise ApiError(400, f"requests[{i}].request is required.")
            metadata = _pick(item, "metadata")
            key = _pick(metadata, "key")
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
            request = _pick(item, "request")
            if not isinstance(request, dict):
                raise ApiError(400, f"{file_name} line {number}: a 'request' object is required.")
            key = item.get("key")
            out.append(_Request(None if key is None else str(key), request))
        if not out:
            raise ApiError(400, f"Input file {file_name} holds no requests.")
        return out

    def _new_job(
        self, display_name: str, model: str, requests: list[_Request], input_file: str | None
    ) -> _Job:
        """Register a job, fixing its timing, outcome and per-request output now."""
        job_id = uuid.uuid4().hex[:24]
        entries: list[tuple[_Request, JSON]] = []
        kinds: list[str] = []
        for i, req in enumerate(requests):
            key = req.key or ""
            prompt = "\n".join(_texts(_pick(req.request, "contents")))
            if key in self.missing_keys or "[[sim:missing]]" in prompt:
                kinds.append("missing")
                continue
            if key in self.fail_keys:
                code = self.fail_keys[key]
                entry: JSON = {"error": _request_error(code, f"Simulated failure of {key!r}.")}
            else:
                entry = simulate_response(req.request, model, f"sim-{job_id[:8]}-{i}")
            kinds.append("error" if "error" in entry else "ok")
            entries.append((req, entry))
        if self.shuffle_output:
            self._rng.shuffle(entries)
        outcome = SUCCEEDED
        if self.outcome:
            outcome = "BATCH_STATE_" + self.outcome.upper().removeprefix("BATCH_STATE_")
            if outcome not in FINAL_STATES:
                raise ApiError(500, f"simulator outcome {self.outcome!r} is not a final state")
        job = _Job(
            id=job_id,
            display_name=display_name,
            model=model,
            requests=requests,
            input_file=input_file,
            created=self.clock(),
            created_wall=datetime.now(timezone.utc),
            pending_seconds=self.pending_seconds,
            running_seconds=self.running_seconds,
            outcome=outcome,
            entries=entries,
            kinds=kinds,
        )
        if outcome == FAILED:
            job.error_message = "The batch job failed (simulated)."
        self._jobs[job.name] = job
        self._created_by_name[display_name] = self._created_by_name.get(display_name, 0) + 1
        return job

    def _job(self, call: _Call) -> _Job:
        job = self._jobs.get(f"batches/{call.args[0]}")
        if job is None:
            raise ApiError(404, f"Requested entity was not found: batches/{call.args[0]}")
        return job

    def _get_batch(self, call: _Call) -> _Response:
        with self._lock:
            return _json_response(self._operation(self._job(call), call.version, self.clock()))

    def _list_batches(self, call: _Call) -> _Response:
        with self._lock:
            now = self.clock()
            jobs = list(reversed(self._jobs.values()))
            page, token = _paginate(jobs, call)
            ops = [self._operation(job, call.version, now, listing=True) for job in page]
        return _json_response(_page_body("operations", ops, token))

    def _cancel_batch(self, call: _Call) -> _Response:
        with self._lock:
            job = self._job(call)
            now = self.clock()
            if self._state(job, now)[0] not in FINAL_STATES:
                job.forced_state, job.forced_at = CANCELLED, now
        return _json_response({})

    def _delete_batch(self, call: _Call) -> _Response:
        with self._lock:
            del self._jobs[self._job(call).name]
        return _json_response({})

    @staticmethod
    def _state(job: _Job, now: float) -> tuple[str, float]:
        """The job's state and the clock time it entered that state."""
        if job.forced_state is not None:
            return job.forced_state, job.forced_at
        elapsed = now - job.created
        if elapsed < job.pending_seconds:
            return PENDING, job.created
        started = job.created + job.pending_seconds
        if elapsed < job.pending_seconds + job.running_seconds:
            return RUNNING, started
        return job.outcome, started + job.running_seconds

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
            "pendingRequestCount": total - done if state in (PENDING, RUNNING) else 0,
        }
        return {k: str(v) for k, v in counts.items() if v}

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
        op: JSON = {"name": job.name, "metadata": meta}
        if state not in FINAL_STATES:
            return op
        meta["endTime"] = wall(since)
        op["done"] = True
        if state == FAILED:
            op["error"] = {"code": 13, "message": job.error_message or "The batch job failed."}
        if state != SUCCEEDED:
            return op
        output: JSON
        if job.input_file is not None:
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

    @staticmethod
    def _inline_entry(req: _Request, entry: JSON) -> JSON:
        return {**entry, "metadata": req.metadata} if req.metadata is not None else dict(entry)

    def _ensure_output_file(self, job: _Job, end_time: str) -> None:
        if job.output_file in self._files:
            return
        lines = []
        for req, entry in job.entries:
            line = {"key": req.key, **entry} if req.key is not None else dict(entry)
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
        return {
            "name": job.name,
            "display_name": job.display_name,
            "model": job.model,
            "state": state,
            "requests": [{"key": r.key, "request": r.request} for r in job.requests],
            "input_file": job.input_file,
            "output_file": job.output_file if job.input_file else None,
            "outcome": job.outcome,
            "error": job.error_message if state == FAILED else None,
            "create_time": _iso(job.created_wall),
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

    def _get_file(self, call: _Call) -> _Response:
        with self._lock:
            return _json_response(self._file_json(self._stored(call), call.version))

    def _delete_file(self, call: _Call) -> _Response:
        with self._lock:
            del self._files[self._stored(call).name]
        return _json_response({})

    def _download(self, call: _Call) -> _Response:
        with self._lock:
            data = self._stored(call).data
        return _Response(200, data, content_type="application/octet-stream")

    def _upload(self, call: _Call) -> _Response:
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
                return _Response(200, headers={"X-Goog-Upload-Status": "active"})
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
        return _json_response(body, headers={"X-Goog-Upload-Status": "final"})

    def _start_upload(self, call: _Call) -> _Response:
        meta = _pick(call.json(), "file") or {}
        name = str(_pick(meta, "name") or f"files/{uuid.uuid4().hex[:12]}")
        if not name.startswith("files/"):
            name = f"files/{name}"
        mime = _pick(meta, "mimeType") or call.headers.get("X-Goog-Upload-Header-Content-Type")
        size = call.headers.get("X-Goog-Upload-Header-Content-Length") or _pick(meta, "sizeBytes")
        if not mime:
            raise ApiError(400, "The file's mime type is required.")
        stored = _StoredFile(
            name=name,
            display_name=_pick(meta, "displayName"),
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
        return _Response(200, headers=headers)


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


class _Server(ThreadingHTTPServer):
    """The HTTP server, tracking open connections so stop() can cut them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._conns_lock:
            (self._conns.add if open_ else self._conns.discard)(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with exact Content-Length, so httpx keeps connections alive."""

    protocol_version = "HTTP/1.1"
    server_version = "gemini-batch-sim/1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    @property
    def sim_server(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self.sim_server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.sim_server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)  # httpx always sends one
        body = self.rfile.read(length) if length > 0 else b""
        response = self.sim_server.sim.handle(self.command, self.path, self.headers, body)
        if response is None:  # injected fault: drop the connection without a response
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            view = memoryview(response.body)
            for start in range(0, len(view), _WRITE_CHUNK):
                self.wfile.write(view[start : start + _WRITE_CHUNK])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
