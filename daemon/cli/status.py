"""`gemini-batchd status`: what the daemon does, from the spool's files alone.

`snapshot` builds the contract's `status --json` object from the presence files, the sidecars
and the inbox; `render_table` turns it into the `status` table; `outcome_line` and
`totals_line` are the one-line summaries of finished files (`run --once`, `submit --wait`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import jobrecord
from ..config import Config
from ..errors import SidecarError
from ..jobrecord import FileState, JobEntry, JobRecord, JobState, isotime, utcnow
from ..presence import SILENT_AFTER_SECONDS, read_daemons
from ..spool import (
    HOST,
    SIDECAR_SUFFIX,
    SPOOL_FOLDERS,
    Spool,
    not_utf8,
    printable,
    why_ignored,
)
from .common import CommandError, Subcommands, add_config_option, load

RECENT_SECONDS = 24 * 3600
"""`status` lists files finished within this many seconds."""

ACTIVE_STATES = frozenset(
    {FileState.UPLOADING, FileState.SUBMITTING, FileState.RUNNING, FileState.WRITING}
)
"""Files counted as `active` in the totals; CLAIMED and QUEUED count as `queued`."""


def add_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "status",
        help="show whether the daemon runs, and queued, in-flight and recent files",
        description="Whether a daemon runs on this spool (pid, since when, paused and why), "
        "totals, and one row per file: waiting or ignored in the inbox, queued and in flight "
        "(job, job state, age, polls, next poll, progress, round, retries and the last error) "
        "and finished in the last 24 hours (ok/error record counts, output path).",
    )
    add_config_option(command)
    command.add_argument(
        "--json", action="store_true", help="print one JSON object (daemon, totals, files)"
    )
    command.add_argument(
        "--watch",
        action="store_true",
        help="redraw every --interval seconds until Ctrl-C (with --json: one object per line)",
    )
    command.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between redraws with --watch (default: %(default)s)",
    )
    command.set_defaults(func=cmd_status)


CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_status(args: argparse.Namespace) -> int:
    config, _ = load(args)
    if args.interval <= 0:
        raise CommandError(f"--interval: must be > 0 (got {args.interval:g})")
    if not args.watch:
        _print_status(config, as_json=args.json)
        return 0
    tty = sys.stdout.isatty()
    try:
        while True:
            if tty and not args.json:
                now = time.strftime("%Y-%m-%d %H:%M:%S")
                sys.stdout.write(
                    f"{CLEAR_SCREEN}Every {args.interval:g}s: gemini-batchd status    {now}\n\n"
                )
            _print_status(config, as_json=args.json, compact=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _print_status(config: Config, *, as_json: bool, compact: bool = False) -> None:
    snap = snapshot(config)
    if as_json:
        text = json.dumps(snap, separators=(",", ":")) if compact else json.dumps(snap, indent=2)
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.write(render_table(snap))
        if compact and not sys.stdout.isatty():
            sys.stdout.write("\n")
    sys.stdout.flush()


# ---- snapshot ------------------------------------------------------------------------


def snapshot(config: Config, *, now: datetime | None = None) -> dict[str, Any]:
    """The contract's `status --json` object, with additions (see README, "status")."""
    now = now or utcnow()
    spool = Spool(config.inbox, config.outbox)
    live, stale = read_daemons(spool, now)
    first = live[0] if live else None
    daemon: dict[str, Any] = {
        "running": first is not None,
        "pid": first.get("pid") if first else None,
        "since": first.get("since") if first else None,
        "paused": first.get("paused") if first else None,
        "config": first.get("config") if first else None,
        "host": first.get("host") if first else None,
        "heartbeat": first.get("heartbeat") if first else None,
        "version": first.get("version") if first else None,
    }
    rows = [*_processing_rows(spool, config, now), *_inbox_rows(spool, now)]
    rows += _finished_rows(spool, config, now)
    totals = dict.fromkeys(("waiting", "queued", "active", "done", "failed", "ignored"), 0)
    for row in rows:
        totals[_total_of(row["state"])] += 1
    return {
        "daemon": daemon,
        "daemons": live,
        "stale_daemons": stale,
        "totals": totals,
        "files": rows,
        "config": config.describe_source(),
        "inbox": str(config.inbox),
        "outbox": str(config.outbox),
        "time": isotime(now),
    }


