"""Results: each request's response (or error) as one outbox record, matched by key, in input order."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import json_repair

from . import atomic, keymap
from .inputs import Defaults, LineError, Request, read_requests


class ResponseLookup(Protocol):
    """Finds the output entry (`{"response": ...}` or `{"error": ...}`) of a request key."""

    def get(self, key: str, /) -> dict[str, Any] | None: ...


def parse_json_text(text: str) -> Any:
    """The JSON value in a model's answer, repairing code fences, prose around it, trailing commas."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    if "{" not in stripped and "[" not in stripped:
        raise ValueError("the text holds no JSON object or array")
    value, repairs = json_repair.repair_json(stripped, return_objects=True, logging=True)
    # json_repair turns any prose with a bracket in it into *something* ("I think [this]" ->
    # ["this"]): when it had to invent string quotes, the text was prose, not JSON.
    invented = any("literal instead of a quote" in str(r.get("text", "")) for r in repairs)
    if not isinstance(value, dict | list) or invented:
        raise ValueError("the text could not be repaired into JSON")
    return value


def answer_text(response: Mapping[str, Any]) -> str | None:
    """The first candidate's text parts joined, thought parts left out; None without a candidate."""
    candidates = response.get("candidates") or []
    if not candidates:
        return None
    parts = (candidates[0].get("content") or {}).get("parts") or []
    return "".join(p.get("text", "") for p in parts if not p.get("thought"))


def usage(response: Mapping[str, Any]) -> dict[str, int]:
    meta = response.get("usageMetadata") or {}
    return {
        "prompt_tokens": int(meta.get("promptTokenCount") or 0),
        "output_tokens": int(meta.get("candidatesTokenCount") or 0),
        "thinking_tokens": int(meta.get("thoughtsTokenCount") or 0),
        "total_tokens": int(meta.get("totalTokenCount") or 0),
    }


def record_for(
    key: str,
    line: int,
    entry: Mapping[str, Any] | None,
    *,
    filter_json: bool,
    include_response: bool,
) -> dict[str, Any]:
    """The outbox record of one request, given its output entry (None when none came back)."""
    head: dict[str, Any] = {"key": key, "line": line}
    if entry is None:
        return {
            **head,
            "status": "error",
            "error": {"stage": "missing", "message": "no response came back for this key"},
        }
    response = entry.get("response")
    if response is None:
        err = entry.get("error") or {}
        error = {
            "stage": "request",
            "code": err.get("code"),
            "message": err.get("message") or "the request failed",
        }
        return {
            **head,
            "status": "error",
            "error": {k: v for k, v in error.items() if v is not None},
        }
    text = answer_text(response)
    extra = {"response": response} if include_response else {}
    if text is None:
        reason = (response.get("promptFeedback") or {}).get("blockReason", "no candidates")
        error = {"stage": "request", "message": f"the response has no candidate ({reason})"}
        return {**head, "status": "error", "error": error, **extra}
    candidate = response["candidates"][0]
    record: dict[str, Any] = {**head, "status": "ok", "text": text}
    if filter_json:
        try:
            record["json"] = parse_json_text(text)
        except (ValueError, RecursionError) as exc:
            record = {
                **head,
                "status": "error",
                "text": text,
                "error": {"stage": "parse", "message": str(exc)},
            }
    record["finish_reason"] = candidate.get("finishReason")
    record["model_version"] = response.get("modelVersion")
    record["usage"] = usage(response)
    record.update(extra)
    return record


def invalid_record(error: LineError) -> dict[str, Any]:
    """A line skipped under `on_invalid_line: skip_line` still gets its record."""
    return {
        "key": None,
        "line": error.line,
        "status": "error",
        "error": {"stage": "invalid", "message": error.message},
    }


@dataclass
class Tally:
    """Counts of what a results file holds, for the log."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())

    def add(self, record: Mapping[str, Any]) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            stage = record["error"]["stage"]
            self.errors[stage] = self.errors.get(stage, 0) + 1


def iter_records(
    input_path: Path,
    defaults: Defaults,
    lookup: ResponseLookup,
    *,
    include_response: bool,
    tally: Tally,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Walk the input again (in order) and pair each request with its entry by key."""
    for item in read_requests(input_path, defaults):
        if isinstance(item, Request):
            record = record_for(
                item.key,
                item.line,
                lookup.get(item.key),
                filter_json=item.filter_json,
                include_response=include_response,
            )
        else:
            record = invalid_record(item)
        tally.add(record)
        yield record
        if progress is not None:
            progress(tally.total)


def write_results(
    target: Path,
    input_path: Path,
    defaults: Defaults,
    lookup: ResponseLookup,
    *,
    include_response: bool,
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """Write the results file atomically at `target` (FileExistsError if the name is taken).

    `progress(n)` is called after the n-th record has been handed to the writer.
    """
    tally = Tally()
    records = iter_records(
        input_path,
        defaults,
        lookup,
        include_response=include_response,
        tally=tally,
        progress=progress,
    )
    lines = (json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    atomic.write_file(target, lines, replace=False)
    return tally


def write_error_report(target: Path, report: Mapping[str, Any]) -> None:
    atomic.write_file(
        target, [json.dumps(report, ensure_ascii=False, indent=2).encode() + b"\n"], replace=False
    )


class ResponsesFileIndex:
    """Key -> byte offset of each line in a downloaded responses file.

    The offsets stay in memory up to `memory_bytes` of keys, then move to SQLite on disk beside
    the file (`.idx`), so memory stays flat however many responses there are; entries are read
    back from the file one at a time.
    """

    def __init__(self, responses: Path, memory_bytes: int | None = None) -> None:
        self._path = responses
        index = responses.with_name(responses.name + ".idx")
        # An index a crash left behind (journal off: possibly corrupt) must not be reused.
        index.unlink(missing_ok=True)
        self._offsets = keymap.KeyMap(index, memory_bytes)
        self._handle = responses.open("rb")
        self._build()

    def _build(self) -> None:
        offset = 0
        for raw in self._handle:
            key = line_key(raw)
            if key is not None:  # blank or keyless lines cannot be matched to a request
                self._offsets.add(key, offset)
            offset += len(raw)

    def get(self, key: str, /) -> dict[str, Any] | None:
        offset = self._offsets.get(key)
        if offset is None:
            return None
        self._handle.seek(offset)
        try:
            entry = json.loads(self._handle.readline())
        except ValueError:  # the quick key scan accepted a line that is not JSON after all
            return None
        return entry if isinstance(entry, dict) and _entry_key(entry) == key else None

    def close(self) -> None:
        self._handle.close()
        self._offsets.close()
        self._path.with_name(self._path.name + ".idx").unlink(missing_ok=True)


def line_key(raw: bytes) -> str | None:
    """The request key of one responses-file line, None for a line without one.

    Lines usually start with a plain string key (`{"key": "a1", ...`): that is read without
    parsing the whole line; anything else is parsed.
    """
    quick = _KEY_PREFIX.match(raw)
    if quick is not None:
        with contextlib.suppress(UnicodeDecodeError):
            return quick.group(1).decode()
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return _entry_key(value) if isinstance(value, dict) else None


_KEY_PREFIX = re.compile(rb'\{\s*"key"\s*:\s*"([^"\\\x00-\x1f]*)"\s*[,}]')


def _entry_key(value: dict[str, Any]) -> str | None:
    key = value.get("key")
    if key is None:
        metadata = value.get("metadata")
        key = metadata.get("key") if isinstance(metadata, dict) else None
    return None if key is None else str(key)
