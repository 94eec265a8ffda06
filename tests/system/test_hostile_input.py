"""Hostile input, in-process: one daemon is fed every kind of bad file, then a good one.

Each bad file gets an error report naming the file, the line and the reason; nothing is lost;
the daemon never stops; a good file dropped afterwards is still processed. (An unreadable input
needs a daemon without CAP_DAC_OVERRIDE when the tests run as root: tests/process/.)
"""

from __future__ import annotations

import fcntl
import json
import os
import random
from pathlib import Path
from typing import Any

from daemon.cli import status
from daemon.simulator import Simulator
from tests.support.guarantees import left_in_processing
from tests.support.harness import TEST_API_KEY
from tests.support.inprocess import Daemon

MAX_FILE_BYTES = 12_000_000
TEN_MB = 10 * 1024 * 1024
MakeDaemon = Any


def leases_work(folder: Path) -> bool:
    """Whether this filesystem grants read leases (how the watcher sees a file still open)."""
    probe = folder / "lease-probe"
    probe.write_text("x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)
        probe.unlink()


def atime_is_tracked(folder: Path) -> bool:
    """Whether reading a file updates its atime here (not on noatime mounts)."""
    probe = folder / "atime-probe"
    probe.write_text("x")
    os.utime(probe, (1_000_000, probe.stat().st_mtime))
    probe.read_text()
    tracked = probe.stat().st_atime != 1_000_000
    probe.unlink()
    return tracked


def errors_by_line(report: dict[str, Any]) -> dict[int, str]:
    return {e["line"]: e["message"] for e in report.get("errors", [])}


def finished(daemon: Daemon, name: str) -> bool:
    return any(
        os.path.lexists(daemon.inbox / folder / name)
        and (daemon.inbox / folder / (name + ".job.json")).exists()
        for folder in ("done", "failed")
    )


def test_hostile_corpus_then_a_good_file(
    make_daemon: MakeDaemon, sim: Simulator, tmp_path: Path
) -> None:
    # Files found by a rescan must be unchanged for 2 s (of the test's clock) unless closed.
    daemon = make_daemon(limits={"max_file_bytes": MAX_FILE_BYTES}, inbox_settle_seconds=2)
    daemon.start()
    inbox = daemon.inbox
    rng = random.Random(1234)

    # A symlink to a valid input outside the inbox: the target must never be read or moved.
    target = tmp_path / "target.jsonl"
    target.write_text('"the link target must never be submitted"\n')
    os.utime(target, (1_000_000, 2_000_000))
    target_stat = target.stat()
    check_atime = atime_is_tracked(tmp_path)

    # A slow writer: the file stays open for writing, growing now and then, while the daemon
    # works and its clock runs far past the settle time (where leases tell it the file is open).
    slow_lines = [f"slow line {i}" for i in range(4)]
    slow = inbox / "slow.jsonl"
    with slow.open("w") as handle:
        for line in slow_lines:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            daemon.service.watcher.rescan()
            for _ in range(3):
                daemon.tick()
                if leases_work(tmp_path):
                    daemon.clock.advance(5)
            assert slow.exists(), "slow.jsonl was taken while still open for writing"

    bad: dict[str, bytes] = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n   \n\t\n\n",
        "latin1.jsonl": b'"fine"\n"caf\xe9"\n',
        "garbage.jsonl": rng.randbytes(4096),
        "scalars.jsonl": b'"fine"\n42\nnull\n',
        "noprompt.jsonl": b'{"key": "a", "text": "no prompt field"}\n',
        "dupkeys.jsonl": b'{"key": "k", "prompt": "one"}\n{"key": "k", "prompt": "two"}\n',
        "biginvalid.jsonl": b'{"prompt": "' + b"x" * TEN_MB + b"\n",
    }
    for name, data in bad.items():
        daemon.drop(name, data)
    daemon.drop("bigvalid.jsonl", [{"key": "big", "prompt": "y" * TEN_MB}])
    with (inbox / "toolarge.jsonl").open("wb") as handle:  # sparse: cheap to make
        handle.truncate(MAX_FILE_BYTES + 1)
    (inbox / "folder.jsonl").mkdir()
    os.symlink(target, inbox / "link.jsonl")
    daemon.drop("vanish.jsonl", ["gone"])
    (inbox / "vanish.jsonl").unlink()
    daemon.drop("good.jsonl", ["after all that", {"key": "g2", "prompt": "still working"}])

    names = [*bad, "bigvalid.jsonl", "toolarge.jsonl", "folder.jsonl", "link.jsonl"]
    names += ["slow.jsonl", "good.jsonl"]
    daemon.run_until(lambda: all(finished(daemon, n) for n in names))

    # Validation reports: the file, the line, the reason.
    def validation(name: str) -> dict[str, Any]:
        report = daemon.report(name)
        assert report["input"] == name
        assert report["stage"] == "validation"
        assert name in report["message"]
        assert os.path.lexists(inbox / "failed" / name)
        return report

    for name in ("empty.jsonl", "blank.jsonl"):
        assert "no requests" in validation(name)["message"]
    assert "UTF-8" in errors_by_line(validation("latin1.jsonl"))[2]
    assert validation("garbage.jsonl")["errors"]
    scalars = errors_by_line(validation("scalars.jsonl"))
    assert set(scalars) == {2, 3} and "number" in scalars[2] and "null" in scalars[3]
    assert "prompt" in errors_by_line(validation("noprompt.jsonl"))[1]
    assert "duplicate key" in errors_by_line(validation("dupkeys.jsonl"))[2]
    big_invalid = validation("biginvalid.jsonl")
    assert "JSON" in errors_by_line(big_invalid)[1]
    size = (daemon.outbox / "biginvalid.error.json").stat().st_size
    assert size < 10_000, "the report echoes the 10 MB line"
    assert "max_file_bytes" in validation("toolarge.jsonl")["message"]
    assert "regular file" in validation("folder.jsonl")["message"]
    assert "symbolic link" in validation("link.jsonl")["message"]

    # The symlink's target: untouched, unread, never submitted; the link itself was archived.
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        target_stat.st_ino,
        target_stat.st_mtime_ns,
        target_stat.st_size,
    )
    if check_atime:
        assert after.st_atime == 1_000_000, "the symlink target was read"
    assert target.read_text() == '"the link target must never be submitted"\n'
    assert (inbox / "failed" / "link.jsonl").is_symlink()
    assert "must never be submitted" not in json.dumps(sim.jobs)

    # The good ones.
    big = daemon.results("bigvalid.jsonl")
    assert len(big) == 1 and big[0]["status"] == "ok" and big[0]["key"] == "big"
    assert [r["text"] for r in daemon.results("slow.jsonl")] == [
        f"Simulated answer: {line}" for line in slow_lines
    ]
    assert [r["status"] for r in daemon.results("good.jsonl")] == ["ok", "ok"]
    assert not finished(daemon, "vanish.jsonl")  # gone before it was claimed: nothing to answer

    # Nothing lost: one outbox file per input, nothing left in processing/, one job per file.
    outbox = sorted(p.name for p in daemon.outbox.iterdir())
    assert len(outbox) == len(names) and not [n for n in outbox if n.startswith(".")]
    assert not left_in_processing(inbox)
    assert len(sim.jobs) == 3
    assert all(sim.jobs_created_for(j["display_name"]) == 1 for j in sim.jobs.values())
    assert TEST_API_KEY not in daemon.log.getvalue()


