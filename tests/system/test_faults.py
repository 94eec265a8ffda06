"""API and file-system faults: transient ones never fail a file, permanent ones give a report.

Every scenario runs the real daemon against the simulator with faults injected at the HTTP
level, and checks the guarantees: the file finishes, one outbox file, at most one job.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest

from daemon.simulator import Fault, Simulator
from tests.guarantees import (
    NoDacSpool,
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    can_drop_caps,
    records,
    report,
    state_of,
    wait_started,
)
from tests.harness import Spool, wait_for

LINES = ["one", ["two", "parts"], {"key": "three", "prompt": "three"}]
CREATE = ":batchGenerateContent"


def _clear_faults(sim: Simulator) -> None:
    with sim._lock:
        sim._faults.clear()


def _events(spool: Spool, event: str) -> list[dict[str, object]]:
    return [e for e in spool.log_events() if e.get("event") == event]


def _run_one(spool: Spool, name: str = "f.jsonl", lines: list[object] | None = None) -> int:
    spool.drop(name, lines or LINES)
    return spool.run_once(timeout=90)


def _assert_ok(spool: Spool, name: str = "f.jsonl", jobs: int = 1) -> None:
    assert_nothing_lost(spool, [name], jobs=jobs)
    assert [r["status"] for r in records(spool, name)] == ["ok"] * len(LINES)
    assert spool.finished(name)
    assert_no_secret(spool)
    assert_no_stray_traceback(spool)


# ---- transient faults: the file stays in flight and completes, with exactly one job -------


@pytest.mark.parametrize(
    ("method", "path"), [("POST", CREATE), ("GET", "batches/")], ids=["create", "poll"]
)
def test_transient_faults_are_retried(spool: Spool, sim: Simulator, method: str, path: str) -> None:
    """429, 500, 503, 408 and a dropped connection (0), one after the other, on one call."""
    statuses = [429, 500, 503, 408, 0, 502]
    for status in statuses:
        sim.add_fault(Fault(method, path, status=status, times=1))
    assert _run_one(spool) == 0, spool.logs()[-3000:]
    _assert_ok(spool)
    failures = _events(spool, "transient API failure; will retry")
    assert len(failures) >= len(statuses), failures
    assert not [f for f in sim._faults if f.path_contains == path], "a fault was not reached"


@pytest.mark.parametrize("status", [503, 0])
def test_lost_create_response_adopts_the_job(spool: Spool, sim: Simulator, status: int) -> None:
    """The server created the job but the reply was lost: the job is found, not made again."""
    sim.add_fault(Fault("POST", CREATE, status=status, times=1, after=True))
    assert _run_one(spool) == 0, spool.logs()[-3000:]
    _assert_ok(spool)
    assert sim.create_calls == 1
    assert _events(spool, "adopted a job created before a crash or a lost reply")


def test_transient_faults_on_the_file_api_path(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 10})
    try:
        sim.add_fault(Fault("POST", "upload/", status=503, times=2))
        sim.add_fault(Fault("POST", CREATE, status=503, times=1, after=True))
        sim.add_fault(Fault("GET", ":download", status=500, times=2))
        sim.add_fault(Fault("GET", ":download", status=0, times=1))
        assert _run_one(spool) == 0, spool.logs()[-3000:]
        _assert_ok(spool)
        assert spool.sidecar("f.jsonl")["mode"] == "file"
    finally:
        spool.stop_all()


def test_server_outage_while_running(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 1.0
    spool.drop("f.jsonl", LINES)
    proc = spool.start()
    wait_for(lambda: state_of(spool, "f.jsonl") == "running", timeout=30)
    sim.stop()
    wait_for(lambda: _events(spool, "transient API failure; will retry"), timeout=30)
    time.sleep(0.5)
    sim.start()
    wait_for(lambda: spool.finished("f.jsonl"), timeout=60)
    assert proc.poll() is None
    _assert_ok(spool)


def test_server_down_at_submission(spool: Spool, sim: Simulator) -> None:
    sim.stop()
    spool.drop("f.jsonl", LINES)
    proc = spool.start()
    wait_for(lambda: _events(spool, "transient API failure; will retry"), timeout=30)
    assert state_of(spool, "f.jsonl") == "submitting"
    sim.start()
    wait_for(lambda: spool.finished("f.jsonl"), timeout=60)
    assert proc.poll() is None
    _assert_ok(spool)


# ---- permanent faults: an error report, stage `submission` --------------------------------


@pytest.mark.parametrize("status", [400, 403, 404])
def test_permanent_create_fault_is_a_submission_error(
    spool: Spool, sim: Simulator, status: int
) -> None:
    sim.add_fault(Fault("POST", CREATE, status=status, times=5))
    assert _run_one(spool) == 1
    assert_nothing_lost(spool, ["f.jsonl"], jobs=0)
    rep = report(spool, "f.jsonl")
    assert rep["stage"] == "submission"
    assert rep["input"] == "f.jsonl"
    assert str(status) in rep["message"]
    assert spool.finished("f.jsonl") and (spool.inbox / "failed" / "f.jsonl").exists()
    assert_no_secret(spool)


def test_unknown_model_is_a_submission_error(spool: Spool, sim: Simulator) -> None:
    spool.configure(model="does-not-exist")
    assert _run_one(spool) == 1
    rep = report(spool, "f.jsonl")
    assert rep["stage"] == "submission"
    assert "404" in rep["message"] and "does-not-exist" in rep["message"]
    assert_nothing_lost(spool, ["f.jsonl"], jobs=0)


def test_permanent_upload_fault_is_a_submission_error(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 10})
    try:
        sim.add_fault(Fault("POST", "upload/", status=400, times=5))
        assert _run_one(spool) == 1
        assert report(spool, "f.jsonl")["stage"] == "submission"
        assert_nothing_lost(spool, ["f.jsonl"], jobs=0)
    finally:
        spool.stop_all()


# ---- the job itself: gone, failed, cancelled, expired -------------------------------------


def test_job_the_api_no_longer_finds(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    spool.drop("f.jsonl", LINES)
    proc = spool.start()
    wait_for(lambda: state_of(spool, "f.jsonl") == "running", timeout=30)
    sim.forget_job(spool.sidecar("f.jsonl")["job_name"])
    wait_for(lambda: spool.finished("f.jsonl"), timeout=30)
    assert proc.poll() is None
    rep = report(spool, "f.jsonl")
    assert rep["stage"] == "job"
    assert rep["job_name"] and rep["job_name"].startswith("batches/")
    assert_nothing_lost(spool, ["f.jsonl"])
    assert sim.jobs_created_for(spool.sidecar("f.jsonl")["display_name"]) == 1


@pytest.mark.parametrize("outcome", ["FAILED", "CANCELLED", "EXPIRED"])
def test_unsuccessful_job_gets_a_report(spool: Spool, sim: Simulator, outcome: str) -> None:
    sim.outcome = outcome
    assert _run_one(spool) == 1
    assert_nothing_lost(spool, ["f.jsonl"], jobs=1)
    rep = report(spool, "f.jsonl")
    assert rep["stage"] == "job"
    assert rep["job_state"] == f"JOB_STATE_{outcome}"
    assert rep["job_name"] == spool.sidecar("f.jsonl")["job_name"]
    assert outcome in rep["message"] and rep["message"]
    if outcome == "FAILED":
        assert "The batch job failed (simulated)." in rep["message"]
    assert spool.sidecar("f.jsonl")["job_state"] == f"JOB_STATE_{outcome}"


def test_succeeded_job_whose_requests_all_failed(spool: Spool, sim: Simulator) -> None:
    lines = ["a [[sim:error=500]]", "b [[sim:error=429]]", {"key": "k", "prompt": "c"}]
    sim.fail_keys["k"] = 400
    assert _run_one(spool, lines=lines) == 0
    assert_nothing_lost(spool, ["f.jsonl"], jobs=1)
    recs = records(spool, "f.jsonl")
    assert [r["status"] for r in recs] == ["error"] * 3
    assert [r["error"]["stage"] for r in recs] == ["request"] * 3
    assert [r["error"]["code"] for r in recs] == [500, 429, 400]
    warnings = _events(spool, "the job succeeded but every request failed")
    assert warnings and warnings[0]["level"] == "warning"


def test_expired_job_is_resubmitted_once(spool: Spool, sim: Simulator) -> None:
    spool.configure(expired_resubmits=1)
    sim.pending_seconds = 3600
    spool.drop("f.jsonl", LINES)
    proc = spool.start()
    wait_for(lambda: state_of(spool, "f.jsonl") == "running", timeout=30)
    first = spool.sidecar("f.jsonl")
    sim.pending_seconds = 0.1
    sim.set_job_state(first["job_name"], "EXPIRED")
    wait_for(lambda: spool.finished("f.jsonl"), timeout=30)
    assert proc.poll() is None
    car = spool.sidecar("f.jsonl")
    assert car["expired_resubmits"] == 1
    assert car["job_name"] != first["job_name"]
    assert car["display_name"] != first["display_name"]
    assert sim.jobs_created_for(first["display_name"]) == 1
    assert sim.jobs_created_for(car["display_name"]) == 1
    assert len(sim.jobs) == 2
    assert [r["status"] for r in records(spool, "f.jsonl")] == ["ok"] * len(LINES)
    assert _events(spool, "job expired; resubmitting")


def test_expired_twice_gives_a_report(spool: Spool, sim: Simulator) -> None:
    spool.configure(expired_resubmits=1)
    sim.outcome = "EXPIRED"
    assert _run_one(spool) == 1
    car = spool.sidecar("f.jsonl")
    assert car["expired_resubmits"] == 1
    assert len(sim.jobs) == 2
    rep = report(spool, "f.jsonl")
    assert rep["stage"] == "job" and rep["job_state"] == "JOB_STATE_EXPIRED"


# ---- the outbox cannot be written -------------------------------------------------------


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit(2) (Linux)")
def test_outbox_write_failure_mid_file_is_retried(tmp_path: Path, sim: Simulator) -> None:
    """Writes over a size limit fail half-way (EFBIG), as on a full disk: no partial file shows.

    `chmod` does not stop root, so the daemon's RLIMIT_FSIZE is lowered from outside
    (prlimit) below the results file's size, and raised again later.
    """
    spool = Spool(tmp_path, sim, log_level="info")
    lines = [f"request number {i} " + "x" * 100 for i in range(400)]  # about 120 KB of results
    try:
        proc = spool.start()
        wait_started(spool, proc)
        limit = 64 * 1024
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        spool.drop("big.jsonl", lines)
        failures = wait_for(
            lambda: [
                e for e in spool.log_events() if e.get("event") == "file system error; will retry"
            ],
            timeout=30,
        )
        assert spool.log_paths[0].stat().st_size < limit, "the log itself hit the limit"
        for _ in range(20):  # while it fails, nothing partial is visible in the outbox
            assert list(spool.outbox.iterdir()) == [] or all(
                p.name.startswith(".") for p in spool.outbox.iterdir()
            )
            assert not (spool.outbox / "big.jsonl").exists()
            time.sleep(0.02)
        assert proc.poll() is None
        assert "big.jsonl" in str(failures[0])
        resource.prlimit(
            proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        wait_for(lambda: spool.finished("big.jsonl"), timeout=30)
        assert_nothing_lost(spool, ["big.jsonl"], jobs=1)
        recs = records(spool, "big.jsonl")
        assert len(recs) == 400 and all(r["status"] == "ok" for r in recs)
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_read_only_outbox_is_retried(tmp_path: Path, sim: Simulator) -> None:
    """The outbox cannot be written (chmod 0o555): the daemon logs it and retries until it can.

    Root ignores file modes, so as root the daemon runs without CAP_DAC_OVERRIDE (setpriv);
    where that is impossible the outbox is replaced by a plain file instead.
    """
    use_chmod = can_drop_caps() or os.geteuid() != 0
    spool = (NoDacSpool if can_drop_caps() else Spool)(tmp_path, sim)
    try:
        sim.pending_seconds = 3600
        proc = spool.start()
        wait_started(spool, proc)
        spool.drop("f.jsonl", LINES)
        wait_for(lambda: state_of(spool, "f.jsonl") == "running", timeout=30)
        real = spool.root / "outbox.real"
        if use_chmod:
            spool.outbox.chmod(0o555)
        else:
            os.rename(spool.outbox, real)
            spool.outbox.write_text("not a folder\n")
        sim.set_job_state(spool.sidecar("f.jsonl")["job_name"], "SUCCEEDED")
        wait_for(lambda: len(_events(spool, "file system error; will retry")) >= 2, timeout=30)
        assert proc.poll() is None
        assert state_of(spool, "f.jsonl") == "writing"
        if use_chmod:
            assert list(spool.outbox.iterdir()) == []  # not even a temporary file
            spool.outbox.chmod(0o755)
        else:
            spool.outbox.unlink()
            os.rename(real, spool.outbox)
        wait_for(lambda: spool.finished("f.jsonl"), timeout=30)
        _assert_ok(spool)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if spool.outbox.is_dir():
            spool.outbox.chmod(0o755)
        spool.stop_all()
