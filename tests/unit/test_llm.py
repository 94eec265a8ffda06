"""daemon.llm: the library API (GeminiLLM, LLMService) against the simulator via a real client."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types

from daemon.api.gemini import GeminiEngine
from daemon.llm import GeminiLLM, LLMProviderError, LLMService, sdk_response
from daemon.simulator import Simulator
from daemon.simulator import server as simulator
from tests.support import recorded
from tests.support.harness import FakeClock

JSON_CONFIG = "[[sim:fenced]]"  # the simulator answers with fenced, trailing-comma JSON


@pytest.fixture
def client(sim: Simulator) -> genai.Client:
    return genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=sim.base_url))


def finish(clock: FakeClock) -> None:
    clock.now += 3600


def sent_texts(sim: Simulator, name: str) -> list[str]:
    return [r["request"]["contents"][0]["parts"][0]["text"] for r in sim.jobs[name]["requests"]]


# ---- GeminiLLM ---------------------------------------------------------------------------------


def test_create_get_fetch_in_input_order(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    sim.shuffle_output = True
    llm = GeminiLLM(client=client)
    payload = [[f"prompt {i}"] for i in range(30)]
    name = llm.create_batch_job(payload)
    assert name.startswith("batches/")
    job = llm.get_batch_job(name)
    assert isinstance(job, types.BatchJob)
    assert not job.done
    finish(clock)
    job = llm.get_batch_job(name)
    assert job.done
    assert job.state is types.JobState.JOB_STATE_SUCCEEDED
    results = llm.fetch_batch_results(name)
    assert len(results) == 30
    assert all(isinstance(r, types.GenerateContentResponse) for r in results)
    assert [r.text for r in results] == [f"Simulated answer: prompt {i}" for i in range(30)]


def test_prompt_sequence_is_one_user_turn(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["Categorise: French", "context"], "a bare string"])
    assert sent_texts(sim, name) == ["Categorise: French\ncontext", "a bare string"]
    request = sim.jobs[name]["requests"][0]["request"]
    assert len(request["contents"]) == 1
    assert request["contents"][0]["role"] == "user"


def test_generation_settings_are_sent(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(
        "Be brief.", client=client, model="gemini-2.5-pro", temperature=0.7, thinking_budget=0
    )
    name = llm.create_batch_job([["x"]])
    record = sim.jobs[name]
    assert record["model"] == "models/gemini-2.5-pro"
    request = record["requests"][0]["request"]
    assert request["generationConfig"]["temperature"] == 0.7
    assert request["systemInstruction"]["parts"] == [{"text": "Be brief."}]


def test_filter_json_returns_parsed_values(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    sim.shuffle_output = True
    llm = GeminiLLM(client=client)
    payload = [[f"{JSON_CONFIG} item {i}"] for i in range(10)]
    name = llm.create_batch_job(payload, filter_json=True)
    finish(clock)
    results = llm.fetch_batch_results(name)
    assert [r["echo"] for r in results] == [f"{JSON_CONFIG} item {i}" for i in range(10)]
    assert all(isinstance(r["words"], int) for r in results)


def test_filter_json_from_the_constructor(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(filter_json=True, client=client)
    name = llm.create_batch_job([[f"{JSON_CONFIG} a"]])
    finish(clock)
    assert llm.fetch_batch_results(name)[0]["echo"] == f"{JSON_CONFIG} a"


def test_fetch_while_not_done_is_a_value_error(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"]])
    with pytest.raises(ValueError, match="not done"):
        llm.fetch_batch_results(name)
    clock.now += 0.15  # running now (pending 0.1 s, running 0.2 s)
    assert llm.get_batch_job(name).state is types.JobState.JOB_STATE_RUNNING
    with pytest.raises(ValueError, match="not done"):
        llm.fetch_batch_results(name)


@pytest.mark.parametrize("payload", [[], [[]], [[""]], [["ok"], ["   "]]])
def test_empty_payload_is_a_value_error(
    sim: Simulator, client: genai.Client, payload: list[list[str]]
) -> None:
    with pytest.raises(ValueError):
        GeminiLLM(client=client).create_batch_job(payload)
    assert sim.create_calls == 0


def test_failed_job_raises_llm_provider_error(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"]])
    sim.set_job_state(name, "FAILED", "quota exhausted")
    with pytest.raises(LLMProviderError, match="JOB_STATE_FAILED") as info:
        llm.fetch_batch_results(name)
    assert name in str(info.value)


@pytest.mark.parametrize("outcome", ["EXPIRED", "CANCELLED"])
def test_other_unsuccessful_endings_raise(
    sim: Simulator, clock: FakeClock, client: genai.Client, outcome: str
) -> None:
    sim.outcome = outcome
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"]])
    finish(clock)
    with pytest.raises(LLMProviderError, match=f"JOB_STATE_{outcome}"):
        llm.fetch_batch_results(name)


def test_some_requests_failed(sim: Simulator, clock: FakeClock, client: genai.Client) -> None:
    sim.shuffle_output = True
    llm = GeminiLLM(client=client)
    payload = [["ok one"], ["[[sim:error=400]] bad"], ["ok three"], ["[[sim:missing]] lost"]]
    name = llm.create_batch_job(payload)
    finish(clock)
    with pytest.raises(LLMProviderError) as info:
        llm.fetch_batch_results(name)
    error = info.value
    assert error.results is not None
    assert len(error.results) == 4
    assert error.results[1] is None and error.results[3] is None
    assert isinstance(error.results[0], types.GenerateContentResponse)
    assert error.results[0].text == "Simulated answer: ok one"
    assert error.results[2].text == "Simulated answer: ok three"
    message = str(error)
    assert "2 of 4" in message
    assert "2 (" in message and "4 (" in message  # the failed keys are named
    assert "1 (" not in message and "3 (" not in message


def test_unparseable_json_counts_as_a_failed_request(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([[f"{JSON_CONFIG} a"], ["plain prose"]], filter_json=True)
    finish(clock)
    with pytest.raises(LLMProviderError, match="2 ") as info:
        llm.fetch_batch_results(name)
    assert info.value.results is not None
    assert info.value.results[0]["echo"] == f"{JSON_CONFIG} a"
    assert info.value.results[1] is None


def test_fetch_from_another_instance_orders_numeric_keys(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    sim.shuffle_output = True
    name = GeminiLLM(client=client).create_batch_job([[f"p{i}"] for i in range(12)])
    finish(clock)
    results = GeminiLLM(client=client).fetch_batch_results(name)
    assert [r.text for r in results] == [f"Simulated answer: p{i}" for i in range(12)]


def test_cancel_batch_job(sim: Simulator, clock: FakeClock, client: genai.Client) -> None:
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"]])
    llm.cancel_batch_job(name)
    assert name in sim.jobs  # still listed: cancelled, not deleted
    assert sim.jobs[name]["state"] == "BATCH_STATE_CANCELLED"
    job = llm.get_batch_job(name)
    assert job.state is types.JobState.JOB_STATE_CANCELLED
    assert job.done
    with pytest.raises(LLMProviderError):
        llm.fetch_batch_results(name)


def test_batch_generate_is_not_implemented(client: genai.Client) -> None:
    with pytest.raises(NotImplementedError):
        GeminiLLM(client=client).batch_generate([["a"]])


def test_client_property(client: genai.Client) -> None:
    assert GeminiLLM(client=client).client is client


# ---- system_prompt -------------------------------------------------------------------------------


def test_system_prompt_from_a_file(
    sim: Simulator, clock: FakeClock, client: genai.Client, tmp_path: Path
) -> None:
    prompt = tmp_path / "categorise.md"
    prompt.write_text("Categorise the subject.\n", encoding="utf-8")
    for value in (str(prompt), prompt):
        llm = GeminiLLM(system_prompt=value, client=client)
        assert llm.system_prompt == "Categorise the subject.\n"
        name = llm.create_batch_job([["x"]])
        request = sim.jobs[name]["requests"][0]["request"]
        assert request["systemInstruction"]["parts"] == [{"text": "Categorise the subject.\n"}]


def test_system_prompt_as_text(client: genai.Client) -> None:
    assert GeminiLLM("You are a classifier.", client=client).system_prompt == (
        "You are a classifier."
    )
    long_text = "word " * 2000
    assert GeminiLLM(long_text, client=client).system_prompt == long_text
    assert GeminiLLM(None, client=client).system_prompt is None


def test_system_prompt_path_object_that_does_not_exist(
    client: genai.Client, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        GeminiLLM(tmp_path / "missing.md", client=client)


# ---- LLMService --------------------------------------------------------------------------------


class NoBatches:
    name = "interactive"

    def __init__(self) -> None:
        self.calls = 0

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool = False
    ) -> str:
        self.calls += 1
        raise NotImplementedError


class NoBatchMethod:
    name = "plain"


def test_service_creates_on_the_first_provider_that_supports_batches(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    skipped = NoBatches()
    llm = GeminiLLM(client=client)
    service = LLMService([NoBatchMethod(), skipped, llm])
    provider, name = service.create_batch_job(
        [[f"{JSON_CONFIG} a"], [f"{JSON_CONFIG} b"]], filter_json=True
    )
    assert provider == "gemini"
    assert skipped.calls == 1
    assert service.get_batch_job_status(provider, name).state is types.JobState.JOB_STATE_PENDING
    finish(clock)
    assert service.get_batch_job_status(provider, name).done
    results = service.fetch_batch_results(provider, name)
    assert [r["echo"] for r in results] == [f"{JSON_CONFIG} a", f"{JSON_CONFIG} b"]


def test_service_cancel(sim: Simulator, clock: FakeClock, client: genai.Client) -> None:
    service = LLMService([GeminiLLM(client=client)])
    provider, name = service.create_batch_job([["a"]])
    service.cancel_batch_job(provider, name)
    assert sim.jobs[name]["state"] == "BATCH_STATE_CANCELLED"


def test_service_without_a_batch_provider(sim: Simulator) -> None:
    with pytest.raises(NotImplementedError):
        LLMService([NoBatches(), NoBatchMethod()]).create_batch_job([["a"]])
    with pytest.raises(NotImplementedError):
        LLMService([]).create_batch_job([["a"]])


def test_service_unknown_provider_name(client: genai.Client) -> None:
    service = LLMService([GeminiLLM(client=client)])
    for call in (
        lambda: service.get_batch_job_status("openai", "batches/x"),
        lambda: service.fetch_batch_results("openai", "batches/x"),
        lambda: service.cancel_batch_job("openai", "batches/x"),
    ):
        with pytest.raises(ValueError, match="unknown provider 'openai'"):
            call()


def test_service_names_duplicate_providers_uniquely(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    first, second = GeminiLLM(client=client), GeminiLLM(client=client)
    service = LLMService([first, second])
    provider, name = service.create_batch_job([["a"]])
    assert provider == "gemini"
    assert isinstance(service.get_batch_job_status("gemini-2", name), types.BatchJob)


def test_service_passes_provider_errors_through(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    service = LLMService([GeminiLLM(client=client)])
    provider, name = service.create_batch_job([["[[sim:error=500]] x"]])
    finish(clock)
    with pytest.raises(LLMProviderError) as info:
        service.fetch_batch_results(provider, name)
    results: Any = info.value.results
    assert results == [None]


# ---- system_prompt: a path that names no file -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "prompts/categorise.md",
        "categorise.md",
        "notes.txt",
        "./prompt",
        "prompts/categorise",
        "/no/such/dir/prompt",
        "~/prompts/categorise.md",
        "My Prompts/categorise.md",
        "prompts/",  # a directory names no file
    ],
)
def test_system_prompt_that_looks_like_a_missing_file_raises(
    client: genai.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts").mkdir()
    with pytest.raises(FileNotFoundError, match="system_prompt") as info:
        GeminiLLM(system_prompt=value, client=client)
    assert info.value.filename == value


@pytest.mark.parametrize(
    "value",
    [
        "You are a classifier.",
        "Be brief.",
        "Answer yes/no.",
        "Classify each subject as science/humanities/arts and reply in JSON.",
        'Reply with a JSON object, e.g. {"a": 1}.',
        "Read the rules.\nprompts/categorise.md is where they came from.",
        "Summarise",
        "e.g.",
    ],
)
def test_system_prompt_text_that_is_not_a_path(
    client: genai.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert GeminiLLM(system_prompt=value, client=client).system_prompt == value


def test_system_prompt_relative_and_home_paths(
    client: genai.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "categorise.md").write_text("Categorise.\n", encoding="utf-8")
    for value in ("prompts/categorise.md", "~/prompts/categorise.md"):
        assert GeminiLLM(system_prompt=value, client=client).system_prompt == "Categorise.\n"


# ---- filter_json: an explicit argument wins ------------------------------------------------------


def test_explicit_filter_json_false_wins_over_the_instance(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    llm = GeminiLLM(filter_json=True, client=client)
    name = llm.create_batch_job([[f"{JSON_CONFIG} a"]], filter_json=False)
    finish(clock)
    (result,) = llm.fetch_batch_results(name)
    assert isinstance(result, types.GenerateContentResponse)
    assert result.text is not None and result.text.startswith("Here you go")
    # None keeps the instance's setting.
    name = llm.create_batch_job([[f"{JSON_CONFIG} b"]], filter_json=None)
    finish(clock)
    assert llm.fetch_batch_results(name)[0]["echo"] == f"{JSON_CONFIG} b"


def test_service_filter_json_none_keeps_the_provider_setting(
    sim: Simulator, clock: FakeClock, client: genai.Client
) -> None:
    service = LLMService([GeminiLLM(filter_json=True, client=client)])
    provider, by_default = service.create_batch_job([[f"{JSON_CONFIG} a"]])
    _, explicit_off = service.create_batch_job([[f"{JSON_CONFIG} b"]], filter_json=False)
    finish(clock)
    assert service.fetch_batch_results(provider, by_default)[0]["echo"] == f"{JSON_CONFIG} a"
    (response,) = service.fetch_batch_results(provider, explicit_off)
    assert isinstance(response, types.GenerateContentResponse)


# ---- live shapes: recorded payloads and unknown fields through the real SDK ----------------------

LIVE_PROMPTS = {
    "thinking": "resp_pai_thinking_part",
    "search": "resp_ellmer_web_search",
    "max tokens": "resp_pai_max_tokens_thinking_empty",
    "safety": "resp_pai_safety_block",
    "prompt blocked": "resp_vercel4236_prompt_blocked",
}


def inline_items(op: dict[str, Any]) -> list[dict[str, Any]]:
    """The inline output items of an Operation, in `metadata.output` and in `response`."""
    items: list[dict[str, Any]] = []
    for holder in (op.get("metadata", {}).get("output"), op.get("response")):
        items += ((holder or {}).get("inlinedResponses") or {}).get("inlinedResponses", [])
    return items


def prompt_of(request: dict[str, Any]) -> str:
    return str(request["contents"][0]["parts"][0]["text"])


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> dict[str, bool]:
    """The simulator answers LIVE_PROMPTS with recorded payloads, `status` errors for "missing
    model", and (while `future` is on) unknown fields at every level of every reply."""
    knobs = {"future": True}
    original_response = simulator.simulate_response

    def answer(request: dict[str, Any], model: str, response_id: str) -> dict[str, Any]:
        prompt = prompt_of(request)
        entry: dict[str, Any]
        if prompt in LIVE_PROMPTS:
            entry = {"response": recorded.load(LIVE_PROMPTS[prompt])}
        elif prompt == "missing model":
            entry = {"status": recorded.load("error_pai_404_status")}
        else:
            entry = original_response(request, model, response_id)
        return recorded.add_future_fields(entry) if knobs["future"] else entry

    original_operation = sim._operation

    def operation(*args: Any, **kwargs: Any) -> dict[str, Any]:
        op = original_operation(*args, **kwargs)
        if not knobs["future"]:
            return op
        future: dict[str, Any] = recorded.add_future_fields(op)
        # Inline items echo the request's metadata, a map of strings the client chose: as sent.
        for sent, echoed in zip(inline_items(op), inline_items(future), strict=True):
            if "metadata" in sent:
                echoed["metadata"] = sent["metadata"]
        return future

    monkeypatch.setattr(simulator, "simulate_response", answer)
    monkeypatch.setattr(sim, "_operation", operation)
    return knobs


