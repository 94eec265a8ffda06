"""Answers: the daemon's one answers format, and requests matched to answers by key.

Whatever the engine, a job's answers are saved as lines `{"key", "response" | "error" |
"status"}` (the Gemini File API's own responses format; inline answers are written in it too).
`Answers` finds the line of any key -- later jobs (retry rounds) winning -- with memory that
stays flat however many keys there are; `write_results` merges them with the input's index
into the outbox records, in input order. One way of matching, for the daemon and the library.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec
import orjson

from . import atomic, logs, records
from .errors import BadReply, OutOfOrder, UnreadableResults
from .jsonl import (
    STREAM_BUFFER,
    decode_as,
    dumps,
    dumps_line,
    int_or_none,
    mapping,
    parse_json,
    str_or_none,
)
from .keymap import KeyMap
from .plan import IndexEntry, read_index
from .records import Tally

OFFSET_BITS = 44
"""An answer's location packs (file number, byte offset) into one int: 16 TB per file."""

log = logs.get()


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
        key = mapping(obj.get("metadata")).get("key")
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
    code = int_or_none(raw.get("code"))
    if code is not None:
        status["code"] = code
    for name in ("message", "status"):
        value = str_or_none(raw.get(name))
        if value is not None:
            status[name] = value
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


def inline_lines(items: list[dict[str, Any]], keys: Iterable[str]) -> tuple[list[bytes], bool]:
    """An inline job's answers as responses-file lines, in request order; the flag says they
    carried no keys and were matched by position (see `match_inline`)."""
    expected = list(keys)
    matched = match_inline(expected, items)
    lines = []
    for key in expected:
        entry = matched.entries.get(key)
        if entry is None:
            continue
        line: dict[str, Any] = {"key": key}
        if entry.response is not None:
            line["response"] = entry.response
        if entry.error is not None:
            line["error"] = entry.error
        lines.append(dumps(line))
    return lines, matched.by_position


def read_entries(path: Path) -> Iterator[Entry]:
    """The answers of an answers file, one at a time."""
    with path.open("rb", buffering=STREAM_BUFFER) as handle:
        yield from read_entries_of(handle)


def read_entries_of(lines: Iterable[bytes]) -> Iterator[Entry]:
    """The answers among answer lines (lines that are not JSON objects are skipped)."""
    for raw in lines:
        entry = entry_of_line(raw)
        if entry is not None:
            yield entry


def entry_of_line(raw: bytes, key: str | None = None) -> Entry | None:
    """The answer of one answers line; None for a line that is not a JSON object. `key`:
    the line's key, when the caller has read it already (`line_key`)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return entry_from_obj(value, key) if isinstance(value, dict) else None


def check_responses_file(path: Path, answered: int = 0) -> int:
    """Raise `BadReply` unless a downloaded responses file starts and ends with a whole
    JSON object: an HTML page sent with 200, or a body cut short, is a failed download (to be
    retried), not the job's answers. A body is only ever cut at its end, so the first and last
    lines tell. `answered`: requests the job reported done; fewer lines than that is a failure
    too (a body cut at a line boundary, empty, or predictions not all written yet).

    A line that starts like a JSON object but no parser takes (cut, or nested too deep) is
    `UnreadableResults`: if the same file keeps coming back so, its readable part is used.

    Returns how many answers are final (`is_final`), counted on the way."""
    first: bytes | None = None
    last: bytes | None = None
    lines = final = 0
    with path.open("rb", buffering=STREAM_BUFFER) as handle:
        for line in handle:
            if not line.isspace():  # (not `strip`, which copies the line)
                first = line if first is None else first
                last = line
                lines += 1
                final += is_final(line)
    if lines < answered:  # cut short, even at a line boundary
        raise BadReply(f"the responses file has {lines} lines; the job reported {answered} answers")
    for which, raw in (("first", first), ("last", last)):
        if raw is None:
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            broken = UnreadableResults if raw.lstrip().startswith(b"{") else BadReply
            raise broken(
                f"the responses file is not JSON lines: its {which} line is not a JSON object"
                f" ({path.stat().st_size} bytes received)"
            )
    return final


class _Object(msgspec.Struct):
    """Any JSON object, skipped over: none of its fields is kept."""


class _Outcome(msgspec.Struct):
    """What tells an answers line final: its response is only skipped over, not built."""

    response: _Object | None = None
    error: Any = None
    status: Any = None


_OUTCOME = msgspec.json.Decoder(_Outcome)


def is_final(raw: bytes) -> bool:
    """Whether an answers line is one another try would not change: an answer (the usual
    case, told by one quick pass over the line), or an error not worth a follow-up job."""
    outcome = decode_as(_OUTCOME, raw)
    if (
        outcome is not None
        and outcome.response is not None
        and outcome.error is None
        and outcome.status is None
    ):
        return True
    return any(e.key is not None and not records.is_retryable(e) for e in read_entries_of([raw]))


def request_keys(request_file: Path) -> Iterator[str]:
    """The keys of a job's request file, in order."""
    with request_file.open("rb", buffering=STREAM_BUFFER) as handle:
        for raw in handle:
            key = line_key(raw)
            if key is not None:
                yield key


