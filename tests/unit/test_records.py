"""daemon.records: outbox records from entries, with every recorded live payload."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from daemon import answers, jsonl, records
from daemon.answers import Entry
from daemon.api import wire
from daemon.records import Tally, is_retryable, parse_json_text, record_for
from tests.support import recorded

ZERO_USAGE = dict.fromkeys(records.USAGE_KEYS, 0)


def usage(**counts: int) -> dict[str, int]:
    return {**ZERO_USAGE, **counts}


def response(
    *parts: Any,
    finish: str | None = "STOP",
    usage_metadata: dict[str, Any] | None = None,
    model_version: str | None = "gemini-2.5-flash-001",
    **candidate_fields: Any,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate.update(candidate_fields)
    body: dict[str, Any] = {"candidates": [candidate]}
    if usage_metadata is not None:
        body["usageMetadata"] = usage_metadata
    if model_version is not None:
        body["modelVersion"] = model_version
    return body


def ok(text: str, **kwargs: Any) -> Entry:
    return Entry("k1", response({"text": text}, **kwargs), None)


def record(
    entry: Entry | None,
    *,
    filter_json: bool = False,
    include_response: bool = False,
    attempts: int = 1,
) -> dict[str, Any]:
    return record_for(
        "k1",
        3,
        entry,
        filter_json=filter_json,
        include_response=include_response,
        attempts=attempts,
    )


def from_file_line(name: str, key: str = "k1", future: bool = False) -> Entry:
    """The payload as the Batch API returns it in a responses file, read through answers."""
    body = recorded.raw(name)
    if future:
        body = json.dumps(recorded.add_future_fields(json.loads(body))).encode()
    line = recorded.file_line(key, body)
    if future:
        line = json.dumps(recorded.add_future_fields(json.loads(line))).encode()
    return answers.entry_from_obj(jsonl.parse_json(line))


def from_inline_item(name: str, key: str | None = "k1", future: bool = False) -> Entry:
    """The payload as an inline output item of a SUCCEEDED job's Operation, read through answers."""
    body = recorded.inline_operation([recorded.inline_item(key, recorded.raw(name))])
    obj = jsonl.parse_json(body)
    if future:
        obj = recorded.add_future_fields(obj)
    job = wire.parse_operation(obj)
    match = answers.match_inline(["k1"], job.inline_responses)
    assert match.by_position is (key is None)
    return match.entries["k1"]


READERS = [from_file_line, from_inline_item]


# ---- every recorded payload, on both paths, with and without unknown fields ---------------------

EXPECTED: dict[str, dict[str, Any]] = {
    "resp_pai_thinking_part": {
        "status": "ok",
        "finish_reason": "STOP",
        "model_version": "gemini-3-pro-preview",
        "usage": usage(
            prompt_tokens=29, output_tokens=736, thinking_tokens=1001, total_tokens=1766
        ),
    },
    "resp_ellmer_web_search": {
        "status": "ok",
        "text": "2014-05-21",
        "finish_reason": "STOP",
        "model_version": "gemini-3.5-flash",
        "usage": usage(
            prompt_tokens=341,
            output_tokens=10,
            thinking_tokens=499,
            total_tokens=850,
            cached_tokens=92,
        ),
    },
    "resp_pai_max_tokens_thinking_empty": {
        "status": "ok",
        "text": "",
        "finish_reason": "MAX_TOKENS",
        "model_version": "gemini-2.5-pro",
        "usage": usage(prompt_tokens=15, thinking_tokens=2, total_tokens=17),
    },
    "resp_pai_safety_block": {
        "status": "error",
        "finish_reason": "SAFETY",
        "model_version": "gemini-1.5-flash",
        "usage": usage(prompt_tokens=14, total_tokens=14),
        "error": {
            "stage": "blocked",
            "message": "the answer was withheld: SAFETY (HARM_CATEGORY_HATE_SPEECH)",
        },
    },
    "resp_vercel4236_prompt_blocked": {
        "status": "error",
        "finish_reason": None,
        "model_version": "gemini-1.5-flash-002",
        "usage": usage(prompt_tokens=12559, total_tokens=12559),
        "error": {"stage": "blocked", "message": "the prompt was blocked: PROHIBITED_CONTENT"},
    },
}


def test_every_recorded_response_has_an_expectation() -> None:
    assert sorted(EXPECTED) == recorded.RESPONSES


