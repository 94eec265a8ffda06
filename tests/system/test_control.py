"""`gemini-batchd cancel`, in-process: the command (daemon.cli.main) against a Service stepped by
the test -- a queued file, a running job by file name, path or job name, a job being created,
a create failing and retried, and a cancel while no daemon runs."""

from __future__ import annotations

import contextlib
import io
from email.message import Message
from typing import Any

import pytest

from daemon import cli
from daemon.simulator import Fault, Simulator
from tests.support.guarantees import left_in_processing
from tests.support.harness import TEST_API_KEY
from tests.support.inprocess import Daemon

MakeDaemon = Any


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key `cancel` calls the API with (the daemon's own comes from tests.support.inprocess)."""
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BATCHD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", TEST_API_KEY)


def cancel(daemon: Daemon, target: str) -> tuple[int, str, str]:
    """Run `gemini-batchd cancel TARGET -c CONFIG`; the daemon's watcher then looks (as its
    inotify event or its next rescan would make it)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["cancel", target, "-c", str(daemon.folder.config_path)])
    if daemon.started:
        daemon.service.watcher.rescan()
    return code, out.getvalue(), err.getvalue()


def cancelled_report(daemon: Daemon, name: str) -> dict[str, Any]:
    report = daemon.report(name)
    assert report["job_state"] == "JOB_STATE_CANCELLED", report
    assert report["stage"] == "job"
    assert (daemon.inbox / "failed" / name).exists()
    assert not (daemon.outbox / name).exists()
    return report


def running(daemon: Daemon, name: str) -> bool:
    return daemon.state().get(name) == "RUNNING" and bool(daemon.sidecar(name)["job_name"])


def test_cancel_by_file_name_path_or_job_name_and_before_a_job_exists(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    sim.pending_seconds = 3600
    # Polls an hour apart: only a cancel request can explain a prompt reaction.
    daemon = make_daemon(
        limits={"max_active_jobs": 3}, poll={"initial_seconds": 3600, "max_seconds": 3600}
    )
    names = ["byname.jsonl", "bypath.jsonl", "byjob.jsonl", "queued.jsonl"]
    for name in names:
        daemon.drop(name, ["a prompt", "another"])
    daemon.run_until(lambda: sum(running(daemon, n) for n in names) == 3)
    assert daemon.state()["queued.jsonl"] == "QUEUED"
    jobs = {n: daemon.sidecar(n)["job_name"] for n in names[:3]}

    code, out, _ = cancel(daemon, "queued.jsonl")  # first the queued file, while slots are full
    assert code == 0 and "no job yet" in out
    daemon.run_until(lambda: daemon.outcome("queued.jsonl") is not None, longest=1)
    for name, target in (
        ("byname.jsonl", "byname.jsonl"),
        ("bypath.jsonl", str(daemon.inbox / "bypath.jsonl")),
        ("byjob.jsonl", jobs["byjob.jsonl"]),
    ):
        code, out, err = cancel(daemon, target)
        assert code == 0, err
        assert f"{name}: cancel requested: the daemon cancels its job(s) {jobs[name]}" in out
        assert sim.jobs[jobs[name]]["state"] == "BATCH_STATE_PENDING"  # the daemon cancels it
    started = daemon.clock.now
    daemon.run_all(longest=1)
    assert daemon.clock.now - started < 60  # not an hour: the cancel made the daemon look
    assert {sim.jobs[job]["state"] for job in jobs.values()} == {"BATCH_STATE_CANCELLED"}

    for name in names[:3]:
        assert cancelled_report(daemon, name)["job_name"] == jobs[name]
    assert cancelled_report(daemon, "queued.jsonl")["job_name"] is None
    assert sim.create_calls == 3  # the queued file never got a job
    assert not left_in_processing(daemon.inbox)  # markers gone too
    assert {daemon.sidecar(n)["state"] for n in names} == {"FAILED"}


def test_cancel_of_a_finished_or_unknown_file_is_exit_2(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    daemon = make_daemon()
    daemon.drop("early.jsonl", ["done before the cancel"])
    daemon.run_all()
    for target in ("early.jsonl", "nothing-here.jsonl", "not-a-file"):
        code, out, err = cancel(daemon, target)
        assert code == 2 and out == ""
        [line] = err.splitlines()
        assert line.startswith("gemini-batchd: ") and target in line
    assert [r["status"] for r in daemon.results("early.jsonl")] == ["ok"]


def test_cancel_of_an_unknown_job_is_exit_2(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    code, _, err = cancel(daemon, "batches/does-not-exist")
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("gemini-batchd: ") and "batches/does-not-exist" in line


class CancelDuringCreate(Simulator):
    """Runs `gemini-batchd cancel` while the daemon's create call is on the wire."""

    def __init__(self, daemon_holder: list[Daemon], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.daemon_holder = daemon_holder
        self.said: list[tuple[int, str]] = []

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Any:
        if method == "POST" and ":batchGenerateContent" in raw_path and not self.said:
            code, out, _ = cancel(self.daemon_holder[0], "racing.jsonl")
            self.said.append((code, out))
        return super().handle(method, raw_path, headers, body)


def test_cancel_while_the_job_is_being_created(tmp_path: Any, clock: Any) -> None:
    holder: list[Daemon] = []
    with CancelDuringCreate(holder, pending_seconds=3600, clock=clock) as sim:
        daemon = Daemon(tmp_path, sim, clock, poll={"initial_seconds": 3600, "max_seconds": 3600})
        holder.append(daemon)
        try:
            daemon.drop("racing.jsonl", ["x"])
            daemon.run_all(longest=1)
            [(code, out)] = sim.said
            assert code == 0 and "being created" in out
            report = cancelled_report(daemon, "racing.jsonl")
            assert report["job_name"] in sim.jobs  # made, then cancelled: never abandoned
            assert sim.jobs[report["job_name"]]["state"] == "BATCH_STATE_CANCELLED"
            assert sim.create_calls == 1
        finally:
            daemon.stop()


def test_cancel_while_the_create_fails_and_is_retried(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """A cancel that comes while the create call is failing and being retried is not lost."""
    fault = Fault(method="POST", path_contains="batchGenerateContent", status=503, times=10**6)
    sim.add_fault(fault)
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("s.jsonl", ["a"])
    daemon.run_until(lambda: daemon.sidecar("s.jsonl")["jobs"][0]["create_calls"] >= 2)
    code, out, _ = cancel(daemon, "s.jsonl")
    assert code == 0 and "batches/" not in out  # there was no job for the CLI to cancel
    fault.times = 0  # the API recovers: the create that was in doubt is looked up
    daemon.run_all()
    report = cancelled_report(daemon, "s.jsonl")
    assert all(job["state"] == "BATCH_STATE_CANCELLED" for job in sim.jobs.values())
    assert report["job_name"] is None or report["job_name"] in sim.jobs


def test_cancel_while_the_daemon_is_down(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """`cancel` of a file without a job yet, while no daemon runs: the next start honours it."""
    sim.pending_seconds = 3600
    daemon = make_daemon(limits={"max_active_jobs": 1})
    daemon.drop("slow.jsonl", ["a"])
    daemon.run_until(lambda: running(daemon, "slow.jsonl"))
    daemon.drop("queued.jsonl", ["b"])
    daemon.run_until(lambda: daemon.state().get("queued.jsonl") == "QUEUED")
    daemon.stop()
    (job,) = sim.jobs
    sim.set_job_state(job, "SUCCEEDED")
    code, out, _ = cancel(daemon, "queued.jsonl")
    assert code == 0 and "batches/" not in out

    daemon.restart()
    daemon.run_all()
    assert daemon.exit_status() == 1
    assert cancelled_report(daemon, "queued.jsonl")["job_name"] is None
    assert [r["status"] for r in daemon.results("slow.jsonl")] == ["ok"]
    assert len(sim.jobs) == 1
    assert not left_in_processing(daemon.inbox)
