"""Several daemons on one inbox and outbox: every file is processed exactly once.

The flock on processing/NAME decides which process owns a file; a dead peer's files are
taken over by a survivor at its next rescan, without a second job.
"""

from __future__ import annotations

import random
from pathlib import Path

from daemon.simulator import Simulator
from tests.support.guarantees import (
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    kill9,
    records,
    wait_started,
)
from tests.support.harness import Spool, wait_for


def _lines(i: int) -> list[object]:
    return [f"file {i} request {j}" for j in range(1 + i % 4)]


def _check(spool: Spool, names: list[str]) -> None:
    assert_nothing_lost(spool, names, jobs=len(names))
    for i, name in enumerate(names):
        recs = records(spool, name)
        assert [r["text"] for r in recs] == [f"Simulated answer: {p}" for p in _lines(i)]
    assert_no_stray_traceback(spool)
    assert_no_secret(spool)


def test_three_daemons_share_one_inbox(spool: Spool, sim: Simulator) -> None:
    procs = [spool.start() for _ in range(3)]
    for proc in procs:
        wait_started(spool, proc)
    names = [f"m{i:02d}.jsonl" for i in range(30)]
    for i, name in enumerate(names):
        spool.drop(name, _lines(i), how="rename" if i % 3 else "inplace")
    wait_for(lambda: all(spool.finished(n) for n in names), timeout=120)
    assert all(p.poll() is None for p in procs), "a daemon died"
    _check(spool, names)
    claims = [e["file"] for e in spool.log_events() if e.get("event") == "claimed"]
    assert len(claims) == len(set(claims)), "a file was claimed twice"


def test_survivors_take_over_a_killed_peer(tmp_path: Path) -> None:
    rng = random.Random(99)
    with Simulator(pending_seconds=0.3, running_seconds=0.3, seed=5) as sim:
        spool = Spool(tmp_path, sim)
        try:
            procs = [spool.start() for _ in range(3)]
            for proc in procs:
                wait_started(spool, proc)
            names = [f"k{i:02d}.jsonl" for i in range(24)]
            for i, name in enumerate(names):
                spool.drop(name, _lines(i))
            # The victim: a daemon with a job in flight (one that claimed nothing proves nothing).
            busy = wait_for(
                lambda: [
                    proc
                    for proc, log in zip(procs, spool.log_paths, strict=True)
                    if '"event": "submitted"' in log.read_text()
                ],
                timeout=60,
            )
            victim = rng.choice(busy)
            kill9(victim)
            wait_for(lambda: all(spool.finished(n) for n in names), timeout=120)
            assert all(p.poll() is None for p in procs if p is not victim)
            _check(spool, names)
        finally:
            spool.stop_all()