@pytest.mark.parametrize("future", [False, True], ids=["as-recorded", "future-fields"])
@pytest.mark.parametrize("read", READERS, ids=["file", "inline"])
@pytest.mark.parametrize("name", recorded.RESPONSES)
def test_recorded_response_records(name: str, read: Any, future: bool) -> None:
    entry = read(name, future=future)
    rec = record(entry, include_response=True)
    expected = {"key": "k1", "line": 3, **EXPECTED[name], "attempts": 1}
    raw = json.loads(recorded.raw(name))
    assert rec.pop("response") == (recorded.add_future_fields(raw) if future else raw)
    if name == "resp_pai_thinking_part":
        parts = raw["candidates"][0]["content"]["parts"]
        assert parts[0]["thought"] is True
        assert rec.pop("text") == parts[1]["text"]  # the answer only, not the thought
    assert rec == expected
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec


@pytest.mark.parametrize("name", recorded.RESPONSES)
def test_recorded_response_without_an_echoed_key_matches_by_position(name: str) -> None:
    by_key = record(from_inline_item(name, key="k1"))
    by_position = record(from_inline_item(name, key=None))
    assert by_position == by_key


@pytest.mark.parametrize("read", READERS, ids=["file", "inline"])
def test_recorded_max_tokens_with_filter_json_is_a_parse_error_keeping_text(read: Any) -> None:
    rec = record(read("resp_pai_max_tokens_thinking_empty"), filter_json=True)
    assert rec["status"] == "error"
    assert rec["error"]["stage"] == "parse"
    assert rec["text"] == ""
    assert rec["finish_reason"] == "MAX_TOKENS"
    assert rec["usage"]["thinking_tokens"] == 2


@pytest.mark.parametrize("field", ["error", "status"])
@pytest.mark.parametrize("future", [False, True], ids=["as-recorded", "future-fields"])
def test_recorded_status_error_on_a_file_line(field: str, future: bool) -> None:
    status = recorded.load("error_pai_404_status")
    line = {"key": "k1", field: status}
    entry = answers.entry_from_obj(recorded.add_future_fields(line) if future else line)
    assert record(entry, include_response=True) == {
        "key": "k1",
        "line": 3,
        "status": "error",
        "error": {
            "stage": "request",
            "code": 404,
            "message": status["message"],
            "status": "NOT_FOUND",
        },
        "attempts": 1,
    }
    assert not is_retryable(entry)


def test_recorded_status_error_as_an_inline_item() -> None:
    item = b'{"error": ' + recorded.raw("error_pai_404_status") + b', "metadata": {"key": "k1"}}'
    job = wire.parse_operation(jsonl.parse_json(recorded.inline_operation([item])))
    entry = answers.match_inline(["k1"], job.inline_responses).entries["k1"]
    assert record(entry)["error"]["code"] == 404


# ---- raw means raw -------------------------------------------------------------------------------

SIGNATURE = re.compile(rb'"thoughtSignature"\s*:\s*"([^"]+)"')


@pytest.mark.parametrize("read", READERS, ids=["file", "inline"])
def test_include_response_keeps_base64_byte_for_byte(
    read: Any,
) -> None:
    source = recorded.raw("resp_ellmer_web_search")
    signature = SIGNATURE.search(source)
    assert signature is not None
    sent = signature.group(1)
    assert b"+" in sent and b"/" in sent  # standard base64, not the URL-safe alphabet
    rec = record(read("resp_ellmer_web_search"), include_response=True)
    written = json.dumps(rec, ensure_ascii=False).encode()
    found = SIGNATURE.findall(written)
    assert found == [sent]
    assert rec["response"] == json.loads(source)


def test_include_response_off_leaves_response_out() -> None:
    for entry in (ok("x"), from_file_line("resp_pai_safety_block")):
        assert "response" not in record(entry)


# ---- ok records ----------------------------------------------------------------------------------


def test_ok_record() -> None:
    entry = ok(
        "Paris",
        usage_metadata={
            "promptTokenCount": 12,
            "candidatesTokenCount": 40,
            "thoughtsTokenCount": 5,
            "totalTokenCount": 70,
            "cachedContentTokenCount": 3,
            "toolUsePromptTokenCount": 10,
        },
    )
    assert record(entry) == {
        "key": "k1",
        "line": 3,
        "status": "ok",
        "text": "Paris",
        "finish_reason": "STOP",
        "model_version": "gemini-2.5-flash-001",
        "usage": {
            "prompt_tokens": 12,
            "output_tokens": 40,
            "thinking_tokens": 5,
            "total_tokens": 70,
            "cached_tokens": 3,
            "tool_prompt_tokens": 10,
        },
        "attempts": 1,
    }


