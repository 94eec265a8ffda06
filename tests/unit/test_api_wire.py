"""daemon.api.wire: Gemini batch operations -> RemoteJob / Progress, tolerant of everything but garbage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.api import Progress, RemoteJob, RemoteState, wire
from daemon.errors import BadReply
from tests.support import recorded


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
    assert (job.state_name, job.done) == (state, done)
    assert (job.state is RemoteState.SUCCEEDED) is (state == "JOB_STATE_SUCCEEDED")


# ---- parse_operation -----------------------------------------------------------------------------


def test_recorded_running_inline_operation() -> None:
    job = wire.parse_operation(recorded.load("op_inline_running_zh"))
    assert job == RemoteJob(
        name="batches/4m855v7q30kc7gtzcigdg9m72o87s08w33vp",
        state=RemoteState.RUNNING,
        state_name="JOB_STATE_RUNNING",
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
        state=RemoteState.SUCCEEDED,
        state_name="JOB_STATE_SUCCEEDED",
        display_name="my batch name",
        create_time="2026-01-06T11:09:11.943530657Z",
        progress=Progress(total=2, succeeded=2, failed=0, pending=0),
        results="files/batch-leg9wy9p5df66syjxke2eq4xfjqcwp47ejv3",
    )  # error_code and error_message None


@pytest.mark.parametrize("name", recorded.OPERATIONS)
def test_unknown_fields_everywhere_change_nothing(name: str) -> None:
    plain = recorded.load(name)
    assert wire.parse_operation(recorded.add_future_fields(plain)) == wire.parse_operation(plain)


def test_unknown_fields_in_an_inline_operation_are_kept_in_the_raw_items() -> None:
    item = recorded.inline_item("a", recorded.raw("resp_pai_thinking_part"))
    op = recorded.add_future_fields(json.loads(recorded.inline_operation([item])))
    job = wire.parse_operation(op)
    assert job.done and job.state is RemoteState.SUCCEEDED
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
            {
                "name": "batches/x",
                "metadata": {"output": {"inlinedResponses": {"inlinedResponses": 5}}},
            }
        ).inline_responses
        == []
    )


def test_responses_file_from_metadata_or_response() -> None:
    out = {"responsesFile": "files/batch-1"}
    assert wire.parse_operation({"name": "batches/1", "metadata": {"output": out}}).results == (
        "files/batch-1"
    )
    assert wire.parse_operation({"name": "batches/1", "response": out}).results == ("files/batch-1")
    assert wire.parse_operation(
        {"name": "batches/1", "response": {"responsesFile": 5}}
    ).results is (None)


def test_progress_absent_partial_or_odd() -> None:
    def progress(stats: Any) -> Progress | None:
        return wire.parse_operation(
            {"name": "batches/1", "metadata": {"batchStats": stats}}
        ).progress

    assert wire.parse_operation({"name": "batches/1", "metadata": {}}).progress is None
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
    assert (job.state, job.display_name, job.results) == (
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
        name="batches/x",
        state=RemoteState.UNSPECIFIED,
        state_name="JOB_STATE_UNSPECIFIED",
        progress=Progress(0, 0, 0, 0),
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


@pytest.mark.parametrize(
    "name",
    [
        "batches/../../v1beta/files/evil",
        "batches/a/b",
        "batches/",
        "files/abc",
        "batches/a?b=c",
        "batches/a%2Fb",
        "operations/x",
        "batches/" + "a" * 200,
    ],
)
def test_a_job_name_of_an_unknown_shape_is_a_bad_reply_not_a_job(name: str) -> None:
    with pytest.raises(BadReply, match="unknown shape"):
        wire.parse_operation({"name": name, "metadata": {"state": "BATCH_STATE_RUNNING"}})
    jobs, _ = wire.parse_job_list({"operations": [{"name": name}, {"name": "batches/ok-1_x"}]})
    assert [j.name for j in jobs] == ["batches/ok-1_x"]  # skipped in a listing


@pytest.mark.parametrize("responses", ["files/../evil", "batches/x", "files/UP"])
def test_a_responses_file_of_an_unknown_shape_is_a_bad_reply(responses: str) -> None:
    with pytest.raises(BadReply, match="responses file of an unknown shape"):
        wire.parse_operation({"name": "batches/x", "response": {"responsesFile": responses}})
