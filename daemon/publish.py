"""Publishing: match answers to requests by key, write the outbox, archive the input.

One way of matching for the daemon and the library API: a job's answers are saved as lines
`{"key", "response" | "error" | "status"}` (the File API's own responses format; inline
answers are written in it too), and `Answers` finds the line of any key -- later jobs (retry
rounds) winning -- with memory that stays flat however many keys there are. The steps of a
finished file are here too: `publish_step` (WRITING) and `archive` (DONE / FAILED).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from . import atomic, logs, records, rounds, wire
from .claims import claimed_input
from .context import Context, Next, Tracked
from .faults import crash_point
from .jobrecord import FileState, JobRecord, JobState, isotime
from .keymap import KeyMap
from .plan import IndexEntry, JobLimits, dumps, read_index, write_plan
from .records import Tally
from .spool import SIDECAR_SUFFIX

OFFSET_BITS = 44
"""An answer's location packs (file number, byte offset) into one int: 16 TB per file."""

log = logs.get()


def inline_lines(items: list[dict[str, Any]], keys: Iterable[str]) -> tuple[list[bytes], bool]:
    """An inline job's answers as responses-file lines, in request order; the flag says they
    carried no keys and were matched by position (see `wire.match_inline`)."""
    expected = list(keys)
    matched = wire.match_inline(expected, items)
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


def read_entries(path: Path) -> Iterator[wire.Entry]:
    """The answers of an answers file, one at a time."""
    with path.open("rb") as handle:
        yield from read_entries_of(handle)


def read_entries_of(lines: Iterable[bytes]) -> Iterator[wire.Entry]:
    """The answers among answer lines (lines that are not JSON objects are skipped)."""
    for raw in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            value = orjson.loads(raw)
            if isinstance(value, dict):
                yield wire.entry_from_obj(value)


def check_responses_file(path: Path, answered: int = 0) -> None:
    """Raise `wire.BadReply` unless a downloaded responses file starts and ends with a whole
    JSON object: an HTML page sent with 200, or a body cut short, is a failed download (to be
    retried), not the job's answers. A body is only ever cut at its end, so the first and last
    lines tell. `answered`: requests the job reported done; fewer lines than that is a failure
    too (a body cut at a line boundary, or empty)."""
    first: bytes | None = None
    last: bytes | None = None
    lines = 0
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                first = line if first is None else first
                last = line
                lines += 1
    if lines < answered:  # cut short, even at a line boundary
        raise wire.BadReply(
            f"the responses file has {lines} lines; the job reported {answered} answers"
        )
    for which, raw in (("first", first), ("last", last)):
        if raw is None:
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise wire.BadReply(
                f"the responses file is not JSON lines: its {which} line is not a JSON object"
                f" ({path.stat().st_size} bytes received)"
            )


def request_keys(request_file: Path) -> Iterator[str]:
    """The keys of a job's request file, in order."""
    with request_file.open("rb") as handle:
        for raw in handle:
            key = wire.line_key(raw)
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
                    key = wire.line_key(raw)
                    if key is not None:
                        self._offsets.put(key, (number << OFFSET_BITS) | offset)
                    offset += len(raw)
        except BaseException:
            self.close()
            raise

    def get(self, key: str) -> wire.Entry | None:
        packed = self._offsets.get(key)
        if packed is None:
            return None
        handle = self._handles[packed >> OFFSET_BITS]
        handle.seek(packed & ((1 << OFFSET_BITS) - 1))
        try:
            value = orjson.loads(handle.readline())
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, dict):
            return None
        entry = wire.entry_from_obj(value)
        return entry if entry.key == key else None

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []
        self._offsets.close()


class OutOfOrder(Exception):
    """Answers did not come back in request order: match them through an index instead."""


