"""daemon.rounds: requests of a round that failed retryably or went missing become follow-up
jobs of the same file (split like the first round's parts), and `attempts` counts the jobs that
carried each request."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon import jobrecord, rounds
from daemon.api.gemini import GeminiEngine
from daemon.config import Config
from daemon.context import Context, Tracked
from daemon.failures import RetryPolicy
from daemon.health import Health
from daemon.inputs import Defaults, estimate_tokens, prompt_chars, prompt_request
from daemon.jobrecord import FileState, JobEntry, JobRecord, JobState
from daemon.jsonl import dumps
from daemon.logs import Throttle
from daemon.metrics import Counters
from daemon.schedule import Backoff
from daemon.spool import Spool
from tests.support.harness import FakeClock

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def make_context(tmp_path: Path, **settings: Any) -> Context:
    config = Config.model_validate(
        {"inbox": tmp_path / "inbox", "outbox": tmp_path / "outbox", **settings}
    )
    clock = FakeClock()
    return Context(
        config=config,
        engine=GeminiEngine("k", base_url="http://127.0.0.1:9"),
        poll=Backoff(1, 10, 2, 0),
        policy=RetryPolicy(Backoff(5, 300, 2, 0)),
        health=Health(clock),
        counters=Counters(),
        throttle=Throttle(clock),
        clock=clock,
        wall=lambda: NOW,
    )


@pytest.fixture
def contexts(tmp_path: Path) -> Iterator[list[Context]]:
    made: list[Context] = []
    yield made
    for ctx in made:
        ctx.engine.close()


def tracked(ctx: Context, jobs: dict[int, tuple[list[str], list[bytes] | None]]) -> Tracked:
    """A file in flight whose round-1 jobs carried `keys` and answered `lines` (None: failed)."""
    folder = Spool(ctx.config.inbox, ctx.config.outbox)
    folder.heal()
    record = JobRecord("f.jsonl", state=FileState.RUNNING, rounds=3)
    t = Tracked("f.jsonl", record, -1, folder, Defaults())
    for index, (keys, answers) in jobs.items():
        job = JobEntry(index, part=index, requests=len(keys), state=JobState.COLLECTED)
        job.job_state = "JOB_STATE_SUCCEEDED" if answers is not None else "JOB_STATE_FAILED"
        job.error = None if answers is not None else "the batch job ended FAILED"
        requests = [prompt_request(k, i, f"prompt {k}", Defaults()) for i, k in enumerate(keys, 1)]
        t.job_file(job, "req").write_bytes(b"".join(r.wire for r in requests))
        if answers is not None:
            t.job_file(job, "out").write_bytes(b"".join(line + b"\n" for line in answers))
        record.jobs.append(job)
    return t


def ok(key: str) -> bytes:
    return dumps(
        {"key": key, "response": {"candidates": [{"content": {"parts": [{"text": "x"}]}}]}}
    )


def failed(key: str, code: int = 503, status: str | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": "m"}
    if status:
        error["status"] = status
    return dumps({"key": key, "error": error})


def keys_of(t: Tracked, job: JobEntry) -> list[str]:
    return [orjson.loads(line)["key"] for line in t.job_file(job, "req").read_bytes().splitlines()]


def test_retryable_and_missing_requests_become_a_follow_up_job(
    tmp_path: Path, contexts: list[Context]
) -> None:
    ctx = make_context(tmp_path)
    contexts.append(ctx)
    answers = [
        ok("a"),
        failed("b", 503),
        failed("c", 400),  # refused: another try will not fix it
        failed("d", 429),
        failed("e", 13),  # INTERNAL as a google.rpc code
        failed("f", 499, "UNAVAILABLE"),
        # g: missing
    ]
    random.Random(1).shuffle(answers)
    t = tracked(ctx, {1: (["a", "b", "c", "d", "e", "f", "g"], answers)})
    added = rounds.plan_retry_round(ctx, t, 1)
    (job,) = added
    assert (job.index, job.round, job.part, job.state) == (2, 2, 1, JobState.QUEUED)
    assert keys_of(t, job) == ["b", "d", "e", "f", "g"]  # in request order
    assert job.requests == 5 and job.bytes == t.job_file(job, "req").stat().st_size
    assert job.mode == "inline"
    assert job.not_before == jobrecord.isotime(NOW + timedelta(seconds=5))  # backoff of round 1
    assert t.record.jobs[-1] is job
    assert jobrecord.load(t.sidecar).jobs[-1].round == 2  # saved before any of it is sent


def test_follow_up_jobs_are_split_like_parts(tmp_path: Path, contexts: list[Context]) -> None:
    ctx = make_context(tmp_path, limits={"max_requests_per_job": 2})
    contexts.append(ctx)
    keys = [f"k{i}" for i in range(6)]
    t = tracked(ctx, {1: (keys[:3], [failed(k) for k in keys[:3]]), 2: (keys[3:], [])})
    added = rounds.plan_retry_round(ctx, t, 1)
    assert [(j.index, j.part, j.requests) for j in added] == [(3, 1, 2), (4, 2, 2), (5, 3, 2)]
    assert [keys_of(t, j) for j in added] == [["k0", "k1"], ["k2", "k3"], ["k4", "k5"]]
    assert {j.mode for j in added} == {"inline"}


def test_a_big_follow_up_job_goes_through_the_file_api(
    tmp_path: Path, contexts: list[Context]
) -> None:
    ctx = make_context(tmp_path, limits={"inline_max_bytes": 100})
    contexts.append(ctx)
    t = tracked(ctx, {1: (["a", "b"], [failed("a"), failed("b")])})
    (job,) = rounds.plan_retry_round(ctx, t, 1)
    assert job.bytes > 100 and job.mode == "file"


def test_a_follow_up_job_of_many_requests_goes_through_the_file_api(
    tmp_path: Path, contexts: list[Context]
) -> None:
    """An inline job's answers come back in one reply: its request count is capped too."""
    ctx = make_context(tmp_path, limits={"inline_max_requests": 2})
    contexts.append(ctx)
    t = tracked(ctx, {1: (["a", "b", "c"], [failed("a"), failed("b"), failed("c")])})
    (job,) = rounds.plan_retry_round(ctx, t, 1)
    assert job.requests == 3 and job.mode == "file"


