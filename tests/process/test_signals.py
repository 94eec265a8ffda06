"""Signals: SIGTERM/SIGINT stop gracefully with exit 0; SIGHUP reloads the configuration.

A reloaded configuration applies to files claimed after the reload; a file already submitted
finishes with the settings it was submitted with; a bad configuration is refused (the reason
is logged) and the old one keeps working.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

from tests.harness import Spool, wait_for


def events(spool: Spool, name: str) -> list[dict[str, Any]]:
    return [e for e in spool.log_events() if e.get("event") == name]


def start_and_wait(spool: Spool) -> subprocess.Popen[bytes]:
    proc = spool.start()
    wait_for(lambda: events(spool, "started"), timeout=30)
    return proc


def reload(spool: Spool, proc: subprocess.Popen[bytes], event: str) -> dict[str, Any]:
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
    """SIGTERM: see the test below and tests/test_service_notify.py."""
    proc = start_and_wait(spool)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert events(spool, "stopped")


def test_sigterm_with_a_job_in_flight_keeps_the_sidecar_and_resumes(spool: Spool) -> None:
    spool.sim.pending_seconds = 3.0
    proc = start_and_wait(spool)
    spool.drop("flight.jsonl", ["hello"])
    wait_for(lambda: events(spool, "submitted"), timeout=30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert events(spool, "stopped")
    record = spool.sidecar("flight.jsonl")
    assert record["state"] == "running"
    assert (spool.inbox / "processing" / "flight.jsonl").exists()
    spool.sim.pending_seconds = 0.1
    assert spool.run_once() == 0
    assert spool.finished("flight.jsonl")
    assert spool.sim.create_calls == 1


def test_reload_applies_new_settings_to_new_files_only(spool: Spool) -> None:
    json_line = {"prompt": "first", "config": {"responseMimeType": "application/json"}}
    spool.sim.pending_seconds = 2.0  # the first file's job is still pending at the reload
    proc = start_and_wait(spool)
    spool.drop("before.jsonl", [json_line])
    spool.drop("prose.jsonl", ["plain text please"])
    wait_for(lambda: len(events(spool, "submitted")) == 2, timeout=30)
    spool.configure(
        model="gemini-2.0-flash",
        temperature=0.9,
        filter_json=True,
        # Jobs now finish 0.3 s after creation: a first poll 1.5 s later sees them done.
        poll={"initial_seconds": 1.5, "max_seconds": 3},
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
        wait_for(lambda name=name: spool.finished(name), timeout=30)
        job = job_for(spool, name)
        assert job["model"] == "models/gemini-2.5-flash"
        assert job["requests"][0]["request"]["generationConfig"]["temperature"] == 0.2
        [record] = spool.results(name)
        assert record["status"] == "ok", record  # prose is not parsed as JSON
        assert "json" not in record
    assert proc.poll() is None


def test_reload_watches_a_new_inbox(spool: Spool) -> None:
    spool.sim.pending_seconds = 2.0
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
