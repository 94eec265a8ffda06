"""daemon.simulator, driven through the real google-genai SDK (plus a few raw HTTP checks)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon import cli
from daemon.simulator import Fault, Simulator
from daemon.simulator import cli as simulator_cli
from tests.conftest import stop_soon
from tests.support.harness import ROOT, FakeClock

MODEL = "gemini-2.5-flash"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Simulator]:
    simulator = Simulator(clock=clock, seed=7).start()
    yield simulator
    stop_soon(simulator)


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


def test_files_list_pages_through_uploads_only(sim: Simulator, client: genai.Client) -> None:
    """files.list: how the daemon finds an upload whose reply it never saw."""
    names = [
        client.files.upload(
            file=io.BytesIO(
                b'{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}}\n'
            ),
            config={"mime_type": "application/jsonl", "display_name": f"up{i}"},
        ).name
        for i in range(3)
    ]
    job = client.batches.create(model=MODEL, src=names[0], config={"display_name": "f"})
    assert job.name and client.batches.get(name=job.name).done  # a responses file now exists
    listed = list(client.files.list(config={"page_size": 2}))
    assert [f.name for f in listed] == list(reversed(names))
    assert [f.display_name for f in listed] == ["up2", "up1", "up0"]
    assert sum(p.startswith("/v1beta/files?") for _, p, _ in sim.requests_log) == 2


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


def test_files_list_pages_through_the_sdk_pager(sim: Simulator, client: genai.Client) -> None:
    """files.list, as the daemon uses it to find an upload whose reply a crash lost."""
    names = [
        client.files.upload(
            file=io.BytesIO(b"{}\n"), config={"mime_type": "jsonl", "display_name": f"u{i}"}
        ).name
        for i in range(3)
    ]
    listed = [(f.name, f.display_name) for f in client.files.list(config={"page_size": 2})]
    assert listed == [(n, f"u{i}") for i, n in reversed(list(enumerate(names)))]
    assert sum(path.startswith("/v1beta/files?") for _, path, _ in sim.requests_log) == 2


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


@pytest.mark.parametrize(
    ("outcome", "code", "message"),
    [("FAILED", 13, "The batch job failed (simulated)."), ("EXPIRED", 4, "expired")],
)
def test_unsuccessful_outcomes(
    sim: Simulator, client: genai.Client, outcome: str, code: int, message: str
) -> None:
    sim.outcome = outcome
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    finished = client.batches.get(name=job.name)
    assert finished.state == types.JobState(f"JOB_STATE_{outcome}") and finished.done
    assert finished.dest is None
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert op["error"]["code"] == code and message in op["error"]["message"]
    assert "response" not in op and "output" not in op["metadata"]
    assert sim.jobs[job.name]["error"] == op["error"]["message"]


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


# ---- helpers for the fault and shape tests -----------------------------------------------------


def raw_reply(
    sim: Simulator, path: str, method: str = "GET", key: str | None = "k", timeout: float = 5
) -> tuple[int, str, bytes]:
    """(status, content type, body bytes) of one raw request, whatever the body is."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=timeout)
    try:
        conn.request(method, path, headers={"x-goog-api-key": key} if key else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def finished_inline(client: genai.Client, *src: types.InlinedRequest) -> types.BatchJob:
    """Create an inline job (the fixtures' jobs finish at once) and GET it."""
    return client.batches.get(name=client.batches.create(model=MODEL, src=list(src)).name or "")


def raw_responses(sim: Simulator, job: types.BatchJob) -> list[dict[str, Any]]:
    _, op = raw(sim, f"/v1beta/{job.name}")
    items = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    return [item["response"] for item in items]


def timed_client(sim: Simulator, timeout_seconds: float) -> genai.Client:
    options = types.HttpOptions(base_url=sim.base_url, timeout=int(timeout_seconds * 1000))
    return genai.Client(api_key="k", http_options=options)


# ---- garbled, late, trickling and dropped replies (issue 8) ------------------------------------


@pytest.mark.parametrize("kind", ["html", "truncated"])
def test_garbled_200_replies_break_json_parsing(
    sim: Simulator, client: genai.Client, kind: str
) -> None:
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    sim.add_fault(Fault.garbled(kind, method="GET", path_contains="/batches/"))
    with pytest.raises(ValueError):  # the SDK lets json.JSONDecodeError through
        client.batches.get(name=job.name)
    assert sim.requests_log[-1][2] == 200
    assert client.batches.get(name=job.name).name == job.name  # one reply only

    sim.add_fault(Fault.garbled(kind, status=200))
    status, content_type, body = raw_reply(sim, f"/v1beta/{job.name}")
    assert status == 200
    if kind == "html":
        assert content_type.startswith("text/html") and body.startswith(b"<!DOCTYPE html>")
    else:
        assert content_type.startswith("application/json") and body.startswith(b'{"error":')
        with pytest.raises(ValueError):
            json.loads(body)


def test_empty_200_reply_gives_a_job_without_a_name(sim: Simulator, client: genai.Client) -> None:
    sim.add_fault(Fault.garbled("empty", after=True, path_contains=":batchGenerateContent"))
    job = client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "e"})
    assert job.name is None  # what a client must not take for "no job was made"
    assert sim.jobs_created_for("e") == 1
    sim.add_fault(Fault.garbled("empty"))
    assert raw_reply(sim, "/v1beta/batches") == (200, "application/json; charset=UTF-8", b"")


