"""The Prometheus textfile: written at start, every 15 s and at exit; parsed as Prometheus would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.simulator import Simulator
from tests.support.inprocess import WallClock

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """The file as Prometheus reads it (prometheus_client's own parser), every series once;
    counters end in _total and nothing else does."""
    samples: Series = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("gemini_batchd_") and family.type in ("counter", "gauge")
        for sample in family.samples:
            assert sample.name.endswith("_total") == (family.type == "counter"), sample.name
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series: {sample}"
            samples[key] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[("gemini_batchd_" + name, frozenset(labels.items()))]


def test_metrics_file(make_daemon: Any, sim: Simulator, clock: WallClock, tmp_path: Path) -> None:
    path = tmp_path / "gemini_batchd.prom"
    sim.fail_keys = {"2": 400}
    daemon = make_daemon(metrics_file=str(path), limits={"max_active_jobs": 1})
    daemon.drop("a.jsonl", ["a", "b", "c"])
    daemon.drop("bad.jsonl", b"{nope\n")
    daemon.start()
    first = parse(path.read_text())
    assert value(first, "files", state="WAITING") == 2
    assert value(first, "paused") == 0
    assert value(first, "last_api_success_timestamp_seconds") == 0
    daemon.run_all()
    clock.advance(16)
    daemon.tick()
    samples = parse(path.read_text())
    assert value(samples, "files_finished_total", outcome="done") == 1
    assert value(samples, "files_finished_total", outcome="failed") == 1
    assert value(samples, "requests_ok_total") == 2
    assert value(samples, "request_errors_total", stage="request") == 1
    assert value(samples, "request_errors_total", stage="parse") == 0
    assert value(samples, "tokens_total", kind="total") > 0
    assert value(samples, "tokens_total", kind="prompt") > 0
    assert value(samples, "cost_usd_total") == 0  # no `prices` configured
    assert value(samples, "oldest_file_age_seconds") == 0  # nothing waits
    assert value(samples, "api_calls_total", call="create", outcome="ok") == 1
    assert value(samples, "api_calls_total", call="poll", outcome="ok") >= 1
    assert value(samples, "last_api_success_timestamp_seconds") > 1.7e9
    assert value(samples, "jobs_active") == 0 and value(samples, "jobs_queued") == 0
    assert value(samples, "files", state="RUNNING") == 0
    assert value(samples, "retries_in_progress") == 0
    assert path.stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left"

    sim.api_key = "another key"  # rejected from now on: paused, and the failures are counted
    daemon.drop("c.jsonl", ["x"])
    daemon.run_until(lambda: daemon.service.health.paused)
    clock.advance(16)
    daemon.tick()
    samples = parse(path.read_text())
    assert value(samples, "paused") == 1
    assert value(samples, "api_calls_total", call="create", outcome="auth") >= 1
    assert value(samples, "retries_in_progress") == 1
    assert value(samples, "jobs_active") == 1  # the create holds its slot while it retries
    assert value(samples, "files", state="SUBMITTING") == 1

    path.unlink()
    daemon.stop()  # a last write at exit (the file stays in flight, resumed at the next start)
    assert value(parse(path.read_text()), "files", state="SUBMITTING") == 1
