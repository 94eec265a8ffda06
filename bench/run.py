"""Run the benchmarks: `python bench/run.py [--quick] [--write] [NAME ...]`.

NAME is any of: polls, idle, latency, cpu, rss (default: all, in that order). `--quick` is a
smaller run (a few minutes); `--write` also saves the tables, with the machine they ran on,
to bench/RESULTS.md. Each table says which of issue 12's targets it measures and whether it
is met.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_cpu
import bench_idle
import bench_latency
import bench_polls
import bench_rss
import common

BENCHES = {
    "polls": bench_polls.run,
    "idle": bench_idle.run,
    "latency": bench_latency.run,
    "cpu": bench_cpu.run,
    "rss": bench_rss.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *BENCHES], metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, shorter windows")
    parser.add_argument("--write", action="store_true", help="save the tables to bench/RESULTS.md")
    args = parser.parse_args()
    names = args.names or list(BENCHES)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    sections = []
    common.compile_daemon()
    print(f"machine: {common.machine()}\n", flush=True)
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        section = BENCHES[name](args.quick)
        print(f"{section}\n\n({name}: {time.monotonic() - t0:.0f} s)\n", flush=True)
        sections.append(section)
    total = time.monotonic() - started
    if args.write:
        run = "quick" if args.quick else "full"
        header = (
            "# Benchmark results\n\n"
            f"Latest {run} run (`python bench/run.py{' --quick' if args.quick else ''}`), "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {total / 60:.1f} min.\n\n"
            f"Machine: {common.machine()}. Load average (1 min) at the start {load_before:.1f}, "
            f"at the end {os.getloadavg()[0]:.1f}: other work on the machine inflates times.\n\n"
        )
        path = Path(__file__).with_name("RESULTS.md")
        path.write_text(header + "\n\n".join(sections) + "\n")
        print(f"written to {path}", file=sys.stderr)
    print(f"total: {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
