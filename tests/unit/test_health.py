"""daemon.health: the pause, started by a rejected credential and ended by any call that succeeds."""

from __future__ import annotations

from daemon.failures import Call, Failure, Kind
from daemon.health import Health
from tests.support.harness import FakeClock


def test_health_pauses_on_auth_and_resumes_on_any_success() -> None:
    clock = FakeClock()
    health = Health(clock)
    health.failed(Call.POLL, Failure(Kind.TRANSIENT, "slow"))
    assert health.paused is None
    health.failed(Call.CREATE, Failure(Kind.AUTH, "create: 400 API key not valid"))
    assert health.paused is not None and "API key not valid" in health.paused
    assert health.paused_since == clock.now
    clock.advance(5)
    health.failed(Call.PROBE, Failure(Kind.AUTH, "probe: 403"))
    assert health.paused_since == clock.now - 5  # still the start of the pause
    assert health.ok(Call.PROBE) is True  # it ended the pause
    assert health.paused is None and health.paused_since is None
    assert health.last_ok_wall is not None
    assert health.ok(Call.POLL) is False
