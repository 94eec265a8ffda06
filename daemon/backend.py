"""The Gemini backend: every call the daemon makes to the Batch API, through `google-genai` only.

Errors are sorted into two kinds the service acts on: `TransientError` (try again later,
the file stays in flight) and `PermanentError` (the file gets an error report).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google import genai
from google.genai import errors, types

from .inputs import LIFTED_FIELDS, Request

TRANSIENT_HTTP_CODES = (408, 429, 500, 502, 503, 504)
"""Statuses worth another try: timeouts, rate limits and server trouble."""

LIST_PAGE_SIZE = 100
"""Jobs fetched per `batches.list` page when looking a job up by display name."""

BATCH_MIME_TYPE = "application/jsonl"
"""Mime type of an uploaded batch input file; the SDK cannot guess it for `.jsonl`."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP library the SDK uses (httpx2 in 3.x, httpx before)."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


class BackendError(Exception):
    """A Batch API call failed; `code` is the HTTP status when there was one."""

    def __init__(self, message: str, code: int | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class TransientError(BackendError):
    """Worth retrying later: rate limits, server errors, resets, timeouts."""


class PermanentError(BackendError):
    """Retrying will not help: bad request, bad key, unknown model, job gone."""


def classify(exc: BaseException, action: str) -> BackendError:
    """Turn an SDK or transport exception into a Transient- or PermanentError."""
    if isinstance(exc, errors.APIError):
        message = f"{action}: {exc.code} {exc.status or ''} {exc.message or ''}".strip()
        kind = TransientError if exc.code in TRANSIENT_HTTP_CODES else PermanentError
        return kind(message, exc.code, exc.status)
    if isinstance(exc, TRANSPORT_ERRORS):
        return TransientError(f"{action}: {type(exc).__name__}: {exc}")
    return PermanentError(f"{action}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def api_call(action: str) -> Iterator[None]:
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        raise classify(exc, action) from exc


def to_inlined(request: Request) -> types.InlinedRequest:
    """A REST GenerateContentRequest body as the SDK's InlinedRequest (the SDK turns it back)."""
    body = request.body
    config: dict[str, Any] = dict(body.get("generationConfig") or {})
    for rest_name, field_name in LIFTED_FIELDS.items():
        if rest_name in body:
            config[field_name] = body[rest_name]
    return types.InlinedRequest(
        contents=body["contents"],
        metadata={"key": request.key},
        config=types.GenerateContentConfig.model_validate(config) if config else None,
    )


def file_line(request: Request) -> bytes:
    """One line of a File API batch input: `{"key", "request"}`."""
    return (
        json.dumps({"key": request.key, "request": request.body}, ensure_ascii=False).encode()
        + b"\n"
    )


class GeminiBackend:
    """One long-lived `genai.Client` (a collected client closes its connections)."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        timeout_seconds: float = 120,
        retries: int = 5,
        client: genai.Client | None = None,
        retry_initial_delay: float = 1.0,
        retry_jitter: float = 1.0,
    ) -> None:
        self.retry_options = types.HttpRetryOptions(
            attempts=retries,
            initial_delay=retry_initial_delay,
            max_delay=30.0,
            jitter=retry_jitter,
            http_status_codes=list(TRANSIENT_HTTP_CODES),
        )
        http_options = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(timeout_seconds * 1000),
            retry_options=self.retry_options,
        )
        self.client = client or genai.Client(api_key=api_key, http_options=http_options)

    # Creating is not idempotent: a retried create whose first response was lost makes a
    # second job. So create is sent exactly once; the caller looks the job up after a failure.
    _NO_RETRY = types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1))

    def create_job(self, model: str, display_name: str, src: list[Request] | str) -> types.BatchJob:
        """Create one batch job from inline requests or an uploaded file name (`files/...`)."""
        with api_call("create batch job"):  # a request the SDK refuses is a PermanentError
            source: Any = src if isinstance(src, str) else [to_inlined(r) for r in src]
            return self.client.batches.create(
                model=model,
                src=source,
                config=types.CreateBatchJobConfig(
                    display_name=display_name, http_options=self._NO_RETRY
                ),
            )

    def find_job(self, display_name: str) -> types.BatchJob | None:
        """The job with this display name, paging through every job of the project."""
        with api_call("list batch jobs"):
            for job in self._all_jobs():
                if job.display_name == display_name:
                    return job
        return None

    def _all_jobs(self) -> Iterator[types.BatchJob]:
        """Every job, page by page. Not the SDK's item iterator: it stops with an IndexError
        at an empty page that still carries a next-page token, missing the jobs after it."""
        pager = self.client.batches.list(config=types.ListBatchJobsConfig(page_size=LIST_PAGE_SIZE))
        tokens: set[str] = set()
        while True:
            yield from pager.page
            token = pager.config.get("page_token")
            if not token or token in tokens:
                return
            tokens.add(token)
            pager.next_page()

    def get_job(self, name: str) -> types.BatchJob:
        with api_call(f"get {name}"):
            job = self.client.batches.get(name=name)
        if job.state is types.JobState.JOB_STATE_FAILED and job.error is None:
            job.error = self._operation_error(name)
        return job

    def _operation_error(self, name: str) -> types.JobError | None:
        """The SDK drops a failed job's top-level `error`: read it from the raw Operation."""
        try:
            response = self.client._api_client.request("get", name, {}, None)
            error = json.loads(response.body or "{}").get("error")
            if not isinstance(error, dict):
                return None
            return types.JobError(code=error.get("code"), message=error.get("message"))
        except Exception:  # best effort: the report then says the API gave no message
            return None

    def cancel_job(self, name: str) -> None:
        with api_call(f"cancel {name}"):
            self.client.batches.cancel(name=name)

    def upload(self, path: Path, display_name: str) -> str:
        """Upload a batch input file (resumable); returns its name, `files/...`."""
        with api_call("upload batch input"):
            uploaded = self.client.files.upload(
                file=path,
                config=types.UploadFileConfig(mime_type=BATCH_MIME_TYPE, display_name=display_name),
            )
        if not uploaded.name:
            raise PermanentError("upload batch input: the API returned no file name")
        return uploaded.name

    def download(self, name: str, destination: Path) -> None:
        """Stream a file (a job's responses) to disk; the SDK does not retry downloads, the caller does."""
        with api_call(f"download {name}"), destination.open("wb") as handle:
            self.client.files.download(file=name, destination=handle)

    def delete_file(self, name: str) -> None:
        with api_call(f"delete {name}"):
            self.client.files.delete(name=name)


def inline_lookup(job: types.BatchJob) -> dict[str, dict[str, Any]]:
    """Key -> entry (`{"response": ...}` or `{"error": ...}`) of a finished inline job; first wins."""
    entries: dict[str, dict[str, Any]] = {}
    for item in (job.dest.inlined_responses if job.dest else None) or []:
        key = (item.metadata or {}).get("key")
        if key is None or key in entries:
            continue
        entry: dict[str, Any] = {}
        if item.response is not None:
            entry["response"] = item.response.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        if item.error is not None:
            entry["error"] = item.error.model_dump(mode="json", by_alias=True, exclude_none=True)
        entries[key] = entry
    return entries


def job_error_message(job: types.BatchJob) -> str | None:
    if job.error is not None:
        return job.error.message or str(job.error.code)
    return None
