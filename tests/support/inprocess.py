"""The daemon's `Service` driven in the test's own thread: no worker threads, no sleeping.

The service, the simulator and the test share one `WallClock`: `run_until` ticks the main
loop and jumps the clock to the next due time, so a job that "runs" for an hour finishes in
milliseconds, and every backoff is exact. Everything else is real: the google-genai SDK
talking HTTP to the simulator on 127.0.0.1, the files, the sidecars.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from daemon import logs
from daemon.api import Engine
from daemon.api.gemini import GeminiEngine
from daemon.config import Config, load_config
from daemon.jobrecord import FileState
from daemon.service import Service
from daemon.simulator import Simulator
from daemon.watcher import InboxWatcher
from tests.support.harness import TEST_API_KEY, FakeClock, Spool
from tests.support.settings import STEPPED, test_config

EPOCH = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


class WallClock(FakeClock):
    """A fake monotonic clock with a wall clock that moves with it, unless a test steps the
    wall clock alone (an NTP step, a VM resumed)."""

    offset = 0.0

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now + self.offset)

    def step_wall(self, seconds: float) -> None:
        self.offset += seconds


class QuietWatcher(InboxWatcher):
    """The inbox watcher without its inotify thread: the test says when to look (`rescan`), so
    nothing happens behind its back. (inotify itself: tests/unit/test_watcher.py, process/.)"""

    def start(self) -> None:
        self.rescan()


class SteppedService(Service):
    def _start_watcher(self) -> None:
        self.watcher = QuietWatcher(
            self.config.inbox,
            self.config.inbox_settle_seconds,
            self.clock,
            on_event=self.scheduler.wake,
        )
        self.watcher.start()


class Daemon:
    """A spool folder and a `Service` on it, stepped by the test."""

    def __init__(
        self,
        root: Path,
        sim: Simulator,
        clock: WallClock,
        *,
        once: bool = False,
        engine: Engine | Callable[[Config], Engine] | None = None,
        **overrides: Any,
    ) -> None:
        self.root = root
        self.sim = sim
        self.clock = clock
        self._engine = engine  # another engine (or a factory of one) than Gemini's against `sim`
        self.folder = Spool(root, sim)
        self.folder.config_path.write_text(
            json.dumps(test_config(sim.base_url, STEPPED, **overrides))
        )
        self.config: Config = load_config(self.folder.config_path)
        self.log = io.StringIO()
        logs.configure(self.config.log_level, stream=self.log)
        logs.add_secret(TEST_API_KEY)  # as `gemini-batchd run` does with its key
        self.once = once
        self.service = self._service()
        self.started = False

    def _service(self) -> Service:
        if callable(self._engine):
            engine: Engine = self._engine(self.config)
        else:
            engine = self._engine or GeminiEngine(
                TEST_API_KEY,
                base_url=self.config.api.base_url,
                api_version=self.config.api.api_version,
                timeout_seconds=self.config.api.timeout_seconds,
                retries=self.config.api.retries,
            )
        return SteppedService(
            self.config,
            engine,
            once=self.once,
            clock=self.clock,
            wall=self.clock.wall,
            sleeper=lambda seconds: None,
            workers={},
        )

    @property
    def inbox(self) -> Path:
        return self.folder.inbox

    @property
    def outbox(self) -> Path:
        return self.folder.outbox

    def drop(self, name: str, lines: Iterable[Any] | bytes, *, how: str = "rename") -> Path:
        """Put a file into the inbox (see `Spool.drop`); a started daemon's watcher looks again."""
        path = self.folder.drop(name, lines, how=how)
        if self.started:
            self.service.watcher.rescan()
        return path

    def start(self) -> Daemon:
        self.service.start()
        self.started = True
        return self

    def tick(self) -> None:
        if not self.started:
            self.start()
        self.service.tick()

    def run_until(
        self, done: Callable[[], Any], *, ticks: int = 5000, longest: float = 3600.0
    ) -> None:
        """Tick, jumping the clock to the next due time, until `done()` is true."""
        for _ in range(ticks):
            self.tick()
            if done():
                return
            delay = self.service.scheduler.next_delay()
            self.clock.advance(min(longest, delay if delay is not None else 1.0) + 1e-6)
        raise AssertionError(f"not done after {ticks} ticks: {self.state()}")

    def run_all(self, **kwargs: Any) -> None:
        """Until no file is left in the inbox or in flight."""

        def idle() -> bool:
            return not self.service.files and not any(
                p.name.endswith(".jsonl") and not p.name.startswith(".")
                for p in self.inbox.iterdir()
            )

        self.run_until(idle, **kwargs)

    def restart(self) -> None:
        """A crash without the crash: forget everything in memory, start a new service."""
        self.service.shutdown()
        self.service.engine.close()
        for t in list(self.service.files.values()):
            os.close(t.lock_fd)
        self.service = self._service()
        self.started = False

    def stop(self) -> None:
        if self.started:
            self.service.shutdown()
            self.started = False
        self.service.engine.close()

    @property
    def finished(self) -> int:
        """Files the service has finished (done or failed) since it started."""
        return self.service.finished.done + self.service.finished.failed

    def exit_status(self) -> int:
        """What `run --once` would exit with: 1 if any file got an error report."""
        return 1 if self.service.finished.failed else 0

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log.getvalue().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def state(self) -> dict[str, str]:
        return {name: t.record.state.value for name, t in self.service.files.items()}

    def results(self, name: str) -> list[dict[str, Any]]:
        return self.folder.results(name)

    def report(self, name: str) -> dict[str, Any]:
        return self.folder.report(name.removesuffix(".jsonl"))

    def sidecar(self, name: str) -> dict[str, Any]:
        return self.folder.sidecar(name)

    def outcome(self, name: str) -> FileState | None:
        """DONE or FAILED once NAME has been archived (by where its sidecar is), else None."""
        for folder, state in (("done", FileState.DONE), ("failed", FileState.FAILED)):
            if (self.inbox / folder / (name + ".job.json")).exists():
                return state
        return None
