"""A file's whole life, in-process: inline and File API jobs, parts, follow-up rounds."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.simulator import Fault, Simulator
from daemon.simulator.answers import image_base64

LINES: list[Any] = [
    "hello",
    ["first part", "second part"],
    {"key": "k3", "prompt": "json please [[sim:fenced]]", "filter_json": True},
    {"key": "native", "request": {"contents": [{"role": "user", "parts": [{"text": "raw"}]}]}},
]


def test_inline_file_gets_results_in_order(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    records = daemon.results("a.jsonl")
    assert [r["key"] for r in records] == ["1", "2", "k3", "native"]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert records[2]["json"]["echo"].startswith("json please")
    assert all(r["attempts"] == 1 for r in records)
    assert (daemon.inbox / "done" / "a.jsonl").exists()
    car = daemon.sidecar("a.jsonl")
    assert car["state"] == "DONE" and car["ok"] == 4 and car["errors"] == 0
    processing = (daemon.inbox / "processing").iterdir()
    assert sorted(p.name for p in processing if not p.name.startswith(".daemon.")) == [
        ".cancel",
        ".work",
    ]
    assert not list((daemon.inbox / "processing" / ".work").iterdir())


def test_an_inline_job_answered_through_a_responses_file(make_daemon: Any, sim: Simulator) -> None:
    """The API may answer an inline job with a responses file: it is downloaded once."""
    sim.inline_results_in_file = True
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 4
    assert daemon.sidecar("a.jsonl")["jobs"][0]["mode"] == "inline"
    downloads = [p for m, p, _ in sim.requests_log if m == "GET" and ":download" in p]
    assert len(downloads) == 1, downloads
    assert not sim.files


def test_file_api_path(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon(limits={"inline_max_bytes": 10})
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 4
    assert not sim.files, "uploads and responses files are deleted"


def test_parts_are_merged_in_order(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon(limits={"max_requests_per_job": 3, "max_active_jobs": 2})
    daemon.drop("big.jsonl", [f"prompt {i}" for i in range(10)])
    daemon.run_all()
    records = daemon.results("big.jsonl")
    assert [r["key"] for r in records] == [str(i) for i in range(1, 11)]
    assert len(sim.jobs) == 4
    assert len(daemon.sidecar("big.jsonl")["jobs"]) == 4


def test_failed_requests_are_retried_in_rounds(make_daemon: Any, sim: Simulator) -> None:
    sim.fail_keys = {"2": 503}
    daemon = make_daemon(retry_requests=2)
    daemon.drop("r.jsonl", ["a", "b", "c"])
    daemon.run_all()
    records = daemon.results("r.jsonl")
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert records[1]["attempts"] == 3 and records[0]["attempts"] == 1
    assert len(sim.jobs) == 3


def test_lost_create_reply_adopts_the_job(make_daemon: Any, sim: Simulator) -> None:
    sim.add_fault(Fault("POST", ":batchGenerateContent", status=503, after=True))
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 4
    assert len(sim.jobs) == 1


def test_restart_mid_flight_resumes(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon()
    daemon.drop("a.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("a.jsonl") == "RUNNING")
    daemon.restart()
    daemon.run_all()
    assert [r["status"] for r in daemon.results("a.jsonl")] == ["ok"] * 4
    assert len(sim.jobs) == 1


def test_shuffled_and_missing_answers_are_matched_by_key(make_daemon: Any, sim: Simulator) -> None:
    sim.shuffle_output = True
    sim.missing_keys = {"3"}
    daemon = make_daemon(retry_requests=0, limits={"inline_max_bytes": 10})
    daemon.drop("s.jsonl", [f"prompt {i}" for i in range(1, 41)])
    daemon.run_all()
    records = daemon.results("s.jsonl")
    assert [r["key"] for r in records] == [str(i) for i in range(1, 41)]
    for record in records:
        if record["key"] == "3":
            assert record["error"]["stage"] == "missing"
        else:
            assert record["text"] == f"Simulated answer: prompt {record['key']}"


def test_cancel_fails_the_file_with_its_job_cancelled(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon()
    daemon.drop("c.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("c.jsonl") == "RUNNING")
    marker = daemon.service.spool.cancel_marker("c.jsonl")
    marker.write_bytes(b"")
    daemon.service.watcher.note_cancel("c.jsonl")
    daemon.run_all()
    report = daemon.report("c.jsonl")
    assert report["stage"] == "job" and report["job_state"] == "JOB_STATE_CANCELLED"
    assert [j["state"] for j in sim.jobs.values()] == ["BATCH_STATE_CANCELLED"]
    assert not marker.exists()


def test_cancel_before_a_job_exists(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon(limits={"max_active_jobs": 1})
    daemon.drop("first.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("first.jsonl") == "RUNNING")
    daemon.drop("second.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("second.jsonl") == "QUEUED")
    daemon.service.spool.cancel_marker("second.jsonl").write_bytes(b"")
    daemon.service.watcher.note_cancel("second.jsonl")
    daemon.run_all()
    assert daemon.report("second.jsonl")["job_state"] == "JOB_STATE_CANCELLED"
    assert [r["status"] for r in daemon.results("first.jsonl")] == ["ok"] * 4
    assert len(sim.jobs) == 1


@pytest.mark.parametrize("inline_max_bytes", [10**9, 10], ids=["inline", "file-api"])
def test_raw_responses_are_byte_for_byte(
    make_daemon: Any, sim: Simulator, inline_max_bytes: int
) -> None:
    """`include_response` keeps standard base64 (+ and /) and unknown fields as sent."""
    sim.extra_fields = True
    daemon = make_daemon(include_response=True, limits={"inline_max_bytes": inline_max_bytes})
    daemon.drop("raw.jsonl", ["draw [[sim:image]]", "say hi"])
    daemon.run_all()
    records = daemon.results("raw.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok"]
    parts = records[0]["response"]["candidates"][0]["content"]["parts"]
    signature = parts[0]["thoughtSignature"]
    image = parts[1]["inlineData"]["data"]
    assert ("+" in signature or "/" in signature) and "-" not in signature and "_" not in signature
    assert image == image_base64("draw [[sim:image]]")
    assert any(key not in _KNOWN for key in records[0]["response"]), "unknown fields kept"


_KNOWN = {"candidates", "usageMetadata", "modelVersion", "responseId", "promptFeedback"}
