"""The library API of the original design, kept: `GeminiLLM` and the `LLMService` facade.

Built on the daemon's backend, but results are matched to requests by key (never by
position) and one failed request does not discard the others.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from google import genai
from google.genai import types

from .backend import BackendError, GeminiBackend, inline_lookup, job_error_message
from .inputs import Defaults, prompt_request
from .results import answer_text, line_key, parse_json_text


class LLMProviderError(Exception):
    """A batch job failed, or some of its requests did; `.results` holds what did come back."""

    def __init__(self, message: str, results: list[Any] | None = None) -> None:
        super().__init__(message)
        self.results = results


class BatchProvider(Protocol):
    name: str

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool = False
    ) -> str: ...
    def get_batch_job(self, batch_job_name: str) -> Any: ...
    def fetch_batch_results(self, batch_job_name: str) -> list[Any]: ...
    def cancel_batch_job(self, batch_job_name: str) -> None: ...


class GeminiLLM:
    """A Gemini provider whose batch jobs go through the Batch API (half price, asynchronous)."""

    name = "gemini"
    MODEL = "gemini-2.5-flash"
    TEMPERATURE = 0.2
    MAX_THINKING_BUDGET = 24576

    def __init__(
        self,
        system_prompt: str | Path | None = None,
        filter_json: bool = False,
        *,
        client: genai.Client | None = None,
        model: str = MODEL,
        api_key: str | None = None,
        temperature: float = TEMPERATURE,
        thinking_budget: int = MAX_THINKING_BUDGET,
    ) -> None:
        self.system_prompt = _prompt_or_file(system_prompt)
        self.filter_json = filter_json
        self.model = model
        self.temperature = temperature
        self.thinking_budget = thinking_budget
        key = api_key or os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY") or ""
        self._backend = GeminiBackend(key, client=client)
        self._jobs: dict[
            str, tuple[list[str], bool]
        ] = {}  # job name -> (keys in order, filter_json)

    @property
    def client(self) -> genai.Client:
        return self._backend.client

    def batch_generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "batch_generate is not supported: use create_batch_job and fetch_batch_results"
        )

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool = False
    ) -> str:
        """Submit one request per prompt sequence; returns the job name (`batches/...`)."""
        if not batch_payload:
            raise ValueError("the batch payload is empty")
        defaults = Defaults(
            self.system_prompt,
            self.temperature,
            self.thinking_budget,
            filter_json or self.filter_json,
        )
        requests = [
            # A bare string is one prompt, not a sequence of one-character prompts.
            prompt_request(
                str(i), i, prompts if isinstance(prompts, str) else list(prompts), defaults
            )
            for i, prompts in enumerate(batch_payload, 1)
        ]
        job = self._backend.create_job(
            self.model, f"gemini-batchd-lib/{uuid.uuid4().hex[:16]}", requests
        )
        assert job.name
        self._jobs[job.name] = ([r.key for r in requests], defaults.filter_json)
        return job.name

    def get_batch_job(self, batch_job_name: str) -> types.BatchJob:
        return self._backend.get_job(batch_job_name)

    def cancel_batch_job(self, batch_job_name: str) -> None:
        """Cancel the job (it is not deleted: its record stays visible in the API)."""
        self._backend.cancel_job(batch_job_name)

    def fetch_batch_results(self, batch_job_name: str) -> list[Any]:
        """Results in input order, matched by key: parsed JSON with `filter_json`, else responses."""
        job = self.get_batch_job(batch_job_name)
        if not job.done:
            raise ValueError(f"batch job {batch_job_name} is not done yet (state {_state(job)})")
        if job.state is not types.JobState.JOB_STATE_SUCCEEDED:
            message = job_error_message(job) or "no message from the API"
            raise LLMProviderError(f"batch job {batch_job_name} ended {_state(job)}: {message}")
        entries = self._entries(job)
        keys, filter_json = self._jobs.get(
            batch_job_name, (_ordered_keys(entries), self.filter_json)
        )
        results: list[Any] = []
        failed: list[str] = []
        for key in keys:
            value, problem = _result(entries.get(key), filter_json)
            results.append(value)
            if problem:
                failed.append(f"{key} ({problem})")
        if failed:
            raise LLMProviderError(
                f"{len(failed)} of {len(keys)} requests failed in {batch_job_name}: {', '.join(failed)}",
                results,
            )
        return results

    def _entries(self, job: types.BatchJob) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        if job.dest and job.dest.file_name:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "responses.jsonl"
                self._backend.download(job.dest.file_name, path)
                with path.open("rb") as handle:
                    for raw in handle:
                        key = line_key(raw)
                        if key is not None:
                            entries.setdefault(key, json.loads(raw))
            return entries
        return inline_lookup(job)


def _result(entry: dict[str, Any] | None, filter_json: bool) -> tuple[Any, str | None]:
    if entry is None:
        return None, "no response"
    if "response" not in entry:
        error = entry.get("error") or {}
        return None, f"{error.get('code', '')} {error.get('message', 'failed')}".strip()
    if not filter_json:
        return types.GenerateContentResponse.model_validate(entry["response"]), None
    text = answer_text(entry["response"])
    if text is None:
        return None, "no candidate"
    try:
        return parse_json_text(text), None
    except (ValueError, RecursionError) as exc:
        return None, f"unparseable JSON: {exc}"


def _ordered_keys(entries: dict[str, dict[str, Any]]) -> list[str]:
    """For a job this process did not create: numeric keys in numeric order, others as returned."""
    keys = list(entries)
    return sorted(keys, key=int) if all(k.isdigit() for k in keys) else keys


def _state(job: types.BatchJob) -> str:
    return job.state.value if job.state else "unknown"


def _prompt_or_file(value: str | Path | None) -> str | None:
    """A path to a file holding the prompt, or the prompt text itself."""
    if value is None:
        return None
    if isinstance(value, Path):  # clearly meant as a file: a missing one is an error
        return value.read_text(encoding="utf-8")
    path = Path(value)
    try:
        if len(str(value)) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass
    return str(value)


class LLMService:
    """A facade over providers: batch jobs go to the first provider that supports them."""

    def __init__(self, providers: Sequence[Any]) -> None:
        self._providers: dict[str, Any] = {}
        for provider in providers:
            name = getattr(provider, "name", type(provider).__name__)
            unique, n = name, 2
            while unique in self._providers:
                unique, n = f"{name}-{n}", n + 1
            self._providers[unique] = provider

    def _provider(self, provider_name: str) -> Any:
        try:
            return self._providers[provider_name]
        except KeyError:
            raise ValueError(
                f"unknown provider {provider_name!r}; known: {', '.join(self._providers)}"
            ) from None

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool = False
    ) -> tuple[str, str]:
        for name, provider in self._providers.items():
            if not hasattr(provider, "create_batch_job"):
                continue
            try:
                return name, provider.create_batch_job(batch_payload, filter_json=filter_json)
            except NotImplementedError:
                continue
        raise NotImplementedError("no provider supports batch jobs")

    def get_batch_job_status(self, provider_name: str, batch_job_name: str) -> Any:
        return self._provider(provider_name).get_batch_job(batch_job_name)

    def fetch_batch_results(self, provider_name: str, batch_job_name: str) -> list[Any]:
        result: list[Any] = self._provider(provider_name).fetch_batch_results(batch_job_name)
        return result

    def cancel_batch_job(self, provider_name: str, batch_job_name: str) -> None:
        self._provider(provider_name).cancel_batch_job(batch_job_name)


__all__ = ["BackendError", "GeminiLLM", "LLMProviderError", "LLMService"]