def test_truncated_create_reply_after_the_work(sim: Simulator) -> None:
    sim.add_fault(Fault.garbled("truncated", after=True, path_contains=":batchGenerateContent"))
    client = make_client(sim, retries=3)
    with pytest.raises(ValueError):
        client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "t"})
    assert sim.jobs_created_for("t") == 1 and sim.create_calls == 1  # not retried by the SDK
    sim.add_fault(Fault.garbled("truncated", after=True, path_contains="/batches/"))
    (name,) = sim.jobs
    status, _, body = raw_reply(sim, f"/v1beta/{name}")
    whole = raw_reply(sim, f"/v1beta/{name}")[2]
    assert status == 200 and body == whole[: len(whole) // 2]


def test_html_error_page_with_a_chosen_status(sim: Simulator, client: genai.Client) -> None:
    sim.add_fault(Fault.garbled("html", status=502, method="GET"))
    with pytest.raises(errors.ServerError) as caught:
        client.batches.list()
    assert caught.value.code == 502 and "That\u2019s an error" in (caught.value.message or "")
    sim.add_fault(Fault(body="html", status=503))
    status, content_type, body = raw_reply(sim, "/v1beta/batches")
    assert (status, content_type) == (503, "text/html; charset=UTF-8")
    assert b"<title>Error 503 (Service Unavailable)!!1</title>" in body


def test_cut_reply_drops_the_connection_mid_body(sim: Simulator, client: genai.Client) -> None:
    sim.add_fault(Fault.garbled("cut", after=True, path_contains=":batchGenerateContent"))
    with pytest.raises(httpx2.RemoteProtocolError):
        client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert len(sim.jobs) == 1
    assert client.batches.list()  # the next call gets a fresh connection


def test_reset_before_and_after_the_work(sim: Simulator, client: genai.Client) -> None:
    sim.add_fault(Fault.reset(path_contains=":batchGenerateContent"))
    with pytest.raises(httpx2.RemoteProtocolError):
        client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert sim.jobs == {}
    sim.add_fault(Fault.reset(after=True, path_contains=":batchGenerateContent"))
    with pytest.raises(httpx2.RemoteProtocolError):
        client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert len(sim.jobs) == 1
    assert [status for _, _, status in sim.requests_log] == [0, 0]


def test_late_reply_arrives_after_the_client_timeout(sim: Simulator) -> None:
    client = timed_client(sim, 0.2)
    sim.add_fault(Fault.late(0.8, path_contains=":batchGenerateContent"))
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "l"})
    assert time.monotonic() - started < 0.7
    assert sim.jobs_created_for("l") == 1  # the work was done before the wait

    (name,) = sim.jobs
    sim.add_fault(Fault.late(0.3, method="GET"))
    started = time.monotonic()
    status, _, body = raw_reply(sim, f"/v1beta/{name}")
    assert time.monotonic() - started >= 0.3
    assert status == 200 and json.loads(body)["name"] == name  # the real reply, late


def test_late_error_reply(sim: Simulator, client: genai.Client) -> None:
    sim.add_fault(Fault(method="GET", status=503, delay=0.2))
    started = time.monotonic()
    with pytest.raises(errors.ServerError):
        client.batches.list()
    assert time.monotonic() - started >= 0.2


