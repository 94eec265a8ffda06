"""API and file-system faults, in-process: what time or an operator can fix never fails a file;
what the API refuses gives an error report; every job is made at most once.

Faults are injected at the HTTP level of the simulator (the SDK sees real error replies, dropped
connections and outages) and in the daemon's own writes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from daemon import publish
from daemon.simulator import Fault, Simulator
from tests.support.guarantees import left_in_processing
from tests.support.harness import TEST_API_KEY
from tests.support.inprocess import Daemon

LINES = ["one", ["two", "parts"], {"key": "three", "prompt": "three"}]
CREATE = ":batchGenerateContent"
MakeDaemon = Any


def run_one(daemon: Daemon, lines: list[Any] | None = None, name: str = "f.jsonl") -> int:
    daemon.drop(name, lines or LINES)
    daemon.run_all()
    return daemon.exit_status()


def assert_ok(daemon: Daemon, name: str = "f.jsonl", jobs: int = 1) -> None:
    """The file finished with results, one outbox file, `jobs` jobs each made once."""
    assert [r["status"] for r in daemon.results(name)] == ["ok"] * len(LINES)
    assert (daemon.inbox / "done" / name).exists()
    assert sorted(p.name for p in daemon.outbox.iterdir()) == [name]
    assert not left_in_processing(daemon.inbox)
    sim = daemon.sim
    assert len(sim.jobs) == jobs
    assert all(sim.jobs_created_for(j["display_name"]) == 1 for j in sim.jobs.values())
    assert_no_secret(daemon)


def assert_report(daemon: Daemon, stage: str, name: str = "f.jsonl") -> dict[str, Any]:
    report = daemon.report(name)
    assert report["stage"] == stage and report["input"] == name
    assert (daemon.inbox / "failed" / name).exists()
    assert not (daemon.outbox / name).exists()
    assert_no_secret(daemon)
    return report


def assert_no_secret(daemon: Daemon) -> None:
    assert TEST_API_KEY not in daemon.log.getvalue()
    for path in daemon.folder.all_written_files():
        assert TEST_API_KEY.encode() not in path.read_bytes(), path


def retries(daemon: Daemon) -> list[dict[str, Any]]:
    return daemon.events("will retry") + daemon.events("step failed; will retry")


# ---- transient faults: the file stays in flight and completes, with exactly one job -------


@pytest.mark.parametrize(
    ("method", "path"), [("POST", CREATE), ("GET", "batches/")], ids=["create", "poll"]
)
def test_transient_faults_are_retried(
    make_daemon: MakeDaemon, sim: Simulator, method: str, path: str
) -> None:
    """429, 500, 503, 408, a dropped connection (0) and 502, one after the other, on one call."""
    statuses = [429, 500, 503, 408, 0, 502]
    for status in statuses:
        sim.add_fault(Fault(method, path, status=status, times=1))
    daemon = make_daemon()
    assert run_one(daemon) == 0
    assert_ok(daemon)
    failures = [e for e in retries(daemon) if e.get("kind") == "transient"]
    assert len(failures) >= len(statuses), failures
    assert not [f for f in sim._faults if f.path_contains == path], "a fault was not reached"


@pytest.mark.parametrize("status", [503, 0])
def test_lost_create_response_adopts_the_job(
    make_daemon: MakeDaemon, sim: Simulator, status: int
) -> None:
    """The server created the job but the reply was lost: the job is found, not made again."""
    sim.add_fault(Fault("POST", CREATE, status=status, times=1, after=True))
    daemon = make_daemon()
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert sim.create_calls == 1
    assert daemon.events("adopted a job created before a crash or a lost reply")


def test_a_garbled_create_reply_adopts_the_job(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.add_fault(Fault.garbled("truncated", after=True, path_contains=CREATE))
    daemon = make_daemon()
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert sim.create_calls == 1


@pytest.mark.parametrize(
    "name", ["batches/../../v1beta/files/evil", "operations/x", "batches/a/b", 42]
)
def test_a_create_reply_naming_a_job_of_an_unknown_shape_is_looked_up(
    make_daemon: MakeDaemon, sim: Simulator, name: Any
) -> None:
    """The name is never called: the create's outcome is unknown, so the job is looked up by
    its display name, found under its real name, adopted and collected."""

    def rename(op: dict[str, Any]) -> dict[str, Any]:
        return {**op, "name": name, "metadata": {**op["metadata"], "name": name}}

    sim.add_fault(Fault.rewritten(rename, method="POST", path_contains=CREATE))
    daemon = make_daemon()
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert sim.create_calls == 1
    assert not [p for _, p, _ in sim.requests_log if "evil" in p or "operations" in p]
    assert daemon.events("adopted a job created before a crash or a lost reply")


def test_a_job_slow_to_show_in_the_list_is_waited_for(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """The create's reply was lost and the listing lags: looked up again over the grace period,
    never created twice."""
    sim.list_lag_seconds = 20
    sim.add_fault(Fault("POST", CREATE, status=503, times=1, after=True))
    daemon = make_daemon(api={"lookup_grace_seconds": 60})
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert sim.create_calls == 1
    assert daemon.events("the job is not listed yet; looking again")


def test_a_create_that_never_happened_is_made_after_the_grace(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    sim.add_fault(Fault("POST", CREATE, status=0, times=1))  # dropped before the server acted
    daemon = make_daemon(api={"lookup_grace_seconds": 60})
    started = daemon.clock.now
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert sim.create_calls == 2
    assert daemon.events("no job was made; creating it")
    assert daemon.clock.now - started >= 60


def test_transient_faults_on_the_file_api_path(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.add_fault(Fault("POST", "upload/", status=503, times=2))
    sim.add_fault(Fault("POST", CREATE, status=503, times=1, after=True))
    sim.add_fault(Fault("GET", ":download", status=500, times=2))
    sim.add_fault(Fault("GET", ":download", status=0, times=1))
    daemon = make_daemon(limits={"inline_max_bytes": 10})
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert daemon.sidecar("f.jsonl")["jobs"][0]["mode"] == "file"
    assert not sim.files, "uploads and responses files are deleted"
    assert not sim._faults


def test_a_lost_upload_reply_leaves_no_stray_upload(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """The upload happened but its reply was lost: it is found and deleted, then uploaded again."""
    sim.add_fault(Fault("POST", "upload/", status=503, times=1, after=True))
    daemon = make_daemon(limits={"inline_max_bytes": 10})
    assert run_one(daemon) == 0
    assert_ok(daemon)
    assert not sim.files


def test_server_outage_while_running(make_daemon: MakeDaemon, sim: Simulator) -> None:
    daemon = make_daemon()
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("f.jsonl") == "RUNNING")
    sim.stop()
    daemon.run_until(lambda: retries(daemon))
    for _ in range(5):
        daemon.tick()
        daemon.clock.advance(10)
    assert daemon.state() == {"f.jsonl": "RUNNING"}
    sim.start()
    daemon.run_all()
    assert_ok(daemon)


def test_server_down_at_submission(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.stop()
    daemon = make_daemon()
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: retries(daemon))
    assert daemon.state() == {"f.jsonl": "SUBMITTING"}
    sim.start()
    daemon.run_all()
    assert_ok(daemon)


def test_a_permission_refused_at_create_waits_for_the_operator(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """403 PERMISSION_DENIED is the key's or the project's problem: no report, new work held."""
    fault = Fault("POST", CREATE, status=403, times=10**6)
    sim.add_fault(fault)
    daemon = make_daemon()
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: daemon.service.health.paused)
    for _ in range(10):
        daemon.tick()
        daemon.clock.advance(30)
    assert daemon.state() == {"f.jsonl": "SUBMITTING"} and not sim.jobs
    fault.times = 0
    daemon.run_all()
    assert_ok(daemon)


# ---- permanent faults: an error report, stage `submission` --------------------------------


@pytest.mark.parametrize("status", [400, 404])
def test_permanent_create_fault_is_a_submission_error(
    make_daemon: MakeDaemon, sim: Simulator, status: int
) -> None:
    sim.add_fault(Fault("POST", CREATE, status=status, times=5))
    daemon = make_daemon()
    assert run_one(daemon) == 1
    report = assert_report(daemon, "submission")
    assert str(status) in report["message"]
    assert (report["job_name"], report["errors"], report["error_count"]) == (None, [], 0)
    assert not sim.jobs and sim.create_calls == 1


def test_unknown_model_is_a_submission_error(make_daemon: MakeDaemon, sim: Simulator) -> None:
    daemon = make_daemon(model="does-not-exist")
    assert run_one(daemon) == 1
    report = assert_report(daemon, "submission")
    assert "404" in report["message"] and "does-not-exist" in report["message"]
    assert not sim.jobs


def test_permanent_upload_fault_is_a_submission_error(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    sim.add_fault(Fault("POST", "upload/", status=400, times=5))
    daemon = make_daemon(limits={"inline_max_bytes": 10})
    assert run_one(daemon) == 1
    assert_report(daemon, "submission")
    assert not sim.jobs and not sim.files


# ---- the job itself: gone, failed, cancelled, expired -------------------------------------


def test_job_the_api_no_longer_finds(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("f.jsonl") == "RUNNING")
    sim.forget_job(daemon.sidecar("f.jsonl")["job_name"])
    daemon.run_all()
    report = assert_report(daemon, "job")
    assert report["job_name"] and report["job_name"].startswith("batches/")
    assert "no longer exists" in report["message"]
    (job,) = daemon.sidecar("f.jsonl")["jobs"]
    assert sim.jobs_created_for(job["display_name"]) == 1


@pytest.mark.parametrize("outcome", ["FAILED", "CANCELLED", "EXPIRED"])
def test_unsuccessful_job_gets_a_report(
    make_daemon: MakeDaemon, sim: Simulator, outcome: str
) -> None:
    sim.outcome = outcome
    daemon = make_daemon()
    assert run_one(daemon) == 1
    report = assert_report(daemon, "job")
    sidecar = daemon.sidecar("f.jsonl")
    assert report["job_state"] == f"JOB_STATE_{outcome}"
    assert report["job_name"] == sidecar["job_name"] == sidecar["jobs"][0]["job_name"]
    assert outcome in report["message"]
    if outcome == "FAILED":
        assert "The batch job failed (simulated)." in report["message"]
    assert sidecar["job_state"] == f"JOB_STATE_{outcome}"
    assert len(sim.jobs) == 1


@pytest.mark.parametrize("mode", ["refuse", "fail"])
def test_the_token_quota_makes_a_job_wait_not_fail(
    make_daemon: MakeDaemon, sim: Simulator, mode: str
) -> None:
    """The enqueued-token quota refused the create (429), or the API made the job and then
    failed it for the quota: a reason to wait for jobs in flight, never an error report."""
    sim.enqueued_token_limit = 30  # one file's job (about 21 tokens) at a time
    sim.quota_mode = mode
    daemon = make_daemon()
    daemon.drop("a.jsonl", [f"first file, a long prompt {i}" for i in range(3)])
    daemon.run_until(lambda: sim.jobs)
    daemon.drop("b.jsonl", [f"second file, a long prompt {i}" for i in range(3)])
    daemon.run_all()
    for name in ("a.jsonl", "b.jsonl"):
        assert [r["status"] for r in daemon.results(name)] == ["ok"] * 3
    assert daemon.service.counters.quota_refusals >= 1
    assert len(sim.jobs) == (2 if mode == "refuse" else 3)  # a failed job stays listed


def test_succeeded_job_whose_requests_all_failed(make_daemon: MakeDaemon, sim: Simulator) -> None:
    lines = ["a [[sim:error=500]]", "b [[sim:error=429]]", {"key": "k", "prompt": "c"}]
    sim.fail_keys["k"] = 400
    daemon = make_daemon()
    assert run_one(daemon, lines) == 0
    records = daemon.results("f.jsonl")
    assert [r["status"] for r in records] == ["error"] * 3
    assert [r["error"]["stage"] for r in records] == ["request"] * 3
    assert [r["error"]["code"] for r in records] == [500, 429, 400]
    assert [r["attempts"] for r in records] == [3, 3, 1]  # the retryable ones got two more tries
    warnings = daemon.events("every request failed")
    assert warnings and warnings[0]["level"] == "warning"


def test_expired_job_is_resubmitted_once(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    daemon = make_daemon(expired_resubmits=1)
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("f.jsonl") == "RUNNING")
    (first,) = daemon.sidecar("f.jsonl")["jobs"]
    sim.pending_seconds = 5
    sim.set_job_state(first["job_name"], "EXPIRED")
    daemon.run_all()
    (job,) = daemon.sidecar("f.jsonl")["jobs"]
    assert job["expired_resubmits"] == 1 and job["attempt"] == 2
    assert job["job_name"] != first["job_name"]
    assert job["display_name"] != first["display_name"]
    assert sim.jobs_created_for(first["display_name"]) == 1
    assert sim.jobs_created_for(job["display_name"]) == 1
    assert len(sim.jobs) == 2
    assert [r["status"] for r in daemon.results("f.jsonl")] == ["ok"] * len(LINES)
    assert daemon.events("job expired; resubmitting")


def test_expired_twice_gives_a_report(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.outcome = "EXPIRED"
    daemon = make_daemon(expired_resubmits=1)
    assert run_one(daemon) == 1
    (job,) = daemon.sidecar("f.jsonl")["jobs"]
    assert job["expired_resubmits"] == 1
    assert len(sim.jobs) == 2
    report = assert_report(daemon, "job")
    assert report["job_state"] == "JOB_STATE_EXPIRED"


# ---- the outbox cannot be written -------------------------------------------------------


def test_a_write_failing_half_way_is_retried_and_shows_nothing(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up half-way through the results (EFBIG at the mid_write point, as a
    file-size limit gives): no partial file in the outbox; the write is retried until it works."""
    fail = {"times": 3}
    real = publish.crash_point

    def disk_full(name: str) -> None:
        if name == "mid_write" and fail["times"]:
            fail["times"] -= 1
            raise OSError(errno.EFBIG, "File too large")
        real(name)

    monkeypatch.setattr(publish, "crash_point", disk_full)
    daemon = make_daemon()
    daemon.drop("big.jsonl", [f"request number {i}" for i in range(40)])
    daemon.run_until(lambda: len(daemon.events("step failed; will retry")) >= 2)
    assert daemon.state() == {"big.jsonl": "WRITING"}
    assert [p.name for p in daemon.outbox.iterdir()] == []  # not even a temporary file
    failure = daemon.events("step failed; will retry")[0]
    assert (failure["kind"], failure["file"]) == ("local", "big.jsonl")
    daemon.run_all()
    records = daemon.results("big.jsonl")
    assert len(records) == 40 and all(r["status"] == "ok" for r in records)
    assert fail["times"] == 0


def test_an_outbox_that_cannot_be_written_is_retried(
    make_daemon: MakeDaemon, sim: Simulator, tmp_path: Path
) -> None:
    """The outbox is replaced by a plain file (what chmod does for a user other than root)."""
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("f.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("f.jsonl") == "RUNNING")
    real = tmp_path / "outbox.real"
    os.rename(daemon.outbox, real)
    daemon.outbox.write_text("not a folder\n")
    sim.set_job_state(daemon.sidecar("f.jsonl")["job_name"], "SUCCEEDED")
    daemon.run_until(lambda: len(daemon.events("step failed; will retry")) >= 2)
    assert daemon.state() == {"f.jsonl": "WRITING"}
    daemon.outbox.unlink()
    os.rename(real, daemon.outbox)
    daemon.run_all()
    assert_ok(daemon)
