"""File modes bind: an input the daemon may not read gets an error report, an outbox it may not
write is retried until it can. Root ignores modes, so as root the daemon runs without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv): a real process with its own capabilities.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.simulator import Simulator
from tests.support.guarantees import (
    NoDacSpool,
    assert_nothing_lost,
    can_drop_caps,
    records,
    report,
    state_of,
    wait_started,
)
from tests.support.harness import Spool, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() == 0 and not can_drop_caps(), reason="as root, needs setpriv to drop DAC caps"
)


@pytest.fixture
def spool(tmp_path: Path, sim: Simulator) -> Iterator[Spool]:
    s = (NoDacSpool if os.geteuid() == 0 else Spool)(tmp_path, sim)
    yield s
    s.stop_all()
    if not s.outbox.is_dir():
        return
    s.outbox.chmod(0o755)


def events(spool: Spool, name: str) -> list[dict[str, object]]:
    return [e for e in spool.log_events() if e.get("event") == name]


def test_unreadable_input_and_read_only_outbox(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    proc = spool.start()
    wait_started(spool, proc)
    spool.drop("unreadable.jsonl", ['"you cannot read me"'])
    os.chmod(spool.inbox / "unreadable.jsonl", 0)
    spool.drop("f.jsonl", ["one", "two"])
    wait_for(lambda: spool.finished("unreadable.jsonl"), timeout=30)
    rep = report(spool, "unreadable.jsonl")
    assert rep["stage"] == "validation" and "cannot read" in rep["message"]
    assert "you cannot read me" not in json.dumps(sim.jobs)

    wait_for(lambda: state_of(spool, "f.jsonl") == "RUNNING", timeout=30)
    spool.outbox.chmod(0o555)
    sim.set_job_state(spool.sidecar("f.jsonl")["job_name"], "SUCCEEDED")
    wait_for(lambda: len(events(spool, "step failed; will retry")) >= 2, timeout=30)
    assert proc.poll() is None
    assert state_of(spool, "f.jsonl") == "WRITING"
    assert [p.name for p in spool.outbox.iterdir()] == ["unreadable.error.json"]  # no temp file
    spool.outbox.chmod(0o755)
    wait_for(lambda: spool.finished("f.jsonl"), timeout=30)
    assert [r["status"] for r in records(spool, "f.jsonl")] == ["ok", "ok"]
    assert_nothing_lost(spool, ["unreadable.jsonl", "f.jsonl"], jobs=1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
