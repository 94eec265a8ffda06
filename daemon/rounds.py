"""Follow-up rounds: requests that failed retryably (429, 5xx) or went missing are sent
again as new jobs of the same file, up to `retry_requests` more rounds, with backoff; the
follow-up jobs are cut into parts by the same limits as the first round's."""

from __future__ import annotations

from pathlib import Path

import orjson

from . import answers, plan, records
from .context import Context, Tracked
from .inputs import estimate_tokens, prompt_chars
from .jobrecord import JobEntry
from .jsonl import STREAM_BUFFER
from .keymap import KeyMap


def all_final(job: JobEntry, saved: Path) -> bool:
    """Whether every request of `job` has an answer another try would not change (the usual
    case), found without remembering keys: counted when its answers were downloaded, else
    counted here (`answers.is_final`)."""
    final = job.final_answers
    if final is None:
        try:
            with saved.open("rb", buffering=STREAM_BUFFER) as handle:
                final = sum(answers.is_final(raw) for raw in handle)
        except FileNotFoundError:
            return False
    return final >= job.requests


def plan_retry_round(ctx: Context, t: Tracked, current: int) -> list[JobEntry]:
    """Requests of round `current` that failed retryably or went missing, as new jobs."""
    record = t.record
    jobs = [
        j
        for j in record.jobs
        if j.round == current and j.succeeded and not all_final(j, t.job_file(j, "out"))
    ]
    if not jobs:
        return []
    final = KeyMap()  # keys answered for good (ok, or an error another try will not fix)
    try:
        for job in jobs:
            saved = t.job_file(job, "out")
            if not saved.exists():
                continue
            for entry in answers.read_entries(saved):
                if entry.key is not None and not records.is_retryable(entry):
                    final.put(entry.key, 1)
        added: list[JobEntry] = []
        out = None
        next_index = max(j.index for j in record.jobs) + 1
        limits = plan.JobLimits.of(ctx.config.limits, ctx.engine.limits)
        try:
            for job in jobs:
                with t.job_file(job, "req").open("rb", buffering=STREAM_BUFFER) as source:
                    for raw in source:
                        key = answers.line_key(raw)
                        if key is None or final.get(key) is not None:
                            continue
                        tokens = _tokens(raw)
                        current_job = added[-1] if added else None
                        if current_job is None or not plan.fits_in(
                            current_job, len(raw), tokens, limits
                        ):
                            if out is not None:
                                out.close()
                            current_job = JobEntry(
                                index=next_index,
                                round=current + 1,
                                part=len(added) + 1,
                                mode="inline",
                                create_pending_since=ctx.stamp() if record.in_doubt else None,
                            )
                            next_index += 1
                            added.append(current_job)
                            out = t.job_file(current_job, "req").open("wb", buffering=STREAM_BUFFER)
                        assert out is not None
                        out.write(raw)
                        current_job.requests += 1
                        current_job.bytes += len(raw)
                        current_job.tokens += tokens
        finally:
            if out is not None:
                out.close()
    finally:
        final.close()
    delay = ctx.policy.backoff.delay(current - 1)
    for job in added:
        job.mode = limits.mode(job.bytes, job.requests)
        t.defer(job, delay, ctx.clock(), ctx.wall())
    record.jobs.extend(added)
    ctx.save(t)
    return added


def _tokens(raw: bytes) -> int:
    """Estimated input tokens of a request line, counted as the validation pass counts them."""
    try:
        request = orjson.loads(raw).get("request")
    except (orjson.JSONDecodeError, AttributeError):
        request = None
    chars = prompt_chars(request) if isinstance(request, dict) else len(raw)
    return estimate_tokens(chars)


def attempts(t: Tracked) -> dict[str, int]:
    """Key -> number of jobs that carried it, for keys sent more than once (follow-up jobs)."""
    carried: dict[str, int] = {}
    for job in t.record.jobs:
        if job.round > 1 and t.job_file(job, "req").exists():
            for key in answers.request_keys(t.job_file(job, "req")):
                carried[key] = max(carried.get(key, 1), job.round)
    return carried
