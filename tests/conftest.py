"""Make the `daemon` package importable when pytest runs from a checkout without an install."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import structlog  # noqa: E402

from daemon import logs  # noqa: E402
from daemon.simulator import Simulator  # noqa: E402
from tests.harness import Spool  # noqa: E402


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A simulator whose jobs finish a fraction of a second after creation."""
    with Simulator(pending_seconds=0.1, running_seconds=0.2, seed=7) as simulator:
        yield simulator


@pytest.fixture
def spool(tmp_path: Path, sim: Simulator) -> Iterator[Spool]:
    """A daemon folder wired to `sim`; processes started on it are stopped after the test."""
    s = Spool(tmp_path, sim)
    yield s
    s.stop_all()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that call logs.configure (or a command that does): process-wide logging state,
    registered secrets included, is put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {
        name: logging.getLogger(name).level
        for name in ("httpx", "httpx2", "google_genai", "watchdog", "tenacity")
    }
    config = structlog.get_config()
    secrets, short_secrets = list(logs._secrets), list(logs._short_secrets)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in named.items():
        logging.getLogger(name).setLevel(old)
    structlog.configure(**config)
    logs._secrets[:] = secrets
    logs._short_secrets[:] = short_secrets