LIVE_PAYLOAD = [["thinking"], ["search"], ["max tokens"], ["safety"], ["prompt blocked"]]
LIVE_PAYLOAD += [["missing model"], ["plain"]]


def check_live_results(error: LLMProviderError) -> None:
    results: Any = error.results
    assert len(results) == 7
    thinking, search, max_tokens, safety, blocked, missing_model, plain = results
    assert isinstance(thinking, types.GenerateContentResponse)
    answer = recorded.load("resp_pai_thinking_part")["candidates"][0]["content"]["parts"][1]
    assert thinking.text == answer["text"]  # the thought part is left out
    assert search.text == "2014-05-21"
    assert search.usage_metadata.cached_content_token_count == 92
    signature = recorded.load("resp_ellmer_web_search")["candidates"][0]["content"]["parts"][0]
    assert search.candidates[0].content.parts[0].thought_signature == base64.b64decode(
        signature["thoughtSignature"]
    )
    assert not max_tokens.text
    assert max_tokens.candidates[0].finish_reason is types.FinishReason.MAX_TOKENS
    assert (safety, blocked, missing_model) == (None, None, None)
    assert plain.text == "Simulated answer: plain"
    message = str(error)
    assert "3 of 7 requests failed" in message
    assert "4 (blocked: the answer was withheld: SAFETY" in message
    assert "5 (blocked: the prompt was blocked: PROHIBITED_CONTENT" in message
    assert "6 (request: 404 models/gemini-3.6-flahs is not found" in message


