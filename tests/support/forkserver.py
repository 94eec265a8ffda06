"""Start daemon processes a second faster: fork them from a process that has the libraries loaded.

Importing google-genai, pydantic and httpx takes about a second of CPU, and the process tests
start a hundred daemons. The fork server (`python -m tests.support.forkserver`) imports those libraries
once -- none of the daemon's own modules, whose module-level state must be fresh -- and forks
a child per request that runs `gemini-batchd ARGS` (daemon.cli.main) in the requested folder
with the requested environment and its output in the requested log file: a real process,
with its own pid, signals and exit status, as `python -m daemon ARGS` would be.

`Launcher` is the test side: `spawn()` returns a `Forked`, which behaves like the parts of
`subprocess.Popen` the tests use (pid, poll, wait, send_signal, kill, returncode).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

WARM = (
    "google.genai",
    "google.genai.types",
    "google.genai.errors",
    "httpx2",
    "httpcore2",
    "pydantic",
    "yaml",
    "structlog",
    "watchdog.observers",
    "watchdog.events",
    "orjson",
    "json_repair",
)
"""Third-party libraries the daemon imports: loaded once, before any fork."""


# ---- the server ------------------------------------------------------------------------------


def serve() -> None:
    """Read spawn requests (JSON lines) on stdin; answer with pids and, later, exit statuses."""
    import importlib

    for name in WARM:
        importlib.import_module(name)
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    out = sys.stdout
    pending = b""
    while True:
        try:
            ready, _, _ = select.select([sys.stdin.buffer, wake_read], [], [])
        except InterruptedError:
            ready = []
        if wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(json.dumps({"exited": pid, "code": code}) + "\n")
            out.flush()
        if sys.stdin.buffer in ready:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                return  # the tests are over
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, (wake_read, wake_write))
                out.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
                out.flush()


def _child(request: dict[str, Any], wake: tuple[int, int]) -> None:
    """In the forked child: become `gemini-batchd ARGS` in the requested folder."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path.insert(0, request["root"])
        from daemon import cli

        try:
            code = cli.main(request["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# ---- the test side ---------------------------------------------------------------------------


class Forked:
    """A daemon process forked by the server: what the tests use of `subprocess.Popen`."""

    def __init__(self, launcher: Launcher, pid: int) -> None:
        self._launcher = launcher
        self.pid = pid
        self.args = ["gemini-batchd"]

    @property
    def returncode(self) -> int | None:
        return self._launcher.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._launcher.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """One fork server for the test session, and the exit statuses it reports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forkserver"],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._ids = 0
        self._reader = threading.Thread(target=self._read, name="forkserver", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            message = json.loads(raw)
            with self._cond:
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._pids[message["id"]] = message["pid"]
                self._cond.notify_all()

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Forked:
        with self._cond:
            self._ids += 1
            request_id = self._ids
        request = {
            "id": request_id,
            "argv": argv,
            "cwd": str(cwd),
            "env": env,
            "log": str(log),
            "root": str(self.root),
        }
        stdin: IO[bytes] | None = self._proc.stdin
        assert stdin is not None
        with self._cond:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
            if not self._cond.wait_for(lambda: request_id in self._pids, timeout=30):
                raise RuntimeError("the fork server did not answer")
            return Forked(self, self._pids.pop(request_id))

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while pid not in self._exits:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._exits[pid]

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    serve()
