"""daemon.api.vertex, its pure parts: Vertex's input lines, prediction lines read back as
answers, jobs and lists read tolerantly, and the import rules checked at validation -- against
the payloads recorded from Vertex AI (shared/payloads/vertex). The engine's calls run against
the simulator in tests/system/test_vertex.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon import jsonl
from daemon.api import RemoteState, vertex
from daemon.config import VertexSettings
from daemon.errors import BadReply, ConfigError
from tests.support.vertex import write_service_account_key

PAYLOADS = Path(__file__).resolve().parents[1] / "payloads" / "vertex"


def test_a_request_line_becomes_a_vertex_line_with_its_key_beside_the_request() -> None:
    raw = b'{"key":"007","request":{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"generationConfig":{}}}\n'
    line = json.loads(vertex.vertex_line(raw))
    assert line == {
        "request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},  # {} dropped
        "gemini_batchd_key": "k:007",  # prefixed: Vertex may coerce "007" to 7
    }


def test_numbers_too_long_for_64_bits_stay_exact() -> None:
    raw = b'{"key":"a","request":{"contents":[],"n":123456789012345678901234567890}}\n'
    assert b"123456789012345678901234567890" in vertex.vertex_line(raw)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"contents": [{"parts": [{"text": "x"}]}]}, None),
        (
            {"generationConfig": {"responseSchema": {"properties": {"first-name": {}}}}},
            "first-name",
        ),
        ({"a b": 1}, "'a b'"),
        ({"1st": 1}, "'1st'"),
        ({"x": {}}, None),
        ({"contents": [[{"text": "x"}]]}, "a list in a list"),
        ({"stopSequences": ["a", None]}, "a null in a list"),
    ],
)
def test_the_import_rules_name_what_would_fail_a_job(
    body: dict[str, Any], problem: str | None
) -> None:
    found = vertex.request_problem(body)
    assert (found is None) if problem is None else (problem in (found or ""))


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_objects_nested_deeper_than_fifteen_are_refused() -> None:
    assert vertex.request_problem(_nest(15)) is None
    assert "16 deep" in (vertex.request_problem(_nest(16)) or "")
    assert vertex.request_problem({"list": [_nest(14)]}) is None  # arrays add no level


# ---- prediction lines, as Vertex writes them ------------------------------------------------


def with_key(line: bytes, key: Any) -> bytes:
    obj = json.loads(line)
    obj["gemini_batchd_key"] = key
    return json.dumps(obj).encode()


def test_recorded_predictions_become_answers_by_key() -> None:
    lines = (PAYLOADS / "predictions-ok-gemini-2.5-flash-lite-litellm-docs.jsonl").read_bytes()
    ok = [
        json.loads(vertex.answer_line(with_key(raw, f"k:a{i}")) or b"")
        for i, raw in enumerate(lines.splitlines())
    ]
    assert [a["key"] for a in ok] == ["a0", "a1"]
    assert ok[0]["response"]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert ok[0]["response"]["usageMetadata"]["trafficType"] == "ON_DEMAND"  # unknown, kept
    assert "error" not in ok[0]


def test_a_recorded_error_status_becomes_the_request_s_error() -> None:
    raw = (PAYLOADS / "predictions-DOC-SAMPLES.DERIVED-compact.jsonl").read_bytes().splitlines()
    success, failure = (
        json.loads(vertex.answer_line(with_key(line, "k:x")) or b"") for line in raw
    )
    assert "response" in success
    assert failure["error"] == {
        "code": 400,
        "message": "Please use a valid role: user, model.",
        "status": "INVALID_ARGUMENT",
    }
    pretty = json.loads((PAYLOADS / "predictions-error-DOC-SAMPLE.pretty.json").read_text())
    pretty["gemini_batchd_key"] = "k:y"
    assert (
        json.loads(vertex.answer_line(json.dumps(pretty).encode()) or b"")["error"]["code"] == 400
    )


@pytest.mark.parametrize(
    ("key", "expected"), [("k:007", "007"), (7, "7"), ("plain", "plain"), (7.0, "7")]
)
def test_keys_come_back_from_prefixed_or_coerced_echoes(key: Any, expected: str) -> None:
    line = json.dumps({"gemini_batchd_key": key, "status": "", "response": {"candidates": []}})
    assert json.loads(vertex.answer_line(line.encode()) or b"")["key"] == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"status": "", "response": {}}',
        b'{"gemini_batchd_key": null}',
    ],
)
def test_lines_without_a_key_of_ours_are_skipped(raw: bytes) -> None:
    assert vertex.answer_line(raw) is None


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("Internal error occurred.", {"message": "Internal error occurred."}),
        ({"code": 429, "message": "slow down"}, {"code": 429, "message": "slow down"}),
        ("Too Many Requests: {broken", {"message": "Too Many Requests: {broken"}),
    ],
)
def test_odd_statuses_are_read_as_errors(status: Any, error: dict[str, Any]) -> None:
    line = json.dumps({"gemini_batchd_key": "k:a", "status": status, "response": {}})
    assert json.loads(vertex.answer_line(line.encode()) or b"")["error"] == error


PREDICTIONS = [
    *(
        with_key(line, f"k:r{n}")
        for n, line in enumerate(
            (PAYLOADS / "predictions-ok-gemini-2.5-flash-lite-litellm-docs.jsonl")
            .read_bytes()
            .splitlines()
            + (PAYLOADS / "predictions-DOC-SAMPLES.DERIVED-compact.jsonl").read_bytes().splitlines()
        )
    ),
    b'{"gemini_batchd_key": "k:a", "status": "", "response": {"candidates": []}}',
    b'{"gemini_batchd_key": "k:a", "response": {"a": 1}, "request": {"contents": []}}',
    b'{"gemini_batchd_key": "k:a", "status": null, "response": { "a" : [1, 2.50, 1e2] }}',
    b'{"gemini_batchd_key": "k:a", "status": "", "response": {}}',
    b'{"gemini_batchd_key": "k:a", "status": "", "response": { }}',
    b'{"gemini_batchd_key": "k:a", "status": "", "response": []}',
    b'{"gemini_batchd_key": "k:a", "status": "", "response": null}',
    b'{"gemini_batchd_key": "k:a", "status": "", "response": 123456789012345678901234}',
    b'{"gemini_batchd_key": "k:a", "status": "Bad Request: {}", "response": {"a": 1}}',
    b'{"gemini_batchd_key": "k:a", "status": {"code": 8}, "response": {"a": 1}}',
    b'{"gemini_batchd_key": 7, "response": {"a": 1}}',
    b'{"gemini_batchd_key": "plain", "response": {"n": 123456789012345678901234}}',
    b'{"gemini_batchd_key": "k:\\u00e9", "response": {"t": "\\ud83d\\ude00"}}',
    b'{"gemini_batchd_key": "k:a", "response": {"a": 1}, "gemini_batchd_key": "k:b"}',
    b'{"gemini_batchd_key": "k:a", "response": {"a": "\xff"}}',
    b'{"gemini_batchd_key": "k:a", "response": {"a": "caf\xc3\xa9"}}',
]


@pytest.mark.parametrize("raw", PREDICTIONS, ids=range(len(PREDICTIONS)))
def test_a_prediction_kept_as_it_came_reads_as_one_read_whole(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual prediction's response bytes are copied, not parsed and written again: the
    answers line must read the same as one made from the whole line."""
    fast = vertex.answer_line(raw)
    monkeypatch.setattr(vertex, "_PREDICTION", msgspec.json.Decoder(int))  # never decodes
    whole = vertex.answer_line(raw)
    assert (fast is None) == (whole is None)
    if fast is not None and whole is not None:
        assert jsonl.parse_json(fast) == jsonl.parse_json(whole)
        assert b"\n" not in fast


