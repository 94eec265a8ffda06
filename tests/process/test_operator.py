"""The operator's commands against a running daemon subprocess: status, retry, submit --wait,
run --once, the start-up key check, and a clean exit when the output is piped into `head`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from daemon.simulator import Simulator
from tests.support.guarantees import (
    CONTRACT_DAEMON_FIELDS,
    CONTRACT_ROW_FIELDS,
    CONTRACT_TOTALS,
    wait_started,
)
from tests.support.harness import TEST_API_KEY, Spool, wait_for

QUICK_RETRIES = {"backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.5}
"""A paused daemon tries again this soon (else once a minute)."""


def status_json(spool: Spool) -> dict[str, Any]:
    done = spool.cli("status", "-c", str(spool.config_path), "--json")
    assert done.returncode == 0 and not done.stderr, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def row(snap: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in snap["files"] if r["input"] == name]
    assert len(found) == 1, name
    return found[0]


def state_of(spool: Spool, name: str) -> str | None:
    rows = [r for r in status_json(spool)["files"] if r["input"] == name]
    return str(rows[0]["state"]) if rows else None


def presence_files(spool: Spool) -> list[str]:
    return [p.name for p in (spool.inbox / "processing").glob(".daemon.*")]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


# ---- status ------------------------------------------------------------------------


def test_status_follows_the_daemon_from_start_to_stop(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 120  # the job stays in flight
    spool.configure(api=QUICK_RETRIES)
    (spool.inbox / "notes.txt").write_text("not a prompt file\n")
    spool.drop("a.jsonl", ["one", "two"])

    before = status_json(spool)
    assert before["daemon"].keys() >= CONTRACT_DAEMON_FIELDS
    assert (before["daemon"]["running"], before["daemon"]["pid"]) == (False, None)
    assert before["totals"].keys() >= CONTRACT_TOTALS
    assert row(before, "a.jsonl")["state"] == "WAITING"
    ignored = row(before, "notes.txt")
    assert ignored["state"] == "IGNORED" and "only names ending in .jsonl" in ignored["last_error"]
    for r in before["files"]:
        assert r.keys() >= CONTRACT_ROW_FIELDS
    table = spool.cli("status", "-c", str(spool.config_path)).stdout
    assert table.startswith("daemon: not running")
    assert "a.jsonl" in table and "WAITING" in table and "ignored: only names" in table

    proc = spool.start()
    wait_started(spool, proc)
    wait_for(lambda: state_of(spool, "a.jsonl") == "RUNNING", timeout=30)
    snap = status_json(spool)
    daemon = snap["daemon"]
    assert daemon["running"] is True and daemon["pid"] == proc.pid
    assert daemon["config"] == str(spool.config_path) and daemon["paused"] is None
    assert daemon["since"].endswith("Z")
    running = row(snap, "a.jsonl")
    assert running.keys() >= CONTRACT_ROW_FIELDS
    assert running["job_name"].startswith("batches/") and running["requests"] == 2
    assert running["job_state"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert snap["totals"]["active"] == 1 and snap["totals"]["ignored"] == 1
    table = spool.cli("status", "-c", str(spool.config_path)).stdout
    assert table.startswith(f"daemon: running, pid {proc.pid}, since ")
    assert f"config: {spool.config_path}" in table.splitlines()

    sim.api_key = "a key the daemon does not have"  # the API now rejects ours
    wait_for(lambda: status_json(spool)["daemon"]["paused"], timeout=30)
    snap = status_json(spool)
    assert "API key" in snap["daemon"]["paused"]
    assert "API key not valid" in row(snap, "a.jsonl")["last_error"]
    assert row(snap, "a.jsonl")["retries"] >= 1
    table = spool.cli("status", "-c", str(spool.config_path)).stdout
    assert "PAUSED: API key or permission rejected" in table
    assert TEST_API_KEY not in table
    sim.api_key = None
    wait_for(lambda: status_json(spool)["daemon"]["paused"] is None, timeout=30)

    stop(proc)
    after = status_json(spool)
    assert (after["daemon"]["running"], after["daemon"]["pid"]) == (False, None)
    assert presence_files(spool) == []
    assert row(after, "a.jsonl")["state"] == "RUNNING"  # its job goes on; resumed at the next start


def test_a_killed_daemon_is_not_running(spool: Spool) -> None:
    proc = spool.start()
    wait_started(spool, proc)
    assert status_json(spool)["daemon"]["running"] is True
    proc.kill()
    proc.wait()
    snap = status_json(spool)
    assert snap["daemon"]["running"] is False
    assert [d["pid"] for d in snap["stale_daemons"]] == [proc.pid]
    assert (
        "stopped without a clean exit" in spool.cli("status", "-c", str(spool.config_path)).stdout
    )
    again = spool.start()
    wait_started(spool, again)
    snap = status_json(spool)
    assert snap["daemon"]["pid"] == again.pid and snap["stale_daemons"] == []
    stop(again)


def test_output_piped_into_head_exits_cleanly(spool: Spool) -> None:
    for i in range(1500):  # a table far bigger than a pipe's buffer
        (spool.inbox / f"wrong-name-{i:04d}.txt").write_text("x")
    cfg = str(spool.config_path)
    command = " ".join(spool.command())
    for args in (
        f"status -c {cfg}",
        f"status -c {cfg} --json",
        f"status -c {cfg} --watch --interval 0.05",
    ):
        done = subprocess.run(
            ["bash", "-c", f"{command} {args} | head -n 2 >/dev/null; echo ${{PIPESTATUS[0]}}"],
            cwd=spool.root,
            env=spool.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout.strip() == "0", (args, done.stdout, done.stderr)
        assert done.stderr == "", (args, done.stderr)


def test_status_watch_redraws_and_ctrl_c_exits_0(spool: Spool) -> None:
    spool.drop("a.jsonl", ["x"])
    proc = subprocess.Popen(
        spool.command("status", "-c", str(spool.config_path), "--watch", "--interval", "0.1"),
        cwd=spool.root,
        env=spool.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(20)]
    assert sum(line.startswith(b"daemon: not running") for line in seen) >= 2, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and err == b""


# ---- run --once ----------------------------------------------------------------------------


def test_run_once_summary_strict_and_exit_status(spool: Spool, sim: Simulator) -> None:
    sim.fail_keys = {"2": 400}
    spool.configure(prices={"gemini-2.5-flash": {"input": 0.3, "output": 2.5}})
    spool.drop("clean.jsonl", ["a"])
    spool.drop("mixed.jsonl", ["a", "b", "c"])
    done = spool.cli("run", "-c", str(spool.config_path), "--once", timeout=90)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, lines
    [clean] = [line for line in lines if " clean.jsonl: " in line]
    assert clean.startswith("DONE clean.jsonl: 1 ok, 0 errors, ") and " tokens, ~$" in clean
    assert clean.endswith(f"-> {spool.outbox / 'clean.jsonl'}")
    assert any(line.startswith("DONE mixed.jsonl: 2 ok, 1 errors") for line in lines)
    total = lines[-1]
    assert total.startswith("total: 2 files (2 done, 0 failed), 3 requests ok, 1 errors, ")
    assert "~$" in total

    spool.drop("again.jsonl", ["a", "b"])  # key "2" fails again
    strict = spool.cli("run", "-c", str(spool.config_path), "--once", "--strict", timeout=90)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert strict.stdout.splitlines()[-1].startswith(
        "total: 1 files (1 done, 0 failed), 1 requests"
    )

    spool.drop("broken.jsonl", b"{not json\n")
    failed = spool.cli("run", "-c", str(spool.config_path), "--once", timeout=90)
    assert failed.returncode == 1
    assert failed.stdout.startswith("FAILED broken.jsonl: failed (validation): ")
    assert f"-> {spool.outbox / 'broken.error.json'}" in failed.stdout

    usage = spool.cli("run", "-c", str(spool.config_path), "--strict")
    assert usage.returncode == 2 and "--strict needs --once" in usage.stderr


# ---- the key check at start ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rejected_key_exits_2_naming_its_source(tmp_path: Path) -> None:
    with Simulator(api_key="the only key the API takes") as sim:
        spool = Spool(tmp_path, sim)
        spool.drop("a.jsonl", ["x"])
        key_file = tmp_path / "key.txt"
        key_file.write_text(TEST_API_KEY + "\n")
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "gemini_api_key").write_text(TEST_API_KEY)
        cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
            ({}, {}, "$GEMINI_API_KEY"),
            ({"GOOGLE_API_KEY": TEST_API_KEY}, {}, "$GOOGLE_API_KEY"),
            ({}, {"api": {"key_file": str(key_file)}}, f"api.key_file {key_file}"),
            (
                {"GEMINI_API_KEY": "", "CREDENTIALS_DIRECTORY": str(creds)},
                {},
                "$CREDENTIALS_DIRECTORY/gemini_api_key",
            ),
        ]
        for env, settings, source in cases:
            spool.configure(**settings)
            done = spool.cli("run", "-c", str(spool.config_path), env=env, timeout=60)
            assert done.returncode == 2, (source, done.stderr)
            message = [
                line for line in done.stderr.splitlines() if line.startswith("gemini-batchd:")
            ]
            assert len(message) == 1, done.stderr
            assert f"the API rejected the key from {source}" in message[0]
            assert "API key not valid" in message[0]
            assert TEST_API_KEY not in done.stderr + done.stdout
        assert (spool.inbox / "a.jsonl").exists(), "nothing is claimed before the key is accepted"
        assert not list((spool.inbox / "processing").glob("*.job.json"))


def test_an_unreachable_api_only_warns(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim)
    spool.configure(api={"base_url": f"http://127.0.0.1:{free_port()}", "timeout_seconds": 2})
    done = spool.cli("run", "-c", str(spool.config_path), "--once", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "cannot check the API key now; starting anyway" in done.stderr
    assert "total: 0 files" in done.stdout


# ---- retry ---------------------------------------------------------------------------------


def test_retry_puts_failed_inputs_back(spool: Spool, sim: Simulator) -> None:
    cfg = str(spool.config_path)
    sim.outcome = "FAILED"  # the API fails the jobs
    proc = spool.start()
    wait_started(spool, proc)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        spool.drop(name, ["x", "y"])
    wait_for(lambda: all(spool.finished(n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")))
    assert sorted(p.name for p in (spool.inbox / "failed").glob("*.jsonl")) == [
        "a.jsonl",
        "b.jsonl",
        "c.jsonl",
    ]
    assert state_of(spool, "a.jsonl") == "FAILED"
    sim.outcome = None  # the cause is fixed

    done = spool.cli("retry", "a.jsonl", "-c", cfg)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{spool.inbox / 'failed' / 'a.jsonl'} -> {spool.inbox / 'a.jsonl'}\n"
    wait_for(lambda: (spool.inbox / "done" / "a.jsonl").exists())
    assert [r["status"] for r in spool.results("a.jsonl")] == ["ok", "ok"]
    assert not (spool.inbox / "failed" / "a.jsonl").exists()
    assert (spool.inbox / "failed" / "a.jsonl.job.json").exists(), "the old record stays"
    assert state_of(spool, "a.jsonl") == "DONE"

    missing = spool.cli("retry", "nope.jsonl", "a.jsonl", "-c", cfg)
    assert missing.returncode == 1
    errors = missing.stderr.splitlines()
    assert errors[0].startswith("gemini-batchd: retry: nope.jsonl: no such input in ")
    assert "failed inputs there: b.jsonl, c.jsonl" in errors[0]
    assert "a.jsonl is in " in errors[1] and "it got results" in errors[1]
    assert missing.stdout == ""

    many = spool.cli("retry", "--all-failed-since", "1h", "-c", cfg)
    assert many.returncode == 0, many.stderr
    assert len(many.stdout.splitlines()) == 2
    wait_for(lambda: all((spool.inbox / "done" / n).exists() for n in ("b.jsonl", "c.jsonl")))
    nothing = spool.cli("retry", "--all-failed-since", "2h", "-c", cfg)
    assert nothing.returncode == 0 and "no inputs failed since" in nothing.stderr
    stop(proc)


# ---- submit --wait -------------------------------------------------------------------------


def test_submit_wait_prints_outbox_paths_and_exits_like_once(
    spool: Spool, sim: Simulator, tmp_path: Path
) -> None:
    cfg = str(spool.config_path)
    sim.fail_keys = {"2": 400}
    proc = spool.start()
    wait_started(spool, proc)
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "good.jsonl").write_text('"a"\n')
    (sources / "mixed.jsonl").write_text('"a"\n"b"\n')
    (sources / "broken.jsonl").write_text("{nope\n")

    done = spool.cli(
        "submit",
        str(sources / "good.jsonl"),
        str(sources / "mixed.jsonl"),
        "--wait",
        "-c",
        cfg,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [
        str(spool.outbox / "good.jsonl"),
        str(spool.outbox / "mixed.jsonl"),
    ]
    assert (
        f"submitted {spool.inbox / 'good.jsonl'}; waiting for its results in {spool.outbox}"
        in done.stderr
    )
    assert "no daemon" not in done.stderr

    strict = spool.cli(
        "submit", str(sources / "mixed.jsonl"), "--wait", "--strict", "-c", cfg, timeout=60
    )
    assert strict.returncode == 1, strict.stderr
    assert strict.stdout == f"{spool.outbox / 'mixed-2.jsonl'}\n"  # the outbox name was taken

    failed = spool.cli("submit", str(sources / "broken.jsonl"), "--wait", "-c", cfg, timeout=60)
    assert failed.returncode == 1
    assert failed.stdout == f"{spool.outbox / 'broken.error.json'}\n"
    assert "FAILED broken.jsonl: failed (validation)" in failed.stderr
    stop(proc)


def test_submit_wait_without_a_daemon_says_so_once_and_keeps_waiting(
    spool: Spool, tmp_path: Path
) -> None:
    source = tmp_path / "later.jsonl"
    source.write_text('"a"\n')
    waiter = subprocess.Popen(
        spool.command("submit", str(source), "--wait", "-c", str(spool.config_path)),
        cwd=spool.root,
        env=spool.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiter.stderr is not None
    lines = [waiter.stderr.readline(), waiter.stderr.readline()]
    assert lines[0].startswith(f"submitted {spool.inbox / 'later.jsonl'}; waiting"), lines
    assert lines[1].startswith(f"no daemon is running on {spool.inbox}"), lines
    assert waiter.poll() is None
    proc = spool.start()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out == f"{spool.outbox / 'later.jsonl'}\n"
    assert "no daemon" not in err
    stop(proc)


# ---- arrival order -------------------------------------------------------------------------


def test_queued_files_go_out_in_arrival_order(spool: Spool, sim: Simulator) -> None:
    """Six files 50 ms apart under max_active_jobs 1, with the daemon's worker threads."""
    spool.configure(limits={"max_active_jobs": 1})
    proc = spool.start()
    wait_started(spool, proc)
    names = [f"f{i}.jsonl" for i in (4, 1, 6, 2, 5, 3)]
    for name in names:
        spool.drop(name, [name])
        time.sleep(0.05)
    wait_for(lambda: all(spool.finished(n) for n in names), timeout=60)
    created = [job["display_name"].split("/")[1] for job in sim.jobs.values()]
    assert created == names
    stop(proc)
