"""Process tests: real daemon processes, forked from one fork server for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.forkserver import Launcher
from tests.support.harness import ROOT, Spool


@pytest.fixture(scope="session", autouse=True)
def forkserver() -> Iterator[Launcher]:
    launcher = Launcher(ROOT)
    Spool.launcher = launcher
    yield launcher
    Spool.launcher = None
    launcher.close()
