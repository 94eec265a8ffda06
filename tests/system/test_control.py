"""The control commands: `status` (table and --json) and `cancel`, against a running daemon."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from daemon.simulator import Simulator
from tests.harness import Spool, wait_for

SLOW_POLLS = {"initial_seconds": 30, "max_seconds": 60}
"""Polls so far apart that only a cancel request can explain a prompt reaction."""


def status_rows(spool: Spool) -> list[dict[str, Any]]:
    done = spool.cli("status", "-c", str(spool.config_path), "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def row_of(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["input"] == name]
    return row


def running(spool: Spool, name: str) -> bool:
    try:
        record = spool.sidecar(name)
    except FileNotFoundError:
        return False
    return bool(record["state"] == "running" and record["job_name"])


def is_queued(spool: Spool, name: str) -> bool:
    try:
        return bool(spool.sidecar(name)["state"] == "queued")
    except FileNotFoundError:
        return False


def start_with_job_in_flight(spool: Spool, *names: str, **overrides: Any) -> None:
    """A daemon whose jobs stay pending (the simulator's jobs take a minute)."""
    spool.sim.pending_seconds = 60
    spool.configure(**overrides)
    spool.start()
    slots = overrides.get("limits", {}).get("max_active_jobs", len(names))
    for i, name in enumerate(names):  # one after the other: the first ones get the job slots
        spool.drop(name, ["a prompt", "another"])
        if i < slots:
            wait_for(lambda name=name: running(spool, name), timeout=30)
        else:
            wait_for(lambda name=name: is_queued(spool, name), timeout=30)


def table(spool: Spool) -> list[dict[str, str]]:
    """`status` as a table, split into cells at the header's column starts."""
    done = spool.cli("status", "-c", str(spool.config_path))
    assert done.returncode == 0, done.stderr
    header, *body = done.stdout.splitlines()
    names = ["FILE", "STATE", "JOB", "JOB STATE", "AGE", "POLLS", "NEXT POLL", "PROGRESS"]
    starts = [header.index(name) for name in names[:3]]
    starts += [header.index(name, starts[-1] + 4) for name in names[3:4]]
    starts += [header.index(name) for name in names[4:]]
    assert starts == sorted(starts), header
    bounds = [*starts, None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(names, bounds, bounds[1:], strict=False)}
        for line in body
    ]


def cancel(spool: Spool, target: str) -> subprocess.CompletedProcess[str]:
    return spool.cli("cancel", target, "-c", str(spool.config_path))


def wait_cancelled_report(spool: Spool, stem: str, timeout: float = 15) -> dict[str, Any]:
    wait_for(lambda: spool.finished(stem + ".jsonl"), timeout=timeout)
    report = spool.report(stem)
    assert report["job_state"] == "JOB_STATE_CANCELLED", report
    assert report["stage"] == "job"
    return report


# ---- status ------------------------------------------------------------------------------


def test_status_without_a_daemon_lists_inbox_files(spool: Spool) -> None:
    spool.drop("waiting.jsonl", ["x"])
    rows = status_rows(spool)
    assert row_of(rows, "waiting.jsonl")["state"] == "inbox"
    table = spool.cli("status", "-c", str(spool.config_path))
    assert table.returncode == 0
    assert "waiting.jsonl" in table.stdout and "inbox" in table.stdout


def test_status_on_an_empty_spool(spool: Spool) -> None:
    assert status_rows(spool) == []
    table = spool.cli("status", "-c", str(spool.config_path))
    assert table.returncode == 0
    assert "no files" in table.stdout


def test_status_lists_in_flight_queued_and_finished_files(spool: Spool) -> None:
    spool.configure(limits={"max_active_jobs": 1})
    spool.start()
    spool.drop("early.jsonl", ["finished before the others"])
    wait_for(lambda: spool.finished("early.jsonl"), timeout=30)
    spool.sim.pending_seconds = 60  # the next jobs stay in flight
    spool.drop("flying.jsonl", ["a prompt", "another"])
    wait_for(lambda: running(spool, "flying.jsonl"), timeout=30)
    spool.drop("queued.jsonl", ["a prompt", "another"])
    wait_for(lambda: is_queued(spool, "queued.jsonl"), timeout=30)
    wait_for(lambda: spool.sidecar("flying.jsonl")["polls"] >= 2, timeout=30)
    rows = status_rows(spool)

    flying = row_of(rows, "flying.jsonl")
    assert flying["state"] == "running"
    assert flying["job_name"].startswith("batches/")
    assert flying["job_state"] == "JOB_STATE_PENDING"
    assert flying["polls"] >= 2
    assert flying["next_poll_at"]
    assert flying["requests"] == 2
    queued = row_of(rows, "queued.jsonl")
    assert queued["state"] == "queued"
    assert queued["job_name"] is None
    early = row_of(rows, "early.jsonl")
    assert early["state"] == "done"
    assert early["job_state"] == "JOB_STATE_SUCCEEDED"

    cells = {row["FILE"]: row for row in table(spool)}
    assert set(cells) == {"early.jsonl", "flying.jsonl", "queued.jsonl"}
    assert cells["flying.jsonl"]["STATE"] == "running"
    assert cells["flying.jsonl"]["JOB"] == flying["job_name"]
    assert cells["flying.jsonl"]["JOB STATE"] == "PENDING"
    assert int(cells["flying.jsonl"]["POLLS"]) >= 2
    assert cells["flying.jsonl"]["NEXT POLL"] == "due" or cells["flying.jsonl"][
        "NEXT POLL"
    ].startswith("in ")
    assert cells["flying.jsonl"]["AGE"].endswith("s")
    assert cells["queued.jsonl"]["STATE"] == "queued"
    assert cells["queued.jsonl"]["JOB"] == "-"
    assert cells["early.jsonl"]["STATE"] == "done"
    assert cells["early.jsonl"]["JOB"] == early["job_name"]
    assert cells["early.jsonl"]["JOB STATE"] == "SUCCEEDED"
    assert cells["early.jsonl"]["NEXT POLL"] == "-"

    finished = cancel(spool, "early.jsonl")  # only queued and in-flight files can be cancelled
    assert finished.returncode == 2
    assert len(finished.stderr.splitlines()) == 1


