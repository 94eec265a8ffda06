"""daemon.results: one record per request, matched by key, in input order, written atomically."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from daemon import atomic
from daemon.inputs import Defaults, LineError
from daemon.results import (
    ResponsesFileIndex,
    Tally,
    answer_text,
    invalid_record,
    line_key,
    parse_json_text,
    record_for,
    usage,
    write_error_report,
    write_results,
)

DEFAULTS = Defaults()


def response(
    *parts: dict[str, Any],
    finish: str | None = "STOP",
    usage_metadata: dict[str, Any] | None = None,
    model_version: str | None = "gemini-2.5-flash-001",
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {"candidates": [candidate]}
    if usage_metadata is not None:
        body["usageMetadata"] = usage_metadata
    if model_version is not None:
        body["modelVersion"] = model_version
    return body


def ok_entry(text: str, **kwargs: Any) -> dict[str, Any]:
    return {"response": response({"text": text}, **kwargs)}


def record(
    entry: dict[str, Any] | None, *, filter_json: bool = False, include_response: bool = False
) -> dict[str, Any]:
    return record_for("k1", 3, entry, filter_json=filter_json, include_response=include_response)


# ---- record_for --------------------------------------------------------------------------------


def test_ok_record() -> None:
    entry = ok_entry(
        "Paris",
        usage_metadata={
            "promptTokenCount": 12,
            "candidatesTokenCount": 40,
            "thoughtsTokenCount": 5,
            "totalTokenCount": 57,
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
            "total_tokens": 57,
        },
    }


def test_ok_record_has_no_json_without_filter_json() -> None:
    assert "json" not in record(ok_entry('{"a": 1}'))
    assert "response" not in record(ok_entry('{"a": 1}'))


def test_absent_usage_counts_are_zero_integers() -> None:
    rec = record(ok_entry("x", usage_metadata={"promptTokenCount": "7"}))
    assert rec["usage"] == {
        "prompt_tokens": 7,
        "output_tokens": 0,
        "thinking_tokens": 0,
        "total_tokens": 0,
    }
    assert all(type(v) is int for v in rec["usage"].values())
    assert record(ok_entry("x"))["usage"] == dict.fromkeys(
        ("prompt_tokens", "output_tokens", "thinking_tokens", "total_tokens"), 0
    )


def test_finish_reason_and_model_version_copied() -> None:
    rec = record(ok_entry("x", finish="MAX_TOKENS", model_version="m-7"))
    assert rec["finish_reason"] == "MAX_TOKENS"
    assert rec["model_version"] == "m-7"


def test_thought_parts_left_out_of_text() -> None:
    entry = {
        "response": response(
            {"text": "let me think", "thought": True},
            {"text": "Hello, "},
            {"text": "world"},
            {"functionCall": {"name": "f", "args": {}}},
        )
    }
    assert record(entry)["text"] == "Hello, world"


def test_request_error_record() -> None:
    entry = {"error": {"code": 400, "message": "Bad prompt", "status": "INVALID_ARGUMENT"}}
    assert record(entry) == {
        "key": "k1",
        "line": 3,
        "status": "error",
        "error": {"stage": "request", "code": 400, "message": "Bad prompt"},
    }


def test_request_error_without_details() -> None:
    rec = record({"error": {}})
    assert rec["error"]["stage"] == "request"
    assert "code" not in rec["error"]
    assert rec["error"]["message"]


def test_missing_record() -> None:
    rec = record(None)
    assert rec["status"] == "error"
    assert rec["error"]["stage"] == "missing"
    assert (rec["key"], rec["line"]) == ("k1", 3)


def test_no_candidate_is_a_request_error_naming_the_block_reason() -> None:
    entry = {"response": {"promptFeedback": {"blockReason": "SAFETY"}, "modelVersion": "m"}}
    rec = record(entry)
    assert rec["status"] == "error"
    assert rec["error"]["stage"] == "request"
    assert "SAFETY" in rec["error"]["message"]
    assert "text" not in rec
    rec = record({"response": {"candidates": []}})
    assert "no candidate" in rec["error"]["message"]


def test_filter_json_parses_text() -> None:
    rec = record(ok_entry('```json\n{"a": [1, 2,],}\n```'), filter_json=True)
    assert rec["status"] == "ok"
    assert rec["json"] == {"a": [1, 2]}
    assert rec["text"].startswith("```json")


def test_filter_json_parse_error_keeps_text_and_usage() -> None:
    entry = ok_entry("I cannot answer that.", usage_metadata={"totalTokenCount": 3})
    rec = record(entry, filter_json=True)
    assert rec["status"] == "error"
    assert rec["error"]["stage"] == "parse"
    assert rec["error"]["message"]
    assert rec["text"] == "I cannot answer that."
    assert "json" not in rec
    assert rec["usage"]["total_tokens"] == 3
    assert rec["finish_reason"] == "STOP"


def test_include_response_copies_the_raw_response() -> None:
    entry = ok_entry("x")
    assert record(entry, include_response=True)["response"] == entry["response"]
    blocked = {"response": {"promptFeedback": {"blockReason": "OTHER"}}}
    assert record(blocked, include_response=True)["response"] == blocked["response"]


def test_records_are_json_serialisable() -> None:
    rec = record(ok_entry('{"a": 1}'), filter_json=True, include_response=True)
    assert json.loads(json.dumps(rec)) == rec


def test_answer_text_and_usage_helpers() -> None:
    assert answer_text({}) is None
    assert answer_text({"candidates": [{"finishReason": "SAFETY"}]}) == ""
    assert usage({"usageMetadata": {"candidatesTokenCount": 4}})["output_tokens"] == 4


def test_invalid_record() -> None:
    assert invalid_record(LineError(4, "not valid JSON")) == {
        "key": None,
        "line": 4,
        "status": "error",
        "error": {"stage": "invalid", "message": "not valid JSON"},
    }


def test_tally() -> None:
    tally = Tally()
    tally.add({"status": "ok"})
    tally.add({"status": "error", "error": {"stage": "parse"}})
    tally.add({"status": "error", "error": {"stage": "parse"}})
    tally.add({"status": "error", "error": {"stage": "missing"}})
    assert (tally.ok, tally.errors, tally.total) == (1, {"parse": 2, "missing": 1}, 4)


# ---- parse_json_text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
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
    ],
)
def test_parse_json_text_rejects_prose(text: str) -> None:
    with pytest.raises(ValueError):
        parse_json_text(text)


# ---- write_results -------------------------------------------------------------------------------


def write_input(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_results_matches_by_key_in_input_order(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(50)]
    source = write_input(tmp_path, [json.dumps({"key": k, "prompt": k}).encode() for k in keys])
    entries = {k: ok_entry(f"answer {k}") for k in keys}
    shuffled = list(entries.items())
    random.Random(3).shuffle(shuffled)
    target = tmp_path / "out" / "in.jsonl"
    target.parent.mkdir()
    seen: list[int] = []
    tally = write_results(
        target, source, DEFAULTS, dict(shuffled), include_response=False, progress=seen.append
    )
    records = read_records(target)
    assert [r["key"] for r in records] == keys
    assert [r["text"] for r in records] == [f"answer {k}" for k in keys]
    assert [r["line"] for r in records] == list(range(1, 51))
    assert (tally.ok, tally.total) == (50, 50)
    assert seen == list(range(1, 51))


def test_write_results_mixed_outcomes(tmp_path: Path) -> None:
    source = write_input(
        tmp_path,
        [
            b'"first"',
            b"",
            b"broken line",
            b'{"key": "j", "prompt": "x", "filter_json": true}',
            b'{"key": "gone", "prompt": "x"}',
            b'{"key": "bad", "prompt": "x"}',
        ],
    )
    lookup = {
        "bad": {"error": {"code": 500, "message": "boom"}},
        "j": ok_entry('{"n": 1,}'),
        "1": ok_entry("one"),
        "unrelated": ok_entry("never asked for"),
    }
    target = tmp_path / "out.jsonl"
    tally = write_results(target, source, DEFAULTS, lookup, include_response=False)
    records = read_records(target)
    assert [(r["key"], r["line"], r["status"]) for r in records] == [
        ("1", 1, "ok"),
        (None, 3, "error"),
        ("j", 4, "ok"),
        ("gone", 5, "error"),
        ("bad", 6, "error"),
    ]
    assert records[1]["error"]["stage"] == "invalid"
    assert records[2]["json"] == {"n": 1}
    assert records[3]["error"]["stage"] == "missing"
    assert records[4]["error"] == {"stage": "request", "code": 500, "message": "boom"}
    assert tally.ok == 2
    assert tally.errors == {"invalid": 1, "missing": 1, "request": 1}


def test_write_results_include_response(tmp_path: Path) -> None:
    source = write_input(tmp_path, [b'"a"'])
    target = tmp_path / "out.jsonl"
    write_results(target, source, DEFAULTS, {"1": ok_entry("x")}, include_response=True)
    assert read_records(target)[0]["response"]["candidates"][0]["content"]["parts"] == [
        {"text": "x"}
    ]


def test_write_results_keeps_non_ascii(tmp_path: Path) -> None:
    source = write_input(tmp_path, [b'"a"'])
    target = tmp_path / "out.jsonl"
    write_results(target, source, DEFAULTS, {"1": ok_entry("日本")}, include_response=False)
    assert "日本" in target.read_text(encoding="utf-8")


def test_outbox_file_mode_and_no_temp_left(tmp_path: Path) -> None:
    source = write_input(tmp_path, [b'"a"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    old = os.umask(0o022)
    try:
        write_results(outbox / "in.jsonl", source, DEFAULTS, {}, include_response=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((outbox / "in.jsonl").stat().st_mode) == 0o640
    assert [p.name for p in outbox.iterdir()] == ["in.jsonl"]


def test_existing_outbox_name_is_never_overwritten(tmp_path: Path) -> None:
    source = write_input(tmp_path, [b'"a"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "in.jsonl").write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        write_results(outbox / "in.jsonl", source, DEFAULTS, {}, include_response=False)
    assert (outbox / "in.jsonl").read_text() == "someone else's\n"
    assert [p.name for p in outbox.iterdir()] == ["in.jsonl"]


def test_failure_while_writing_publishes_nothing(tmp_path: Path) -> None:
    source = write_input(tmp_path, [b'"a"', b'"b"', b'"c"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()

    class Exploding:
        def get(self, key: str, /) -> dict[str, Any] | None:
            if key == "3":
                raise RuntimeError("lookup failed")
            return ok_entry(key)

    with pytest.raises(RuntimeError):
        write_results(outbox / "in.jsonl", source, DEFAULTS, Exploding(), include_response=False)
    assert list(outbox.iterdir()) == []


def test_write_error_report(tmp_path: Path) -> None:
    report = {"input": "x.jsonl", "stage": "validation", "message": "bad", "errors": []}
    target = tmp_path / "x.error.json"
    write_error_report(target, report)
    assert json.loads(target.read_text()) == report
    assert stat.S_IMODE(target.stat().st_mode) & 0o007 == 0
    with pytest.raises(FileExistsError):
        write_error_report(target, report)


# ---- ResponsesFileIndex ------------------------------------------------------------------------


def test_responses_file_index_over_a_shuffled_file(tmp_path: Path) -> None:
    keys = [f"key-{i}" for i in range(300)]
    lines = [json.dumps({"key": k, **ok_entry(f"answer {k} é")}) for k in keys]
    lines.append(json.dumps({"key": "bad", "error": {"code": 429, "message": "quota"}}))
    lines.append(json.dumps({"metadata": {"key": "meta"}, **ok_entry("via metadata")}))
    lines += ["", "not json", json.dumps({"no": "key"}), "[1, 2]"]
    random.Random(5).shuffle(lines)
    responses = tmp_path / ".responses.tmp"
    responses.write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = ResponsesFileIndex(responses)
    try:
        for key in reversed(keys):
            entry = index.get(key)
            assert entry is not None
            assert answer_text(entry["response"]) == f"answer {key} é"
        assert index.get("bad") == {"key": "bad", "error": {"code": 429, "message": "quota"}}
        meta = index.get("meta")
        assert meta is not None and answer_text(meta["response"]) == "via metadata"
        assert index.get("absent") is None
    finally:
        index.close()
    assert not responses.with_name(responses.name + ".idx").exists()


def test_write_results_through_a_responses_file_index(tmp_path: Path) -> None:
    source = write_input(
        tmp_path, [json.dumps({"key": f"k{i}", "prompt": "p"}).encode() for i in range(20)]
    )
    lines = [json.dumps({"key": f"k{i}", **ok_entry(f"t{i}")}) for i in range(20) if i != 7]
    random.Random(1).shuffle(lines)
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(lines))  # no final newline
    index = ResponsesFileIndex(responses)
    try:
        target = tmp_path / "out.jsonl"
        tally = write_results(target, source, DEFAULTS, index, include_response=False)
    finally:
        index.close()
    records = read_records(target)
    assert [r["key"] for r in records] == [f"k{i}" for i in range(20)]
    assert records[7]["error"]["stage"] == "missing"
    assert [r.get("text") for r in records if r["status"] == "ok"] == [
        f"t{i}" for i in range(20) if i != 7
    ]
    assert tally.errors == {"missing": 1}


def test_responses_file_index_ignores_a_stale_index(tmp_path: Path) -> None:
    """An index a crash left behind must not be trusted (its spans may point anywhere)."""
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"key": "a", **ok_entry("old and long text")}) + "\n")
    # memory_bytes=0: the index goes to disk at once (as for a very large responses file).
    ResponsesFileIndex(responses, memory_bytes=0)  # never closed: as if the process was killed
    assert responses.with_name(responses.name + ".idx").exists()
    responses.write_text(
        json.dumps({"key": "b", **ok_entry("x")})
        + "\n"
        + json.dumps({"key": "a", **ok_entry("new")})
        + "\n"
    )
    index = ResponsesFileIndex(responses, memory_bytes=0)
    try:
        entry = index.get("a")
        assert entry is not None and answer_text(entry["response"]) == "new"
    finally:
        index.close()


def test_first_entry_wins_for_a_repeated_key(tmp_path: Path) -> None:
    responses = tmp_path / "r.jsonl"
    responses.write_text(
        json.dumps({"key": "a", **ok_entry("first")})
        + "\n"
        + json.dumps({"key": "a", **ok_entry("second")})
        + "\n"
    )
    index = ResponsesFileIndex(responses)
    try:
        entry = index.get("a")
        assert entry is not None and answer_text(entry["response"]) == "first"
    finally:
        index.close()


def test_line_key() -> None:
    assert line_key(b'{"key": "a", "response": {}}\n') == "a"
    assert line_key(b'{"key": 5}') == "5"
    assert line_key(b'{"metadata": {"key": "m"}}') == "m"
    assert line_key(b'{"response": {}}') is None
    assert line_key(b"[1]") is None
    assert line_key(b"garbage") is None
    assert line_key(b"\xff\xfe") is None


def test_atomic_temp_files_are_dot_files_in_the_target_folder(tmp_path: Path) -> None:
    tmp = atomic.temp_name(tmp_path / "in.jsonl")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".in.jsonl.")
