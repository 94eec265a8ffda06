"""Recorded live Gemini API payloads (tests/payloads/) and the envelopes the Batch API puts them in.

The `resp_*` payloads are `generateContent` responses: the Batch API returns each one inside a
responses-file line (`{"key", "response"}`) or an inline output item (`{"response",
"metadata": {"key"}}`) of the job's Operation. `add_future_fields` adds unknown fields at every
level, as a newer API would.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).resolve().parents[1] / "payloads"

RESPONSES = sorted(p.stem for p in PAYLOADS.glob("resp_*.json"))
OPERATIONS = sorted(p.stem for p in PAYLOADS.glob("op_*.json"))
ERRORS = sorted(p.stem for p in PAYLOADS.glob("error_*.json"))
ALL = sorted(p.stem for p in PAYLOADS.glob("*.json"))

FUTURE = {"futureField": {"nested": [1, "two", {"futureField": True}], "level": "x"}}


def raw(name: str) -> bytes:
    """The payload's bytes exactly as recorded."""
    return (PAYLOADS / f"{name}.json").read_bytes()


def load(name: str) -> Any:
    return json.loads(raw(name))


def add_future_fields(value: Any) -> Any:
    """A deep copy with `futureField` added to every object at every level."""
    if isinstance(value, dict):
        out = {k: add_future_fields(v) for k, v in value.items()}
        out.update(copy.deepcopy(FUTURE))
        return out
    if isinstance(value, list):
        return [add_future_fields(v) for v in value]
    return value


def file_line(key: str, response_bytes: bytes) -> bytes:
    """A responses-file line carrying the response bytes untouched."""
    return b'{"key": ' + json.dumps(key).encode() + b', "response": ' + response_bytes + b"}\n"


def inline_operation(items: list[bytes], name: str = "batches/recorded") -> bytes:
    """A SUCCEEDED inline Operation body whose output items are the given raw JSON objects."""
    output = {"inlinedResponses": {"inlinedResponses": "@ITEMS@"}}
    operation = {
        "name": name,
        "metadata": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "name": name,
            "model": "models/gemini-2.5-flash",
            "state": "BATCH_STATE_SUCCEEDED",
            "batchStats": {
                "requestCount": str(len(items)),
                "successfulRequestCount": str(len(items)),
            },
            "output": output,
        },
        "done": True,
        "response": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
            **output,
        },
    }
    body = json.dumps(operation, indent=1).encode()
    return body.replace(b'"@ITEMS@"', b"[" + b", ".join(items) + b"]")


def inline_item(key: str | None, response_bytes: bytes) -> bytes:
    """An inline output item; without a key when the API echoes no metadata."""
    item = b'{"response": ' + response_bytes
    if key is not None:
        item += b', "metadata": {"key": ' + json.dumps(key).encode() + b"}"
    return item + b"}"
