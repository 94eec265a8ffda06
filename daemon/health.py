"""The pause: while the API rejects the daemon's credential or permission, no new work starts.

Every API call reports here (`ok` or `failed`). An AUTH failure pauses the daemon; any call
that succeeds ends the pause. While paused one clear error is logged a minute, and the
supervisor probes the API once a minute for the whole daemon (not once per file).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import logs
from .failures import Call, Failure, Kind

log = logs.get()

LOG_EVERY = 60.0
"""While paused, the reason is logged at most this often."""


class Health:
    """Paused or not, why and since when; read by the supervisor, status and the metrics."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.paused: str | None = None
        self.paused_since: float | None = None
        self.last_ok_wall: float | None = None  # time.time() of the last successful call
        self._last_log = -1e18

    def ok(self, call: Call) -> bool:
        """A call succeeded; True when that ended a pause."""
        with self._lock:
            self.last_ok_wall = time.time()
            resumed = self.paused
            self.paused = self.paused_since = None
            if resumed:
                self._last_log = -1e18  # a new pause is news again
        if resumed:
            log.warning("resumed: the API accepts calls again", was=resumed, call=call.value)
        return resumed is not None

    def failed(self, call: Call, failure: Failure) -> None:
        """A call failed; an AUTH failure pauses the daemon (or keeps it paused)."""
        if failure.kind is not Kind.AUTH:
            return
        now = self._clock()
        with self._lock:
            if self.paused is None:
                self.paused_since = now
            self.paused = f"API key or permission rejected: {failure.message}"
            due = now - self._last_log >= LOG_EVERY
            if due:
                self._last_log = now
        if due:
            log.error(
                "paused: the API rejects the credential or its permission; no new work starts "
                "until a call succeeds",
                reason=failure.message,
                call=call.value,
            )