def test_trickling_body_outlasts_a_per_read_timeout(sim: Simulator) -> None:
    client = timed_client(sim, 1.0)
    sim.add_fault(Fault.trickling(0.6, method="GET", path_contains="/batches"))
    started = time.monotonic()
    assert list(client.batches.list()) == []  # body "{}": two bytes, 0.6 s apart
    assert time.monotonic() - started >= 1.2  # longer than the client's timeout, yet no error


def test_trickling_sends_one_byte_at_a_time(sim: Simulator) -> None:
    for headers in (False, True):
        sim.add_fault(Fault.trickling(0.1, headers=headers, method="GET"))
        with socket.create_connection((sim.host, sim.port), timeout=5) as conn:
            conn.sendall(b"GET /v1beta/batches HTTP/1.1\r\nHost: x\r\nx-goog-api-key: k\r\n\r\n")
            first = conn.recv(4096)
            if headers:
                assert first == b"H"  # even the status line comes one byte at a time
            else:
                assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n")
                assert conn.recv(4096) == b"{"
                assert conn.recv(4096) == b"}"
    assert list(make_client(sim).batches.list()) == []


def test_stop_ends_a_late_reply(clock: FakeClock) -> None:
    simulator = Simulator(clock=clock).start()
    simulator.add_fault(Fault.late(30, method="GET"))
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(raw_reply(simulator, "/v1beta/batches", timeout=10))
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while not simulator.requests_log and time.monotonic() < deadline:  # the reply is waiting
        time.sleep(0.01)
    started = time.monotonic()
    simulator.stop()
    thread.join(timeout=10)
    assert time.monotonic() - started < 5
    assert outcome and isinstance(outcome[0], (OSError, http.client.HTTPException))


# ---- key and permission errors, 404s (issue 8) -------------------------------------------------


def test_key_rejected_for_a_time_window_like_google(sim: Simulator, clock: FakeClock) -> None:
    client = make_client(sim)
    sim.reject_key(400, seconds=60)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.list()
    error = caught.value
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert error.message == "API key not valid. Please pass a valid API key."
    assert error.details["error"]["details"][0] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    with pytest.raises(errors.ClientError):
        client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert sim.jobs == {}
    clock.advance(60)
    assert list(client.batches.list()) == []


