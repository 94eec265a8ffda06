"""daemon.api.gemini against the simulator, through the real google-genai SDK: every Batch API call,
create sent exactly once, errors propagated raw (`failures.classify` is tested on its own)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from daemon import answers, failures
from daemon.api import RemoteJob, http
from daemon.api.gemini import BATCH_MIME_TYPE, GeminiEngine, key_fingerprint
from daemon.api.http import LIST_PAGE_SIZE
from daemon.errors import BadReply
from daemon.inputs import Defaults, Request, prompt_request, wire_line
from daemon.schedule import Backoff
from daemon.simulator import Fault, Simulator
from tests.support.harness import FakeClock

MODEL = "gemini-2.5-flash"
DEFAULTS = Defaults(system_prompt="Be brief.", temperature=0.3, thinking_budget=0)


@pytest.fixture
def made(sim: Simulator) -> Iterator[list[GeminiEngine]]:
    backends: list[GeminiEngine] = []
    yield backends
    for backend in backends:
        backend.close()


MakeBackend = Callable[..., GeminiEngine]


@pytest.fixture
def new_backend(sim: Simulator, made: list[GeminiEngine]) -> MakeBackend:
    def make(retries: int = 1, **options: Any) -> GeminiEngine:
        options = {"base_url": sim.base_url, "timeout_seconds": 10, **options}
        backend = GeminiEngine("test-key", retries=retries, **options)
        made.append(backend)
        return backend

    return make


def requests(*prompts: str) -> list[Request]:
    return [prompt_request(f"k{i}", i, p, DEFAULTS) for i, p in enumerate(prompts, 1)]


def request_file(folder: Path, items: list[Request], name: str = "job.req") -> Path:
    path = folder / name
    path.write_bytes(b"".join(r.wire for r in items))
    return path


def finish(clock: FakeClock) -> None:
    clock.now += 3600


# ---- create / get / list / cancel -----------------------------------------------------------


def test_create_inline_sends_keys_in_metadata_and_the_request_body(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    source = request_file(tmp_path, requests("hello", "world"))
    job = new_backend().create_job(MODEL, "gemini-batchd/x.jsonl/abc/1", source, inline=True)
    assert isinstance(job, RemoteJob)
    assert job.name.startswith("batches/")
    assert job.display_name == "gemini-batchd/x.jsonl/abc/1"
    assert (job.state_name, job.done) == ("JOB_STATE_PENDING", False)
    record = sim.jobs[job.name]
    assert record["model"] == f"models/{MODEL}"
    assert [r["key"] for r in record["requests"]] == ["k1", "k2"]
    first = record["requests"][0]["request"]
    assert first["contents"] == [{"role": "user", "parts": [{"text": "hello"}]}]
    assert first["generationConfig"]["temperature"] == 0.3
    assert first["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert first["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert sim.create_calls == 1


def test_an_inline_create_sends_integers_past_64_bits_exactly(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    source = tmp_path / "job.req"
    request = {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    for seed in (-9300000000000000000, 123456789012345678901234):
        request["generationConfig"] = {"seed": seed}
        source.write_text(json.dumps({"key": "k", "request": request}) + "\n")
        job = new_backend().create_job(MODEL, f"s{seed}", source, inline=True)
        sent = sim.jobs[job.name]["requests"][0]["request"]
        assert sent["generationConfig"]["seed"] == seed


def test_a_model_path_is_sent_as_given(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    source = request_file(tmp_path, requests("a"))
    job = new_backend().create_job("models/gemini-2.0-flash", "m", source, inline=True)
    assert sim.jobs[job.name]["model"] == "models/gemini-2.0-flash"


def test_get_job_until_done_with_progress_and_inline_answers(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    sim.shuffle_output = True
    sim.fail_keys = {"k3": 400}
    sim.missing_keys = {"k4"}
    backend = new_backend()
    source = request_file(tmp_path, requests("a", "b", "c", "d", "e", "f"))
    job = backend.create_job(MODEL, "d", source, inline=True)
    assert not backend.get_job(job.name).done
    finish(clock)
    done = backend.get_job(job.name)
    assert (done.state_name, done.done) == ("JOB_STATE_SUCCEEDED", True)
    assert done.progress is not None and done.progress.total == 6
    assert done.error_code is None and done.error_message is None
    matched = answers.match_inline([f"k{i}" for i in range(1, 7)], done.inline_responses or [])
    assert set(matched.entries) == {"k1", "k2", "k3", "k5", "k6"}
    error = matched.entries["k3"].error
    assert error is not None and error["code"] == 400
    assert matched.entries["k3"].response is None
    response = matched.entries["k2"].response
    assert response is not None
    assert response["candidates"][0]["content"]["parts"][0]["text"].endswith("b")
    assert "usageMetadata" in response  # the REST (camelCase) body, exactly as sent


def test_native_request_is_sent_as_written(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"temperature": 1.0, "responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "native"}]},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "futureField": {"kept": True},
    }
    source = request_file(tmp_path, [Request("n1", 1, wire_line("n1", body), False)])
    job = new_backend().create_job(MODEL, "n", source, inline=True)
    assert sim.jobs[job.name]["requests"][0]["request"] == body


def test_find_job_pages_through_more_than_a_page(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend()
    source = request_file(tmp_path, requests("x"))
    total = LIST_PAGE_SIZE + 50
    names = [backend.create_job(MODEL, f"job-{i}", source, inline=True).name for i in range(total)]
    before = len(sim.requests_log)
    # The simulator lists newest first: job-0 is on the second page.
    found = backend.find_job("job-0")
    assert found is not None and found.name == names[0]
    list_calls = [p for m, p, _ in sim.requests_log[before:] if m == "GET" and "/batches" in p]
    assert len(list_calls) == 2
    assert "pageToken" in list_calls[1]
    assert backend.find_job("job-149") is not None
    assert backend.find_job("no-such-job") is None


def test_find_job_with_no_jobs(new_backend: MakeBackend) -> None:
    assert new_backend().find_job("anything") is None


def test_find_job_raises_when_a_page_fails(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    """An incomplete listing proves nothing: it must not look like "no such job"."""
    backend = new_backend()
    source = request_file(tmp_path, requests("x"))
    for i in range(LIST_PAGE_SIZE + 1):
        backend.create_job(MODEL, f"job-{i}", source, inline=True)
    sim.add_fault(Fault("GET", "pageToken", status=503))
    with pytest.raises(errors.ServerError):
        backend.find_job("job-0")
    sim.add_fault(Fault.garbled("html", path_contains="pageToken"))
    with pytest.raises(BadReply):
        backend.find_job("job-0")


def test_cancel_job(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend()
    job = backend.create_job(MODEL, "c", request_file(tmp_path, requests("a")), inline=True)
    backend.cancel_job(job.name)
    cancelled = backend.get_job(job.name)
    assert (cancelled.state_name, cancelled.done) == ("JOB_STATE_CANCELLED", True)
    assert backend.find_job("c") is not None  # cancelled, not deleted


def test_failed_job_carries_the_operation_error(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend()
    job = backend.create_job(MODEL, "f", request_file(tmp_path, requests("a")), inline=True)
    sim.set_job_state(job.name, "FAILED", "quota exhausted")
    failed = backend.get_job(job.name)
    assert (failed.state_name, failed.done) == ("JOB_STATE_FAILED", True)
    assert failed.error_message == "quota exhausted"


def test_probe_is_one_cheap_listing(sim: Simulator, new_backend: MakeBackend) -> None:
    new_backend().probe()
    assert [(m, p.split("?")[1]) for m, p, _ in sim.requests_log] == [("GET", "pageSize=1")]


def test_a_name_that_is_not_a_batch_is_refused_before_any_call(sim: Simulator, new_backend) -> None:
    with pytest.raises(ValueError, match="not a batch job name"):
        new_backend().get_job("files/abc")
    assert sim.requests_log == []


def test_endpoint_and_account(sim: Simulator, new_backend: MakeBackend) -> None:
    backend = new_backend(api_version="v1")
    assert backend.endpoint == f"{sim.base_url}/v1"
    assert backend.account == key_fingerprint("test-key") != key_fingerprint("other-key")
    assert "test-key" not in backend.account


# ---- create is sent exactly once; errors come out raw --------------------------------------------


def test_create_is_sent_once_when_the_reply_is_lost(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    """503 after the job was created: no SDK retry (it would make a second job)."""
    backend = new_backend(retries=5)
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", after=True))
    with pytest.raises(errors.ServerError) as info:
        backend.create_job(MODEL, "lost-reply", request_file(tmp_path, requests("a")), inline=True)
    assert info.value.code == 503
    assert sim.create_calls == 1
    assert sim.jobs_created_for("lost-reply") == 1
    assert backend.find_job("lost-reply") is not None  # what the caller does next


@pytest.mark.parametrize("status", [429, 0])
def test_create_is_not_retried_even_before_the_server_acts(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path, status: int
) -> None:
    sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", status=status))
    with pytest.raises((errors.ClientError, httpx2.TransportError)):
        new_backend(retries=5).create_job(
            MODEL, "refused", request_file(tmp_path, requests("a")), inline=True
        )
    assert sim.create_calls == 1
    assert sim.jobs_created_for("refused") == 0


def test_create_with_an_unknown_model_is_a_404(new_backend: MakeBackend, tmp_path: Path) -> None:
    with pytest.raises(errors.ClientError) as info:
        new_backend().create_job(
            "does-not-exist", "m", request_file(tmp_path, requests("a")), inline=True
        )
    assert info.value.code == 404
    policy = failures.RetryPolicy(Backoff(1, 10))
    decision = policy.decide(failures.classify(info.value, "create"), failures.Call.CREATE, 1)
    assert decision.action is failures.Action.GIVE_UP  # the API said no: an error report


@pytest.mark.parametrize(
    "fault",
    [
        Fault.garbled(body, after=True, path_contains="batchGenerateContent")
        for body in ("html", "truncated", "empty")
    ],
    ids=["html", "truncated", "empty"],
)
def test_an_unusable_create_reply_is_a_bad_reply(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path, fault: Fault
) -> None:
    """The job was made but the reply cannot be read: a transient failure, looked up next."""
    sim.add_fault(fault)
    with pytest.raises(BadReply) as info:
        new_backend(retries=5).create_job(
            MODEL, "garbled", request_file(tmp_path, requests("a")), inline=True
        )
    assert failures.classify(info.value, "create").kind is failures.Kind.TRANSIENT
    assert sim.create_calls == 1 and sim.jobs_created_for("garbled") == 1


# ---- other calls: the SDK's retry options --------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_transient_get_is_retried_by_the_sdk(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path, status: int
) -> None:
    """GeminiEngine's own retry options, with the SDK's waits made short for the test."""
    retry = types.HttpRetryOptions(
        attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0, http_status_codes=[429, 503]
    )
    options = http.http_options(
        base_url=sim.base_url, api_version=None, timeout_seconds=10, retry_options=retry
    )
    backend = GeminiEngine(
        "test-key", client=genai.Client(api_key="test-key", http_options=options)
    )
    try:
        job = backend.create_job(MODEL, "r", request_file(tmp_path, requests("a")), inline=True)
        sim.add_fault(Fault(method="GET", path_contains="batches/", status=status, times=2))
        assert backend.get_job(job.name).name == job.name
        statuses = [s for m, p, s in sim.requests_log if m == "GET"]
        assert statuses == [status, status, 200]
        sim.add_fault(Fault(method="POST", path_contains="batchGenerateContent", status=status))
        with pytest.raises(errors.APIError):  # never a create: it could make a second job
            backend.create_job(MODEL, "once", request_file(tmp_path, requests("a")), inline=True)
        assert sim.create_calls == 2
    finally:
        backend.close()
        assert options.httpx_client is not None
        options.httpx_client.close()


def test_transient_get_without_retries_raises_and_the_next_works(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend(retries=1)
    job = backend.create_job(MODEL, "r", request_file(tmp_path, requests("a")), inline=True)
    sim.add_fault(Fault(method="GET", path_contains="batches/", status=503))
    with pytest.raises(errors.ServerError) as info:
        backend.get_job(job.name)
    assert info.value.code == 503
    assert backend.get_job(job.name).name == job.name


def test_dropped_connection_on_get_is_a_transport_error(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend(retries=1)
    job = backend.create_job(MODEL, "d", request_file(tmp_path, requests("a")), inline=True)
    sim.add_fault(Fault(method="GET", status=0))
    with pytest.raises(httpx2.TransportError):
        backend.get_job(job.name)
    assert backend.get_job(job.name).name == job.name


def test_get_of_a_forgotten_job_is_a_404(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    backend = new_backend(retries=3)
    job = backend.create_job(MODEL, "gone", request_file(tmp_path, requests("a")), inline=True)
    sim.forget_job(job.name)
    with pytest.raises(errors.ClientError) as info:
        backend.get_job(job.name)
    assert info.value.code == 404
    assert failures.classify(info.value, "poll").kind is failures.Kind.NOT_FOUND


def test_unreachable_server_is_a_transport_error() -> None:
    with Simulator() as gone:
        url = gone.base_url
    backend = GeminiEngine("k", base_url=url, retries=1, timeout_seconds=2)
    try:
        with pytest.raises(httpx2.TransportError):
            backend.get_job("batches/x")
    finally:
        backend.close()


def test_a_rejected_key_is_an_auth_failure_without_the_key(clock: FakeClock) -> None:
    with Simulator(api_key="right") as locked:
        backend = GeminiEngine("wrong-key-0123456789", base_url=locked.base_url, retries=1)
        try:
            with pytest.raises(errors.ClientError) as info:
                backend.find_job("anything")
        finally:
            backend.close()
    assert info.value.code == 400
    failure = failures.classify(info.value, "lookup")
    assert failure.kind is failures.Kind.AUTH
    assert "wrong-key-0123456789" not in str(info.value)


# ---- File API ---------------------------------------------------------------------------------


def test_upload_create_download_round_trip(
    sim: Simulator, clock: FakeClock, new_backend: MakeBackend, tmp_path: Path
) -> None:
    sim.shuffle_output = True
    backend = new_backend()
    items = requests(*(f"prompt {i} é" for i in range(20)))
    source = request_file(tmp_path, items, ".upload.tmp")
    name = backend.upload(source, "gemini-batchd/x.jsonl/abc/1")
    assert name.startswith("files/")
    assert sim.uploaded_files[name] == source.read_bytes()
    assert backend.find_uploads("gemini-batchd/x.jsonl/abc/1") == [name]
    assert backend.find_uploads("someone else's") == []

    job = backend.create_job(MODEL, "file-job", name, inline=False)
    assert sim.jobs[job.name]["input_file"] == name
    finish(clock)
    done = backend.get_job(job.name)
    assert done.state == "JOB_STATE_SUCCEEDED"
    assert done.results and done.inline_responses is None

    download = tmp_path / "responses.jsonl"
    backend.download(done.results, download, expected_bytes=source.stat().st_size)
    lines = [json.loads(line) for line in download.read_text(encoding="utf-8").splitlines()]
    by_key = {line["key"]: line for line in lines}
    assert set(by_key) == {r.key for r in items}
    text = by_key["k7"]["response"]["candidates"][0]["content"]["parts"][0]["text"]
    assert text.endswith("prompt 6 é")
    backend.delete(name)
    assert name not in sim.uploaded_files


def test_upload_uses_the_jsonl_mime_type(
    sim: Simulator, new_backend: MakeBackend, tmp_path: Path
) -> None:
    path = request_file(tmp_path, requests("a"), "x.jsonl")
    backend = new_backend()
    name = backend.upload(path, "shown")
    info = backend.client.files.get(name=name)
    assert info.mime_type == BATCH_MIME_TYPE
    assert info.display_name == "shown"


def test_download_of_an_unknown_file_is_an_error(new_backend: MakeBackend, tmp_path: Path) -> None:
    with pytest.raises(errors.APIError):
        new_backend().download("files/nope", tmp_path / "out")


def test_a_given_client_is_used(sim: Simulator) -> None:
    given = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=sim.base_url))
    backend = GeminiEngine("k", client=given)
    assert backend.client is given
    assert backend.find_job("none") is None
    backend.close()
