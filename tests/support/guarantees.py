"""Checks of the contract's guarantees, shared by the crash, fault and hostile-input tests.

Each check looks only at what a user can see: the inbox folders, the outbox, the sidecars,
the simulator's record of jobs, and the daemon's log.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from daemon.simulator import ACTIVE_STATES, Simulator
from tests.support.harness import TEST_API_KEY, Process, Spool, wait_for

OUTBOX_SUFFIXES = (".error.json", ".jsonl")

# A corpus that covers every line shape, request errors, a missing response and (with
# `limits.inline_max_bytes: BIG_INLINE_LIMIT`) one file that goes through the File API.
CORPUS: dict[str, list[Any]] = {
    "alpha.jsonl": [
        "hello",
        ["first part", "second part"],
        {"key": "k3", "prompt": "json please [[sim:fenced]]", "filter_json": True},
        {"key": "native", "request": {"contents": [{"role": "user", "parts": [{"text": "raw"}]}]}},
    ],
    "beta.jsonl": [
        "ok one",
        "this fails [[sim:error=500]]",
        b"",
        "no answer [[sim:missing]]",
        {"key": "z", "prompt": ["a", "b"]},
    ],
    "gamma.jsonl": [f"prompt {i} " + "p" * 300 for i in range(12)],
}
BIG_INLINE_LIMIT = 3000
"""gamma.jsonl (about 4 KB of requests) is over this; alpha and beta are under it."""
NO_DAC = ["dac_override", "dac_read_search"]
"""The capabilities that let root ignore file modes."""


class NoDacSpool(Spool):
    """Runs the daemon without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so that file modes bind
    even when the tests run as root (root otherwise reads a chmod 000 file)."""

    def command(self, *args: str) -> list[str]:
        caps = ",".join(f"-{c}" for c in NO_DAC)
        return [
            "setpriv",
            f"--bounding-set={caps}",
            f"--inh-caps={caps}",
            "--",
            *super().command(*args),
        ]


def can_drop_caps() -> bool:
    """Whether NoDacSpool can work here: as root, with util-linux `setpriv`."""
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def drop_corpus(spool: Spool, names: list[str] | None = None) -> list[str]:
    names = names or sorted(CORPUS)
    for name in names:
        spool.drop(name, CORPUS[name])
    return names


def outbox_entry(spool: Spool, name: str) -> Path:
    """The single outbox file (results or report) of input NAME.jsonl."""
    stem = name[: -len(".jsonl")]
    found = [
        p
        for p in spool.outbox.iterdir()
        if any(p.name == stem + s or _suffixed(p.name, stem, s) for s in OUTBOX_SUFFIXES)
    ]
    assert len(found) == 1, f"{name}: expected one outbox file, found {found}"
    return found[0]


def _suffixed(candidate: str, stem: str, suffix: str) -> bool:
    """`stem-N.suffix`: a unique-suffixed name the daemon picked because the plain one was taken."""
    if not (candidate.startswith(stem + "-") and candidate.endswith(suffix)):
        return False
    middle = candidate[len(stem) + 1 : len(candidate) - len(suffix)]
    return middle.isdigit()


def records(spool: Spool, name: str) -> list[dict[str, Any]]:
    path = outbox_entry(spool, name)
    assert path.name.endswith(".jsonl"), f"{name} got an error report: {path.read_text()}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def report(spool: Spool, name: str) -> dict[str, Any]:
    path = outbox_entry(spool, name)
    assert path.name.endswith(".error.json"), f"{name} got results, not an error report"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def left_in_processing(inbox: Path) -> list[str]:
    """What is left in inbox/processing/ of the files: the daemon's own folders (`.work/`,
    `.cancel/`, empty once every file has finished) and presence files aside."""
    found = []
    for path in (inbox / "processing").iterdir():
        if path.name.startswith(".daemon."):
            continue  # a live daemon's presence file and lock
        if path.name in (".work", ".cancel") and path.is_dir():
            found += [f"{path.name}/{p.name}" for p in path.iterdir()]
        else:
            found.append(path.name)
    return found


def assert_nothing_lost(spool: Spool, names: list[str], *, jobs: int | None = None) -> None:
    """Every input finished (archived with its sidecar) with exactly one outbox file, and no
    job was made twice (see `assert_one_job_per_name`); with `jobs`, the simulator holds
    exactly that many jobs."""
    for name in names:
        assert spool.finished(name), f"{name} did not finish: {_tree(spool)}"
        assert not (spool.inbox / name).exists(), f"{name} is still in the inbox"
        outbox_entry(spool, name)
    # A running daemon removes a file's work files and lock just after archiving it, and a
    # peer's rescan removes a lock file it recreated for a name that had just finished.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not left_in_processing(spool.inbox), timeout=5)
    leftovers_now = left_in_processing(spool.inbox)
    assert not leftovers_now, f"left in processing/: {leftovers_now}"
    outbox = sorted(p.name for p in spool.outbox.iterdir())
    assert not [n for n in outbox if n.startswith(".")], f"temp files in the outbox: {outbox}"
    assert len(outbox) == len(names), f"outbox {outbox} for inputs {names}"
    assert_one_job_per_name(spool, names)
    if jobs is not None:
        assert len(spool.sim.jobs) == jobs, f"{len(spool.sim.jobs)} jobs, expected {jobs}"


def assert_one_job_per_name(spool: Spool, names: list[str]) -> None:
    """At most one job per display name (one name per part, round and attempt of a file):
    every job at the simulator was made once, and each job a sidecar records exactly once (none
    for a job whose create was refused or never sent); no job exists that no sidecar names."""
    sim = spool.sim
    made = {job["display_name"] for job in sim.jobs.values()}
    twice = sorted(n for n in made if sim.jobs_created_for(n) != 1)
    assert not twice, f"made more than once: {twice}"
    recorded: set[str] = set()
    for name in names:
        for job in spool.sidecar(name).get("jobs", []):
            display_name = job.get("display_name")
            if not display_name:
                continue  # never named: no create was ever sent for it
            expected = 1 if job.get("job_name") else 0
            count = sim.jobs_created_for(display_name)
            assert count == expected, f"{name}: {count} jobs for {display_name}"
            if expected:
                recorded.add(display_name)
    # Jobs of these inputs that no sidecar answers for -- but for an earlier attempt of a job
    # the sidecar records (expired, or refused by the quota, and made again as a new attempt).
    ours = {n for n in made if any(n.startswith(f"gemini-batchd/{name}/") for name in names)}
    attempts = {_without_attempt(n) for n in recorded}
    stray = sorted(n for n in ours - recorded if _without_attempt(n) not in attempts)
    assert not stray, f"jobs no sidecar answers for: {stray}"


def _without_attempt(display_name: str) -> str:
    """`.../r1p2a3` -> `.../r1p2`."""
    return re.sub(r"a\d+$", "", display_name)


def assert_one_job_per_file(spool: Spool, names: list[str], jobs: int) -> None:
    """Exactly `jobs` jobs at the simulator, and no display name was ever created twice
    (`assert_one_job_per_name`)."""
    assert_one_job_per_name(spool, names)
    remote = spool.sim.jobs
    assert len(remote) == jobs, f"{len(remote)} jobs at the simulator, expected {jobs}"


def assert_no_job_running(sim: Simulator) -> None:
    """Every job at the simulator has ended: none is left running (and billed) unwatched."""
    running = {n: j["state"] for n, j in sim.jobs.items() if j["state"] in ACTIVE_STATES}
    assert not running, f"jobs left running: {running}"


def assert_no_remote_files(sim: Simulator) -> None:
    """Every uploaded input and every responses file was deleted at the API (no leaks)."""
    assert not sim.files, f"files left at the API: {sorted(sim.files)}"


def assert_exact_answers(spool: Spool, name: str, prompts: list[str]) -> None:
    """outbox/NAME holds the simulator's answers to `prompts` (plain string lines), in order,
    each from the first job that carried it."""
    got = spool.results(name)
    summary = [(r.get("key"), r.get("line"), r.get("status"), r.get("text")) for r in got]
    expected = [
        (str(i), i, "ok", f"Simulated answer: {prompt}") for i, prompt in enumerate(prompts, 1)
    ]
    assert summary == expected, f"{name}: {summary}"
    assert all(r.get("attempts") == 1 for r in got), f"{name}: {[r.get('attempts') for r in got]}"


def assert_no_secret(spool: Spool) -> None:
    for path in spool.all_written_files():
        data = path.read_bytes()
        assert TEST_API_KEY.encode() not in data, f"the API key is in {path}"


def assert_no_stray_traceback(spool: Spool) -> None:
    """A traceback may only appear inside a JSON log event (a logged exception), never raw."""
    for log in spool.log_paths:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line:
                json.loads(line)  # raises if the traceback was printed outside the log pipeline


def _tree(spool: Spool) -> list[str]:
    return sorted(str(p.relative_to(spool.root)) for p in spool.root.rglob("*"))


def wait_killed(proc: Process, timeout: float = 60) -> None:
    """Wait until `proc` died by SIGKILL (a crash point fired)."""
    rc = proc.wait(timeout=timeout)
    assert rc == -signal.SIGKILL, f"expected death by SIGKILL, exit status {rc}"


def kill9(proc: Process) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_started(spool: Spool, proc: Process, timeout: float = 30) -> None:
    """Until the daemon's log says `started` (it has recovered and is watching)."""
    log = spool.log_paths[spool.procs.index(proc)]

    def started() -> bool:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {log.read_text()}"
        return '"event": "started"' in log.read_text(errors="replace")

    wait_for(started, timeout=timeout)


