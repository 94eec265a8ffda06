"""The steps of one remote batch job: start, upload, create (exactly once), poll, collect.

Each handler takes the file's `Tracked` state and one of its `JobEntry`s and returns the
seconds until the job needs a worker again (None: it waits for a job slot). A create is
recorded in the sidecar before it is sent; while its outcome is unknown the job is looked up
by display name, over a grace period, before it is ever created again.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import answers, logs
from .api import RemoteJob, RemoteState
from .context import Context, Tracked
from .errors import CallFailed, LeftAlone, UnreadableResults
from .failures import Call, Failure, Kind, Outcome, job_outcome
from .faults import crash_point
from .jobrecord import JobEntry, JobState

log = logs.get()

CANCELLED = RemoteState.CANCELLED.value

RESULTS_LIFETIME = 48 * 3600
"""The API keeps a job's responses file this long: downloads are retried until then."""

UPLOAD_KEPT_SECONDS = 40 * 3600
"""An upload is kept for the next attempt of a job refused for the quota while it is younger
than this: the API deletes uploads after 48 hours."""

MAX_UNREADABLE_RESULTS = 3
"""Downloads of a results file that fail to read the same way before its readable part is
taken as the job's answers (an API that keeps sending one broken file)."""

MIN_LOOKUPS = 2
"""A create in doubt is made again only after this many complete listings without the job
(and the lookup grace): one listing a moment after a crash proves little."""


MAX_DELETE_ATTEMPTS = 5
"""Deleting a remote file is retried this often, then left to expire (48 h)."""