def test_text_joins_answer_parts_and_leaves_thoughts_out() -> None:
    entry = Entry(
        "k1",
        response(
            {"text": "let me think", "thought": True},
            {"text": "Hello, ", "thoughtSignature": "ab+/"},
            {"functionCall": {"name": "f", "args": {}}},
            {"text": "world", "thought": False},
            {"text": 5},
            "junk",
        ),
        None,
    )
    assert record(entry)["text"] == "Hello, world"
    assert records.answer_text({"candidates": [{"content": {"parts": [{"text": "a"}]}}]}) == "a"
    assert records.answer_text({}) is None
    assert records.answer_text({"candidates": [{"finishReason": "STOP"}]}) == ""


def test_usage_is_left_out_when_the_api_sent_none() -> None:
    assert "usage" not in record(ok("x"))
    assert records.usage({}) is None
    assert records.usage({"usageMetadata": "x"}) is None


def test_usage_counts_are_integers_and_absent_ones_zero() -> None:
    meta = {"promptTokenCount": "7", "candidatesTokenCount": "abc", "totalTokenCount": None}
    counts = record(ok("x", usage_metadata=meta))["usage"]
    assert counts == usage(prompt_tokens=7)
    assert all(type(v) is int for v in counts.values())
    assert records.usage({"usageMetadata": {}}) == ZERO_USAGE


def test_odd_shapes_never_raise() -> None:
    odd_responses: list[dict[str, Any]] = [
        {},
        {"candidates": "x"},
        {"candidates": [None]},
        {"candidates": [{"content": "x", "finishReason": 5}]},
        {"candidates": [{"content": {"parts": {"text": "x"}}}]},
        {"promptFeedback": "x"},
        {"promptFeedback": {"blockReason": 3}},
        {"modelVersion": 5, "usageMetadata": [1]},
    ]
    for body in odd_responses:
        rec = record(Entry("k1", body, None), filter_json=True, include_response=True)
        assert rec["status"] in ("ok", "error")
        json.dumps(rec, allow_nan=False)


# ---- blocked answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(records.BLOCKING_FINISH_REASONS))
def test_blocking_finish_reason_without_text_is_blocked(reason: str) -> None:
    meta = {"promptTokenCount": 4, "totalTokenCount": 4}
    for parts in ([], [{"text": "  \n"}], [{"text": "thinking", "thought": True}]):
        rec = record(Entry("k1", response(*parts, finish=reason, usage_metadata=meta), None))
        assert rec["status"] == "error"
        assert rec["error"]["stage"] == "blocked"
        assert reason in rec["error"]["message"]
        assert rec["finish_reason"] == reason
        assert rec["usage"] == usage(prompt_tokens=4, total_tokens=4)
        assert rec["model_version"] == "gemini-2.5-flash-001"
        assert "text" not in rec


@pytest.mark.parametrize("reason", sorted(records.BLOCKING_FINISH_REASONS))
def test_blocking_finish_reason_with_text_is_an_answer(reason: str) -> None:
    rec = record(ok("partial answer", finish=reason))
    assert (rec["status"], rec["text"], rec["finish_reason"]) == ("ok", "partial answer", reason)


@pytest.mark.parametrize(
    "reason", ["STOP", "MAX_TOKENS", "MALFORMED_FUNCTION_CALL", "BRAND_NEW_REASON", None]
)
def test_other_finish_reasons_without_text_are_ok(reason: str | None) -> None:
    rec = record(Entry("k1", response(finish=reason), None))
    assert (rec["status"], rec["text"], rec["finish_reason"]) == ("ok", "", reason)


def test_blocked_message_names_finish_message_and_categories() -> None:
    ratings = [
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True},
        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "LOW"},
    ]
    body = response(
        finish="PROHIBITED_CONTENT",
        finishMessage="The response was blocked by policy.",
        safetyRatings=ratings,
    )
    rec = record(Entry("k1", body, None))
    assert rec["error"] == {
        "stage": "blocked",
        "message": "the answer was withheld: PROHIBITED_CONTENT (HARM_CATEGORY_HARASSMENT): "
        "The response was blocked by policy.",
    }


