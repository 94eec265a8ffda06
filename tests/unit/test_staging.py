"""api/staging.py against the Cloud Storage emulator, through the real google-cloud-storage
client: objects read back line by line, whatever the network delivers at a time."""

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


def read(store: staging.Staging, name: str) -> list[bytes]:
    lines: list[bytes] = []
    store.read_lines(name, lines.append)
    return lines


def test_lines_come_back_whole_with_their_newlines(store: staging.Staging, tmp_path: Path) -> None:
    body = b'{"a": 1}\n\n{"b": "two words"}\n{"c": "last, with no newline"}'
    source = tmp_path / "object.jsonl"
    source.write_bytes(body)
    store.upload(source, "lines/object.jsonl")
    lines = read(store, "lines/object.jsonl")
    assert lines == [
        b'{"a": 1}\n',
        b"\n",
        b'{"b": "two words"}\n',
        b'{"c": "last, with no newline"}',
    ]
    assert b"".join(lines) == body


@pytest.mark.parametrize(
    "cuts", [[1], [4, 5, 6], [7, 20], [3, 9, 10, 11, 30], list(range(1, 59)), [8, 9, 10, 29]]
)
def test_lines_are_whole_whatever_the_network_delivers_at_a_time(cuts: list[int]) -> None:
    body = b'{"a": 1}\n\n{"b": "two words"}\n{"c": "last, with no newline"}'
    lines: list[bytes] = []
    splitter = staging._LineSplitter(lines.append)
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        assert splitter.write(body[start:end]) == end - start
    splitter.close()
    assert lines == [
        b'{"a": 1}\n',
        b"\n",
        b'{"b": "two words"}\n',
        b'{"c": "last, with no newline"}',
    ]


def test_an_empty_object_has_no_lines(store: staging.Staging, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    store.upload(tmp_path / "empty.jsonl", "lines/empty.jsonl")
    assert read(store, "lines/empty.jsonl") == []
