"""daemon.api.http: a real `genai.Client` against raw in-process servers that answer slowly or never.

Each misbehaving server would hold a caller for minutes; every call here must fail within its
deadline and a small margin, leave no thread or socket behind, and close its connections.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon.api.http import DeadlineExceeded, deadline, http_options, ssl_context

DEADLINE = 0.5
"""Seconds: short, so that every test is quick."""

MARGIN = 0.5
"""Seconds a cut call may take beyond its deadline on a busy 2-core machine."""

PACE = 0.05
"""Seconds between two trickled bytes."""

JOB = json.dumps({"name": "batches/x", "metadata": {"state": "BATCH_STATE_RUNNING"}}).encode()

Handler = Callable[["Connection", "RawServer"], None]


class HungUp(Exception):
    """The client closed the connection."""


@dataclass
class Connection:
    """One accepted connection: reads requests, writes replies, notices the client leaving."""

    sock: socket.socket
    buffer: bytes = b""

    def recv(self, size: int = 65536) -> bytes:
        try:
            data = self.sock.recv(size)
        except (OSError, ValueError) as exc:
            raise HungUp from exc
        if not data:
            raise HungUp
        return data

    def read_head(self) -> str:
        """The request line and headers; `HungUp` when the client closed instead."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head.decode("latin-1")

    def read_body(self, head: str) -> bytes:
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buffer) < length:
            self.buffer += self.recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise HungUp from exc

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
        lines += ["Content-Type: application/json"] if body.startswith(b"{") else []
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def trickle(self, data: bytes) -> None:
        """One byte every PACE seconds, until the client hangs up."""
        for byte in data:
            self.send(bytes([byte]))
            if select.select([self.sock], [], [], PACE)[0]:
                self.recv()  # the client sends nothing more: this is its hang-up

    def wait_for_hang_up(self) -> None:
        while True:
            self.recv()


@dataclass
class RawServer:
    """A TCP server on 127.0.0.1 that gives each connection to `handler` in a thread of its own,
    and counts the requests, connections and the connections the client closed."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    receive_buffer: int | None = None
    heads: list[str] = field(default_factory=list)
    accepted: int = 0
    hung_up: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        if self.receive_buffer:  # inherited by accepted connections
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            if not select.select([self.listener], [], [], 0.02)[0]:
                continue
            sock, _ = self.listener.accept()
            self._socks.append(sock)
            with self._changed:
                self.accepted += 1
                self._changed.notify_all()
            self._start(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.tls:
                sock = self.tls.wrap_socket(sock, server_side=True)
                self._socks.append(sock)
            self.handler(Connection(sock), self)
        except (HungUp, OSError):
            with self._changed:
                self.hung_up += 1
                self._changed.notify_all()
        finally:
            sock.close()

    def wait_until_all_hung_up(self, timeout: float = 2.0) -> bool:
        """Whether the client closed every connection it opened."""
        with self._changed:
            return self._changed.wait_for(lambda: self.hung_up == self.accepted, timeout)

    def stop(self) -> None:
        self._stopping.set()
        self.release.set()
        for sock in self._socks:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        self.listener.close()


# Handlers: what a server does with each connection.


def answers(status: int = 200, body: bytes = JOB) -> Handler:
    """Answers every request on the connection at once (keep-alive)."""

    def handle(conn: Connection, server: RawServer) -> None:
        while True:
            head = conn.read_head()
            server.heads.append(head)
            conn.read_body(head)
            conn.reply(status, body)

    return handle


def trickles_body(conn: Connection, server: RawServer) -> None:
    server.heads.append(head := conn.read_head())
    conn.read_body(head)
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n")
    conn.trickle(b"{" + b" " * 9998 + b"}")


def trickles_head(conn: Connection, server: RawServer) -> None:
    server.heads.append(head := conn.read_head())
    conn.read_body(head)
    conn.trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"x" * 1000)


def never_answers(conn: Connection, server: RawServer) -> None:
    server.heads.append(conn.read_head())
    conn.wait_for_hang_up()


def drains_uploads_slowly(conn: Connection, server: RawServer) -> None:
    """Starts a resumable upload, then reads its bytes one at a time (until released)."""
    while True:
        server.heads.append(head := conn.read_head())
        if "/upload-session" not in head:
            conn.read_body(head)
            conn.reply(200, b"{}", x_goog_upload_url=f"{server.url}/upload-session")
            continue
        while not server.release.wait(PACE):
            conn.recv(1)
        conn.wait_for_hang_up()


# Fixtures


def open_sockets() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with suppress(OSError):  # the descriptor that listed the directory is gone by now
            count += os.readlink(fd).startswith("socket:")
    return count


Serve = Callable[..., RawServer]
ClientFor = Callable[..., genai.Client]

_clients: list[genai.Client] = []
"""The test's clients, kept alive until the leak check: a socket only garbage collection
would close counts as a leak."""


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test ends with the threads and sockets it started with (after its teardown)."""
    threads, sockets = set(threading.enumerate()), open_sockets()
    yield
    try:
        assert set(threading.enumerate()) <= threads
        assert open_sockets() <= sockets
    finally:
        _clients.clear()