def test_prompt_blocked_names_the_reason_message_and_categories() -> None:
    body = {
        "promptFeedback": {
            "blockReason": "SAFETY",
            "blockReasonMessage": "Prompt blocked.",
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "blocked": True}],
        },
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    rec = record(Entry("k1", body, None), include_response=True)
    assert rec == {
        "key": "k1",
        "line": 3,
        "status": "error",
        "error": {
            "stage": "blocked",
            "message": "the prompt was blocked: SAFETY (HARM_CATEGORY_DANGEROUS_CONTENT): "
            "Prompt blocked.",
        },
        "finish_reason": None,
        "model_version": None,
        "usage": usage(prompt_tokens=8, total_tokens=8),
        "response": body,
        "attempts": 1,
    }


def test_no_candidate_without_a_block_reason_is_a_request_error() -> None:
    bodies: list[dict[str, Any]] = [{"candidates": []}, {"usageMetadata": {"promptTokenCount": 2}}]
    for body in bodies:
        rec = record(Entry("k1", body, None))
        assert rec["status"] == "error"
        assert rec["error"] == {"stage": "request", "message": "the response has no candidate"}
    assert record(Entry("k1", {"usageMetadata": {}}, None))["usage"] == ZERO_USAGE


# ---- error records -------------------------------------------------------------------------------


def test_request_error_record() -> None:
    error = {"code": 400, "message": "Bad prompt", "status": "INVALID_ARGUMENT"}
    assert record(Entry("k1", None, error), attempts=2) == {
        "key": "k1",
        "line": 3,
        "status": "error",
        "error": {
            "stage": "request",
            "code": 400,
            "message": "Bad prompt",
            "status": "INVALID_ARGUMENT",
        },
        "attempts": 2,
    }


def test_request_error_without_details() -> None:
    rec = record(Entry("k1", None, {}))
    assert rec["error"] == {"stage": "request", "message": "the request failed"}
    rec = record(Entry("k1", None, None))
    assert rec["error"]["stage"] == "request"
    assert "neither" in rec["error"]["message"]


def test_missing_record() -> None:
    assert record(None, attempts=3) == {
        "key": "k1",
        "line": 3,
        "status": "error",
        "error": {"stage": "missing", "message": records.MISSING_MESSAGE},
        "attempts": 3,
    }


def test_invalid_record_keeps_a_readable_key() -> None:
    assert records.invalid_record(4, "r", "no prompt") == {
        "key": "r",
        "line": 4,
        "status": "error",
        "error": {"stage": "invalid", "message": "no prompt"},
        "attempts": 0,
    }
    assert records.invalid_record(5, None, "not valid JSON")["key"] is None


def test_job_failed_record() -> None:
    assert records.job_failed_record("a", 2, "the batch job expired", 1) == {
        "key": "a",
        "line": 2,
        "status": "error",
        "error": {"stage": "job", "message": "the batch job expired"},
        "attempts": 1,
    }


def test_attempts_on_every_record() -> None:
    entries: list[Entry | None] = [
        ok("x"),
        ok("not json"),
        Entry("k1", None, {"code": 500}),
        None,
        from_file_line("resp_pai_safety_block"),
    ]
    for entry in entries:
        assert record(entry, filter_json=True, attempts=4)["attempts"] == 4


# ---- filter_json ---------------------------------------------------------------------------------


def test_json_present_only_with_filter_json() -> None:
    assert "json" not in record(ok('{"a": 1}'))
    rec = record(ok('```json\n{"a": [1, 2,],}\n```'), filter_json=True)
    assert rec["status"] == "ok"
    assert rec["json"] == {"a": [1, 2]}
    assert rec["text"].startswith("```json")


