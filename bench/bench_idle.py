"""CPU seconds used by an idle daemon (empty inbox, default configuration).

utime + stime of the daemon process from /proc/PID/stat, before and after the window. Beside
it, in the same window: a bare Python process that only wakes every 5 s, as the idle
daemon's main loop does, which shows what the machine charges for the wake-ups alone.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import common

TARGET_PERCENT = 0.1

WAKER = "import select, sys\nwhile True:\n    select.select([sys.stdin], [], [], 5.0)\n"
"""The floor: a process that sleeps in select() and wakes every 5 s, doing nothing."""


def run(quick: bool) -> str:
    window = 30.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp, common.simulator() as sim:
        root = Path(tmp)
        config = common.spool(root, sim.base_url)
        waker = subprocess.Popen([common.PYTHON, "-S", "-c", WAKER], stdin=subprocess.PIPE)
        with common.running_daemon(config, root) as (daemon, _):
            time.sleep(2)  # past start-up
            before = common.proc_cpu_seconds(daemon.pid)
            floor_before = common.proc_cpu_seconds(waker.pid)
            started = time.monotonic()
            time.sleep(window)
            used = common.proc_cpu_seconds(daemon.pid) - before
            floor = common.proc_cpu_seconds(waker.pid) - floor_before
            elapsed = time.monotonic() - started
        waker.kill()
        waker.wait()
    share = used / elapsed * 100
    rows = [
        [
            f"{elapsed:.0f}",
            f"{used:.2f}" if used else "< 0.01 (under one clock tick)",
            f"{share:.3f}%",
            f"{used / elapsed * 3600:.1f}",
            f"{floor / elapsed * 100:.3f}%",
            common.verdict(share < TARGET_PERCENT),
        ]
    ]
    headers = [
        "window (s)",
        "CPU used (s)",
        "of one core",
        "CPU s per hour",
        "a bare process waking every 5 s",
        f"target < {TARGET_PERCENT:g}% of one core",
    ]
    return (
        "### CPU used by an idle daemon (empty inbox, default configuration)\n\n"
        + common.table(headers, rows)
        + "\n\nutime + stime from /proc/PID/stat (in clock ticks, 1/`getconf CLK_TCK` s), "
        "after start-up. The main loop sleeps until the next timer or inotify event, at most "
        "5 s (the check that the spool folders exist and the inbox is the one watched; each "
        "turn of the loop costs about 25 µs of Python in a warm process), plus the inbox rescan every "
        "`inbox_rescan_seconds` (30 s). The bare process beside it (same window) sleeps in "
        "select() and wakes every 5 s, doing nothing: on a virtual machine each wake-up "
        "costs CPU of its own, the floor under the daemon's figure."
    )


if __name__ == "__main__":
    import sys

    print(run("--quick" in sys.argv))
