"""The steps of a file's lifecycle: one handler per state, and what a failure in each means.

`FILE_STEPS` maps each `FileState` to its step, `JOB_STEPS` each `JobState` of a file's jobs
(their handlers are in `remote.py`). A step carries its handler, the report stage it gives
when it gives up, the worker pool it runs in, and whether it runs while the daemon stops.
Handlers save the sidecar *before* any effect that must not happen twice; failures are
decided by the retry policy (`failures.RetryPolicy`), never by the handler that met them.
"""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import logs, plan, publish, remote, rounds
from .claims import claimed_input
from .context import UNTIL_RESUMED, Context, Next, Pool, Tracked
from .errors import CallFailed, InvalidTransition, LeftAlone
from .failures import Action, Call, Failure, Kind, classify
from .faults import crash_point
from .jobrecord import FileState, JobEntry, JobState

log = logs.get()

MAX_IDLE_SECONDS = 60.0
"""A file in flight is looked at again at least this often, whatever its jobs say."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context, Tracked], Next]
    stage: str  # the error report's stage when this step gives up
    pool: Pool
    during_stop: bool  # finishes while the daemon stops (else resumed at the next start)


@dataclass(frozen=True)
class JobStep:
    name: str
    run: Callable[[Context, Tracked, JobEntry], float | None]  # seconds until due; None: slot
    stage: str
    call: Call


def validate(ctx: Context, t: Tracked) -> Next:
    """Read the claimed input once: check every line, write the index and the jobs' requests."""
    record, config = t.record, ctx.config
    path = claimed_input(t.spool, record)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return fail(ctx, t, "validation", f"{t.name} is a symbolic link; links are never followed")
    if not stat.S_ISREG(st.st_mode):
        return fail(ctx, t, "validation", f"{t.name} is not a regular file")
    if st.st_size > config.limits.max_file_bytes:
        return fail(
            ctx,
            t,
            "validation",
            f"{t.name} is {st.st_size} bytes, over limits.max_file_bytes "
            f"({config.limits.max_file_bytes})",
        )
    limits = plan.JobLimits.of(config.limits, ctx.engine.limits)
    skip = config.on_invalid_line == "skip_line"
    started = time.thread_time()
    try:
        found = plan.write_plan(
            path,
            t.defaults,
            limits,
            t.work("index"),
            lambda n: t.work(f"j{n}.req"),
            keep_invalid=skip,
        )
    except PermissionError as exc:
        return fail(ctx, t, "validation", f"{t.name}: cannot read: {exc.strerror}")
    scan = found.scan
    errors = [e.as_dict() for e in scan.errors]
    if scan.error_count and (not skip or not scan.requests):
        return fail(ctx, t, "validation", f"{t.name}: {scan.summary()}", errors, scan.error_count)
    if not scan.requests:
        return fail(ctx, t, "validation", f"{t.name} holds no requests (empty or only blank lines)")
    if found.too_big:
        return fail(ctx, t, "validation", f"{t.name}: {found.too_big}")
    record.sha256, record.size_bytes, record.requests = scan.sha256, scan.size, scan.requests
    record.index_bytes = found.index_bytes
    record.invalid_lines = scan.error_count
    record.model = config.model
    record.filter_json = t.defaults.filter_json
    record.include_response = (
        config.include_response if record.include_response is None else record.include_response
    )
    record.endpoint, record.key_id = ctx.engine.endpoint, ctx.engine.account
    record.rounds = 1 + config.retry_requests
    record.jobs = [
        JobEntry(
            index=job.part,
            part=job.part,
            requests=job.requests,
            bytes=job.bytes,
            tokens=job.tokens,
            mode=limits.mode(scan.payload_bytes, scan.requests),
            create_pending_since=ctx.stamp() if record.in_doubt else None,
        )
        for job in found.jobs
    ]
    record.move_to(FileState.QUEUED)
    t.dirty = True  # saved if it must wait for a slot; else the save before its create does
    log.info(
        "validated",
        file=t.name,
        requests=scan.requests,
        bytes=scan.size,
        jobs=len(record.jobs),
        mode=record.jobs[0].mode if len(record.jobs) == 1 else "parts",
        skipped_lines=scan.error_count,
        tokens_estimate=found.tokens,
        cpu_seconds=round(time.thread_time() - started, 3),
    )
    return Next.wait_for_slot()


