"""The SDK's HTTP client: every API call ends by a deadline, however slowly the server answers.

httpx limits each connect, read and write (that is what `HttpOptions.timeout` sets), not a
request as a whole: a server that trickles its reply a byte at a time holds the caller for as
long as it trickles. This module gives `genai.Client` an httpx2 client that keeps deadlines:

- `deadline(seconds)` sets the deadline of every request made in the block, in this thread
  (a contextvar): all the SDK's attempts and its backoff between them, and a streamed body.
- A request made outside any `deadline` block gets a deadline of its own, `timeout_seconds`
  from its start to the end of its body.
- httpcore2's network backend shortens every connect, TLS handshake, read and write to the time
  left, so a trickled status line, headers or body is cut too, and so is a peer that drains
  the request slowly.
- Once the deadline has passed the call fails with `DeadlineExceeded`, and no further attempt
  starts.

Limits: an SDK backoff sleep that crosses the deadline runs to its end (at most
`retry_options.max_delay`); name resolution is bounded only by the system resolver; the block
is per thread (a pool worker must enter it itself). Without a block, each attempt of a call and
each download gets `timeout_seconds` of its own: a large download needs a longer block.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode

import httpcore2
import httpx2
from google import genai
from google.genai import types

from ..errors import BatchdError
from . import sdk
from .engine import RemoteJob

TRANSIENT_HTTP_CODES = (408, 429, 500, 502, 503, 504)
"""Statuses the SDK retries by itself within one call (never for a create)."""

MIN_TRANSFER_RATE = 128 * 1024
"""Bytes per second an upload or download may not fall below: its deadline grows with its size."""

WRITE_PIECE = 16 * 1024
"""Bytes sent per capped write: one TLS record, which Python's ssl module sends within one
timeout (over plain TCP a piece drained slowly may take a few sends of that timeout each)."""


class DeadlineExceeded(httpx2.TransportError, BatchdError):
    """The call's deadline passed. A transport error (transient to the daemon) and on purpose
    not an `httpx2.TimeoutException`: the SDK retries those, sleeping through its backoff
    schedule long after the deadline. Its `__cause__` is the timeout that cut the request, if
    one did (none when an attempt was refused for starting too late)."""


@dataclass(frozen=True, slots=True)
class _Deadline:
    at: float  # time.monotonic()
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        if not seconds > 0:
            raise ValueError(f"a deadline must be positive, not {seconds!r}")
        return cls(time.monotonic() + seconds, seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def exceeded(self, request: httpx2.Request) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no complete reply within the {self.seconds:g} s deadline", request=request
        )


_current: ContextVar[_Deadline | None] = ContextVar("gemini_batchd_http_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every API request made in this block ends `seconds` from now (an enclosing block's
    earlier deadline wins): connecting, sending, waiting, reading, and the SDK's retries."""
    new = _Deadline.after(seconds)
    outer = _current.get()
    token = _current.set(outer if outer is not None and outer.at <= new.at else new)
    try:
        yield
    finally:
        _current.reset(token)


def _time_left(timeout: float | None, expired: type[httpcore2.TimeoutException]) -> float | None:
    """`timeout` shortened to the time left before the current deadline; `expired` once passed."""
    current = _current.get()
    if current is None:
        return timeout
    left = current.left()
    if left <= 0:
        raise expired("deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
    """One connection whose every operation ends by the current deadline."""

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _time_left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), WRITE_PIECE):
            piece = buffer[start : start + WRITE_PIECE]
            self._stream.write(piece, _time_left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        limit = _time_left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, limit))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
    """httpcore2's network backend, its connections kept to the current deadline."""

    def __init__(self, backend: httpcore2.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.NetworkStream:
        """Tries each address with the time left (`socket.create_connection` would give each
        the whole timeout again). Name resolution is bounded only by the system resolver."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        failure: Exception | None = None
        for address in dict.fromkeys(str(info[4][0]) for info in infos):
            limit = _time_left(timeout, httpcore2.ConnectTimeout)
            try:
                stream = self._backend.connect_tcp(
                    address, port, limit, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
                continue
            return _DeadlineStream(stream)
        raise failure or httpcore2.ConnectError(f"no address for {host}")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.NetworkStream:
        limit = _time_left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, limit, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


@contextmanager
def _named(current: _Deadline, request: httpx2.Request) -> Iterator[None]:
    """A timeout after the deadline becomes `DeadlineExceeded`; earlier ones stay retryable."""
    try:
        yield
    except httpx2.TimeoutException as exc:
        if current.left() <= 0:
            raise current.exceeded(request) from exc
        raise


class _DeadlineResponseStream(httpx2.SyncByteStream):
    """A response body read under its request's deadline, wherever the caller reads it."""

    def __init__(self, stream: Iterable[bytes], current: _Deadline, request: httpx2.Request):
        self._stream = stream
        self._deadline = current
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._stream)
        while True:
            token = _current.set(self._deadline)
            try:
                with _named(self._deadline, self._request):
                    chunk = next(chunks, None)
            finally:
                _current.reset(token)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _DeadlineTransport(httpx2.BaseTransport):
    """An httpx2 transport whose requests each run under a deadline: the caller's, else their own."""

    def __init__(self, transport: httpx2.BaseTransport, default_seconds: float) -> None:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore2.NetworkBackend):
            raise TypeError(f"cannot keep deadlines on {type(transport).__name__}")
        pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
        self._transport = transport
        self._default_seconds = default_seconds

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        current = _current.get()
        if current is None:
            current = _Deadline.after(self._default_seconds)
        left = current.left()
        if left <= 0:  # e.g. an SDK retry after its backoff slept past the deadline
            raise current.exceeded(request)
        timeouts = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {  # the pool wait has no other cap
            key: left if value is None else min(value, left) for key, value in timeouts.items()
        }
        token = _current.set(current)
        try:
            with _named(current, request):
                response = self._transport.handle_request(request)
        finally:
            _current.reset(token)
        assert isinstance(response.stream, Iterable)
        response.stream = _DeadlineResponseStream(response.stream, current, request)
        return response

    def close(self) -> None:
        self._transport.close()


