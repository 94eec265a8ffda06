"""Batch engines: the interface the daemon calls (`engine`), and Google's engines behind it.

`gemini` is the Gemini Developer API (an API key) with its REST wire format (`wire`);
`vertex` is Vertex AI batch prediction (Google credentials) with its Cloud Storage staging
(`staging`). Both use the deadline-bounded HTTP client (`http`) and the SDK's private parts
(`sdk`).
"""

from __future__ import annotations

from typing import Any

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
    if config.backend == "vertex":
        from .vertex import VertexEngine

        return VertexEngine
    from .gemini import GeminiEngine

    return GeminiEngine


def connect(
    config: Config,
    credential: Any,
    *,
    base_url: str | None = None,
    storage_endpoint: str | None = None,
) -> Engine:
    """The engine the configuration names, with its credential: an API key (`gemini`) or
    Google credentials (`vertex`). The SDKs are imported here, not before: the commands that
    need no engine start in a tenth of the time."""
    common: dict[str, Any] = {
        "base_url": base_url or config.api.base_url,
        "api_version": config.api.api_version,
        "timeout_seconds": config.api.timeout_seconds,
        "retries": config.api.retries,
    }
    if config.backend == "vertex":
        from .vertex import VertexEngine

        return VertexEngine(config.vertex, credential, storage_endpoint=storage_endpoint, **common)
    from .gemini import GeminiEngine

    return GeminiEngine(credential, **common)
