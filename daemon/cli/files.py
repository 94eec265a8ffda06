"""The commands that act on files: `validate`, `submit` (and `--wait`), `retry`, `cancel`."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .. import atomic, jobrecord
from ..config import Config
from ..errors import SidecarError
from ..jobrecord import FileState, JobRecord, JobState
from ..presence import read_daemons
from ..spool import SIDECAR_SUFFIX, Spool, is_candidate, name_too_long, printable, why_ignored
from . import status
from .common import CommandError, Subcommands, add_config_option, find_credential, load


def add_validate_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "validate",
        help="check input files without submitting anything",
        description="Parse each file as the daemon would (following on_invalid_line); exit 1 if "
        "any is invalid. Input tokens are estimated as characters / 4 of the prompt texts; with "
        "`prices` for the model, their cost at batch price is shown too.",
    )
    command.add_argument("files", nargs="+", metavar="FILE", help="JSONL input files to check")
    add_config_option(command)
    command.set_defaults(func=cmd_validate)


def add_submit_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "submit",
        help="copy files into the inbox atomically",
        description="Copy each file to a temporary dot-name in the inbox, then rename it "
        "into place, so the daemon never sees a half-written file (NAME-2.jsonl where the name "
        "is taken). Prints the inbox path of each file. With --wait, works with any daemon on "
        "that inbox: it only watches the spool's files.",
    )
    command.add_argument(
        "files", nargs="+", metavar="FILE", help="*.jsonl files to copy into the inbox"
    )
    add_config_option(command)
    command.add_argument(
        "--wait",
        action="store_true",
        help="wait until each file has its results or error report; print their outbox paths on "
        "stdout; exit 0 if every file got results, 1 if any got an error report",
    )
    command.add_argument(
        "--strict",
        action="store_true",
        help="with --wait: exit 1 also when any result record is an error",
    )
    command.set_defaults(func=cmd_submit)


def add_retry_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "retry",
        help="put failed inputs back into the inbox",
        description="Move inputs from inbox/failed/ back into the inbox atomically (a temporary "
        "dot-name, then a rename; NAME-2.jsonl where the name is taken), so that the daemon "
        "runs them again. NAME is a file in inbox/failed/ or the input name it failed under.",
    )
    command.add_argument(
        "names", nargs="*", metavar="NAME", help="input names (or paths) in inbox/failed/"
    )
    add_config_option(command)
    command.add_argument(
        "--all-failed-since",
        metavar="TIME",
        help="also every input that failed since TIME: an ISO time (2026-12-01T10:00Z; local "
        "time without a zone) or an age such as 90m, 2h, 3d",
    )
    command.set_defaults(func=cmd_retry)


def add_cancel_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "cancel",
        help="cancel the batch job of a file or a job name",
        description="TARGET is an input file name (NAME.jsonl) or a job name (batches/...). "
        "The file then gets an error report with job_state JOB_STATE_CANCELLED.",
    )
    command.add_argument(
        "target",
        metavar="TARGET",
        help="an input file name (NAME.jsonl, or a path to it) or a job name (batches/...)",
    )
    add_config_option(command)
    command.set_defaults(func=cmd_cancel)


def cmd_validate(args: argparse.Namespace) -> int:
    """Report what the daemon would do with each file, under this configuration."""
    from ..api import engine_class  # imports google-genai: not needed by `status`
    from ..inputs import Defaults, scan_file
    from ..plan import JobLimits

    config, _ = load(args)
    defaults = Defaults.from_config(config)
    skip_lines = config.on_invalid_line == "skip_line"
    invalid = 0
    for name in args.files:
        path = Path(name)
        problem = _not_a_regular_file(path)
        ignored = why_ignored(path.name)
        if problem or ignored:
            why = problem or f"{ignored}; the daemon would ignore this file"
            print(f"{name}: invalid: {why}")
            invalid += 1
            continue
        size = path.stat().st_size
        if size > config.limits.max_file_bytes:
            print(
                f"{name}: invalid: {size} bytes, over limits.max_file_bytes ({config.limits.max_file_bytes})"
            )
            invalid += 1
            continue
        limits = JobLimits.of(config.limits, engine_class(config).limits)
        scan = scan_file(path, defaults, limits.check)
        uploaded = "Cloud Storage" if config.backend == "vertex" else "File API"
        mode = {"file": uploaded, "inline": "inline"}[
            limits.mode(scan.payload_bytes, scan.requests)
        ]
        if scan.requests and (skip_lines or not scan.error_count):
            skipped = f", {scan.error_count} line(s) would be skipped" if scan.error_count else ""
            estimate = _input_estimate(config, scan.estimated_tokens)
            print(
                f"{name}: ok: {scan.requests} request(s){skipped}, {estimate}, {scan.size} bytes, {mode}"
            )
        else:
            invalid += 1
            print(
                f"{name}: invalid: {scan.requests} valid request(s), {scan.error_count} bad line(s), {scan.size} bytes"
            )
        for error in scan.errors:
            print(f"{name}:{error.line}: {error.message}")
        if scan.error_count > len(scan.errors):
            print(f"{name}: ... and {scan.error_count - len(scan.errors)} more bad line(s)")
        if not scan.requests and not scan.error_count:
            print(f"{name}: holds no requests (empty or only blank lines)")
    return 1 if invalid else 0


def _input_estimate(config: Config, tokens: int) -> str:
    """`~N input tokens`, and their cost at batch price where `prices` has the model."""
    text = f"~{tokens} input tokens"
    price = config.price()
    if price is not None:
        usd = price.batch_cost(prompt_tokens=tokens)
        text += f" (~${status.money(usd)} at {config.model} batch price)"
    return text


def _not_a_regular_file(path: Path) -> str | None:
    if path.is_symlink():
        return "a symbolic link (the daemon never follows links)"
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


def cmd_submit(args: argparse.Namespace) -> int:
    if args.strict and not args.wait:
        raise CommandError("--strict needs --wait")
    config, _ = load(args)
    if config.source is None:  # ./inbox/ of no daemon: files would wait there for nobody
        raise CommandError(
            f"submit: no configuration ({config.describe_source()}): pass -c CONFIG or set "
            "$GEMINI_BATCHD_CONFIG to the daemon's configuration file"
        )
    config.inbox.mkdir(parents=True, exist_ok=True)
    for name in args.files:
        source = Path(name)
        problem = _not_a_regular_file(source)
        if problem:
            raise CommandError(f"{name}: {problem}")
        too_long = name_too_long(source.name)
        if too_long:
            raise CommandError(f"{name}: {too_long}")
        if not is_candidate(source.name):
            raise CommandError(
                f"{name}: the daemon only takes *.jsonl files whose name does not start with '.'"
            )
    submitted: list[Submitted] = []
    for name in args.files:
        source = Path(name)
        target = config.inbox / source.name
        tmp = config.inbox / f".{source.name}.submit-{os.getpid()}.tmp"
        try:
            shutil.copyfile(source, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            st = tmp.stat()
            final = atomic.move_new(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if args.wait:
            submitted.append(Submitted(final, [st.st_dev, st.st_ino]))
        else:
            print(printable(str(final)), flush=True)
    if not args.wait:
        return 0
    return wait_for_results(config, submitted, strict=args.strict)


# ---- submit --wait -----------------------------------------------------------------

WAIT_POLL_SECONDS = 0.25
"""How often `submit --wait` looks at the spool."""

LOST_AFTER_LOOKS = 8
"""A submitted file found nowhere this many looks in a row was removed by someone."""


@dataclass
class Submitted:
    """A file `submit` put into the inbox, known by its inode: the daemon links, never copies."""

    path: Path
    inode: list[int]
    seen: JobRecord | None = None  # its sidecar in processing/, when last seen there
    misses: int = 0


def wait_for_results(config: Config, files: list[Submitted], *, strict: bool) -> int:
    """Wait until each file's sidecar reaches done/ or failed/; print its outbox paths."""
    spool = Spool(config.inbox, config.outbox)
    started = time.time() - 2  # sidecars saved since then (mtimes: whole seconds on some fs)
    for item in files:
        print(f"submitted {item.path}; waiting for its results in {config.outbox}", file=sys.stderr)
    said_no_daemon = False
    pending = list(files)
    finished: list[JobRecord] = []
    checked: dict[Path, float] = {}
    try:
        while pending:
            if not said_no_daemon and not read_daemons(spool, jobrecord.utcnow())[0]:
                said_no_daemon = True
                print(
                    f"no daemon is running on {config.inbox} (start one with `gemini-batchd "
                    "run`); waiting anyway",
                    file=sys.stderr,
                )
            done = _finished_records(spool, pending, started, checked)
            _look_in_processing(spool, pending, started)
            for item in list(pending):
                record = done.get(tuple(item.inode))
                if record is None:
                    record = _gone(spool, config, item)
                if record is None:
                    continue
                pending.remove(item)
                finished.append(record)
                print(status.outcome_line(record, config), file=sys.stderr)
                for path in (record.output, record.report):
                    if path:
                        print(printable(path), flush=True)
            if pending:
                time.sleep(WAIT_POLL_SECONDS)
    except KeyboardInterrupt:
        print("stopped waiting; the files stay submitted", file=sys.stderr)
        return 130
    failed = any(r.state is not FileState.DONE for r in finished)
    return 1 if failed or (strict and any(r.errors for r in finished)) else 0


