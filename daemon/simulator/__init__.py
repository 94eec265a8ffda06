"""The Gemini Batch API simulator: a loopback HTTP server speaking Google's REST protocol.

`server` holds the API's state and routes, `wire` what goes on the wire (replies, errors,
faults), `answers` what the model answers, `cli` the `gemini-batchd simulator` command.
Tests script it through its attributes and `Fault`s; `run --simulate` starts one.
"""

from .answers import estimate_tokens, simulate_response
from .server import ACTIVE_STATES, Simulator
from .wire import ApiError, Fault

__all__ = [
    "ACTIVE_STATES",
    "ApiError",
    "Fault",
    "Simulator",
    "estimate_tokens",
    "simulate_response",
]