class AnswerStream:
    """Answers read in step with the requests, for the usual case that they come back in
    request order (some perhaps missing): no index, no seeking. `finish` raises `OutOfOrder`
    if an answer was left behind, which proves the order assumption wrong."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = [path.open("rb") for path in files]
        self._lines = itertools.chain.from_iterable(self._handles)
        self._raw = b""
        self._key: str | None = None
        self._advance()

    def _advance(self) -> None:
        for raw in self._lines:
            key = wire.line_key(raw)
            if key is not None:
                self._raw, self._key = raw, key
                return
        self._raw, self._key = b"", None

    def get(self, key: str) -> wire.Entry | None:
        if key != self._key:
            return None  # missing, or out of order: `finish` tells
        raw = self._raw
        self._advance()
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return wire.entry_from_obj(value, key) if isinstance(value, dict) else None

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
    first: AnswerStream | Answers
    first = AnswerStream(merge.answers) if in_order else Answers(merge.answers, merge.spill)
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
        filter_json=item.filter_json,
        include_response=merge.include_response,
        attempts=attempts,
    )


def write_results(target: Path, merge: Merge, *, progress: Any = None) -> Tally:
    """Write the results file so it appears complete or not at all (FileExistsError if taken).

    Answers are first read in request order; if they were not, the file is written again
    through an index. `progress(n)` is called after the n-th record has been handed over.
    """
    for in_order in (True, False):
        tally = Tally()

        def lines(in_order: bool = in_order, tally: Tally = tally) -> Iterator[bytes]:
            records_ = iter_records(merge, tally, in_order=in_order)
            for number, record in enumerate(records_, start=1):
                yield dumps(record) + b"\n"
                if progress is not None:
                    progress(number)

        try:
            atomic.write_file(target, lines(), replace=False)
        except OutOfOrder as exc:
            log.info("answers out of request order; matching them by key", reason=str(exc))
            continue
        return tally
    raise AssertionError("unreachable: the indexed pass cannot be out of order")


def write_report(target: Path, report: Mapping[str, Any]) -> None:
    body = json.dumps(report, ensure_ascii=False, indent=2).encode() + b"\n"
    atomic.write_file(target, [body], replace=False)


def results_are_ours(target: Path, index: Path) -> bool:
    """Whether an outbox file found at our recorded name holds our records (published just
    before a crash) rather than another input's that took the free name while we were down."""
    try:
        with target.open("rb") as handle:
            for item, raw in itertools.zip_longest(read_index(index), handle):
                if item is None or raw is None:
                    return False
                found = orjson.loads(raw)
                if (found.get("key"), found.get("line")) != (item.key, item.line):
                    return False
        return True
    except (ValueError, AttributeError):  # not JSON records: not ours
        return False
    except OSError:  # cannot tell: keep it (never two outbox files for one input)
        return True


def report_is_ours(target: Path, claim_id: str) -> bool:
    try:
        with target.open("rb") as handle:
            return bool(json.load(handle).get("claim_id") == claim_id)
    except (ValueError, AttributeError):
        return False
    except OSError:
        return True


def save_answers(target: Path, lines: Iterable[bytes]) -> None:
    """Write a job's answers file atomically (replacing a partial one from before a crash)."""
    atomic.write_file(target, (line + b"\n" for line in lines))