def drive(ctx: Context, t: Tracked) -> Next:
    """The file's jobs are in flight: run each job's step that is due."""
    record = t.record
    publish.ensure_work_files(ctx, t)
    now = ctx.clock()
    wait = Next.after(MAX_IDLE_SECONDS)  # every job below says sooner; this is a safety net
    for job in record.jobs:
        if job.state is JobState.COLLECTED:
            continue
        if ctx.stopping():
            return Next.after(0.05)
        if t.cancel_requested and job.state is JobState.QUEUED:
            # Ended without a job: collected below like any ended job.
            remote.end_job(
                ctx, t, job, "cancelled before a job was created", remote.CANCELLED, "job"
            )
        elif job.state is JobState.QUEUED and job.index not in t.granted:
            remaining = t.deferred(job, now)
            wait = wait.also(Next.after(remaining) if remaining > 0 else Next.wait_for_slot())
            continue
        due = t.due.get(job.index, now)
        if due > now:
            wait = wait.also(Next.after(due - now))
            continue
        delay = run_job(ctx, t, job)
        if delay == UNTIL_RESUMED:
            wait = wait.also(Next.until_resumed())
        elif delay is None:  # back in the queue: for a slot, after any deferral it was given
            remaining = t.deferred(job, ctx.clock())
            wait = wait.also(Next.after(remaining) if remaining > 0 else Next.wait_for_slot())
        elif not collected(job):
            t.due[job.index] = ctx.clock() + delay
            wait = wait.also(Next.after(delay))
    if all(j.state is JobState.COLLECTED for j in record.jobs):
        return finish_round(ctx, t)
    return wait


def collected(job: JobEntry) -> bool:
    """A function, not an inline test: `run_job` changes `job.state` behind mypy's narrowing."""
    return job.state is JobState.COLLECTED