def test_follow_up_jobs_keep_to_the_token_budget(tmp_path: Path, contexts: list[Context]) -> None:
    """The first round's parts each fit `limits.max_enqueued_tokens`; so must the retries,
    else the API's quota refuses a job that can never fit."""
    one = estimate_tokens(prompt_chars(prompt_request("a", 1, "prompt a", Defaults()).body))
    ctx = make_context(tmp_path, limits={"max_enqueued_tokens": 2 * one + 1})
    contexts.append(ctx)
    keys = ["a", "b", "c", "d"]
    t = tracked(
        ctx,
        {
            1: (keys[:2], [failed(k) for k in keys[:2]]),
            2: (keys[2:], [failed(k) for k in keys[2:]]),
        },
    )
    added = rounds.plan_retry_round(ctx, t, 1)
    assert [keys_of(t, j) for j in added] == [["a", "b"], ["c", "d"]]
    assert all(j.tokens == 2 * one for j in added)


def test_a_failed_job_s_requests_are_not_retried(tmp_path: Path, contexts: list[Context]) -> None:
    """A whole job that FAILED gets `job` records; its requests are not sent again."""
    ctx = make_context(tmp_path)
    contexts.append(ctx)
    t = tracked(ctx, {1: (["a"], None), 2: (["b"], [ok("b")])})
    assert rounds.plan_retry_round(ctx, t, 1) == []
    assert len(t.record.jobs) == 2


def test_only_the_current_round_is_looked_at(tmp_path: Path, contexts: list[Context]) -> None:
    ctx = make_context(tmp_path)
    contexts.append(ctx)
    t = tracked(ctx, {1: (["a", "b"], [failed("a"), failed("b")])})
    (second,) = rounds.plan_retry_round(ctx, t, 1)
    second.state, second.job_state = JobState.COLLECTED, "JOB_STATE_SUCCEEDED"
    t.job_file(second, "out").write_bytes(ok("a") + b"\n" + failed("b") + b"\n")
    (third,) = rounds.plan_retry_round(ctx, t, 2)
    assert (third.index, third.round) == (3, 3)
    assert keys_of(t, third) == ["b"]
    assert third.not_before == jobrecord.isotime(NOW + timedelta(seconds=10))
    assert rounds.attempts(t) == {"a": 2, "b": 3}
