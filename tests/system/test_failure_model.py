"""The failure model in-process: what time or an operator can fix never fails a file."""

from __future__ import annotations

from typing import Any

import pytest

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
