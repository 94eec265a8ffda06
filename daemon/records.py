"""Outbox result records: one request's outcome (an `Entry`) as the record users read.

Owns the record shape of the contract ("Result records"): the answer text (thought parts left
out), `json` with repair, blocked answers, usage, request errors, and which failures are worth
a follow-up job (`is_retryable`). Pure functions of their arguments: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from .jsonl import ANY_JSON, count, decode_as

if TYPE_CHECKING:
    from .answers import Entry

BLOCKING_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "LANGUAGE",
        "OTHER",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "ESCALATION",
        "PUP_LIMITED_DISABLED",
        "MODEL_ARMOR",
    }
)
"""A candidate with one of these and no text was withheld by the API: stage `blocked`.

The policy filters (safety, recitation, blocklists, PII, prohibited content, their image
variants, escalation and abuse rules), an unsupported language, and OTHER / IMAGE_OTHER ("not
otherwise specified": in practice a silent filter). Not listed, so `ok` even without text:
STOP and MAX_TOKENS (the model answered, or ran out of tokens), and the tool-use and
continuation reasons, whose answer lies in other parts or in a follow-up request.
"""

USAGE_FIELDS = (
    ("prompt_tokens", "promptTokenCount"),
    ("output_tokens", "candidatesTokenCount"),
    ("thinking_tokens", "thoughtsTokenCount"),
    ("total_tokens", "totalTokenCount"),
    ("cached_tokens", "cachedContentTokenCount"),
    ("tool_prompt_tokens", "toolUsePromptTokenCount"),
)
"""Record `usage` names and the `usageMetadata` counts they come from."""

USAGE_KEYS = tuple(name for name, _ in USAGE_FIELDS)

RETRYABLE_CODES = frozenset({429, 500, 503, 504, 4, 8, 13, 14})
"""Request errors worth a follow-up job: HTTP 429/500/503/504 and, where the API writes the
google.rpc code instead, DEADLINE_EXCEEDED (4), RESOURCE_EXHAUSTED (8), INTERNAL (13) and
UNAVAILABLE (14). The two numbering schemes do not overlap."""

RETRYABLE_STATUSES = frozenset(
    {"RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
)

MISSING_MESSAGE = "no response came back for this key"


# ---- reading a response ----------------------------------------------------------------------------


def _first_candidate(response: Mapping[str, Any]) -> Mapping[str, Any] | None:
    candidates = response.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        return candidates[0]
    return None


def _candidate_text(candidate: Mapping[str, Any]) -> str:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return "".join(
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
    )


def answer_text(response: Mapping[str, Any]) -> str | None:
    """The first candidate's text parts joined, thought parts left out; None without a candidate."""
    candidate = _first_candidate(response)
    return None if candidate is None else _candidate_text(candidate)


def usage(response: Mapping[str, Any]) -> dict[str, int] | None:
    """Token counts as integers (absent ones 0); None when the API sent no `usageMetadata`."""
    meta = response.get("usageMetadata")
    if not isinstance(meta, dict):
        return None
    get = meta.get  # (unrolled: this runs once per request)
    prompt, output, thinking = (
        get("promptTokenCount", 0),
        get("candidatesTokenCount", 0),
        get("thoughtsTokenCount", 0),
    )
    total, cached, tool = (
        get("totalTokenCount", 0),
        get("cachedContentTokenCount", 0),
        get("toolUsePromptTokenCount", 0),
    )
    return {
        "prompt_tokens": prompt if type(prompt) is int and prompt >= 0 else count(prompt),
        "output_tokens": output if type(output) is int and output >= 0 else count(output),
        "thinking_tokens": thinking if type(thinking) is int and thinking >= 0 else count(thinking),
        "total_tokens": total if type(total) is int and total >= 0 else count(total),
        "cached_tokens": cached if type(cached) is int and cached >= 0 else count(cached),
        "tool_prompt_tokens": tool if type(tool) is int and tool >= 0 else count(tool),
    }


def _str_field(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    return value if isinstance(value, str) and value else None


def _block_message(what: str, reason: str, ratings: Any, note: str | None) -> str:
    """E.g. `the answer was withheld: SAFETY (HARM_CATEGORY_HATE_SPEECH): <finishMessage>`."""
    categories = [
        rating["category"]
        for rating in (ratings if isinstance(ratings, list) else [])
        if isinstance(rating, Mapping)
        and rating.get("blocked") is True
        and isinstance(rating.get("category"), str)
    ]
    message = f"{what}: {reason}"
    if categories:
        message += f" ({', '.join(categories)})"
    return f"{message}: {note}" if note else message


def _prompt_blocked(response: Mapping[str, Any]) -> str | None:
    """The message for a prompt the API refused (`promptFeedback.blockReason`), else None."""
    feedback = response.get("promptFeedback")
    if not isinstance(feedback, Mapping):
        return None
    reason = _str_field(feedback, "blockReason")
    if reason is None:
        return None
    note = _str_field(feedback, "blockReasonMessage")
    return _block_message("the prompt was blocked", reason, feedback.get("safetyRatings"), note)


# ---- records -----------------------------------------------------------------------------------


def record_for(
    key: str | None,
    line: int,
    entry: Entry | None,
    *,
    filter_json: bool,
    include_response: bool,
    attempts: int = 1,
) -> dict[str, Any]:
    """The outbox record of one request, given its entry (None when no response came back)."""
    head: dict[str, Any] = {"key": key, "line": line}
    if entry is None:
        return _error(head, {"stage": "missing", "message": MISSING_MESSAGE}, attempts)
    response = entry.response
    if response is None:
        return _error(head, _request_error(entry.error), attempts)

    tail: dict[str, Any] = {
        "finish_reason": None,
        "model_version": _str_field(response, "modelVersion"),
    }
    counts = usage(response)
    if counts is not None:
        tail["usage"] = counts
    if include_response:
        tail["response"] = response
    tail["attempts"] = attempts

    candidate = _first_candidate(response)
    if candidate is None:
        blocked = _prompt_blocked(response)
        if blocked is not None:
            error = {"stage": "blocked", "message": blocked}
        else:
            error = {"stage": "request", "message": "the response has no candidate"}
        return {**head, "status": "error", "error": error, **tail}

    reason = _str_field(candidate, "finishReason")
    tail["finish_reason"] = reason
    text = _candidate_text(candidate)
    if reason in BLOCKING_FINISH_REASONS and not text.strip():
        note = _str_field(candidate, "finishMessage")
        message = _block_message(
            "the answer was withheld", reason, candidate.get("safetyRatings"), note
        )
        return {
            **head,
            "status": "error",
            "error": {"stage": "blocked", "message": message},
            **tail,
        }

    if filter_json:
        try:
            value = parse_json_text(text)
        except ValueError as exc:
            error = {"stage": "parse", "message": str(exc)}
            return {**head, "status": "error", "text": text, "error": error, **tail}
        return {**head, "status": "ok", "text": text, "json": value, **tail}
    return {**head, "status": "ok", "text": text, **tail}


# ---- the usual answer, decoded straight into what a record needs (fields by REST name) ----


_Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Part(msgspec.Struct):
    text: str | None = None
    thought: bool | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct):
    content: _Content | None = None
    finishReason: str | None = None


class _Usage(msgspec.Struct):
    promptTokenCount: _Count = 0
    candidatesTokenCount: _Count = 0
    thoughtsTokenCount: _Count = 0
    totalTokenCount: _Count = 0
    cachedContentTokenCount: _Count = 0
    toolUsePromptTokenCount: _Count = 0


class _Response(msgspec.Struct):
    candidates: list[_Candidate] | None = None
    usageMetadata: _Usage | None = None
    modelVersion: str | None = None


class AnswerLine(msgspec.Struct):
    """An answers line decoded for its record: its key and the fields a record needs (every
    other field of the line is skipped, not built)."""

    key: str | int | None = None
    response: _Response | None = None


_ANSWER_LINE = msgspec.json.Decoder(AnswerLine)


def decode_answer(raw: bytes) -> AnswerLine | None:
    """The line as an `AnswerLine`; None for a line not of those types (read whole instead)."""
    return decode_as(_ANSWER_LINE, raw)


def plain_record(
    answer: AnswerLine, key: str, line: int, *, filter_json: bool, attempts: int = 1
) -> dict[str, Any] | None:
    """`record_for` of a decoded answers line in the usual shape -- a response with a
    candidate, not withheld; None for any other, which `record_for` then reads whole. The
    same record either way (a test holds them equal)."""
    response = answer.response
    if response is None or not response.candidates:
        return None
    candidate = response.candidates[0]
    content = candidate.content
    parts = content.parts if content is not None else None
    if not parts:
        text = ""
    elif len(parts) == 1:  # (the usual answer: one part, no join)
        text = parts[0].text if parts[0].text is not None and not parts[0].thought else ""
    else:
        text = "".join(p.text for p in parts if p.text is not None and not p.thought)
    reason = candidate.finishReason or None
    if reason in BLOCKING_FINISH_REASONS and not text.strip():
        return None
    record: dict[str, Any] = {"key": key, "line": line, "status": "ok", "text": text}
    if filter_json:
        try:
            record["json"] = parse_json_text(text)
        except ValueError as exc:
            record["status"] = "error"
            record["error"] = {"stage": "parse", "message": str(exc)}
    record["finish_reason"] = reason
    record["model_version"] = response.modelVersion or None
    meta = response.usageMetadata
    if meta is not None:
        record["usage"] = {
            "prompt_tokens": meta.promptTokenCount,
            "output_tokens": meta.candidatesTokenCount,
            "thinking_tokens": meta.thoughtsTokenCount,
            "total_tokens": meta.totalTokenCount,
            "cached_tokens": meta.cachedContentTokenCount,
            "tool_prompt_tokens": meta.toolUsePromptTokenCount,
        }
    record["attempts"] = attempts
    return record


def _request_error(status: Mapping[str, Any] | None) -> dict[str, Any]:
    if status is None:
        return {"stage": "request", "message": "the API sent neither a response nor an error"}
    error: dict[str, Any] = {"stage": "request"}
    if status.get("code") is not None:
        error["code"] = status["code"]
    error["message"] = status.get("message") or "the request failed"
    if status.get("status"):
        error["status"] = status["status"]
    return error


def _error(head: dict[str, Any], error: dict[str, Any], attempts: int) -> dict[str, Any]:
    return {**head, "status": "error", "error": error, "attempts": attempts}


def invalid_record(line: int, key: str | None, message: str) -> dict[str, Any]:
    """A line skipped under `on_invalid_line: skip_line`: no job carried it (attempts 0)."""
    return _error({"key": key, "line": line}, {"stage": "invalid", "message": message}, 0)


def job_failed_record(key: str | None, line: int, message: str, attempts: int) -> dict[str, Any]:
    """A request whose whole job failed (FAILED / EXPIRED / CANCELLED), with the job's message."""
    return _error({"key": key, "line": line}, {"stage": "job", "message": message}, attempts)


def is_retryable(entry: Entry) -> bool:
    """Whether the API failed this request in a way a follow-up job may fix (rate, server)."""
    if entry.response is not None or entry.error is None:
        return False
    return (
        entry.error.get("code") in RETRYABLE_CODES
        or entry.error.get("status") in RETRYABLE_STATUSES
    )


# ---- filter_json -------------------------------------------------------------------------------


def parse_json_text(text: str) -> Any:
    """The JSON value in a model's answer, repairing code fences, prose around it, trailing commas.

    Raises ValueError (never RecursionError) when the text holds no usable JSON; NaN and
    Infinity count as unusable, since the outbox must stay strict JSON.
    """
    try:
        return ANY_JSON.decode(text)  # the usual answer: strict JSON (JSON's white space around)
    except (ValueError, RecursionError):
        pass
    try:
        value = _parse_json_text(text)
    except RecursionError:
        raise ValueError("the JSON in the text is nested too deeply") from None
    if not _all_finite(value):
        raise ValueError("the JSON holds NaN or Infinity, which strict JSON does not allow")
    return value


def _parse_json_text(text: str) -> Any:
    stripped = text.strip()
    try:
        return json.loads(stripped)  # (what msgspec refused: NaN, lone surrogates, not JSON)
    except ValueError:
        pass
    if "{" not in stripped and "[" not in stripped:
        raise ValueError("the text holds no JSON object or array")
    import json_repair  # (only here: most answers never need it, and every start would load it)

    try:
        value, repairs = json_repair.repair_json(stripped, return_objects=True, logging=True)
    except RecursionError:
        raise
    except Exception as exc:  # a repair library bug must not fail the whole results file
        raise ValueError(f"the text could not be repaired into JSON ({exc})") from None
    # json_repair turns any prose with a bracket in it into *something* ("I think [this]" ->
    # ["this"]): when it had to invent string quotes, the text was prose, not JSON.
    invented = any("literal instead of a quote" in str(r.get("text", "")) for r in repairs)
    if not isinstance(value, dict | list) or invented:
        raise ValueError("the text could not be repaired into JSON")
    return value


def _all_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


# ---- tally ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a results file holds: ok records, errors by stage, tokens by kind (for logs, status)."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def total(self) -> int:
        return self.ok + self.error_count

    def add(self, record: Mapping[str, Any]) -> None:
        if record.get("status") == "ok":
            self.ok += 1
        else:
            error = record.get("error")
            stage = error.get("stage") if isinstance(error, dict) else None
            stage = stage if isinstance(stage, str) else "unknown"
            self.errors[stage] = self.errors.get(stage, 0) + 1
        counts = record.get("usage")
        if type(counts) is dict and len(counts) == len(USAGE_KEYS):  # made by `usage`
            tokens = self.tokens  # (unrolled: this runs once per request)
            tokens["prompt_tokens"] += counts["prompt_tokens"]
            tokens["output_tokens"] += counts["output_tokens"]
            tokens["thinking_tokens"] += counts["thinking_tokens"]
            tokens["total_tokens"] += counts["total_tokens"]
            tokens["cached_tokens"] += counts["cached_tokens"]
            tokens["tool_prompt_tokens"] += counts["tool_prompt_tokens"]
        elif isinstance(counts, dict):
            for name in USAGE_KEYS:
                self.tokens[name] += count(counts.get(name))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.error_count,
            "errors_by_stage": dict(self.errors),
            "tokens": dict(self.tokens),
        }
