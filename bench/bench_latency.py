"""Time from a file's arrival in the inbox to its batch job's creation: a burst and one by one.

The real daemon runs against a simulator process whose jobs stay pending for an hour, with
free job slots (`limits.max_active_jobs` at least the file count) and otherwise the default
configuration. Files of 3 lines are written as dot-files and renamed into the inbox (complete
at once: the settle rule does not apply); arrival is the wall time just after the rename, and
creation is the job's `createTime` at the simulator. The daemon's CPU during the pattern comes
from /proc/PID/stat before the first file and after the last job: CPU seconds per file do not
depend on what else runs on the machine, the latencies do.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path

import common

P95_TARGET = 5.0
MAX_TARGET = 8.0
SPACING_SECONDS = 0.1
BURST_FILES = 1000  # the burst of the target


def _content(i: int) -> bytes:
    lines = [{"key": f"k{i}-{j}", "prompt": f"prompt {j} of file {i}"} for j in range(3)]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _drop(inbox: Path, names: list[str], spacing: float) -> dict[str, float]:
    """Rename each file into the inbox; the wall time just after each rename."""
    for i, name in enumerate(names):
        (inbox / f".{name}.part").write_bytes(_content(i))
    arrived: dict[str, float] = {}
    for name in names:
        os.rename(inbox / f".{name}.part", inbox / name)
        arrived[name] = time.time()
        if spacing:
            time.sleep(spacing)
    return arrived


def _wait_submitted(log: Path, count: int, timeout: float) -> None:
    """Until the daemon has logged `count` "submitted" events (reading only what is new)."""
    deadline = time.monotonic() + timeout
    seen = 0
    pending = b""  # a line not yet complete
    with log.open("rb") as handle:
        while seen < count:
            *lines, pending = (pending + handle.read()).split(b"\n")
            seen += sum(_submitted(line) for line in lines if b"submitted" in line)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count - seen} of {count} files got no job in {timeout:.0f} s")
            time.sleep(0.1)


def _submitted(line: bytes) -> bool:
    """Whether a log line is the daemon's "submitted" event (a job was created)."""
    with suppress(ValueError):
        event = json.loads(line)
        return isinstance(event, dict) and event.get("event") == "submitted"
    return False


def _created(sim: common.SimProcess, names: set[str]) -> dict[str, float]:
    """createTime of each file's job at the simulator, by input name (from the display name)."""
    found: dict[str, float] = {}
    for meta in sim.batches():
        parts = str(meta.get("displayName", "")).split("/")
        if len(parts) >= 2 and parts[1] in names:
            stamp = meta["createTime"].replace("Z", "+00:00")
            found[parts[1]] = datetime.fromisoformat(stamp).timestamp()
    return found


def _percentile(ordered: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


def _scenario(files: int, spacing: float, tag: str) -> tuple[list[float], float]:
    """A fresh simulator and daemon; `files` files dropped `spacing` apart; their latencies
    (sorted) and the daemon's CPU seconds per file."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp,
        common.simulator(pending=3600) as sim,
    ):
        root = Path(tmp)
        config = common.spool(root, sim.base_url, limits={"max_active_jobs": max(100, files)})
        with common.running_daemon(config, root) as (daemon, log):
            time.sleep(1)  # past start-up
            names = [f"{tag}-{i:04d}.jsonl" for i in range(files)]
            cpu_before = common.proc_cpu_seconds(daemon.pid)
            arrived = _drop(root / "inbox", names, spacing)
            _wait_submitted(log, files, timeout=max(120.0, files * 0.5))
            cpu = common.proc_cpu_seconds(daemon.pid) - cpu_before
            created = _created(sim, set(names))
    if len(created) != files:
        raise RuntimeError(f"{files - len(created)} jobs are not listed at the simulator")
    latencies = sorted(created[n] - arrived[n] for n in names)
    common.progress(
        f"latency: {tag}, {files} files: p95 {_percentile(latencies, 0.95):.2f} s, "
        f"{cpu / files * 1000:.1f} ms CPU per file"
    )
    return latencies, cpu / files


def run(quick: bool) -> str:
    burst_files = 250 if quick else BURST_FILES
    spaced_files = 50 if quick else 100
    rows = []
    for pattern, files, spacing, tag in (
        (
            f"one by one, {SPACING_SECONDS * 1000:.0f} ms apart",
            spaced_files,
            SPACING_SECONDS,
            "spaced",
        ),
        ("all at once", burst_files, 0.0, "burst"),
    ):
        latencies, cpu_per_file = _scenario(files, spacing, tag)
        p50, p95 = _percentile(latencies, 0.5), _percentile(latencies, 0.95)
        worst = latencies[-1]
        verdict = common.verdict(p95 < P95_TARGET and worst < MAX_TARGET)
        if files < BURST_FILES:
            verdict += f" ({files} files, not {BURST_FILES:,})"
        rows.append(
            [
                pattern,
                files,
                f"{p50:.2f}",
                f"{p95:.2f}",
                f"{worst:.2f}",
                f"{cpu_per_file * 1000:.1f}",
                verdict,
            ]
        )
    headers = [
        "arrival",
        "files",
        "p50 (s)",
        "p95 (s)",
        "max (s)",
        "daemon CPU per file (ms)",
        f"p95 < {P95_TARGET:g} s, max < {MAX_TARGET:g} s",
    ]
    return (
        "### Time from a file's arrival to its job's creation (free job slots)\n\n"
        + common.table(headers, rows)
        + "\n\nFiles of 3 short lines, renamed into the inbox; arrival just after the rename, "
        "creation the job's `createTime` at the simulator (its own process; jobs stay pending "
        "for an hour). Default configuration but `limits.max_active_jobs` >= the file count; "
        "a fresh daemon per pattern. Daemon CPU per file: /proc/PID/stat before the first file "
        "and after the last job, divided by the files. Target (issue 12) for a burst of 1,000 "
        f"files: p95 under {P95_TARGET:g} s and max under {MAX_TARGET:g} s."
    )


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
