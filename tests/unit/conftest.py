"""Fixtures shared by the unit tests (a module's own `clock` fixture takes precedence)."""

from __future__ import annotations

import pytest

from daemon.simulator import Simulator
from tests.support.harness import FakeClock


@pytest.fixture
def clock(sim: Simulator) -> FakeClock:
    """Drive the `sim` fixture's job timing by hand: no sleeping."""
    fake = FakeClock()
    sim.clock = fake
    return fake