def test_parse_error_keeps_text_usage_and_finish_reason() -> None:
    rec = record(
        ok("I cannot answer that.", usage_metadata={"totalTokenCount": 3}), filter_json=True
    )
    assert rec["status"] == "error"
    assert rec["error"]["stage"] == "parse"
    assert rec["error"]["message"]
    assert rec["text"] == "I cannot answer that."
    assert "json" not in rec
    assert rec["usage"] == usage(total_tokens=3)
    assert rec["finish_reason"] == "STOP"
    assert rec["model_version"] == "gemini-2.5-flash-001"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('\u00a0\u2003{"a": 1}\u3000\n', {"a": 1}),  # white space JSON does not know
        ("\ufeff[1]", [1]),
        ("42", 42),
        ('"s"', "s"),
        ("null", None),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ("```\n[1, 2]\n```", [1, 2]),
        ('Here you go:\n```json\n{"a": 1}\n```\nAnything else?', {"a": 1}),
        ('The answer is {"a": "b"} as requested.', {"a": "b"}),
        ('Result: ["x", "y"] done', ["x", "y"]),
        ('{"a": [1, 2,],}', {"a": [1, 2]}),
        ("[1, 2, 3,]", [1, 2, 3]),
        ('Sure:\n```json\n{"echo":"a","words":3,}\n```\nLet me know.', {"echo": "a", "words": 3}),
        ('{"text": "has [brackets] and {braces}"}', {"text": "has [brackets] and {braces}"}),
    ],
)
def test_parse_json_text_repairs(text: str, value: Any) -> None:
    assert parse_json_text(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "I cannot help with that.",
        "The capital of France is Paris.",
        "I think [this] is it",
        "maybe {not json} here",
        "a lone { brace",
        "NaN",
        '{"a": NaN}',
        "[1, Infinity]",
        '{"deep": [[[-Infinity]]]}',
    ],
)
def test_parse_json_text_rejects_prose_and_non_finite_numbers(text: str) -> None:
    with pytest.raises(ValueError):
        parse_json_text(text)


@pytest.mark.parametrize(
    "text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000]
)
def test_parse_json_text_deep_nesting_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_json_text(text)
    rec = record(ok(text), filter_json=True)
    assert rec["error"]["stage"] == "parse"


# ---- is_retryable --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        ({"code": 429, "message": "quota"}, True),
        ({"code": 500}, True),
        ({"code": 503}, True),
        ({"code": 504}, True),
        ({"status": "RESOURCE_EXHAUSTED"}, True),
        ({"status": "INTERNAL"}, True),
        ({"status": "UNAVAILABLE"}, True),
        ({"status": "DEADLINE_EXCEEDED"}, True),
        ({"code": 14, "message": "unavailable (rpc code)"}, True),
        ({"code": 8}, True),
        ({"code": 400, "status": "INVALID_ARGUMENT"}, False),
        ({"code": 404, "status": "NOT_FOUND"}, False),
        ({"code": 403}, False),
        ({"code": 3}, False),
        ({"message": "the request failed"}, False),
        ({}, False),
    ],
)
def test_is_retryable(error: dict[str, Any], retryable: bool) -> None:
    assert is_retryable(Entry("k", None, error)) is retryable


def test_is_retryable_reads_string_codes_through_wire() -> None:
    assert is_retryable(answers.entry_from_obj({"key": "k", "status": {"code": "503"}}))


def test_answers_are_never_retryable() -> None:
    assert not is_retryable(from_file_line("resp_pai_safety_block"))  # blocked
    assert not is_retryable(ok("not json"))  # parse errors come from answers
    assert not is_retryable(Entry("k", None, None))


# ---- Tally ---------------------------------------------------------------------------------------


def test_tally() -> None:
    tally = Tally()
    tally.add(record(ok("a", usage_metadata={"promptTokenCount": 2, "totalTokenCount": 5})))
    tally.add(record(ok("not json"), filter_json=True))
    tally.add(record(ok("nope"), filter_json=True))
    tally.add(record(None))
    tally.add(record(from_file_line("resp_ellmer_web_search")))
    tally.add(record(from_file_line("resp_vercel4236_prompt_blocked")))
    tally.add(records.invalid_record(9, None, "bad"))
    tally.add({"status": "error"})
    assert (tally.ok, tally.error_count, tally.total) == (2, 6, 8)
    assert tally.errors == {"parse": 2, "missing": 1, "blocked": 1, "invalid": 1, "unknown": 1}
    assert tally.tokens == {
        "prompt_tokens": 2 + 341 + 12559,
        "output_tokens": 10,
        "thinking_tokens": 499,
        "total_tokens": 5 + 850 + 12559,
        "cached_tokens": 92,
        "tool_prompt_tokens": 0,
    }
    assert tally.as_dict() == {
        "ok": 2,
        "errors": 6,
        "errors_by_stage": tally.errors,
        "tokens": tally.tokens,
    }


# ---- plain_record: the usual answer decoded straight into its record ----------------------------


