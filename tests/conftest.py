"""Shared fixtures: the `daemon` package importable from a checkout without an install, a
simulator and a spool folder per test, logging put back, and two savings of test time."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import ssl  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import structlog  # noqa: E402

from daemon import logs  # noqa: E402
from daemon.simulator import Simulator  # noqa: E402
from tests.support.harness import Spool  # noqa: E402

TMP_ENV = "GEMINI_BATCHD_TEST_TMP"
"""`disk`: keep pytest's usual temporary folders (kept after the run, for a post-mortem)."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Temporary folders in memory (/dev/shm) unless --basetemp or $GEMINI_BATCHD_TEST_TMP says
    otherwise: the daemon fsyncs every sidecar and outbox file, which costs milliseconds each
    on a disk and nothing the tests can see; on tmpfs the suite runs about twice as fast."""
    if config.option.basetemp or os.environ.get(TMP_ENV) == "disk":
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        base = tempfile.mkdtemp(prefix="gemini-batchd-tests-", dir=shm)
        config.option.basetemp = base
        config.stash[_OWN_BASETEMP] = base


_OWN_BASETEMP = pytest.StashKey[str]()


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_OWN_BASETEMP, None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A simulator whose jobs finish a fraction of a second after creation."""
    simulator = Simulator(pending_seconds=0.1, running_seconds=0.2, seed=7).start()
    yield simulator
    stop_soon(simulator)


def stop_soon(simulator: Simulator) -> None:
    """Stop a simulator in the background: stopping waits out its server's 50 ms poll, and the
    next test has a simulator (and port) of its own anyway."""
    threading.Thread(target=simulator.stop, name="stop-simulator", daemon=True).start()


@pytest.fixture(scope="session", autouse=True)
def shared_ssl_contexts() -> Iterator[None]:
    """Every SDK client loads the CA bundle into two or three SSL contexts, 45 ms each, and the
    tests make a thousand clients that speak plain HTTP to the simulator: contexts made with the
    same arguments (the same $SSL_CERT_FILE, say) are made once and shared."""
    made: dict[tuple[object, ...], ssl.SSLContext] = {}
    original = ssl.create_default_context

    def create_default_context(*args: object, **kwargs: object) -> ssl.SSLContext:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = original(*args, **kwargs)  # type: ignore[arg-type]
        return made[key]

    ssl.create_default_context = create_default_context  # type: ignore[assignment]
    yield
    ssl.create_default_context = original


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
