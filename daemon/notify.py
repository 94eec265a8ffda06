"""sd_notify(3) without libsystemd: readiness, status, reload and watchdog messages.

Each call sends one datagram (``KEY=value`` lines joined by ``\\n``) to the Unix socket named
by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace. Without
``$NOTIFY_SOCKET`` (a terminal, cron, tests) every method does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _monotonic_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Talks sd_notify to systemd; does nothing when $NOTIFY_SOCKET is unset."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        clock_monotonic_us: Callable[[], int] = _monotonic_us,
    ) -> None:
        env = os.environ if environ is None else environ
        self._env = dict(env)
        self._clock = clock_monotonic_us
        path = self._env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self.enabled: bool = path.startswith(("/", "@")) and len(path) > 1

    def notify(self, **fields: str) -> None:
        """Send ``KEY=value`` lines in argument order; never raises (OSError is logged)."""
        if not self.enabled or not fields:
            return
        lines = (f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(READY="1")
        else:
            self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def stopping(self) -> None:
        self.notify(STOPPING="1")

    def reloading(self) -> None:
        self.notify(RELOADING="1", MONOTONIC_USEC=str(self._clock()))

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None for no watchdog."""
        if not self.enabled:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None


class SystemdStatus:
    """What systemd is told: READY=1, a STATUS= line when it changes, and WATCHDOG=1 -- the
    watchdog only while work progresses, so systemd restarts a daemon whose workers are stuck."""

    STATUS_EVERY = 0.5

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._last_status = ""
        self._next_status = 0.0
        self._last_ping = 0.0

    def ready(self, status: str) -> None:
        self._last_status = status
        self.notifier.ready(status)
        self._ping(force=True)

    def reloading(self) -> None:
        self.notifier.reloading()

    def stopping(self) -> None:
        self.notifier.stopping()

    def tick(self, status: Callable[[], str], *, progressing: bool) -> None:
        """STATUS= when it changed (at most twice a second); WATCHDOG=1 if work progresses."""
        now = time.monotonic()
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + self.STATUS_EVERY
            text = status()
            if text != self._last_status:
                self._last_status = text
                self.notifier.status(text)
        if progressing:
            self._ping()

    def next_ping_in(self) -> float:
        """Seconds until the next watchdog ping is due (the main loop wakes for it)."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return float("inf")
        return max(0.0, self._last_ping + interval / 2 - time.monotonic())

    def _ping(self, *, force: bool = False) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = time.monotonic()
        if force or now - self._last_ping >= interval / 2:
            self._last_ping = now
            self.notifier.watchdog()
