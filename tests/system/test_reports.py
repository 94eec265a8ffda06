"""Every error report carries every field of the contract, whatever the kind of failure."""

from __future__ import annotations

from typing import Any

from daemon.simulator import Simulator
from tests.support.guarantees import CONTRACT_REPORT_FIELDS
from tests.support.inprocess import Daemon


def check(daemon: Daemon, name: str, stage: str) -> dict[str, Any]:
    report = daemon.report(name)
    assert report.keys() >= CONTRACT_REPORT_FIELDS, report
    assert isinstance(report["errors"], list) and isinstance(report["error_count"], int)
    assert report["error_count"] >= len(report["errors"])
    assert report["stage"] == stage
    return report


def test_reports_of_every_kind_carry_errors_and_error_count(
    make_daemon: Any, sim: Simulator
) -> None:
    daemon = make_daemon()
    daemon.drop("invalid.jsonl", b'"ok"\n{"prompt": "missing brace"\n')
    daemon.drop("empty.jsonl", b"\n\n")
    daemon.run_all()
    invalid = check(daemon, "invalid.jsonl", "validation")
    assert invalid["error_count"] == 1 and invalid["errors"][0]["line"] == 2
    assert check(daemon, "empty.jsonl", "validation")["error_count"] == 0

    sim.outcome = "FAILED"
    daemon.drop("job.jsonl", ["x"])
    daemon.run_all()
    job = check(daemon, "job.jsonl", "job")
    assert (job["errors"], job["error_count"]) == ([], 0)
    assert job["job_state"] == "JOB_STATE_FAILED" and job["job_name"].startswith("batches/")
    sim.outcome = None

    refused = make_daemon(model="does-not-exist")
    refused.drop("model.jsonl", ["x"])
    refused.run_all()
    model = check(refused, "model.jsonl", "submission")
    assert (model["errors"], model["error_count"], model["job_name"]) == ([], 0, None)
