"""The failure model in-process: what time or an operator can fix never fails a file."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from daemon import atomic
from daemon.cli import status as status_command
from daemon.simulator import Fault, Simulator

LINES = ["one", ["two", "parts"], {"key": "three", "prompt": "three"}]


def test_a_rejected_key_pauses_new_work_and_resumes(make_daemon: Any, sim: Simulator) -> None:
    sim.api_key = "a-different-key"
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.drop("b.jsonl", LINES)
    daemon.run_until(lambda: daemon.service.health.paused)
    for _ in range(20):
        daemon.tick()
        daemon.clock.advance(5)
    assert "API key" in (daemon.service.health.paused or "")
    assert "paused" in daemon.service.status_text()
    assert not sim.jobs
    assert set(daemon.state().values()) <= {"QUEUED", "SUBMITTING"}
    sim.api_key = None
    daemon.run_all()
    assert daemon.service.health.paused is None
    for name in ("a.jsonl", "b.jsonl"):
        assert [r["status"] for r in daemon.results(name)] == ["ok"] * 3
    assert len(sim.jobs) == 2


def test_one_404_on_a_poll_is_not_a_failure(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("a.jsonl") == "RUNNING")
    sim.add_fault(Fault("GET", "batches/", status=404, times=1))
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3


def test_a_job_gone_for_good_fails_the_file(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("a.jsonl") == "RUNNING")
    for name in list(sim.jobs):
        sim.forget_job(name)
    started = daemon.clock.now
    daemon.run_all()
    report = daemon.report("a.jsonl")
    assert report["stage"] == "job" and "no longer exists" in report["message"]
    assert daemon.clock.now - started >= daemon.config.poll.max_seconds


def test_an_unknown_model_is_refused_with_a_report(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon(model="does-not-exist")
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    report = daemon.report("a.jsonl")
    assert report["stage"] == "submission"
    assert report["errors"] == [] and report["error_count"] == 0
    assert not sim.jobs


def test_transient_faults_on_every_call_are_retried(make_daemon: Any, sim: Simulator) -> None:
    for status in (429, 500, 503, 0):
        sim.add_fault(Fault("POST", ":batchGenerateContent", status=status))
        sim.add_fault(Fault("GET", "batches/", status=status))
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3
    assert len(sim.jobs) == 1


@pytest.mark.parametrize("status", [400, 404, 403])
def test_a_proxy_4xx_page_after_the_job_was_made_is_looked_up_not_sent_again(
    make_daemon: Any, sim: Simulator, status: int
) -> None:
    """A proxy answers the create with an HTML 4xx page, but the job was made behind it: the
    daemon looks the job up by name and adopts it; it never creates a second one."""
    sim.add_fault(Fault("POST", ":batchGenerateContent", status=status, after=True, body="html"))
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3
    assert len(sim.jobs) == 1 and sim.create_calls == 1


def test_a_lost_upload_reply_leaves_no_upload_behind(make_daemon: Any, sim: Simulator) -> None:
    """The upload's reply is lost after the file was stored: the retry finds it (by display
    name) and deletes it before uploading again; nothing is left at the API."""
    sim.add_fault(Fault("POST", "upload_id=", status=503, after=True))
    daemon = make_daemon(limits={"inline_max_bytes": 10})
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3
    assert not sim.files
    assert len(sim.jobs) == 1


# ---- clock steps: every grace is elapsed time, never a wall-clock difference ---------------

CREATE = ":batchGenerateContent"


def lookups(sim: Simulator) -> int:
    return sum(1 for method, path, _ in sim.requests_log if method == "GET" and "batches?" in path)


@pytest.mark.parametrize("step", [3600, -86400], ids=["forward-1h", "back-1d"])
def test_a_create_in_doubt_is_looked_up_for_the_grace_whatever_the_wall_clock_does(
    make_daemon: Any, sim: Simulator, step: float
) -> None:
    """The create was made but its reply was lost, and the job shows in the list only after
    40 s; the wall clock jumps meanwhile. The job is found and adopted (forward: no second job
    for a grace that seems over), and looking never takes a day (back: no grace that seems
    to last a day)."""
    sim.list_lag_seconds = 40  # within the 60 s lookup grace of the tests' configuration
    sim.add_fault(Fault("POST", CREATE, status=0, after=True))
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: sim.create_calls == 1)
    daemon.clock.step_wall(step)
    started = daemon.clock.now
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3
    assert sim.create_calls == 1 and len(sim.jobs) == 1
    assert daemon.events("adopted a job created before a crash or a lost reply")
    assert daemon.clock.now - started < 600


@pytest.mark.parametrize("step", [3600, -86400], ids=["forward-1h", "back-1d"])
def test_a_create_that_never_happened_is_made_after_the_grace_in_elapsed_time(
    make_daemon: Any, sim: Simulator, step: float
) -> None:
    sim.add_fault(Fault("POST", CREATE, status=0))  # dropped before the job was made
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: sim.create_calls == 1)
    looked = lookups(sim)
    started = daemon.clock.now
    daemon.clock.step_wall(step)
    daemon.run_until(lambda: sim.create_calls == 2)
    waited = daemon.clock.now - started
    assert 60 <= waited < 120  # the configured grace, measured on the monotonic clock
    assert lookups(sim) - looked >= 2
    daemon.run_all()
    assert len(sim.jobs) == 1


def test_a_quota_backoff_survives_a_restart_after_the_clock_was_set_back(
    make_daemon: Any, sim: Simulator
) -> None:
    """A job deferred for the quota waits its backoff, no longer, after a restart under a
    clock set back a day (the deferral is kept as its length, not only as a time of day)."""
    sim.enqueued_token_limit = 1
    sim.quota_mode = "refuse"
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: daemon.sidecar("a.jsonl")["jobs"][0]["quota_waits"] == 1)
    defer = daemon.sidecar("a.jsonl")["jobs"][0]["defer_seconds"]
    assert defer > 0
    daemon.restart()
    daemon.clock.step_wall(-86400)
    sim.enqueued_token_limit = None
    started = daemon.clock.now
    daemon.run_until(lambda: len(sim.jobs) == 1)
    assert daemon.clock.now - started < defer + 61  # (+ a turn of the stepped loop), not a day
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3


# ---- a quota that never frees -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["refuse", "fail"])
def test_a_quota_that_never_frees_fails_the_file_after_the_limit_keeping_its_upload(
    make_daemon: Any, sim: Simulator, mode: str
) -> None:
    sim.enqueued_token_limit = 1  # nothing fits, ever
    sim.quota_mode = mode
    daemon = make_daemon(limits={"max_quota_wait_seconds": 600, "inline_max_bytes": 10})
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: (daemon.sidecar("a.jsonl")["jobs"][0]["quota_waits"] or 0) >= 2)
    row = next(
        r for r in status_command.snapshot(daemon.config)["files"] if r["input"] == "a.jsonl"
    )
    assert row["quota"]["waits"] >= 2
    assert "waiting for quota" in status_command.render_table(
        status_command.snapshot(daemon.config)
    )
    assert "waiting for quota" in daemon.service.status_text()
    daemon.run_all()
    report = daemon.report("a.jsonl")
    assert report["stage"] == "submission"
    assert (
        "enqueued-token quota" in report["message"]
        and "max_quota_wait_seconds" in report["message"]
    )
    uploads = [p for m, p, _ in sim.requests_log if m == "POST" and "upload_id=" in p]
    assert len(uploads) == 1  # uploaded once, created from the same upload each time
    assert not sim.files  # and deleted when the file failed
    delays = [e["retry_in"] for e in daemon.events("back to the queue")]
    assert delays[0] < 2 and max(delays) > 25  # backing off to the cap (30 s, ±10 %)


def test_run_once_leaves_a_quota_nothing_of_its_own_will_free_and_exits_1(
    make_daemon: Any, sim: Simulator
) -> None:
    sim.enqueued_token_limit = 1
    daemon = make_daemon(once=True)
    daemon.drop("stuck.jsonl", LINES)
    daemon.drop("empty.jsonl", b"\n")  # fails validation: finished
    daemon.start()
    daemon.run_until(daemon.service.once_finished)
    assert daemon.service.exit_status() == 1
    assert daemon.sidecar("stuck.jsonl")["state"] == "QUEUED"
    [record] = [t.record for t in daemon.service.files.values()]
    assert status_command.unfinished_line(record).startswith(
        "UNFINISHED stuck.jsonl: waiting for the enqueued-token quota (1 attempt(s))"
    )


# ---- the pause: one probe for the daemon, and everything resumes at once ------------------


def test_a_pause_makes_one_probe_a_minute_and_every_file_resumes_at_once(
    make_daemon: Any, sim: Simulator
) -> None:
    daemon = make_daemon(api={"probe_seconds": 60, "backoff_max_seconds": 3})
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        daemon.drop(name, LINES)
    daemon.run_until(lambda: daemon.state().get("a.jsonl") == "RUNNING")
    sim.reject_key(403)
    daemon.run_until(lambda: daemon.service.health.paused)
    calls = len(sim.requests_log)
    started = daemon.clock.now
    daemon.run_until(lambda: daemon.clock.now - started > 600, longest=5)
    refused = len(sim.requests_log) - calls
    assert refused <= 11, sim.requests_log[calls:]  # one probe a minute, not one per file
    sim.accept_key()
    daemon.run_until(lambda: not daemon.service.health.paused)
    resumed = daemon.clock.now
    daemon.run_until(lambda: len(sim.jobs) == 3 or daemon.clock.now - resumed > 1)
    assert daemon.clock.now - resumed <= 1  # the held-back creates went at once
    daemon.run_all()
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        assert [r["status"] for r in daemon.results(name)] == ["ok"] * 3


# ---- repeated trouble is said once a minute ----------------------------------------------


def test_a_full_disk_is_said_once_a_minute_not_once_per_file(
    make_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = atomic.write_file
    full = {"on": True}

    def no_space(target: Any, chunks: Any, **kwargs: Any) -> None:
        if full["on"] and str(target).startswith(str(daemon.outbox)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, chunks, **kwargs)

    daemon = make_daemon()
    monkeypatch.setattr(atomic, "write_file", no_space)
    for i in range(8):
        daemon.drop(f"f{i}.jsonl", LINES)
    started = daemon.clock.now
    daemon.run_until(lambda: len(daemon.events("step failed; will retry")) >= 40, longest=2)
    minutes = (daemon.clock.now - started) / 60
    warned = [
        line
        for line in daemon.log_events()
        if line.get("event") == "step failed; will retry" and line.get("level") == "warning"
    ]
    assert len(warned) <= minutes + 1, (len(warned), minutes)
    full["on"] = False
    daemon.run_all()
    assert all(daemon.results(f"f{i}.jsonl") for i in range(8))


# ---- a results file that cannot be read whole -------------------------------------------------

DEEP = b'{"key": "deep", "response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


def test_an_unreadable_results_file_ends_the_file_keeping_what_reads(
    make_daemon: Any, sim: Simulator
) -> None:
    """Its last line is JSON nested 100,000 deep (no parser takes it), download after download:
    after three, the readable answers are written, the rest are missing, the file fails with a
    report of stage `results` naming the results file, which is kept at the API."""
    sim.add_fault(
        Fault.rewritten_bytes(lambda body: body + DEEP, path_contains=":download", times=100)
    )
    daemon = make_daemon(limits={"inline_max_bytes": 10}, retry_requests=0)
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    report = daemon.report("a.jsonl")
    assert (
        report["stage"] == "results"
        and "could not be read whole after 3 downloads" in (report["message"])
    )
    kept = next(name for name in sim.files if name.startswith("files/batch-"))
    assert kept in report["message"]  # named, and still at the API
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 3
    downloads = [p for m, p, _ in sim.requests_log if ":download" in p]
    assert len(downloads) == 3
    assert (daemon.inbox / "failed" / "a.jsonl").exists()
