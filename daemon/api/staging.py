"""Cloud Storage for Vertex AI: request files staged under `vertex.staging_uri`, predictions
read back, both deleted once the results are safely written.

Through the real `google-cloud-storage` client (its resumable uploads, checksums and retries;
`STORAGE_EMULATOR_HOST` is honoured by the client itself). An upload is made at most once per
object name: it is created only where no object of that name exists (`ifGenerationMatch=0`),
and an upload whose outcome is unknown is settled by the object's name and CRC32C checksum.
Errors are not interpreted here: `failures.classify` decides what each means.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
from google.api_core import exceptions
from google.cloud import storage

from ..errors import BadReply

GS_URI = re.compile(r"gs://([^/]+)/(.*)")

UPLOAD_CHUNK = 8 * 1024 * 1024
"""Bytes per request of a resumable upload (a multiple of 256 KiB); bigger files are resumable."""


def split(uri: str) -> tuple[str, str]:
    """`gs://bucket/name` -> (bucket, name); `BadReply` for anything else."""
    match = GS_URI.fullmatch(uri)
    if match is None:
        raise BadReply(f"not a Cloud Storage URI: {uri[:200]!r}")
    return match.group(1), match.group(2)


def crc32c_of(path: Path) -> str:
    """The file's CRC32C as Cloud Storage reports it (base64 of the big-endian value)."""
    checksum = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(chunk)  # type: ignore[no-untyped-call]
    digest: bytes = checksum.digest()  # type: ignore[no-untyped-call]
    return base64.b64encode(digest).decode()


class _LineSplitter:
    """A writable stream that hands on whole lines."""

    def __init__(self, take: Callable[[bytes], None]) -> None:
        self.take = take
        self.rest: list[bytes] = []  # the start of a line (pieces joined once it ends)

    def write(self, data: bytes) -> int:
        if b"\n" not in data:  # (a long line arrives in many pieces: no copy per piece)
            self.rest.append(data)
            return len(data)
        first, *whole, last = data.split(b"\n")
        self.take(b"".join([*self.rest, first, b"\n"]))
        for line in whole:
            self.take(line + b"\n")
        self.rest = [last] if last else []
        return len(data)

    def close(self) -> None:
        if self.rest:
            self.take(b"".join(self.rest))
        self.rest = []


class Staging:
    """The staging bucket: upload once, list and stream predictions, delete by prefix."""

    def __init__(
        self,
        bucket: str,
        credentials: Any,
        *,
        project: str | None = None,
        endpoint: str | None = None,
        timeout_seconds: float = 120,
    ) -> None:
        options = {"api_endpoint": endpoint} if endpoint else None
        self.client = storage.Client(
            project=project, credentials=credentials, client_options=options
        )
        self.bucket = self.client.bucket(bucket)
        self.timeout = timeout_seconds

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket.name}/{name}"

    def upload(self, path: Path, name: str) -> str:
        """Upload `path` as object `name`, unless an object of that name holds the same bytes
        already (an upload whose reply was lost): its `gs://` URI either way."""
        blob = self.bucket.blob(name, chunk_size=UPLOAD_CHUNK)
        try:
            blob.upload_from_filename(
                str(path),
                content_type="application/jsonl",
                if_generation_match=0,
                checksum="crc32c",
                timeout=self.timeout,
            )
        except exceptions.PreconditionFailed:
            blob.reload(timeout=self.timeout)
            if blob.crc32c != crc32c_of(path):
                blob.delete(timeout=self.timeout)  # another attempt's bytes: made again next time
                raise BadReply(f"{self.uri(name)} held other bytes; deleted") from None
        return self.uri(name)

    def objects(self, folder: str) -> list[str]:
        """Names of the objects under `folder` (a `gs://` URI of a folder), sorted."""
        bucket, prefix = split(folder.rstrip("/") + "/")
        found = self.client.list_blobs(bucket, prefix=prefix, timeout=self.timeout)
        return sorted(blob.name for blob in found)

    def read_lines(self, name: str, take: Callable[[bytes], None]) -> None:
        """Hand each line of one object (with its newline) to `take` as it arrives: one
        streamed download, its CRC32C checked at the end. (Ranged reads of the object, as its
        reader makes, cost a fresh buffer of every chunk several times over.)"""
        lines = _LineSplitter(take)
        self.bucket.blob(name).download_to_file(lines, checksum="crc32c", timeout=self.timeout)
        lines.close()

    def delete(self, uri: str) -> None:
        """Delete one object, or every object under a folder (`gs://.../folder/`)."""
        bucket, name = split(uri)
        if uri.endswith("/"):
            for blob in self.client.list_blobs(bucket, prefix=name, timeout=self.timeout):
                blob.delete(timeout=self.timeout)
            return
        with contextlib.suppress(exceptions.NotFound):  # deleted already (a lost reply)
            self.client.bucket(bucket).blob(name).delete(timeout=self.timeout)

    def check_access(self, folder: str) -> None:
        """Write and delete a small object under `folder`: the start-up check of permissions."""
        name = f"{folder.strip('/')}/.gemini-batchd-check-{socket.gethostname()}-{os.getpid()}"
        blob = self.bucket.blob(name.lstrip("/"))
        blob.upload_from_string(b"gemini-batchd start-up check\n", timeout=self.timeout)
        blob.delete(timeout=self.timeout)

    def close(self) -> None:
        self.client.close()
