"""Handing results on the systemd way: the example `.path` unit pair passes systemd-analyze, and a
watcher on the outbox (as a `.path` unit or inotifywait would be) only ever sees complete files."""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from daemon.simulator import Simulator
from tests.support.harness import Spool, wait_for

UNIT_DIR = Path(__file__).resolve().parent.parent.parent / "systemd"
PATH_UNIT = UNIT_DIR / "gemini-batchd-consumer.path"
CONSUMER = UNIT_DIR / "gemini-batchd-consumer.service"
CONSUMER_BINARY = "/usr/local/bin/gemini-batchd-consume"
ANALYZE = shutil.which("systemd-analyze")

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
EVENT = struct.Struct("iIII")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not on PATH")
def test_consumer_units_verify(tmp_path: Path) -> None:
    stub = tmp_path / "consume"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for unit in (PATH_UNIT, CONSUMER):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(CONSUMER_BINARY, str(stub)))
        copies.append(str(copy))
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        [ANALYZE, "--no-pager", "verify", *copies],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_consumer_units_settings() -> None:
    path_lines = PATH_UNIT.read_text().splitlines()
    assert "DirectoryNotEmpty=/var/lib/gemini-batchd/outbox" in path_lines
    assert f"Unit={CONSUMER.name}" in path_lines
    service = CONSUMER.read_text().splitlines()
    assert "Type=oneshot" in service
    assert f"ExecStart={CONSUMER_BINARY} /var/lib/gemini-batchd/outbox" in service
    for lines in (path_lines, service):  # every setting explained, as in the daemon's units
        for number, line in enumerate(lines):
            if "=" in line and not line.startswith(("#", ";", "[")):
                assert lines[number - 1].startswith("#"), line


class OutboxWatcher(threading.Thread):
    """inotify on the outbox: every name that appears is checked at once, as a consumer started by
    a `.path` unit would read it; names starting with a dot are ignored, as such a unit does."""

    def __init__(self, outbox: Path, expected: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.outbox = outbox
        self.expected = expected  # outbox name -> records a complete results file holds
        self.seen: list[str] = []
        self.problems: list[str] = []
        self.stop = threading.Event()
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        mask = IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_CLOSE_WRITE
        assert libc.inotify_add_watch(self.fd, str(outbox).encode(), mask) >= 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select([self.fd], [], [], 0.05)
                if ready:
                    self._read(os.read(self.fd, 1 << 16))
        finally:
            os.close(self.fd)

    def _read(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            _, mask, _, size = EVENT.unpack_from(data, offset)
            raw = data[offset + EVENT.size : offset + EVENT.size + size]
            offset += EVENT.size + size
            name = raw.rstrip(b"\0").decode()
            if name.startswith("."):
                continue
            if mask & (IN_MODIFY | IN_CLOSE_WRITE):
                self.problems.append(f"{name} was written in place")
            if mask & (IN_CREATE | IN_MOVED_TO):
                self.seen.append(name)
                problem = self._incomplete(name)
                if problem:
                    self.problems.append(f"{name} at first sight: {problem}")

    def _incomplete(self, name: str) -> str | None:
        data = (self.outbox / name).read_bytes()
        if name.endswith(".error.json"):
            try:
                report = json.loads(data)
            except ValueError as exc:
                return f"not a complete report: {exc}"
            return None if {"input", "stage", "error_count"} <= report.keys() else "fields missing"
        if not data.endswith(b"\n"):
            return "does not end with a newline"
        records = [json.loads(line) for line in data.splitlines()]
        if len(records) != self.expected.get(name):
            return f"{len(records)} records, expected {self.expected.get(name)}"
        if [r["line"] for r in records] != sorted(r["line"] for r in records):
            return "records out of order"
        return None


def test_the_outbox_only_ever_shows_complete_files(spool: Spool, sim: Simulator) -> None:
    sim.fail_keys = {"3": 400}
    spool.configure(
        limits={"inline_max_bytes": 2000},  # the bigger inputs use the File API
        api={"timeout_seconds": 60},  # a busy machine: no upload retries (a retry looks up files)
    )
    sizes = {f"r{i}.jsonl": n for i, n in enumerate([1, 2, 5, 40, 300, 3000, 7, 120])}
    expected = dict(sizes)
    spool.outbox.mkdir()
    watcher = OutboxWatcher(spool.outbox, expected)
    watcher.start()
    proc = spool.start()
    for name, count in sizes.items():
        spool.drop(name, [f"{name} prompt {i} " + "x" * 20 for i in range(count)])
    spool.drop("bad1.jsonl", b"{broken\n")
    spool.drop("bad2.jsonl", b"")
    names = [*sizes, "bad1.jsonl", "bad2.jsonl"]
    wait_for(lambda: all(spool.finished(n) for n in names), timeout=120)
    wait_for(lambda: len(watcher.seen) >= len(names), timeout=10)
    watcher.stop.set()
    watcher.join(timeout=5)
    proc.terminate()
    proc.wait(timeout=20)
    assert watcher.problems == []
    reports = {p.name: p.read_text() for p in spool.outbox.glob("r*.error.json")}
    assert reports == {}, reports
    assert sorted(watcher.seen) == sorted([*sizes, "bad1.error.json", "bad2.error.json"])


def test_the_watcher_sees_an_in_place_write(tmp_path: Path) -> None:
    """The check above is not vacuous: a file written under its final name is caught."""
    watcher = OutboxWatcher(tmp_path, {"x.jsonl": 2})
    watcher.start()
    with (tmp_path / "x.jsonl").open("w") as handle:
        handle.write('{"key": "1", "line": 1}\n')
        handle.flush()
        handle.write('{"key": "2", "line": 2}\n')
    wait_for(lambda: "x.jsonl was written in place" in watcher.problems, timeout=10)
    watcher.stop.set()
    watcher.join(timeout=5)
    assert watcher.seen == ["x.jsonl"]
