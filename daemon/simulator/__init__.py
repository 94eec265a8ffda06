"""The Batch API simulators: loopback HTTP servers speaking Google's REST protocols.

`server` holds the Gemini Batch API's state and routes, `vertex` Vertex AI batch prediction
(with an OAuth token endpoint) on top of it, `storage` the Cloud Storage emulator that Vertex
jobs read from and write to, `wire` what goes on the wire (replies, errors, faults),
`answers` what the model answers, `cli` the `gemini-batchd simulator` command. Tests script
them through their attributes and `Fault`s; `run --simulate` starts one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .answers import estimate_tokens, simulate_response
from .server import ACTIVE_STATES, Simulator
from .vertex import VertexSimulator
from .wire import ApiError, Fault

if TYPE_CHECKING:
    from .storage import StorageEmulator, StorageFault

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
    """The storage emulator loads on first use: it brings gcp-storage-emulator and the Cloud
    Storage client, which no other command needs."""
    if name in ("StorageEmulator", "StorageFault"):
        from . import storage

        return getattr(storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
