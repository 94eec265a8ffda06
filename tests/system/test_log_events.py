"""The log of each file's life, in-process: one event per step (claimed, validated, submitted,
results written, archived), each job state change once, a failure logged once with its job."""

from __future__ import annotations

from collections import Counter
from typing import Any

from daemon.simulator import Simulator
from tests.support.harness import TEST_API_KEY

MakeDaemon = Any

LIFECYCLE = ("claimed", "validated", "submitted", "results written", "archived")


def test_lifecycle_events_once_per_file(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(retry_requests=0)
    daemon.drop("good.jsonl", ["one", "two"])
    daemon.drop("other.jsonl", ["three"])
    daemon.drop("bad.jsonl", b'"fine"\n{broken\n')
    daemon.run_all()
    assert daemon.exit_status() == 1
    events = daemon.log_events()
    assert events
    assert TEST_API_KEY not in daemon.log.getvalue()

    def of(name: str, event: str) -> list[dict[str, Any]]:
        return [e for e in events if e.get("event") == event and e.get("file") == name]

    for name in ("good.jsonl", "other.jsonl"):
        job = daemon.sidecar(name)["job_name"]
        for event in LIFECYCLE:
            assert len(of(name, event)) == 1, (name, event)
        for event in ("submitted", "results written", "archived"):
            assert of(name, event)[0]["job"] == job, (name, event)
        changes = of(name, "job state changed")
        assert changes and all(e["job"] == job for e in changes)
        states = Counter(e["job_state"] for e in changes)
        assert max(states.values()) == 1, states
        assert changes[-1]["job_state"] == "JOB_STATE_SUCCEEDED"
        assert not of(name, "failed")

    assert len(of("bad.jsonl", "claimed")) == 1
    [failed] = of("bad.jsonl", "failed")
    assert failed["stage"] == "validation"
    assert failed["level"] == "warning"
    assert len(of("bad.jsonl", "archived")) == 1
    assert of("bad.jsonl", "archived")[0]["outcome"] == "failed"
    assert not of("bad.jsonl", "submitted")
    assert not of("bad.jsonl", "validated")


def test_a_failed_job_logs_failed_with_its_job(make_daemon: MakeDaemon, sim: Simulator) -> None:
    sim.outcome = "FAILED"
    daemon = make_daemon()
    daemon.drop("doomed.jsonl", ["x"])
    daemon.run_all()
    assert daemon.exit_status() == 1
    events = [e for e in daemon.log_events() if e.get("file") == "doomed.jsonl"]
    job = daemon.sidecar("doomed.jsonl")["job_name"]
    [failed] = [e for e in events if e["event"] == "failed"]
    assert failed["job"] == job
    assert failed["stage"] == "job"
    assert [e["event"] for e in events].count("archived") == 1
