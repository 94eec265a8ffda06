"""The one place that turns Batch API JSON into the daemon's own types.

Batch operations become `RemoteJob` (state, progress, error, where the output is), responses-file
lines and inline output items become `Entry`. Everything here is tolerant: unknown fields at any
level are ignored, absent counts are 0, int64 counts sent as strings are parsed, and a value of
the wrong type is treated as absent. Only a reply that is not usable at all (empty, HTML,
truncated, not an object, no job name) raises `BadReply`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

try:  # a C parser several times faster than json for large result files; optional
    import orjson

    _fast_loads: Callable[[str | bytes], Any] | None = orjson.loads
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    _fast_loads = None

FINAL_STATES = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
)
"""The states in which a job has ended; any other state (known or not) is still in progress."""

UNSPECIFIED_STATE = "JOB_STATE_UNSPECIFIED"


class BadReply(ValueError):
    """A reply the daemon cannot use at all: empty, HTML, truncated, not an object, no name."""


# ---- JSON ----------------------------------------------------------------------------------------

# orjson turns integers beyond 64 bits into floats (-9300000000000000000 has 19 digits): a body
# holding a run of 19 digits may carry one, so it goes to the stdlib parser, which keeps every
# integer exact. The run is found
# by mapping every byte to "0" (digit) or " " and searching: a regex is ten times slower.
_DIGIT_MASK = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19
_HTML_TITLE = re.compile(r"<title[^>]*>([^<]{1,80})", re.IGNORECASE)


def _loads(body: str | bytes) -> Any:
    if _fast_loads is not None:
        try:
            data = body.encode() if isinstance(body, str) else body
        except UnicodeEncodeError:  # lone surrogates: only the stdlib parser takes them
            data = None
        if data is not None and _LONG_NUMBER not in data.translate(_DIGIT_MASK):
            try:
                return _fast_loads(data)
            except ValueError:
                pass  # the stdlib parser decides (it accepts NaN, orjson does not)
    return json.loads(body)


def parse_json(body: str | bytes | None) -> Any:
    """The JSON value of a reply body; `BadReply` when it is empty, HTML or not (whole) JSON."""
    if body is None:
        raise BadReply("the reply is empty")
    try:
        return _loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadReply(_describe_bad_body(body, exc)) from None


def _describe_bad_body(body: str | bytes, exc: BaseException) -> str:
    """Why a body is not JSON, without quoting it (a proxy's page may echo request details)."""
    head = body[:2048]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    text = text.lstrip()
    if not text and not body.strip():
        return "the reply is empty"
    if text.startswith("<"):
        title = _HTML_TITLE.search(text)
        found = f" ({' '.join(title.group(1).split())})" if title else ""
        return f"the reply is an HTML page, not JSON{found}"
    if isinstance(exc, RecursionError):
        return f"the reply is nested too deeply to read ({len(body)} bytes)"
    return f"the reply is not valid JSON ({exc}; {len(body)} bytes)"


# ---- small tolerant readers ------------------------------------------------------------------------


def count(value: Any) -> int:
    """A non-negative count from an int, a float or an int64 string; anything else is 0."""
    if type(value) is int:  # the common case, first
        return value if value > 0 else 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0) if math.isfinite(value) else 0
    if isinstance(value, str | bytes):
        try:
            number = int(value.strip() or 0)
        except ValueError:
            return 0
        return max(number, 0)
    return 0


def _int_or_none(value: Any) -> int | None:
    """An integer (error codes), from an int or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _pick(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field by its REST (camelCase) name, else its snake_case name (gateways may rewrite)."""
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


# ---- batch operations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Request counts of a job, from `metadata.batchStats` (int64 strings; absent counts are 0)."""

    total: int
    succeeded: int
    failed: int
    pending: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def as_dict(self) -> dict[str, int]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
            "total": self.total,
        }


