"""Batch engines: the interface the daemon calls (`engine`), and Google's engines behind it.

`gemini` is the Gemini Developer API (an API key), with its REST wire format (`wire`), the
deadline-bounded HTTP client the engines use (`http`) and the SDK's private parts (`sdk`).
"""

from __future__ import annotations

from ..config import Config
from .engine import Engine, Progress, RemoteJob, RemoteState

__all__ = ["Engine", "Progress", "RemoteJob", "RemoteState", "connect"]


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