class Answers:
    """Key -> answer over several answer files; a later file's answer replaces an earlier one.

    Offsets stay in memory up to a budget, then spill to SQLite on disk (`spill`), so memory
    stays flat; answers are read back from their file one at a time.
    """

    def __init__(self, files: list[Path], spill: Path | None = None) -> None:
        self._handles: list[IO[bytes]] = []
        self._offsets = KeyMap(spill)  # removes its spill file when closed
        try:
            for number, path in enumerate(files):
                handle = path.open("rb")
                self._handles.append(handle)
                offset = 0
                for raw in handle:
                    key = line_key(raw)
                    if key is not None:
                        self._offsets.put(key, (number << OFFSET_BITS) | offset)
                    offset += len(raw)
        except BaseException:
            self.close()
            raise

    def get(self, key: str) -> Entry | None:
        packed = self._offsets.get(key)
        if packed is None:
            return None
        handle = self._handles[packed >> OFFSET_BITS]
        handle.seek(packed & ((1 << OFFSET_BITS) - 1))
        entry = entry_of_line(handle.readline())
        return entry if entry is not None and entry.key == key else None

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []
        self._offsets.close()


class AnswerStream:
    """Answers read in step with the requests, for the usual case that they come back in
    request order (some perhaps missing): no index, no seeking. `finish` raises `OutOfOrder`
    if an answer was left behind, which proves the order assumption wrong. `decode`: each
    line is also decoded for `records.plain_record` (not where no record is made from it)."""

    def __init__(self, files: list[Path], *, decode: bool = True) -> None:
        self._decode = decode
        self._handles = [path.open("rb", buffering=STREAM_BUFFER) for path in files]
        self._lines = itertools.chain.from_iterable(self._handles)
        self._next: tuple[bytes, records.AnswerLine | None] = (b"", None)
        self._key: str | None = None
        self._advance()

    def _advance(self) -> None:
        for raw in self._lines:
            answer = records.decode_answer(raw) if self._decode else None
            key = answer.key if answer is not None else None
            if type(key) is not str:
                key = str(key) if type(key) is int else line_key(raw)
            if key is not None:
                self._next, self._key = (raw, answer), key
                return
        self._next, self._key = (b"", None), None

    def take(self, key: str) -> tuple[bytes, records.AnswerLine | None] | None:
        """The answers line of `key` (and its decoding, if it decodes), if it is the next
        one; else None (missing, or out of order: `finish` tells)."""
        if key != self._key:
            return None
        found = self._next
        self._advance()
        return found

    def get(self, key: str) -> Entry | None:
        found = self.take(key)
        return None if found is None else entry_of_line(found[0], key)

    def finish(self) -> None:
        if self._key is not None:
            raise OutOfOrder(f"the answer for {self._key!r} came out of request order")

    def close(self) -> None:
        for handle in self._handles:
            handle.close()


