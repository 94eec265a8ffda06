"""api/staging.py against the Cloud Storage emulator, through the real google-cloud-storage
client: objects read back line by line, whatever the chunk boundaries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials

from daemon.api import staging
from daemon.simulator import StorageEmulator

BUCKET = "batchd-staging"


@pytest.fixture(scope="module")
def emulator() -> Iterator[StorageEmulator]:
    with StorageEmulator() as storage:
        storage.create_bucket(BUCKET)
        yield storage


@pytest.fixture
def store(emulator: StorageEmulator) -> Iterator[staging.Staging]:
    credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
    stage = staging.Staging(BUCKET, credentials, project="p", endpoint=emulator.base_url)
    yield stage
    stage.close()


@pytest.mark.parametrize("chunk", [1, 4, 7, 1 << 20])
def test_lines_come_back_whole_across_chunk_boundaries(
    store: staging.Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    body = b'{"a": 1}\n\n{"b": "two words"}\n{"c": "last, with no newline"}'
    source = tmp_path / "object.jsonl"
    source.write_bytes(body)
    store.upload(source, f"lines/{chunk}.jsonl")
    monkeypatch.setattr(staging, "UPLOAD_CHUNK", chunk)
    lines = list(store.lines(f"lines/{chunk}.jsonl"))
    assert lines == [
        b'{"a": 1}\n',
        b"\n",
        b'{"b": "two words"}\n',
        b'{"c": "last, with no newline"}',
    ]
    assert b"".join(lines) == body


def test_an_empty_object_has_no_lines(store: staging.Staging, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    store.upload(tmp_path / "empty.jsonl", "lines/empty.jsonl")
    assert list(store.lines("lines/empty.jsonl")) == []
