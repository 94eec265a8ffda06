"""daemon.wire: Batch API JSON -> RemoteJob / Progress / Entry, tolerant of everything but garbage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from daemon import wire
from daemon.wire import BadReply, Entry, Progress, RemoteJob
from tests import recorded


@pytest.fixture(params=["orjson", "stdlib"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every parsing test runs with orjson (when installed) and with the stdlib json module."""
    if request.param == "stdlib":
        monkeypatch.setattr(wire, "_fast_loads", None)
    elif wire._fast_loads is None:
        pytest.skip("orjson is not installed")
    yield request.param


# ---- parse_json ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("parser")
@pytest.mark.parametrize("name", recorded.ALL)
def test_parse_json_reads_every_recorded_payload(name: str) -> None:
    body = recorded.raw(name)
    assert wire.parse_json(body) == json.loads(body)
    assert wire.parse_json(body.decode()) == json.loads(body)


@pytest.mark.usefixtures("parser")
@pytest.mark.parametrize("body", [None, "", b"", "   \n", b"\r\n\t "])
def test_parse_json_empty_is_a_bad_reply(body: str | bytes | None) -> None:
    with pytest.raises(BadReply, match="empty"):
        wire.parse_json(body)


@pytest.mark.usefixtures("parser")
def test_parse_json_html_is_a_bad_reply_naming_the_page() -> None:
    page = (
        b"<!DOCTYPE html>\n<html><head><title>502 Bad\n Gateway</title></head><body>secret</body>"
    )
    with pytest.raises(BadReply, match="HTML") as info:
        wire.parse_json(page)
    assert "502 Bad Gateway" in str(info.value)
    assert "secret" not in str(info.value)  # the body itself is never quoted
    with pytest.raises(BadReply, match="HTML"):
        wire.parse_json("  <html>oops")


@pytest.mark.usefixtures("parser")
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
        wire.parse_json(body)
    assert isinstance(info.value, ValueError)


@pytest.mark.usefixtures("parser")
def test_parse_json_deep_nesting_is_a_bad_reply_not_a_recursion_error() -> None:
    with pytest.raises(BadReply):
        wire.parse_json("[" * 200_000 + "]" * 200_000)


@pytest.mark.usefixtures("parser")
def test_parse_json_keeps_big_integers_exact() -> None:
    big = 123456789012345678901234567890
    assert wire.parse_json(f'{{"a": {big}, "b": "x"}}') == {"a": big, "b": "x"}
    assert wire.parse_json(f'{{"a": {big}}}'.encode()) == {"a": big}


@pytest.mark.usefixtures("parser")
def test_parse_json_accepts_what_the_stdlib_accepts() -> None:
    assert wire.parse_json('{"t": "\\ud83d"}') == {"t": "\ud83d"}  # a lone surrogate escape
    assert wire.parse_json(b'{"a": "\xc3\xa9"}') == {"a": "é"}
    assert wire.parse_json(b"[1, 2]") == [1, 2]


def test_orjson_is_used_when_installed() -> None:
    try:
        import orjson
    except ImportError:
        pytest.skip("orjson is not installed")
    assert wire._fast_loads is orjson.loads


# ---- counts and states -----------------------------------------------------------------------


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
    assert wire.count(value) == expected


@pytest.mark.parametrize(
    ("raw", "state", "done"),
    [
        ("BATCH_STATE_PENDING", "JOB_STATE_PENDING", False),
        ("BATCH_STATE_RUNNING", "JOB_STATE_RUNNING", False),
        ("BATCH_STATE_SUCCEEDED", "JOB_STATE_SUCCEEDED", True),
        ("BATCH_STATE_FAILED", "JOB_STATE_FAILED", True),
        ("BATCH_STATE_CANCELLED", "JOB_STATE_CANCELLED", True),
        ("BATCH_STATE_EXPIRED", "JOB_STATE_EXPIRED", True),
        ("JOB_STATE_SUCCEEDED", "JOB_STATE_SUCCEEDED", True),
        ("JOB_STATE_CANCELLING", "JOB_STATE_CANCELLING", False),
        ("batch_state_succeeded", "JOB_STATE_SUCCEEDED", True),
        ("BATCH_STATE_PAUSED", "JOB_STATE_PAUSED", False),
        ("BATCH_STATE_UNSPECIFIED", "JOB_STATE_UNSPECIFIED", False),
        ("SUCCEEDED", "JOB_STATE_SUCCEEDED", True),
        ("", "JOB_STATE_UNSPECIFIED", False),
        (None, "JOB_STATE_UNSPECIFIED", False),
        (7, "JOB_STATE_UNSPECIFIED", False),
        ("BATCH_STATE_", "JOB_STATE_UNSPECIFIED", False),
    ],
)
def test_states(raw: Any, state: str, done: bool) -> None:
    job = wire.parse_operation({"name": "batches/x", "metadata": {"state": raw}})
    assert (job.state, job.done) == (state, done)
    assert job.succeeded is (state == "JOB_STATE_SUCCEEDED")


