"""daemon.simulator's Vertex AI mode and Cloud Storage emulator, through the real clients only:
google-genai in Vertex mode with service-account credentials (whose token endpoint is the
simulator's), google-cloud-storage against the emulator, and a few raw HTTP calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_errors
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from google.genai import errors, types
from google.oauth2 import service_account

from daemon import cli
from daemon.simulator import Fault, StorageEmulator, VertexSimulator
from daemon.simulator import cli as simulator_cli
from tests.conftest import stop_soon
from tests.support.harness import ROOT, FakeClock
from tests.support.vertex import (
    LOCATION,
    PROJECT,
    credentials_from_key,
    service_account_info,
    vertex_client,
    write_service_account_key,
)

BUCKET = "batchd-staging"
INPUT = f"gs://{BUCKET}/in/input.jsonl"
OUTPUT = f"gs://{BUCKET}/out/predictions/"
MODEL = "gemini-2.5-flash"
NUMBER = "123456789012"
JOBS = f"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs"
JSON = dict[str, Any]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage() -> Iterator[StorageEmulator]:
    """One emulator for the module, emptied by `gcs_emulator` for each test."""
    with StorageEmulator() as emulator:
        yield emulator


@pytest.fixture
def gcs_emulator(storage: StorageEmulator) -> StorageEmulator:
    """The module's emulator, emptied, with the staging bucket."""
    storage.wipe()
    storage.create_bucket(BUCKET)
    return storage


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(gcs_emulator: StorageEmulator, clock: FakeClock) -> Iterator[VertexSimulator]:
    simulator = VertexSimulator(gcs_emulator, clock=clock, seed=7).start()
    yield simulator
    stop_soon(simulator)


@pytest.fixture
def credentials(tmp_path: Path, sim: VertexSimulator) -> service_account.Credentials:
    return credentials_from_key(write_service_account_key(tmp_path, sim.token_uri))


@pytest.fixture
def client(sim: VertexSimulator, credentials: service_account.Credentials) -> Any:
    return vertex_client(sim, credentials)


# ---- helpers ----------------------------------------------------------------------------------


def line(key: str, text: str = "hello", **siblings: Any) -> JSON:
    """An input line as the daemon writes it: the request, its key beside it."""
    request = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    return {"request": request, "gemini_batchd_key": f"k:{key}", **siblings}


