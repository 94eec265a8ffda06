"""API calls per job and detection delay: the daemon's backoff vs polling every 10 s.

Pure computation on a simulated clock, with the daemon's own `Backoff` and default poll
settings. The service waits `delay(0)` after the create call and `delay(n)` after the n-th
poll that did not find the job done, so that is what is replayed here.
"""

from __future__ import annotations

import random
import statistics

import common

from daemon.config import PollSettings
from daemon.schedule import Backoff

FIXED_INTERVAL = 10.0
DURATIONS = [("1 min", 60), ("10 min", 600), ("1 h", 3600), ("6 h", 6 * 3600), ("24 h", 86400)]


def backoff_polls(duration: float, backoff: Backoff) -> tuple[int, float]:
    """(polls, detection delay) for a job that finishes `duration` seconds after its creation."""
    now, polls = backoff.delay(0), 1
    while now < duration:
        now += backoff.delay(polls)
        polls += 1
    return polls, now - duration


def fixed_polls(duration: float, interval: float = FIXED_INTERVAL) -> tuple[int, float]:
    now, polls = interval, 1
    while now < duration:
        now += interval
        polls += 1
    return polls, now - duration


def run(quick: bool) -> str:
    settings = PollSettings()  # the defaults: initial 10, max 600, multiplier 2, jitter 0.1
    trials = 300 if quick else 2000
    rng = random.Random(42)
    backoff = Backoff.from_settings(settings, random.Random(7))
    rows = []
    worst_delay = 0.0
    for label, nominal in DURATIONS:
        ours: list[tuple[int, float]] = []
        fixed: list[tuple[int, float]] = []
        for _ in range(trials):
            duration = nominal * rng.uniform(0.9, 1.1)  # "about an hour": any phase
            ours.append(backoff_polls(duration, backoff))
            fixed.append(fixed_polls(duration))
        calls_ours = 1 + statistics.mean(p for p, _ in ours)  # + the create call
        calls_fixed = 1 + statistics.mean(p for p, _ in fixed)
        worst = max(d for _, d in ours)
        worst_delay = max(worst_delay, worst)
        rows.append(
            [
                label,
                f"{calls_ours:.1f}",
                f"{calls_fixed:.1f}",
                f"{calls_fixed / calls_ours:.1f}x",
                f"{statistics.mean(d for _, d in ours):.0f}",
                f"{worst:.0f}",
                f"{statistics.mean(d for _, d in fixed):.1f}",
            ]
        )
    headers = [
        "job duration",
        "API calls, backoff",
        "API calls, every 10 s",
        "fewer calls",
        "mean delay (s)",
        "max delay (s)",
        "mean delay, every 10 s (s)",
    ]
    verdict = "met" if worst_delay <= settings.max_seconds else "NOT met"
    return (
        "### API calls per job and detection delay (default poll settings, simulated clock)\n\n"
        + common.table(headers, rows)
        + f"\n\nCalls = 1 create + polls until the job is seen done; durations ±10% at random, "
        f"{trials} trials each. Detection delay = time from the job's end to the poll that sees "
        f"it; never above poll.max_seconds ({settings.max_seconds:g} s): {verdict} "
        f"(max {worst_delay:.0f} s)."
    )


if __name__ == "__main__":
    import sys

    print(run("--quick" in sys.argv))
