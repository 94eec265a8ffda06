"""The Gemini Developer API's batch engine (an API key), through the google-genai SDK only.

Batch calls (create, get, list, cancel) are REST JSON through the SDK's own HTTP client
(`sdk.rest`: see there why); files go through the SDK's public `files` methods (resumable
upload, streamed download). Errors are not interpreted here: SDK, transport and `BadReply`
errors propagate, and `failures.classify` decides what they mean. Every call has a total
deadline (`http.deadline`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from google import genai
from google.genai import types

from ..errors import BadReply
from ..jsonl import STREAM_BUFFER, parse_json
from . import http, sdk, wire
from .engine import EngineLimits, RemoteJob

BATCH_MIME_TYPE = "application/jsonl"
"""Mime type of an uploaded batch input file; the SDK cannot guess it for `.jsonl`."""


def key_fingerprint(api_key: str) -> str:
    """A short, non-reversible name for a key, so sidecars can say which key a job belongs to."""
    return hashlib.sha256(b"gemini-batchd:" + api_key.encode()).hexdigest()[:12]


MAX_JOB_BYTES = 2_000_000_000
"""The File API takes input files of up to 2 GB."""


class GeminiEngine(http.RestCalls):
    """The `Engine` of the Gemini Developer API: one long-lived `genai.Client` (a collected
    client closes its connections)."""

    kind: ClassVar[str] = "gemini"
    jobs_path: ClassVar[str] = "batches"
    limits: ClassVar[EngineLimits] = EngineLimits(inline=True, max_job_bytes=MAX_JOB_BYTES)

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        timeout_seconds: float = 120,
        retries: int = 5,
        client: genai.Client | None = None,
    ) -> None:
        self.timeout = timeout_seconds
        self.account = key_fingerprint(api_key)
        self._own_http = None
        if client is None:  # a client given (the library, tests) comes with its own HTTP
            options = http.http_options(
                base_url=base_url,
                api_version=api_version,
                timeout_seconds=timeout_seconds,
                retry_options=http.retry_options(retries, timeout_seconds),
            )
            self._own_http = options.httpx_client
            client = genai.Client(api_key=api_key, http_options=options)
        self.client = client
        self.endpoint = sdk.endpoint(client)

    @staticmethod
    def is_job_name(name: str) -> bool:
        return wire.JOB_NAME.fullmatch(name) is not None

    def create_job(
        self, model: str, display_name: str, source: str | Path, *, inline: bool
    ) -> RemoteJob:
        """Create one batch job from a request file (inline) or an uploaded file (`files/...`)."""
        config: dict[str, Any]
        if inline:
            config = {"requests": {"requests": list(_inlined(Path(source)))}}
        else:
            config = {"fileName": str(source)}
        body = {"batch": {"displayName": display_name, "inputConfig": config}}
        reply = self._json("post", f"{_model_path(model)}:batchGenerateContent", body, once=True)
        return wire.parse_operation(reply)

    def get_job(self, name: str) -> RemoteJob:
        """One GET of the batch operation, read whole: state, progress, error, answers."""
        return wire.parse_operation(self._json("get", _batch_path(name), {}))

    def find_job(self, display_name: str, *, prefix: bool = False) -> RemoteJob | None:
        """Found by paging through every job of the project (`RestCalls._find`)."""
        return self._find(display_name, prefix, {}, wire.parse_job_list)

    def cancel_job(self, name: str) -> None:
        self._json("post", f"{_batch_path(name)}:cancel", {})

    def upload(self, path: Path, display_name: str) -> str:
        """Upload a batch input file (resumable); returns its name, `files/...`."""

        def call() -> str:
            uploaded = self.client.files.upload(
                file=path,
                config=types.UploadFileConfig(mime_type=BATCH_MIME_TYPE, display_name=display_name),
            )
            if not uploaded.name:
                raise BadReply("the upload reply names no file")
            if wire.FILE_NAME.fullmatch(uploaded.name) is None:
                raise BadReply(
                    f"the upload reply names a file of an unknown shape: {uploaded.name[:100]!r}"
                )
            return uploaded.name

        return self._deadline(call, path.stat().st_size)

    def find_uploads(self, display_name: str) -> list[str]:
        """Uploaded files with this display name (an upload whose reply was lost)."""

        def call() -> list[str]:
            return [
                f.name
                for f in self.client.files.list(
                    config=types.ListFilesConfig(page_size=http.LIST_PAGE_SIZE)
                )
                if f.display_name == display_name and f.name and wire.FILE_NAME.fullmatch(f.name)
            ]

        return self._deadline(call)

    def download(self, results: str, destination: Path, expected_bytes: int = 0) -> None:
        """Stream a job's responses file (already in the answers format) to disk."""

        def call() -> None:
            with destination.open("wb", buffering=STREAM_BUFFER) as handle:
                sdk.download(self.client, results, handle)

        self._deadline(call, expected_bytes)

    def delete(self, name: str) -> None:
        self._deadline(lambda: self.client.files.delete(name=name))

    def close(self) -> None:
        self.client.close()
        if self._own_http is not None:
            self._own_http.close()


def _inlined(source: Path) -> Iterator[dict[str, Any]]:
    """The inlined requests of a request file: `{"request", "metadata": {"key"}}` each."""
    with source.open("rb", buffering=STREAM_BUFFER) as handle:
        for raw in handle:
            line = parse_json(raw)  # integers past 64 bits stay exact
            yield {"request": line["request"], "metadata": {"key": line["key"]}}


def _model_path(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


def _batch_path(name: str) -> str:
    if wire.JOB_NAME.fullmatch(name) is None:  # a name from an older sidecar: never a path
        raise BadReply(f"not a batch job name: {name[:100]!r}")
    return name