def upload(emulator: StorageEmulator, lines: list[Any], uri: str = INPUT) -> str:
    """Put an input file in place through the storage client; each item a JSON value or bytes."""
    data = b"".join(
        (item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in lines
    )
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    emulator.client().bucket(bucket).blob(name).upload_from_string(data)
    return uri


def create(client: Any, uri: str = INPUT, name: str = "job", **config: Any) -> types.BatchJob:
    job: types.BatchJob = client.batches.create(
        model=MODEL, src=uri, config={"dest": OUTPUT, "display_name": name, **config}
    )
    return job


def rest(client: Any, method: str, path: str, body: JSON | None = None) -> Any:
    """A raw REST call through the SDK's own HTTP client (path relative to the location)."""
    response = client._api_client.request(method, path, body or {})
    return json.loads(response.body) if response.body else None


def job_body() -> JSON:
    """A batchPredictionJobs.create body as the REST reference shows it."""
    return {
        "displayName": "d",
        "model": f"publishers/google/models/{MODEL}",
        "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [INPUT]}},
        "outputConfig": {
            "predictionsFormat": "jsonl",
            "gcsDestination": {"outputUriPrefix": OUTPUT},
        },
    }


def job_path(job: types.BatchJob) -> str:
    return f"batchPredictionJobs/{(job.name or '').rsplit('/', 1)[-1]}"


def raw(sim: VertexSimulator, path: str, *, token: str | None = "t", method: str = "GET") -> Any:
    """(status, JSON) of a plain urllib call."""
    request = urllib.request.Request(sim.base_url + path, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def predictions(emulator: StorageEmulator, output_dir: str) -> dict[str, list[JSON]]:
    """Every prediction file in a job's output folder, read through the storage client."""
    bucket, _, folder = output_dir.removeprefix("gs://").partition("/")
    found = emulator.client().list_blobs(bucket, prefix=folder + "/")
    return {
        blob.name.rsplit("/", 1)[-1]: [json.loads(x) for x in blob.download_as_text().splitlines()]
        for blob in found
    }


def api_error(call: Any) -> errors.APIError:
    with pytest.raises(errors.APIError) as caught:
        call()
    return caught.value


# ---- the SDK against the simulator ------------------------------------------------------------


def test_service_account_flow_and_the_sdks_typed_methods(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [line("1"), line("2")])
    sim.pending_seconds, sim.running_seconds = 10, 20
    job = create(client, name="file-a")
    assert job.state == types.JobState.JOB_STATE_PENDING
    pattern = rf"projects/{NUMBER}/locations/{LOCATION}/batchPredictionJobs/\d{{19}}"
    assert re.fullmatch(pattern, job.name or "")
    assert job.model == f"publishers/google/models/{MODEL}"
    assert job.src and job.src.gcs_uri == [INPUT] and job.dest and job.dest.gcs_uri == OUTPUT
    assert job.completion_stats is None and job.output_info is None

    clock.advance(20)
    running = client.batches.get(name=job.name)
    assert running.state == types.JobState.JOB_STATE_RUNNING
    assert running.completion_stats and running.completion_stats.incomplete_count == 1
    assert running.output_info and running.start_time and not running.end_time
    listed = list(client.batches.list(config={"page_size": 10}))
    assert [j.name for j in listed] == [job.name]

    assert client.batches.cancel(name=job.name) is None
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_CANCELLING
    clock.advance(sim.cancelling_seconds)
    cancelled = client.batches.get(name=job.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    assert cancelled.error and (cancelled.error.code, cancelled.error.message) == (1, "CANCELED")
    assert cancelled.completion_stats is None
    deleted = client.batches.delete(name=job.name)
    assert deleted.done and (deleted.name or "").startswith(f"projects/{NUMBER}/")
    assert api_error(lambda: client.batches.get(name=job.name)).code == 404

    # One token for the whole session, and a Bearer on every call.
    assert sim.token_requests == 1 and sim.issued_tokens == ["ya29.sim-1"]
    assert sim.authorizations and set(sim.authorizations) == {"Bearer ya29.sim-1"}
    assert all("/v1beta1/projects/" in path for _, path, _ in sim.requests_log[1:])
    assert (sim.create_calls, sim.jobs_created_for("file-a")) == (1, 1)


def test_v1_and_any_project_or_location_in_the_path(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, credentials: Any
) -> None:
    upload(gcs_emulator, [line("1")])
    client = vertex_client(sim, credentials, version="v1", project="other", location="europe-west4")
    job = create(client)
    assert (job.name or "").startswith(f"projects/{NUMBER}/locations/europe-west4/")
    assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_SUCCEEDED
    assert sim.requests_log[-1][1].startswith("/v1/projects/other/locations/europe-west4/")


def test_job_json_over_time(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [line(str(i)) for i in range(4)])
    sim.queued_seconds, sim.pending_seconds, sim.running_seconds = 1, 2, 4
    sim.null_completion_stats = True
    created = rest(client, "post", "batchPredictionJobs", job_body())
    assert created["state"] == "JOB_STATE_QUEUED" and created["completionStats"] is None
    assert created["modelVersionId"] == "1" and created["createTime"] == created["updateTime"]
    path = f"batchPredictionJobs/{created['name'].rsplit('/', 1)[-1]}"
    clock.advance(1)
    assert rest(client, "get", path)["state"] == "JOB_STATE_PENDING"
    clock.advance(3)
    running = rest(client, "get", path)
    assert running["state"] == "JOB_STATE_RUNNING"
    assert running["completionStats"] == {"successfulCount": "1", "incompleteCount": "3"}
    folder = running["outputInfo"]["gcsOutputDirectory"]
    assert folder.startswith(OUTPUT + "prediction-model-") and folder.endswith("Z")
    stamp = folder.removeprefix(OUTPUT + "prediction-model-")
    folder_time = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    create_time = datetime.strptime(created["createTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert 0 < (folder_time - create_time).total_seconds() < 0.1  # a few ms later
    assert "endTime" not in running and running["startTime"] > running["createTime"]
    clock.advance(3)
    done = rest(client, "get", path)
    assert done["state"] == "JOB_STATE_SUCCEEDED" and done["completionStats"] == {
        "successfulCount": "4"
    }
    assert done["endTime"] == done["updateTime"] > done["startTime"]


# ---- predictions ------------------------------------------------------------------------------


def test_predictions_are_shaped_like_vertex_output(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    parts = [
        {"text": "What is in this picture?"},
        {"fileData": {"fileUri": "gs://x/cat.png", "mimeType": "image/png"}},
    ]
    lines = [line(str(i), f"question {i}", custom_id="007", n="1.5") for i in range(20)]
    lines.append(
        {
            "request": {
                "contents": [{"parts": parts, "role": "user"}],
                "generationConfig": {"temperature": 1.0, "max_output_tokens": 10},
                "system_instruction": {"parts": [{"text": "Be brief."}]},
            },
            "gemini_batchd_key": "k:20",
            "custom_id": "k:7",
        }
    )
    upload(gcs_emulator, lines)
    job = client.batches.get(name=create(client).name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    files = predictions(gcs_emulator, job.output_info.gcs_output_directory)
    assert list(files) == ["predictions.jsonl"]
    out = files["predictions.jsonl"]
    keys = [x["gemini_batchd_key"] for x in out]
    assert sorted(keys) == sorted(f"k:{i}" for i in range(21))
    assert keys != [f"k:{i}" for i in range(21)]  # shuffled: not the input order

    first = next(x for x in out if x["gemini_batchd_key"] == "k:3")
    assert list(first) == [
        "gemini_batchd_key", "custom_id", "n", "status", "processed_time", "request", "response",
    ]  # fmt: skip
    assert (first["custom_id"], first["n"], first["status"]) == (7, 1.5, "")  # coerced
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["processed_time"])
    # Re-serialized: keys sorted; null for the fields other parts of the job have.
    assert first["request"] == {
        "contents": [{"parts": [{"fileData": None, "text": "question 3"}], "role": "user"}]
    }
    response = first["response"]
    assert list(response) == sorted(response) == [
        "candidates", "createTime", "modelVersion", "responseId", "usageMetadata",
    ]  # fmt: skip
    assert response["modelVersion"] == MODEL and len(response["responseId"]) == 23
    assert response["usageMetadata"]["trafficType"] == "ON_DEMAND"
    assert "serviceTier" not in response["usageMetadata"]
    candidate = response["candidates"][0]
    assert candidate["content"]["parts"][0]["text"] == "Simulated answer: question 3"
    assert candidate["avgLogprobs"] < 0 and candidate["finishReason"] == "STOP"

    last = next(x for x in out if x["gemini_batchd_key"] == "k:20")
    assert last["custom_id"] == "k:7"  # not numeric: kept
    assert last["request"] == {
        "contents": [
            {
                "parts": [
                    {"fileData": None, "text": "What is in this picture?"},
                    {"fileData": {"fileUri": "gs://x/cat.png", "mimeType": "image/png"},
                     "text": None},
                ],
                "role": "user",
            }
        ],
        "generationConfig": {"max_output_tokens": 10, "temperature": 1},
        "system_instruction": {"parts": [{"text": "Be brief."}]},  # another field: no nulls
    }  # fmt: skip


RECORDED_OK = (
    '{"status":"","processed_time":"2025-09-19T21:29:47.352+00:00","request":{"contents":[{"parts"'
    ':[{"text":"Hello world!"}],"role":"user"}],"generationConfig":{"max_output_tokens":10},'
    '"system_instruction":{"parts":[{"text":"You are a helpful assistant."}]}},"response":{'
    '"candidates":[{"avgLogprobs":-0.48079710006713866,"content":{"parts":[{"text":"Hello there! '
    'It\'s nice to meet you"}],"role":"model"},"finishReason":"MAX_TOKENS"}],"createTime":'
    '"2025-09-19T21:29:47.484619Z","modelVersion":"gemini-2.5-flash-lite","responseId":'
    '"S8vNaIvKHdvshMIP_aOtuAg","usageMetadata":{"candidatesTokenCount":10,"candidatesTokensDetails"'
    ':[{"modality":"TEXT","tokenCount":10}],"promptTokenCount":9,"promptTokensDetails":[{"modality"'
    ':"TEXT","tokenCount":9}],"totalTokenCount":19,"trafficType":"ON_DEMAND"}}}'
)
RECORDED_ERROR = (
    '{"status":"Bad Request: {\\"error\\": {\\"code\\": 400, \\"message\\": \\"Please use a '
    'valid role: user, model.\\", \\"status\\": \\"INVALID_ARGUMENT\\"}}","processed_time":'
    '"2025-07-09T19:57:43.558+00:00","request":{"contents":[{"parts":[{"text":"Explain how AI works '
    'in a few words"}],"role":"tester"}]},"response":{}}'
)
"""Prediction lines Vertex AI wrote (tests/payloads/vertex: LiteLLM's docs, Google's docs)."""


def shape(value: Any, path: str = "") -> set[str]:
    """Every key path of a JSON value (list items share a path)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{path}.{k}", *shape(v, f"{path}.{k}")}}
    if isinstance(value, list):
        return {p for item in value for p in shape(item, f"{path}[]")}
    return set()


def test_predictions_match_the_recorded_samples(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    ok, error = json.loads(RECORDED_OK), json.loads(RECORDED_ERROR)
    upload(gcs_emulator, [{"request": ok["request"]}, {"request": error["request"]}])
    job = client.batches.get(name=create(client).name)
    (out,) = predictions(gcs_emulator, job.output_info.gcs_output_directory).values()
    mine_ok, mine_error = sorted(out, key=lambda x: x["status"])
    assert list(mine_error) == list(error) and list(mine_ok) == list(ok)
    assert {**mine_error, "processed_time": None} == {**error, "processed_time": None}
    assert mine_ok["request"] == ok["request"]
    assert shape(ok) <= shape(mine_ok)
    extra = shape(mine_ok) - shape(ok)
    assert extra == {".response.candidates[].content.parts[].thoughtSignature"}


def test_numeric_strings_kept_and_input_order_on_request(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    sim.coerce_numeric_strings, sim.shuffle_output = False, False
    upload(gcs_emulator, [line(str(i), custom_id="007") for i in range(5)])
    job = client.batches.get(name=create(client).name)
    (out,) = predictions(gcs_emulator, job.output_info.gcs_output_directory).values()
    assert [x["gemini_batchd_key"] for x in out] == [f"k:{i}" for i in range(5)]
    assert {x["custom_id"] for x in out} == {"007"}


def test_predictions_split_over_files_and_arriving_late(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    sim.prediction_files, sim.predictions_lag_seconds, sim.running_seconds = 3, 30, 5
    upload(gcs_emulator, [line(str(i)) for i in range(10)])
    job = create(client)
    clock.advance(5)
    ended = client.batches.get(name=job.name)
    folder = ended.output_info.gcs_output_directory
    assert ended.state == types.JobState.JOB_STATE_SUCCEEDED
    assert list(predictions(gcs_emulator, folder)) == ["predictions_00001-of-00003.jsonl"]
    clock.advance(29)
    client.batches.get(name=job.name)
    assert len(predictions(gcs_emulator, folder)) == 1  # still only the first
    clock.advance(1)
    client.batches.list()  # listing observes the job too
    files = predictions(gcs_emulator, folder)
    assert list(files) == [f"predictions_0000{i}-of-00003.jsonl" for i in (1, 2, 3)]
    keys = [x["gemini_batchd_key"] for lines in files.values() for x in lines]
    assert sorted(keys) == sorted(f"k:{i}" for i in range(10))
    assert all(files.values())

    sim.prediction_files = 1  # one file arriving late: an empty folder first
    job = create(client)
    clock.advance(5)
    folder = client.batches.get(name=job.name).output_info.gcs_output_directory
    assert predictions(gcs_emulator, folder) == {}
    clock.advance(30)
    client.batches.get(name=job.name)
    assert list(predictions(gcs_emulator, folder)) == ["predictions.jsonl"]
    assert list(sim.predictions(job.name or "")) == ["predictions.jsonl"]


def test_failed_requests_and_partial_success(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    sim.fail_keys = {"2": 429}
    sim.fail_keys_times = {"3": (503, 1)}
    sim.missing_keys = {"4"}
    sim.partial_on_errors = True
    bad_role = {"request": {"contents": [{"role": "tester", "parts": [{"text": "Explain"}]}]},
                "gemini_batchd_key": "k:6"}  # fmt: skip
    upload(gcs_emulator, [line("1"), line("2"), line("3"), line("4"),
                          line("5", "x [[sim:error=500]]"), bad_role])  # fmt: skip
    job = client.batches.get(name=create(client).name)
    assert job.state == types.JobState.JOB_STATE_PARTIALLY_SUCCEEDED
    stats = job.completion_stats
    assert stats and (stats.successful_count, stats.failed_count) == (2, 4)
    (out,) = predictions(gcs_emulator, job.output_info.gcs_output_directory).values()
    by_key = {x["gemini_batchd_key"]: x for x in out}
    assert sorted(by_key) == ["k:1", "k:2", "k:3", "k:5", "k:6"]  # k:4 left out
    assert by_key["k:1"]["status"] == "" and by_key["k:1"]["response"]["candidates"]
    assert by_key["k:6"]["status"] == (
        'Bad Request: {"error": {"code": 400, "message": "Please use a valid role: user, '
        'model.", "status": "INVALID_ARGUMENT"}}'
    )
    assert by_key["k:6"]["response"] == {}
    phrases = {k: by_key[k]["status"].split(": {")[0] for k in ("k:2", "k:3", "k:5")}
    assert phrases == {
        "k:2": "Too Many Requests",
        "k:3": "Service Unavailable",
        "k:5": "Internal Server Error",
    }
    error = json.loads(by_key["k:2"]["status"].removeprefix("Too Many Requests: "))["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert sim.key_submissions == {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1}

    retry = client.batches.get(name=create(client, name="again").name)  # k:3 fails only once
    assert retry.completion_stats and retry.completion_stats.failed_count == 3

    sim.fail_keys, sim.missing_keys, sim.partial_on_errors = {}, set(), False
    sim.outcome = "PARTIALLY_SUCCEEDED"
    upload(gcs_emulator, [line("1")])
    forced = client.batches.get(name=create(client).name)
    assert forced.state == types.JobState.JOB_STATE_PARTIALLY_SUCCEEDED


# ---- the import rules -------------------------------------------------------------------------


def nested(levels: int) -> JSON:
    value: JSON = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"inner": value}
    return value


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (b"[1, 2]", "not a JSON object"),
        (b"not json", "invalid JSON"),
        ({**line("x"), "meta": {}}, "empty object"),
        ({"request": {**line("x")["request"], "generationConfig": {}}}, "empty object"),
        ({**line("x"), "deep": nested(16)}, "nested deeper than 15"),
        ({**line("x"), "bad-name": 1}, 'invalid field name "bad-name"'),
        ({**line("x"), "grid": [[1, 2]]}, "nested arrays"),
    ],
)
def test_one_bad_line_fails_the_whole_job(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, bad: Any, problem: str
) -> None:
    upload(gcs_emulator, [line("1"), line("2"), bad, line("4")])
    job = client.batches.get(name=create(client).name)
    assert job.state == types.JobState.JOB_STATE_FAILED
    assert job.error and job.error.code == 3 and job.error.message
    assert "line 3" in job.error.message and problem in job.error.message
    assert INPUT in job.error.message
    assert job.output_info is None and job.completion_stats is None


def test_import_limits_and_a_missing_input(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [{**line("ok"), "deep": nested(15)}])  # 15 levels: fine
    assert client.batches.get(name=create(client).name).state.name == "JOB_STATE_SUCCEEDED"

    sim.max_requests_per_job = 2
    upload(gcs_emulator, [line("1"), line("2"), line("3")])
    too_many = client.batches.get(name=create(client).name)
    assert too_many.error and too_many.error.code == 3 and "limit" in (too_many.error.message or "")
    sim.max_requests_per_job, sim.max_input_bytes = 200_000, 10
    too_big = client.batches.get(name=create(client).name)
    assert too_big.error and too_big.error.code == 3 and "1 GB" in (too_big.error.message or "")

    sim.pending_seconds = 5
    missing = create(client, uri=f"gs://{BUCKET}/in/nothing.jsonl")
    assert missing.state == types.JobState.JOB_STATE_PENDING  # the create itself succeeds
    clock.advance(5)
    failed = client.batches.get(name=missing.name)
    assert failed.state == types.JobState.JOB_STATE_FAILED and failed.error
    assert failed.error.code == 5
    assert f"gs://{BUCKET}/in/nothing.jsonl not found" in (failed.error.message or "")


def test_create_validation(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    upload(gcs_emulator, [line("1")])
    missing = api_error(
        lambda: client.batches.create(
            model="gemini-does-not-exist", src=INPUT, config={"dest": OUTPUT}
        )
    )
    assert missing.code == 404 and missing.status == "NOT_FOUND"
    assert missing.message == (
        f"Publisher Model `projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"
        "gemini-does-not-exist` not found."
    )
    body = job_body()
    for change, words in [
        ({"inputConfig": None}, "input_config; Message: Required field is not set."),
        ({"outputConfig": {"predictionsFormat": "jsonl"}}, "gcs_destination"),
        ({"inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": ["/tmp/x"]}}},
         "Invalid Cloud Storage URI"),
        ({"model": "gemini-2.5-flash"}, "Invalid model name"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "Too many labels"),
        ({"labels": {"Upper": "v"}}, "Invalid label key"),
        ({"labels": {"9lives": "v"}}, "Invalid label key"),
        ({"labels": {"ok": "Not Ok"}}, "Invalid label value"),
        ({"surprise": 1}, 'Unknown name "surprise"'),
    ]:  # fmt: skip
        error = api_error(
            lambda c=change: rest(client, "post", "batchPredictionJobs", {**body, **c})
        )
        assert (error.code, error.status) == (400, "INVALID_ARGUMENT"), change
        assert words in (error.message or ""), (change, error.message)
    assert sim.create_calls == 10 and sim.jobs == {}

    labels = {f"k{i}": "v" for i in range(64)} | {"batchd-claim": "abc_1-2"}
    labels.pop("k0")
    made = rest(client, "post", "batchPredictionJobs", {**body, "labels": labels})
    assert made["labels"] == labels
    labelled = vertex_client(sim, client._api_client._credentials,
                             extra_body={"labels": {"team": "batchd"}})  # fmt: skip
    job = create(labelled, name="with-labels")
    assert rest(client, "get", job_path(job))["labels"] == {"team": "batchd"}


# ---- authentication and permissions ----------------------------------------------------------


def test_calls_need_a_bearer_token(sim: VertexSimulator, client: Any, clock: FakeClock) -> None:
    status, body = raw(sim, f"/v1beta1/{JOBS}", token=None)
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    assert body["error"]["message"].startswith(
        "Request is missing required authentication credential."
    )
    assert raw(sim, f"/v1beta1/{JOBS}", token="anything")[0] == 200
    sim.strict_tokens = True
    status, body = raw(sim, f"/v1beta1/{JOBS}", token="anything")
    assert status == 401 and body["error"]["message"].startswith(
        "Request had invalid authentication credentials."
    )
    assert list(client.batches.list()) == []  # a token of its own: accepted
    assert raw(sim, "/v1beta1/projects/p/locations/l/unknown")[0] == 404
    assert raw(sim, f"/v2/{JOBS}")[0] == 404


def test_rejection_windows_and_billing(sim: VertexSimulator, client: Any, clock: FakeClock) -> None:
    sim.reject_key(401, seconds=30)
    error = api_error(lambda: list(client.batches.list()))
    assert (error.code, error.status) == (401, "UNAUTHENTICATED")
    assert (error.message or "").startswith("Request had invalid authentication credentials.")
    clock.advance(30)
    assert list(client.batches.list()) == []

    sim.reject_key(403, seconds=10)
    error = api_error(lambda: list(client.batches.list()))
    assert (error.code, error.status) == (403, "PERMISSION_DENIED")
    assert error.message == (
        "Permission 'aiplatform.batchPredictionJobs.list' denied on resource "
        f"'//aiplatform.googleapis.com/projects/{PROJECT}/locations/{LOCATION}' "
        "(or it may not exist)."
    )
    (info,) = error.details["error"]["details"]
    assert (
        info["reason"] == "IAM_PERMISSION_DENIED" and info["domain"] == "aiplatform.googleapis.com"
    )
    assert info["metadata"] == {"permission": "aiplatform.batchPredictionJobs.list"}
    status, body = raw(sim, f"/v1beta1/{JOBS}", method="POST")
    assert status == 403 and "'aiplatform.batchPredictionJobs.create'" in body["error"]["message"]
    sim.accept_key()

    sim.billing_disabled = True
    error = api_error(lambda: list(client.batches.list()))
    assert (error.code, error.status) == (403, "PERMISSION_DENIED")
    assert (error.message or "").startswith(
        f"This API method requires billing to be enabled. Please enable billing on project #{NUMBER}"
    )
    assert error.details["error"]["details"][0]["reason"] == "BILLING_DISABLED"
    sim.billing_disabled = False

    sim.project, sim.location = PROJECT, LOCATION
    assert list(client.batches.list()) == []
    assert (
        raw(sim, f"/v1beta1/projects/{NUMBER}/locations/{LOCATION}/batchPredictionJobs")[0] == 200
    )
    assert raw(sim, "/v1beta1/projects/other/locations/us-central1/batchPredictionJobs")[0] == 403
    assert (
        raw(sim, f"/v1beta1/projects/{PROJECT}/locations/asia-east1/batchPredictionJobs")[0] == 403
    )


def test_token_endpoint(sim: VertexSimulator, tmp_path: Path, clock: FakeClock) -> None:
    sim.reject_tokens(seconds=60)
    creds = credentials_from_key(write_service_account_key(tmp_path, sim.token_uri))
    with pytest.raises(auth_errors.RefreshError, match="invalid_grant"):
        list(vertex_client(sim, creds).batches.list())
    clock.advance(60)
    creds = credentials_from_key(write_service_account_key(tmp_path, sim.token_uri))
    assert list(vertex_client(sim, creds).batches.list()) == []
    assert sim.token_requests == 2 and sim.issued_tokens == ["ya29.sim-1"]

    def token(form: bytes) -> tuple[int, JSON]:
        request = urllib.request.Request(sim.token_uri, data=form, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    grant = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    assert token(grant + b"&assertion=a.b.c") == (
        200,
        {"access_token": "ya29.sim-2", "expires_in": 3599, "token_type": "Bearer"},
    )
    assert token(grant + b"&assertion=a.b")[1]["error"] == "invalid_grant"
    assert token(b"grant_type=password&assertion=a.b.c")[1]["error"] == "unsupported_grant_type"
    assert service_account_info(sim.token_uri)["token_uri"] == f"{sim.base_url}/token"


# ---- faults, listing, cancelling, forced states -----------------------------------------------


def test_faults_match_the_request_path(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    upload(gcs_emulator, [line("1")])
    sim.add_fault(Fault("POST", "batchPredictionJobs", status=503))
    error = api_error(lambda: create(client))
    assert (error.code, error.status) == (503, "UNAVAILABLE")
    assert sim.create_calls == 1 and sim.jobs == {}
    sim.add_fault(Fault("POST", "batchPredictionJobs", status=500, after=True))
    assert api_error(lambda: create(client, name="lost")).code == 500
    assert sim.jobs_created_for("lost") == 1  # the job exists; its reply was lost
    sim.add_fault(Fault.reset(path_contains="/token"))
    other = vertex_client(sim, credentials_from_key_copy(client))
    with pytest.raises(auth_errors.TransportError):
        list(other.batches.list())


def credentials_from_key_copy(client: Any) -> service_account.Credentials:
    """Fresh credentials (no token yet) from the same key as `client`'s."""
    current: service_account.Credentials = client._api_client._credentials
    fresh: service_account.Credentials = current.with_scopes(list(current.scopes or []))
    return fresh


def test_listing_filters_and_pages(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [line("1")])
    sim.pending_seconds = 100
    names: dict[str, str] = {}
    for display, labels in [
        ("batchd-a-1", {"batchd-claim": "a"}),
        ("batchd-a-2", {"batchd-claim": "a", "team": "x"}),
        ("batchd-b-1", {"batchd-claim": "b"}),
        ("other", {}),
    ]:
        body = {"labels": labels} if labels else {}
        made = vertex_client(sim, client._api_client._credentials, extra_body=body or None)
        names[display] = create(made, name=display).name or ""
        clock.advance(1)
    sim.set_job_state(names["other"], "SUCCEEDED")

    def listed(filter_: str | None = None) -> list[str]:
        config = {"filter": filter_} if filter_ else {}
        return [j.display_name or "" for j in client.batches.list(config=config)]

    assert listed() == ["other", "batchd-b-1", "batchd-a-2", "batchd-a-1"]  # newest first
    assert listed('display_name="batchd-a-1"') == ["batchd-a-1"]
    assert listed('displayName="other"') == ["other"]
    assert listed('display_name:"batchd-a-*"') == ["batchd-a-2", "batchd-a-1"]
    assert listed('labels.batchd-claim="a"') == ["batchd-a-2", "batchd-a-1"]
    assert listed('labels.batchd-claim="a" AND labels.team="x"') == ["batchd-a-2"]
    assert listed('state="JOB_STATE_SUCCEEDED"') == ["other"]
    assert listed('state!="JOB_STATE_SUCCEEDED" AND display_name:"batchd-b*"') == ["batchd-b-1"]
    assert listed("labels.team:*") == ["batchd-a-2"]
    for unsupported in ['create_time>"2024-01-01T00:00:00Z"', 'display_name="a" OR state="x"',
                        'display_name:"a*b"', "state=JOB_STATE_NONSENSE"]:  # fmt: skip
        error = api_error(lambda f=unsupported: listed(f))
        assert (error.code, error.status) == (400, "INVALID_ARGUMENT"), unsupported

    first = rest(client, "get", "batchPredictionJobs?pageSize=3")
    assert [j["displayName"] for j in first["batchPredictionJobs"]] == listed()[:3]
    second = rest(
        client, "get", f"batchPredictionJobs?pageSize=3&pageToken={first['nextPageToken']}"
    )
    assert [j["displayName"] for j in second["batchPredictionJobs"]] == ["batchd-a-1"]
    assert "nextPageToken" not in second
    assert rest(client, "get", 'batchPredictionJobs?filter=display_name%3D"none"') == {}

    sim.list_lag_seconds = 5
    create(client, name="new")
    assert "new" not in listed()
    clock.advance(5)
    assert listed()[0] == "new"


def test_cancel_delete_and_forced_states(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [line("1"), line("2")])
    sim.pending_seconds, sim.running_seconds, sim.cancelling_seconds = 1, 10, 3
    job = create(client)
    clock.advance(2)
    delete_running = api_error(lambda: client.batches.delete(name=job.name))
    assert (delete_running.code, delete_running.status) == (400, "FAILED_PRECONDITION")
    assert rest(client, "post", f"{job_path(job)}:cancel") == {}
    clock.advance(2.9)
    assert rest(client, "get", job_path(job))["state"] == "JOB_STATE_CANCELLING"
    assert rest(client, "post", f"{job_path(job)}:cancel") == {}  # again: still fine
    clock.advance(0.1)
    cancelled = rest(client, "get", job_path(job))
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and "completionStats" not in cancelled
    assert cancelled["error"] == {"code": 1, "message": "CANCELED"}
    ended = api_error(lambda: client.batches.cancel(name=job.name))
    assert (ended.code, ended.status) == (400, "FAILED_PRECONDITION")
    operation = rest(client, "delete", job_path(job))
    assert operation["done"] is True
    assert re.fullmatch(
        rf"projects/{NUMBER}/locations/{LOCATION}/operations/\d+", operation["name"]
    )

    job = create(client)
    for state in ("PAUSED", "UPDATING", "JOB_STATE_CANCELLING", "RUNNING"):
        sim.set_job_state(job.name or "", state)
        shown = rest(client, "get", job_path(job))["state"]
        assert shown == "JOB_STATE_" + state.removeprefix("JOB_STATE_")
    sim.set_job_state(job.name or "", "FAILED", "quota exhausted")
    assert rest(client, "get", job_path(job))["error"] == {"code": 13, "message": "quota exhausted"}
    sim.forget_job(job.name or "")
    assert api_error(lambda: client.batches.get(name=job.name)).code == 404
    with pytest.raises(ValueError):
        sim.set_job_state("x", "DONE")

    sim.expire_after_seconds, sim.pending_seconds = 50, 100
    job = create(client)
    clock.advance(50)
    expired = client.batches.get(name=job.name)
    assert expired.state == types.JobState.JOB_STATE_EXPIRED and expired.error
    assert expired.error.code == 4 and expired.start_time is None

    sim.expire_after_seconds, sim.pending_seconds, sim.running_seconds = None, 0, 0
    sim.outcome = "FAILED"
    sim.error_details = True  # the SDK's JobError.details is list[str]: read it raw
    failed = rest(client, "get", job_path(create(client)))
    assert failed["state"] == "JOB_STATE_FAILED" and failed["error"]["code"] == 13
    (detail,) = failed["error"]["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert detail["domain"] == "aiplatform.googleapis.com" and detail["reason"]


def test_extra_fields_everywhere(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any
) -> None:
    sim.extra_fields = True
    upload(gcs_emulator, [line("1")])
    job = client.batches.get(name=create(client).name)  # the SDK ignores what it does not know
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert "futureField" in rest(client, "get", job_path(job))["outputInfo"]
    (out,) = predictions(gcs_emulator, job.output_info.gcs_output_directory).values()
    assert "futureField" in out[0] and "futureField" in out[0]["response"]["candidates"][0]


# ---- the storage emulator ---------------------------------------------------------------------


def test_storage_preconditions(gcs_emulator: StorageEmulator) -> None:
    bucket = gcs_emulator.client().bucket(BUCKET)
    bucket.blob("a/m").upload_from_string(b"1", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("a/m").upload_from_string(b"2", if_generation_match=0)
    big = os.urandom(300 * 1024)
    bucket.blob("a/r", chunk_size=256 * 1024).upload_from_string(big, if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("a/r", chunk_size=256 * 1024).upload_from_string(big, if_generation_match=0)
    generation = gcs_emulator.generation(BUCKET, "a/m")
    assert generation is not None
    bucket.blob("a/m").upload_from_string(b"3", if_generation_match=generation)
    with pytest.raises(gexc.PreconditionFailed) as caught:
        bucket.blob("a/m").upload_from_string(b"4", if_generation_match=generation)
    assert caught.value.code == 412
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("a/m").delete(if_generation_match=generation)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("a/m").reload(if_generation_match=generation)
    with pytest.raises(gexc.NotFound):  # a missing object: 404, not 412
        bucket.blob("a/none").reload(if_generation_match=5)
    assert gcs_emulator.objects(BUCKET, "a/") == {"a/m": b"3", "a/r": big}
    fresh = gcs_emulator.generation(BUCKET, "a/m")
    bucket.blob("a/m").delete(if_generation_match=fresh)
    assert list(gcs_emulator.objects(BUCKET)) == ["a/r"]


def test_storage_faults_and_error_bodies(
    gcs_emulator: StorageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nobody there
    client = gcs_emulator.client()
    bucket = client.bucket(BUCKET)
    gcs_emulator.add_fault("POST", r"/b/batchd-staging/o/denied/", 403)
    with pytest.raises(gexc.Forbidden) as caught:
        bucket.blob("denied/x.jsonl").upload_from_string(b"x")
    assert "sa@p.iam.gserviceaccount.com does not have storage.objects.create access" in str(
        caught.value
    )
    bucket.blob("denied/x.jsonl").upload_from_string(b"x")  # times=1: fine now
    gcs_emulator.add_fault("GET", r"/o/denied/x\.jsonl$", 403, times=2, message="nope")
    with pytest.raises(gexc.Forbidden) as caught:
        bucket.blob("denied/x.jsonl").reload()
    assert caught.value.message.endswith("nope") and caught.value.errors[0]["reason"] == "forbidden"
    with pytest.raises(gexc.Forbidden):
        bucket.blob("denied/x.jsonl").download_as_bytes()
    assert bucket.blob("denied/x.jsonl").download_as_bytes() == b"x"

    with pytest.raises(gexc.NotFound) as missing_bucket:
        list(client.list_blobs("no-such-bucket"))
    assert missing_bucket.value.message.endswith("The specified bucket does not exist.")
    assert missing_bucket.value.errors[0]["reason"] == "notFound"
    with pytest.raises(gexc.NotFound) as missing_object:
        bucket.blob("none").reload()
    assert missing_object.value.message.endswith(f"No such object: {BUCKET}/none")
    with pytest.raises(gexc.NotFound):
        client.bucket("no-such-bucket").blob("x").upload_from_string(b"x")
    assert ("GET", f"/storage/v1/b/{BUCKET}/o/none?projection=noAcl&prettyPrint=false", 404) in (
        gcs_emulator.requests_log
    )
    gcs_emulator.wipe()
    assert gcs_emulator.buckets() == [] and gcs_emulator.requests_log == []


def test_storage_trouble_reaches_the_jobs(
    sim: VertexSimulator, gcs_emulator: StorageEmulator, client: Any, clock: FakeClock
) -> None:
    upload(gcs_emulator, [line("1")])
    gcs_emulator.add_fault("GET", r"/o/in/input\.jsonl$", 403)
    denied = client.batches.get(name=create(client).name)
    assert denied.error and denied.error.code == 7
    assert "storage.objects.get" in (denied.error.message or "")

    gcs_emulator.add_fault("POST", r"/o/out/predictions/prediction-model-", 503)
    job = client.batches.get(name=create(client).name)  # the first write fails ...
    folder = job.output_info.gcs_output_directory
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    client.batches.get(name=job.name)  # ... and is made again at a later look
    assert list(predictions(gcs_emulator, folder)) == ["predictions.jsonl"]

    gcs_emulator.wipe()  # no output bucket: the job fails when it starts
    gcs_emulator.create_bucket("inputs-only")
    upload(gcs_emulator, [line("1")], uri="gs://inputs-only/in.jsonl")
    failed = client.batches.get(name=create(client, uri="gs://inputs-only/in.jsonl").name)
    assert failed.error and failed.error.code == 5 and BUCKET in (failed.error.message or "")


def test_a_simulator_owns_the_storage_it_starts(clock: FakeClock) -> None:
    with VertexSimulator(clock=clock) as simulator:
        emulator = simulator.storage
        assert emulator.running
        storage_client: gcs.Client = emulator.client()
        storage_client.create_bucket("b").blob("x").upload_from_string(b"kept")
    assert not emulator.running
    with pytest.raises(OSError):  # connection refused
        storage_client.bucket("b").blob("x").download_as_bytes(retry=None, timeout=1)
    with emulator:  # an outage: back on the same port, with the same objects
        assert storage_client.bucket("b").blob("x").download_as_bytes() == b"kept"


# ---- the `simulator --vertex` command ---------------------------------------------------------


def test_vertex_flags_set_every_knob() -> None:
    args = cli.parser().parse_args([
        "simulator", "--vertex", "--project", "p", "--location", "l", "--project-number", "42",
        "--bucket", "b1", "--bucket", "b2", "--pending-seconds", "2", "--running-seconds", "3",
        "--queued-seconds", "1", "--cancelling-seconds", "4", "--outcome", "PARTIALLY_SUCCEEDED",
        "--partial-on-errors", "--prediction-files", "3", "--predictions-lag", "5", "--in-order",
        "--keep-numeric-strings", "--strict-tokens", "--billing-disabled", "--error-details",
        "--null-completion-stats", "--fail-keys", "a=429", "--missing-keys", "m",
        "--list-lag", "6", "--expire-after", "70", "--extra-fields", "--reject-key-for", "9:401",
    ])  # fmt: skip
    sim = simulator_cli.from_args(args)
    assert isinstance(sim, VertexSimulator)
    assert (sim.project, sim.location, sim.project_number) == ("p", "l", "42")
    assert sim.storage.buckets() == ["b1", "b2"]
    assert (sim.queued_seconds, sim.pending_seconds, sim.running_seconds) == (1, 2, 3)
    assert (sim.cancelling_seconds, sim.outcome) == (4, "PARTIALLY_SUCCEEDED")
    assert sim.partial_on_errors
    assert (sim.prediction_files, sim.predictions_lag_seconds) == (3, 5)
    assert not sim.shuffle_output and not sim.coerce_numeric_strings
    assert sim.strict_tokens and sim.billing_disabled and sim.error_details
    assert sim.null_completion_stats and sim.extra_fields
    assert (sim.fail_keys, sim.missing_keys) == ({"a": 429}, {"m"})
    assert (sim.list_lag_seconds, sim.expire_after_seconds) == (6, 70)
    assert [r.status for r in sim._rejections] == [401]
    for wrong in (["--vertex", "--api-key", "k"], ["--vertex", "--shuffle"],
                  ["--outcome", "PARTIALLY_SUCCEEDED"]):  # fmt: skip
        with pytest.raises(ValueError):
            simulator_cli.from_args(cli.parser().parse_args(["simulator", *wrong]))


def test_simulator_vertex_command_prints_both_addresses() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_"))}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "daemon", "simulator", "--vertex", "--bucket", BUCKET]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            storage_line = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
            assert re.fullmatch(r"STORAGE_EMULATOR_HOST=http://127\.0\.0\.1:\d+", storage_line)
            endpoint = storage_line.removeprefix("STORAGE_EMULATOR_HOST=")
            assert endpoint != base_url
            storage_client = gcs.Client(
                project=PROJECT,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": endpoint},
            )
            assert [b.name for b in storage_client.list_buckets()] == [BUCKET]
            assert json_get(f"{base_url}/v1/{JOBS}") == (200, {})
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err


def json_get(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Bearer t")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())
