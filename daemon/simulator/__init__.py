"""The Batch API simulators: loopback HTTP servers speaking Google's REST protocols.

`server` holds the Gemini Batch API's state and routes, `vertex` Vertex AI batch prediction
(with an OAuth token endpoint) on top of it, `storage` the Cloud Storage emulator that Vertex
jobs read from and write to, `wire` what goes on the wire (replies, errors, faults),
`answers` what the model answers, `cli` the `gemini-batchd simulator` command. Tests script
them through their attributes and `Fault`s; `run --simulate` starts one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .answers import estimate_tokens, simulate_response
    from .server import ACTIVE_STATES, Simulator
    from .storage import StorageEmulator, StorageFault
    from .vertex import VertexSimulator
    from .wire import ApiError, Fault

_HOMES = {
    "ACTIVE_STATES": "server",
    "ApiError": "wire",
    "Fault": "wire",
    "Simulator": "server",
    "StorageEmulator": "storage",
    "StorageFault": "storage",
    "VertexSimulator": "vertex",
    "estimate_tokens": "answers",
    "simulate_response": "answers",
}
__all__ = [
    "ACTIVE_STATES",
    "ApiError",
    "Fault",
    "Simulator",
    "StorageEmulator",
    "StorageFault",
    "VertexSimulator",
    "estimate_tokens",
    "simulate_response",
]


def __getattr__(name: str) -> Any:
    """Each part loads on first use: the daemon's own commands import this package (for the
    `simulator` command's flags) and need none of it; the storage emulator also brings
    gcp-storage-emulator and the Cloud Storage client."""
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
