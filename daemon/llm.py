"""The library API of the original design, kept: `GeminiLLM` and the `LLMService` facade.

Built on the daemon's Gemini engine, but results are matched to requests by key (by position
only where the API echoed no key at all and the counts agree), results are read from the
API's raw JSON through `wire` and `records`, and one failed request does not discard the others.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pydantic
from google import genai
from google.genai import types

from . import answers, records
from .answers import entry_key
from .api import RemoteState
from .api.gemini import GeminiEngine
from .errors import LLMProviderError
from .inputs import Defaults, prompt_request

log = logging.getLogger(__name__)

_MAX_REPAIRS = 8
"""Rounds of dropping unreadable fields before a response is given up as empty."""


class BatchProvider(Protocol):
    name: str

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool | None = None
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
        self._engine = GeminiEngine(key, client=client)
        self._jobs: dict[
            str, tuple[list[str], bool]
        ] = {}  # job name -> (keys in order, filter_json)

    @property
    def client(self) -> genai.Client:
        return self._engine.client

    def batch_generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "batch_generate is not supported: use create_batch_job and fetch_batch_results"
        )

    def create_batch_job(
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool | None = None
    ) -> str:
        """Submit one request per prompt sequence; returns the job name (`batches/...`).

        `filter_json`: None keeps the instance's setting; True or False decides for this job.
        """
        if not batch_payload:
            raise ValueError("the batch payload is empty")
        defaults = Defaults(
            self.system_prompt,
            self.temperature,
            self.thinking_budget,
            self.filter_json if filter_json is None else filter_json,
        )
        requests = [
            # A bare string is one prompt, not a sequence of one-character prompts.
            prompt_request(
                str(i), i, prompts if isinstance(prompts, str) else list(prompts), defaults
            )
            for i, prompts in enumerate(batch_payload, 1)
        ]
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "requests.jsonl"
            source.write_bytes(b"".join(r.wire for r in requests))
            job = self._engine.create_job(
                self.model, f"gemini-batchd-lib/{uuid.uuid4().hex[:16]}", source, inline=True
            )
        self._jobs[job.name] = ([r.key for r in requests], defaults.filter_json)
        return job.name

    def get_batch_job(self, batch_job_name: str) -> types.BatchJob:
        """The job as the SDK reads it (`job.done`, `job.state`)."""
        return self.client.batches.get(name=batch_job_name)

    def cancel_batch_job(self, batch_job_name: str) -> None:
        """Cancel the job (it is not deleted: its record stays visible in the API)."""
        self._engine.cancel_job(batch_job_name)

    def fetch_batch_results(self, batch_job_name: str) -> list[Any]:
        """Results in input order, matched by key: parsed JSON with `filter_json`, else responses.

        Reads the job's raw JSON (not the SDK's models), so fields the SDK does not know never
        fail a fetch; a blocked answer counts as a failed request.
        """
        job = self._engine.get_job(batch_job_name)
        if not job.done:
            raise ValueError(f"batch job {batch_job_name} is not done yet (state {job.state_name})")
        if job.state is not RemoteState.SUCCEEDED:
            message = job.error_message or "no message from the API"
            raise LLMProviderError(f"batch job {batch_job_name} ended {job.state_name}: {message}")
        known = self._jobs.get(batch_job_name)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "answers.jsonl"
            if job.results is not None:
                self._engine.download(job.results, path)
                keys = (
                    known[0]
                    if known
                    else _ordered_keys(list(dict.fromkeys(answers.request_keys(path))))
                )
            else:
                items = job.inline_responses or []
                keys = known[0] if known else _inline_keys(items)
                lines, by_position = answers.inline_lines(items, keys)
                if by_position:
                    log.warning(
                        "%s: the API echoed no request keys; matched %d responses by position",
                        batch_job_name,
                        len(keys),
                    )
                answers.save_answers(path, lines)
            found = answers.Answers([path])
            try:
                filter_json = known[1] if known else self.filter_json
                results, failed = _results(keys, found, filter_json)
            finally:
                found.close()
        if failed:
            raise LLMProviderError(
                f"{len(failed)} of {len(keys)} requests failed in {batch_job_name}: {', '.join(failed)}",
                results,
            )
        return results


def _results(
    keys: list[str], found: answers.Answers, filter_json: bool
) -> tuple[list[Any], list[str]]:
    """Each key's result in order (None where it failed), and the failed keys described."""
    results: list[Any] = []
    failed: list[str] = []
    for line, key in enumerate(keys, 1):
        entry = found.get(key)
        record = records.record_for(
            key, line, entry, filter_json=filter_json, include_response=False
        )
        if record["status"] != "ok":
            results.append(None)
            failed.append(f"{key} ({_problem(record['error'])})")
        elif filter_json:
            results.append(record["json"])
        else:
            assert entry is not None and entry.response is not None
            results.append(sdk_response(entry.response))
    return results, failed