def start_job(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    """A slot was granted: name the job and go on to upload or create it."""
    if job.index not in t.granted:
        return None
    t.granted.discard(job.index)
    t.quota_refused.discard(job.index)
    job.display_name = t.record.display_name(job)
    job.not_before = None
    upload = job.mode == "file" and not job.uploaded_file  # kept through a quota wait
    job.move_to(JobState.UPLOADING if upload else JobState.SUBMITTING)
    if job.state is JobState.UPLOADING:
        ctx.save(t)  # (a create saves before its call anyway)
    return 0.0


def upload(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    """File API: upload the job's request file (after removing one a lost reply left behind)."""
    assert job.display_name
    if t.cancel_requested:
        end_job(ctx, t, job, "cancelled before a job was created", CANCELLED, "job")
        return 0.0
    if job.upload_pending_since:
        for name in find_uploads(ctx, t, job.display_name):
            delete_remote(ctx, t, name)
    job.upload_pending_since = ctx.stamp()
    ctx.save(t, durable=True)
    name = ctx.call(
        Call.UPLOAD,
        "upload batch input",
        ctx.engine.upload,
        t.job_file(job, "req"),
        job.display_name,
    )
    crash_point("after_upload")
    job.uploaded_file, job.upload_pending_since = name, None
    job.move_to(JobState.SUBMITTING)
    ctx.save(t)
    log.info("uploaded", file=t.name, part=job.part, uploaded_file=name)
    return 0.0


def find_uploads(ctx: Context, t: Tracked, display_name: str) -> list[str]:
    """Uploads a lost reply may have left behind. Listing them is cleanup, not the upload: if
    the API refuses the listing (400, 404), the upload goes on and a leftover expires in 48 h."""
    try:
        return ctx.call(Call.LOOKUP, "find uploads", ctx.engine.find_uploads, display_name)
    except CallFailed as exc:
        if exc.failure.kind not in (Kind.REFUSED, Kind.NOT_FOUND):
            raise
        log.warning(
            "cannot list uploaded files; an upload left by a lost reply expires after 48 h",
            file=t.name,
            error=exc.failure.message,
        )
        return []


def submit(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    """Create the job exactly once: while a create may have happened, look it up first."""
    record = t.record
    assert job.display_name and record.model
    if job.create_pending_since:
        crash_point("in_lookup")
        found = lookup(ctx, t, job)
        if found is not None:
            log.warning(
                "adopted a job created before a crash or a lost reply", file=t.name, job=found.name
            )
            return started(ctx, t, job, found)
        job.lookups += 1
        job.lookup_seconds += t.elapsed(job, "lookup", ctx.clock())
        grace = ctx.config.api.lookup_grace_seconds
        if job.lookup_seconds < grace or job.lookups < MIN_LOOKUPS:
            job.retries += 1
            delay = min(ctx.policy.backoff.delay(job.retries - 1), grace - job.lookup_seconds)
            log.info(
                "the job is not listed yet; looking again",
                file=t.name,
                display_name=job.display_name,
                retry_in=round(max(delay, 0.01), 2),
            )
            ctx.save(t)
            return max(delay, 0.01)
        log.info(
            "no job was made; creating it",
            file=t.name,
            waited=round(job.lookup_seconds, 1),
            lookups=job.lookups,
        )
        job.create_pending_since = None
        job.lookups, job.lookup_seconds = 0, 0.0
        t.forget_timer(job, "lookup")
    if t.cancel_requested:
        end_job(ctx, t, job, "cancelled before a job was created", CANCELLED, "job")
        return 0.0
    job.create_pending_since = ctx.stamp()
    job.create_calls += 1
    ctx.save(t, durable=True)
    source: str | Path = job.uploaded_file or t.job_file(job, "req")
    crash_point("before_create")
    try:
        remote = ctx.call(
            Call.CREATE,
            "create batch job",
            ctx.engine.create_job,
            record.model,
            job.display_name,
            source,
            inline=job.mode == "inline",
        )
    except CallFailed as exc:
        if exc.failure.server_refused:  # a 4xx: the server did not make it
            job.create_pending_since = None
        raise
    crash_point("after_create")
    return started(ctx, t, job, remote)


def lookup(ctx: Context, t: Tracked, job: JobEntry) -> RemoteJob | None:
    """The job a create in doubt may have made. A file whose sidecar was lost knows no
    attempt numbers: any attempt of the job is taken (the newest), and its number kept."""
    if not t.record.in_doubt:
        assert job.display_name
        return ctx.call(Call.LOOKUP, "look up the job", ctx.engine.find_job, job.display_name)
    prefix = t.record.job_prefix(job)
    found = ctx.call(Call.LOOKUP, "look up the job", ctx.engine.find_job, prefix, prefix=True)
    if found is not None and found.display_name:
        attempt = found.display_name[len(prefix) :]
        if attempt.isdigit():
            job.attempt = int(attempt)
            job.display_name = found.display_name
    return found


def started(ctx: Context, t: Tracked, job: JobEntry, remote: RemoteJob) -> float:
    job.job_name, job.job_state = remote.name, remote.state_name
    job.create_pending_since = None
    job.lookups, job.lookup_seconds = 0, 0.0
    t.forget_timer(job, "lookup")  # (a quota wait goes on: a job may fail for the quota)
    job.polls = 0
    job.move_to(JobState.RUNNING)
    delay = 0.0 if t.cancel_requested else ctx.poll.delay(0)
    job.next_poll_at = ctx.stamp(delay)
    ctx.save(t)
    log.info(
        "submitted",
        file=t.name,
        job=remote.name,
        part=job.part,
        round=job.round,
        requests=job.requests,
        mode=job.mode,
    )
    return delay


def poll(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    assert job.job_name
    remote = ctx.call(Call.POLL, f"get {job.job_name}", ctx.engine.get_job, job.job_name)
    crash_point("while_polling")
    if t.cancel_requested and not remote.done:
        ctx.call(Call.POLL, f"cancel {job.job_name}", ctx.engine.cancel_job, job.job_name)
        log.info("cancelled the job", file=t.name, job=job.job_name)
        return 0.5
    job.polls += 1
    job.not_found_since, job.not_found_seconds = None, 0.0
    t.forget_timer(job, "not_found")
    if remote.state_name != job.job_state:
        log.info(
            "job state changed",
            file=t.name,
            job=job.job_name,
            job_state=remote.state_name,
            previous=job.job_state,
            polls=job.polls,
        )
    job.job_state = remote.state_name
    if t.record.key_id != ctx.engine.account:
        t.record.key_id = ctx.engine.account  # our key reaches the job: it is ours now
    if remote.progress is not None:
        job.progress = remote.progress.as_dict()
    outcome = job_outcome(remote)
    if outcome is Outcome.RUNNING:
        delay = ctx.poll.delay(job.polls)
        if ctx.health.paused:
            delay = max(delay, ctx.policy.pause_seconds)
        job.next_poll_at = ctx.stamp(delay)
        ctx.save(t)
        return delay
    job.ended_at = ctx.stamp()
    ctx.counters.job_ended()
    if outcome is Outcome.ANSWERED:
        t.remote[job.index] = remote
        job.results_file = remote.results
        job.move_to(JobState.ENDED)
        ctx.save(t)
        return 0.0
    message = remote.error_message or "no message from the API"
    if remote.state is RemoteState.CANCELLED and t.cancel_requested and not remote.error_message:
        message = "cancelled by gemini-batchd cancel"
    if outcome is Outcome.QUOTA:
        requeue(ctx, t, job, message, quota=True)
        return None
    if outcome is Outcome.EXPIRED and job.expired_resubmits < ctx.config.expired_resubmits:
        log.warning("job expired; resubmitting", file=t.name, job=job.job_name)
        job.expired_resubmits += 1
        requeue(ctx, t, job, message, quota=False)
        return None
    ending = f"the batch job ended {remote.state_name}: {message}"
    end_job(ctx, t, job, ending, remote.state_name, "job")
    return 0.0


def maybe_gone(
    ctx: Context, t: Tracked, job: JobEntry, failure: Failure, delay: float
) -> float | None:
    """404 for a job: it is gone only after 404s for at least `poll.max_seconds`."""
    if job.state is JobState.ENDED:  # the responses file: retried while the API may keep it
        job.collect_failing_seconds += t.elapsed(job, "collect", ctx.clock())
        if job.collect_failing_seconds > RESULTS_LIFETIME:
            job.error, job.stage = f"the results could not be fetched: {failure.message}", "results"
            job.results_file = None
            job.move_to(JobState.COLLECTED)
            ctx.save(t)
            return 0.0
        ctx.save(t)
        return delay
    if t.record.key_id and t.record.key_id != ctx.engine.account:
        raise LeftAlone(f"its job {job.job_name} is not reachable with this daemon's API key")
    job.not_found_since = job.not_found_since or ctx.stamp()
    job.not_found_seconds += t.elapsed(job, "not_found", ctx.clock())
    window = max(ctx.config.poll.max_seconds, 1.0)
    if job.not_found_seconds >= window and job.retries >= 3:
        end_job(ctx, t, job, f"the batch job no longer exists: {failure.message}", None, "job")
        return 0.0
    ctx.save(t)
    return min(delay, window / 3)


def collect(ctx: Context, t: Tracked, job: JobEntry) -> float | None:
    """Save the job's answers locally, then delete its files at the API."""
    saved = t.job_file(job, "out")
    if job.succeeded and not saved.exists():
        crash_point("while_fetching")
        if not job.results_file:
            remote = t.remote.pop(job.index, None)
            if remote is None or (remote.inline_responses is None and not remote.results):
                assert job.job_name
                remote = ctx.call(
                    Call.COLLECT, f"get {job.job_name}", ctx.engine.get_job, job.job_name
                )
            if remote.results and not remote.inline_responses:
                job.results_file = remote.results
                return 0.0
            lines, positional = answers.inline_lines(
                remote.inline_responses or [], answers.request_keys(t.job_file(job, "req"))
            )
            if positional:
                log.info(
                    "answers carry no keys; matched by position", file=t.name, job=job.job_name
                )
            answers.save_answers(saved, lines)
        else:
            temp = t.job_file(job, "download")
            try:
                ctx.call(
                    Call.COLLECT,
                    f"download {job.results_file}",
                    download_answers,
                    ctx,
                    job,
                    temp,
                )
                os.replace(temp, saved)
            except CallFailed as exc:
                if not isinstance(exc.__cause__, UnreadableResults):
                    raise
                same = exc.failure.message == job.last_error
                job.unreadable_results = job.unreadable_results + 1 if same else 1
                if job.unreadable_results < MAX_UNREADABLE_RESULTS:
                    raise
                keep_what_reads(ctx, t, job, temp, saved, exc.failure.message)
            finally:
                temp.unlink(missing_ok=True)
    t.remote.pop(job.index, None)
    for attr in ("uploaded_file", "results_file"):
        name = getattr(job, attr)
        if name:
            delete_remote(ctx, t, name)
            setattr(job, attr, None)
    job.move_to(JobState.COLLECTED)
    ctx.save(t)
    crash_point("after_collect")
    return 0.0


def download_answers(ctx: Context, job: JobEntry, destination: Path) -> None:
    """Download a job's responses file; one that is not JSON lines (an HTML page, a body cut
    short or empty, with 200) fails like a broken connection, so the download is retried."""
    assert job.results_file
    ctx.engine.download(job.results_file, destination, expected_bytes=4 * job.bytes)
    # Every request the API counts as succeeded has a line; a failed one may have none.
    succeeded = (job.progress or {}).get("succeeded", 0)
    job.final_answers = answers.check_responses_file(destination, succeeded)


def keep_what_reads(
    ctx: Context, t: Tracked, job: JobEntry, download: Path, saved: Path, why: str
) -> None:
    """The same results file could not be read whole, download after download: its readable
    answers are the job's answers (the rest come out missing), the file stays at the API for
    the operator (never deleted), and the file as a whole fails, naming it."""
    os.replace(download, saved)
    kept, job.results_file = job.results_file, None
    message = (
        f"the results file {kept} of job {job.job_name} could not be read whole after "
        f"{job.unreadable_results} downloads ({why}); its readable answers are written, the "
        f"others are missing; the file is kept at the API (for 48 h): {kept}"
    )
    t.record.error = t.record.error or {"stage": "results", "message": logs.redact(message)}
    log.warning("results file unreadable; kept at the API", file=t.name, results=kept, reason=why)


def delete_remote(ctx: Context, t: Tracked, name: str) -> None:
    """Delete a file at the API; one it refuses (or cannot find) is left to expire (48 h)."""
    for attempt in range(1, MAX_DELETE_ATTEMPTS + 1):
        try:
            ctx.call(Call.COLLECT, f"delete {name}", ctx.engine.delete, name)
            return
        except CallFailed as exc:
            transient = exc.failure.kind in (Kind.TRANSIENT, Kind.AUTH)
            if not transient or attempt == MAX_DELETE_ATTEMPTS:
                log.warning(
                    "could not delete a file at the API; it expires after 48 h",
                    file=t.name,
                    remote_file=name,
                    error=exc.failure.message,
                )
                return


def requeue(ctx: Context, t: Tracked, job: JobEntry, reason: str, *, quota: bool) -> None:
    """Back to the queue, as a new attempt: the enqueued-token quota is full (with backoff, its
    upload kept for the next attempt), or the job expired (uploaded again)."""
    if quota:
        job.quota_waits += 1
        job.quota_wait_seconds += t.elapsed(job, "quota", ctx.clock())
        ctx.counters.quota_refused()
        limit = ctx.config.limits.max_quota_wait_seconds
        if job.quota_wait_seconds >= limit:
            hours = job.quota_wait_seconds / 3600
            end_job(
                ctx,
                t,
                job,
                f"waited {hours:.1f} h ({job.quota_waits} attempts) for the enqueued-token quota "
                f"and nothing freed it (limits.max_quota_wait_seconds: {limit:g}); the last "
                f"refusal: {reason}",
                None,
                "submission",
            )
            return
    kept = job.uploaded_file if quota and job.quota_wait_seconds < UPLOAD_KEPT_SECONDS else None
    for name in (job.uploaded_file, job.results_file):
        if name and name != kept:
            delete_remote(ctx, t, name)
    job.leave_remote()
    job.uploaded_file = kept
    if quota:
        t.defer(job, ctx.policy.backoff.delay(job.quota_waits - 1), ctx.clock(), ctx.wall())
        t.quota_refused.add(job.index)
    job.attempt += 1
    job.move_to(JobState.QUEUED)
    job.last_error = logs.redact(reason)
    ctx.save(t)
    log.warning(
        "back to the queue",
        file=t.name,
        part=job.part,
        reason=job.last_error,
        quota_waits=job.quota_waits,
        retry_in=round(job.defer_seconds, 2) if quota else None,
    )


def end_job(
    ctx: Context, t: Tracked, job: JobEntry, error: str | None, job_state: str | None, stage: str
) -> None:
    """The job is over without answers (failed, refused, cancelled, gone)."""
    job.error = logs.redact(error) if error else None
    job.stage = stage
    if job_state is not None:
        job.job_state = job_state
    job.ended_at = job.ended_at or ctx.stamp()
    job.move_to(JobState.ENDED)
    ctx.save(t)
