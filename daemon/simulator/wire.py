"""How the Batch API simulator's replies go on the wire, and what goes wrong there.

Owns the reply type (`Reply`: status, body and delivery pacing), Google's error bodies
(status names, canonical messages, API key and permission errors), injected faults (`Fault`:
error statuses, connection resets, garbled, late and trickling replies), the `extra_fields`
shaping that adds unknown fields to every object of a JSON reply, and the HTTP server that
delivers replies with their delays, trickling and cut connections.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, TypeVar, cast

JSON = dict[str, Any]

JSON_TYPE = "application/json; charset=UTF-8"
WRITE_CHUNK = 1 << 20

log = logging.getLogger("daemon.simulator")

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

CANONICAL_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    408: "Request timed out.",
    409: "The resource already exists.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    502: "Bad Gateway",
    503: "The service is currently unavailable.",
    504: "Deadline expired before operation could complete.",
}
"""Google's own wording per status, used when a test injects a fault without a message."""

API_KEY_INVALID_MESSAGE = "API key not valid. Please pass a valid API key."
NO_KEY_MESSAGE = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
KEY_REJECTED_403_MESSAGE = "Your API key was reported as leaked. Please use another API key."

GARBLED_BODIES = ("html", "truncated", "cut", "empty")
FAULT_BODIES = ("error", "real", *GARBLED_BODIES)

_SERVICE = "generativelanguage.googleapis.com"
_MAP_FIELDS = frozenset({"metadata", "quotaDimensions"})
"""Fields that hold user maps (echoed request metadata, ErrorInfo metadata), not messages."""

UNKNOWN_FIELDS: JSON = {
    "futureField": "a value from a newer API",
    "x_new_thing": {"enabled": True, "count": "3", "tags": ["alpha", "beta"]},
}
"""What `extra_fields` adds to every JSON object: a scalar and an object no client knows."""


def status_name(code: int) -> str:
    """Canonical google.rpc status name for an HTTP-style code."""
    return STATUS_NAMES.get(code, "INTERNAL" if code >= 500 else "UNKNOWN")


def error_info(reason: str) -> JSON:
    """A google.rpc.ErrorInfo detail as the Gemini API attaches it."""
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": _SERVICE},
    }


class ApiError(Exception):
    """Raised by route handlers to answer with a Google-style error body."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: list[JSON] | None = None,
        *,
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # a status name other than the code's usual one
        self.details = list(details or [])
        if reason:
            self.details.insert(0, error_info(reason))

    def reply(self) -> Reply:
        return error_reply(self.code, self.message, self.details, status=self.status)


def key_error(status: int, message: str | None = None) -> ApiError:
    """The error Google sends for a rejected key (400), bad credentials (401) or no permission.

    400 is INVALID_ARGUMENT with reason API_KEY_INVALID, as for a revoked or mistyped key.
    """
    if status == 400:
        text = message or API_KEY_INVALID_MESSAGE
        localized = {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": text,
        }
        return ApiError(400, text, "API_KEY_INVALID", [localized])
    if status == 401:
        return ApiError(401, message or CANONICAL_MESSAGES[401], "ACCESS_TOKEN_TYPE_UNSUPPORTED")
    if status == 403:
        return ApiError(403, message or KEY_REJECTED_403_MESSAGE)
    raise ValueError(f"a key error is 400, 401 or 403, not {status}")


@dataclass
class Reply:
    """One HTTP reply and how to deliver it.

    ``payload`` is a JSON object still to be serialised (so unknown fields can be added last);
    ``delay`` waits before the first byte; ``trickle`` paces the body one byte at a time (and
    the status line and headers too with ``trickle_headers``); ``cut_after`` sends that many
    body bytes of a full Content-Length and then drops the connection.
    """

    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    payload: Any = None
    delay: float = 0.0
    trickle: float = 0.0
    trickle_headers: bool = False
    cut_after: int | None = None

    def serialise(self, extra_fields: bool) -> Reply:
        """Turn ``payload`` into ``body`` (with unknown fields everywhere if asked)."""
        if self.payload is not None:
            obj = with_unknown_fields(self.payload) if extra_fields else self.payload
            self.body = json.dumps(obj, separators=(",", ":")).encode()
            self.payload = None
        return self


def json_reply(obj: JSON, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply, serialised only when it is sent (see `Reply.serialise`)."""
    return Reply(status, payload=obj, headers=headers or {})


def error_reply(
    code: int,
    message: str | None = None,
    details: list[JSON] | None = None,
    *,
    status: str | None = None,
) -> Reply:
    """Google's error body: ``{"error": {"code", "message", "status", "details"?}}``."""
    err: JSON = {
        "code": code,
        "message": message or CANONICAL_MESSAGES.get(code) or phrase(code),
        "status": status or status_name(code),
    }
    if details:
        err["details"] = details
    return json_reply({"error": err}, code)