# ---- parse_operation -----------------------------------------------------------------------------


def test_recorded_running_inline_operation() -> None:
    job = wire.parse_operation(recorded.load("op_inline_running_zh"))
    assert job == RemoteJob(
        name="batches/4m855v7q30kc7gtzcigdg9m72o87s08w33vp",
        state="JOB_STATE_RUNNING",
        done=False,
        display_name="test-batch-job",
        create_time="2025-12-10T18:27:01.407650525Z",
        progress=Progress(total=3, succeeded=0, failed=0, pending=3),
    )
    assert job.progress is not None
    assert job.progress.as_dict() == {"succeeded": 0, "failed": 0, "pending": 3, "total": 3}
    assert job.progress.done == 0


def test_recorded_succeeded_file_operation() -> None:
    job = wire.parse_operation(recorded.load("op_file_succeeded_delphi"))
    assert job == RemoteJob(
        name="batches/leg9wy9p5df66syjxke2eq4xfjqcwp47ejv3",
        state="JOB_STATE_SUCCEEDED",
        done=True,
        display_name="my batch name",
        create_time="2026-01-06T11:09:11.943530657Z",
        progress=Progress(total=2, succeeded=2, failed=0, pending=0),
        responses_file="files/batch-leg9wy9p5df66syjxke2eq4xfjqcwp47ejv3",
    )  # error_code and error_message None


@pytest.mark.parametrize("name", recorded.OPERATIONS)
def test_unknown_fields_everywhere_change_nothing(name: str) -> None:
    plain = recorded.load(name)
    assert wire.parse_operation(recorded.add_future_fields(plain)) == wire.parse_operation(plain)


def test_unknown_fields_in_an_inline_operation_are_kept_in_the_raw_items() -> None:
    item = recorded.inline_item("a", recorded.raw("resp_pai_thinking_part"))
    op = recorded.add_future_fields(json.loads(recorded.inline_operation([item])))
    job = wire.parse_operation(op)
    assert job.done and job.succeeded
    assert job.inline_responses is not None and len(job.inline_responses) == 1
    assert job.inline_responses[0]["futureField"] == recorded.FUTURE["futureField"]
    assert job.inline_responses[0]["response"]["usageMetadata"]["futureField"]


@pytest.mark.parametrize("state", ["FAILED", "CANCELLED", "EXPIRED"])
def test_error_is_read_for_every_final_state(state: str) -> None:
    op = {
        "name": "batches/x",
        "metadata": {"state": f"BATCH_STATE_{state}"},
        "done": True,
        "error": {"code": "13", "message": f"{state.lower()} by the API", "details": []},
    }
    job = wire.parse_operation(op)
    assert job.done
    assert (job.error_code, job.error_message) == (13, f"{state.lower()} by the API")


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ({"code": 3}, 3, None),
        ({"message": "m"}, None, "m"),
        ({"code": "x", "message": ""}, None, None),
        ("plain text", None, "plain text"),
        ([1, 2], None, None),
        (None, None, None),
    ],
)
def test_odd_operation_errors(error: Any, code: int | None, message: str | None) -> None:
    job = wire.parse_operation({"name": "batches/x", "metadata": {}, "error": error})
    assert (job.error_code, job.error_message) == (code, message)


def test_inline_output_from_metadata_or_response() -> None:
    items = [{"response": {"candidates": []}, "metadata": {"key": "k"}}]
    wrapped = {"inlinedResponses": {"inlinedResponses": items}}
    in_metadata = {"name": "batches/x", "metadata": {"output": wrapped}}
    in_response = {"name": "batches/x", "metadata": {}, "response": wrapped}
    assert wire.parse_operation(in_metadata).inline_responses == items
    assert wire.parse_operation(in_response).inline_responses == items
    # The API leaves an empty list out: an empty wrapper means no entries, not "no output".
    empty = {"name": "batches/x", "metadata": {"output": {"inlinedResponses": {}}}}
    assert wire.parse_operation(empty).inline_responses == []
    assert wire.parse_operation({"name": "batches/x"}).inline_responses is None
    odd = {"inlinedResponses": {"inlinedResponses": [items[0], "junk", 3]}}
    odd_job = wire.parse_operation({"name": "batches/x", "metadata": {"output": odd}})
    assert odd_job.inline_responses == [items[0], {}, {}]  # positions kept
    assert (
        wire.parse_operation(
            {"name": "b/x", "metadata": {"output": {"inlinedResponses": {"inlinedResponses": 5}}}}
        ).inline_responses
        == []
    )