@pytest.mark.parametrize(("status", "name"), [(401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED")])
def test_credential_and_permission_errors(
    sim: Simulator, clock: FakeClock, status: int, name: str
) -> None:
    client = make_client(sim)
    sim.reject_key(status, start=clock.now + 10, end=clock.now + 20)
    assert list(client.batches.list()) == []  # the window has not begun
    clock.advance(10)
    with pytest.raises(errors.ClientError) as caught:
        client.files.upload(file=io.BytesIO(b"{}\n"), config={"mime_type": "jsonl"})
    assert (caught.value.code, caught.value.status) == (status, name)
    clock.advance(10)
    assert list(client.batches.list()) == []
    sim.reject_key(status)  # open-ended, until accept_key()
    clock.advance(10**6)
    with pytest.raises(errors.ClientError):
        client.batches.list()
    sim.accept_key()
    assert list(client.batches.list()) == []
    with pytest.raises(ValueError):
        sim.reject_key(500)


def test_a_single_404_on_a_poll_is_google_not_found(sim: Simulator, client: genai.Client) -> None:
    job = client.batches.create(model=MODEL, src=[inline("a", "x")])
    assert job.name
    sim.add_fault(Fault(method="GET", path_contains=job.name, status=404))
    assert raw(sim, f"/v1beta/{job.name}") == (
        404,
        {
            "error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
            }
        },
    )
    assert client.batches.get(name=job.name).done
    sim.add_fault(Fault(method="GET", path_contains=job.name, status=404))
    with pytest.raises(errors.ClientError) as caught:
        client.batches.get(name=job.name)
    assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")
    sim.forget_job(job.name)
    assert raw(sim, f"/v1beta/{job.name}")[1]["error"]["message"] == (
        "Requested entity was not found."
    )


def test_list_lag_hides_new_jobs_from_the_listing_only(
    sim: Simulator, client: genai.Client, clock: FakeClock
) -> None:
    sim.list_lag_seconds = 30
    job = client.batches.create(model=MODEL, src=[inline("a", "x")], config={"display_name": "n"})
    assert job.name
    assert list(client.batches.list()) == []
    assert client.batches.get(name=job.name).display_name == "n"
    clock.advance(29.9)
    assert list(client.batches.list()) == []
    clock.advance(0.1)
    assert [j.name for j in client.batches.list()] == [job.name]


def test_jobs_expire_when_pending_or_running_too_long(
    sim: Simulator, client: genai.Client, clock: FakeClock
) -> None:
    sim.expire_after_seconds = 100
    sim.pending_seconds, sim.running_seconds = 50, 100
    slow = client.batches.create(model=MODEL, src=[inline("a", "x")]).name or ""
    sim.pending_seconds, sim.running_seconds = 10, 10
    quick = client.batches.create(model=MODEL, src=[inline("a", "x")]).name or ""
    forced = client.batches.create(model=MODEL, src=[inline("a", "x")]).name or ""
    sim.set_job_state(forced, "RUNNING")
    clock.advance(99.9)
    assert client.batches.get(name=slow).state == types.JobState.JOB_STATE_RUNNING
    clock.advance(0.1)
    expired = client.batches.get(name=slow)
    assert expired.state == types.JobState.JOB_STATE_EXPIRED and expired.dest is None
    _, op = raw(sim, f"/v1beta/{slow}")
    assert op["done"] is True and op["error"]["code"] == 4
    assert op["metadata"]["batchStats"] == {"requestCount": "1"}
    assert client.batches.get(name=quick).state == types.JobState.JOB_STATE_SUCCEEDED
    assert client.batches.get(name=forced).state == types.JobState.JOB_STATE_EXPIRED


def test_job_errors_for_every_unsuccessful_end(sim: Simulator, client: genai.Client) -> None:
    sim.pending_seconds = 100
    job = client.batches.create(model=MODEL, src=[inline("a", "x")]).name or ""
    client.batches.cancel(name=job)
    _, op = raw(sim, f"/v1beta/{job}")
    assert op["error"] == {"code": 1, "message": "The batch job was cancelled."}
    sim.set_job_state(job, "EXPIRED", "no capacity today")
    assert raw(sim, f"/v1beta/{job}")[1]["error"] == {"code": 4, "message": "no capacity today"}
    sim.set_job_state(job, "FAILED")
    assert raw(sim, f"/v1beta/{job}")[1]["error"]["code"] == 13
    _, listing = raw(sim, "/v1beta/batches")
    assert listing["operations"][0]["error"]["code"] == 13


# ---- live shapes (issue 9) ---------------------------------------------------------------------

OP_RUNNING_INLINE_KEYS = {  # op_inline_running_zh.json (recorded, see /work/shared/payloads)
    "@type",
    "model",
    "displayName",
    "createTime",
    "updateTime",
    "batchStats",
    "state",
    "name",
}
OP_SUCCEEDED_FILE_KEYS = {  # op_file_succeeded_delphi.json
    "@type", "model", "displayName", "inputConfig", "output", "createTime", "endTime",
    "updateTime", "batchStats", "state", "name",
}  # fmt: skip


def test_operations_have_the_recorded_shapes(sim: Simulator, clock: FakeClock) -> None:
    sim.pending_seconds, sim.running_seconds = 1, 100
    client = make_client(sim)
    job = client.batches.create(
        model=MODEL, src=[inline(k, "x") for k in "abc"], config={"display_name": "d"}
    )
    clock.advance(2)
    _, op = raw(sim, f"/v1beta/{job.name}")
    assert set(op) == {"name", "metadata"} and set(op["metadata"]) == OP_RUNNING_INLINE_KEYS
    assert op["metadata"]["batchStats"] == {"requestCount": "3", "pendingRequestCount": "3"}

    sim.pending_seconds = sim.running_seconds = 0
    data = b'{"key":"k1","request":{"contents":[{"parts":[{"text":"hi"}]}]}}\n'
    uploaded = client.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
    assert uploaded.name
    done = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "f"})
    _, op = raw(sim, f"/v1beta/{done.name}")
    assert set(op) == {"name", "metadata", "done", "response"}
    assert set(op["metadata"]) == OP_SUCCEEDED_FILE_KEYS
    assert op["metadata"]["inputConfig"] == {"fileName": uploaded.name}
    assert op["metadata"]["batchStats"] == {"requestCount": "1", "successfulRequestCount": "1"}
    assert op["response"]["responsesFile"] == op["metadata"]["output"]["responsesFile"]


