"""The API key is never written anywhere, and what the daemon writes is not world-readable.

Error paths matter most: the API's own error messages are made to carry the key, and the
daemon must still keep it out of every log line, sidecar, report and results file -- and out
of the pause reason that `status` shows.
"""

from __future__ import annotations

import stat
from typing import Any

import pytest

from daemon.simulator import Fault, Simulator
from tests.support.harness import TEST_API_KEY
from tests.support.inprocess import Daemon

LEAKY = f"the request carried {TEST_API_KEY}, which is refused"
CREATE = ":batchGenerateContent"
MakeDaemon = Any


def assert_private(daemon: Daemon) -> None:
    """Every file the daemon wrote (outbox files, sidecars) has no permission bits for others."""
    written = list(daemon.outbox.rglob("*")) + list(daemon.inbox.rglob("*.job.json"))
    assert written
    for path in written:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o007 == 0, f"{path} is mode {oct(mode)}"


def assert_key_nowhere(daemon: Daemon) -> None:
    for path in daemon.folder.all_written_files():
        assert TEST_API_KEY.encode() not in path.read_bytes(), path
    assert TEST_API_KEY not in daemon.log.getvalue()
    assert TEST_API_KEY not in daemon.service.status_text()


def test_key_absent_from_a_debug_run(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(log_level="debug")
    daemon.drop("ok.jsonl", ["hello", {"key": "k", "prompt": "again"}])
    daemon.run_all()
    assert [r["status"] for r in daemon.results("ok.jsonl")] == ["ok", "ok"]
    assert '"level": "debug"' in daemon.log.getvalue()  # the chattiest level, libraries included
    assert_key_nowhere(daemon)
    assert_private(daemon)


def test_key_in_a_refused_create_is_redacted(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.add_fault(Fault("POST", CREATE, status=400, times=5, message=LEAKY))
    daemon = make_daemon()
    daemon.drop("bad.jsonl", ["hello"])
    daemon.run_all()
    report = daemon.report("bad.jsonl")
    assert report["stage"] == "submission"
    assert "[redacted]" in report["message"]
    assert not sim.jobs
    assert_key_nowhere(daemon)
    assert_private(daemon)


def test_key_in_a_permission_error_is_redacted_from_the_pause_reason(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    fault = Fault("POST", CREATE, status=403, times=10**6, message=LEAKY)
    sim.add_fault(fault)
    daemon = make_daemon()
    daemon.drop("wait.jsonl", ["hello"])
    daemon.run_until(lambda: daemon.service.health.paused)
    assert "[redacted]" in (daemon.service.health.paused or "")
    assert "[redacted]" in daemon.service.status_text()
    assert_key_nowhere(daemon)
    fault.times = 0
    daemon.run_all()
    assert [r["status"] for r in daemon.results("wait.jsonl")] == ["ok"]
    assert_key_nowhere(daemon)


def test_key_in_transient_errors_is_redacted(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.add_fault(Fault("POST", CREATE, status=503, times=2, message=LEAKY))
    sim.add_fault(Fault("GET", "batches/", status=429, times=2, message=LEAKY))
    daemon = make_daemon()
    daemon.drop("retry.jsonl", ["hello"])
    daemon.run_all()
    assert "[redacted]" in daemon.log.getvalue()
    assert [r["status"] for r in daemon.results("retry.jsonl")] == ["ok"]
    assert_key_nowhere(daemon)


def test_key_in_a_failed_job_message_is_redacted(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("job.jsonl", ["hello"])
    daemon.run_until(lambda: daemon.state().get("job.jsonl") == "RUNNING")
    sim.set_job_state(daemon.sidecar("job.jsonl")["job_name"], "FAILED", message=LEAKY)
    daemon.run_all()
    report = daemon.report("job.jsonl")
    assert report["stage"] == "job" and "[redacted]" in report["message"]
    assert_key_nowhere(daemon)
    assert_private(daemon)


@pytest.mark.parametrize("status", [400, 401, 403])
def test_a_rejected_key_keeps_the_file_waiting_without_it(
    make_daemon: MakeDaemon, sim: Simulator, status: int
) -> None:
    """The server refuses the key: no error report (an operator can fix a key), no key anywhere."""
    sim.reject_key(status, message=f"API key not valid: {TEST_API_KEY}")
    daemon = make_daemon()
    daemon.drop("refused.jsonl", ["hello"])
    daemon.run_until(lambda: daemon.service.health.paused)
    for _ in range(10):
        daemon.tick()
        daemon.clock.advance(60)
    assert daemon.state() == {"refused.jsonl": "SUBMITTING"}
    assert not list(daemon.outbox.iterdir())
    assert_key_nowhere(daemon)