def test_responses_file_from_metadata_or_response() -> None:
    out = {"responsesFile": "files/batch-1"}
    assert wire.parse_operation({"name": "b/1", "metadata": {"output": out}}).responses_file == (
        "files/batch-1"
    )
    assert wire.parse_operation({"name": "b/1", "response": out}).responses_file == (
        "files/batch-1"
    )
    assert wire.parse_operation(
        {"name": "b/1", "response": {"responsesFile": 5}}
    ).responses_file is (None)


def test_progress_absent_partial_or_odd() -> None:
    def progress(stats: Any) -> Progress | None:
        return wire.parse_operation({"name": "b/1", "metadata": {"batchStats": stats}}).progress

    assert wire.parse_operation({"name": "b/1", "metadata": {}}).progress is None
    assert progress("3") is None
    assert progress([1]) is None
    assert progress({}) == Progress(0, 0, 0, 0)
    assert progress({"requestCount": "10", "failedRequestCount": 2}) == Progress(10, 0, 2, 0)
    assert progress({"requestCount": "ten", "successfulRequestCount": {"n": 1}}) == Progress(
        0, 0, 0, 0
    )
    assert progress(
        {"requestCount": "5", "successfulRequestCount": "3", "pendingRequestCount": "2"}
    ) == Progress(total=5, succeeded=3, failed=0, pending=2)


def test_a_bare_batch_resource_is_read_too() -> None:
    job = wire.parse_operation(
        {
            "name": "batches/x",
            "state": "BATCH_STATE_SUCCEEDED",
            "displayName": "d",
            "output": {"responsesFile": "files/f"},
            "batchStats": {"requestCount": "1"},
        }
    )
    assert (job.state, job.display_name, job.responses_file) == (
        "JOB_STATE_SUCCEEDED",
        "d",
        "files/f",
    )
    assert job.progress == Progress(1, 0, 0, 0)


def test_name_from_metadata_when_the_top_level_has_none() -> None:
    assert wire.parse_operation({"metadata": {"name": "batches/m"}}).name == "batches/m"


@pytest.mark.parametrize(
    "obj", [None, [], "batches/x", 5, {}, {"name": ""}, {"name": 5}, {"metadata": "x"}]
)
def test_unusable_operations_are_bad_replies(obj: Any) -> None:
    with pytest.raises(BadReply):
        wire.parse_operation(obj)


def test_wrongly_typed_fields_are_ignored() -> None:
    job = wire.parse_operation(
        {
            "name": "batches/x",
            "metadata": {
                "state": ["BATCH_STATE_RUNNING"],
                "displayName": 5,
                "createTime": {},
                "output": [1],
                "batchStats": {"requestCount": None},
            },
            "response": "nope",
            "done": "yes",
        }
    )
    assert job == RemoteJob(
        name="batches/x", state="JOB_STATE_UNSPECIFIED", done=False, progress=Progress(0, 0, 0, 0)
    )


# ---- parse_job_list ------------------------------------------------------------------------------


def test_parse_job_list() -> None:
    page = {
        "operations": [
            recorded.load("op_inline_running_zh"),
            {"metadata": {"state": "BATCH_STATE_RUNNING"}},  # no name: skipped
            "junk",
            recorded.load("op_file_succeeded_delphi"),
        ],
        "nextPageToken": "tok",
    }
    jobs, token = wire.parse_job_list(recorded.add_future_fields(page))
    assert [j.name for j in jobs] == [
        "batches/4m855v7q30kc7gtzcigdg9m72o87s08w33vp",
        "batches/leg9wy9p5df66syjxke2eq4xfjqcwp47ejv3",
    ]
    assert token == "tok"


@pytest.mark.parametrize(
    ("page", "count", "token"),
    [
        ({}, 0, None),
        ({"operations": []}, 0, None),
        ({"operations": None, "nextPageToken": ""}, 0, None),
        ({"operations": {"a": 1}}, 0, None),
        ({"batches": [{"name": "batches/b"}], "nextPageToken": "t"}, 1, "t"),
        ({"operations": [{"name": "batches/a"}], "nextPageToken": 5}, 1, None),
    ],
)
def test_parse_job_list_shapes(page: dict[str, Any], count: int, token: str | None) -> None:
    jobs, next_token = wire.parse_job_list(page)
    assert (len(jobs), next_token) == (count, token)


@pytest.mark.parametrize("obj", [None, [], "x", 3])
def test_parse_job_list_not_an_object(obj: Any) -> None:
    with pytest.raises(BadReply):
        wire.parse_job_list(obj)


# ---- entries -------------------------------------------------------------------------------------