@dataclass
class Merge:
    """What the records of one input are made of."""

    index: Path
    answers: list[Path]  # answer files of the first round's jobs, in part order
    later: list[Path] = field(default_factory=list)  # of follow-up rounds, in order: they win
    part_errors: dict[int, str] = field(default_factory=dict)  # part -> why its job failed
    attempts: Mapping[str, int] = field(default_factory=dict)  # key -> jobs that carried it (> 1)
    include_response: bool = False
    spill: Path | None = None


def iter_records(merge: Merge, tally: Tally, *, in_order: bool) -> Iterator[dict[str, Any]]:
    """The outbox records in input order: each request with its answer, matched by key.

    `in_order`: read the first round's answers in step with the requests (`AnswerStream`);
    raises `OutOfOrder` at the end if they were not in request order.
    """
    plain = not merge.later and not merge.include_response  # records made by `plain_record`
    first: AnswerStream | Answers
    first = (
        AnswerStream(merge.answers, decode=plain)
        if in_order
        else Answers(merge.answers, merge.spill)
    )
    later = Answers(merge.later) if merge.later else None
    try:
        for item in read_index(merge.index):
            record = _record(item, first, later, merge)
            tally.add(record)
            yield record
        if isinstance(first, AnswerStream):
            first.finish()
    finally:
        first.close()
        if later is not None:
            later.close()


def _record(
    item: IndexEntry, first: AnswerStream | Answers, later: Answers | None, merge: Merge
) -> dict[str, Any]:
    if item.invalid is not None:
        return records.invalid_record(item.line, item.key, item.invalid)
    assert item.key is not None
    attempts = merge.attempts.get(item.key, 1)
    if later is None and isinstance(first, AnswerStream):  # the usual case: one round, in order
        found = first.take(item.key)
        if found is None:
            entry = None
        else:
            raw, answer = found
            if answer is not None:  # (decoded only where `plain_record` may serve)
                fast = records.plain_record(
                    answer,
                    item.key,
                    item.line,
                    filter_json=bool(item.filter_json),
                    attempts=attempts,
                )
                if fast is not None:
                    return fast
            entry = entry_of_line(raw, item.key)
    else:
        entry = first.get(item.key)
        if later is not None:
            entry = later.get(item.key) or entry
    if entry is None and item.part in merge.part_errors:
        return records.job_failed_record(
            item.key, item.line, merge.part_errors[item.part], attempts
        )
    return records.record_for(
        item.key,
        item.line,
        entry,
        filter_json=bool(item.filter_json),
        include_response=merge.include_response,
        attempts=attempts,
    )


def write_results(target: Path, merge: Merge, *, progress: Any = None) -> Tally:
    """Write the results file so it appears complete or not at all (FileExistsError if taken).

    Answers are first read in request order; if they were not, the file is written again
    through an index. `progress(n)` is called once the n-th record is made (the file is
    written in chunks of records, so it may not be written yet).
    """
    for in_order in (True, False):
        tally = Tally()

        def lines(in_order: bool = in_order, tally: Tally = tally) -> Iterator[bytes]:
            records_ = iter_records(merge, tally, in_order=in_order)
            chunk: list[bytes] = []
            size = 0
            for number, record in enumerate(records_, start=1):
                line = dumps_line(record)
                chunk.append(line)
                size += len(line)
                if size >= STREAM_BUFFER:
                    yield b"".join(chunk)
                    chunk, size = [], 0
                if progress is not None:
                    progress(number)
            yield b"".join(chunk)

        try:
            atomic.write_file(target, lines(), replace=False)
        except OutOfOrder as exc:
            log.info("answers out of request order; matching them by key", reason=str(exc))
            continue
        return tally
    raise AssertionError("unreachable: the indexed pass cannot be out of order")


def save_answers(target: Path, lines: Iterable[bytes]) -> None:
    """Write a job's answers file atomically (replacing a partial one from before a crash)."""
    atomic.write_file(target, (line + b"\n" for line in lines))