def _variants() -> list[dict[str, Any]]:
    """Responses in the usual shape and in every way a line may step out of it."""
    base = response(
        {"text": "A "},
        {"text": "thought", "thought": True},
        {"text": "B", "thoughtSignature": "x"},
        usage_metadata={"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
    )
    json_text = response({"text": '```json\n{"a": [1, 2,]}\n```'})
    variants: list[dict[str, Any]] = [
        base,
        recorded.add_future_fields(base),
        json_text,
        response({"text": "no json here"}),
        response({"text": "[1, NaN]"}),
        response({"text": ""}, finish="SAFETY"),
        response({"text": "kept"}, finish="SAFETY"),
        response({"text": " "}, finish="MAX_TOKENS"),
        response(finish="STOP"),
        response({"text": "x"}, finish=""),
        response({"text": "x"}, finish=None, model_version=None),
        response({"text": "x"}, model_version=""),
        response({"text": "x"}, model_version=7),
        response({"text": 5}, {"text": "y"}),
        response({"inlineData": {"data": "AA=="}}, {"text": "y"}),
        response("not a part"),
        response({"text": "x", "thought": "yes"}),
        response({"text": "x", "thought": 0}),
        response({"text": None}, {"text": "y"}),
        response({"text": "x"}, usage_metadata={"promptTokenCount": -4, "totalTokenCount": "9"}),
        response({"text": "x"}, usage_metadata={"promptTokenCount": 2**70}),
        response(
            {"text": "x"}, usage_metadata={"promptTokenCount": 2.0, "thoughtsTokenCount": True}
        ),
        response({"text": "x"}, usage_metadata={"promptTokenCount": None}),
        {"candidates": [], "promptFeedback": {"blockReason": "SAFETY"}},
        {"candidates": [{"content": None, "finishReason": "STOP"}]},
        {"candidates": [{"content": {"parts": None}}]},
        {"candidates": [{"content": "text"}]},
        {"candidates": ["x"]},
        {"candidates": [{"content": {"parts": [{"text": "a"}]}}, "second is not an object"]},
        {"candidates": None, "usageMetadata": None},
        {"candidates": {"0": {}}},
        {"usageMetadata": []},
    ]
    return variants


LINES = [
    *(json.dumps({"key": "k1", "response": body}).encode() for body in _variants()),
    *(recorded.file_line("k1", recorded.raw(name)) for name in recorded.RESPONSES),
    b'{"key": "k1", "response": null, "error": {"code": 429}}',
    b'{"key": "k1", "response": "text"}',
    b'{"key": "k1", "error": {"code": 500, "message": "boom"}}',
    b'{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "\\ud800"}]}}]}}',
    b'{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "\\u00e9\\ud83d\\ude00"}]}}]}}',
    b'{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "a"}]}}], "candidates": []}}',
    b'{"key": "k1", "response": {"candidates": [{"content"',
    b'{"key": "k1", "response": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
    b"[1, 2]",
    # not UTF-8 in a field the typed reading skips: no parser reads the line
    b'{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "hi"}]},'
    b' "safetyRatings": [{"category": "\xff"}]}]}}',
    b'{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "caf\xe9"}]}}]}}',
]


@pytest.mark.parametrize("filter_json", [False, True], ids=["text", "filter_json"])
@pytest.mark.parametrize("raw", LINES, ids=range(len(LINES)))
def test_plain_record_is_the_record_of_the_whole_line_or_none(
    raw: bytes, filter_json: bool
) -> None:
    answer = records.decode_answer(raw)
    fast = None
    if answer is not None:
        assert answer.key == "k1"
        fast = records.plain_record(answer, "k1", 3, filter_json=filter_json, attempts=2)
    try:
        value = orjson.loads(raw)  # as answers read a line
    except orjson.JSONDecodeError:
        value = None
    entry = answers.entry_from_obj(value, "k1") if isinstance(value, dict) else None
    whole = record_for("k1", 3, entry, filter_json=filter_json, include_response=False, attempts=2)
    if fast is not None:
        assert fast == whole
        assert list(fast) == list(whole)  # the same field order too
        assert jsonl.dumps(fast) == jsonl.dumps(whole)


def test_plain_record_takes_the_usual_answers() -> None:
    usual = [LINES[0], LINES[1], LINES[2]] + [
        recorded.file_line("k1", recorded.raw(n)) for n in recorded.RESPONSES if "block" not in n
    ]
    for raw in usual:
        answer = records.decode_answer(raw)
        assert answer is not None, raw[:80]
        assert records.plain_record(answer, "k1", 3, filter_json=False) is not None, raw[:80]
