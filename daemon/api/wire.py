"""The Gemini Developer API's REST wire format: batch operations and job lists, read tolerantly.

Unknown fields at any level are ignored, absent counts are 0, int64 counts sent as strings are
parsed, and a value of the wrong type is treated as absent. Only a reply that is not usable
at all (not an object, no job name) raises `BadReply`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import BadReply
from ..jsonl import count, int_or_none, json_type, mapping, pick, str_or_none
from .engine import Progress, RemoteJob, RemoteState

JOB_NAME = re.compile(r"batches/[A-Za-z0-9_-]{1,128}")
"""A batch job's name, as the API documents it."""

FILE_NAME = re.compile(r"files/[a-z0-9-]{1,128}")
"""A file's name (an upload, a job's responses file), as the API documents it."""


def parse_progress(stats: Any) -> Progress | None:
    """None when the API sent no `batchStats` object at all."""
    if not isinstance(stats, Mapping):
        return None
    return Progress(
        total=count(pick(stats, "requestCount", "request_count")),
        succeeded=count(pick(stats, "successfulRequestCount", "successful_request_count")),
        failed=count(pick(stats, "failedRequestCount", "failed_request_count")),
        pending=count(pick(stats, "pendingRequestCount", "pending_request_count")),
    )


def parse_operation(obj: Any) -> RemoteJob:
    """A batch Operation (`{"name", "metadata": {...}, "done", "error", "response"}`) as a RemoteJob.

    A bare batch resource (the fields of `metadata` at the top level) is read too.
    """
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a batch operation (a JSON {json_type(obj)})")
    metadata = mapping(obj.get("metadata"))
    name = str_or_none(obj.get("name")) or str_or_none(metadata.get("name"))
    if name is None:
        raise BadReply("the reply names no batch job")
    if JOB_NAME.fullmatch(name) is None:  # never a path to call: what the job is, is unknown
        raise BadReply(f"the reply names a batch job of an unknown shape: {name[:100]!r}")
    batch = metadata or obj
    state, state_name = RemoteState.parse(batch.get("state") or obj.get("state"))
    error = obj.get("error")
    error_code = error_message = None
    if isinstance(error, Mapping):
        error_code = int_or_none(error.get("code"))
        error_message = str_or_none(error.get("message"))
    elif isinstance(error, str) and error:
        error_message = error
    output = mapping(batch.get("output"))
    response = mapping(obj.get("response"))
    return RemoteJob(
        name=name,
        state=state,
        state_name=state_name,
        display_name=str_or_none(pick(batch, "displayName", "display_name")),
        create_time=str_or_none(pick(batch, "createTime", "create_time")),
        error_code=error_code,
        error_message=error_message,
        progress=parse_progress(pick(batch, "batchStats", "batch_stats")),
        results=_responses_file(output) or _responses_file(response),
        inline_responses=_inline_items(output) if _has_inline(output) else _inline_items(response),
    )


def _responses_file(output: Mapping[str, Any]) -> str | None:
    name = str_or_none(pick(output, "responsesFile", "responses_file"))
    if name is not None and FILE_NAME.fullmatch(name) is None:
        raise BadReply(f"the reply names a responses file of an unknown shape: {name[:100]!r}")
    return name


def _has_inline(output: Mapping[str, Any]) -> bool:
    return pick(output, "inlinedResponses", "inlined_responses") is not None


def _inline_items(output: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """`inlinedResponses.inlinedResponses` (the API leaves an empty list out: `{}` is [])."""
    wrapper = pick(output, "inlinedResponses", "inlined_responses")
    if wrapper is None:
        return None
    items = (
        pick(wrapper, "inlinedResponses", "inlined_responses")
        if isinstance(wrapper, Mapping)
        else wrapper
    )
    if not isinstance(items, list):
        return []
    return [item if isinstance(item, dict) else {} for item in items]


def parse_job_list(obj: Any) -> tuple[list[RemoteJob], str | None]:
    """One `batches.list` page: its jobs (entries without a name skipped) and the next page token."""
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a list of batch jobs (a JSON {json_type(obj)})")
    items = obj.get("operations")
    if items is None:
        items = obj.get("batches")
    jobs: list[RemoteJob] = []
    for item in items if isinstance(items, list) else []:
        try:
            jobs.append(parse_operation(item))
        except BadReply:
            continue
    return jobs, str_or_none(pick(obj, "nextPageToken", "next_page_token"))
