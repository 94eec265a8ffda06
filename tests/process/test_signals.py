"""Signals: SIGTERM/SIGINT stop gracefully with exit 0 at any stage (a restart then finishes
the work); SIGHUP reloads the configuration.

A reloaded configuration applies to files claimed after the reload; a file already submitted
finishes with the settings it was submitted with; a bad configuration is refused (the reason
is logged) and the old one keeps working.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from daemon.simulator import Fault, Simulator
from tests.support.guarantees import (
    assert_no_stray_traceback,
    assert_nothing_lost,
    records,
    sigterm_and_wait,
    state_of,
)
from tests.support.harness import Process, Spool, wait_for


def events(spool: Spool, name: str) -> list[dict[str, Any]]:
    return [e for e in spool.log_events() if e.get("event") == name]


def start_and_wait(spool: Spool) -> Process:
    proc = spool.start()
    wait_for(lambda: events(spool, "started"), timeout=30)
    return proc


def reload(spool: Spool, proc: Process, event: str) -> dict[str, Any]:
    """SIGHUP, then wait for the next `event` ("configuration reloaded" or "reload refused")."""
    before = len(events(spool, event))
    proc.send_signal(signal.SIGHUP)
    found = wait_for(lambda: events(spool, event)[before:], timeout=15)
    result: dict[str, Any] = found[0]
    return result


def job_for(spool: Spool, name: str) -> dict[str, Any]:
    job_name = spool.sidecar(name)["job_name"]
    job: dict[str, Any] = spool.sim.jobs[job_name]
    return job


def test_sigint_exits_zero_quickly(spool: Spool) -> None:
    """SIGTERM: see the tests below and tests/process/test_service_notify.py."""
    proc = start_and_wait(spool)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert events(spool, "stopped")


def test_sigterm_with_a_job_in_flight_keeps_the_sidecar_and_resumes(spool: Spool) -> None:
    spool.sim.pending_seconds = 3600
    proc = start_and_wait(spool)
    spool.drop("flight.jsonl", ["hello"])
    wait_for(lambda: events(spool, "submitted"), timeout=30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert events(spool, "stopped")
    record = spool.sidecar("flight.jsonl")
    assert record["state"] == "RUNNING"
    assert (spool.inbox / "processing" / "flight.jsonl").exists()
    spool.sim.set_job_state(record["job_name"], "SUCCEEDED")
    assert spool.run_once() == 0
    assert spool.finished("flight.jsonl")
    assert spool.sim.create_calls == 1


def test_reload_applies_new_settings_to_new_files_only(spool: Spool) -> None:
    json_line = {"prompt": "first", "config": {"responseMimeType": "application/json"}}
    spool.sim.pending_seconds = 3600  # the first files' jobs are still pending at the reload
    proc = start_and_wait(spool)
    spool.drop("before.jsonl", [json_line])
    spool.drop("prose.jsonl", ["plain text please"])
    wait_for(lambda: len(events(spool, "submitted")) == 2, timeout=30)
    spool.configure(
        model="gemini-2.0-flash",
        temperature=0.9,
        filter_json=True,
        # Jobs now finish 0.3 s after creation: a first poll 0.8 s later sees them done.
        poll={"initial_seconds": 0.8, "max_seconds": 3},
    )
    reload(spool, proc, "configuration reloaded")
    spool.sim.pending_seconds = 0.1
    spool.drop("after.jsonl", [{**json_line, "prompt": "second"}])

    wait_for(lambda: spool.finished("after.jsonl"), timeout=30)
    after = job_for(spool, "after.jsonl")
    assert after["model"] == "models/gemini-2.0-flash"
    assert after["requests"][0]["request"]["generationConfig"]["temperature"] == 0.9
    [record] = spool.results("after.jsonl")
    assert record["status"] == "ok", record
    assert record["json"] == {"echo": "second", "words": 1}
    assert spool.sidecar("after.jsonl")["polls"] == 1

    # Files submitted before the reload finish with the settings they were submitted with.
    for name in ("before.jsonl", "prose.jsonl"):
        spool.sim.set_job_state(spool.sidecar(name)["job_name"], "SUCCEEDED")
    for name in ("before.jsonl", "prose.jsonl"):
        wait_for(lambda name=name: spool.finished(name), timeout=30)
        job = job_for(spool, name)
        assert job["model"] == "models/gemini-2.5-flash"
        assert job["requests"][0]["request"]["generationConfig"]["temperature"] == 0.2
        [record] = spool.results(name)
        assert record["status"] == "ok", record  # prose is not parsed as JSON
        assert "json" not in record
    assert proc.poll() is None


def test_reload_watches_a_new_inbox(spool: Spool) -> None:
    spool.sim.pending_seconds = 3600
    proc = start_and_wait(spool)
    spool.drop("old.jsonl", ["in the old inbox"])
    wait_for(lambda: events(spool, "submitted"), timeout=30)
    spool.configure(inbox="inbox2")
    reload(spool, proc, "configuration reloaded")
    spool.sim.pending_seconds = 0.1
    new_inbox = spool.root / "inbox2"
    assert new_inbox.is_dir()
    (new_inbox / ".new.jsonl.part").write_text('"in the new inbox"\n')
    (new_inbox / ".new.jsonl.part").rename(new_inbox / "new.jsonl")
    wait_for(lambda: (new_inbox / "done" / "new.jsonl").exists(), timeout=30)
    assert [r["status"] for r in spool.results("new.jsonl")] == ["ok"]
    # The file claimed from the old inbox still finishes, beside its old sidecar.
    spool.sim.set_job_state(spool.sidecar("old.jsonl")["job_name"], "SUCCEEDED")
    wait_for(lambda: spool.finished("old.jsonl"), timeout=30)
    assert [r["status"] for r in spool.results("old.jsonl")] == ["ok"]
    assert not (new_inbox / "processing" / "old.jsonl.job.json").exists()
    assert proc.poll() is None


BAD_CONFIGS = [
    ("inbox: inbox\nno_such_key: 1\n", "no_such_key"),
    ("inbox: [unclosed\n", "not valid YAML"),
    ("temperature: hot\n", "temperature"),
    ("system_prompt_file: missing-prompt.md\n", "system_prompt_file"),
]


def test_a_bad_config_is_refused_and_the_old_one_keeps_running(spool: Spool) -> None:
    proc = start_and_wait(spool)
    for bad_config, expected in BAD_CONFIGS:
        spool.config_path.write_text(bad_config)
        refused = reload(spool, proc, "reload refused")
        assert expected in refused["reason"], refused
        assert refused["level"] == "error"
        assert proc.poll() is None
    spool.drop("still.jsonl", ["still working"])
    wait_for(lambda: spool.finished("still.jsonl"), timeout=30)
    assert [r["status"] for r in spool.results("still.jsonl")] == ["ok"]
    request = job_for(spool, "still.jsonl")["requests"][0]["request"]
    assert "systemInstruction" not in request
    assert not events(spool, "configuration reloaded")
    assert spool.sidecar("still.jsonl")["polls"] >= 1


# ---- SIGTERM at each stage, then a restart finishes the work -----------------------------


def polls_of(spool: Spool, name: str) -> int:
    try:
        return int(spool.sidecar(name).get("polls") or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigterm_while_uploading(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 1000})
    try:
        sim.add_fault(Fault("POST", "upload/", status=503, times=3))  # stays uploading a while
        spool.drop("huge.jsonl", [f"{i} " + "w" * 8000 for i in range(1000)])  # 8 MB
        proc = spool.start()
        wait_for(lambda: state_of(spool, "huge.jsonl") == "UPLOADING", timeout=60, interval=0.005)
        sigterm_and_wait(proc)
        assert not spool.finished("huge.jsonl")
        assert spool.run_once(timeout=120) == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["huge.jsonl"], jobs=1)
        assert len(records(spool, "huge.jsonl")) == 1000
        assert not sim.files
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_sigterm_while_polling(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 3600  # the job stays pending until the test finishes it
    spool.drop("slow.jsonl", ["a", "b"])
    proc = spool.start()
    wait_for(lambda: polls_of(spool, "slow.jsonl") >= 2, timeout=30)
    assert state_of(spool, "slow.jsonl") == "RUNNING"
    sigterm_and_wait(proc)
    job = spool.sidecar("slow.jsonl")["job_name"]
    sim.set_job_state(job, "SUCCEEDED")
    assert spool.run_once() == 0, spool.logs()[-3000:]
    assert_nothing_lost(spool, ["slow.jsonl"], jobs=1)
    assert [r["status"] for r in records(spool, "slow.jsonl")] == ["ok", "ok"]
    assert_no_stray_traceback(spool)


def test_sigterm_while_fetching(tmp_path: Path, sim: Simulator) -> None:
    """The job is done but its responses file cannot be downloaded yet: stop, restart, finish."""
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 10})
    try:
        outage = Fault("GET", ":download", status=503, times=10_000)
        sim.add_fault(outage)
        spool.drop("fetch.jsonl", ["a", "b", "c"])
        proc = spool.start()
        wait_for(lambda: any(":download" in p for _, p, _ in sim.requests_log), timeout=30)
        assert state_of(spool, "fetch.jsonl") == "RUNNING"
        assert spool.sidecar("fetch.jsonl")["jobs"][0]["state"] == "ENDED"
        sigterm_and_wait(proc)
        outage.times = 0  # the outage is over
        assert spool.run_once() == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["fetch.jsonl"], jobs=1)
        assert len(records(spool, "fetch.jsonl")) == 3
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_sigterm_while_writing(spool: Spool) -> None:
    """SIGTERM as soon as the results are being written: the write finishes, exit 0."""
    spool.drop("many.jsonl", [f"prompt {i}" for i in range(2000)])
    proc = spool.start()
    wait_for(
        lambda: state_of(spool, "many.jsonl") in ("WRITING", "DONE"), timeout=60, interval=0.002
    )
    sigterm_and_wait(proc)
    # Either the write finished before the exit, or the restart does it.
    assert spool.run_once() == 0, spool.logs()[-3000:]
    assert_nothing_lost(spool, ["many.jsonl"], jobs=1)
    assert len(records(spool, "many.jsonl")) == 2000
    assert_no_stray_traceback(spool)


def test_sigterm_while_a_request_hangs(spool: Spool, sim: Simulator) -> None:
    """The API takes the create and never answers: SIGTERM still stops within 10 s (the call is
    cut off); the restart looks the job up, finds none and makes it, once."""
    sim.add_fault(Fault("POST", ":batchGenerateContent", status=503, delay=60))
    spool.configure(api={"timeout_seconds": 60})
    spool.drop("hang.jsonl", ["a", "b"])
    proc = spool.start()
    wait_for(lambda: state_of(spool, "hang.jsonl") == "SUBMITTING", timeout=30)
    time.sleep(0.3)  # the create request is on its way
    sigterm_and_wait(proc)
    spool.configure()
    assert spool.run_once() == 0, spool.logs()[-3000:]
    assert_nothing_lost(spool, ["hang.jsonl"], jobs=1)
