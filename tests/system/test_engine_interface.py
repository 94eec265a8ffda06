"""The daemon through the `Engine` interface alone: a batch engine in memory
(tests/support/memory_engine.py) runs files end to end -- uploads and inline jobs, parts,
follow-up rounds, a restart, a cancel, `status` -- with no change to steps, publishing or
status. A second real engine is one more module behind the same interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from daemon.cli import status
from daemon.jobrecord import FileState
from daemon.simulator import Simulator
from tests.support.inprocess import Daemon, WallClock
from tests.support.memory_engine import MemoryEngine

PROMPTS = ["alpha", {"key": "b", "prompt": "beta [[fail]]"}, {"key": "c", "prompt": "gamma"}]


@pytest.fixture(params=[False, True], ids=["uploaded", "inline"])
def engine(request: pytest.FixtureRequest, clock: WallClock) -> MemoryEngine:
    return MemoryEngine(clock, inline=request.param)


def run(make_daemon: Any, engine: MemoryEngine, **overrides: Any) -> Daemon:
    daemon: Daemon = make_daemon(engine=engine, **overrides)
    return daemon


def test_a_file_comes_back_in_input_order_with_a_follow_up_round(
    make_daemon: Any, engine: MemoryEngine
) -> None:
    daemon = run(make_daemon, engine)
    daemon.drop("a.jsonl", [*PROMPTS, {"key": "d", "prompt": "no [[refuse]]"}])
    daemon.run_all()
    records = daemon.results("a.jsonl")
    assert [(r["key"], r["status"], r["attempts"]) for r in records] == [
        ("1", "ok", 1),
        ("b", "ok", 2),  # failed retryably in the first job, answered by the follow-up job
        ("c", "ok", 1),
        ("d", "error", 1),
    ]
    assert records[0]["text"] == "echo: alpha" and records[3]["error"]["code"] == 400
    assert daemon.outcome("a.jsonl") is FileState.DONE
    assert engine.sent == {"1": 1, "b": 2, "c": 1, "d": 1}
    assert len(engine.jobs) == 2 and not engine.files.keys() - {
        f"memory/files/{name}.out" for name in engine.jobs
    }  # every upload deleted once collected


def test_parts_are_separate_jobs_merged_in_order(make_daemon: Any, engine: MemoryEngine) -> None:
    daemon = run(make_daemon, engine, limits={"max_requests_per_job": 2})
    daemon.drop("p.jsonl", [f"q{i}" for i in range(5)])
    daemon.run_all()
    assert [r["text"] for r in daemon.results("p.jsonl")] == [f"echo: q{i}" for i in range(5)]
    assert len(engine.jobs) == 3


def test_a_restart_adopts_the_job_instead_of_creating_it_again(
    make_daemon: Any, engine: MemoryEngine
) -> None:
    daemon = run(make_daemon, engine)
    daemon.drop("r.jsonl", ["one", "two"])
    daemon.run_until(lambda: engine.jobs)
    daemon.restart()
    daemon.run_all()
    assert len(engine.jobs) == 1
    assert [r["status"] for r in daemon.results("r.jsonl")] == ["ok", "ok"]


def test_status_shows_the_engine_s_jobs(
    make_daemon: Any, engine: MemoryEngine, tmp_path: Path
) -> None:
    daemon = run(make_daemon, engine)
    daemon.drop("s.jsonl", ["one"])
    daemon.run_until(lambda: daemon.state().get("s.jsonl") == "RUNNING")
    row = next(r for r in status.snapshot(daemon.config)["files"] if r["input"] == "s.jsonl")
    assert row["job_name"].startswith("memory/jobs/") and row["job_state"] in (
        "JOB_STATE_PENDING",
        "JOB_STATE_RUNNING",
    )


def test_a_cancelled_file_gets_its_report(
    make_daemon: Any, engine: MemoryEngine, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = run(make_daemon, engine)
    daemon.drop("x.jsonl", ["one"])
    daemon.run_until(lambda: daemon.state().get("x.jsonl") == "RUNNING")
    assert cli.main(["cancel", "x.jsonl", "-c", str(daemon.folder.config_path)]) == 0
    assert "cancel requested: the daemon cancels its job(s) memory/jobs/" in capsys.readouterr().out
    daemon.service.watcher.rescan()  # as the inotify event on processing/.cancel/ would
    daemon.run_all()
    assert daemon.report("x.jsonl")["job_state"] == "JOB_STATE_CANCELLED"
    assert sim.create_calls == 0  # nothing went to the Gemini simulator


def test_a_reload_that_changes_the_backend_makes_a_new_engine(
    make_daemon: Any, engine: MemoryEngine, clock: WallClock
) -> None:
    daemon = run(make_daemon, engine)
    daemon.start()
    made: list[MemoryEngine] = []

    def make_engine(config: Any) -> MemoryEngine:
        made.append(MemoryEngine(clock))
        return made[-1]

    settings = {"project": "p", "staging_uri": "gs://bucket/x"}
    changed = daemon.config.model_copy(
        update={"vertex": daemon.config.vertex.model_copy(update=settings)}
    )
    daemon.service._reload_config = lambda: changed
    daemon.service._make_engine = make_engine
    daemon.service.request_reload()
    daemon.tick()
    assert daemon.service.engine is made[0]
    daemon.service._reload_config = lambda: changed  # the same again: nothing to remake
    daemon.service.request_reload()
    daemon.tick()
    assert len(made) == 1
