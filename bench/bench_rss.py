"""Peak RSS of the daemon process for inputs of growing size, File API (split into parts) and inline.

The daemon runs as a child (`gemini-batchd run` until the file is archived) and its peak RSS
is `ru_maxrss` from wait4(), through a small parent so that nothing of this process is counted.
The simulator runs in its own process: it keeps every job's requests and answers in memory,
so its footprint is shown beside (it is not the daemon's).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

from daemon.config import Limits

TARGET_MIB = 150
NAME = "big.jsonl"
GB = 1000 * common.MB
LONG = 50_000
"""System prompt bytes per line of the 5 GB input: the simulator keeps every request and
answer in memory, about 8x the input for ~1 KB lines but 1.2x for long lines whose answers
are short."""


@dataclass(frozen=True)
class Case:
    label: str
    size: int  # bytes of input (0: an empty inbox, the floor)
    mode: str  # the mode every job must have
    limits: dict[str, Any]
    system_width: int = 0  # a long system prompt per line: big lines, short answers
    width: int = 1000  # prompt bytes per line (about)
    requests: int | None = None  # at most this many lines
    default: bool = True  # within the default limits: counted in the verdict
    vertex: bool = False  # backend: vertex, against the Vertex simulator and storage emulator


def _parts(size: int) -> dict[str, Any]:
    """File API, split into parts of at most a quarter of the input (500 MB at most), two jobs
    at a time: several jobs per input, and the simulator holds at most two uploads at once."""
    return {
        "inline_max_bytes": 1,
        "max_job_bytes": min(size // 4, 500 * common.MB),
        "max_active_jobs": 2,
    }


def cases(quick: bool) -> list[Case]:
    limits = Limits()
    out = [
        Case("empty inbox", 0, "-", {}),
        Case(
            f"inline at the default limits ({limits.inline_max_bytes / common.MB:g} MB,"
            f" {limits.inline_max_requests:,} requests)",
            limits.inline_max_bytes,
            "inline",
            {},
            width=2 * limits.inline_max_bytes // limits.inline_max_requests,
            requests=limits.inline_max_requests,
        ),
        Case("15 MB, default configuration", 15 * common.MB, "file", {}),
        Case(
            "inline forced, 15 MB (not the default)",
            15 * common.MB,
            "inline",
            {"inline_max_bytes": 10**12, "inline_max_requests": 10**12},
            default=False,
        ),
    ]
    for size in (10 * common.MB, 100 * common.MB, *(() if quick else (GB,))):
        out.append(Case(f"File API, {size / common.MB:g} MB", size, "file", _parts(size)))
    if not quick:
        size = 5 * GB
        out.append(Case("File API, 5 GB, 50 KB lines", size, "file", _parts(size), LONG))
    size = 10 * common.MB if quick else 100 * common.MB
    out.append(Case(f"Vertex AI, {size / common.MB:g} MB", size, "file", _parts(size), vertex=True))
    return out


def _needs(case: Case) -> tuple[int, int]:
    """(disk, memory) a case needs: the input, its job files, answers and results on disk; the
    simulator keeps requests and answers of every job in memory (about 5x the input for ~1 KB
    lines, 2x for long system prompts)."""
    disk = 4 * case.size + GB // 2
    memory = int(case.size * (2 if case.system_width else 8)) + GB
    return disk, memory


def _one(case: Case, root: Path) -> list[str]:
    with common.simulator(vertex=case.vertex) as sim:
        backend = {"backend": "vertex", "vertex": sim.vertex} if sim.vertex else {}
        config = common.spool(
            root,
            sim.base_url,
            inbox_settle_seconds=0,
            poll=common.FAST_POLLS,
            limits=case.limits,
            **backend,
        )
        requests = 0
        if case.size:
            requests = common.write_input(
                root / "inbox" / NAME,
                case.size,
                system_width=case.system_width,
                width=case.width,
                requests=case.requests,
                line_overhead=250 if case.mode == "inline" else 0,  # inline: its payload fits
            )
            run = common.process_inbox(config, root, NAME)
        else:
            run = common.run_measured(
                common.daemon_command(config, "--once"), root / "daemon.log", root
            )
        sim_peak = sim.peak_rss()
    jobs = "-"
    if case.size:
        common.check_results(root, NAME, requests)
        record = common.sidecar(root, NAME)
        modes = {job["mode"] for job in record["jobs"]}
        if modes != {case.mode}:
            raise RuntimeError(f"{case.label}: the jobs went {modes}, not {case.mode}")
        jobs = str(len(record["jobs"]))
    return [
        case.label,
        f"{requests:,}",
        jobs,
        common.mib(run.max_rss_bytes),
        f"{run.wall_seconds:.1f}",
        f"{run.cpu_seconds:.1f}",
        common.mib(sim_peak),
        common.verdict(run.max_rss_bytes < TARGET_MIB << 20)
        + ("" if case.default else " (not the default)"),
    ]


def run(quick: bool) -> str:
    rows = []
    peaks: list[float] = []
    skipped = []
    for case in cases(quick):
        with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
            disk, memory = _needs(case)
            free, available = common.free_bytes(Path(tmp)), common.available_memory()
            if disk > free or memory > available:
                reason = (
                    f"{case.label}: skipped, needs {disk / GB:.1f} GB of disk ({free / GB:.1f} "
                    f"free) and {memory / GB:.1f} GB of memory ({available / GB:.1f} available)"
                )
                common.progress(reason)
                skipped.append(reason)
                continue
            row = _one(case, Path(tmp))
        rows.append(row)
        if case.default:
            peaks.append(float(row[3]))
        common.progress(f"rss: {row}")
    headers = [
        "input",
        "requests",
        "jobs",
        "daemon peak RSS (MiB)",
        "wall (s)",
        "daemon CPU (s)",
        "simulator peak RSS (MiB)",
        f"daemon under {TARGET_MIB} MiB",
    ]
    worst = max(peaks)
    notes = "".join(f"\n- {reason}" for reason in skipped)
    return (
        "### Peak RSS of the daemon (simulator in its own process)\n\n"
        + common.table(headers, rows)
        + "\n\nInputs of ~1 KB keyed lines in all four input forms; the 5 GB input (full run "
        f"only) has lines of ~{LONG // 1000 + 1} KB, each with a {LONG // 1000} KB system prompt, "
        "because the simulator keeps every request and answer in memory. File API: "
        "`inline_max_bytes: 1`, `max_job_bytes` a quarter of the input (500 MB at most) so that "
        "each input is split into several jobs, `max_active_jobs: 2`. Inline: an input that just "
        "fits the default `inline_max_bytes` and `inline_max_requests`; a 15 MB input with the "
        "default configuration (so through the File API, in one job); and the same input forced "
        "inline (both limits huge), which shows why the defaults are low: an inline job's "
        "requests and answers are each held in memory whole. Vertex AI: `backend: vertex` "
        "against the Vertex AI simulator and its Cloud Storage emulator (in their own process; "
        "the simulator column counts both), split like the File API inputs. "
        "Peak RSS: `ru_maxrss` of the daemon process from wait4()."
        f"{notes}\n\nTarget under {TARGET_MIB} MiB for any input within the default limits: "
        f"{common.verdict(worst < TARGET_MIB)}"
        f" (highest {worst:.0f} MiB)"
        + (": a quick run, without the 1 GB and 5 GB inputs." if quick else ".")
    )


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
