"""Logging: structlog for our events and the stdlib `logging` of libraries, one pipeline.

Output is readable console lines on a terminal, JSON lines elsewhere, and JSON lines with a
`<N>` priority prefix when stderr is the systemd journal. Secrets are redacted everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from .spool import printable

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
REDACTED = "[redacted]"
MIN_SECRET_CHARS = 16
"""A secret this long is redacted wherever it appears in a line. A shorter one would mangle
ordinary text ("abc" in "abcdef"), and is no real API key (Google's have 39 characters): it
is redacted only as a whole value, or where it follows `key=` or an API-key header."""

_secrets: list[str] = []  # redacted anywhere
_short_secrets: list[str] = []  # redacted as whole values (and by _KEY_CONTEXT)
# Wherever a key is written the way HTTP carries it: redacted whatever its length, registered
# or not. The daemon never logs its key itself; this covers what libraries and servers echo.
_KEY_CONTEXT = re.compile(
    r"""(?i)([?&](?:key|api_?key)="""  # a URL's query: ?key=...
    r"""|x-goog-api-key["']?\s*[:=]\s*["']?"""  # the header, as text, JSON or a dict's repr
    r"""|\bapi_?key["']?\s*[:=]\s*["'])"""  # api_key='...' in a repr, "apiKey": "..." in JSON
    r"""[^\s&"',;}#]+"""
)


def add_secret(value: str | None) -> bool:
    """Never print `value` (an API key). True when it is redacted everywhere in text; False for
    a key shorter than MIN_SECRET_CHARS, which only whole values and key contexts hide."""
    if not value:
        return False
    long_enough = len(value) >= MIN_SECRET_CHARS
    registry = _secrets if long_enough else _short_secrets
    if value not in registry:
        registry.append(value)
    return long_enough


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` without the registered secrets (or `secrets`) and without keys in key contexts."""
    if secrets is None:
        anywhere, whole = _secrets, _short_secrets
    else:
        given = [s for s in secrets if s]
        anywhere = [s for s in given if len(s) >= MIN_SECRET_CHARS]
        whole = [s for s in given if len(s) < MIN_SECRET_CHARS]
    if text.strip() in whole:
        return REDACTED
    for secret in anywhere:
        text = text.replace(secret, REDACTED)
    if "key" in text.lower():
        text = _KEY_CONTEXT.sub(rf"\1{REDACTED}", text)
    return text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if isinstance(value, int | float | bool | type(None)):
        return value
    return redact(str(value))


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Runs last before rendering, after exceptions became text, so tracebacks are covered too."""
    for key, value in event.items():
        event[key] = _redacted(value)
    return event


def _printable_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """For a terminal: control characters in values (a file name with ESC in it) escaped, as
    JSON lines escape them. Newlines and tabs stay (tracebacks)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = printable(value, keep_lines=True)
    return event


class _DropShutdownNoise(logging.Filter):
    """watchdog logs an error when its inotify thread is stopped mid-read; that is normal at exit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def stderr_is_journal(
    environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> bool:
    """True when systemd connected stderr to the journal ($JOURNAL_STREAM is `device:inode` of it)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalPrefix(logging.Formatter):
    """Prefix each line with `<priority>` so journald records the right level."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        level = _PRIORITY.get(record.levelname.lower(), 6)
        return f"<{level}>" + self._inner.format(record)


def configure(
    level: str = "info", stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Set up structlog and stdlib logging to write to `stream` (stderr by default)."""
    stream = stream or sys.stderr
    console = hasattr(stream, "isatty") and stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    formatter: logging.Formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_event,
            *([_printable_event] if console else []),
            renderer,
        ],
    )
    if not console and stderr_is_journal(environ, stream):
        formatter = _JournalPrefix(formatter)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    # Libraries are chatty at INFO (every HTTP request); keep them at warning unless debugging.
    for noisy in ("httpx", "httpx2", "google_genai", "watchdog", "tenacity"):
        logging.getLogger(noisy).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    logging.getLogger("watchdog.observers.inotify").addFilter(_DropShutdownNoise())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,  # reconfiguring changes levels and streams, not processors
    )


def get(name: str = "gemini-batchd") -> Any:
    return structlog.get_logger(name)


class Throttle:
    """At most one warning a minute per cause: trouble that repeats (a full disk, a removed
    folder, a file that waits) is said once a minute, not once per file and retry."""

    def __init__(self, clock: Callable[[], float], every: float = 60.0) -> None:
        self._clock = clock
        self._every = every
        self._lock = threading.Lock()
        self._said: dict[str, float] = {}

    def due(self, cause: str) -> bool:
        """Whether `cause` was not said in the last minute (and counts as said from now)."""
        now = self._clock()
        with self._lock:
            if now - self._said.get(cause, -1e18) < self._every:
                return False
            self._said[cause] = now
        return True
