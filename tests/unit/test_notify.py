"""daemon.notify: sd_notify datagrams on a real AF_UNIX socket, and SystemdStatus (READY, STATUS
when it changes, WATCHDOG only while work progresses)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import notify
from daemon.notify import Notifier, SystemdStatus


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


# ---- SystemdStatus: what the service tells systemd ------------------------------------------


class Monotonic:
    """notify.time as the service sees it, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def monotonic(monkeypatch: pytest.MonkeyPatch) -> Monotonic:
    fake = Monotonic()
    monkeypatch.setattr(notify, "time", fake)
    return fake


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, as its lines joined with '|'."""
    found = []
    sock.setblocking(False)
    while True:
        try:
            found.append(sock.recv(4096).decode().replace("\n", "|"))
        except BlockingIOError:
            return found


def watched(path: str, usec: int = 10_000_000) -> SystemdStatus:
    return SystemdStatus(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(usec)}))


def test_ready_sends_status_and_a_first_ping(
    listener: tuple[socket.socket, str], monotonic: Monotonic
) -> None:
    sock, path = listener
    watched(path).ready("0 queued, 0 active, 0 done, 0 failed")
    assert received(sock) == ["READY=1|STATUS=0 queued, 0 active, 0 done, 0 failed", "WATCHDOG=1"]


def test_status_is_sent_when_it_changes_at_most_twice_a_second(
    listener: tuple[socket.socket, str], monotonic: Monotonic
) -> None:
    sock, path = listener
    systemd = SystemdStatus(Notifier({"NOTIFY_SOCKET": path}))
    systemd.ready("a")
    received(sock)
    text = ["a"]
    systemd.tick(lambda: text[0], progressing=True)
    assert received(sock) == []  # unchanged
    text[0] = "b"
    monotonic.now += 0.1
    systemd.tick(lambda: text[0], progressing=True)
    assert received(sock) == []  # within half a second of the last look
    monotonic.now += SystemdStatus.STATUS_EVERY
    systemd.tick(lambda: text[0], progressing=True)
    assert received(sock) == ["STATUS=b"]
    monotonic.now += SystemdStatus.STATUS_EVERY
    systemd.tick(lambda: text[0], progressing=True)
    assert received(sock) == []  # sent once, not at every look


def test_status_is_not_even_computed_without_systemd(monotonic: Monotonic) -> None:
    systemd = SystemdStatus(Notifier({}))

    def status() -> str:
        raise AssertionError("computed for nobody")

    systemd.ready("x")
    systemd.tick(status, progressing=True)
    assert systemd.next_ping_in() == float("inf")


def test_watchdog_pings_at_half_the_interval_only_while_work_progresses(
    listener: tuple[socket.socket, str], monotonic: Monotonic
) -> None:
    """A daemon whose workers are stuck stops pinging, so systemd restarts it."""
    sock, path = listener
    systemd = watched(path, usec=10_000_000)  # pings every 5 s, each ping due 2.5 s on
    systemd.ready("s")
    received(sock)
    assert systemd.next_ping_in() == pytest.approx(2.5)
    monotonic.now += 2.0
    systemd.tick(lambda: "s", progressing=True)
    assert received(sock) == []
    assert systemd.next_ping_in() == pytest.approx(0.5)
    monotonic.now += 0.5
    systemd.tick(lambda: "s", progressing=True)
    assert received(sock) == ["WATCHDOG=1"]
    monotonic.now += 30
    systemd.tick(lambda: "s", progressing=False)
    assert received(sock) == []
    assert systemd.next_ping_in() == 0.0  # overdue: the main loop wakes, but may not ping


def test_reloading_and_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    systemd = SystemdStatus(Notifier({"NOTIFY_SOCKET": path}, clock_monotonic_us=lambda: 42))
    systemd.reloading()
    systemd.stopping()
    assert received(sock) == ["RELOADING=1|MONOTONIC_USEC=42", "STOPPING=1"]
