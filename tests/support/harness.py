"""Runs the real daemon as a subprocess against an in-test simulator, through the real SDK.

Every end-to-end, crash and fault test builds on `Spool`: a folder with a config.yaml, an
inbox and an outbox, and helpers to drop files, start and kill the daemon, and read results.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from daemon.simulator import Simulator
from tests.support.forkserver import Forked, Launcher
from tests.support.settings import REAL_TIME, test_config

ROOT = Path(__file__).resolve().parents[2]
Process = subprocess.Popen[bytes] | Forked
"""A daemon process the tests started: its pid, poll, wait, send_signal, kill, returncode."""

TEST_API_KEY = "AIzaTEST-secret-key-0123456789"
"""The key the daemon under test uses; tests assert it never appears in any file or log."""


CONTRACT_SIDECAR_FIELDS = {
    "input",
    "sha256",
    "requests",
    "state",
    "job_name",
    "job_state",
    "model",
    "created_at",
    "updated_at",
    "polls",
    "next_poll_at",
    "error",
}
"""The fields the contract promises in every sidecar."""


class FakeClock:
    """An injected monotonic clock that only moves when a test says so: no sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_jsonl(path: Path, lines: Iterable[Any]) -> Path:
    """Each line as JSON (bytes as they are), one per line."""
    path.write_bytes(
        b"".join(
            (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
            for line in lines
        )
    )
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class Spool:
    """One daemon's folders and configuration, plus the processes started on them."""

    launcher: Launcher | None = None
    """The session's fork server, while the process tests run (tests/process/conftest.py)."""

    def __init__(self, root: Path, sim: Simulator, **overrides: Any) -> None:
        self.root = root
        self.sim = sim
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.config_path = root / "config.yaml"
        self.log_paths: list[Path] = []
        self.procs: list[Process] = []
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.configure(**overrides)

    def configure(self, **overrides: Any) -> None:
        self.config_path.write_text(
            yaml.safe_dump(test_config(self.sim.base_url, REAL_TIME, **overrides))
        )

    # ---- processes --------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GEMINI_", "GOOGLE_", "NOTIFY_", "JOURNAL_"))
        }
        env.update(
            {"GEMINI_API_KEY": TEST_API_KEY, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        )
        env.update(extra or {})
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "daemon", *args]

    def start(self, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start `gemini-batchd run -c config.yaml ARGS` in the background; stderr goes to a log
        file. Forked from the test session's fork server where there is one (see
        tests/support/forkserver.py), else `python -m daemon`."""
        log_path = self.root / f"daemon-{len(self.log_paths)}.log"
        self.log_paths.append(log_path)
        argv = ["run", "-c", str(self.config_path), *args]
        proc: Process
        with log_path.open("wb") as log:
            if Spool.launcher is not None and type(self).command is Spool.command:
                proc = Spool.launcher.spawn(argv, cwd=self.root, env=self.env(env), log=log_path)
            else:
                proc = subprocess.Popen(
                    self.command(*argv),
                    cwd=self.root,
                    env=self.env(env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        self.procs.append(proc)
        return proc

    def run_once(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> int:
        """`gemini-batchd run --once`: its exit status."""
        proc = self.start("--once", *args, env=env)
        return proc.wait(timeout=timeout)

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run another subcommand (status, validate, ...) to completion."""
        return subprocess.run(
            self.command(*args),
            cwd=self.root,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop_all(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    # ---- files ----------------------------------------------------------------------

    def drop(self, name: str, lines: Iterable[Any] | bytes, *, how: str = "rename") -> Path:
        """Put an input file into the inbox: `rename` (atomic), `inplace` (open-write-close) or `copy`."""
        data = (
            lines
            if isinstance(lines, bytes)
            else b"".join(
                (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                for line in lines
            )
        )
        target = self.inbox / name
        if how == "rename":
            tmp = self.inbox / f".{name}.part"
            tmp.write_bytes(data)
            os.rename(tmp, target)
        elif how == "inplace":
            with target.open("wb") as handle:
                half = len(data) // 2
                handle.write(data[:half])
                handle.flush()
                time.sleep(0.05)
                handle.write(data[half:])
        elif how == "copy":
            source = self.root / f"source-{name}"
            source.write_bytes(data)
            subprocess.run(["cp", str(source), str(target)], check=True)
        else:
            raise ValueError(how)
        return target

    def results(self, name: str) -> list[dict[str, Any]]:
        """The records of outbox/NAME (a `.jsonl` name)."""
        return [json.loads(line) for line in (self.outbox / name).read_text().splitlines()]

    def report(self, stem: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.outbox / f"{stem}.error.json").read_text())
        return result

    def finished(self, name: str) -> bool:
        """Whether NAME.jsonl has reached done/ or failed/ together with its sidecar."""
        return any(
            (self.inbox / folder / name).exists()
            and (self.inbox / folder / (name + ".job.json")).exists()
            for folder in ("done", "failed")
        )

    def sidecar(self, name: str) -> dict[str, Any]:
        for folder in ("processing", "done", "failed"):
            path = self.inbox / folder / (name + ".job.json")
            if path.exists():
                result: dict[str, Any] = json.loads(path.read_text())
                return result
        raise FileNotFoundError(name)

    def all_written_files(self) -> list[Path]:
        """Every file under the spool (for secret scans)."""
        return [p for p in self.root.rglob("*") if p.is_file()]
