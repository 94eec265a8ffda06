"""Hostile input: one long-running daemon is fed every kind of bad file, then a good one.

Each bad file gets an error report naming the file, the line and the reason; nothing is
lost; the daemon never crashes; a good file dropped afterwards is still processed.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.simulator import Simulator
from tests.guarantees import (
    NoDacSpool,
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    can_drop_caps,
    outbox_entry,
    records,
    report,
    wait_started,
)
from tests.harness import Spool, wait_for

MAX_FILE_BYTES = 12_000_000
TEN_MB = 10 * 1024 * 1024


def _leases_work(folder: Path) -> bool:
    """Whether this filesystem grants read leases (how the watcher sees a file still open)."""
    probe = folder / "lease-probe"
    probe.write_text("x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _atime_is_tracked(folder: Path) -> bool:
    """Whether reading a file updates its atime here (not on noatime mounts)."""
    probe = folder / "atime-probe"
    probe.write_text("x")
    os.utime(probe, (1_000_000, probe.stat().st_mtime))
    probe.read_text()
    tracked = probe.stat().st_atime != 1_000_000
    probe.unlink()
    return tracked


@pytest.fixture
def hostile_spool(tmp_path: Path, sim: Simulator) -> Iterator[Spool]:
    cls = NoDacSpool if can_drop_caps() else Spool
    spool = cls(tmp_path, sim, limits={"max_file_bytes": MAX_FILE_BYTES}, log_level="info")
    yield spool
    spool.stop_all()


def _errors_by_line(rep: dict[str, Any]) -> dict[int, str]:
    return {e["line"]: e["message"] for e in rep.get("errors", [])}


def test_hostile_corpus_then_a_good_file(hostile_spool: Spool, sim: Simulator) -> None:
    spool = hostile_spool
    rng = random.Random(1234)
    inbox = spool.inbox
    proc = spool.start()
    wait_started(spool, proc)

    # A symlink to a valid input outside the inbox: the target must never be read or moved.
    target = spool.root / "target.jsonl"
    target.write_text('"the link target must never be submitted"\n')
    os.utime(target, (1_000_000, 2_000_000))
    target_stat = target.stat()
    check_atime = _atime_is_tracked(spool.root)

    # A slow writer: the file stays open for writing, growing now and then. Where leases work
    # it pauses longer than inbox_settle_seconds (0.3): only the open file keeps it waiting.
    slow_lines = [f"slow line {i}" for i in range(4)]
    pause_steps = 25 if _leases_work(spool.root) else 5
    slow_taken_early: list[bool] = []
    slow_closed = threading.Event()

    def slow_writer() -> None:
        with (inbox / "slow.jsonl").open("w") as handle:
            for line in slow_lines:
                handle.write(json.dumps(line) + "\n")
                handle.flush()
                for _ in range(pause_steps):  # 0.5 s (or 0.1 s) per line
                    time.sleep(0.02)
                    if not (inbox / "slow.jsonl").exists():
                        slow_taken_early.append(True)
        slow_closed.set()

    writer = threading.Thread(target=slow_writer)
    writer.start()

    bad: dict[str, bytes] = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n   \n\t\n\n",
        "latin1.jsonl": b'"fine"\n"caf\xe9"\n',
        "garbage.jsonl": rng.randbytes(4096),
        "scalars.jsonl": b'"fine"\n42\nnull\n',
        "noprompt.jsonl": b'{"key": "a", "text": "no prompt field"}\n',
        "dupkeys.jsonl": b'{"key": "k", "prompt": "one"}\n{"key": "k", "prompt": "two"}\n',
        "biginvalid.jsonl": b'{"prompt": "' + b"x" * TEN_MB + b"\n",
    }
    for name, data in bad.items():
        spool.drop(name, data)
    spool.drop("bigvalid.jsonl", [{"key": "big", "prompt": "y" * TEN_MB}])
    with (inbox / "toolarge.jsonl").open("wb") as handle:  # sparse: cheap to make
        handle.truncate(MAX_FILE_BYTES + 1)
    (inbox / "folder.jsonl").mkdir()
    os.symlink(target, inbox / "link.jsonl")
    spool.drop("unreadable.jsonl", ['"you cannot read me"'])
    os.chmod(inbox / "unreadable.jsonl", 0)
    unreadable_is_testable = can_drop_caps() or os.geteuid() != 0
    spool.drop("vanish.jsonl", ["gone"])
    try:
        (inbox / "vanish.jsonl").unlink()
        vanished = True
    except FileNotFoundError:  # the daemon was faster: then it must finish it normally
        vanished = False

    assert slow_closed.wait(timeout=30)
    writer.join()
    assert not slow_taken_early, "slow.jsonl was taken while still open for writing"

    spool.drop("good.jsonl", ["after all that", {"key": "g2", "prompt": "still working"}])
    names = [*bad, "bigvalid.jsonl", "toolarge.jsonl", "folder.jsonl", "link.jsonl"]
    names += ["unreadable.jsonl", "slow.jsonl", "good.jsonl"]
    if not vanished:
        names.append("vanish.jsonl")
    wait_for(lambda: all(spool.finished(n) for n in names), timeout=120)
    assert proc.poll() is None, "the daemon died"

    # Validation reports: the file, the line, the reason.
    def validation(name: str) -> dict[str, Any]:
        rep = report(spool, name)
        assert rep["input"] == name
        assert rep["stage"] == "validation"
        assert name in rep["message"]
        assert os.path.lexists(spool.inbox / "failed" / name)
        return rep

    for name in ("empty.jsonl", "blank.jsonl"):
        assert "no requests" in validation(name)["message"]
    assert "UTF-8" in _errors_by_line(validation("latin1.jsonl"))[2]
    assert validation("garbage.jsonl")["errors"]
    scalars = _errors_by_line(validation("scalars.jsonl"))
    assert set(scalars) == {2, 3} and "number" in scalars[2] and "null" in scalars[3]
    assert "prompt" in _errors_by_line(validation("noprompt.jsonl"))[1]
    assert "duplicate key" in _errors_by_line(validation("dupkeys.jsonl"))[2]
    big_invalid = validation("biginvalid.jsonl")
    assert "JSON" in _errors_by_line(big_invalid)[1]
    assert outbox_entry(spool, "biginvalid.jsonl").stat().st_size < 10_000, "echoes the line"
    assert "max_file_bytes" in validation("toolarge.jsonl")["message"]
    assert "regular file" in validation("folder.jsonl")["message"]
    assert "symbolic link" in validation("link.jsonl")["message"]
    if unreadable_is_testable:
        assert "read" in validation("unreadable.jsonl")["message"]

    # The symlink's target: untouched, unread, never submitted; the link itself was archived.
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        target_stat.st_ino,
        target_stat.st_mtime_ns,
        target_stat.st_size,
    )
    if check_atime:
        assert after.st_atime == 1_000_000, "the symlink target was read"
    assert target.read_text() == '"the link target must never be submitted"\n'
    assert (spool.inbox / "failed" / "link.jsonl").is_symlink()
    submitted = json.dumps(sim.jobs)
    assert "must never be submitted" not in submitted
    assert "you cannot read me" not in submitted or not unreadable_is_testable

    # The good ones.
    big = records(spool, "bigvalid.jsonl")
    assert len(big) == 1 and big[0]["status"] == "ok" and big[0]["key"] == "big"
    assert [r["text"] for r in records(spool, "slow.jsonl")] == [
        f"Simulated answer: {line}" for line in slow_lines
    ]
    assert [r["status"] for r in records(spool, "good.jsonl")] == ["ok", "ok"]
    if not vanished:
        assert records(spool, "vanish.jsonl")[0]["status"] == "ok"

    assert_nothing_lost(spool, names, jobs=len(sim.jobs))
    assert proc.poll() is None
    assert_no_stray_traceback(spool)
    assert_no_secret(spool)


def test_skip_line_mode_keeps_good_lines(spool: Spool) -> None:
    """Under on_invalid_line: skip_line, bad lines get `invalid` records in place."""
    spool.configure(on_invalid_line="skip_line")
    spool.drop("mixed.jsonl", b'"good"\n42\n\xff\xfe\n{"prompt": "also good"}\n')
    assert spool.run_once() == 0, spool.logs()[-3000:]
    recs = records(spool, "mixed.jsonl")
    assert [(r["line"], r["status"]) for r in recs] == [
        (1, "ok"),
        (2, "error"),
        (3, "error"),
        (4, "ok"),
    ]
    assert [r["error"]["stage"] for r in recs if r["status"] == "error"] == ["invalid", "invalid"]
    assert_nothing_lost(spool, ["mixed.jsonl"], jobs=1)
