"""daemon.metrics: counters kept as calls happen, and the file in Prometheus' own text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from daemon import metrics
from daemon.failures import Call
from daemon.health import Health
from daemon.jobrecord import FileState, JobRecord
from tests.support.harness import FakeClock


def test_counters_count_calls_ended_jobs_and_quota_refusals() -> None:
    counters = metrics.Counters()
    counters.call(Call.POLL, "ok")
    counters.call(Call.POLL, "ok")
    counters.call(Call.CREATE, "auth")
    counters.job_ended()
    counters.quota_refused()
    assert counters.calls() == {("poll", "ok"): 2, ("create", "auth"): 1}
    assert (counters.jobs_ended, counters.quota_refusals) == (1, 1)


def test_every_family_parses_as_prometheus_reads_it() -> None:
    finished = metrics.Finished()
    done = JobRecord("a.jsonl", state=FileState.DONE, ok=3, errors=1)
    done.errors_by_stage, done.tokens = {"request": 1}, {"total_tokens": 12}
    finished.add(done)
    view = metrics.View(
        in_flight=[JobRecord("b.jsonl", state=FileState.RUNNING)],
        finished=finished,
        health=Health(FakeClock()),
        counters=metrics.Counters(),
        waiting=2,
        ignored=1,
        started=1_700_000_000.0,
    )
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(view))}
    for family in metrics.families(view):  # the parser names a counter without its _total
        parsed = families[family.name.removesuffix("_total")]
        assert (parsed.type, len(parsed.samples)) == (family.kind, len(family.samples))
    files = {s.labels["state"]: s.value for s in families["gemini_batchd_files"].samples}
    assert (files["WAITING"], files["IGNORED"], files["RUNNING"]) == (2, 1, 1)
    tokens = families["gemini_batchd_tokens"]
    assert tokens.type == "counter"
    assert {s.labels["kind"]: s.value for s in tokens.samples}["total"] == 12
