"""CPU seconds used by an idle daemon (empty inbox, default configuration).

utime + stime of the daemon process from /proc/PID/stat, before and after the window.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common

TARGET_PERCENT = 0.1


def run(quick: bool) -> str:
    window = 30.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp, common.simulator() as sim:
        root = Path(tmp)
        config = common.spool(root, sim.base_url)
        with common.running_daemon(config, root) as (daemon, _):
            time.sleep(2)  # past start-up
            before = common.proc_cpu_seconds(daemon.pid)
            started = time.monotonic()
            time.sleep(window)
            used = common.proc_cpu_seconds(daemon.pid) - before
            elapsed = time.monotonic() - started
    share = used / elapsed * 100
    rows = [
        [
            f"{elapsed:.0f}",
            f"{used:.2f}" if used else "< 0.01 (under one clock tick)",
            f"{share:.3f}%",
            f"{used / elapsed * 3600:.1f}",
            common.verdict(share < TARGET_PERCENT),
        ]
    ]
    headers = [
        "window (s)",
        "CPU used (s)",
        "of one core",
        "CPU s per hour",
        f"target < {TARGET_PERCENT:g}% of one core",
    ]
    return (
        "### CPU used by an idle daemon (empty inbox, default configuration)\n\n"
        + common.table(headers, rows)
        + "\n\nutime + stime from /proc/PID/stat (in clock ticks, 1/`getconf CLK_TCK` s), "
        "after start-up. The main loop sleeps until the next timer or inotify event (at most "
        "5 s: status and watchdog), plus the inbox rescan every `inbox_rescan_seconds` (30 s)."
    )


if __name__ == "__main__":
    import sys

    print(run("--quick" in sys.argv))