def remove_quietly(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ---- the steps of a finished file ------------------------------------------------


def ensure_work_files(ctx: Context, t: Tracked) -> None:
    """Work files are written without fsync: for a file taken over after a crash (or from an
    older version), check them against the sizes the sidecar recorded, and write them again
    from the claimed input, cut into the same parts, if they are not whole."""
    if t.verified:
        return
    t.verified = True
    record = t.record
    first = sorted((j for j in record.jobs if j.round == 1), key=lambda j: j.part)
    if _whole(t.work("index"), record.index_bytes) and all(
        _whole(t.job_file(j, "req"), j.bytes) for j in first
    ):
        return
    source = claimed_input(t.spool, record)
    if not os.path.lexists(source):
        log.error("work files are damaged and the claimed input is gone", file=t.name)
        return
    log.warning("writing the work files of a file in flight again", file=t.name)
    found = write_plan(
        source,
        t.defaults,
        JobLimits(2**62, None, None),
        t.work("index"),
        lambda n: t.work(f"j{n}.req"),
        keep_invalid=ctx.config.on_invalid_line == "skip_line",
        part_sizes=[j.requests for j in first] or None,
    )
    if record.sha256 and found.scan.sha256 != record.sha256:
        log.warning("the claimed input changed since it was validated", file=t.name)
    record.index_bytes = found.index_bytes
    for job, planned in zip(first, found.jobs, strict=False):
        job.bytes = planned.bytes


def _whole(path: Path, size: int | None) -> bool:
    try:
        return size is None or path.stat().st_size == size
    except FileNotFoundError:
        return False


def publish_step(ctx: Context, t: Tracked) -> Next:
    """Write the results and/or the error report under names chosen (and recorded) first."""
    record = t.record
    failed_parts = {
        j.part: j for j in record.jobs if j.round == 1 and j.state is JobState.COLLECTED and j.error
    }
    if record.error is None and failed_parts:
        first = next(iter(failed_parts.values()))
        parts = max(j.part for j in record.jobs if j.round == 1)
        where = (
            f"part {first.part} of {parts} (job {first.job_name or 'not created'}): "
            if parts > 1
            else ""
        )
        record.error = {
            "stage": first.stage or "job",
            "message": logs.redact(where + (first.error or "the job failed")),
            "job_name": first.job_name,
            "job_state": first.job_state,
        }
        log.warning(
            "failed",
            file=t.name,
            job=first.job_name,
            stage=record.error["stage"],
            job_state=first.job_state,
            reason=record.error["message"],
        )
    answered = any(j.succeeded for j in record.jobs if j.round == 1)
    if answered:
        ensure_work_files(ctx, t)
    want_results = answered and t.work("index").exists()
    want_report = record.error is not None
    if (want_results and record.output is None) or (want_report and record.report is None):
        if want_results and record.output is None:
            record.output = str(atomic.free_name(t.spool.results_target(t.name)))
        if want_report and record.report is None:
            record.report = str(atomic.free_name(t.spool.report_target(t.name)))
        ctx.save(t, durable=True)
    if want_report:
        assert record.report is not None
        target = Path(record.report)
        if os.path.lexists(target) and not report_is_ours(target, record.claim_id):
            record.report = None
            return Next.now()
        if not os.path.lexists(target):
            try:
                write_report(target, report(record, ctx.wall()))
            except FileExistsError:
                record.report = None
                return Next.now()
    if want_results:
        assert record.output is not None
        target = Path(record.output)
        if os.path.lexists(target) and not results_are_ours(target, t.work("index")):
            log.warning(
                "the outbox name chosen before a crash was taken by another file; choosing again",
                file=t.name,
                output=target.name,
            )
            record.output = None
            return Next.now()
        if not os.path.lexists(target):
            try:
                write_file_results(ctx, t, target)
            except FileExistsError:
                record.output = None
                return Next.now()
            crash_point("after_write")
    else:
        record.output = None
    record.finished_at = ctx.stamp()
    record.move_to(FileState.FAILED if record.error else FileState.DONE)
    ctx.save(t)
    return Next.now()


def write_file_results(ctx: Context, t: Tracked, target: Path) -> None:
    record = t.record
    started = time.thread_time()
    answered = [j for j in record.jobs if t.job_file(j, "out").exists()]
    merge = Merge(
        index=t.work("index"),
        answers=[
            t.job_file(j, "out") for j in sorted(answered, key=lambda j: j.part) if j.round == 1
        ],
        later=[t.job_file(j, "out") for j in answered if j.round > 1],
        part_errors={
            j.part: j.error or "the job failed"
            for j in record.jobs
            if j.round == 1 and j.error is not None
        },
        attempts=rounds.attempts(t),
        include_response=bool(record.include_response),
        spill=t.work("keys"),
    )
    half = (record.requests or 0) // 2

    def progress(written: int) -> None:
        if written == half:
            crash_point("mid_write")

    tally = write_results(target, merge, progress=progress)
    record.ok, record.errors = tally.ok, tally.error_count
    record.errors_by_stage = dict(tally.errors)
    record.tokens = dict(tally.tokens)
    bound = log.bind(file=t.name, job=record.job_name, output=target.name)
    if tally.total and not tally.ok:
        bound.warning("every request failed", errors=tally.errors)
    bound.info(
        "results written",
        ok=tally.ok,
        errors=tally.errors,
        tokens=tally.tokens,
        cpu_seconds=round(time.thread_time() - started, 3),
    )


def archive(ctx: Context, t: Tracked) -> Next:
    """Move the input and its sidecar to done/ or failed/ (or delete them); forget the file."""
    record, folder = t.record, t.spool
    source = claimed_input(folder, record)
    visible = folder.input(t.name)
    if os.path.lexists(visible) and source != visible and not atomic.same_entry(visible, source):
        intruder(ctx, t, visible)
    archived: Path | None = None
    if ctx.config.archive == "delete":
        for path in (source, visible):
            path.unlink(missing_ok=True)
    else:
        if record.archived_as is None:
            failed = record.state is FileState.FAILED
            record.archived_as = str(
                folder.free_archive_name(folder.archive_folder(failed), t.name)
            )
            ctx.save(t, durable=True)
        archived = Path(record.archived_as)
        if os.path.lexists(source) and not atomic.link_or_rename(source, archived):
            record.archived_as = None  # taken meanwhile: choose again
            return Next.now()
        if os.path.lexists(visible) and atomic.same_entry(visible, archived):
            visible.unlink()
    # The work files go while the sidecar is still in processing/: a crash from here on is
    # finished by the next start, which archives the file again (its sidecar says so).
    remove_quietly(list(folder.work_files(record.claim_id)))
    folder.cancel_marker(t.name).unlink(missing_ok=True)
    crash_point("while_archiving")
    if archived is None:
        t.sidecar.unlink(missing_ok=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.replace(t.sidecar, Path(str(archived) + SIDECAR_SUFFIX))
        atomic.fsync_dir(archived.parent)
    folder.lock(t.name).unlink(missing_ok=True)  # the service then releases the lock (forget)
    atomic.fsync_dir(folder.processing)
    log.info(
        "archived",
        file=t.name,
        job=record.job_name,
        outcome=record.state.value.lower(),
        output=record.output,
        report=record.report,
        archived_as=record.archived_as,
    )
    return Next.done()


def intruder(ctx: Context, t: Tracked, path: Path) -> None:
    """Another file was renamed over processing/NAME while NAME's jobs ran: it was never
    submitted. It gets an error report of its own and goes to failed/."""
    folder = t.spool
    target = atomic.free_name(folder.report_target(t.name))
    message = (
        f"{t.name} was replaced in processing/ while the daemon worked on the file it had "
        "claimed; the replacement was not submitted (submit it again)"
    )
    now = isotime(ctx.wall())
    write_report(
        target,
        {
            "input": t.name,
            "stage": "validation",
            "message": message,
            "job_name": None,
            "job_state": None,
            "errors": [],
            "error_count": 0,
            "time": now,
            "claim_id": None,  # never claimed
        },
    )
    moved = atomic.move_new(path, folder.failed / t.name)
    log.warning(
        "a replaced input was not submitted", file=t.name, report=str(target), moved_to=str(moved)
    )


def report(record: JobRecord, now: datetime) -> dict[str, Any]:
    """The error report: every field of the contract, always."""
    error = record.error or {}
    errors = error.get("errors") or []
    return {
        "input": record.input,
        "stage": error.get("stage", "job"),
        "message": error.get("message", "the file failed"),
        "job_name": error.get("job_name", record.job_name),
        "job_state": error.get("job_state", record.job_state),
        "errors": errors,
        "error_count": error.get("error_count", len(errors)),
        "time": isotime(now),
        "claim_id": record.claim_id,
    }
