"""Status in-process: the presence file, the snapshot's shape and rows, the table, arrival order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from daemon import presence
from daemon.cli import status
from daemon.simulator import Simulator
from daemon.spool import Spool
from tests.support.guarantees import CONTRACT_ROW_FIELDS
from tests.support.inprocess import Daemon, WallClock

"""Every field of a `status --json` file row in the contract's example."""


def snap(daemon: Daemon) -> dict[str, Any]:
    result = status.snapshot(daemon.config, now=daemon.clock.wall())
    json.dumps(result)  # serialisable as it is
    return result


def rows(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {row["input"]: row for row in snap(daemon)["files"]}


def presence_files(daemon: Daemon) -> list[str]:
    return sorted(p.name for p in (daemon.inbox / "processing").glob(".daemon.*"))


def test_presence_while_running_and_gone_after_a_clean_stop(make_daemon: Any) -> None:
    daemon = make_daemon()
    assert snap(daemon)["daemon"]["running"] is False
    daemon.start()
    names = presence_files(daemon)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".lock")
    info = snap(daemon)["daemon"]
    assert info["running"] is True
    assert info["pid"] == os.getpid()
    assert info["since"] == "2026-12-01T10:16:40Z"  # the fake wall clock at start
    assert info["paused"] is None
    assert info["config"] == str(daemon.folder.config_path)
    daemon.stop()
    assert presence_files(daemon) == []
    after = snap(daemon)
    assert after["daemon"] == {**after["daemon"], "running": False, "pid": None}
    assert after["stale_daemons"] == []


def test_a_dead_daemons_files_are_stale_and_removed_at_the_next_start(make_daemon: Any) -> None:
    daemon = make_daemon()
    spool = Spool(daemon.config.inbox, daemon.config.outbox)
    spool.heal()
    dead = spool.daemon_file(host="otherhost", pid=999999)
    dead.write_text(json.dumps({"pid": 999999, "host": "otherhost", "since": "x"}))
    presence.lock_path(dead).write_text("")  # its lock: nobody holds it
    orphan = spool.daemon_file(host="thirdhost", pid=5)  # a presence file without a lock
    orphan.write_text("{}")
    before = snap(daemon)
    assert before["daemon"]["running"] is False
    assert sorted(str(d.get("pid")) for d in before["stale_daemons"]) == ["999999", "None"]
    daemon.start()
    assert not dead.exists() and not presence.lock_path(dead).exists() and not orphan.exists()
    assert snap(daemon)["daemon"]["running"] is True


def test_heartbeat_every_30_seconds_and_at_once_when_paused(
    make_daemon: Any, sim: Simulator, clock: WallClock
) -> None:
    daemon = make_daemon().start()
    path = daemon.service.presence.path

    def heartbeat() -> str:
        return str(json.loads(path.read_text())["heartbeat"])

    first = heartbeat()
    clock.advance(10)
    daemon.tick()
    assert heartbeat() == first
    clock.advance(25)
    daemon.tick()
    assert heartbeat() == "2026-12-01T10:17:15Z"
    sim.api_key = "another key"  # the API now rejects ours: the daemon pauses
    daemon.drop("a.jsonl", ["x"])
    daemon.run_until(lambda: snap(daemon)["daemon"]["paused"])
    paused = snap(daemon)["daemon"]["paused"]
    assert "API key" in paused and "rejected" in paused
    assert "PAUSED: API key" in status.render_table(snap(daemon), daemon.clock.wall())
    row = rows(daemon)["a.jsonl"]
    assert row["state"] == "SUBMITTING" and row["retries"] >= 1
    assert "API key not valid" in row["last_error"]
    sim.api_key = None
    daemon.run_all()
    assert snap(daemon)["daemon"]["paused"] is None


