"""Daemon CPU per request, for the whole daemon process, against a bare orjson loop.

For each path (File API, inline, File API with `filter_json` and JSON answers) the daemon runs
as a child on an input of N1 and of N2 requests, with the simulator in its own process; its
CPU (user + system, all threads) comes from wait4(), the least of three runs of each. Per request:

- marginal: (CPU at N2 - CPU at N1) / (N2 - N1), which cancels the fixed cost of a run (about
  half a second: imports, the key check, the first poll);
- whole process: CPU at N2 / N2, start-up included.

The yardstick, measured in this process in the same run: `orjson.loads` and `orjson.dumps` of
every line of the N2 input and of every line of the responses file the simulator makes for it
(`{"key", "response"}` per request, built here with the simulator's own answer function), each
dump written to a file. It does no validation, matching or record building: it is the least
any program must do to read those lines and write as much back.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import orjson

from daemon.config import Config
from daemon.inputs import Defaults, Request, read_requests
from daemon.simulator import simulate_response

WIDTH = 300  # bytes per input line, about
TARGET = 4.0
NAME = "input.jsonl"


@dataclass(frozen=True)
class Case:
    label: str
    mode: str  # the mode every job must have: the run measured what it says
    settings: dict[str, Any]
    json_answers: bool = False

    @property
    def vertex(self) -> bool:
        """backend: vertex, against the Vertex simulator and its storage emulator."""
        return bool(self.settings.get("backend") == "vertex")


PATHS = [
    Case("File API (the default configuration)", "file", {}),
    Case(
        "inline, forced past the default limits",
        "inline",
        {"limits": {"inline_max_bytes": 10**12, "inline_max_requests": 10**12}},
    ),
    Case("File API, filter_json, JSON answers", "file", {"filter_json": True}, json_answers=True),
    Case("Vertex AI (backend: vertex), Cloud Storage", "file", {"backend": "vertex"}),
]


def _daemon_cpu(folder: Path, path: Case, requests: int) -> tuple[common.ChildRun, Path]:
    """One daemon run on a fresh spool and simulator; its rusage and the archived input."""
    root = folder / f"{requests}"
    with common.simulator(vertex=path.vertex) as sim:
        settings = {**path.settings, **({"vertex": sim.vertex} if sim.vertex else {})}
        config = common.spool(
            root, sim.base_url, inbox_settle_seconds=0, poll=common.FAST_POLLS, **settings
        )
        common.write_input(
            root / "inbox" / NAME, requests=requests, width=WIDTH, json_answers=path.json_answers
        )
        run = common.process_inbox(config, root, NAME)
    first = common.check_results(root, NAME, requests)
    if path.json_answers and "json" not in first:
        raise RuntimeError(f"{path.label}: the answer was not parsed as JSON: {first}")
    modes = {job["mode"] for job in common.sidecar(root, NAME)["jobs"]}
    if modes != {path.mode}:
        raise RuntimeError(f"{path.label}: the jobs went {modes}, not {path.mode}")
    (root / "outbox" / NAME).unlink()
    common.progress(
        f"cpu: {path.label}, {requests:,} requests: {run.cpu_seconds:.1f} s CPU, "
        f"{run.wall_seconds:.1f} s wall, {common.mib(run.max_rss_bytes)} MiB"
    )
    return run, root / "inbox" / "done" / NAME


def _responses_file(source: Path, target: Path, filter_json: bool) -> None:
    """The simulator's responses file for `source`: one `{"key", "response"}` line per request."""
    model = Config().model
    with target.open("wb") as out:
        items = read_requests(source, Defaults(filter_json=filter_json))
        for i, item in enumerate(items):
            assert isinstance(item, Request)
            entry = simulate_response(item.body, model, f"sim-bench-{i}")
            out.write(orjson.dumps({"key": item.key, **entry}) + b"\n")


