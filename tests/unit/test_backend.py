"""daemon.backend against the simulator, through the real google-genai SDK."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon.backend import (
    BATCH_MIME_TYPE,
    LIST_PAGE_SIZE,
    BackendError,
    GeminiBackend,
    PermanentError,
    TransientError,
    api_call,
    classify,
    file_line,
    inline_lookup,
    job_error_message,
    to_inlined,
)
from daemon.inputs import Defaults, Request, prompt_request
from daemon.simulator import Fault, Simulator
from tests.harness import FakeClock

MODEL = "gemini-2.5-flash"
DEFAULTS = Defaults(system_prompt="Be brief.", temperature=0.3, thinking_budget=0)


@pytest.fixture
def clock(sim: Simulator) -> FakeClock:
    """Drive the `sim` fixture's job timing by hand: no sleeping."""
    fake = FakeClock()
    sim.clock = fake
    return fake


def backend(sim: Simulator, retries: int = 1) -> GeminiBackend:
    return GeminiBackend(
        "test-key",
        base_url=sim.base_url,
        retries=retries,
        timeout_seconds=10,
        retry_initial_delay=0.01,
        retry_jitter=0,
    )


def requests(*prompts: str) -> list[Request]:
    return [prompt_request(f"k{i}", i, p, DEFAULTS) for i, p in enumerate(prompts, 1)]


def finish(clock: FakeClock) -> None:
    clock.now += 3600


# ---- create / get / list / cancel -----------------------------------------------------------------