def test_progress_bar() -> None:
    assert cli._progress({"succeeded": 3, "failed": 1}, 8) == "[#####.....] 4/8"
    assert cli._progress({"succeeded": 8}, 8) == "[##########] 8/8"
    assert cli._progress(None, 8) == "-"
    assert cli._progress({"succeeded": 1}, None) == "-"


# ---- cancel --------------------------------------------------------------------------------


def test_cancel_by_file_name_path_or_job_name_and_before_a_job_exists(spool: Spool) -> None:
    start_with_job_in_flight(
        spool,
        "byname.jsonl",
        "bypath.jsonl",
        "byjob.jsonl",
        "queued.jsonl",
        limits={"max_active_jobs": 3},
        poll=SLOW_POLLS,
    )
    jobs = {
        name: spool.sidecar(name + ".jsonl")["job_name"] for name in ("byname", "bypath", "byjob")
    }
    # First the queued file, while the three jobs hold every slot.
    done = cancel(spool, "queued.jsonl")
    assert done.returncode == 0, done.stderr
    assert "no job yet" in done.stdout
    wait_for(lambda: spool.finished("queued.jsonl"), timeout=15)
    for stem, target in (
        ("byname", "byname.jsonl"),
        ("bypath", str(spool.inbox / "bypath.jsonl")),
        ("byjob", jobs["byjob"]),
    ):
        done = cancel(spool, target)
        assert done.returncode == 0, done.stderr
        assert f"cancelled {jobs[stem]}" in done.stdout
        assert spool.sim.jobs[jobs[stem]]["state"] == "BATCH_STATE_CANCELLED"

    # Polls are 30 s apart: only the cancel requests make the daemon look at once.
    for stem in ("byname", "bypath", "byjob"):
        report = wait_cancelled_report(spool, stem)
        assert report["job_name"] == jobs[stem]
        assert not (spool.outbox / f"{stem}.jsonl").exists()
    report = wait_cancelled_report(spool, "queued")
    assert report["job_name"] is None
    assert spool.sim.create_calls == 3  # the queued file never got a job
    assert not list((spool.inbox / "processing").iterdir())  # markers gone too
    rows = status_rows(spool)
    assert {r["input"]: r["state"] for r in rows} == dict.fromkeys(
        ("byname.jsonl", "bypath.jsonl", "byjob.jsonl", "queued.jsonl"), "failed"
    )


class SlowCreate(Simulator):
    """A simulator whose create call takes a while: time to cancel a file while it is submitting."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.creating = threading.Event()

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Any:
        if method == "POST" and ":batchGenerateContent" in raw_path:
            self.creating.set()
            time.sleep(1.5)
        return super().handle(method, raw_path, headers, body)


def test_cancel_while_the_job_is_being_created(tmp_path: Path) -> None:
    with SlowCreate(pending_seconds=60) as sim:
        spool = Spool(tmp_path, sim, poll=SLOW_POLLS)
        try:
            spool.start()
            spool.drop("racing.jsonl", ["x"])
            wait_for(sim.creating.is_set, timeout=30)
            assert spool.sidecar("racing.jsonl")["state"] == "submitting"
            done = cancel(spool, "racing.jsonl")
            assert done.returncode == 0, done.stderr
            assert "being created" in done.stdout
            report = wait_cancelled_report(spool, "racing")
            assert report["job_name"] in sim.jobs
            assert sim.create_calls == 1
        finally:
            spool.stop_all()


@pytest.mark.parametrize("target", ["nothing-here.jsonl", "not-a-file"])
def test_cancel_of_an_unknown_file_is_exit_2(spool: Spool, target: str) -> None:
    done = cancel(spool, target)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("gemini-batchd: ") and target in line


def test_cancel_of_an_unknown_job_is_exit_2(spool: Spool) -> None:
    done = cancel(spool, "batches/does-not-exist")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("gemini-batchd: ") and "batches/does-not-exist" in line
    assert "Traceback" not in done.stderr


# ---- help --------------------------------------------------------------------------------


def test_every_option_and_argument_has_help() -> None:
    parser = cli._parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    assert sub.choices is not None
    assert set(sub.choices) == {"run", "status", "validate", "submit", "cancel", "simulator"}
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", ["run", "status", "validate", "submit", "cancel", "simulator"])
def test_help_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: gemini-batchd {command}")
