"""daemon.llm: the library API (GeminiLLM, LLMService) against the simulator via a real client."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types

from daemon.llm import GeminiLLM, LLMProviderError, LLMService
from daemon.simulator import Simulator
from tests.harness import FakeClock

JSON_CONFIG = "[[sim:fenced]]"  # the simulator answers with fenced, trailing-comma JSON


@pytest.fixture
def clock(sim: Simulator) -> FakeClock:
    fake = FakeClock()
    sim.clock = fake
    return fake


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
