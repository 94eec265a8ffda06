"""daemon.answers: the answers format read tolerantly, and answers matched to requests by key."""

from __future__ import annotations

from typing import Any

import pytest

from daemon import answers
from daemon.answers import Entry
from tests.support import recorded

# ---- entries -------------------------------------------------------------------------------------


def test_entry_from_a_responses_file_line_keeps_the_response_object() -> None:
    response = recorded.load("resp_ellmer_web_search")
    obj = {"key": "a1", "response": response}
    entry = answers.entry_from_obj(obj)
    assert entry == Entry(key="a1", response=response, error=None)
    assert entry.response is response  # raw: not copied, not re-serialised


def test_entry_from_an_inline_item() -> None:
    item = {"response": {"candidates": []}, "metadata": {"key": "k7", "other": 1}}
    assert answers.entry_from_obj(item) == Entry("k7", {"candidates": []}, None)


@pytest.mark.parametrize("field", ["error", "status"])
def test_entry_error_as_error_or_status(field: str) -> None:
    status = recorded.load("error_pai_404_status")
    entry = answers.entry_from_obj(recorded.add_future_fields({"key": "a", field: status}))
    assert entry.key == "a"
    assert entry.response is None
    assert entry.error == {"code": 404, "message": status["message"], "status": "NOT_FOUND"}


def test_entry_error_normalised() -> None:
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "X"}]
    raw = {
        "code": "429",
        "message": "slow down",
        "status": "RESOURCE_EXHAUSTED",
        "details": details,
    }
    assert answers.entry_from_obj({"key": "a", "error": raw}).error == {
        "code": 429,
        "message": "slow down",
        "status": "RESOURCE_EXHAUSTED",
        "details": details,
    }
    assert answers.entry_from_obj({"error": "boom"}).error == {"message": "boom"}
    assert answers.entry_from_obj({"error": {"code": True, "message": 5}}).error == {}
    assert answers.entry_from_obj({"error": [1]}).error is None
    # "error" wins over "status" when both are there.
    both = {"error": {"code": 500}, "status": {"code": 404}}
    assert answers.entry_from_obj(both).error == {"code": 500}


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ({"key": "a"}, "a"),
        ({"key": 5}, "5"),
        ({"key": True}, None),
        ({"key": ["a"]}, None),
        ({"metadata": {"key": "m"}}, "m"),
        ({"metadata": {"key": 9}}, "9"),
        ({"metadata": "m"}, None),
        ({"key": None, "metadata": {"key": "m"}}, "m"),
        ({}, None),
    ],
)
def test_entry_keys(obj: dict[str, Any], key: str | None) -> None:
    assert answers.entry_key(obj) == key
    assert answers.entry_from_obj(obj).key == key


def test_entry_with_an_odd_response() -> None:
    assert answers.entry_from_obj({"key": "a", "response": "text"}) == Entry("a", None, None)
    assert answers.entry_from_obj({"key": "a", "response": None, "error": None}) == Entry(
        "a", None, None
    )


def test_line_key() -> None:
    assert answers.line_key(b'{"key": "a", "response": {}}\n') == "a"
    assert answers.line_key(b'{"key": 5}') == "5"
    assert answers.line_key(b'{"metadata": {"key": "m"}}') == "m"
    assert answers.line_key(b'{"response": {}, "key": "late"}') == "late"
    assert answers.line_key(b'{"key": "esc\\"aped", "response": {}}') == 'esc"aped'
    assert answers.line_key(b'{"response": {}}') is None
    assert answers.line_key(b"[1]") is None
    assert answers.line_key(b"garbage") is None
    assert answers.line_key(b"") is None
    assert answers.line_key(b"\xff\xfe") is None
    assert answers.line_key(recorded.file_line("k", recorded.raw("resp_pai_thinking_part"))) == "k"


# ---- match_inline --------------------------------------------------------------------------------


def item(key: str | None, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"response": {"candidates": [{"content": {"parts": [{"text": text}]}}]}}
    if key is not None:
        body["metadata"] = {"key": key}
    return body


def text_of(entry: Entry) -> str:
    assert entry.response is not None
    return str(entry.response["candidates"][0]["content"]["parts"][0]["text"])


def test_match_inline_by_key_in_any_order() -> None:
    keys = ["a", "b", "c"]
    match = answers.match_inline(keys, [item("c", "C"), item("a", "A"), item("b", "B")])
    assert not match.by_position
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "A", "b": "B", "c": "C"}


def test_match_inline_by_position_when_no_key_came_back() -> None:
    keys = ["a", "b", "c"]
    match = answers.match_inline(keys, [item(None, "A"), item(None, "B"), item(None, "C")])
    assert match.by_position
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "A", "b": "B", "c": "C"}


def test_match_inline_without_keys_and_other_counts_matches_nothing() -> None:
    match = answers.match_inline(["a", "b", "c"], [item(None, "A"), item(None, "B")])
    assert (match.entries, match.by_position) == ({}, False)
    match = answers.match_inline(["a"], [item(None, "A"), item(None, "B")])
    assert (match.entries, match.by_position) == ({}, False)


def test_match_inline_mixed_keys_match_by_key_only() -> None:
    match = answers.match_inline(["a", "b"], [item(None, "A"), item("b", "B")])
    assert not match.by_position
    assert list(match.entries) == ["b"]


def test_match_inline_first_wins_and_strangers_are_ignored() -> None:
    items = [item("a", "first"), item("x", "stranger"), item("a", "second")]
    match = answers.match_inline(["a", "b"], items)
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "first"}


def test_match_inline_nothing() -> None:
    assert answers.match_inline(["a"], None) == answers.InlineMatch({}, False)
    assert answers.match_inline(["a"], []) == answers.InlineMatch({}, False)
    assert answers.match_inline([], []) == answers.InlineMatch({}, False)


def test_match_inline_reads_error_items_and_unknown_fields() -> None:
    items = recorded.add_future_fields(
        [item(None, "A"), {"error": recorded.load("error_pai_404_status")}]
    )
    match = answers.match_inline(["a", "b"], items)
    assert match.by_position
    assert match.entries["b"].error is not None
    assert match.entries["b"].error["code"] == 404


@pytest.mark.parametrize(
    ("line", "final"),
    [
        (b'{"key": "a", "response": {"candidates": []}}', True),
        (b'{"key": "a", "response": {}, "futureField": [1, {"error": 2}]}', True),
        (b'{"key": "a", "response": {}, "error": null, "status": null}', True),
        (b'{"key": "a", "error": {"code": 400, "message": "bad"}}', True),  # no retry fixes it
        (b'{"key": "a", "error": {"code": 429}}', False),
        (b'{"key": "a", "status": {"code": 13, "status": "INTERNAL"}}', False),
        (b'{"key": "a", "error": {"code": 503}, "response": {}}', True),  # answered
        (b'{"key": "a", "response": null, "error": {"code": 500}}', False),
        (b'{"key": "a", "response": "text", "error": {"code": 500}}', False),
        (b'{"key": "a"}', True),  # neither: a record says so; another try would not help
        (b'{"key": "a", "response": {"candidates": [', False),  # cut short
        (b"<html>", False),
        (b"[1, 2]", False),
        (b'{"key": "a", "response": {"x": "\xff"}}', False),  # not UTF-8: no parser reads it
        (b'{"key": "a", "response": {"x": "caf\xc3\xa9"}}', True),
        (b'{"key": "a", "response": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, False),
    ],
)
def test_is_final_tells_answers_and_lasting_errors_from_retryable_ones(
    line: bytes, final: bool
) -> None:
    assert answers.is_final(line) is final