def _finished_records(
    spool: Spool, pending: list[Submitted], since: float, checked: dict[Path, float]
) -> dict[tuple[int, ...], JobRecord]:
    """Sidecars in done/ and failed/ saved since `since` of the files we wait for, by inode."""
    wanted = {tuple(item.inode) for item in pending}
    found: dict[tuple[int, ...], JobRecord] = {}
    for folder in (spool.done, spool.failed):
        for sidecar in status.sidecars(folder):
            try:
                mtime = sidecar.stat().st_mtime
                if mtime < since or checked.get(sidecar) == mtime:
                    continue
                checked[sidecar] = mtime
                record = jobrecord.load(sidecar)
            except (OSError, SidecarError):
                continue
            if record.inode and tuple(record.inode) in wanted and record.state.finished:
                found[tuple(record.inode)] = record
    return found


def _look_in_processing(spool: Spool, pending: list[Submitted], since: float) -> None:
    """Remember each file's sidecar in processing/ (with `archive: delete` it is all we see)."""
    by_inode = {tuple(item.inode): item for item in pending}
    for sidecar in status.sidecars(spool.processing):
        try:
            if sidecar.stat().st_mtime < since:
                continue
            record = jobrecord.load(sidecar)
        except (OSError, SidecarError):
            continue
        item = by_inode.get(tuple(record.inode or ()))
        if item is not None:
            item.seen = record


