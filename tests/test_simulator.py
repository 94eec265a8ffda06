"""daemon.simulator, driven through the real google-genai SDK (plus a few raw HTTP checks)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon.simulator import Fault, Simulator
from tests.harness import FakeClock

MODEL = "gemini-2.5-flash"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Simulator]:
    with Simulator(clock=clock, seed=7) as simulator:
        yield simulator


def make_client(
    sim: Simulator, version: str = "v1beta", key: str = "k", retries: int = 0
) -> genai.Client:
    retry = None
    if retries:
        retry = types.HttpRetryOptions(
            attempts=retries, initial_delay=0.01, max_delay=0.02, jitter=0
        )
    options = types.HttpOptions(base_url=sim.base_url, api_version=version, retry_options=retry)
    return genai.Client(api_key=key, http_options=options)


@pytest.fixture
def client(sim: Simulator) -> genai.Client:
    return make_client(sim)


def inline(key: str, text: str, **config: Any) -> types.InlinedRequest:
    return types.InlinedRequest(
        contents=text, metadata={"key": key}, config=types.GenerateContentConfig(**config)
    )


def by_key(job: types.BatchJob) -> dict[str, types.InlinedResponse]:
    assert job.dest is not None and job.dest.inlined_responses is not None
    return {r.metadata["key"]: r for r in job.dest.inlined_responses if r.metadata}


def raw(sim: Simulator, path: str, key: str | None = "k", method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(sim.base_url + path, method=method)
    if key is not None:
        request.add_header("x-goog-api-key", key)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_inline_job_goes_pending_running_succeeded(
    sim: Simulator, clock: FakeClock, version: str
) -> None:
    sim.pending_seconds, sim.running_seconds = 10, 20
    client = make_client(sim, version)
    job = client.batches.create(
        model=MODEL,
        src=[inline("a", "hello there world"), inline("b", "second prompt")],
        config={"display_name": "file-1"},
    )
    assert job.name and job.name.startswith("batches/")
    assert job.state == types.JobState.JOB_STATE_PENDING and not job.done
    assert job.display_name == "file-1" and job.model == f"models/{MODEL}"

    clock.advance(10)
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_RUNNING
    clock.advance(20)
    done = client.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.done
    assert done.end_time is not None

    results = by_key(done)
    answer = results["a"].response
    assert answer is not None and answer.text == "Simulated answer: hello there world"
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.prompt_token_count == 3
    assert answer.usage_metadata.candidates_token_count == 5
    assert answer.usage_metadata.total_token_count == 8
    assert answer.model_version == f"{MODEL}-sim-001"
    assert sim.jobs[job.name]["state"] == "BATCH_STATE_SUCCEEDED"
    assert sim.requests_log[0][1] == f"/{version}/models/{MODEL}:batchGenerateContent"


def test_wire_format_of_operations(sim: Simulator, client: genai.Client, clock: FakeClock) -> None:
    assert raw(sim, "/v1beta/batches") == (200, {})
    sim.pending_seconds, sim.running_seconds = 1, 4
    sim.fail_keys = {"b": 400}
    job = client.batches.create(model=MODEL, src=[inline(k, "x") for k in "abcd"])
    assert job.name

    status, op = raw(sim, f"/v1beta/{job.name}")
    assert status == 200 and "done" not in op
    assert op["metadata"]["@type"].endswith("GenerateContentBatch")
    assert op["metadata"]["batchStats"] == {"requestCount": "4", "pendingRequestCount": "4"}

    clock.advance(3)  # half-way through running: two of four done, one of them failed
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert op["metadata"]["state"] == "BATCH_STATE_RUNNING"
    assert op["metadata"]["batchStats"] == {
        "requestCount": "4",
        "successfulRequestCount": "1",
        "failedRequestCount": "1",
        "pendingRequestCount": "2",
    }
    clock.advance(2)
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert op["done"] is True and "endTime" in op["metadata"]
    assert op["metadata"]["batchStats"] == {
        "requestCount": "4",
        "successfulRequestCount": "3",
        "failedRequestCount": "1",
    }
    assert op["response"]["@type"].endswith("GenerateContentBatchOutput")
    entries = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert entries[1] == {
        "error": {
            "code": 400,
            "message": "Simulated failure of 'b'.",
            "status": "INVALID_ARGUMENT",
        },
        "metadata": {"key": "b"},
    }
    _, listing = raw(sim, "/v1beta/batches")
    assert "output" not in listing["operations"][0]["metadata"]
    assert "nextPageToken" not in listing


def test_per_request_errors_and_missing_entries(sim: Simulator, client: genai.Client) -> None:
    sim.fail_keys = {"b": 429}
    sim.missing_keys = {"c"}
    src = [
        inline("a", "fine"),
        inline("b", "fails by knob"),
        inline("c", "missing by knob"),
        inline("d", "fails by marker [[sim:error=503]]"),
        inline("e", "missing by marker [[sim:missing]]"),
    ]
    job = client.batches.get(name=client.batches.create(model=MODEL, src=src).name or "")
    results = by_key(job)
    assert sorted(results) == ["a", "b", "d"]
    assert results["a"].response is not None and results["a"].error is None
    assert results["b"].error is not None and results["b"].error.code == 429
    assert results["d"].error is not None and results["d"].error.code == 503
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED


def test_json_mode_markers_and_system_instruction(sim: Simulator, client: genai.Client) -> None:
    src = [
        inline("j", "give json", response_mime_type="application/json"),
        inline("f", "fenced [[sim:fenced]]", response_mime_type="application/json"),
        inline("t", "think [[sim:thought]]"),
        inline("s", "unsafe [[sim:finish=SAFETY]]", system_instruction="be very careful"),
    ]
    job = client.batches.get(name=client.batches.create(model=MODEL, src=src).name or "")
    results = {k: r.response for k, r in by_key(job).items()}
    assert all(results.values())

    as_json = results["j"]
    assert as_json is not None and json.loads(as_json.text or "") == {
        "echo": "give json",
        "words": 2,
    }

    fenced = results["f"]
    assert fenced is not None and fenced.text is not None
    assert fenced.text.startswith("Here you go:\n```json\n{") and ",}\n```" in fenced.text

    thought = results["t"]
    assert thought is not None and thought.candidates and thought.candidates[0].content
    parts = thought.candidates[0].content.parts or []
    assert parts[0].thought is True and parts[1].text == "Simulated answer: think [[sim:thought]]"
    assert thought.usage_metadata and thought.usage_metadata.thoughts_token_count == 1

    safety = results["s"]
    assert safety is not None and safety.candidates
    assert safety.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert safety.usage_metadata and safety.usage_metadata.prompt_token_count == 2 + 3


def test_shuffle_output_is_seeded(clock: FakeClock) -> None:
    orders = []
    for _ in range(2):
        with Simulator(clock=clock, seed=3) as simulator:
            simulator.shuffle_output = True
            client = make_client(simulator)
            src = [inline(str(i), f"prompt {i}") for i in range(20)]
            job = client.batches.get(name=client.batches.create(model=MODEL, src=src).name or "")
            assert job.dest and job.dest.inlined_responses
            orders.append([r.metadata["key"] for r in job.dest.inlined_responses if r.metadata])
    assert orders[0] == orders[1]
    assert sorted(orders[0], key=int) == [str(i) for i in range(20)]
    assert orders[0] != sorted(orders[0], key=int)


def test_file_upload_batch_and_responses_download(sim: Simulator, client: genai.Client) -> None:
    lines = [
        {"key": "k1", "request": {"contents": [{"parts": [{"text": "one"}], "role": "user"}]}},
        {
            "key": "k2",
            "request": {
                "contents": [{"parts": [{"text": "two"}]}],
                "generation_config": {"response_mime_type": "application/json"},
            },
        },
        {"key": "k3", "request": {"contents": [{"parts": [{"text": "three [[sim:error=400]]"}]}]}},
        {"key": "k4", "request": {"contents": [{"parts": [{"text": "four [[sim:missing]]"}]}]}},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.upload(
        file=io.BytesIO(data), config={"mime_type": "application/jsonl", "display_name": "in"}
    )
    assert uploaded.name and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == len(data) and uploaded.state == types.FileState.ACTIVE
    assert sim.uploaded_files == {uploaded.name: data}
    upload_calls = [entry for entry in sim.requests_log if "/upload/" in entry[1]]
    assert len(upload_calls) == 2 and "upload_id=" in upload_calls[1][1]

    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "f"})
    assert job.name
    done = client.batches.get(name=job.name)
    assert done.dest is not None and done.dest.file_name == f"files/batch-{job.name[8:]}"
    assert done.dest.inlined_responses is None

    output = client.files.download(file=done.dest.file_name)
    results = {r["key"]: r for r in map(json.loads, output.splitlines())}
    assert sorted(results) == ["k1", "k2", "k3"]
    answer = results["k2"]["response"]["candidates"][0]["content"]["parts"][0]["text"]
    assert json.loads(answer) == {"echo": "two", "words": 1}
    assert results["k3"]["error"]["code"] == 400

    meta = client.files.get(name=done.dest.file_name)
    assert meta.download_uri and meta.size_bytes == len(output)
    client.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as caught:
        client.files.get(name=uploaded.name)
    assert caught.value.code == 403


def test_multi_chunk_upload_and_download(sim: Simulator, client: genai.Client) -> None:
    line = json.dumps({"key": "x", "request": {"contents": [{"parts": [{"text": "y" * 1000}]}]}})
    data = ((line + "\n") * 9000).encode()  # > 8 MiB: two chunks
    uploaded = client.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
    assert uploaded.name and sim.uploaded_files[uploaded.name] == data
    assert sum("upload_id=" in path for _, path, _ in sim.requests_log) == 2
    assert client.files.download(file=uploaded.name) == data


def test_list_pages_through_the_sdk_pager(sim: Simulator, client: genai.Client) -> None:
    names = [
        client.batches.create(
            model=MODEL, src=[inline("a", "x")], config={"display_name": f"j{i}"}
        ).name
        for i in range(5)
    ]
    listed = [job.name for job in client.batches.list(config={"page_size": 2})]
    assert listed == list(reversed(names))
    list_calls = [
        path for method, path, _ in sim.requests_log if path.startswith("/v1beta/batches?")
    ]
    assert len(list_calls) == 3
    assert all(job.dest is None for job in client.batches.list())


def test_cancel_and_delete(sim: Simulator, client: genai.Client, clock: FakeClock) -> None:
    sim.pending_seconds = 100
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    client.batches.cancel(name=job.name)
    cancelled = client.batches.get(name=job.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.done
    assert cancelled.dest is None
    clock.advance(1000)
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_CANCELLED

    client.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.get(name=job.name)
    assert caught.value.code == 404 and caught.value.status == "NOT_FOUND"
    assert sim.jobs_created_for("") == 1 and sim.jobs == {}


@pytest.mark.parametrize("outcome", ["FAILED", "EXPIRED"])
def test_unsuccessful_outcomes(sim: Simulator, client: genai.Client, outcome: str) -> None:
    sim.outcome = outcome
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    finished = client.batches.get(name=job.name)
    assert finished.state == types.JobState(f"JOB_STATE_{outcome}") and finished.done
    assert finished.dest is None
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert ("error" in op) == (outcome == "FAILED")


def test_forced_states_and_forget(sim: Simulator, client: genai.Client) -> None:
    sim.pending_seconds = 100
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    sim.set_job_state(job.name, "BATCH_STATE_FAILED", "quota exhausted")
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert op["error"] == {"code": 13, "message": "quota exhausted"}
    sim.set_job_state(job.name, "EXPIRED")
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_EXPIRED
    sim.forget_job(job.name)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.get(name=job.name)
    assert caught.value.code == 404


def test_transient_faults_are_retried_by_the_sdk(sim: Simulator) -> None:
    sim.add_fault(Fault(method="POST", path_contains=":batchGenerateContent", status=429))
    sim.add_fault(Fault(method="POST", path_contains=":batchGenerateContent", status=503))
    client = make_client(sim, retries=3)
    job = client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "r"})
    assert job.name in sim.jobs
    assert [status for _, _, status in sim.requests_log] == [429, 503, 200]
    assert sim.create_calls == 3 and sim.jobs_created_for("r") == 1


def test_lost_create_response_makes_a_duplicate_on_retry(sim: Simulator) -> None:
    fault = Fault(method="POST", path_contains=":batchGenerateContent", status=503, after=True)
    sim.add_fault(fault)
    client = make_client(sim)  # keep clients referenced: a collected one closes its connection
    with pytest.raises(errors.ServerError) as caught:
        client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "d"})
    assert caught.value.code == 503
    assert sim.create_calls == 1 and len(sim.jobs) == 1

    sim.add_fault(Fault(path_contains=":batchGenerateContent", status=503, after=True))
    retrying = make_client(sim, retries=3)
    retrying.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "d"})
    assert sim.create_calls == 3 and sim.jobs_created_for("d") == 3


def test_dropped_connection_is_not_retried(sim: Simulator) -> None:
    sim.add_fault(Fault(method="GET", status=0))
    client = make_client(sim, retries=3)
    with pytest.raises(httpx2.RemoteProtocolError):
        client.batches.list()
    assert sim.requests_log == [("GET", "/v1beta/batches", 0)]
    assert list(client.batches.list()) == []


def test_api_key_checks(clock: FakeClock) -> None:
    with Simulator(clock=clock, api_key="secret-key") as simulator:
        wrong = make_client(simulator, key="wrong-key")
        with pytest.raises(errors.ClientError) as caught:
            wrong.batches.list()
        assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
        assert "API_KEY_INVALID" in json.dumps(caught.value.details)
        assert "wrong-key" not in json.dumps(caught.value.details)

        status, body = raw(simulator, "/v1beta/batches", key=None)
        assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
        right = make_client(simulator, key="secret-key")
        assert list(right.batches.list()) == []


def test_bad_requests(sim: Simulator, client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="models/does-not-exist-1", src=[inline("a", "x")])
    assert caught.value.code == 404
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model=MODEL, src="files/unknown")
    assert caught.value.code == 400
    status, _ = raw(sim, "/v1beta/no/such/path")
    assert status == 404
    assert sim.jobs == {}


def test_restart_keeps_port_and_state(sim: Simulator, client: genai.Client) -> None:
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    base_url = sim.base_url
    sim.stop()
    with pytest.raises(httpx2.ConnectError):
        client.batches.get(name=job.name or "")
    sim.start()
    assert sim.base_url == base_url
    assert client.batches.get(name=job.name or "").done
