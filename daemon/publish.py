"""Publishing: the steps of a finished file -- write the outbox, archive the input.

`publish_step` (WRITING) writes the results (merged by `answers.py`) and/or the error report
under names chosen and recorded first, so a crash never writes either twice; `archive`
(DONE / FAILED) moves the input and its sidecar to done/ or failed/.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from . import atomic, logs, rounds
from .answers import Merge, write_results
from .claims import claimed_input
from .context import Context, Next, Tracked
from .faults import crash_point
from .jobrecord import FileState, JobRecord, JobState, isotime
from .plan import JobLimits, read_index, write_plan
from .spool import SIDECAR_SUFFIX

log = logs.get()


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
