"""The `gemini-batchd` command: run, status, validate, submit, cancel, simulator."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, atomic, jobrecord, logs, status
from .config import (
    ApiKey,
    Config,
    ConfigError,
    check_paths,
    default_config_path,
    find_api_key,
    load_config,
    raise_problems,
    resolve_api_key,
)
from .jobrecord import FileState, JobRecord, JobState, SidecarError
from .spool import SIDECAR_SUFFIX, Spool, is_candidate, name_too_long, why_ignored

if TYPE_CHECKING:  # google-genai takes a second to import: only `run` and `cancel` need it
    from .backend import Backend
    from .simulator import Simulator

EXIT_USAGE = 2
"""Bad configuration, missing API key, unknown target: the command could not start its work."""

SIMULATED_API_KEY = "simulated-key"
"""What `run --simulate` sends; the simulator accepts any key."""


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CommandError, ConfigError) as exc:
        print(f"gemini-batchd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `gemini-batchd status | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except OSError as exc:  # e.g. an inbox that cannot be created: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gemini-batchd: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not fail a second time."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemini-batchd",
        description="Turn JSONL prompt files dropped into an inbox into Gemini Batch API jobs, "
        "and their results into an outbox.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "configuration file (default: $GEMINI_BATCHD_CONFIG, else ./config.yaml)"

    run = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Watch the inbox and process files until SIGTERM/SIGINT. SIGHUP reloads "
        "the configuration. Before it takes any file it checks the API key with one cheap call: "
        "a rejected key exits 2 (naming where the key came from); an unreachable API only warns. "
        "With --once a line per finished file and a total are printed on stdout.",
    )
    run.add_argument("-c", "--config", help=config_help)
    run.add_argument(
        "--once",
        action="store_true",
        help="take what is in the inbox now (and resume work in flight), wait until every file "
        "has finished, exit 0 if all got results, 1 if any got an error report",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="with --once: exit 1 also when any result record is an error",
    )
    run.add_argument(
        "--simulate",
        action="store_true",
        help="start the built-in Gemini Batch API simulator on a loopback port and use it "
        "instead of Google (no API key needed)",
    )
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status",
        help="show whether the daemon runs, and queued, in-flight and recent files",
        description="Whether a daemon runs on this spool (pid, since when, paused and why), "
        "totals, and one row per file: waiting or ignored in the inbox, queued and in flight "
        "(job, job state, age, polls, next poll, progress, round, retries and the last error) "
        "and finished in the last 24 hours (ok/error record counts, output path).",
    )
    status.add_argument("-c", "--config", help=config_help)
    status.add_argument(
        "--json", action="store_true", help="print one JSON object (daemon, totals, files)"
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="redraw every --interval seconds until Ctrl-C (with --json: one object per line)",
    )
    status.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between redraws with --watch (default: %(default)s)",
    )
    status.set_defaults(func=cmd_status)

    validate = sub.add_parser(
        "validate",
        help="check input files without submitting anything",
        description="Parse each file as the daemon would (following on_invalid_line); exit 1 if "
        "any is invalid. Input tokens are estimated as characters / 4 of the prompt texts; with "
        "`prices` for the model, their cost at batch price is shown too.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="JSONL input files to check")
    validate.add_argument("-c", "--config", help=config_help)
    validate.set_defaults(func=cmd_validate)

    submit = sub.add_parser(
        "submit",
        help="copy files into the inbox atomically",
        description="Copy each file to a temporary dot-name in the inbox, then rename it "
        "into place, so the daemon never sees a half-written file (NAME-2.jsonl where the name "
        "is taken). Prints the inbox path of each file. With --wait, works with any daemon on "
        "that inbox: it only watches the spool's files.",
    )
    submit.add_argument(
        "files", nargs="+", metavar="FILE", help="*.jsonl files to copy into the inbox"
    )
    submit.add_argument("-c", "--config", help=config_help)
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait until each file has its results or error report; print their outbox paths on "
        "stdout; exit 0 if every file got results, 1 if any got an error report",
    )
    submit.add_argument(
        "--strict",
        action="store_true",
        help="with --wait: exit 1 also when any result record is an error",
    )
    submit.set_defaults(func=cmd_submit)

    retry = sub.add_parser(
        "retry",
        help="put failed inputs back into the inbox",
        description="Move inputs from inbox/failed/ back into the inbox atomically (a temporary "
        "dot-name, then a rename; NAME-2.jsonl where the name is taken), so that the daemon "
        "runs them again. NAME is a file in inbox/failed/ or the input name it failed under.",
    )
    retry.add_argument(
        "names", nargs="*", metavar="NAME", help="input names (or paths) in inbox/failed/"
    )
    retry.add_argument("-c", "--config", help=config_help)
    retry.add_argument(
        "--all-failed-since",
        metavar="TIME",
        help="also every input that failed since TIME: an ISO time (2026-12-01T10:00Z; local "
        "time without a zone) or an age such as 90m, 2h, 3d",
    )
    retry.set_defaults(func=cmd_retry)

    cancel = sub.add_parser(
        "cancel",
        help="cancel the batch job of a file or a job name",
        description="TARGET is an input file name (NAME.jsonl) or a job name (batches/...). "
        "The file then gets an error report with job_state JOB_STATE_CANCELLED.",
    )
    cancel.add_argument(
        "target",
        metavar="TARGET",
        help="an input file name (NAME.jsonl, or a path to it) or a job name (batches/...)",
    )
    cancel.add_argument("-c", "--config", help=config_help)
    cancel.set_defaults(func=cmd_cancel)

    simulator = sub.add_parser(
        "simulator",
        help="run the Gemini Batch API simulator alone",
        description="Serve the simulator; its base URL is the first line of stdout. The flags "
        "script how it behaves, the way tests script it.",
    )
    simulator.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    simulator.add_argument("--port", type=int, default=0, help="port; 0 (default) picks a free one")
    simulator.add_argument(
        "--api-key", metavar="KEY", help="accept only this API key (default: any key)"
    )
    simulator.add_argument(
        "--pending-seconds",
        type=float,
        metavar="SECONDS",
        default=1.0,
        help="how long each job stays pending (default: %(default)s)",
    )
    simulator.add_argument(
        "--running-seconds",
        type=float,
        metavar="SECONDS",
        default=2.0,
        help="how long each job then runs before it ends (default: %(default)s)",
    )
    simulator.add_argument(
        "--outcome",
        choices=["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"],
        default="SUCCEEDED",
        help="how every job ends (default: %(default)s)",
    )
    simulator.add_argument(
        "--fail-keys",
        type=_key_codes,
        default={},
        metavar="K[=CODE],...",
        help=f"requests with these keys fail with CODE (default {_FAIL_CODE}) in every job",
    )
    simulator.add_argument(
        "--fail-keys-times",
        type=_key_times,
        default={},
        metavar="K[=CODE]:N,...",
        help=f"requests with these keys fail (CODE, default {_FAIL_CODE}) the first N times "
        "they are submitted, then succeed",
    )
    simulator.add_argument(
        "--missing-keys",
        type=_key_list,
        default=set(),
        metavar="K,...",
        help="requests with these keys get no response entry",
    )
    simulator.add_argument(
        "--missing-keys-times",
        type=_key_counts,
        default={},
        metavar="K:N,...",
        help="requests with these keys get no response entry the first N times they are submitted",
    )
    simulator.add_argument(
        "--shuffle", action="store_true", help="return responses in a random order"
    )
    simulator.add_argument(
        "--extra-fields",
        action="store_true",
        help="add unknown fields to every object of every JSON reply and result line",
    )
    simulator.add_argument(
        "--no-echo-metadata",
        action="store_true",
        help="leave request metadata (the key) out of inline responses",
    )
    simulator.add_argument(
        "--errors-as-status",
        action="store_true",
        help='result-file lines carry a request error as "status" instead of "error"',
    )
    simulator.add_argument(
        "--list-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a new job shows in the job list only after this long",
    )
    simulator.add_argument(
        "--expire-after",
        type=float,
        metavar="SECONDS",
        help="a job still pending or running this long becomes EXPIRED",
    )
    simulator.add_argument(
        "--quota-tokens",
        type=int,
        metavar="N",
        help="enqueued-token quota: estimated tokens (characters / 4) of pending and running jobs",
    )
    simulator.add_argument(
        "--quota-mode",
        choices=["refuse", "fail"],
        default="refuse",
        help="over the quota, refuse the create with 429 or create a job that fails "
        "(default: %(default)s)",
    )
    simulator.add_argument(
        "--reject-key-for",
        type=_rejection,
        metavar="SECONDS[:STATUS]",
        help="reject the API key (STATUS 400, 401 or 403; default 400) for SECONDS after start",
    )
    simulator.add_argument(
        "--seed", type=int, default=0, help="seed of --shuffle's order (default: %(default)s)"
    )
    simulator.set_defaults(func=cmd_simulator)
    return parser


def _config(args: argparse.Namespace) -> tuple[Config, Path]:
    path = default_config_path(args.config)
    explicit = bool(args.config or os.environ.get("GEMINI_BATCHD_CONFIG"))
    return load_config(path, must_exist=explicit), path


def make_backend(config: Config, api_key: str, base_url: str | None = None) -> Backend:
    from .backend import Backend

    return Backend(
        api_key,
        base_url=base_url or config.api.base_url,
        api_version=config.api.api_version,
        timeout_seconds=config.api.timeout_seconds,
        retries=config.api.retries,
    )


# ---- run ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .service import Service

    if args.strict and not args.once:
        raise CommandError("--strict needs --once (a daemon that runs on has no final status)")
    config, path = _config(args)
    logs.configure(config.log_level)
    log = logs.get()
    if config.source is None:  # a daemon started in the wrong folder (cron) must say so
        log.warning("configuration", file=config.describe_source())
    else:
        log.info("configuration", file=config.describe_source())
    api_key = _start_checks(config, simulate=args.simulate)  # before anything is started
    logs.add_secret(api_key.value)
    simulator = None
    base_url = None
    if args.simulate:
        from .simulator import Simulator

        simulator = Simulator(pending_seconds=0.5, running_seconds=1.0).start()
        base_url = simulator.base_url
        config = _fast_polls(config)
        log.info("simulator started; no request leaves this machine", base_url=base_url)
    else:
        check_key(config, api_key)  # before anything is claimed

    def reload() -> Config:
        new = load_config(path, must_exist=True)
        raise_problems(new, check_paths(new))  # refused: the log level must not change
        logs.configure(new.log_level)
        return _fast_polls(new) if simulator else new

    service = Service(
        config,
        make_backend(config, api_key.value, base_url),
        once=args.once,
        reload_config=reload,
        make_backend=lambda c: make_backend(c, api_key.value, base_url),
    )
    # Everything the daemon imports lives as long as it does: keep those objects out of the
    # garbage collector's full passes, which otherwise walk them all again and again. Parsing
    # a big reply makes objects by the million, nearly all without cycles: a young generation
    # of 50,000 instead of 700 halves the time an inline job's answers take to read.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    _return_freed_buffers()
    # Handlers only set flags and poke the wake-up pipe; the main loop does the work.
    signal.set_wakeup_fd(service.scheduler.wakeup.fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    try:
        code = service.run()
    finally:
        service.backend.close()
        if simulator is not None:
            simulator.stop()
    if not args.once:
        return code
    finished = service.outcomes
    for record in finished:
        print(status.outcome_line(record, service.config))
    print(status.totals_line(finished, service.config), flush=True)
    return 1 if code or (args.strict and any(r.errors for r in finished)) else 0


def _return_freed_buffers() -> None:
    """glibc keeps freed buffers for reuse, per thread: the SDK's 8 MiB upload chunks and big
    replies then stay in the daemon's memory for good. Buffers from 1 MiB up are mapped and
    unmapped on their own instead, in at most two arenas (mallopt M_MMAP_THRESHOLD, M_ARENA_MAX)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)
        libc.mallopt(-8, 2)