def parse_progress(stats: Any) -> Progress | None:
    """None when the API sent no `batchStats` object at all."""
    if not isinstance(stats, Mapping):
        return None
    return Progress(
        total=count(_pick(stats, "requestCount", "request_count")),
        succeeded=count(_pick(stats, "successfulRequestCount", "successful_request_count")),
        failed=count(_pick(stats, "failedRequestCount", "failed_request_count")),
        pending=count(_pick(stats, "pendingRequestCount", "pending_request_count")),
    )


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """What the daemon needs of one batch job, as read from its Operation JSON."""

    name: str
    state: str
    done: bool
    display_name: str | None = None
    create_time: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    progress: Progress | None = None
    responses_file: str | None = None
    inline_responses: list[dict[str, Any]] | None = None

    @property
    def succeeded(self) -> bool:
        return self.state == "JOB_STATE_SUCCEEDED"


def normalise_state(value: Any) -> str:
    """`BATCH_STATE_X` (Gemini API), `JOB_STATE_X` (SDK, Vertex) or a bare `X` -> `JOB_STATE_X`."""
    if not isinstance(value, str) or not value.strip():
        return UNSPECIFIED_STATE
    state = value.strip().upper()
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if state.startswith(prefix):
            state = state[len(prefix) :]
            break
    return f"JOB_STATE_{state}" if state else UNSPECIFIED_STATE


def parse_operation(obj: Any) -> RemoteJob:
    """A batch Operation (`{"name", "metadata": {...}, "done", "error", "response"}`) as a RemoteJob.

    A bare batch resource (the fields of `metadata` at the top level) is read too.
    """
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a batch operation (a JSON {_json_type(obj)})")
    metadata = _mapping(obj.get("metadata"))
    name = _str_or_none(obj.get("name")) or _str_or_none(metadata.get("name"))
    if name is None:
        raise BadReply("the reply names no batch job")
    batch = metadata or obj
    state = normalise_state(batch.get("state") or obj.get("state"))
    error = obj.get("error")
    error_code = error_message = None
    if isinstance(error, Mapping):
        error_code = _int_or_none(error.get("code"))
        error_message = _str_or_none(error.get("message"))
    elif isinstance(error, str) and error:
        error_message = error
    output = _mapping(batch.get("output"))
    response = _mapping(obj.get("response"))
    return RemoteJob(
        name=name,
        state=state,
        done=state in FINAL_STATES,
        display_name=_str_or_none(_pick(batch, "displayName", "display_name")),
        create_time=_str_or_none(_pick(batch, "createTime", "create_time")),
        error_code=error_code,
        error_message=error_message,
        progress=parse_progress(_pick(batch, "batchStats", "batch_stats")),
        responses_file=_responses_file(output) or _responses_file(response),
        inline_responses=_inline_items(output) if _has_inline(output) else _inline_items(response),
    )


def _responses_file(output: Mapping[str, Any]) -> str | None:
    return _str_or_none(_pick(output, "responsesFile", "responses_file"))


def _has_inline(output: Mapping[str, Any]) -> bool:
    return _pick(output, "inlinedResponses", "inlined_responses") is not None


