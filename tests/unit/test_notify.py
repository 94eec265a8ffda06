"""daemon.notify: sd_notify datagrams on a real AF_UNIX socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def assert_nothing_sent(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_ready_with_status(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("watching /var/lib/gemini-batchd/inbox")
    assert recv(sock) == b"READY=1\nSTATUS=watching /var/lib/gemini-batchd/inbox"
    n.ready()
    assert recv(sock) == b"READY=1"


def test_each_message(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path}, clock_monotonic_us=lambda: 123456789)
    n.status("3 jobs in flight")
    assert recv(sock) == b"STATUS=3 jobs in flight"
    n.reloading()
    assert recv(sock) == b"RELOADING=1\nMONOTONIC_USEC=123456789"
    n.watchdog()
    assert recv(sock) == b"WATCHDOG=1"
    n.stopping()
    assert recv(sock) == b"STOPPING=1"
    n.notify(STATUS="x", ERRNO="5")
    assert recv(sock) == b"STATUS=x\nERRNO=5"


def test_newlines_in_values_cannot_inject_fields(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("line one\nREADY=1")
    assert recv(sock) == b"STATUS=line one READY=1"


def test_utf8_status(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("café — 2 files")
    assert recv(sock) == "STATUS=café — 2 files".encode()


def test_default_clock_is_monotonic_microseconds(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    lo = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    hi = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(sock).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert lo <= int(value) <= hi


def test_abstract_socket() -> None:
    name = f"gemini-batchd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.ready("up")
        assert recv(sock) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative.sock"}])
def test_noop_without_notify_socket(env: dict[str, str]) -> None:
    n = Notifier({**env, "WATCHDOG_USEC": "60000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready("x")
    n.status("x")
    n.reloading()
    n.watchdog()
    n.stopping()
    n.notify(READY="1")


def test_reads_os_environ_by_default(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready()
    assert recv(sock) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


def test_environment_is_snapshotted(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    n = Notifier(env)
    env.clear()
    n.watchdog()
    assert recv(sock) == b"WATCHDOG=1"


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        n.ready("x")
        n.watchdog()
    assert any("sd_notify failed" in r.getMessage() for r in caplog.records)


def test_no_fields_sends_nothing(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).notify()
    assert_nothing_sent(sock)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "500"}, 0.00025),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    listener: tuple[socket.socket, str], extra: dict[str, str], expected: float | None
) -> None:
    _, path = listener
    assert Notifier({"NOTIFY_SOCKET": path, **extra}).watchdog_interval == expected
