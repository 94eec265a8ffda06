"""daemon.jsonl: replies parsed exactly, garbage named without being quoted; tolerant counts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon import jsonl
from daemon.errors import BadReply
from tests.support import recorded

# ---- parse_json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", recorded.ALL)
def test_parse_json_reads_every_recorded_payload(name: str) -> None:
    body = recorded.raw(name)
    assert jsonl.parse_json(body) == json.loads(body)
    assert jsonl.parse_json(body.decode()) == json.loads(body)


@pytest.mark.parametrize("body", [None, "", b"", "   \n", b"\r\n\t "])
def test_parse_json_empty_is_a_bad_reply(body: str | bytes | None) -> None:
    with pytest.raises(BadReply, match="empty"):
        jsonl.parse_json(body)


def test_parse_json_html_is_a_bad_reply_naming_the_page() -> None:
    page = (
        b"<!DOCTYPE html>\n<html><head><title>502 Bad\n Gateway</title></head><body>secret</body>"
    )
    with pytest.raises(BadReply, match="HTML") as info:
        jsonl.parse_json(page)
    assert "502 Bad Gateway" in str(info.value)
    assert "secret" not in str(info.value)  # the body itself is never quoted
    with pytest.raises(BadReply, match="HTML"):
        jsonl.parse_json("  <html>oops")


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "batches/x", "metadata": {"state": "BATCH_',
        b'{"name": "batches/x"',
        b"not json",
        b'{"a": 1} trailing',
        b"\xff\xfe\x00garbage",
        b'{"a": "\xff"}',
    ],
)
def test_parse_json_truncated_or_garbage_is_a_bad_reply(body: bytes) -> None:
    with pytest.raises(BadReply, match="not valid JSON") as info:
        jsonl.parse_json(body)
    assert isinstance(info.value, ValueError)


def test_parse_json_deep_nesting_is_a_bad_reply_not_a_recursion_error() -> None:
    with pytest.raises(BadReply):
        jsonl.parse_json("[" * 200_000 + "]" * 200_000)


def test_parse_json_keeps_big_integers_exact() -> None:
    big = 123456789012345678901234567890
    assert jsonl.parse_json(f'{{"a": {big}, "b": "x"}}') == {"a": big, "b": "x"}
    assert jsonl.parse_json(f'{{"a": {big}}}'.encode()) == {"a": big}


def test_parse_json_accepts_what_the_stdlib_accepts() -> None:
    assert jsonl.parse_json('{"t": "\\ud83d"}') == {"t": "\ud83d"}  # a lone surrogate escape
    assert jsonl.parse_json(b'{"a": "\xc3\xa9"}') == {"a": "é"}
    assert jsonl.parse_json(b"[1, 2]") == [1, 2]


# ---- counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        ("3", 3),
        (" 12 ", 12),
        (b"7", 7),
        ("", 0),
        (None, 0),
        ("abc", 0),
        ("1e3", 0),
        ("9" * 5000, 0),
        (True, 0),
        (-4, 0),
        ("-4", 0),
        (2.0, 2),
        (float("nan"), 0),
        (float("inf"), 0),
        ({"n": 1}, 0),
        ([1], 0),
    ],
)
def test_count_never_raises(value: Any, expected: int) -> None:
    assert jsonl.count(value) == expected
