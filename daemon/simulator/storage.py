"""A loopback Cloud Storage for the Vertex AI simulator and its tests, offline.

Vertex AI batch jobs read their input from and write their predictions to Cloud Storage, so
a Vertex test needs a bucket that the unmodified ``google-cloud-storage`` client can talk to.
`StorageEmulator` runs gcp-storage-emulator in-process (in memory, on a free loopback port)
and closes the gaps the daemon depends on: the emulator ignores ``ifGenerationMatch`` (the
daemon's only guard against overwriting an object twice), answers a missing bucket or object
with an empty body, and cannot fail on purpose. A shim around its router, installed once for
every emulator of the process, answers preconditions with 412, gives error replies Google's
JSON body, injects faults and keeps a log of requests.
"""

from __future__ import annotations

import contextlib
import email.parser
import io
import json
import logging
import re
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import gcp_storage_emulator.server as gse_server
from gcp_storage_emulator.handlers import buckets as gse_buckets
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from .wire import phrase, take_fault

JSON = dict[str, Any]

DEFAULT_PRINCIPAL = "sa@p.iam.gserviceaccount.com"
"""Who a 403 says lacks the permission, by default."""

PRECONDITION_MESSAGE = "At least one of the pre-conditions you specified did not hold."
BUCKET_MISSING_MESSAGE = "The specified bucket does not exist."

_REASONS = {
    400: "invalid",
    401: "required",
    403: "forbidden",
    404: "notFound",
    409: "conflict",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    500: "backendError",
    502: "backendError",
    503: "backendError",
    504: "backendError",
}
_MESSAGES = {
    400: "Invalid argument.",
    401: "Anonymous caller does not have storage.objects.get access to the Google Cloud "
    "Storage object.",
    409: "The requested object already exists.",
    412: PRECONDITION_MESSAGE,
    429: "The object exceeded the rate limit for object mutation operations (create, update, "
    "and delete). Please reduce your request rate.",
    500: "We encountered an internal error. Please try again.",
    502: "Bad Gateway",
    503: "We encountered an internal error. Please try again.",
    504: "Gateway Timeout",
}
"""Google's wording per status (403 and 404 depend on the request: see `_default_message`)."""

_PREFIX = r"(?:/storage/v1)?"
_UPLOAD = re.compile(rf"^/upload{_PREFIX}/b/(?P<bucket>[-.\w]+)/o$")
_LIST = re.compile(rf"^{_PREFIX}/b/(?P<bucket>[-.\w]+)/o$")
_OBJECT = re.compile(rf"^(?:/download)?{_PREFIX}/b/(?P<bucket>[-.\w]+)/o/(?P<name>.+)$")
_BUCKET = re.compile(rf"^{_PREFIX}/b(?:/(?P<bucket>[-.\w]+))?$")
_SHIM_MARK = "_gemini_batchd_shim"