def test_responses_carry_the_live_fields(sim: Simulator, client: genai.Client) -> None:
    job = finished_inline(
        client,
        inline("plain", "hello world"),
        inline("rich", "cached [[sim:cached=2]] tool [[sim:tool_tokens=7]] [[sim:thought]]"),
        inline("img", "draw [[sim:image]]"),
    )
    plain, rich, img = raw_responses(sim, job)
    assert set(plain) == {"candidates", "usageMetadata", "modelVersion", "responseId"}
    assert plain["usageMetadata"] == {
        "promptTokenCount": 2,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2}],
        "candidatesTokenCount": 4,
        "totalTokenCount": 6,
        "serviceTier": "standard",
    }
    part = plain["candidates"][0]["content"]["parts"][0]
    signature = part["thoughtSignature"]
    assert "+" in signature and "/" in signature
    assert base64.b64decode(signature, validate=True)

    usage = rich["usageMetadata"]
    assert usage["cachedContentTokenCount"] == 2 and usage["toolUsePromptTokenCount"] == 7
    assert usage["thoughtsTokenCount"] == 1
    assert (
        usage["totalTokenCount"]
        == usage["promptTokenCount"] + usage["candidatesTokenCount"] + 1 + 7
    )  # cached tokens are part of the prompt tokens
    thought, answer = rich["candidates"][0]["content"]["parts"]
    assert thought == {"text": "thinking...", "thought": True} and "thoughtSignature" in answer

    image = img["candidates"][0]["content"]["parts"][1]["inlineData"]
    assert image["mimeType"] == "image/png" and "+" in image["data"] and "/" in image["data"]

    sdk = by_key(job)
    sdk_rich = sdk["rich"].response
    assert sdk_rich is not None and sdk_rich.usage_metadata is not None
    assert sdk_rich.usage_metadata.cached_content_token_count == 2
    assert sdk_rich.usage_metadata.tool_use_prompt_token_count == 7
    assert sdk_rich.response_id == rich["responseId"]
    sdk_img = sdk["img"].response
    assert sdk_img and sdk_img.candidates and sdk_img.candidates[0].content
    sdk_parts = sdk_img.candidates[0].content.parts or []
    assert sdk_parts[0].thought_signature == base64.b64decode(
        img["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    )
    assert sdk_parts[1].inline_data and sdk_parts[1].inline_data.data == base64.b64decode(
        image["data"]
    )
    # What a client that re-serialises through the SDK writes: URL-safe, so it shows.
    dumped = sdk_parts[1].model_dump(mode="json", exclude_none=True)
    assert dumped["inline_data"]["data"] != image["data"]


def test_blocked_and_withheld_answers(sim: Simulator, client: genai.Client) -> None:
    job = finished_inline(
        client,
        inline("prompt", "bad [[sim:blocked]]"),
        inline("other", "bad [[sim:blocked=BLOCKLIST]]"),
        inline("safety", "unsafe [[sim:finish=SAFETY]]"),
        inline("recite", "song [[sim:finish=RECITATION]]"),
        inline("prohibited", "x [[sim:finish=PROHIBITED_CONTENT]] [[sim:finish_message=No.]]"),
        inline("malformed", "x [[sim:finish=MALFORMED_FUNCTION_CALL]]"),
        inline("long", "think a lot [[sim:finish=MAX_TOKENS]] [[sim:thought]]"),
        inline("texted", "unsafe but answered [[sim:finish_text=SAFETY]]"),
    )
    (prompt, other, safety, recite, prohibited, malformed, long, texted) = raw_responses(sim, job)
    # resp_vercel4236_prompt_blocked.json: no candidates, prompt tokens only
    assert set(prompt) == {"promptFeedback", "usageMetadata", "modelVersion", "responseId"}
    assert prompt["promptFeedback"] == {"blockReason": "PROHIBITED_CONTENT"}
    assert other["promptFeedback"] == {"blockReason": "BLOCKLIST"}
    usage = prompt["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] == 2
    assert "candidatesTokenCount" not in usage
    # resp_pai_safety_block.json: content {}, no text, safety ratings, prompt tokens only
    (candidate,) = safety["candidates"]
    assert candidate["content"] == {} and candidate["finishReason"] == "SAFETY"
    assert {"category", "probability", "blocked"} == set(candidate["safetyRatings"][0])
    assert safety["usageMetadata"]["totalTokenCount"] == 2
    assert recite["candidates"][0] == {"content": {}, "finishReason": "RECITATION", "index": 0}
    assert prohibited["candidates"][0]["finishMessage"] == "No."
    assert malformed["candidates"][0]["finishMessage"].startswith("Malformed function call")
    # resp_pai_max_tokens_thinking_empty.json: content with only a role
    assert long["candidates"][0]["content"] == {"role": "model"}
    assert long["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert "candidatesTokenCount" not in long["usageMetadata"]
    assert long["usageMetadata"]["thoughtsTokenCount"] == 1
    assert texted["candidates"][0]["finishReason"] == "SAFETY"
    assert texted["candidates"][0]["content"]["parts"][0]["text"].startswith("Simulated answer")

    sdk = {key: entry.response for key, entry in by_key(job).items()}
    blocked = sdk["prompt"]
    assert blocked is not None and blocked.candidates is None and blocked.text is None
    assert blocked.prompt_feedback and blocked.prompt_feedback.block_reason == (
        types.BlockedReason.PROHIBITED_CONTENT
    )
    withheld = sdk["safety"]
    assert withheld is not None and withheld.candidates and withheld.text is None
    assert withheld.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert sdk["texted"] is not None and sdk["texted"].text


def test_inline_responses_without_metadata(sim: Simulator, client: genai.Client) -> None:
    sim.echo_metadata = False
    sim.fail_keys = {"b": 500}
    job = finished_inline(client, inline("a", "first"), inline("b", "second"))
    assert job.dest and job.dest.inlined_responses
    assert [r.metadata for r in job.dest.inlined_responses] == [None, None]
    first, second = job.dest.inlined_responses
    assert first.response and first.response.text == "Simulated answer: first"
    assert second.error and second.error.code == 500
    _, op = raw(sim, f"/v1beta/{job.name}")
    items = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert all("metadata" not in item for item in items)
    sim.echo_metadata = True
    assert sorted(by_key(client.batches.get(name=job.name or ""))) == ["a", "b"]


def upload_lines(client: genai.Client, *prompts: tuple[str, str]) -> str:
    data = "".join(
        json.dumps({"key": key, "request": {"contents": [{"parts": [{"text": text}]}]}}) + "\n"
        for key, text in prompts
    ).encode()
    uploaded = client.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
    assert uploaded.name
    return uploaded.name


def responses_file_lines(client: genai.Client, source: str) -> list[dict[str, Any]]:
    job = client.batches.get(name=client.batches.create(model=MODEL, src=source).name or "")
    assert job.dest and job.dest.file_name
    return [
        json.loads(line) for line in client.files.download(file=job.dest.file_name).splitlines()
    ]


def test_result_lines_with_the_error_as_status(sim: Simulator, client: genai.Client) -> None:
    sim.errors_as_status = True
    source = upload_lines(client, ("ok", "fine"), ("bad", "no [[sim:error=503]]"))
    ok, bad = responses_file_lines(client, source)
    assert ok["key"] == "ok" and "response" in ok
    assert bad == {
        "key": "bad",
        "status": {
            "code": 503,
            "message": "Simulated error requested by the prompt.",
            "status": "UNAVAILABLE",
        },
    }


# ---- unknown fields everywhere (issue 9) -------------------------------------------------------


def unknown_fields_everywhere(value: Any, path: str = "$") -> list[str]:
    """Paths of JSON objects without the simulator's unknown fields (user maps excepted)."""
    missing: list[str] = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            missing += unknown_fields_everywhere(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        if not {"futureField", "x_new_thing"} <= set(value):
            missing.append(path)
        for key, item in value.items():
            user_map = key in ("metadata", "quotaDimensions") and "@type" not in item
            if key != "x_new_thing" and not user_map:
                missing += unknown_fields_everywhere(item, f"{path}.{key}")
    return missing


def test_extra_fields_at_every_level_of_every_reply(
    sim: Simulator, client: genai.Client, clock: FakeClock
) -> None:
    sim.extra_fields = True
    sim.pending_seconds, sim.running_seconds = 0, 10
    job = client.batches.create(
        model=MODEL, src=[inline("a", "x [[sim:thought]]"), inline("b", "[[sim:error=429]]")]
    )
    assert job.name and job.state == types.JobState.JOB_STATE_PENDING
    replies: list[Any] = []
    clock.advance(5)
    replies.append(raw(sim, f"/v1beta/{job.name}")[1])  # running, with batchStats
    clock.advance(5)
    done = client.batches.get(name=job.name)  # the SDK ignores what it does not know
    assert done.done and set(by_key(done)) == {"a", "b"}
    replies.append(raw(sim, f"/v1beta/{job.name}")[1])
    replies.append(raw(sim, "/v1beta/batches")[1])
    assert [j.name for j in client.batches.list()] == [job.name]

    sim.running_seconds = 0
    source = upload_lines(client, ("k1", "one"), ("k2", "two [[sim:blocked]]"))
    replies.append(raw(sim, f"/v1beta/{source}")[1])
    lines = responses_file_lines(client, source)
    replies += lines
    assert client.files.get(name=source).name == source
    replies.append(raw(sim, "/v1beta/batches/nope")[1])  # an error body
    sim.add_fault(Fault(status=429))
    replies.append(raw(sim, "/v1beta/batches")[1])

    for reply in replies:
        assert unknown_fields_everywhere(reply) == []
    op = replies[1]
    item = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"][0]
    assert item["metadata"] == {"key": "a"}  # echoed user metadata stays as sent
    assert "futureField" in item["response"]["candidates"][0]["content"]["parts"][1]
    assert "futureField" in op["metadata"]["batchStats"]
    assert "futureField" in lines[1]["response"]["promptFeedback"]


# ---- follow-up jobs and the enqueued-token quota (issue 11) ------------------------------------


def test_requests_fail_or_go_missing_the_first_times_only(
    sim: Simulator, client: genai.Client
) -> None:
    sim.fail_keys_times = {"k3": (503, 1), "k5": (429, 2)}
    sim.missing_keys_times = {"k4": 1}
    src = [inline(f"k{i}", f"prompt {i}") for i in range(1, 6)]
    first = by_key(finished_inline(client, *src))
    assert sorted(first) == ["k1", "k2", "k3", "k5"]
    assert first["k3"].error and first["k3"].error.code == 503
    assert first["k5"].error and first["k5"].error.code == 429

    second = by_key(finished_inline(client, *src[2:]))  # a follow-up job of what failed
    assert sorted(second) == ["k3", "k4", "k5"]
    assert second["k3"].response and second["k4"].response
    assert second["k5"].error and second["k5"].error.code == 429
    third = by_key(finished_inline(client, src[4]))
    assert third["k5"].response and third["k5"].response.text == "Simulated answer: prompt 5"
    assert sim.key_submissions == {"k1": 1, "k2": 1, "k3": 2, "k4": 2, "k5": 3}


def test_retry_then_succeed_across_the_file_api(sim: Simulator, client: genai.Client) -> None:
    sim.fail_keys_times = {"x": (500, 1)}
    first = responses_file_lines(client, upload_lines(client, ("x", "a"), ("y", "b")))
    assert [line.get("error", {}).get("code") for line in first] == [500, None]
    again = responses_file_lines(client, upload_lines(client, ("x", "a")))
    assert "response" in again[0]


def test_quota_refuses_creates_over_the_enqueued_tokens(
    sim: Simulator, client: genai.Client, clock: FakeClock
) -> None:
    sim.enqueued_token_limit = 10
    sim.pending_seconds, sim.running_seconds = 10, 10
    twenty_chars = "x" * 20  # 5 tokens
    for name in ("a", "b"):
        client.batches.create(
            model=MODEL, src=[inline("k", twenty_chars)], config={"display_name": name}
        )
    assert sim.enqueued_tokens == 10
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model=MODEL, src=[inline("k", "y")], config={"display_name": "c"})
    error = caught.value
    assert (error.code, error.status) == (429, "RESOURCE_EXHAUSTED")
    assert "Enqueued token quota exceeded" in (error.message or "")
    assert sim.jobs_created_for("c") == 0 and sim.create_calls == 3

    clock.advance(20)  # both jobs ended: the budget is free again
    assert sim.enqueued_tokens == 0
    client.batches.create(model=MODEL, src=[inline("k", "y" * 40)], config={"display_name": "c"})
    assert sim.jobs_created_for("c") == 1
    assert sim.enqueued_tokens == 10 and sim.peak_enqueued_tokens == 10


def test_quota_fails_jobs_over_the_enqueued_tokens(
    sim: Simulator, client: genai.Client, clock: FakeClock
) -> None:
    sim.enqueued_token_limit, sim.quota_mode = 4, "fail"
    sim.pending_seconds = 10
    sim.fail_keys_times = {"k": (503, 1)}
    system = "s" * 8  # system instructions count too: 2 tokens
    ok = client.batches.create(model=MODEL, src=[inline("k", "p" * 8, system_instruction=system)])
    over = client.batches.create(model=MODEL, src=[inline("k", "q")])
    assert over.state == types.JobState.JOB_STATE_PENDING  # the create itself succeeds
    assert over.name and ok.name and sim.jobs[ok.name]["tokens"] == 4
    failed = client.batches.get(name=over.name)
    assert failed.state == types.JobState.JOB_STATE_FAILED
    _, op = raw(sim, f"/v1beta/{over.name}")
    assert op["error"]["code"] == 8 and "Enqueued token quota exceeded" in op["error"]["message"]
    assert sim.key_submissions == {"k": 1}  # the failed job's requests never ran
    assert sim.enqueued_tokens == 4 == sim.peak_enqueued_tokens
    clock.advance(10)
    assert sim.enqueued_tokens == 0


# ---- the standalone `simulator` command (issue 10, item 19) ------------------------------------

ALL_FLAGS = [
    "simulator",
    "--api-key", "secret", "--pending-seconds", "0.5", "--running-seconds", "7",
    "--outcome", "FAILED", "--fail-keys", "a,b=429", "--fail-keys-times", "c=503:2,d:1",
    "--missing-keys", "m,n", "--missing-keys-times", "o:3", "--shuffle", "--seed", "9",
    "--extra-fields", "--no-echo-metadata", "--errors-as-status", "--list-lag", "4",
    "--expire-after", "60", "--quota-tokens", "1000", "--quota-mode", "fail",
    "--reject-key-for", "30:403",
]  # fmt: skip


def test_simulator_flags_set_every_knob() -> None:
    args = cli.parser().parse_args(ALL_FLAGS)
    with simulator_cli.from_args(args) as simulator:
        assert (simulator.api_key, simulator.pending_seconds) == ("secret", 0.5)
        assert (simulator.running_seconds, simulator.outcome) == (7, "FAILED")
        assert simulator.fail_keys == {"a": 500, "b": 429}
        assert simulator.fail_keys_times == {"c": (503, 2), "d": (500, 1)}
        assert simulator.missing_keys == {"m", "n"} and simulator.missing_keys_times == {"o": 3}
        assert simulator.shuffle_output and simulator.extra_fields and simulator.errors_as_status
        assert not simulator.echo_metadata
        assert (simulator.list_lag_seconds, simulator.expire_after_seconds) == (4, 60)
        assert (simulator.enqueued_token_limit, simulator.quota_mode) == (1000, "fail")
        client = make_client(simulator, key="secret")
        with pytest.raises(errors.ClientError) as caught:
            client.batches.list()  # --reject-key-for: 403 from the start, for 30 seconds
        assert caught.value.code == 403

    defaults = simulator_cli.from_args(cli.parser().parse_args(["simulator"]))
    assert defaults.api_key is None and defaults.outcome == "SUCCEEDED"
    assert defaults.fail_keys == {} and defaults.missing_keys == set()
    assert defaults.enqueued_token_limit is None and defaults.echo_metadata


@pytest.mark.parametrize(
    "flags",
    [
        ["--fail-keys", "a=abc"],
        ["--fail-keys", "a=200"],
        ["--fail-keys-times", "a"],
        ["--missing-keys-times", "a:x"],
        ["--reject-key-for", "5:500"],
        ["--reject-key-for", "soon"],
        ["--quota-mode", "maybe"],
    ],
)
def test_simulator_flag_errors(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parser().parse_args(["simulator", *flags])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


def simulator_process(*flags: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "simulator", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_simulator_command_serves_what_its_flags_say() -> None:
    proc = simulator_process(
        "--api-key", "secret", "--pending-seconds", "0", "--running-seconds", "0",
        "--fail-keys", "b=429", "--no-echo-metadata", "--extra-fields",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        options = types.HttpOptions(base_url=url, api_version="v1beta")
        wrong = genai.Client(api_key="wrong", http_options=options)  # kept: see make_client
        with pytest.raises(errors.ClientError) as caught:
            wrong.batches.list()
        assert caught.value.code == 400
        client = genai.Client(api_key="secret", http_options=options)
        job = client.batches.create(model=MODEL, src=[inline("a", "x"), inline("b", "y")])
        done = client.batches.get(name=job.name or "")
        assert done.dest and done.dest.inlined_responses
        first, second = done.dest.inlined_responses
        assert first.metadata is None and first.response and first.response.text
        assert second.error and second.error.code == 429
        request = urllib.request.Request(f"{url}/v1beta/{job.name}")
        request.add_header("x-goog-api-key", "secret")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert "futureField" in json.loads(response.read())["metadata"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_simulator_command_on_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = simulator_process("--port", str(port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"port {port}" in err and "in use" in err