@pytest.mark.parametrize("future", [True, False], ids=["future-fields", "as-recorded"])
def test_recorded_payloads_inline_never_raise(
    sim: Simulator, clock: FakeClock, client: genai.Client, live: dict[str, bool], future: bool
) -> None:
    live["future"] = future
    sim.shuffle_output = True
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job(LIVE_PAYLOAD)
    assert llm.get_batch_job(name).state is types.JobState.JOB_STATE_PENDING
    finish(clock)
    assert llm.get_batch_job(name).done
    with pytest.raises(LLMProviderError) as info:
        llm.fetch_batch_results(name)
    check_live_results(info.value)


@pytest.mark.parametrize("future", [True, False], ids=["future-fields", "as-recorded"])
def test_recorded_payloads_through_the_file_api_never_raise(
    sim: Simulator,
    clock: FakeClock,
    client: genai.Client,
    live: dict[str, bool],
    tmp_path: Path,
    future: bool,
) -> None:
    """The crash of issue 9: File API results with fields the SDK does not know."""
    live["future"] = future
    sim.shuffle_output = True
    lines = [
        {"key": str(i), "request": {"contents": [{"role": "user", "parts": [{"text": p[0]}]}]}}
        for i, p in enumerate(LIVE_PAYLOAD, 1)
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    backend = GeminiEngine("test-key", client=client)
    file_name = backend.upload(source, "live shapes")
    job = backend.create_job("gemini-2.5-flash", "live shapes", file_name, inline=False)
    assert job.name
    finish(clock)
    with pytest.raises(LLMProviderError) as info:
        GeminiLLM(client=client).fetch_batch_results(job.name)
    check_live_results(info.value)


def strip_inline_keys(op: dict[str, Any]) -> dict[str, Any]:
    for item in inline_items(op):
        item.pop("metadata", None)
    return op


def test_inline_responses_without_keys_match_by_position(
    sim: Simulator,
    clock: FakeClock,
    client: genai.Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = sim._operation
    monkeypatch.setattr(sim, "_operation", lambda *a, **k: strip_inline_keys(original(*a, **k)))
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([[f"p{i}"] for i in range(5)])
    finish(clock)
    with caplog.at_level(logging.WARNING, logger="daemon.llm"):
        results = llm.fetch_batch_results(name)
    assert [r.text for r in results] == [f"Simulated answer: p{i}" for i in range(5)]
    assert "by position" in caplog.text
    # Another instance (no remembered keys) also reads them in order.
    results = GeminiLLM(client=client).fetch_batch_results(name)
    assert [r.text for r in results] == [f"Simulated answer: p{i}" for i in range(5)]


def test_inline_responses_without_keys_and_a_count_mismatch_are_missing(
    sim: Simulator, clock: FakeClock, client: genai.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sim._operation
    monkeypatch.setattr(sim, "_operation", lambda *a, **k: strip_inline_keys(original(*a, **k)))
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"], ["[[sim:missing]] b"], ["c"]])
    finish(clock)
    with pytest.raises(LLMProviderError, match="3 of 3") as info:
        llm.fetch_batch_results(name)
    assert info.value.results == [None, None, None]
    assert "missing" in str(info.value)


@pytest.mark.parametrize("outcome", ["CANCELLED", "EXPIRED", "FAILED"])
def test_job_message_for_every_final_state(
    sim: Simulator,
    clock: FakeClock,
    client: genai.Client,
    monkeypatch: pytest.MonkeyPatch,
    outcome: str,
) -> None:
    original = sim._operation

    def with_error(*args: Any, **kwargs: Any) -> dict[str, Any]:
        op = original(*args, **kwargs)
        if op.get("done"):
            op["error"] = {"code": 1, "message": f"The job ended: {outcome.lower()}."}
        return op

    monkeypatch.setattr(sim, "_operation", with_error)
    sim.outcome = outcome
    llm = GeminiLLM(client=client)
    name = llm.create_batch_job([["a"]])
    finish(clock)
    with pytest.raises(LLMProviderError, match=f"JOB_STATE_{outcome}") as info:
        llm.fetch_batch_results(name)
    assert f"The job ended: {outcome.lower()}." in str(info.value)


def test_blocked_answer_with_filter_json_is_a_failed_request(
    sim: Simulator, clock: FakeClock, client: genai.Client, live: dict[str, bool]
) -> None:
    llm = GeminiLLM(client=client, filter_json=True)
    name = llm.create_batch_job([[f"{JSON_CONFIG} a"], ["safety"]])
    finish(clock)
    with pytest.raises(LLMProviderError, match="1 of 2") as info:
        llm.fetch_batch_results(name)
    results: Any = info.value.results
    assert results[0]["echo"] == f"{JSON_CONFIG} a"
    assert results[1] is None
    assert "2 (blocked" in str(info.value)


# ---- sdk_response: the SDK's model, built tolerantly -----------------------------------------------


@pytest.mark.parametrize("name", recorded.RESPONSES)
def test_sdk_response_from_every_recorded_payload(name: str) -> None:
    raw = recorded.add_future_fields(recorded.load(name))
    before = json.dumps(raw, sort_keys=True)
    response = sdk_response(raw)
    assert isinstance(response, types.GenerateContentResponse)
    assert response.usage_metadata is not None
    assert json.dumps(raw, sort_keys=True) == before  # the raw response is not touched


def test_sdk_response_drops_fields_of_an_unexpected_type() -> None:
    raw = recorded.load("resp_ellmer_web_search")
    raw["usageMetadata"]["promptTokenCount"] = {"a": 1}
    raw["candidates"][0]["index"] = "first"
    raw["candidates"][0]["content"]["parts"].append("not a part")
    response = sdk_response(raw)
    assert response.text == "2014-05-21"
    assert response.usage_metadata is not None
    assert response.usage_metadata.prompt_token_count is None
    assert response.usage_metadata.total_token_count == 850


@pytest.mark.parametrize(
    "raw", [{}, {"candidates": "x"}, {"candidates": [1, 2]}, {"usageMetadata": [1]}]
)
def test_sdk_response_of_odd_shapes(raw: dict[str, Any]) -> None:
    assert isinstance(sdk_response(raw), types.GenerateContentResponse)
