"""Batch engines: the interface the daemon calls (`engine`), and Google's engines behind it.

`gemini` is the Gemini Developer API (an API key), with its REST wire format (`wire`), the
deadline-bounded HTTP client the engines use (`http`) and the SDK's private parts (`sdk`).
"""

from __future__ import annotations

from ..config import Config
from .engine import Engine, EngineLimits, Progress, RemoteJob, RemoteState

__all__ = [
    "Engine",
    "EngineLimits",
    "Progress",
    "RemoteJob",
    "RemoteState",
    "connect",
    "engine_class",
]


def engine_class(config: Config) -> type[Engine]:
    """The class of the engine the configuration names: its limits, before any credential."""
    from .gemini import GeminiEngine

    return GeminiEngine


def connect(config: Config, api_key: str, *, base_url: str | None = None) -> Engine:
    """The engine the configuration names (google-genai is imported here, not before: the
    commands that need no engine start in a tenth of the time)."""
    from .gemini import GeminiEngine

    return GeminiEngine(
        api_key,
        base_url=base_url or config.api.base_url,
        api_version=config.api.api_version,
        timeout_seconds=config.api.timeout_seconds,
        retries=config.api.retries,
    )