@pytest.fixture
def serve() -> Iterator[Serve]:
    with ExitStack() as stack:

        def start(handler: Handler, **options: Any) -> RawServer:
            server = RawServer(handler, **options)
            stack.callback(server.stop)
            return server

        yield start


@pytest.fixture
def client_for() -> Iterator[ClientFor]:
    """Builds genai.Clients with `http_options`; closes them and their httpx2 clients after."""
    with ExitStack() as stack:

        def build(
            url: str, *, timeout_seconds: float = 30.0, attempts: int = 1, delay: float = 0.0
        ) -> genai.Client:
            retries = types.HttpRetryOptions(
                attempts=attempts, initial_delay=delay, max_delay=delay, jitter=0
            )
            options = http_options(
                base_url=url,
                api_version="v1beta",
                timeout_seconds=timeout_seconds,
                retry_options=retries,
            )
            client = genai.Client(api_key="test-key", http_options=options)
            _clients.append(client)
            assert options.httpx_client is not None
            stack.callback(options.httpx_client.close)
            stack.callback(client.close)
            return client

        yield build


def cut_after(seconds: float, call: Callable[[], object], *, late: float = 0.0) -> DeadlineExceeded:
    """Runs `call`, which must fail with DeadlineExceeded `seconds` (+ `late`) after it started."""
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        call()
    elapsed = time.monotonic() - start
    assert seconds - 0.05 <= elapsed < seconds + late + MARGIN
    return caught.value


def get_job(client: genai.Client, *, within: float | None = DEADLINE) -> types.BatchJob:
    """`batches.get` under a deadline block, or (within=None) under the client's own default."""
    if within is None:
        return client.batches.get(name="batches/x")
    with deadline(within):
        return client.batches.get(name="batches/x")


def download(client: genai.Client, *, within: float | None = DEADLINE) -> bytes:
    """A streamed `files.download`: its body is read after the SDK's send returned."""
    sink = io.BytesIO()
    if within is None:
        client.files.download(file="files/results", destination=sink)
    else:
        with deadline(within):
            client.files.download(file="files/results", destination=sink)
    return sink.getvalue()


# Tests

BY_BLOCK_OR_DEFAULT = pytest.mark.parametrize("block", [True, False], ids=["block", "default"])


def test_normal_calls_succeed_over_one_kept_alive_connection(
    serve: Serve, client_for: ClientFor
) -> None:
    server = serve(answers())
    client = client_for(server.url)
    assert get_job(client).name == "batches/x"
    assert get_job(client, within=None).name == "batches/x"
    assert server.heads[0].startswith("GET /v1beta/batches/x HTTP/1.1")
    assert server.accepted == 1
    client._api_client._httpx_client.close()
    assert server.wait_until_all_hung_up()


@BY_BLOCK_OR_DEFAULT
@pytest.mark.parametrize("handler", [trickles_body, trickles_head, never_answers])
def test_a_slow_reply_is_cut_at_the_deadline(
    serve: Serve, client_for: ClientFor, handler: Handler, block: bool
) -> None:
    server = serve(handler)
    # A per-read timeout alone (the SDK's HttpOptions.timeout) would let a trickle go on.
    client = client_for(server.url, timeout_seconds=30 if block else DEADLINE)
    error = cut_after(DEADLINE, lambda: get_job(client, within=DEADLINE if block else None))
    assert isinstance(error.__cause__, httpx2.ReadTimeout)
    assert server.wait_until_all_hung_up()


@BY_BLOCK_OR_DEFAULT
def test_a_trickled_download_is_cut_at_the_deadline(
    serve: Serve, client_for: ClientFor, block: bool
) -> None:
    server = serve(trickles_body)
    client = client_for(server.url, timeout_seconds=30 if block else DEADLINE)
    cut_after(DEADLINE, lambda: download(client, within=DEADLINE if block else None))
    assert server.heads[0].startswith("GET /v1beta/files/results:download?alt=media ")
    assert server.wait_until_all_hung_up()