def _total_of(state: str) -> str:
    if state == "WAITING":
        return "waiting"
    if state == "IGNORED":
        return "ignored"
    if state == FileState.DONE.value:
        return "done"
    if state == FileState.FAILED.value:
        return "failed"
    if state in {s.value for s in ACTIVE_STATES}:
        return "active"
    return "queued"


def sidecars(folder: Path) -> list[Path]:
    try:
        return _sidecars_among(folder, os.listdir(folder))
    except OSError:
        return []


def _sidecars_among(folder: Path, names: list[str]) -> list[Path]:
    return [folder / n for n in names if n.endswith(SIDECAR_SUFFIX) and not n.startswith(".")]


def _processing_rows(spool: Spool, config: Config, now: datetime) -> list[dict[str, Any]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    try:
        names = os.listdir(spool.processing)
    except OSError:
        names = []
    for sidecar in _sidecars_among(spool.processing, names):
        name = sidecar.name[: -len(SIDECAR_SUFFIX)]
        try:
            record = jobrecord.load(sidecar)
        except FileNotFoundError:
            continue  # archived meanwhile: listed from done/ or failed/
        except (OSError, SidecarError) as exc:
            row = _bare_row(name, "UNKNOWN", _stamp_of(sidecar), now)
            row["last_error"] = str(exc)
            rows.append((0, row))
            seen.add(name)
            continue
        seen.add(record.input)
        rows.append((record.arrival, file_row(record, config, now, sidecar=sidecar)))
    for name in names:  # claimed a moment ago: the sidecar is written at validation
        if why_ignored(name) is None and name not in seen:
            stamp = _stamp_of(spool.processing / name)
            rows.append((0, _bare_row(name, FileState.CLAIMED.value, stamp, now)))
    rows.sort(key=lambda item: (item[0], item[1]["input"]))
    return [row for _, row in rows]


def _inbox_rows(spool: Spool, now: datetime) -> list[dict[str, Any]]:
    try:
        entries = list(os.scandir(spool.inbox))
    except OSError:
        return []
    waiting: list[tuple[int, dict[str, Any]]] = []
    ignored: list[dict[str, Any]] = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in SPOOL_FOLDERS:
            continue  # writers' temporary files; the daemon's own folders
        try:
            mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            mtime_ns = 0
        stamp = isotime(datetime.fromtimestamp(mtime_ns / 1e9, tz=timezone.utc))
        reason = why_ignored(entry.name)
        if reason is None:
            waiting.append((mtime_ns, _bare_row(entry.name, "WAITING", stamp, now)))
        else:  # a name that is not UTF-8 has no exact JSON string: shown escaped
            name = printable(entry.name) if not_utf8(entry.name) else entry.name
            row = _bare_row(name, "IGNORED", stamp, now)
            row["last_error"] = reason
            ignored.append(row)
    waiting.sort(key=lambda item: (item[0], item[1]["input"]))
    return [row for _, row in waiting] + sorted(ignored, key=lambda r: str(r["input"]))


def _finished_rows(spool: Spool, config: Config, now: datetime) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for folder in (spool.done, spool.failed):
        for sidecar in sidecars(folder):
            try:
                if time.time() - sidecar.stat().st_mtime > RECENT_SECONDS:
                    continue
                record = jobrecord.load(sidecar)
            except (OSError, SidecarError):
                continue
            archived = sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)])
            if config.archive == "keep" and not os.path.lexists(archived):
                continue  # put back into the inbox by `retry` (or removed by an operator)
            if jobrecord.seconds_since(record.finished_at, now) > RECENT_SECONDS:
                continue
            rows.append(file_row(record, config, now, sidecar=sidecar))
    rows.sort(key=lambda r: str(r.get("finished_at") or r.get("updated_at")), reverse=True)
    return rows


def _stamp_of(path: Path) -> str | None:
    try:
        return isotime(datetime.fromtimestamp(path.lstat().st_mtime, tz=timezone.utc))
    except OSError:
        return None


def _bare_row(name: str, state: str, stamp: str | None, now: datetime) -> dict[str, Any]:
    """A file without a sidecar (waiting, ignored, just claimed): every field, mostly null."""
    return {
        "input": name,
        "state": state,
        "job_name": None,
        "job_state": None,
        "requests": None,
        "progress": None,
        "polls": 0,
        "next_poll_at": None,
        "retries": 0,
        "last_error": None,
        "ok": None,
        "errors": None,
        "output": None,
        "created_at": stamp,
        "updated_at": stamp,
        "report": None,
        "age_seconds": _age(stamp, now),
    }