@dataclass
class StorageFault:
    """An injected failure for the next `times` requests matching `method` and `path_regex`.

    ``status`` 0 drops the connection without a reply. The regular expression is searched in
    the request's decoded path; for an upload that names its object, ``/NAME`` is appended to
    the path (``/upload/storage/v1/b/BUCKET/o/NAME``), so one expression can match both the
    reads and the writes of an object.
    """

    method: str | None
    path_regex: str
    status: int
    times: int = 1
    message: str | None = None

    def matches(self, method: str, target: str) -> bool:
        """Whether this fault applies to a request."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return re.search(self.path_regex, target) is not None


@dataclass
class _Target:
    """What a request is about: its path, bucket and object name (when it names one)."""

    method: str
    path: str
    query: dict[str, list[str]]
    bucket: str | None = None
    name: str | None = None
    upload: bool = False

    @property
    def fault_path(self) -> str:
        if self.upload and self.name is not None:
            return f"{self.path}/{self.name}"
        return self.path

    def param(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[0] if values else None


_EMULATORS: weakref.WeakValueDictionary[int, StorageEmulator] = weakref.WeakValueDictionary()
"""Each emulator by the id of its gcp-storage-emulator Storage: how the shim finds the owner
of a request (weakly: an emulator that is gone leaves its server to the emulator's own code)."""
_INSTALL_LOCK = threading.Lock()


def install_shim() -> None:
    """Wrap gcp-storage-emulator's router and replies (once per process; idempotent).

    Requests to an emulator that no `StorageEmulator` owns pass through unchanged.
    """
    with _INSTALL_LOCK:
        router, response = gse_server.Router, gse_server.Response
        if not getattr(router.handle, _SHIM_MARK, False):
            original_handle: Callable[[Any, str], None] = router.handle

            def handle(self: Any, method: str) -> None:
                owner = _EMULATORS.get(id(self._request_handler.storage))
                if owner is None:
                    original_handle(self, method)
                else:
                    owner._serve(self, method, original_handle)

            setattr(handle, _SHIM_MARK, True)
            router.handle = handle
        if not getattr(response.close, _SHIM_MARK, False):
            original_close: Callable[[Any], None] = response.close

            def close(self: Any) -> None:
                owner = _EMULATORS.get(id(self._handler.storage))
                if owner is not None:
                    owner._finish(self)
                original_close(self)

            setattr(close, _SHIM_MARK, True)
            response.close = close


class StorageEmulator:
    """An in-memory Cloud Storage on a loopback port, for the real ``google-cloud-storage``.

    ``client()`` gives a client bound to it (anonymous credentials, this endpoint) whether or
    not ``STORAGE_EMULATOR_HOST`` is set. Faults (`add_fault`) and the request log work like
    the Gemini simulator's; `wipe` empties it between tests. A stopped emulator keeps its
    objects and serves them again on the same port after `start`. The emulator's own logging
    of expected misses (every 404 is an error there) is turned down.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        project: str = "sim-project",
        principal: str = DEFAULT_PRINCIPAL,
        buckets: Iterable[str] = (),
    ) -> None:
        install_shim()
        _quiet_emulator_logs()
        self.host = host
        self.port = port
        self.project = project
        self.principal = principal
        self._lock = threading.Lock()
        self._faults: list[StorageFault] = []
        self._log: list[tuple[str, str, int]] = []
        self.before_request: list[Callable[[], None]] = []  # called first, must not block
        self._server: Any = gse_server.create_server(host, port, in_memory=True)
        self._running = False
        _EMULATORS[id(self._server._storage)] = self
        for name in buckets:
            self.create_bucket(name)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> StorageEmulator:
        """Serve in a daemon thread (again, after a stop: same port, same objects)."""
        if self._running:
            return self
        if self.port:
            _check_free(self.host, self.port)
        api = self._server._api
        if api.ident is not None:  # a thread runs once: a restart needs a new one
            api = gse_server.APIThread(self.host, self.port, self._server._storage)
            self._server._api = api
        api.daemon = True
        api.name = f"gcs-emulator:{self.port or 'new'}"
        api.start()
        while not api.is_running.wait(0.01):
            if not api.is_alive():
                raise OSError(f"the storage emulator could not listen on {self.host}:{self.port}")
        self.port = api._httpd.server_address[1]
        self._running = True
        return self

    def stop(self) -> None:
        """Stop serving. The emulator's server notices a stop request only between requests
        or every half second, so empty connections wake it until it has stopped."""
        if not self._running:
            return
        self._running = False
        api = self._server._api
        api.is_running.clear()
        httpd = api._httpd
        stopper = threading.Thread(target=httpd.shutdown, name="gcs-emulator-stop", daemon=True)
        stopper.start()
        while stopper.is_alive():
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.1),
            ):
                pass
            stopper.join(0.01)
        httpd.server_close()
        threading.Thread.join(api, 1.0)  # APIThread.join means "shut down", done already

    def __enter__(self) -> StorageEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``: the client's api_endpoint, or STORAGE_EMULATOR_HOST."""
        if not self.port:
            raise RuntimeError("the storage emulator has not been started")
        return f"http://{self.host}:{self.port}"

    def wipe(self) -> None:
        """Drop every bucket and object, and every queued fault and the request log."""
        with self._lock:
            self._server.wipe()
            self._faults.clear()
            self._log.clear()

    # -- content ---------------------------------------------------------------------------

    def client(self) -> storage.Client:
        """A google-cloud-storage client for this emulator (anonymous credentials)."""
        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.base_url},
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (nothing happens if it exists)."""
        gse_buckets.create_bucket(name, self._server._storage)

    def buckets(self) -> list[str]:
        return sorted(self._server._storage.buckets)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object of `bucket` whose name starts with `prefix`: name -> content."""
        store = self._server._storage
        names = sorted(n for n in list(store.objects.get(bucket, {})) if n.startswith(prefix))
        out: dict[str, bytes] = {}
        for name in names:
            with contextlib.suppress(Exception):  # deleted meanwhile
                out[name] = bytes(store.get_file(bucket, name, False))
        return out

    def generation(self, bucket: str, name: str) -> int | None:
        """The object's generation, None when there is no such object."""
        obj = self._server._storage.objects.get(bucket, {}).get(name)
        return int(obj["generation"]) if obj else None

    # -- faults and observation ------------------------------------------------------------

    def add_fault(
        self,
        method: str | None,
        path_regex: str,
        status: int,
        times: int = 1,
        message: str | None = None,
    ) -> StorageFault:
        """Fail the next `times` matching requests with `status` and Google's error body.

        `method` None matches any method; see `StorageFault` for what `path_regex` is matched
        against. Without a `message`, Google's wording for the status and request is used
        (a 403 names `principal` and the permission the request needs).
        """
        fault = StorageFault(method, path_regex, status, times, message)
        with self._lock:
            self._faults.append(fault)
        return fault

    @property
    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of every request; status 0: connection dropped."""
        with self._lock:
            return list(self._log)

    # -- the shim --------------------------------------------------------------------------

    def _serve(self, router: Any, method: str, original: Callable[[Any, str], None]) -> None:
        """One request: a fault, a failed precondition, or the emulator's own answer."""
        for hook in list(self.before_request):
            hook()
        handler = router._request_handler
        method = handler.headers.get("x-http-method-override") or method
        target = self._target(handler, method)
        with self._lock:
            fault = take_fault(self._faults, method, target.fault_path)
        if fault is not None:
            if fault.status == 0:
                self._record(handler, 0)
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RDWR)
                return
            message = fault.message or self._default_message(fault.status, target)
            self._reply(handler, fault.status, message)
            return
        if self._precondition_failed(target):
            self._reply(handler, 412, PRECONDITION_MESSAGE)
            return
        original(router, method)

    def _target(self, handler: Any, method: str, *, read_body: bool = True) -> _Target:
        """What a request is for. `read_body=False` once the emulator has read the body (an
        upload's object name is then not known)."""
        url = urlsplit(handler.path)
        target = _Target(method, unquote(url.path), parse_qs(url.query))
        if (found := _UPLOAD.match(url.path)) and method == "POST":
            target.bucket, target.upload = found["bucket"], True
            if read_body and target.param("upload_id") is None:
                kind = target.param("uploadType")
                target.name = target.param("name") or self._uploaded_name(handler, kind)
        elif found := _OBJECT.match(url.path):
            target.bucket, target.name = found["bucket"], unquote(found["name"])
        elif (found := _LIST.match(url.path)) or (found := _BUCKET.match(url.path)):
            target.bucket = found["bucket"]
        return target

    @staticmethod
    def _uploaded_name(handler: Any, kind: str | None) -> str | None:
        """The object name in an upload's body (multipart metadata, resumable start JSON).

        The body is read here and put back for the emulator to read again.
        """
        content_type = handler.headers.get("Content-Type") or ""
        if kind not in ("multipart", "resumable"):
            return None
        raw = gse_server._read_raw_data(handler) or b""
        handler.rfile = io.BytesIO(raw)
        del handler.headers["Transfer-Encoding"]
        del handler.headers["Content-Length"]
        handler.headers["Content-Length"] = str(len(raw))
        try:
            if kind == "resumable":
                meta = json.loads(raw or b"{}")
            else:
                head = f"Content-Type: {content_type}\r\n\r\n".encode()
                message = email.parser.BytesParser().parsebytes(head + raw)
                parts: Any = message.get_payload()
                first: Any = parts[0].get_payload(decode=True) if isinstance(parts, list) else b""
                meta = json.loads(first or b"{}")
        except (ValueError, IndexError, AttributeError):
            return None
        name = meta.get("name") if isinstance(meta, dict) else None
        return name if isinstance(name, str) else None

    def _precondition_failed(self, target: _Target) -> bool:
        """``ifGenerationMatch`` on uploads, object reads and deletes (0: must not exist).

        A read or delete of a missing object is left to the emulator (404, not 412).
        """
        want = target.param("ifGenerationMatch")
        if want is None or target.bucket is None or target.name is None:
            return False
        if target.upload:
            if target.param("upload_id") is not None:
                return False
        elif target.method not in ("GET", "DELETE"):
            return False
        store = self._server._storage
        if target.bucket not in store.buckets:
            return False  # the emulator answers 404
        current = store.objects.get(target.bucket, {}).get(target.name)
        if current is None and not target.upload:
            return False
        generation = str(current["generation"]) if current else "0"
        return generation != want.strip()

    def _default_message(self, status: int, target: _Target) -> str:
        if status == 403:
            permission, kind = _permission(target)
            return (
                f"{self.principal} does not have {permission} access to the Google Cloud "
                f"Storage {kind}. Permission '{permission}' denied on resource (or it may not "
                "exist)."
            )
        if status == 404:
            store = self._server._storage
            if target.bucket is None or target.bucket not in store.buckets or not target.name:
                return BUCKET_MISSING_MESSAGE
            return f"No such object: {target.bucket}/{target.name}"
        return _MESSAGES.get(status) or phrase(status)

    def _reply(self, handler: Any, status: int, message: str) -> None:
        body = json.dumps(_error_body(status, message)).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        self._record(handler, status)

    def _finish(self, response: Any) -> None:
        """Before the emulator sends a reply: give an empty error Google's body; log it."""
        handler = response._handler
        status = int(response.status)
        if status >= 400 and not response._content and status != 501:
            target = self._target(handler, handler.command, read_body=False)
            body = _error_body(status, self._default_message(status, target))
            response.json(body)
        self._record(handler, status)

    def _record(self, handler: Any, status: int) -> None:
        with self._lock:
            self._log.append((str(handler.command), str(handler.path), status))


