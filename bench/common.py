"""Shared helpers of the benchmarks: a simulator process, spool folders, the daemon as a measured
child, inputs, the orjson yardstick and tables."""

from __future__ import annotations

import compileall
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEY = "bench-key"
PYTHON = sys.executable
MB = 1_000_000

FAST_POLLS = {"initial_seconds": 0.2, "max_seconds": 2, "jitter": 0}
"""Poll settings for runs against a simulator whose jobs end at once: no time spent waiting."""


def machine() -> str:
    """`nproc`, CPU model and Python version, for the results file."""
    model = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
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


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def progress(message: str) -> None:
    """A line on stderr while a benchmark runs (the tables go to stdout)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- the simulator, in its own process ------------------------------------------------------


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    base_url: str
    vertex: dict[str, Any] | None = None  # with vertex=True: the daemon's `vertex` settings

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

    def peak_rss(self) -> int:
        """The simulator's own peak RSS (VmHWM), in bytes: it keeps every job in memory."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


@contextmanager
def simulator(
    pending: float = 0.0, running: float = 0.0, *, vertex: bool = False
) -> Iterator[SimProcess]:
    """`python -m daemon simulator` in its own process, so its CPU and memory are not the daemon's.

    `vertex`: the Vertex AI simulator and its Cloud Storage emulator (with a staging bucket),
    reached by daemons started meanwhile through `STORAGE_EMULATOR_HOST` and a service-account
    key whose token endpoint is the simulator's."""
    command = [PYTHON, "-m", "daemon", "simulator", "--port", "0"]
    command += ["--pending-seconds", str(pending), "--running-seconds", str(running)]
    command += ["--vertex", "--bucket", BUCKET] if vertex else []
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    sim: SimProcess | None = None
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the simulator did not start: {base_url!r}")
        sim = SimProcess(proc, base_url)
        if vertex:
            os.environ["STORAGE_EMULATOR_HOST"] = proc.stdout.readline().strip().split("=", 1)[1]
            sim.vertex = _vertex_settings(base_url)
        yield sim
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        if sim is not None and sim.vertex is not None:
            shutil.rmtree(Path(sim.vertex["credentials_file"]).parent)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


BUCKET = "bench-staging"


def _vertex_settings(base_url: str) -> dict[str, Any]:
    """The `vertex` settings of a daemon using the Vertex simulator at `base_url`."""
    from tests.support.vertex import PROJECT, write_service_account_key

    key = write_service_account_key(
        Path(tempfile.mkdtemp(prefix="bench-key-")), base_url + "/token"
    )
    return {"project": PROJECT, "staging_uri": f"gs://{BUCKET}/bench", "credentials_file": str(key)}


# ---- the daemon ---------------------------------------------------------------------------


def compile_daemon() -> None:
    """Byte-compile the daemon's modules, as pip does when it installs a package: with
    PYTHONDONTWRITEBYTECODE set (as on some machines) a checkout's daemon would otherwise
    compile every module again at every start, about 0.15 s of CPU per run."""
    compileall.compile_dir(ROOT / "daemon", quiet=1)


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
print(proc.pid, flush=True)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024,
                  time.monotonic() - started, usage.ru_utime + usage.ru_stime]))