def run_job(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    """Run the job's steps until it must wait; failures are decided by the retry policy."""
    while job.state is not JobState.COLLECTED:
        step = JOB_STEPS[job.state]
        if ctx.health.paused and step.call is not Call.LOCAL:
            return UNTIL_RESUMED  # no call of its own while paused: one probe for the daemon
        try:
            delay = step.run(ctx, t, job)
        except CallFailed as exc:
            return on_job_failure(ctx, t, job, step, exc.call, exc.failure)
        except (LeftAlone, InvalidTransition):
            raise
        except Exception as exc:  # our own files, or a bug: retried like the rest
            failure = classify(exc, f"{step.name} job {job.index}")
            if failure.kind is Kind.BUG:
                log.exception("unexpected error", file=t.name, step=step.name)
            return on_job_failure(ctx, t, job, step, step.call, failure)
        if delay is None or delay > 0:
            return delay
        if ctx.stopping():
            return 0.05
    return 0.0


def on_job_failure(
    ctx: Context, t: Tracked, job: JobEntry, step: JobStep, call: Call, failure: Failure
) -> float | None:
    job.retries += 1
    job.last_error = failure.message
    decision = ctx.policy.decide(failure, call, job.retries)
    bound = log.bind(file=t.name, job=job.job_name, part=job.part, step=step.name)
    action = decision.action
    if action is Action.GIVE_UP:
        remote.end_job(ctx, t, job, failure.message, None, step.stage)
        bound.warning("the API refused; the job is given up", reason=failure.message)
        return 0.0
    if action is Action.REQUEUE:
        remote.requeue(ctx, t, job, failure.message, quota=True)
        return None
    if action is Action.MAYBE_GONE:
        return remote.maybe_gone(ctx, t, job, failure, decision.delay)
    with contextlib.suppress(OSError):
        ctx.save(t)
    if action is Action.PAUSE:
        bound.debug("waits for the pause to end", error=failure.message)
        return UNTIL_RESUMED
    _will_retry(ctx, bound, "will retry", failure, decision.delay, retries=job.retries)
    return decision.delay


def _will_retry(
    ctx: Context, bound: Any, event: str, failure: Failure, delay: float, **fields: object
) -> None:
    """Log a failure to be retried: a warning, unless its cause was logged in the last minute."""
    loud = ctx.throttle.due(failure.cause or failure.message)
    say = bound.warning if loud else bound.debug
    say(event, error=failure.message, kind=failure.kind.value, retry_in=round(delay, 2), **fields)


def finish_round(ctx: Context, t: Tracked) -> Next:
    """Every job of the round is collected: plan follow-up jobs, or go on to writing."""
    record = t.record
    current = max(j.round for j in record.jobs)
    if current < record.rounds and not t.cancel_requested and record.error is None:
        added = rounds.plan_retry_round(ctx, t, current)
        if added:
            crash_point("after_round")
            log.info(
                "follow-up jobs for failed requests",
                file=t.name,
                round=current + 1,
                rounds=record.rounds,
                requests=sum(j.requests for j in added),
            )
            return Next.now()
    record.move_to(FileState.WRITING)
    ctx.save(t)
    return Next.now()


def fail(
    ctx: Context,
    t: Tracked,
    stage: str,
    message: str,
    errors: list[dict[str, Any]] | None = None,
    error_count: int | None = None,
) -> Next:
    """The file as a whole fails before any job exists (or after: see `publish_step`)."""
    record = t.record
    record.error = {"stage": stage, "message": logs.redact(message)}
    if errors:
        record.error["errors"] = errors
    if error_count is not None:
        record.error["error_count"] = error_count
    if record.state is not FileState.WRITING:
        record.move_to(FileState.WRITING)
    ctx.save(t)
    log.warning("failed", file=t.name, stage=stage, reason=record.error["message"])
    return Next.now()


FILE_STEPS: dict[FileState, Step] = {
    FileState.CLAIMED: Step("validate", validate, "validation", Pool.LOCAL, False),
    **{
        state: Step("drive", drive, "job", Pool.API, False)
        for state in (
            FileState.QUEUED,
            FileState.UPLOADING,
            FileState.SUBMITTING,
            FileState.RUNNING,
        )
    },
    FileState.WRITING: Step("publish", publish.publish_step, "results", Pool.LOCAL, True),
    FileState.DONE: Step("archive", publish.archive, "results", Pool.LOCAL, True),
    FileState.FAILED: Step("archive", publish.archive, "results", Pool.LOCAL, True),
}
"""Each file state's step."""


JOB_STEPS: dict[JobState, JobStep] = {
    JobState.QUEUED: JobStep("start", remote.start_job, "submission", Call.LOCAL),
    JobState.UPLOADING: JobStep("upload", remote.upload, "submission", Call.UPLOAD),
    JobState.SUBMITTING: JobStep("submit", remote.submit, "submission", Call.CREATE),
    JobState.RUNNING: JobStep("poll", remote.poll, "job", Call.POLL),
    JobState.ENDED: JobStep("collect", remote.collect, "results", Call.COLLECT),
}
"""Each job state's step (COLLECTED has none: the job is done)."""


def advance(ctx: Context, t: Tracked, pool: Pool) -> Next:
    """Run the file's steps in `pool` until it must wait, changes pool, or is finished."""
    while True:
        step = FILE_STEPS[t.record.state]
        if step.pool is not pool:
            return Next.now()
        if ctx.stopping() and not step.during_stop:
            return Next.after(0.05)
        try:
            result = step.run(ctx, t)
        except (LeftAlone, InvalidTransition):
            raise
        except Exception as exc:
            failure = classify(exc, step.name)
            t.record.retries += 1
            t.record.last_error = failure.message
            decision = ctx.policy.decide(failure, Call.LOCAL, t.record.retries)
            if decision.action is Action.GIVE_UP and t.record.state is FileState.CLAIMED:
                log.exception("unexpected error; the file is failed", file=t.name, step=step.name)
                return fail(ctx, t, step.stage, f"internal error: {failure.message}")
            _will_retry(
                ctx,
                log,
                "step failed; will retry",
                failure,
                decision.delay,
                file=t.name,
                step=step.name,
            )
            if failure.kind is Kind.BUG:
                log.exception("unexpected error", file=t.name, step=step.name)
            with contextlib.suppress(OSError):
                ctx.save(t)
            return Next.after(decision.delay)
        if not result.is_now or result.slot or result.finished:
            return result