def _gone(spool: Spool, config: Config, item: Submitted) -> JobRecord | None:
    """A file no longer anywhere in the spool: finished (`archive: delete`) or removed."""
    places = [item.path, spool.input(item.path.name)]
    if item.seen is not None:
        places.append(spool.input(item.seen.input))
        places.append(spool.work(item.seen.claim_id, "input"))
    for place in places:
        with contextlib.suppress(OSError):
            st = os.lstat(place)
            if [st.st_dev, st.st_ino] == item.inode:
                item.misses = 0
                return None
    item.misses += 1
    if item.misses < LOST_AFTER_LOOKS:
        return None
    seen = item.seen
    if config.archive == "delete" and seen is not None and seen.state.finished:
        return seen
    record = seen or JobRecord(input=item.path.name)
    record.state = FileState.FAILED
    record.output = record.report = None
    record.error = {
        "stage": "submission",
        "message": f"{item.path.name} left the spool without results or an error report "
        "(removed or renamed by someone, or archive: delete before it could be seen)",
    }
    return record


# ---- retry -------------------------------------------------------------------------


def cmd_retry(args: argparse.Namespace) -> int:
    config, _ = load(args)
    if not args.names and not args.all_failed_since:
        raise CommandError("retry: name a failed input, or use --all-failed-since TIME")
    spool = Spool(config.inbox, config.outbox)
    chosen: list[Path] = []
    missing = 0
    for name in args.names:
        found, problem = _failed_input(spool, name)
        if found is None:
            print(f"gemini-batchd: retry: {printable(problem)}", file=sys.stderr)
            missing += 1
        elif found not in chosen:
            chosen.append(found)
    if args.all_failed_since:
        since = parse_since(args.all_failed_since)
        recent = [p for p in _failed_since(spool, since) if p not in chosen]
        if not recent:
            print(f"no inputs failed since {jobrecord.isotime(since)}", file=sys.stderr)
        chosen += recent
    for source in chosen:
        target = retry_input(spool, source)
        print(printable(f"{source} -> {target}"), flush=True)
    return 1 if missing else 0


def _failed_inputs(spool: Spool) -> list[Path]:
    """Inputs in failed/ (not sidecars, not temporary files)."""
    try:
        names = sorted(os.listdir(spool.failed))
    except OSError:
        return []
    return [spool.failed / n for n in names if is_candidate(n)]


def _failed_input(spool: Spool, name: str) -> tuple[Path | None, str]:
    """The failed/ input NAME means (its name there, or the input name it failed under)."""
    base = Path(name).name
    direct = spool.failed / base
    if is_candidate(base) and os.path.lexists(direct):
        return direct, ""
    matches = []
    for path in _failed_inputs(spool):
        with contextlib.suppress(OSError, SidecarError):
            record = jobrecord.load(Path(str(path) + SIDECAR_SUFFIX))
            if record.input == base:
                matches.append((record.finished_at or "", path))
    if matches:
        return max(matches)[1], ""
    if os.path.lexists(spool.done / base):
        return None, (
            f"{base} is in {spool.done}: it got results; to run it again, "
            f"gemini-batchd submit {spool.done / base}"
        )
    if os.path.lexists(spool.input(base)):
        return None, f"{base} is still being processed (in {spool.processing})"
    if os.path.lexists(spool.inbox / base):
        return None, f"{base} is already in the inbox, waiting to be taken"
    listed = ", ".join(p.name for p in _failed_inputs(spool)[:10]) or "none"
    return None, f"{base}: no such input in {spool.failed} (failed inputs there: {listed})"