KEY_CHECK_SECONDS = 15.0
"""The start-up key check gives up (and starts anyway) after this long."""


def check_key(config: Config, api_key: ApiKey) -> None:
    """One cheap authenticated call: a rejected key is a CommandError naming where it came
    from; an API that cannot be reached only gets a warning (the daemon retries later)."""
    from .failures import Kind, classify

    api = config.api.model_copy(
        update={"timeout_seconds": min(config.api.timeout_seconds, KEY_CHECK_SECONDS), "retries": 1}
    )
    backend = make_backend(config.model_copy(update={"api": api}), api_key.value)
    try:
        backend.probe()
    except Exception as exc:
        failure = classify(exc, "key check")
        if failure.kind is Kind.AUTH:
            raise CommandError(
                f"the API rejected the key from {api_key.source} ({failure.message}); "
                "fix or replace that key"
            ) from None
        logs.get().warning(
            "cannot check the API key now; starting anyway",
            source=api_key.source,
            error=failure.message,
        )
    else:
        logs.get().info("API key accepted", source=api_key.source)


def _start_checks(config: Config, *, simulate: bool) -> ApiKey:
    """The API key to use, once the folders and files the configuration names are usable; else
    one ConfigError listing every problem, a missing key included."""
    problems = check_paths(config)
    others: list[str] = []
    if simulate:
        raise_problems(config, problems)
        return ApiKey(SIMULATED_API_KEY, "--simulate")
    api_key: ApiKey | None = None
    try:
        api_key = find_api_key(config)
    except ConfigError as exc:
        (problems if config.api.key_file is not None else others).extend(exc.problems)
    else:
        if api_key is None:
            others.append(
                "no API key: set api.key_file, $GEMINI_API_KEY or $GOOGLE_API_KEY, or pass one with "
                "systemd LoadCredential=gemini_api_key:...; or use --simulate"
            )
    raise_problems(config, problems, *others)
    assert api_key is not None
    return api_key