def _age(stamp: str | None, now: datetime) -> int | None:
    return max(0, int(jobrecord.seconds_since(stamp, now))) if stamp else None


def file_row(
    record: JobRecord, config: Config, now: datetime, *, sidecar: Path | None = None
) -> dict[str, Any]:
    """One file's row: the contract's fields, then additions (rounds, parts, jobs, cost...)."""
    finished = record.state.finished
    retries, last_error = retry_info(record)
    progress = None
    if record.progress is not None and not finished:
        progress = {k: int(record.progress.get(k, 0)) for k in ("succeeded", "failed", "pending")}
        progress["total"] = int(record.progress.get("total", record.requests or 0))
    current = [j for j in record.jobs if j.round == record.round]
    error = record.error or None
    return {
        "input": record.input,
        "state": record.state.value,
        "job_name": record.job_name,
        "job_state": record.job_state,
        "requests": record.requests,
        "progress": progress,
        "polls": record.polls,
        "next_poll_at": None if finished else record.next_poll_at,
        "retries": retries,
        "last_error": last_error,
        "ok": record.ok,
        "errors": record.errors,
        "output": record.output if finished else None,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        # additions
        "report": record.report if finished else None,
        "archived_as": record.archived_as if finished else None,
        "finished_at": record.finished_at,
        "age_seconds": _age(record.created_at, now),
        "model": record.model,
        "round": record.round,
        "rounds": record.rounds,
        "round_requests": sum(j.requests for j in current) if current else record.requests,
        "parts": sum(1 for j in record.jobs if j.round == 1),
        "invalid_lines": record.invalid_lines,
        "errors_by_stage": record.errors_by_stage or None,
        "tokens": record.tokens or None,
        "cost_usd": config.cost_of(record.model, record.tokens),
        "error": {"stage": error.get("stage"), "message": error.get("message")} if error else None,
        "quota": _quota(record) if not finished else None,
        "jobs": [_job_row(j) for j in record.jobs],
        "sidecar": str(sidecar) if sidecar else None,
    }


def _quota(record: JobRecord) -> dict[str, Any] | None:
    """`{"waits", "waited_seconds", "next_try_at"}` while a job waits for the enqueued-token
    quota (back in the queue after a refusal), else None."""
    waiting = [j for j in record.jobs if j.state is JobState.QUEUED and j.quota_waits]
    if not waiting:
        return None
    return {
        "waits": max(j.quota_waits for j in waiting),
        "waited_seconds": round(max(j.quota_wait_seconds for j in waiting), 1),
        "next_try_at": min((j.not_before for j in waiting if j.not_before), default=None),
    }


def _job_row(job: JobEntry) -> dict[str, Any]:
    return {
        "round": job.round,
        "part": job.part,
        "state": job.state.value,
        "job_name": job.job_name,
        "job_state": job.job_state,
        "requests": job.requests,
        "polls": job.polls,
        "next_poll_at": job.next_poll_at if job.state is JobState.RUNNING else None,
        "progress": job.progress,
        "retries": job.retries,
        "last_error": job.last_error,
        "error": job.error,
    }


def retry_info(record: JobRecord) -> tuple[int, str | None]:
    """Failed attempts at the current step, and the last error: the file's, else its jobs'.

    A failed file's `last_error` is why it failed (its error report's message).
    """
    if record.state is FileState.FAILED and record.error:
        return record.retries, str(record.error.get("message") or "") or None
    if record.retries or record.last_error:
        return record.retries, record.last_error
    trying = [j for j in record.jobs if j.retries or j.last_error]
    if not trying:
        return 0, None
    worst = max(trying, key=lambda j: j.retries)
    return worst.retries, worst.last_error


# ---- rendering -----------------------------------------------------------------------

COLUMNS = ("FILE", "STATE", "JOB", "JOB STATE", "AGE", "POLLS", "NEXT POLL", "PROGRESS")
LAST_ERROR_CHARS = 200