def sigterm_and_wait(proc: Process, limit: float = 10.0) -> float:
    """SIGTERM; the exit status must be 0 within `limit` seconds. Returns the time taken."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=limit + 5)
    took = time.monotonic() - started
    assert rc == 0, f"exit status {rc} after SIGTERM"
    assert took < limit, f"took {took:.1f}s to stop after SIGTERM"
    return took


def state_of(spool: Spool, name: str) -> str | None:
    try:
        return str(spool.sidecar(name)["state"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def baseline_records(
    tmp: Path, knobs: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, list[dict[str, Any]]]:
    """The corpus's records from a crash-free, fault-free run on a fresh simulator set up with
    `knobs` (its attributes, e.g. fail_keys_times)."""
    with Simulator(pending_seconds=0.05, running_seconds=0.1, seed=1) as sim:
        for name, value in (knobs or {}).items():
            setattr(sim, name, copy.deepcopy(value))
        spool = Spool(tmp, sim, **overrides)
        names = drop_corpus(spool)
        try:
            assert spool.run_once() == 0, spool.logs()[-3000:]
        finally:
            spool.stop_all()
        return {name: records(spool, name) for name in names}


# The fields of an error report that the contract fixes.
CONTRACT_REPORT_FIELDS = {
    "input",
    "stage",
    "message",
    "job_name",
    "job_state",
    "errors",
    "error_count",
    "time",
}

# The fields of `status --json` that the contract fixes.
CONTRACT_DAEMON_FIELDS = {"running", "pid", "since", "paused", "config"}
CONTRACT_TOTALS = {"waiting", "queued", "active", "done", "failed"}
CONTRACT_ROW_FIELDS = {
    "input",
    "state",
    "job_name",
    "job_state",
    "requests",
    "progress",
    "polls",
    "next_poll_at",
    "retries",
    "last_error",
    "ok",
    "errors",
    "output",
    "created_at",
    "updated_at",
}