# ---- jobs -------------------------------------------------------------------------------------


def test_the_recorded_create_reply_and_a_finished_job_are_read() -> None:
    job = vertex.parse_job(
        json.loads((PAYLOADS / "job-create-response-DOC-SAMPLE.json").read_text())
    )
    assert job.state is RemoteState.PENDING and job.name.endswith(
        "/batchPredictionJobs/BATCH_JOB_ID"
    )
    assert job.progress is None and job.results is None
    text = (PAYLOADS / "job-get-response-DOC-SAMPLE.jsonc").read_text()
    got = vertex.parse_job(json.loads(text.replace("  ...\n", "")))
    assert got.progress is not None
    assert (got.progress.succeeded, got.progress.failed) == (10, 1)  # counts sent as strings


def test_a_partially_succeeded_job_is_answered_with_its_output_folder() -> None:
    job = vertex.parse_job(
        {
            "name": "projects/123/locations/us-central1/batchPredictionJobs/456",
            "state": "JOB_STATE_PARTIALLY_SUCCEEDED",
            "outputInfo": {
                "gcsOutputDirectory": "gs://b/p/prediction-model-2025-01-01T00:00:00.000Z"
            },
            "completionStats": {"successfulCount": "3"},
            "futureField": {"x": 1},
        }
    )
    assert job.state.answered and job.done
    assert job.results == "gs://b/p/prediction-model-2025-01-01T00:00:00.000Z/"
    assert job.progress is not None and (job.progress.succeeded, job.progress.failed) == (3, 0)