def _fast_polls(config: Config) -> Config:
    """The simulator finishes jobs in about a second: poll it at that pace."""
    poll = config.poll.model_copy(
        update={
            "initial_seconds": min(config.poll.initial_seconds, 0.25),
            "max_seconds": min(config.poll.max_seconds, 2.0),
        }
    )
    return config.model_copy(update={"poll": poll})


# ---- status ------------------------------------------------------------------------

CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_status(args: argparse.Namespace) -> int:
    config, _ = _config(args)
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
    snap = status.snapshot(config)
    if as_json:
        text = json.dumps(snap, separators=(",", ":")) if compact else json.dumps(snap, indent=2)
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.write(status.render_table(snap))
        if compact and not sys.stdout.isatty():
            sys.stdout.write("\n")
    sys.stdout.flush()


# ---- validate / submit / cancel ----------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Report what the daemon would do with each file, under this configuration."""
    from .inputs import Defaults, scan_file  # imports google-genai: not needed by `status`

    config, _ = _config(args)
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
        scan = scan_file(path, defaults)
        mode = {"file": "File API", "inline": "inline"}[scan.mode(config.limits)]
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
    config, _ = _config(args)
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
            print(final, flush=True)
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
            if not said_no_daemon and not status.read_daemons(spool, jobrecord.utcnow())[0]:
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
                        print(path, flush=True)
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
    config, _ = _config(args)
    if not args.names and not args.all_failed_since:
        raise CommandError("retry: name a failed input, or use --all-failed-since TIME")
    spool = Spool(config.inbox, config.outbox)
    chosen: list[Path] = []
    missing = 0
    for name in args.names:
        found, problem = _failed_input(spool, name)
        if found is None:
            print(f"gemini-batchd: retry: {problem}", file=sys.stderr)
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
        print(f"{source} -> {target}", flush=True)
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
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
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
    config, _ = _config(args)
    target: str = args.target
    record, sidecar = _find_record(config, target)
    if record is not None:
        job_names = [
            j.job_name
            for j in record.jobs
            if j.job_name and j.state in (JobState.SUBMITTING, JobState.RUNNING)
        ]
    else:
        job_names = [target] if target.startswith("batches/") else []
    if record is None and not job_names:
        raise CommandError(
            f"{target}: no file of that name is queued or in flight, and it is not a job name"
        )
    if job_names:
        from .failures import classify

        api_key = resolve_api_key(config)
        if not api_key:
            raise CommandError("no API key to cancel the job with (see api.key_file)")
        backend = make_backend(config, api_key)
        for job_name in job_names:
            try:
                backend.cancel_job(job_name)
            except Exception as exc:
                raise CommandError(classify(exc, f"cancel {job_name}").message) from None
            print(f"cancelled {job_name}")
    if record is not None and sidecar is not None:
        # Tell the daemon: it polls the jobs at once (or fails a file that has no job yet, or
        # cancels a job itself once a create call under way has returned).
        marker = Spool(config.inbox, config.outbox).cancel_marker(record.input)
        marker.parent.mkdir(exist_ok=True)
        atomic.write_bytes(marker, b"")
        if not job_names:
            creating = record.state in (FileState.UPLOADING, FileState.SUBMITTING)
            print(
                f"{record.input}: its job is being created; the daemon will cancel it"
                if creating
                else f"{record.input}: no job yet; the daemon will fail it as cancelled"
            )
    return 0


