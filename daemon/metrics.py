"""Metrics: a Prometheus text-format file for node_exporter's textfile collector.

With `metrics_file:` set, the daemon rewrites the file atomically every `METRICS_SECONDS` and
at exit (a dot-name temp file in the same folder, then a rename, so the collector never reads
half a file, and ignores the temp file: it reads only `*.prom`). Counters count since the
daemon started; Prometheus handles the reset at a restart.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, atomic
from .failures import Call, Kind
from .health import Health
from .jobrecord import FileState, JobRecord, JobState
from .records import USAGE_KEYS

METRICS_SECONDS = 15.0
"""How often the file is rewritten (node_exporter scrapes every 15 s by default)."""

FILE_MODE = 0o644
"""Readable by the node_exporter user; the file holds counts, never prompts or answers."""

PREFIX = "gemini_batchd_"

STAGES = ("request", "blocked", "parse", "missing", "invalid", "job")
"""Record error stages, always listed (0 included) so that alert rules see every series."""

FILE_STATES = ("WAITING", "IGNORED", *(s.value for s in FileState if not s.finished))


@dataclass
class Finished:
    """What the daemon finished since it started, as counts: a daemon runs for months, and
    keeping every finished file's record would grow without end."""

    done: int = 0
    failed: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # result records by error stage
    tokens: Counter[str] = field(default_factory=Counter)  # by usage kind
    cost_usd: float = 0.0

    def add(self, record: JobRecord, cost_usd: float | None = None) -> None:
        """Count a finished file; `cost_usd`: its tokens' cost, where `prices` has the model."""
        self.cost_usd += cost_usd or 0.0
        if record.state is FileState.DONE:
            self.done += 1
        else:
            self.failed += 1
        self.ok += record.ok or 0
        by_stage = record.errors_by_stage or ({"unknown": record.errors} if record.errors else {})
        self.errors.update(by_stage)
        self.tokens.update({k: int(v) for k, v in (record.tokens or {}).items()})


class Counters:
    """What the API did since start, counted as it happens (by the workers, under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[tuple[str, str]] = Counter()  # (call, outcome) -> count
        self.quota_refusals = 0
        self.jobs_ended = 0

    def call(self, call: Call, outcome: str) -> None:
        with self._lock:
            self._calls[(call.value, outcome)] += 1

    def calls(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._calls)

    def job_ended(self) -> None:
        with self._lock:
            self.jobs_ended += 1

    def quota_refused(self) -> None:
        with self._lock:
            self.quota_refusals += 1


@dataclass
class View:
    """What the metrics are computed from (the supervisor collects it)."""

    in_flight: list[JobRecord]  # files this daemon owns now
    finished: Finished  # what it finished since it started
    health: Health
    counters: Counters
    waiting: int  # inbox files not yet claimed
    ignored: int  # inbox entries the daemon will not take
    started: float  # time.time() at start
    oldest_arrival: int | None = None  # wall ns of the oldest file not finished (None: none)
    now: float = 0.0  # time.time() of this view


@dataclass
class Family:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


def families(view: View) -> list[Family]:
    """Every metric, with HELP and TYPE; names prefixed `gemini_batchd_`."""
    health, counters = view.health, view.counters
    out: list[Family] = []

    def family(name: str, kind: str, text: str) -> Family:
        made = Family(PREFIX + name, kind, text)
        out.append(made)
        return made

    family("info", "gauge", "Always 1; the version as a label.").add(1, version=__version__)
    family("start_time_seconds", "gauge", "When the daemon started (Unix time).").add(view.started)
    states = dict.fromkeys(FILE_STATES, 0)
    states["WAITING"], states["IGNORED"] = view.waiting, view.ignored
    for record in view.in_flight:
        states[record.state.value] = states.get(record.state.value, 0) + 1
    files = family("files", "gauge", "Files by state: in the inbox, claimed and in flight.")
    for state, count in states.items():
        files.add(count, state=state)

    finished = family("files_finished_total", "counter", "Files finished since start, by outcome.")
    finished.add(view.finished.done, outcome="done").add(view.finished.failed, outcome="failed")

    family("requests_ok_total", "counter", "Result records with status ok.").add(view.finished.ok)
    stages = dict.fromkeys(STAGES, 0)
    stages.update(view.finished.errors)
    errors = family(
        "request_errors_total", "counter", "Result records with status error, by stage."
    )
    for stage, count in stages.items():
        errors.add(count, stage=stage)

    tokens = dict.fromkeys(USAGE_KEYS, 0)
    tokens.update(view.finished.tokens)
    used = family("tokens_total", "counter", "Tokens the API reported in written results, by kind.")
    for kind, count in tokens.items():
        used.add(count, kind=kind.removesuffix("_tokens"))

    family(
        "cost_usd_total", "counter", "Estimated cost of the tokens in written results (USD)."
    ).add(view.finished.cost_usd)
    oldest = 0.0 if view.oldest_arrival is None else max(0.0, view.now - view.oldest_arrival / 1e9)
    family(
        "oldest_file_age_seconds",
        "gauge",
        "How long the oldest file not yet finished has been waiting or in flight (0: none).",
    ).add(round(oldest, 3))

    calls = family("api_calls_total", "counter", "Batch API calls by call and outcome.")
    counted = counters.calls()
    for call in Call:  # every call with outcome ok, so a rate of zero is visible
        counted.setdefault((call.value, "ok"), 0)
    for (call_name, outcome), count in sorted(counted.items()):
        calls.add(count, call=call_name, outcome=outcome)
    family("quota_refusals_total", "counter", "Creates refused for the enqueued-token quota.").add(
        counters.quota_refusals
    )
    family("jobs_ended_total", "counter", "Batch jobs that reached a final state.").add(
        counters.jobs_ended
    )

    steps = [r for r in view.in_flight if r.retries] + [
        j for r in view.in_flight for j in r.jobs if j.retries and j.state is not JobState.COLLECTED
    ]
    family(
        "retries_in_progress",
        "gauge",
        "File steps and jobs whose last attempt failed, to be retried.",
    ).add(len(steps))
    family("failed_attempts", "gauge", "Consecutive failed attempts summed over those steps.").add(
        sum(s.retries for s in steps)
    )
    family("paused", "gauge", "1 while new work is held back (the API rejects the key).").add(
        1 if health.paused else 0
    )
    family(
        "last_api_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful API call (0: none yet).",
    ).add(health.last_ok_wall or 0)
    jobs = [j for r in view.in_flight for j in r.jobs]
    family("jobs_queued", "gauge", "Batch jobs waiting for a job slot.").add(
        sum(1 for j in jobs if j.state is JobState.QUEUED)
    )
    family("jobs_active", "gauge", "Batch jobs being uploaded, created or running.").add(
        sum(1 for j in jobs if j.state.holds_slot)
    )
    family(
        "jobs_waiting_for_quota",
        "gauge",
        "Batch jobs back in the queue because the enqueued-token quota was full.",
    ).add(sum(1 for j in jobs if j.state is JobState.QUEUED and j.quota_waits))
    auth = sum(n for (_, outcome), n in counted.items() if outcome == Kind.AUTH.value)
    family("api_auth_failures_total", "counter", "Calls refused for the key or permission.").add(
        auth
    )
    return out


def render(view: View) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for fam in families(view):
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(
                f"{fam.name}{{{label_text}}} {_number(value)}"
                if labels
                else f"{fam.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def write(path: Path, view: View) -> None:
    """Replace `path` atomically with the current metrics, readable by node_exporter."""
    atomic.write_file(path, [render(view).encode()], durable=False, mode=FILE_MODE)


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