@pytest.mark.parametrize(
    "name",
    [
        "projects/p/locations/l/batchPredictionJobs/../../x",
        "projects/p/locations/l/batchPredictionJobs/1/extra",
        "batches/123",
        "projects/p/locations/l/customJobs/1",
    ],
)
def test_a_job_name_of_another_shape_is_a_bad_reply(name: str) -> None:
    with pytest.raises(BadReply, match="unknown shape"):
        vertex.parse_job({"name": name, "state": "JOB_STATE_RUNNING"})
    jobs, _ = vertex.parse_job_list(
        {
            "batchPredictionJobs": [
                {"name": name},
                {"name": "projects/1/locations/l/batchPredictionJobs/2"},
            ]
        }
    )
    assert [j.name for j in jobs] == ["projects/1/locations/l/batchPredictionJobs/2"]


def test_an_output_that_is_not_cloud_storage_is_a_bad_reply() -> None:
    with pytest.raises(BadReply):
        vertex.parse_job(
            {
                "name": "projects/1/locations/l/batchPredictionJobs/2",
                "outputInfo": {"gcsOutputDirectory": "/etc/passwd"},
            }
        )


def test_labels_and_staged_names_come_from_the_display_name() -> None:
    display = "gemini-batchd/My Prompts (v2).jsonl/0123456789abcdef/3f9a1b2c4d5e/r1p2a3"
    assert vertex.labels_of(display) == {
        "gemini-batchd": "file",
        "batchd-file": "my-prompts-v2-",
        "batchd-claim": "3f9a1b2c4d5e",
        "batchd-job": "r1p2a3",
    }
    assert vertex.staged_name("pre/fix", display) == (
        "pre/fix/gemini-batchd/My_Prompts_v2_.jsonl/0123456789abcdef/3f9a1b2c4d5e/r1p2a3"
    )


# ---- credentials ------------------------------------------------------------------------------


TOKEN_URI = "http://127.0.0.1:9/token"


def settings(**values: Any) -> VertexSettings:
    return VertexSettings(project="p", staging_uri="gs://bkt/x", **values)


def test_credentials_come_from_the_configured_key_file_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = write_service_account_key(tmp_path, TOKEN_URI)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nowhere.json"))
    credentials, source = vertex.find_credentials(
        settings(credentials_file=key), {"CREDENTIALS_DIRECTORY": str(other)}
    )
    assert source == f"vertex.credentials_file {key}"
    assert credentials.service_account_email.startswith("batchd@")
    assert credentials._token_uri == TOKEN_URI  # its own token endpoint is honoured


def test_then_the_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    key = write_service_account_key(tmp_path, TOKEN_URI)
    key.rename(tmp_path / "vertex_credentials")
    _, source = vertex.find_credentials(settings(), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (
        source == f"$CREDENTIALS_DIRECTORY/vertex_credentials ({tmp_path / 'vertex_credentials'})"
    )


def test_an_unusable_key_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "sa.json"
    bad.write_text('{"type": "service_account"}')
    with pytest.raises(ConfigError, match=r"^'vertex.credentials_file': cannot use .*sa.json"):
        vertex.find_credentials(settings(credentials_file=bad), {})
    with pytest.raises(ConfigError, match=r"'vertex\.credentials_file'"):
        vertex.find_credentials(settings(credentials_file=tmp_path / "missing.json"), {})


def test_a_token_is_registered_as_a_secret_once_refreshed(restore_logging: None) -> None:
    class Fake:
        token: str | None = None

        def refresh(self, request: Any) -> None:
            self.token = "ya29.a-token-long-enough-to-be-redacted"

    credentials = vertex._watched(Fake())
    assert vertex.logs.redact("ya29.a-token-long-enough-to-be-redacted") != "[redacted]"
    credentials.refresh(None)
    assert vertex.logs.redact("x ya29.a-token-long-enough-to-be-redacted y") == "x [redacted] y"