def render_table(snap: Mapping[str, Any], now: datetime | None = None) -> str:
    """The `status` table: a header (daemon, pause, totals), then a row per file."""
    now = now or utcnow()
    lines = header_lines(snap, now)
    files = snap["files"]
    if not files:
        lines.append(f"no files (inbox: {snap['inbox']})")
        return "\n".join(lines) + "\n"
    polled = bool(snap["daemon"]["running"])
    table = [COLUMNS] + [tuple(map(printable, _cells(row, now, polled))) for row in files]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]
    lines.append("")
    lines.append(_join(COLUMNS, widths))
    for row, cells in zip(files, table[1:], strict=True):
        lines.append(_join(cells, widths))
        lines.extend("  " + printable(detail) for detail in _details(row, now))
    return "\n".join(lines) + "\n"


def header_lines(snap: Mapping[str, Any], now: datetime) -> list[str]:
    daemon = snap["daemon"]
    lines = []
    if daemon["running"]:
        since = daemon.get("since")
        text = f"daemon: running, pid {daemon['pid']}"
        if daemon.get("host") and daemon["host"] != HOST:
            text += f" on {daemon['host']}"
        if since:
            text += f", since {since} ({_duration(jobrecord.seconds_since(since, now))})"
        silent = jobrecord.seconds_since(daemon.get("heartbeat"), now)
        if daemon.get("heartbeat") and silent > SILENT_AFTER_SECONDS:
            text += f"; no heartbeat for {_duration(silent)} (hung?)"
        others = len(snap.get("daemons", [])) - 1
        if others > 0:
            text += f"; {others} more daemon(s) on this spool"
        lines.append(text)
        lines.append(f"config: {daemon.get('config') or snap.get('config')}")
        if daemon.get("paused"):
            lines.append(f"PAUSED: {daemon['paused']}")
    else:
        lines.append(f"daemon: not running (no daemon holds {snap['inbox']})")
        for dead in snap.get("stale_daemons", []):
            lines.append(
                f"  pid {dead.get('pid')} on {dead.get('host')} stopped without a clean exit;"
                f" last heartbeat {dead.get('heartbeat')}"
            )
        lines.append(f"config: {snap.get('config')}")
        stalled = snap["totals"]["queued"] + snap["totals"]["active"]
        if stalled:
            lines.append(
                f"NOT RUNNING: {stalled} file(s) queued or in flight, and nothing polls or "
                "advances them until a daemon runs on this spool (gemini-batchd run)"
            )
    totals = snap["totals"]
    text = ", ".join(f"{totals[k]} {k}" for k in ("waiting", "queued", "active", "done", "failed"))
    if totals.get("ignored"):
        text += f", {totals['ignored']} ignored"
    lines.append(f"files: {text} (finished: last 24 h)")
    return lines


