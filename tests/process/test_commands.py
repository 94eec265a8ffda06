"""The command line end to end, across the process boundary: the installed console script and
`python -m daemon`, exit statuses and one-line errors without tracebacks, `run --simulate` in the
project's own layout, the simulator command serving on a port, and `submit` and `cancel`
against a running daemon."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from google import genai
from google.genai import types

from daemon.simulator import Simulator
from tests.support.guarantees import assert_nothing_lost, records, wait_started
from tests.support.harness import ROOT, Spool, wait_for


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMINI_", "GOOGLE_", "NOTIFY_", "JOURNAL_", "CREDENTIALS_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def command() -> list[str]:
    """The installed console script when there is one, else `python -m daemon`."""
    script = Path(sysconfig.get_path("scripts")) / "gemini-batchd"
    found = str(script) if script.exists() else shutil.which("gemini-batchd")
    return [found] if found else [sys.executable, "-m", "daemon"]


def run(cwd: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(), *args],
        cwd=cwd,
        env=kwargs.pop("env", None) or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def simulate_project(tmp_path: Path) -> Path:
    """The project's own layout in a scratch folder: its config.yaml, empty inbox and outbox."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "config.yaml", project / "config.yaml")
    (project / "inbox").mkdir()
    (project / "outbox").mkdir()
    return project


def test_one_file_round_trip(spool: Spool) -> None:
    spool.drop("a.jsonl", ["hello", ["x", "y"]])
    assert spool.run_once() == 0
    results = spool.results("a.jsonl")
    assert [r["key"] for r in results] == ["1", "2"]
    assert all(r["status"] == "ok" for r in results)
    assert spool.finished("a.jsonl")


def test_run_simulate_in_the_project_layout(tmp_path: Path) -> None:
    """`gemini-batchd run --simulate --once` with the shipped config.yaml: no key, no base_url;
    the log says which configuration it uses before it starts the simulator."""
    project = simulate_project(tmp_path)
    (project / "inbox" / "hello.jsonl").write_text('"hello"\n["a", "b"]\n')
    proc = run(project, "run", "--simulate", "--once")
    assert proc.returncode == 0, proc.stderr
    results = [
        json.loads(line) for line in (project / "outbox" / "hello.jsonl").read_text().splitlines()
    ]
    assert [(r["key"], r["status"]) for r in results] == [("1", "ok"), ("2", "ok")]
    assert results[1]["text"] == "Simulated answer: a\nb"
    assert (project / "inbox" / "done" / "hello.jsonl").exists()
    lines = proc.stderr.splitlines()
    [event] = [json.loads(line) for line in lines if '"configuration"' in line]
    assert event["file"] == str(project / "config.yaml") and event["level"] == "info"
    configured = next(i for i, line in enumerate(lines) if '"configuration"' in line)
    assert min(i for i, line in enumerate(lines) if "simulator started" in line) > configured


def test_run_without_a_configuration_file_says_it_uses_defaults(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    proc = run(tmp_path, "run", "--simulate", "--once")
    assert proc.returncode == 0, proc.stderr
    [event] = [json.loads(line) for line in proc.stderr.splitlines() if '"configuration"' in line]
    assert event["file"] == f"none: defaults ({tmp_path / 'config.yaml'} not found)"
    assert event["level"] == "warning"


@pytest.mark.parametrize(
    ("settings", "env", "fragment"),
    [
        ({"poll": {"jitter": 5}}, {"GEMINI_API_KEY": "k" * 39}, "poll.jitter"),
        ({}, {}, "API key"),
    ],
    ids=["bad-config", "no-key"],
)
def test_run_that_cannot_start_exits_2_in_one_line(
    tmp_path: Path, settings: dict[str, Any], env: dict[str, str], fragment: str
) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    proc = run(tmp_path, "run", "--once", env={**clean_env(), **env})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]


def test_python_m_daemon_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: gemini-batchd")


def test_simulator_prints_its_base_url_first(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*command(), "simulator", "--port", "0", "--pending-seconds", "0"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the simulator printed nothing"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert int(url.rsplit(":", 1)[1]) > 0
        client = genai.Client(api_key="any-key", http_options=types.HttpOptions(base_url=url))
        assert list(client.batches.list()) == []
        job = client.batches.create(
            model="gemini-2.5-flash",
            src=[types.InlinedRequest(contents="hello", metadata={"key": "k"})],
        )
        assert job.name and job.name.startswith("batches/")
        assert client.batches.get(name=job.name).name == job.name
    finally:
        proc.terminate()
        code = proc.wait(timeout=15)
    assert code == 0


def test_submit_and_cancel_against_a_running_daemon(spool: Spool, sim: Simulator) -> None:
    """`submit` copies files in atomically and a running daemon takes them; `cancel` of a running
    job by its file name ends it with a report."""
    sim.pending_seconds = 3600
    spool.configure(poll={"initial_seconds": 0.2, "max_seconds": 0.5})
    proc = spool.start()
    wait_started(spool, proc)
    sources = []
    for name in ("first.jsonl", "second.jsonl"):
        source = spool.root / name
        source.write_text(f'"{name} one"\n"{name} two"\n')
        sources.append(str(source))
    done = spool.cli("submit", *sources, "-c", str(spool.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        str(spool.inbox / "first.jsonl"),
        str(spool.inbox / "second.jsonl"),
    ]
    wait_for(lambda: len(sim.jobs) == 2, timeout=30)
    wait_for(lambda: all(spool.sidecar(n)["job_name"] for n in ("first.jsonl", "second.jsonl")))

    job = spool.sidecar("second.jsonl")["job_name"]
    done = spool.cli("cancel", "second.jsonl", "-c", str(spool.config_path))
    assert done.returncode == 0, done.stderr
    assert f"second.jsonl: cancel requested: the daemon cancels its job(s) {job}" in done.stdout
    sim.set_job_state(spool.sidecar("first.jsonl")["job_name"], "SUCCEEDED")
    wait_for(lambda: spool.finished("first.jsonl") and spool.finished("second.jsonl"), timeout=30)
    assert [r["status"] for r in records(spool, "first.jsonl")] == ["ok", "ok"]
    report = json.loads((spool.outbox / "second.error.json").read_text())
    assert (report["job_name"], report["job_state"]) == (job, "JOB_STATE_CANCELLED")
    assert proc.poll() is None
    assert_nothing_lost(spool, ["first.jsonl", "second.jsonl"], jobs=2)