class DeadlineClient(httpx2.Client):
    """An httpx2 client whose transports, direct and to proxies from the environment, keep
    deadlines. httpx2 builds them itself (SSL context, limits, HTTP/1.1, proxies) and this
    client only wraps what it built."""

    def __init__(self, *, default_seconds: float, **kwargs: Any) -> None:
        _Deadline.after(default_seconds)  # refuse a non-positive default now
        self._default_seconds = default_seconds
        super().__init__(**kwargs)

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx2.BaseTransport:
        return _DeadlineTransport(super()._init_transport(*args, **kwargs), self._default_seconds)

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx2.BaseTransport:
        transport = super()._init_proxy_transport(*args, **kwargs)
        return _DeadlineTransport(transport, self._default_seconds)


def ssl_context() -> ssl.SSLContext:
    """The SSL context the SDK would build: $SSL_CERT_FILE / $SSL_CERT_DIR when set, else the
    system trust store (httpx2's default). One per set of variables: loading the trust store
    costs tens of milliseconds of CPU, and every client of the daemon's shares it."""
    return _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _ssl_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return httpx2.create_ssl_context()


def retry_options(attempts: int, timeout_seconds: float) -> types.HttpRetryOptions:
    """The SDK's retries within one call: `attempts` for 408, 429, 5xx and resets."""
    return types.HttpRetryOptions(
        attempts=attempts,
        initial_delay=1.0,
        max_delay=min(30.0, timeout_seconds / 4),
        jitter=1.0,
        http_status_codes=list(TRANSIENT_HTTP_CODES),
    )


def http_options(
    *,
    base_url: str | None,
    api_version: str | None,
    timeout_seconds: float,
    retry_options: types.HttpRetryOptions | None,
) -> types.HttpOptions:
    """What `genai.Client` is given: endpoint, retries, and a `DeadlineClient` whose requests
    each end within `timeout_seconds` unless a `deadline` block says otherwise.

    `timeout_seconds` is also the SDK's per-operation timeout (so a stalled attempt is retried
    while time is left) and its `X-Server-Timeout` header. The SDK does not close a client it is
    given: the caller owns `options.httpx_client`. Sync calls only (not `client.aio`)."""
    context = ssl_context()
    client = DeadlineClient(
        default_seconds=timeout_seconds,
        verify=context,
        timeout=None,  # the SDK passes its timeout with every request
        follow_redirects=True,  # as the SDK's own client
    )
    shared = {"verify": context}  # the SDK's own (async) clients reuse it: none is built
    return types.HttpOptions(
        base_url=base_url,
        api_version=api_version,
        timeout=max(1, round(timeout_seconds * 1000)),
        retry_options=retry_options,
        httpx_client=client,
        client_args=shared,
        async_client_args={**shared, "ssl": context},  # "ssl": its websocket context
    )


LIST_PAGE_SIZE = 100
"""Jobs (or files) fetched per page of a list."""

T = TypeVar("T")
Parse = Callable[[Any], tuple[list[RemoteJob], str | None]]
"""How an engine reads one page of its job list: the jobs and the next page's token."""


class RestCalls:
    """What both engines do with their `genai.Client`: REST JSON calls under one total
    deadline, and job lists read page by page."""

    client: genai.Client
    timeout: float
    jobs_path: ClassVar[str]  # the job list, relative to the client's base URL and version

    def probe(self) -> None:
        """One cheap authenticated call (a job list of one): is our credential accepted here?"""
        self._json("get", f"{self.jobs_path}?{urlencode({'pageSize': 1})}", {})

    def check_access(self) -> None:
        """The start-up check: for an engine that needs no more than its job list, `probe`."""
        self.probe()

    def _json(self, method: str, path: str, body: dict[str, Any], *, once: bool = False) -> Any:
        return self._deadline(lambda: sdk.rest(self.client, method, path, body, once=once))

    def _deadline(self, call: Callable[[], T], size: int = 0) -> T:
        """`call()` within the API timeout, plus time for `size` bytes at the slowest rate."""
        with deadline(self.timeout + size / MIN_TRANSFER_RATE):
            return call()

    def _find(
        self, display_name: str, prefix: bool, query: dict[str, str], parse: Parse
    ) -> RemoteJob | None:
        """The listed job with this display name (`prefix`: the newest whose name starts so);
        None only when a complete listing has none. Any failed or unreadable page raises: an
        incomplete listing proves nothing."""
        found: list[RemoteJob] = []
        for job in self._pages(self.jobs_path, query, parse):
            name = job.display_name or ""
            if name == display_name:
                return job
            if prefix and name.startswith(display_name):
                found.append(job)
        return max(found, key=lambda j: j.create_time or "", default=None)

    def _pages(self, path: str, query: dict[str, str], parse: Parse) -> Iterator[RemoteJob]:
        """Every job of a list, page after page; a page token seen before ends it (a loop)."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            page = {**query, "pageSize": LIST_PAGE_SIZE, **({"pageToken": token} if token else {})}
            jobs, token = parse(self._json("get", f"{path}?{urlencode(page)}", {}))
            yield from jobs
            if not token or token in seen:
                return
            seen.add(token)