def _join(cells: Iterable[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _cells(row: Mapping[str, Any], now: datetime, polled: bool) -> tuple[str, ...]:
    running = row["state"] == FileState.RUNNING.value
    next_poll = _until(row.get("next_poll_at"), now) if polled else "(no daemon)"
    return (
        str(row["input"]),
        str(row["state"]),
        row.get("job_name") or "-",
        (row.get("job_state") or "-").removeprefix("JOB_STATE_"),
        _duration(row["age_seconds"]) if row.get("age_seconds") is not None else "-",
        str(row.get("polls") or 0) if row.get("job_name") else "-",
        next_poll if running else "-",
        _progress_cell(row),
    )


def _progress_cell(row: Mapping[str, Any]) -> str:
    if row.get("ok") is not None:
        return f"{row['ok']} ok, {row.get('errors') or 0} errors"
    return progress_bar(row.get("progress"), row.get("requests"))


def progress_bar(progress: Mapping[str, int] | None, requests: int | None) -> str:
    """`[########..] 80/120, 2 failed` where the API reports counts, else `-`."""
    if not progress:
        return "-"
    total = progress.get("total") or requests or 0
    if not total:
        return "-"
    finished = progress.get("succeeded", 0) + progress.get("failed", 0)
    cells = max(0, min(10, round(10 * finished / total)))
    text = "[" + "#" * cells + "." * (10 - cells) + f"] {finished}/{total}"
    if progress.get("failed"):
        text += f", {progress['failed']} failed"
    return text


def _details(row: Mapping[str, Any], now: datetime) -> list[str]:
    """The indented lines under a row: rounds, retries and the last error, outbox paths."""
    details = []
    state = row["state"]
    if state == "IGNORED":
        return [f"ignored: {row.get('last_error')}"]
    if (row.get("parts") or 0) > 1:
        details.append(f"{row['parts']} parts")
    if (row.get("round") or 1) > 1:
        details.append(
            f"round {row['round']}/{row.get('rounds')}, {row.get('round_requests')} requests"
        )
    if row.get("quota"):
        quota = row["quota"]
        details.append(
            f"waiting for quota: the enqueued-token quota refused it {quota['waits']} time(s) "
            f"over {_duration(quota['waited_seconds'])}; next try {_until(quota['next_try_at'], now)}"
        )
    if row.get("last_error") and state != FileState.FAILED.value:
        error = _clip(str(row["last_error"]))
        details.append(f"retry {row['retries']}: {error}" if row.get("retries") else error)
    if state == FileState.FAILED.value and row.get("error"):
        error = row["error"]
        details.append(f"failed ({error.get('stage')}): {_clip(str(error.get('message')))}")
    extra = []
    if row.get("tokens") and row["tokens"].get("total_tokens"):
        extra.append(f"{row['tokens']['total_tokens']} tokens")
    if row.get("cost_usd") is not None:
        extra.append(f"~${money(row['cost_usd'])}")
    if row.get("output"):
        details.append(f"-> {row['output']}" + (f" ({', '.join(extra)})" if extra else ""))
    if row.get("report"):
        details.append(f"report -> {row['report']}")
    return details


def _clip(text: str) -> str:
    return text if len(text) <= LAST_ERROR_CHARS else text[: LAST_ERROR_CHARS - 3] + "..."


def _until(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "-"
    seconds = -jobrecord.seconds_since(stamp, now)
    return "due" if seconds <= 0 else "in " + _duration(seconds)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def money(usd: float) -> str:
    return f"{usd:,.2f}" if usd >= 1 else f"{usd:.6f}".rstrip("0").rstrip(".") or "0"


# ---- summaries of finished files ---------------------------------------------------


def outcome_line(record: JobRecord, config: Config) -> str:
    """`DONE a.jsonl: 40 ok, 0 errors, 5230 tokens, ~$0.0012 -> outbox/a.jsonl` (one line)."""
    parts = []
    if record.ok is not None:
        parts.append(f"{record.ok} ok, {record.errors or 0} errors")
    total = (record.tokens or {}).get("total_tokens")
    if total:
        parts.append(f"{total} tokens")
    usd = config.cost_of(record.model, record.tokens)
    if usd is not None:
        parts.append(f"~${money(usd)}")
    text = ", ".join(parts)
    if record.state is FileState.FAILED and record.error:
        stage = record.error.get("stage", "job")
        failure = f"failed ({stage}): {_clip(str(record.error.get('message')))}"
        text = f"{text}; {failure}" if text else failure
    paths = [p for p in (record.output, record.report) if p]
    text = f"{record.state.value} {record.input}: " + (text or "no records")
    return printable(text + (f" -> {', '.join(paths)}" if paths else ""))


def unfinished_line(record: JobRecord) -> str:
    """`UNFINISHED a.jsonl: RUNNING, job batches/x; resumed at the next start` (one line)."""
    why = f"{record.state.value}"
    if record.job_name:
        why += f", job {record.job_name}"
    if any(j.quota_waits and j.state is JobState.QUEUED for j in record.jobs):
        waits = max(j.quota_waits for j in record.jobs)
        why = f"waiting for the enqueued-token quota ({waits} attempt(s))"
    return printable(f"UNFINISHED {record.input}: {why}; resumed at the next start")


def totals_line(records: list[JobRecord], config: Config, *, unfinished: int = 0) -> str:
    """`total: 3 files (2 done, 1 failed), 80 requests ok, 2 errors, 10400 tokens, ~$0.002`;
    `unfinished`: files left in flight (a stop, or a quota nothing of ours will free)."""
    done = sum(1 for r in records if r.state is FileState.DONE)
    ok = sum(r.ok or 0 for r in records)
    errors = sum(r.errors or 0 for r in records)
    tokens = sum((r.tokens or {}).get("total_tokens", 0) for r in records)
    left = f", {unfinished} unfinished" if unfinished else ""
    text = (
        f"total: {len(records) + unfinished} files ({done} done, {len(records) - done} failed"
        f"{left}), {ok} requests ok, {errors} errors, {tokens} tokens"
    )
    costs = [c for r in records if (c := config.cost_of(r.model, r.tokens)) is not None]
    if costs:
        text += f", ~${money(sum(costs))}"
    return text