def test_skip_line_mode_keeps_good_lines(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """Under on_invalid_line: skip_line, bad lines get `invalid` records in place."""
    daemon = make_daemon(on_invalid_line="skip_line")
    daemon.drop("mixed.jsonl", b'"good"\n42\n\xff\xfe\n{"prompt": "also good"}\n')
    daemon.run_all()
    assert daemon.exit_status() == 0
    records = daemon.results("mixed.jsonl")
    assert [(r["line"], r["status"], r["attempts"]) for r in records] == [
        (1, "ok", 1),
        (2, "error", 0),
        (3, "error", 0),
        (4, "ok", 1),
    ]
    assert [r["error"]["stage"] for r in records if r["status"] == "error"] == [
        "invalid",
        "invalid",
    ]
    (job,) = sim.jobs.values()
    assert [r["key"] for r in job["requests"]] == ["1", "4"]


def test_a_file_renamed_over_one_in_processing_gets_its_own_report(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """An intruder: someone renames another file over processing/NAME while NAME's job runs.
    The claimed bytes are answered (kept under a second name); the intruder was never
    submitted, and says so in an error report of its own."""
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("a.jsonl", ["the claimed file"])
    daemon.run_until(lambda: daemon.state().get("a.jsonl") == "RUNNING")
    intruder = daemon.root / "intruder.jsonl"
    intruder.write_text('"never submitted"\n')
    os.replace(intruder, daemon.inbox / "processing" / "a.jsonl")
    sim.set_job_state(daemon.sidecar("a.jsonl")["job_name"], "SUCCEEDED")
    daemon.run_all()
    assert [r["text"] for r in daemon.results("a.jsonl")] == ["Simulated answer: the claimed file"]
    report = daemon.report("a.jsonl")
    assert report["stage"] == "validation" and "was replaced in processing/" in report["message"]
    assert (daemon.inbox / "done" / "a.jsonl").read_text() == '"the claimed file"\n'
    assert (daemon.inbox / "failed" / "a.jsonl").read_text() == '"never submitted"\n'
    assert "never submitted" not in json.dumps(sim.jobs)
    assert not left_in_processing(daemon.inbox)


# ---- names the daemon cannot write into a record ------------------------------------------------

NOT_UTF8 = os.fsdecode(b"\xff\xfebad.jsonl")
ESCAPED = "\\xff\\xfebad.jsonl"


def test_a_name_that_is_not_utf8_is_left_in_the_inbox_as_ignored(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(once=True)
    daemon.drop(NOT_UTF8, ["x"])
    daemon.drop("good.jsonl", ["y"])
    daemon.start()
    daemon.run_until(daemon.service.once_finished)
    assert [r["status"] for r in daemon.results("good.jsonl")] == ["ok"]
    assert (daemon.inbox / NOT_UTF8).exists()  # never claimed: no claim without a sidecar
    assert not left_in_processing(daemon.inbox)
    row = next(r for r in status.snapshot(daemon.config)["files"] if r["state"] == "IGNORED")
    assert row["input"] == ESCAPED and "not UTF-8" in row["last_error"]
    [warning] = daemon.events("ignored: rename the file to have it processed")
    assert warning["file"] == ESCAPED
    assert ESCAPED in status.render_table(status.snapshot(daemon.config))


def test_a_name_that_is_not_utf8_claimed_by_an_older_version_goes_back(
    make_daemon: MakeDaemon,
) -> None:
    daemon = make_daemon()
    (daemon.inbox / "processing").mkdir(parents=True, exist_ok=True)
    (daemon.inbox / "processing" / NOT_UTF8).write_text('"x"\n')
    daemon.start()
    assert (daemon.inbox / NOT_UTF8).exists()
    assert not (daemon.inbox / "processing" / NOT_UTF8).exists()
    assert daemon.events("put back into the inbox: its name is not UTF-8")


def test_control_characters_in_names_never_reach_the_terminal(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(once=True)
    name = "\x1b[2J\x1b]0;pwned\x07evil\nname.jsonl"
    daemon.drop(name, ["x"])
    daemon.drop("\x1b[31mnotes.txt", ["x"])  # ignored: listed by status
    daemon.start()
    daemon.run_until(daemon.service.once_finished)
    table = status.render_table(status.snapshot(daemon.config))
    assert "\x1b" not in table and "\\x1b[31mnotes.txt" in table
    [record] = daemon.service.outcomes
    line = status.outcome_line(record, daemon.config)
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line
    assert "\\x0aname.jsonl" in line
