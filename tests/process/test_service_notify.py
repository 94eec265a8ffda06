"""sd_notify end to end: the real daemon process talks to a real AF_UNIX datagram socket.

systemd (Type=notify, WatchdogSec=) relies on these messages: READY=1 once the start-up scan
is done, STATUS= lines with the file counts, WATCHDOG=1 at half the watchdog period whether
the daemon is idle or busy, RELOADING=1 + MONOTONIC_USEC then READY=1 around a SIGHUP, and
STOPPING=1 before a clean exit.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from daemon.simulator import Simulator
from tests.support.harness import Spool, wait_for

WATCHDOG_USEC = 600_000
"""systemd kills a service that stays silent this long; the daemon pings every half of it."""

STATUS = re.compile(r"(\d+) queued, (\d+) active, (\d+) done, (\d+) failed")


@dataclass
class Datagram:
    at: float  # time.monotonic() when received
    fields: dict[str, str]
    snapshot: Any = None  # what `on_ready` returned when READY=1 came in


@dataclass
class Listener:
    """Collects every datagram the daemon sends to $NOTIFY_SOCKET, in a background thread."""

    path: Path
    on_ready: Any = None
    messages: list[Datagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            snapshot = self.on_ready() if fields.get("READY") == "1" and self.on_ready else None
            with self._lock:
                self.messages.append(Datagram(at, fields, snapshot))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def all(self) -> list[Datagram]:
        with self._lock:
            return list(self.messages)

    def with_key(self, key: str, value: str | None = None) -> list[Datagram]:
        return [
            m for m in self.all() if key in m.fields and (value is None or m.fields[key] == value)
        ]

    def statuses(self) -> list[tuple[int, int, int, int]]:
        found = []
        for message in self.with_key("STATUS"):
            match = STATUS.search(message.fields["STATUS"])
            if match:
                found.append((int(match[1]), int(match[2]), int(match[3]), int(match[4])))
        return found

    def watchdog_gaps(self, start: float, end: float) -> list[float]:
        """Gaps between WATCHDOG=1 pings in [start, end], including the edges of the window."""
        times = [m.at for m in self.with_key("WATCHDOG", "1") if start <= m.at <= end]
        edges = [start, *times, end]
        return [b - a for a, b in itertools.pairwise(edges)]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX path too long for this tmp_path"
    sock_listener = Listener(path)
    yield sock_listener
    sock_listener.close()


def make_old(path: Path) -> None:
    """Backdate a file so the inbox watcher treats it as settled at start-up."""
    past = time.time() - 60
    os.utime(path, (past, past))


def test_ready_status_watchdog_and_stopping(spool: Spool, listener: Listener) -> None:
    make_old(spool.drop("early.jsonl", ["hello"]))
    claimed = spool.inbox / "processing" / "early.jsonl"
    listener.on_ready = claimed.exists
    proc = spool.start(env=listener.env())

    # READY=1 only once the files present at start are claimed (moved into processing/).
    [ready] = wait_for(lambda: listener.with_key("READY", "1"), timeout=30)
    assert ready.snapshot is True, "READY=1 was sent before the file present at start was claimed"
    assert STATUS.search(ready.fields.get("STATUS", "")), ready.fields

    # STATUS= follows the counts: queued, active, done, failed.
    wait_for(lambda: spool.finished("early.jsonl"), timeout=30)
    wait_for(lambda: (0, 0, 1, 0) in listener.statuses(), timeout=10)
    spool.drop("bad.jsonl", b"{not json\n")
    wait_for(lambda: spool.finished("bad.jsonl"), timeout=30)
    wait_for(lambda: (0, 0, 1, 1) in listener.statuses(), timeout=10)

    # WATCHDOG=1 all along, busy or idle, never a gap systemd would punish.
    time.sleep(1.0)
    gaps = listener.watchdog_gaps(ready.at, time.monotonic())
    assert len(gaps) >= 4
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    [stopping] = listener.with_key("STOPPING", "1")
    assert stopping.at >= started
    assert not [m for m in listener.with_key("READY") if m.at > started]


class SlowPolls(Simulator):
    """A simulator whose GET of a batch takes `delay` seconds: a poll step that blocks a worker."""

    delay = 1.5

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slow_calls = 0
        self.in_slow_call = threading.Event()

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Any:
        if method == "GET" and "/batches/" in raw_path:
            self.slow_calls += 1
            self.in_slow_call.set()
            time.sleep(self.delay)
            self.in_slow_call.clear()
        return super().handle(method, raw_path, headers, body)


def test_watchdog_pings_while_a_step_blocks(tmp_path: Path, listener: Listener) -> None:
    with SlowPolls(pending_seconds=0.0, running_seconds=0.0) as sim:
        spool = Spool(tmp_path / "spool", sim)
        try:
            spool.start(env=listener.env())
            wait_for(lambda: listener.with_key("READY", "1"), timeout=30)
            spool.drop("slow.jsonl", ["hello"])
            wait_for(sim.in_slow_call.is_set, timeout=30)
            start = time.monotonic()
            wait_for(lambda: not sim.in_slow_call.is_set(), timeout=30)
            end = time.monotonic()
            gaps = listener.watchdog_gaps(start, end)
            assert end - start > 1.0
            assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
            wait_for(lambda: spool.finished("slow.jsonl"), timeout=30)
        finally:
            spool.stop_all()


def test_sighup_sends_reloading_then_ready(spool: Spool, listener: Listener) -> None:
    proc = spool.start(env=listener.env())
    wait_for(lambda: listener.with_key("READY", "1"), timeout=30)
    readies_before = len(listener.with_key("READY", "1"))
    lo = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send_signal(signal.SIGHUP)
    reloading = wait_for(lambda: listener.with_key("RELOADING", "1"), timeout=10)[0]
    hi = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lo <= int(reloading.fields["MONOTONIC_USEC"]) <= hi
    wait_for(lambda: len(listener.with_key("READY", "1")) > readies_before, timeout=10)
    ready_after = listener.with_key("READY", "1")[readies_before]
    assert ready_after.at >= reloading.at
    assert proc.poll() is None