def _find_record(config: Config, target: str) -> tuple[JobRecord | None, Path | None]:
    name = Path(target).name
    for sidecar in status.sidecars(Spool(config.inbox, config.outbox).processing):
        try:
            record = jobrecord.load(sidecar)
        except (OSError, SidecarError):
            continue
        names = {j.job_name for j in record.jobs if j.job_name}
        if target == record.input or name == record.input or target in names:
            return record, sidecar
    return None, None


# ---- simulator ---------------------------------------------------------------------


_FAIL_CODE = 500
"""The error code of --fail-keys and --fail-keys-times entries that name none."""


def _key_list(value: str) -> set[str]:
    return {key for key in (k.strip() for k in value.split(",")) if key}


def _key_code(item: str) -> tuple[str, int]:
    key, _, code = item.partition("=")
    if not key or (code and not code.isdigit()) or (code and not 400 <= int(code) <= 599):
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY or KEY=CODE (400..599)")
    return key, int(code) if code else _FAIL_CODE


def _key_codes(value: str) -> dict[str, int]:
    """``a,b=429`` -> {"a": 500, "b": 429}."""
    return dict(_key_code(item) for item in _key_list(value))


def _key_times(value: str) -> dict[str, tuple[int, int]]:
    """``a:1,b=429:2`` -> {"a": (500, 1), "b": (429, 2)}."""
    out = {}
    for item in _key_list(value):
        head, _, times = item.rpartition(":")
        if not head or not times.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY[=CODE]:N")
        key, code = _key_code(head)
        out[key] = (code, int(times))
    return out


