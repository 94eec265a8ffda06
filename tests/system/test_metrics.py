"""The Prometheus textfile: written at start, every 15 s and at exit; parsed as Prometheus would."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from daemon.simulator import Simulator
from tests.support.inprocess import WallClock

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict reader of the text format (0.0.4): HELP and TYPE once per family, before its
    samples; every sample of a declared family; label values quoted; values are numbers."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("counter", "gauge"), line
            assert name in helps, f"TYPE before HELP: {name}"
            types[name] = kind
            continue
        assert not line.startswith("#") and line.strip(), f"unexpected line: {line!r}"
        match = SAMPLE.match(line)
        assert match, f"not a sample: {line!r}"
        name, labels_text, value = match.groups()
        assert name in types, f"sample before its TYPE: {line}"
        labels: list[tuple[str, str]] = []
        rest = labels_text or ""
        while rest:
            label = LABEL.match(rest)
            assert label, f"bad labels: {labels_text!r}"
            labels.append((label.group(1), label.group(2)))
            rest = rest[label.end() :]
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate series: {line}"
        samples[key] = float(value)
    for name, kind in types.items():
        assert name.startswith("gemini_batchd_"), name
        assert name.endswith("_total") == (kind == "counter"), name
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