def test_create_inline_sends_keys_in_metadata_and_the_request_body(
    sim: Simulator, clock: FakeClock
) -> None:
    be = backend(sim)
    job = be.create_job(MODEL, "gemini-batchd/x.jsonl/abc/1", requests("hello", "world"))
    assert job.name and job.name.startswith("batches/")
    assert job.display_name == "gemini-batchd/x.jsonl/abc/1"
    assert job.state is types.JobState.JOB_STATE_PENDING
    record = sim.jobs[job.name]
    assert record["model"] == f"models/{MODEL}"
    assert [r["key"] for r in record["requests"]] == ["k1", "k2"]
    first = record["requests"][0]["request"]
    assert first["contents"] == [{"role": "user", "parts": [{"text": "hello"}]}]
    assert first["generationConfig"]["temperature"] == 0.3
    config = first["generationConfig"]
    thinking = config.get("thinkingConfig") or config.get("thinking_config")
    assert thinking in ({"thinkingBudget": 0}, {"thinking_budget": 0})
    assert first["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert sim.create_calls == 1


def test_get_job_until_done_and_inline_lookup_by_key(sim: Simulator, clock: FakeClock) -> None:
    sim.shuffle_output = True
    sim.fail_keys = {"k3": 400}
    sim.missing_keys = {"k4"}
    be = backend(sim)
    job = be.create_job(MODEL, "d", requests("a", "b", "c", "d", "e", "f"))
    assert job.name
    assert be.get_job(job.name).done is not True
    finish(clock)
    done = be.get_job(job.name)
    assert done.done is True
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED
    entries = inline_lookup(done)
    assert set(entries) == {"k1", "k2", "k3", "k5", "k6"}
    assert entries["k3"]["error"]["code"] == 400
    assert "response" not in entries["k3"]
    response = entries["k2"]["response"]
    assert response["candidates"][0]["content"]["parts"][0]["text"].endswith("b")
    assert "usageMetadata" in response  # REST (camelCase) names, as results.py reads them
    assert job_error_message(done) is None


def test_native_request_with_lifted_fields(sim: Simulator, clock: FakeClock) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"temperature": 1.0, "responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "native"}]},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }
    job = backend(sim).create_job(MODEL, "n", [Request("n1", 1, body, False)])
    assert job.name
    sent = sim.jobs[job.name]["requests"][0]["request"]
    assert sent["generationConfig"]["responseMimeType"] == "application/json"
    assert sent["systemInstruction"]["parts"] == [{"text": "native"}]
    assert sent["safetySettings"][0]["threshold"] == "BLOCK_NONE"


def test_a_request_the_sdk_refuses_is_a_permanent_error(sim: Simulator) -> None:
    bad = Request(
        "k",
        1,
        {
            "contents": [{"role": "user", "parts": [{"text": "x"}]}],
            "generationConfig": {"temperature": "hot"},
        },
        False,
    )
    with pytest.raises(PermanentError, match="create batch job"):
        backend(sim).create_job(MODEL, "bad", [bad])
    assert sim.create_calls == 0


def test_find_job_pages_through_more_than_a_page(sim: Simulator) -> None:
    be = backend(sim)
    total = LIST_PAGE_SIZE + 50
    names = []
    for i in range(total):
        job = be.client.batches.create(
            model=MODEL,
            src=[types.InlinedRequest(contents="x", metadata={"key": "1"})],
            config=types.CreateBatchJobConfig(display_name=f"job-{i}"),
        )
        names.append(job.name)
    # The simulator lists newest first: job-0 is on the second page.
    found = be.find_job("job-0")
    assert found is not None and found.name == names[0]
    list_calls = [p for m, p, _ in sim.requests_log if m == "GET" and "/batches" in p]
    assert len(list_calls) == 2
    assert any("pageToken" in p for p in list_calls)
    assert be.find_job("job-149") is not None
    assert be.find_job("no-such-job") is None


def test_find_job_with_no_jobs(sim: Simulator) -> None:
    assert backend(sim).find_job("anything") is None


def test_cancel_job(sim: Simulator, clock: FakeClock) -> None:
    be = backend(sim)
    job = be.create_job(MODEL, "c", requests("a"))
    assert job.name
    be.cancel_job(job.name)
    cancelled = be.get_job(job.name)
    assert cancelled.state is types.JobState.JOB_STATE_CANCELLED
    assert cancelled.done is True
    assert be.find_job("c") is not None  # cancelled, not deleted


def test_failed_job_state(sim: Simulator, clock: FakeClock) -> None:
    be = backend(sim)
    job = be.create_job(MODEL, "f", requests("a"))
    assert job.name
    sim.set_job_state(job.name, "FAILED", "quota exhausted")
    failed = be.get_job(job.name)
    assert failed.state is types.JobState.JOB_STATE_FAILED
    assert failed.done is True


# ---- create is sent exactly once ------------------------------------------------------------------


def test_create_is_sent_once_when_the_reply_is_lost(sim: Simulator) -> None:
    """503 after the job was created: no SDK retry (it would make a second job)."""
    be = backend(sim, retries=5)
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", after=True))
    with pytest.raises(TransientError) as info:
        be.create_job(MODEL, "lost-reply", requests("a"))
    assert info.value.code == 503
    assert sim.create_calls == 1
    assert sim.jobs_created_for("lost-reply") == 1
    assert be.find_job("lost-reply") is not None  # what the caller does next


def test_create_is_not_retried_even_before_the_server_acts(sim: Simulator) -> None:
    be = backend(sim, retries=5)
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", status=429))
    with pytest.raises(TransientError) as info:
        be.create_job(MODEL, "rate-limited", requests("a"))
    assert info.value.code == 429
    assert sim.create_calls == 1
    assert sim.jobs_created_for("rate-limited") == 0


def test_create_with_a_dropped_connection(sim: Simulator) -> None:
    be = backend(sim, retries=5)
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", status=0))
    with pytest.raises(TransientError) as info:
        be.create_job(MODEL, "dropped", requests("a"))
    assert info.value.code is None
    assert sim.create_calls == 1


def test_create_with_an_unknown_model_is_permanent(sim: Simulator) -> None:
    with pytest.raises(PermanentError) as info:
        backend(sim).create_job("does-not-exist", "m", requests("a"))
    assert info.value.code == 404


def test_400_is_permanent(sim: Simulator) -> None:
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", status=400))
    with pytest.raises(PermanentError) as info:
        backend(sim, retries=5).create_job(MODEL, "x", requests("a"))
    assert info.value.code == 400
    assert info.value.status == "INVALID_ARGUMENT"
    assert "create batch job" in str(info.value)


# ---- other calls: the SDK's retry options ----------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_transient_get_is_retried_by_the_sdk(sim: Simulator, clock: FakeClock, status: int) -> None:
    be = backend(sim, retries=3)
    job = be.create_job(MODEL, "r", requests("a"))
    assert job.name
    sim.add_fault(Fault(method="GET", path_contains="batches/", status=status, times=2))
    assert be.get_job(job.name).name == job.name
    statuses = [s for m, p, s in sim.requests_log if m == "GET"]
    assert statuses == [status, status, 200]


def test_transient_get_without_retries_is_a_transient_error(
    sim: Simulator, clock: FakeClock
) -> None:
    be = backend(sim, retries=1)
    job = be.create_job(MODEL, "r", requests("a"))
    assert job.name
    sim.add_fault(Fault(method="GET", path_contains="batches/", status=503))
    with pytest.raises(TransientError) as info:
        be.get_job(job.name)
    assert info.value.code == 503
    assert be.get_job(job.name).name == job.name  # the next poll works


def test_retries_run_out(sim: Simulator, clock: FakeClock) -> None:
    be = backend(sim, retries=2)
    job = be.create_job(MODEL, "r", requests("a"))
    assert job.name
    sim.add_fault(Fault(method="GET", path_contains="batches/", status=500, times=5))
    with pytest.raises(TransientError) as info:
        be.get_job(job.name)
    assert info.value.code == 500
    assert [s for m, _, s in sim.requests_log if m == "GET"] == [500, 500]


def test_dropped_connection_on_get_is_transient(sim: Simulator, clock: FakeClock) -> None:
    be = backend(sim, retries=1)
    job = be.create_job(MODEL, "d", requests("a"))
    assert job.name
    sim.add_fault(Fault(method="GET", status=0))
    with pytest.raises(TransientError):
        be.get_job(job.name)
    assert be.get_job(job.name).name == job.name


def test_get_of_a_forgotten_job_is_permanent_404(sim: Simulator, clock: FakeClock) -> None:
    be = backend(sim, retries=3)
    job = be.create_job(MODEL, "gone", requests("a"))
    assert job.name
    sim.forget_job(job.name)
    with pytest.raises(PermanentError) as info:
        be.get_job(job.name)
    assert info.value.code == 404
    assert job.name in str(info.value)


def test_unreachable_server_is_transient() -> None:
    with Simulator() as gone:
        url = gone.base_url
    be = GeminiBackend("k", base_url=url, retries=1, timeout_seconds=2)
    with pytest.raises(TransientError):
        be.get_job("batches/x")


def test_bad_key_is_permanent(clock: FakeClock) -> None:
    with Simulator(api_key="right") as locked:
        be = GeminiBackend("wrong", base_url=locked.base_url, retries=1)
        with pytest.raises(PermanentError) as info:
            be.find_job("anything")
    assert info.value.code == 400
    assert "wrong" not in str(info.value)


# ---- File API ---------------------------------------------------------------------------------------


def test_upload_create_download_round_trip(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    sim.shuffle_output = True
    be = backend(sim)
    items = requests(*(f"prompt {i} é" for i in range(20)))
    source = tmp_path / ".upload.tmp"
    source.write_bytes(b"".join(file_line(r) for r in items))
    name = be.upload(source, "gemini-batchd/x.jsonl/abc/1")
    assert name.startswith("files/")
    assert sim.uploaded_files[name] == source.read_bytes()

    job = be.create_job(MODEL, "file-job", name)
    assert job.name
    assert sim.jobs[job.name]["input_file"] == name
    finish(clock)
    done = be.get_job(job.name)
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.file_name

    download = tmp_path / "responses.jsonl"
    be.download(done.dest.file_name, download)
    lines = [json.loads(line) for line in download.read_text(encoding="utf-8").splitlines()]
    by_key = {line["key"]: line for line in lines}
    assert set(by_key) == {r.key for r in items}
    text = by_key["k7"]["response"]["candidates"][0]["content"]["parts"][0]["text"]
    assert text.endswith("prompt 6 é")
    be.delete_file(name)
    assert name not in sim.uploaded_files


def test_upload_uses_the_jsonl_mime_type(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(file_line(requests("a")[0]))
    be = backend(sim)  # keep the client alive: a collected client closes its connection
    name = be.upload(path, "shown")
    info = be.client.files.get(name=name)
    assert info.mime_type == BATCH_MIME_TYPE
    assert info.display_name == "shown"


def test_download_of_an_unknown_file_is_an_error(sim: Simulator, tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        backend(sim).download("files/nope", tmp_path / "out")


def test_file_line() -> None:
    request = Request("k", 1, {"contents": [{"role": "user", "parts": [{"text": "é"}]}]}, False)
    line = file_line(request)
    assert line.endswith(b"\n")
    assert json.loads(line) == {"key": "k", "request": request.body}
    assert "é".encode() in line


def test_to_inlined() -> None:
    inlined = to_inlined(requests("hello")[0])
    assert inlined.metadata == {"key": "k1"}
    assert inlined.config is not None
    assert inlined.config.temperature == 0.3
    assert inlined.config.thinking_config is not None
    assert inlined.config.thinking_config.thinking_budget == 0
    assert inlined.config.system_instruction is not None


def test_the_client_is_kept(sim: Simulator) -> None:
    be = backend(sim)
    assert isinstance(be.client, genai.Client)
    assert be.client is be.client
    given = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=sim.base_url))
    assert GeminiBackend("k", client=given).client is given


# ---- classify ---------------------------------------------------------------------------------------


def api_error(code: int, status: str = "X") -> errors.APIError:
    body = {"error": {"code": code, "message": "msg", "status": status}}
    return (errors.ClientError if code < 500 else errors.ServerError)(code, body)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_classify_transient_codes(code: int) -> None:
    error = classify(api_error(code, "S"), "poll")
    assert isinstance(error, TransientError)
    assert (error.code, error.status) == (code, "S")
    assert str(error).startswith(f"poll: {code} S msg")


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 501])
def test_classify_permanent_codes(code: int) -> None:
    error = classify(api_error(code), "poll")
    assert isinstance(error, PermanentError)
    assert error.code == code


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.ConnectError("refused"),
        httpx2.ReadError("reset"),
        httpx2.ReadTimeout("slow"),
        httpx2.RemoteProtocolError("gone"),
        ConnectionResetError("reset"),
        TimeoutError("slow"),
        OSError("network down"),
    ],
)
def test_classify_transport_errors_are_transient(exc: BaseException) -> None:
    error = classify(exc, "get")
    assert isinstance(error, TransientError)
    assert error.code is None
    assert type(exc).__name__ in str(error)


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("x-goog-upload-url"), TypeError()])
def test_classify_other_errors_are_permanent(exc: BaseException) -> None:
    assert isinstance(classify(exc, "upload"), PermanentError)


def test_api_call_wraps_and_passes_backend_errors_through() -> None:
    with pytest.raises(PermanentError, match="act: ValueError"), api_call("act"):
        raise ValueError("x")
    original = TransientError("keep me")
    with pytest.raises(TransientError) as info, api_call("act"):
        raise original
    assert info.value is original


def test_job_error_message() -> None:
    assert job_error_message(types.BatchJob(name="batches/x")) is None
    job = types.BatchJob(name="batches/x", error=types.JobError(code=13, message="boom"))
    assert job_error_message(job) == "boom"
    assert job_error_message(types.BatchJob(error=types.JobError(code=13))) == "13"
