"""Shared helpers of the benchmarks: a simulator process, spool folders, inputs, tables."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEY = "bench-key"
PYTHON = sys.executable


def machine() -> str:
    """`nproc`, CPU model and Python version, for the results file."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{len(os.sched_getaffinity(0))} CPU(s) (`nproc`), {model}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.release()}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 20):.1f}"


# ---- the simulator, in its own process ------------------------------------------------------


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    base_url: str

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.base_url + path)
        request.add_header("x-goog-api-key", API_KEY)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def batches(self) -> list[dict[str, Any]]:
        """Every job's metadata (name, displayName, createTime, state), paging through the list."""
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            page = self.get(f"/v1beta/batches?pageSize=1000&pageToken={token}")
            out += [op["metadata"] for op in page.get("operations", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return out


@contextmanager
def simulator(pending: float = 0.0, running: float = 0.0) -> Iterator[SimProcess]:
    """`python -m daemon simulator` in its own process, so its memory is not the daemon's."""
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "daemon",
            "simulator",
            "--port",
            "0",
            "--pending-seconds",
            str(pending),
            "--running-seconds",
            str(running),
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the simulator did not start: {base_url!r}")
        yield SimProcess(proc, base_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the daemon ---------------------------------------------------------------------------


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_"))}
    out.update({"GEMINI_API_KEY": API_KEY, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    return out


def spool(root: Path, base_url: str, **overrides: Any) -> Path:
    """inbox/, outbox/ and a config.yaml talking to `base_url`; returns the config path."""
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    (root / "outbox").mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "log_level": "info",
        "api": {"base_url": base_url, "retries": 3, "timeout_seconds": 600},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def daemon_command(config: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "daemon", "run", "-c", str(config), *args]


@contextmanager
def running_daemon(config: Path, root: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`gemini-batchd run` in the background, once it has logged "started"; stopped afterwards."""
    log = root / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            daemon_command(config), cwd=root, env=env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "started" for e in log_events(log)):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield daemon, log
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


@dataclass
class ChildRun:
    returncode: int
    max_rss_bytes: int
    wall_seconds: float
    cpu_seconds: float


_MEASURE = """
import json, os, subprocess, sys, time
started = time.monotonic()
with open(sys.argv[1], "wb") as log:
    proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024,
                  time.monotonic() - started, usage.ru_utime + usage.ru_stime]))
"""


def run_measured(command: list[str], log: Path, cwd: Path) -> ChildRun:
    """Run a child to completion; its own peak RSS and CPU time from wait4().

    Through a small Python parent: a child's ru_maxrss counts the memory of the process it
    was forked from, so forking straight from this (larger) process would inflate it.
    """
    out = subprocess.run(
        [PYTHON, "-S", "-c", _MEASURE, str(log), *command],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    returncode, max_rss, wall, cpu = json.loads(out.stdout)
    return ChildRun(returncode, max_rss, wall, cpu)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def log_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        with suppress(ValueError):
            events.append(json.loads(line))
    return events


# ---- inputs -------------------------------------------------------------------------------

_WORDS = [
    *("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"),
    *("lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi"),
    *("chi", "psi", "omega", "categorise", "summarise", "translate", "explain"),
]


def prompt_line(key: str, form: int, rng: random.Random, width: int) -> bytes:
    """One input line of about `width` bytes in one of the four input forms."""
    words = " ".join(rng.choice(_WORDS) for _ in range(max(1, width // 7)))
    value: Any
    if form == 0:
        value = {"key": key, "prompt": words}
    elif form == 1:
        value = {"key": key, "prompt": [words[: len(words) // 2], words[len(words) // 2 :]]}
    elif form == 2:
        value = {"key": key, "prompt": words, "config": {"temperature": 0.5}}
    else:
        value = {
            "key": key,
            "request": {"contents": [{"role": "user", "parts": [{"text": words}]}]},
        }
    return json.dumps(value).encode() + b"\n"


def write_input(path: Path, target_bytes: int, width: int = 1000, seed: int = 1) -> int:
    """Write keyed prompt lines (all four forms) until the file holds `target_bytes`.

    Returns the request count. Lines come from a pool of templates, so even 1 GB is quick.
    """
    rng = random.Random(seed)
    pool = [
        tuple(prompt_line("@KEY@", form, rng, width).split(b"@KEY@"))
        for _ in range(16)
        for form in range(4)
    ]
    count = written = 0
    with path.open("wb", buffering=1 << 20) as out:
        while written < target_bytes:
            head, tail = pool[count % len(pool)]
            line = b"%sr%d%s" % (head, count, tail)
            out.write(line)
            written += len(line)
            count += 1
    return count