def _error_body(status: int, message: str) -> JSON:
    """Cloud Storage's JSON error: ``{"error": {"code", "message", "errors": [...]}}``."""
    reason = _REASONS.get(status, "backendError" if status >= 500 else "invalid")
    item: JSON = {"message": message, "domain": "global", "reason": reason}
    if status == 412:
        item.update({"locationType": "header", "location": "If-Match"})
    return {"error": {"code": status, "message": message, "errors": [item]}}


def _permission(target: _Target) -> tuple[str, str]:
    """The IAM permission a request needs, and whether it is about an object or a bucket."""
    if target.upload:
        return "storage.objects.create", "object"
    if target.name is not None:
        verb = {"DELETE": "delete", "PATCH": "update", "PUT": "update"}.get(target.method, "get")
        return f"storage.objects.{verb}", "object"
    if _LIST.match(target.path):
        return "storage.objects.list", "bucket"
    verb = {"POST": "create", "DELETE": "delete", "PATCH": "update"}.get(target.method, "get")
    return f"storage.buckets.{verb}", "bucket"


def _quiet_emulator_logs() -> None:
    """The emulator logs every missing object as an error and every string reply as a warning:
    expected here, and without a configured handler Python would print them to stderr."""
    logging.getLogger(gse_server.__name__).setLevel(logging.ERROR)
    logging.getLogger("gcp_storage_emulator.storage").setLevel(logging.CRITICAL)


def _check_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) now rather than inside the emulator's thread."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