def _inline_items(output: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """`inlinedResponses.inlinedResponses` (the API leaves an empty list out: `{}` is [])."""
    wrapper = _pick(output, "inlinedResponses", "inlined_responses")
    if wrapper is None:
        return None
    items = (
        _pick(wrapper, "inlinedResponses", "inlined_responses")
        if isinstance(wrapper, Mapping)
        else wrapper
    )
    if not isinstance(items, list):
        return []
    return [item if isinstance(item, dict) else {} for item in items]


def parse_job_list(obj: Any) -> tuple[list[RemoteJob], str | None]:
    """One `batches.list` page: its jobs (entries without a name skipped) and the next page token."""
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a list of batch jobs (a JSON {_json_type(obj)})")
    items = obj.get("operations")
    if items is None:
        items = obj.get("batches")
    jobs: list[RemoteJob] = []
    for item in items if isinstance(items, list) else []:
        try:
            jobs.append(parse_operation(item))
        except BadReply:
            continue
    return jobs, _str_or_none(_pick(obj, "nextPageToken", "next_page_token"))


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---- per-request entries ---------------------------------------------------------------------------


class Entry(NamedTuple):
    """One request's outcome, from a responses-file line or an inline output item.

    `response` is the GenerateContentResponse exactly as sent; `error` the request's
    google.rpc.Status, normalised to `code` (int), `message`, `status` and `details` where present.
    (A named tuple: one is made per request, and a frozen dataclass costs several times more.)
    """

    key: str | None
    response: dict[str, Any] | None
    error: dict[str, Any] | None


def entry_from_obj(obj: Mapping[str, Any], key: str | None = None) -> Entry:
    """`{"key", "response" | "error" | "status"}` (a file line) or `{..., "metadata": {"key"}}`;
    `key` when the caller has read it already (`line_key`)."""
    response = obj.get("response")
    raw_error = obj.get("error")
    if raw_error is None:
        raw_error = obj.get("status")
    return Entry(
        entry_key(obj) if key is None else key,
        response if isinstance(response, dict) else None,
        None if raw_error is None else _status(raw_error),
    )


def entry_key(obj: Mapping[str, Any]) -> str | None:
    """The request key of a line or item: `key`, else `metadata.key`; strings and integers only."""
    key = obj.get("key")
    if key is None:
        key = _mapping(obj.get("metadata")).get("key")
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return None


def _status(raw: Any) -> dict[str, Any] | None:
    """A google.rpc.Status, keeping only well-formed fields; a bare string becomes its message."""
    if isinstance(raw, str) and raw:
        return {"message": raw}
    if not isinstance(raw, Mapping):
        return None
    status: dict[str, Any] = {}
    code = _int_or_none(raw.get("code"))
    if code is not None:
        status["code"] = code
    for field in ("message", "status"):
        value = _str_or_none(raw.get(field))
        if value is not None:
            status[field] = value
    details = raw.get("details")
    if isinstance(details, list) and details:
        status["details"] = details
    return status


_KEY_PREFIX = re.compile(rb'\{\s*"key"\s*:\s*"([^"\\\x00-\x1f]*)"\s*[,}]')


def line_key(raw: bytes) -> str | None:
    """The request key of one responses-file line, None for a line without a readable one.

    Lines usually start with a plain string key (`{"key": "a1", ...`): that is read without
    parsing the whole line; anything else is parsed.
    """
    quick = _KEY_PREFIX.match(raw)
    if quick is not None:
        try:
            return quick.group(1).decode()
        except UnicodeDecodeError:
            pass
    try:
        value = parse_json(raw)
    except BadReply:
        return None
    return entry_key(value) if isinstance(value, Mapping) else None


@dataclass(frozen=True, slots=True)
class InlineMatch:
    """Inline output items matched to request keys; `by_position` says no key came back at all."""

    entries: dict[str, Entry]
    by_position: bool


def match_inline(keys: Sequence[str], items: Sequence[Mapping[str, Any]] | None) -> InlineMatch:
    """Key -> Entry for the requests of an inline job, given the keys in request order.

    By `metadata.key` (the first item of a key wins). Only when NO item carries a key and there
    are as many items as requests are they matched by position (the API documents inline
    responses in request order); the caller should log that. Unmatched keys are left out
    (missing).
    """
    entries = [entry_from_obj(item) for item in items or ()]
    if entries and len(entries) == len(keys) and all(e.key is None for e in entries):
        return InlineMatch(dict(zip(keys, entries, strict=True)), by_position=True)
    wanted = set(keys)
    matched: dict[str, Entry] = {}
    for entry in entries:
        if entry.key is not None and entry.key in wanted:
            matched.setdefault(entry.key, entry)
    return InlineMatch(matched, by_position=False)