def test_rows_for_every_kind_of_file(make_daemon: Any, sim: Simulator) -> None:
    sim.pending_seconds, sim.running_seconds = 5, 100
    sim.fail_keys = {"2": 400}
    daemon = make_daemon(limits={"max_active_jobs": 1})
    daemon.drop("done.jsonl", ["a", "b", "c"])
    daemon.drop("bad.jsonl", b"{not json\n")
    daemon.run_all()
    for name in ("notes.txt", "prompts.json", "UP.JSONL"):
        (daemon.inbox / name).write_text("x\n")
    daemon.drop("running.jsonl", [f"p{i}" for i in range(10)])
    daemon.drop("queued.jsonl", ["q"])
    daemon.run_until(lambda: rows(daemon).get("running.jsonl", {}).get("progress"))
    daemon.clock.advance(50)
    daemon.tick()  # a poll half way: progress counts
    # a file claimed by nobody yet: no daemon event, so it waits in the inbox
    daemon.folder.drop("later.jsonl", ["z"])

    result = snap(daemon)
    by_name = {row["input"]: row for row in result["files"]}
    for row in result["files"]:
        assert row.keys() >= CONTRACT_ROW_FIELDS, row["input"]
    assert set(result) >= {"daemon", "totals", "files"}
    assert result["totals"] == {
        "waiting": 1,
        "queued": 1,
        "active": 1,
        "done": 1,
        "failed": 1,
        "ignored": 3,
    }
    done = by_name["done.jsonl"]
    assert done["state"] == "DONE" and (done["ok"], done["errors"]) == (2, 1)
    assert done["output"] == str(daemon.outbox / "done.jsonl")
    assert done["errors_by_stage"] == {"request": 1}
    assert done["tokens"]["total_tokens"] > 0 and done["progress"] is None
    failed = by_name["bad.jsonl"]
    assert failed["state"] == "FAILED" and failed["output"] is None
    assert failed["report"] == str(daemon.outbox / "bad.error.json")
    assert "bad line" in failed["last_error"] or "invalid" in failed["last_error"].lower()
    running = by_name["running.jsonl"]
    assert running["state"] == "RUNNING" and running["job_name"].startswith("batches/")
    assert running["job_state"] == "JOB_STATE_RUNNING" and running["requests"] == 10
    progress = running["progress"]
    assert progress is not None and {"succeeded", "failed", "pending"} <= progress.keys()
    assert progress["succeeded"] + progress["failed"] + progress["pending"] == 10
    assert running["next_poll_at"] and running["polls"] >= 1
    assert (running["round"], running["rounds"], running["parts"]) == (1, 3, 1)
    assert by_name["queued.jsonl"]["state"] == "QUEUED"
    assert by_name["later.jsonl"]["state"] == "WAITING"
    for name, reason in (("notes.txt", "only names ending in .jsonl"), ("UP.JSONL", "lower case")):
        assert by_name[name]["state"] == "IGNORED" and reason in by_name[name]["last_error"]
    assert "rename it prompts.jsonl" in by_name["prompts.json"]["last_error"]
    order = [row["input"] for row in result["files"]]
    assert order.index("running.jsonl") < order.index("queued.jsonl") < order.index("later.jsonl")

    table = status.render_table(result, daemon.clock.wall())
    lines = table.splitlines()
    assert lines[0].startswith(f"daemon: running, pid {os.getpid()}")
    assert "1 waiting, 1 queued, 1 active, 1 done, 1 failed, 3 ignored" in table
    [running_line] = [line for line in lines if line.startswith("running.jsonl")]
    assert running["job_name"] in running_line and "RUNNING" in running_line
    assert "] " in running_line and "/10" in running_line
    [done_line] = [line for line in lines if line.startswith("done.jsonl")]
    assert "2 ok, 1 errors" in done_line
    assert any(line.startswith(f"  -> {daemon.outbox / 'done.jsonl'} (") for line in lines)
    print(table)
    assert any(line.startswith("  failed (validation): ") for line in lines)
    assert any(line.startswith("  ignored: ") for line in lines)


def test_follow_up_round_and_retries_in_the_row(make_daemon: Any, sim: Simulator) -> None:
    sim.fail_keys = {"2": 503, "3": 503}
    daemon = make_daemon(retry_requests=2)
    daemon.drop("r.jsonl", ["a", "b", "c", "d"])
    daemon.run_until(lambda: rows(daemon).get("r.jsonl", {}).get("round") == 2)
    row = rows(daemon)["r.jsonl"]
    assert (row["round"], row["rounds"], row["round_requests"]) == (2, 3, 2)
    table = status.render_table(snap(daemon), daemon.clock.wall())
    assert "  round 2/3, 2 requests" in table.splitlines()


def test_progress_bar() -> None:
    bar = status.progress_bar
    assert (
        bar({"succeeded": 78, "failed": 2, "pending": 40}, 120) == "[#######...] 80/120, 2 failed"
    )
    assert bar({"succeeded": 8, "total": 8}, None) == "[##########] 8/8"
    assert bar(None, 8) == "-"
    assert bar({"succeeded": 1}, None) == "-"


def test_queued_files_are_submitted_in_arrival_order(
    make_daemon: Any, sim: Simulator, clock: WallClock
) -> None:
    """Six files 50 ms apart under max_active_jobs 1: their jobs are created in that order."""
    daemon = make_daemon(limits={"max_active_jobs": 1})
    names = [f"f{i}.jsonl" for i in (3, 6, 1, 5, 2, 4)]  # arrival order, not name order
    base = 1_700_000_000_000_000_000
    for i, name in enumerate(names[:3]):  # before the start: arrival is the file's mtime
        path = daemon.drop(name, [name])
        os.utime(path, ns=(base + i * 50_000_000, base + i * 50_000_000))
    daemon.start()
    for name in names[3:]:  # while it runs: arrival is when the event came
        daemon.drop(name, [name])
    daemon.run_all()
    created = [job["display_name"] for job in sim.jobs.values()]
    assert [name.split("/")[1] for name in created] == names


def test_written_files_are_in_the_spool_only(make_daemon: Any, tmp_path: Path) -> None:
    daemon = make_daemon().start()
    daemon.stop()
    leftovers = [p.name for p in (daemon.inbox / "processing").iterdir() if p.name.startswith(".")]
    assert sorted(leftovers) == [".cancel", ".work"]  # the folders; the daemon's files are gone