def _problem(error: Mapping[str, Any]) -> str:
    """`request: 400 Bad prompt`, `blocked: the answer was withheld: SAFETY`, ..."""
    code = error.get("code")
    message = f"{code} {error['message']}" if code is not None else error["message"]
    return f"{error['stage']}: {message}"


def sdk_response(raw: Mapping[str, Any]) -> types.GenerateContentResponse:
    """The SDK's model of a raw response, built tolerantly: a newer API never fails a fetch.

    A field the installed SDK does not know, or whose value it cannot read (a changed type),
    is dropped, and as a last resort the response is empty.
    """
    data = copy.deepcopy(dict(raw))
    for _ in range(_MAX_REPAIRS):
        try:
            return types.GenerateContentResponse.model_validate(data)
        except pydantic.ValidationError as exc:
            if not _drop_invalid_fields(data, exc):
                break
    return types.GenerateContentResponse()


def _drop_invalid_fields(data: dict[str, Any], exc: pydantic.ValidationError) -> bool:
    """Remove the deepest existing field at each error location; False when none was found."""
    doomed: list[tuple[Any, Any]] = []
    seen: set[tuple[int, Any]] = set()
    for error in exc.errors():
        parent: Any = None
        step: Any = None
        node: Any = data
        for part in error["loc"]:
            if not _has_child(node, part):
                break
            parent, step, node = node, part, node[part]
        if parent is not None and (id(parent), step) not in seen:
            seen.add((id(parent), step))
            doomed.append((parent, step))
    for parent, step in doomed:
        if isinstance(parent, dict):
            parent.pop(step, None)
    # List items go last, highest index first, so earlier indices stay valid.
    for parent, step in sorted(
        ((p, s) for p, s in doomed if isinstance(p, list)), key=lambda ps: -ps[1]
    ):
        del parent[step]
    return bool(doomed)


def _has_child(node: Any, step: Any) -> bool:
    if isinstance(node, dict):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)


def _inline_keys(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys of a job another process created: the echoed keys, else 1..n (by position)."""
    keys = [k for k in (entry_key(item) for item in items) if k is not None]
    return (
        _ordered_keys(list(dict.fromkeys(keys)))
        if keys
        else [str(i) for i in range(1, len(items) + 1)]
    )


def _ordered_keys(keys: list[str]) -> list[str]:
    """For a job this process did not create: numeric keys in numeric order, others as returned."""
    return sorted(keys, key=int) if all(k.isdigit() for k in keys) else keys


def _prompt_or_file(value: str | Path | None) -> str | None:
    """A path to a file holding the prompt, or the prompt text itself.

    A value that looks like a path but names no file is a mistake, not a prompt: it raises
    FileNotFoundError rather than sending the path to the model as its instructions.
    """
    if value is None:
        return None
    if isinstance(value, Path):  # clearly meant as a file: a missing one is an error
        return value.read_text(encoding="utf-8")
    text = str(value)
    if "\n" in text or len(text) >= 4096:
        return text
    path = Path(text).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass
    if looks_like_path(text):
        raise FileNotFoundError(
            errno.ENOENT, "system_prompt looks like a file path, but there is no such file", text
        )
    return text


PROMPT_FILE_SUFFIXES = frozenset(
    {".md", ".markdown", ".txt", ".text", ".prompt", ".j2", ".jinja", ".tmpl", ".yaml", ".yml"}
)
"""Suffixes that mark a path even when the value has spaces (`My Prompts/categorise.md`)."""

_SUFFIX = re.compile(r"[^\s./\\]\.[A-Za-z0-9]{1,10}$")


def looks_like_path(value: str) -> bool:
    """One line that reads as a file name rather than as an instruction to the model.

    Without whitespace: it has a path separator or a file suffix (`prompts/cat`, `cat.md`).
    With whitespace (prompts have it, few paths do): a separator and a known prompt-file suffix,
    so that `Answer yes/no.` stays a prompt.
    """
    if "\n" in value or not value.strip():
        return False
    separators = {"/", os.sep, os.altsep or "/"}
    has_separator = any(sep in value for sep in separators)
    if not any(ch.isspace() for ch in value):
        return has_separator or _SUFFIX.search(value) is not None
    return has_separator and Path(value.strip()).suffix.lower() in PROMPT_FILE_SUFFIXES


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
        self, batch_payload: Sequence[Sequence[str]], *, filter_json: bool | None = None
    ) -> tuple[str, str]:
        """`filter_json`: None keeps each provider's own setting; True or False decides."""
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


__all__ = ["GeminiLLM", "LLMProviderError", "LLMService"]