def _orjson_loop(files: list[Path], out_path: Path, reps: int) -> float:
    """CPU seconds (best of `reps`) to load and dump every line of `files`."""
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        with out_path.open("wb") as out:
            for path in files:
                with path.open("rb") as handle:
                    for raw in handle:
                        out.write(orjson.dumps(orjson.loads(raw)) + b"\n")
        best = min(best, time.process_time() - started)
    return best


def _best_run(folder: Path, path: Case, requests: int, reps: int) -> tuple[common.ChildRun, Path]:
    """The daemon run that used the least CPU of `reps` (other work on the machine only adds
    to a run's CPU, as for the yardstick)."""
    runs = [_daemon_cpu(folder / f"run{i}", path, requests) for i in range(reps)]
    return min(runs, key=lambda found: found[0].cpu_seconds)


def _measure(path: Case, small: int, large: int, reps: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        folder = Path(tmp)
        run_small, _ = _best_run(folder, path, small, reps)
        run_large, source = _best_run(folder, path, large, reps)
        responses = folder / "responses.jsonl"
        _responses_file(source, responses, path.settings.get("filter_json", False))
        loop = _orjson_loop([source, responses], folder / "loop.jsonl", reps)
    marginal = (run_large.cpu_seconds - run_small.cpu_seconds) / (large - small)
    whole = run_large.cpu_seconds / large
    yardstick = loop / large
    met = marginal <= TARGET * yardstick and whole <= TARGET * yardstick
    return [
        path.label,
        f"{small:,} / {large:,}",
        f"{run_small.cpu_seconds:.2f} / {run_large.cpu_seconds:.2f}",
        f"{marginal * 1e6:.1f}",
        f"{whole * 1e6:.1f}",
        f"{yardstick * 1e6:.2f}",
        f"{marginal / yardstick:.1f}x",
        f"{whole / yardstick:.1f}x",
        common.verdict(met),
    ]


def run(quick: bool) -> str:
    file_sizes = (5_000, 50_000) if quick else (20_000, 200_000)
    inline_sizes = (1_000, 5_000) if quick else (2_000, 20_000)
    reps = 3
    rows = []
    for path in PATHS:
        small, large = inline_sizes if path.mode == "inline" else file_sizes
        rows.append(_measure(path, small, large, reps))
    headers = [
        "path",
        "requests (N1 / N2)",
        "daemon CPU s (N1 / N2)",
        "marginal µs/req",
        "whole process µs/req (N2)",
        "orjson loop µs/req",
        "marginal / loop",
        "whole / loop",
        f"target <= {TARGET:g}x",
    ]
    return (
        f"### Daemon CPU per request vs an orjson load-and-dump loop (~{WIDTH} B prompt lines)\n\n"
        + common.table(headers, rows)
        + "\n\nDaemon CPU: user + system time of the whole `gemini-batchd run` process (all "
        "threads, the SDK included) from wait4(), on a fresh spool and simulator process per "
        f"run, the least of {reps} runs (as for the yardstick: other work on the machine only "
        "adds to a run's CPU). Marginal = (CPU at N2 - CPU at N1) / (N2 - N1): the start-up cost cancels. "
        "Yardstick (same run, this process, best of "
        f"{reps}): `orjson.loads` + `orjson.dumps` of each line of the N2 input and of each "
        "line of the simulator's responses file for it, written to a file. Paths: the default "
        "configuration (these inputs are over `limits.inline_max_requests`, so File API); "
        "inline, with `inline_max_bytes` and `inline_max_requests` huge (by default only inputs "
        "of at most 1,000 requests go inline); and the default configuration with "
        "`filter_json: true` where every line asks for `responseMimeType: application/json`, "
        "so that the daemon parses each answer as JSON; and `backend: vertex` against the "
        "Vertex AI simulator and its Cloud Storage emulator (in their own process), where the "
        "daemon also turns each line into Vertex's format, uploads it to Cloud Storage and "
        "reads each prediction (the request echoed beside its answer) back. Target met when "
        "both ratios are "
        f"<= {TARGET:g}x."
    )


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
