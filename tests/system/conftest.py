"""In-process system tests: the daemon's Service in the test's thread, the simulator on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.simulator import Simulator
from tests.conftest import stop_soon
from tests.support.inprocess import Daemon, WallClock


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def sim(clock: WallClock) -> Iterator[Simulator]:
    """A simulator on the test's clock: jobs pend 5 s and run 20 s of fake time."""
    simulator = Simulator(pending_seconds=5, running_seconds=20, seed=7, clock=clock).start()
    yield simulator
    stop_soon(simulator)


@pytest.fixture
def make_daemon(tmp_path: Path, sim: Simulator, clock: WallClock) -> Iterator[type[Daemon]]:
    made: list[Daemon] = []

    def make(**overrides: object) -> Daemon:
        daemon = Daemon(tmp_path, sim, clock, **overrides)
        made.append(daemon)
        return daemon

    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    yield make  # type: ignore[misc]
    for daemon in made:
        daemon.stop()
    root.handlers[:] = handlers  # each Daemon logs to its own buffer: put logging back
    root.setLevel(level)
    structlog.configure(**config)