def test_an_upload_the_server_drains_slowly_is_cut_at_the_deadline(
    serve: Serve, client_for: ClientFor
) -> None:
    server = serve(drains_uploads_slowly, receive_buffer=4096)
    client = client_for(server.url)
    data = io.BytesIO(b"x" * (6 * 1024 * 1024))  # more than the kernel buffers between us

    def upload() -> None:
        with deadline(DEADLINE):
            client.files.upload(file=data, config={"mime_type": "application/jsonl"})

    error = cut_after(DEADLINE, upload)
    assert isinstance(error.__cause__, httpx2.WriteTimeout)
    server.release.set()
    assert server.wait_until_all_hung_up()


def test_a_connect_that_hangs_is_cut_at_the_deadline(client_for: ClientFor) -> None:
    listener = socket.socket()  # a full backlog: the kernel drops further SYNs
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    with ExitStack() as stack:
        stack.callback(listener.close)
        for _ in range(3):
            filler = socket.socket()
            stack.callback(filler.close)
            filler.setblocking(False)
            filler.connect_ex(address)
        client = client_for(f"http://127.0.0.1:{address[1]}")
        error = cut_after(DEADLINE, lambda: get_job(client))
    assert isinstance(error.__cause__, httpx2.ConnectTimeout)


def test_the_deadline_covers_the_sdk_retries(serve: Serve, client_for: ClientFor) -> None:
    server = serve(answers(503, b'{"error": {"code": 503, "message": "busy"}}'))
    client = client_for(server.url, attempts=8, delay=0.15)
    # Alone the eight attempts take 7 x 0.15 s. No attempt starts after the deadline; only
    # the SDK's backoff sleep that crosses it runs to its end.
    cut_after(DEADLINE, lambda: get_job(client), late=0.15)
    assert 2 <= len(server.heads) <= 5
    with pytest.raises(errors.ServerError):  # without a deadline block: every attempt, then 503
        client.batches.get(name="batches/x")
    assert len(server.heads) >= 10


def test_a_stalled_attempt_is_retried_while_time_is_left(
    serve: Serve, client_for: ClientFor
) -> None:
    server = serve(never_answers)
    client = client_for(server.url, timeout_seconds=0.3, attempts=5, delay=0.05)
    # Attempt 1 times out per read at 0.3 s (retried); attempt 2 meets the deadline (not).
    error = cut_after(DEADLINE, lambda: get_job(client))
    assert isinstance(error.__cause__, httpx2.ReadTimeout)
    assert server.accepted == 2
    assert server.wait_until_all_hung_up()


def test_nested_deadlines_keep_the_earlier(serve: Serve, client_for: ClientFor) -> None:
    client = client_for(serve(never_answers).url)
    with deadline(30):
        cut_after(DEADLINE, lambda: get_job(client, within=DEADLINE))
    with deadline(DEADLINE):
        cut_after(DEADLINE, lambda: get_job(client, within=30))


@BY_BLOCK_OR_DEFAULT
def test_a_large_fast_download_is_whole_within_a_long_enough_deadline(
    serve: Serve, client_for: ClientFor, block: bool
) -> None:
    payload = os.urandom(1024) * (20 * 1024)  # 20 MiB
    server = serve(answers(body=payload))
    client = client_for(server.url, timeout_seconds=30)
    data = download(client, within=30 if block else None)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


def test_a_deadline_exceeded_is_a_transport_error_the_sdk_does_not_retry() -> None:
    assert issubclass(DeadlineExceeded, httpx2.TransportError)
    assert not issubclass(DeadlineExceeded, httpx2.TimeoutException)
    with pytest.raises(ValueError), deadline(0):
        pass


def test_proxies_from_the_environment_are_used_and_keep_deadlines(
    serve: Serve, client_for: ClientFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = serve(answers())
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert get_job(client_for("http://gemini.invalid")).name == "batches/x"
    assert proxy.heads[0].startswith("GET http://gemini.invalid/v1beta/batches/x HTTP/1.1")

    slow_proxy = serve(trickles_body)
    monkeypatch.setenv("HTTP_PROXY", slow_proxy.url)
    client = client_for("http://gemini.invalid")
    cut_after(DEADLINE, lambda: get_job(client))
    assert slow_proxy.wait_until_all_hung_up()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    pytest.importorskip("cryptography")  # installed with google-auth, not a dependency of ours
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_uses_the_sdk_ssl_context_and_keeps_deadlines(
    serve: Serve, client_for: ClientFor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)

    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert ssl_context().verify_mode == ssl.CERT_REQUIRED
    server = serve(answers(), tls=server_context)
    with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        get_job(client_for(server.url))  # not trusted: the certificate is checked

    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # the SDK trusts what this names
    assert get_job(client_for(server.url)).name == "batches/x"
    slow = serve(trickles_body, tls=server_context)
    client = client_for(slow.url)
    cut_after(DEADLINE, lambda: get_job(client))
    assert slow.wait_until_all_hung_up()