def _key_counts(value: str) -> dict[str, int]:
    """``a:1,b:2`` -> {"a": 1, "b": 2}."""
    out = {}
    for item in _key_list(value):
        key, _, times = item.rpartition(":")
        if not key or not times.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY:N")
        out[key] = int(times)
    return out


def _rejection(value: str) -> tuple[float, int]:
    """``30`` -> (30.0, 400); ``30:403`` -> (30.0, 403)."""
    seconds, _, status = value.partition(":")
    try:
        pair = float(seconds), int(status or 400)
    except ValueError:
        pair = (-1.0, 0)
    if pair[0] < 0 or pair[1] not in (400, 401, 403):
        raise argparse.ArgumentTypeError(f"{value!r}: expected SECONDS[:400|401|403]")
    return pair


def simulator_from_args(args: argparse.Namespace) -> Simulator:
    """The simulator that the `simulator` command's flags describe, not yet started."""
    from .simulator import Simulator

    sim = Simulator(
        host=args.host,
        port=args.port,
        pending_seconds=args.pending_seconds,
        running_seconds=args.running_seconds,
        seed=args.seed,
        api_key=args.api_key,
        outcome=args.outcome,
        shuffle_output=args.shuffle,
        fail_keys=args.fail_keys,
        missing_keys=args.missing_keys,
        fail_keys_times=args.fail_keys_times,
        missing_keys_times=args.missing_keys_times,
        list_lag_seconds=args.list_lag,
        expire_after_seconds=args.expire_after,
        enqueued_token_limit=args.quota_tokens,
        quota_mode=args.quota_mode,
        extra_fields=args.extra_fields,
        echo_metadata=not args.no_echo_metadata,
        errors_as_status=args.errors_as_status,
    )
    if args.reject_key_for is not None:
        seconds, status = args.reject_key_for
        sim.reject_key(status, seconds=seconds)
    return sim


def cmd_simulator(args: argparse.Namespace) -> int:
    sim = simulator_from_args(args)
    try:
        sim.start()
    except OSError as exc:
        raise CommandError(
            f"simulator: cannot listen on {args.host} port {args.port}: {exc.strerror or exc}"
        ) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with sim:
        print(sim.base_url, flush=True)
        stop.wait()
    return 0