"""


def run_measured(
    command: list[str],
    log: Path,
    cwd: Path,
    until: Callable[[], bool] | None = None,
    timeout: float = 7200,
) -> ChildRun:
    """Run a child to its end; its own peak RSS and CPU time (all its threads) from wait4().

    With `until`, the child is stopped with SIGTERM as soon as `until()` is true (a daemon
    that would otherwise run on). Through a small Python parent: a child's ru_maxrss counts
    the memory of the process it was forked from, so forking from this (larger) process
    would inflate it.
    """
    parent = subprocess.Popen(
        [PYTHON, "-S", "-c", _MEASURE, str(log), *command],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + timeout
    try:
        while until is not None and parent.poll() is None:
            if until():
                os.kill(pid, signal.SIGTERM)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not finished after {timeout:.0f} s: {command}")
            time.sleep(0.05)
        out = parent.stdout.read()
        parent.wait()
    except BaseException:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        parent.wait()
        raise
    returncode, max_rss, wall, cpu = json.loads(out)
    return ChildRun(returncode, max_rss, wall, cpu)


def archived(root: Path, name: str) -> bool:
    """Whether the daemon has finished inbox file `name`: its sidecar is in done/ or failed/
    and its name lock is gone (archiving is the last step)."""
    inbox = root / "inbox"
    sidecar = name + ".job.json"
    moved = (inbox / "done" / sidecar).exists() or (inbox / "failed" / sidecar).exists()
    return moved and not (inbox / "processing" / f".{name}.lock").exists()


def process_inbox(config: Path, root: Path, name: str) -> ChildRun:
    """`gemini-batchd run` until inbox file `name` is archived, then SIGTERM; its rusage.

    Not `run --once`: it can stop before the file it was meant to process is tracked (its
    check runs while a worker thread is between moving the file and tracking it).
    """
    run = run_measured(
        daemon_command(config), root / "daemon.log", root, lambda: archived(root, name)
    )
    if run.returncode != 0 or not (root / "inbox" / "done" / f"{name}.job.json").exists():
        raise RuntimeError(f"the daemon failed: {(root / 'daemon.log').read_text()[-3000:]}")
    return run


def sidecar(root: Path, name: str) -> dict[str, Any]:
    """The archived sidecar of a finished file."""
    value: dict[str, Any] = json.loads((root / "inbox" / "done" / f"{name}.job.json").read_text())
    return value


def check_results(root: Path, name: str, requests: int) -> dict[str, Any]:
    """The outbox file holds one record per request, the first one ok (the run did what it
    was measured for); returns that first record."""
    records = 0
    first: dict[str, Any] = {}
    with (root / "outbox" / name).open("rb") as handle:
        for line in handle:
            records += 1
            if records == 1:
                first = orjson.loads(line)
    if first.get("status") != "ok":
        raise RuntimeError(f"unexpected first record: {first}")
    if records != requests:
        raise RuntimeError(f"{records} records for {requests} requests")
    return first


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
JSON_CONFIG = {"responseMimeType": "application/json"}


def _words(rng: random.Random, width: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, width // 7)))


def prompt_line(
    key: str,
    form: int,
    rng: random.Random,
    width: int,
    json_answers: bool = False,
    system_width: int = 0,
) -> bytes:
    """One input line with a prompt of about `width` bytes in one of the four input forms.

    `json_answers`: each line asks for `responseMimeType: application/json`, so that the
    simulator answers JSON (and the daemon parses it under `filter_json`). `system_width`:
    a system prompt of about that many bytes too (the simulator does not echo it: long lines,
    short answers).
    """
    words = _words(rng, width)
    value: dict[str, Any]
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
    if json_answers and form == 3:
        value["request"]["generationConfig"] = dict(JSON_CONFIG)
    elif json_answers:
        value["config"] = {**value.get("config", {}), **JSON_CONFIG}
    if system_width and form == 3:
        value["request"]["systemInstruction"] = {"parts": [{"text": _words(rng, system_width)}]}
    elif system_width:
        value["system_prompt"] = _words(rng, system_width)
    return json.dumps(value).encode() + b"\n"


def write_input(
    path: Path,
    target_bytes: int | None = None,
    *,
    requests: int | None = None,
    width: int = 1000,
    json_answers: bool = False,
    system_width: int = 0,
    line_overhead: int = 0,
    seed: int = 1,
) -> int:
    """Write keyed prompt lines (all four forms) until the file holds `target_bytes` (counting
    `line_overhead` more per line) or `requests` lines; returns the request count.

    Lines come from a pool of templates with a fresh key each, so even 5 GB is quick.
    """
    rng = random.Random(seed)
    pool = [
        tuple(prompt_line("@KEY@", form, rng, width, json_answers, system_width).split(b"@KEY@"))
        for _ in range(16)
        for form in range(4)
    ]
    limit = target_bytes if target_bytes is not None else float("inf")
    count = written = 0
    with path.open("wb", buffering=1 << 20) as out:
        while written < limit and (requests is None or count < requests):
            head, tail = pool[count % len(pool)]
            line = b"%sr%d%s" % (head, count, tail)
            if target_bytes is not None and written + len(line) + line_overhead > limit:
                break
            out.write(line)
            written += len(line) + line_overhead
            count += 1
    return count