def _failed_since(spool: Spool, since: datetime) -> list[Path]:
    """Inputs in failed/ that failed at or after `since` (their sidecar's finished_at)."""
    found = []
    for path in _failed_inputs(spool):
        try:
            record = jobrecord.load(Path(str(path) + SIDECAR_SUFFIX))
            when = jobrecord.parse_isotime(record.finished_at or record.updated_at)
        except (OSError, SidecarError, ValueError):
            try:  # no readable sidecar: when it was moved to failed/
                when = datetime.fromtimestamp(path.lstat().st_ctime, tz=timezone.utc)
            except OSError:
                continue
        if when >= since:
            found.append((when, path))
    return [path for _, path in sorted(found)]


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`2h`, `90m`, `3d` ago, or an ISO time (local time if it names no zone), as UTC."""
    now = now or jobrecord.utcnow()
    match = _AGE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        # (Python 3.10's fromisoformat takes no Z: spelled as the offset it means)
        moment = datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", text.strip()))
    except ValueError:
        raise CommandError(
            f"--all-failed-since: {text!r} is neither an ISO time (2026-12-01T10:00Z) "
            "nor an age (90m, 2h, 3d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.astimezone(timezone.utc)


def retry_input(spool: Spool, source: Path) -> Path:
    """Move a failed input back into the inbox under its input name (or a free `-N` name):
    a hard link to a dot-name, a rename into place, then the failed/ name goes. Its old
    sidecar stays in failed/ as history (status no longer lists it)."""
    name = source.name
    with contextlib.suppress(OSError, SidecarError):
        name = jobrecord.load(Path(str(source) + SIDECAR_SUFFIX)).input
    tmp = spool.inbox / f".{name}.retry-{os.getpid()}.tmp"
    try:
        try:
            os.link(source, tmp, follow_symlinks=False)
        except OSError:  # no hard links here (or another file system): copy
            shutil.copyfile(source, tmp, follow_symlinks=False)
        os.utime(tmp, follow_symlinks=False)  # arrives now: it queues behind waiting files
        final = atomic.move_new(tmp, spool.inbox / name)
    finally:
        tmp.unlink(missing_ok=True)
    source.unlink(missing_ok=True)
    atomic.fsync_dir(spool.failed)
    return final


def cmd_cancel(args: argparse.Namespace) -> int:
    """A file's jobs are cancelled by the daemon that owns the file (whatever its engine and
    credential): the command leaves a cancel request in the spool. Only a job no file in the
    spool names is cancelled here, at the API, with this configuration's credential."""
    config, _ = load(args)
    target: str = args.target
    spool = Spool(config.inbox, config.outbox)
    record = _find_record(spool, target)
    if record is None:
        return _cancel_orphan(config, target)
    marker = spool.cancel_marker(record.input)
    marker.parent.mkdir(exist_ok=True)
    atomic.write_bytes(marker, b"")
    jobs = [j.job_name for j in record.jobs if j.job_name and j.state is JobState.RUNNING]
    if jobs:
        what = f"the daemon cancels its job(s) {', '.join(jobs)}"
    elif record.state in (FileState.UPLOADING, FileState.SUBMITTING):
        what = "its job is being created; the daemon cancels it"
    else:
        what = "no job yet; the daemon fails it as cancelled"
    print(f"{printable(record.input)}: cancel requested: {what}")
    if not read_daemons(spool, jobrecord.utcnow())[0]:
        print(
            f"no daemon is running on {config.inbox}: the cancel takes effect when one starts",
            file=sys.stderr,
        )
    return 0


def _cancel_orphan(config: Config, target: str) -> int:
    """A job name that no file in the spool owns: cancelled at the API directly."""
    from ..api import connect, engine_class
    from ..failures import classify

    if not engine_class(config).is_job_name(target):
        raise CommandError(
            f"{printable(target)}: no file of that name is queued or in flight, "
            "and it is not a job name"
        )
    credential = find_credential(config)
    if credential is None:
        raise CommandError(
            f"{target}: no file in the spool has this job, and there is no API key to cancel "
            "it with (see api.key_file)"
        )
    engine = connect(config, credential.value)
    try:
        engine.cancel_job(target)
    except Exception as exc:
        raise CommandError(classify(exc, f"cancel {target}").message) from None
    finally:
        engine.close()
    print(f"cancelled {target} (no file in the spool has this job)")
    return 0


def _find_record(spool: Spool, target: str) -> JobRecord | None:
    """The sidecar of the file in processing/ that TARGET names: its input name (or a path
    to it), or the name of one of its jobs."""
    name = Path(target).name
    for sidecar in status.sidecars(spool.processing):
        try:
            record = jobrecord.load(sidecar)
        except (OSError, SidecarError):
            continue
        names = {j.job_name for j in record.jobs if j.job_name}
        if target == record.input or name == record.input or target in names:
            return record
    return None
