"""Every use of google-genai's private parts, in one place, each touched by a test.

The engines read and write REST JSON themselves through the SDK's own HTTP client (its
credentials, base URL, API version, retries and transport), because the SDK's typed batch
methods drop what the daemon needs -- `batchStats` (progress) and the operation's `error`
(googleapis/python-genai#1323; on Vertex, an `error.details` of objects fails its parser) --
and re-encode every answer. `tests/unit/test_sdk_edge.py` touches each name used here, so
that an SDK release that renames one fails in CI, not in production. Drop the REST path once
the SDK's `BatchJob` keeps those fields.
"""

from __future__ import annotations

from typing import IO, Any

from google import genai
from google.genai import types

from ..jsonl import parse_json

ONCE = types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1))
"""Options of a call sent exactly once (a create: a retried create whose first reply was lost
makes a second job)."""


def rest(client: genai.Client, method: str, path: str, body: dict[str, Any], *, once: bool) -> Any:
    """One REST call through the SDK's HTTP client; the reply's JSON (`BadReply` if none).

    `path` is relative to the API version (on Vertex, to the project and location)."""
    response = client._api_client.request(method, path, body, ONCE if once else None)
    return parse_json(response.body)


def endpoint(client: genai.Client) -> str:
    """The base URL and API version the client calls, e.g. `https://host/v1beta`."""
    options = client._api_client._http_options
    return f"{(options.base_url or '').rstrip('/')}/{options.api_version or ''}"


def download(client: genai.Client, name: str, destination: IO[bytes]) -> None:
    """`files.download` to a stream, written as the network delivers it: the public method
    first re-cuts the body into 1 MiB chunks through an ever-growing buffer, several copies
    of every byte (most of the daemon's system time on a large responses file)."""
    path = f"files/{name.removeprefix('files/')}:download?alt=media"
    client._api_client.download_file(path, destination=destination, chunk_size=None)  # type: ignore[call-overload]