class _Matching(Protocol):
    times: int

    def matches(self, method: str, path: str) -> bool: ...


_F = TypeVar("_F", bound=_Matching)


def take_fault(faults: list[_F], method: str, path: str) -> _F | None:
    """The first fault with uses left that matches the request, one use taken (a fault whose
    last use it was is removed). Call with the owner's lock held."""
    for fault in faults:
        if fault.times > 0 and fault.matches(method, path):
            fault.times -= 1
            if fault.times <= 0:
                faults.remove(fault)
            return fault
    return None


def phrase(code: int) -> str:
    """The reason phrase of an HTTP status ("Error" for one HTTP does not name)."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def html_page(status: int) -> bytes:
    """The HTML a front end or proxy sends instead of JSON (Google's error page style)."""
    if status == 200:
        return (
            b"<!DOCTYPE html>\n<html><head><title>Network login</title></head>\n"
            b"<body><h1>Sign in to continue</h1><p>Your session has expired.</p></body></html>\n"
        )
    reason = phrase(status)
    return (
        f"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
        f"  <title>Error {status} ({reason})!!1</title>\n"
        f"  <p><b>{status}.</b> <ins>That\u2019s an error.</ins>\n"
        f"  <p>The server encountered a temporary error and could not complete your request."
        f"<p>Please try again in 30 seconds.  <ins>That\u2019s all we know.</ins>\n</html>\n"
    ).encode()


def with_unknown_fields(value: Any) -> Any:
    """A copy of a JSON value with `UNKNOWN_FIELDS` added to every object in it.

    User maps (echoed request ``metadata``, ErrorInfo ``metadata``) are left alone: the
    API copies those, it does not extend them. A message named ``metadata`` has an ``@type``.
    """
    if isinstance(value, list):
        return [with_unknown_fields(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {
        key: item if _is_user_map(key, item) else with_unknown_fields(item)
        for key, item in value.items()
    }
    for key, extra in UNKNOWN_FIELDS.items():
        out.setdefault(key, copy.deepcopy(extra))
    return out


def _is_user_map(key: str, value: Any) -> bool:
    return key in _MAP_FIELDS and isinstance(value, dict) and "@type" not in value


@dataclass
class Fault:
    """An injected failure for the next `times` requests that match `method` and `path_contains`.

    ``status`` 0 drops the connection without a response. ``after`` does the work first, then
    fails the response (a lost response: e.g. the job exists but the client saw an error).
    ``body`` says what is sent: ``"error"`` (Google's error body for ``status``, with
    ``message`` or Google's own wording), ``"real"`` (the real reply; implies the work is done
    and ``status`` is ignored), ``"html"`` (an HTML page, text/html), ``"truncated"`` (the
    reply cut in half, with a matching Content-Length: unparseable JSON), ``"cut"`` (a full
    Content-Length, half the body, then the connection drops) or ``"empty"`` (no body at all).
    Without the work done, "truncated" and "cut" cut an error body. ``delay`` waits that many
    real seconds before the first byte (a reply after the client's timeout); ``trickle`` sends
    the body one byte every that many seconds, and the status line and headers too with
    ``trickle_headers``. The constructors `garbled`, `late`, `trickling` and `reset` set the
    usual combinations.
    """

    method: str | None = None
    path_contains: str | None = None
    status: int = 503
    times: int = 1
    after: bool = False
    message: str | None = None
    body: str = "error"
    delay: float = 0.0
    trickle: float = 0.0
    trickle_headers: bool = False
    rewrite: Callable[[Any], Any] | None = None  # the real reply's JSON, changed (body "real")
    rewrite_bytes: Callable[[bytes], bytes] | None = None  # ... or its bytes (a download)

    def __post_init__(self) -> None:
        if self.body not in FAULT_BODIES:
            raise ValueError(f"Fault body must be one of {', '.join(FAULT_BODIES)}")

    @classmethod
    def garbled(
        cls,
        body: str,
        *,
        status: int = 200,
        after: bool = False,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """A reply a JSON client cannot use: "html", "truncated", "cut" or "empty", 200 by default."""
        if body not in GARBLED_BODIES:
            raise ValueError(f"a garbled body is one of {', '.join(GARBLED_BODIES)}")
        return cls(method, path_contains, status, times, after, body=body)

    @classmethod
    def late(
        cls,
        seconds: float,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Do the work, then send the real reply `seconds` later (after the client gave up)."""
        return cls(method, path_contains, times=times, after=True, body="real", delay=seconds)

    @classmethod
    def trickling(
        cls,
        interval: float,
        *,
        headers: bool = False,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Send the real reply one byte every `interval` seconds (headers too if asked)."""
        return cls(
            method,
            path_contains,
            times=times,
            after=True,
            body="real",
            trickle=interval,
            trickle_headers=headers,
        )

    @classmethod
    def rewritten(
        cls,
        change: Callable[[Any], Any],
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Do the work, then send its real reply with its JSON passed through `change` (a job
        name of an unknown shape, a field of another type...)."""
        return cls(method, path_contains, times=times, after=True, body="real", rewrite=change)

    @classmethod
    def rewritten_bytes(
        cls,
        change: Callable[[bytes], bytes],
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Do the work, then send its real reply's body passed through `change` (a results
        file with a line no parser takes, say)."""
        fault = cls(method, path_contains, times=times, after=True, body="real")
        fault.rewrite_bytes = change
        return fault

    @classmethod
    def reset(
        cls,
        *,
        after: bool = False,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Drop the connection without a reply, before or after doing the work."""
        return cls(method, path_contains, status=0, times=times, after=after)

    @property
    def does_work(self) -> bool:
        """Whether the request is carried out before this fault shapes the reply."""
        return self.after or self.body == "real"

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request (method compared case-insensitively)."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains is None or self.path_contains in path

    def shape(self, real: Reply | None, extra_fields: bool) -> Reply | None:
        """The reply to send: made from the real one (None when the work was not done).

        None means drop the connection.
        """
        if self.status == 0:
            return None
        if self.body == "real" and real is not None:
            reply = real
            if self.rewrite is not None:
                changed = self.rewrite(json.loads(real.body))
                reply = Reply(real.status, b"", real.content_type, dict(real.headers))
                reply.payload = changed
            elif self.rewrite_bytes is not None:
                reply = Reply(real.status, self.rewrite_bytes(real.body), real.content_type)
        elif self.body in ("error", "real"):
            reply = error_reply(self.status, self.message)
        else:
            source = real if real is not None else error_reply(503, self.message)
            reply = self._garble(source.serialise(extra_fields))
        reply.delay, reply.trickle = self.delay, self.trickle
        reply.trickle_headers = self.trickle_headers
        return reply.serialise(extra_fields)

    def _garble(self, source: Reply) -> Reply:
        half = len(source.body) // 2
        if self.body == "html":
            return Reply(self.status, html_page(self.status), "text/html; charset=UTF-8")
        if self.body == "truncated":
            return Reply(self.status, source.body[:half], source.content_type)
        if self.body == "cut":
            return Reply(self.status, source.body, source.content_type, cut_after=half)
        return Reply(self.status, b"", source.content_type)


Handle = Callable[[str, str, Message, bytes], Reply | None]
"""(method, path with query, headers, body) -> the reply, or None to drop the connection."""


class ReplyServer(ThreadingHTTPServer):
    """Serves `Reply` objects over HTTP/1.1, tracking open connections so stop can cut them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handle: Handle) -> None:
        self.handle = handle
        self.stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _ReplyHandler)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._conns_lock:
            (self._conns.add if open_ else self._conns.discard)(conn)

    def stop(self) -> None:
        """Stop serving; wake late and trickling replies and cut every connection."""
        self.stopping.set()
        self.shutdown()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()


class _ReplyHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with exact Content-Length, so httpx keeps connections alive."""

    protocol_version = "HTTP/1.1"
    server_version = "gemini-batch-sim/1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    @property
    def reply_server(self) -> ReplyServer:
        return cast(ReplyServer, self.server)

    def setup(self) -> None:
        super().setup()
        self.reply_server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.reply_server.track(self.connection, False)

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
        reply = self.reply_server.handle(self.command, self.path, self.headers, body)
        try:
            if reply is None or not self._pause(reply.delay):
                self._drop()
                return
            self.log_request(reply.status)
            self._write(self._head(reply), reply.trickle if reply.trickle_headers else 0.0)
            end = len(reply.body) if reply.cut_after is None else reply.cut_after
            self._write(reply.body[:end], reply.trickle)
            if reply.cut_after is not None:
                self._drop()
        except OSError:  # the client went away (or stop() cut the connection)
            self.close_connection = True

    def _head(self, reply: Reply) -> bytes:
        phrase = self.responses.get(reply.status, ("Unknown",))[0]
        lines = [
            f"{self.protocol_version} {reply.status} {phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            *(f"{name}: {value}" for name, value in reply.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write(self, data: bytes, interval: float) -> None:
        """Send `data`, one byte every `interval` seconds when trickling."""
        if interval <= 0:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_CHUNK):
                self.wfile.write(view[start : start + WRITE_CHUNK])
            return
        for i in range(len(data)):
            if not self._pause(interval):
                raise ConnectionAbortedError("the simulator is stopping")
            self.wfile.write(data[i : i + 1])

    def _pause(self, seconds: float) -> bool:
        """Wait (real time); False if the simulator stops meanwhile."""
        return seconds <= 0 or not self.reply_server.stopping.wait(seconds)

    def _drop(self) -> None:
        """Close the connection without (the rest of) a response, as a reset would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