def test_entry_from_a_responses_file_line_keeps_the_response_object() -> None:
    response = recorded.load("resp_ellmer_web_search")
    obj = {"key": "a1", "response": response}
    entry = wire.entry_from_obj(obj)
    assert entry == Entry(key="a1", response=response, error=None)
    assert entry.response is response  # raw: not copied, not re-serialised


def test_entry_from_an_inline_item() -> None:
    item = {"response": {"candidates": []}, "metadata": {"key": "k7", "other": 1}}
    assert wire.entry_from_obj(item) == Entry("k7", {"candidates": []}, None)


@pytest.mark.parametrize("field", ["error", "status"])
def test_entry_error_as_error_or_status(field: str) -> None:
    status = recorded.load("error_pai_404_status")
    entry = wire.entry_from_obj(recorded.add_future_fields({"key": "a", field: status}))
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
    assert wire.entry_from_obj({"key": "a", "error": raw}).error == {
        "code": 429,
        "message": "slow down",
        "status": "RESOURCE_EXHAUSTED",
        "details": details,
    }
    assert wire.entry_from_obj({"error": "boom"}).error == {"message": "boom"}
    assert wire.entry_from_obj({"error": {"code": True, "message": 5}}).error == {}
    assert wire.entry_from_obj({"error": [1]}).error is None
    # "error" wins over "status" when both are there.
    both = {"error": {"code": 500}, "status": {"code": 404}}
    assert wire.entry_from_obj(both).error == {"code": 500}


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
    assert wire.entry_key(obj) == key
    assert wire.entry_from_obj(obj).key == key


def test_entry_with_an_odd_response() -> None:
    assert wire.entry_from_obj({"key": "a", "response": "text"}) == Entry("a", None, None)
    assert wire.entry_from_obj({"key": "a", "response": None, "error": None}) == Entry(
        "a", None, None
    )


@pytest.mark.usefixtures("parser")
def test_line_key() -> None:
    assert wire.line_key(b'{"key": "a", "response": {}}\n') == "a"
    assert wire.line_key(b'{"key": 5}') == "5"
    assert wire.line_key(b'{"metadata": {"key": "m"}}') == "m"
    assert wire.line_key(b'{"response": {}, "key": "late"}') == "late"
    assert wire.line_key(b'{"key": "esc\\"aped", "response": {}}') == 'esc"aped'
    assert wire.line_key(b'{"response": {}}') is None
    assert wire.line_key(b"[1]") is None
    assert wire.line_key(b"garbage") is None
    assert wire.line_key(b"") is None
    assert wire.line_key(b"\xff\xfe") is None
    assert wire.line_key(recorded.file_line("k", recorded.raw("resp_pai_thinking_part"))) == "k"


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
    match = wire.match_inline(keys, [item("c", "C"), item("a", "A"), item("b", "B")])
    assert not match.by_position
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "A", "b": "B", "c": "C"}


def test_match_inline_by_position_when_no_key_came_back() -> None:
    keys = ["a", "b", "c"]
    match = wire.match_inline(keys, [item(None, "A"), item(None, "B"), item(None, "C")])
    assert match.by_position
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "A", "b": "B", "c": "C"}


def test_match_inline_without_keys_and_other_counts_matches_nothing() -> None:
    match = wire.match_inline(["a", "b", "c"], [item(None, "A"), item(None, "B")])
    assert (match.entries, match.by_position) == ({}, False)
    match = wire.match_inline(["a"], [item(None, "A"), item(None, "B")])
    assert (match.entries, match.by_position) == ({}, False)


def test_match_inline_mixed_keys_match_by_key_only() -> None:
    match = wire.match_inline(["a", "b"], [item(None, "A"), item("b", "B")])
    assert not match.by_position
    assert list(match.entries) == ["b"]


def test_match_inline_first_wins_and_strangers_are_ignored() -> None:
    items = [item("a", "first"), item("x", "stranger"), item("a", "second")]
    match = wire.match_inline(["a", "b"], items)
    assert {k: text_of(e) for k, e in match.entries.items()} == {"a": "first"}


def test_match_inline_nothing() -> None:
    assert wire.match_inline(["a"], None) == wire.InlineMatch({}, False)
    assert wire.match_inline(["a"], []) == wire.InlineMatch({}, False)
    assert wire.match_inline([], []) == wire.InlineMatch({}, False)


def test_match_inline_reads_error_items_and_unknown_fields() -> None:
    items = recorded.add_future_fields(
        [item(None, "A"), {"error": recorded.load("error_pai_404_status")}]
    )
    match = wire.match_inline(["a", "b"], items)
    assert match.by_position
    assert match.entries["b"].error is not None
    assert match.entries["b"].error["code"] == 404
