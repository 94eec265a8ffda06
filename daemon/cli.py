"""The `gemini-batchd` command: run, status, validate, submit, cancel, simulator."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, atomic, jobrecord, logs
from .config import (
    Config,
    ConfigError,
    check_paths,
    default_config_path,
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

RECENT_SECONDS = 24 * 3600
"""`status` lists files finished within this many seconds."""


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CommandError, ConfigError) as exc:
        print(f"gemini-batchd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. an inbox that cannot be created: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gemini-batchd: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0


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
        "the configuration.",
    )
    run.add_argument("-c", "--config", help=config_help)
    run.add_argument(
        "--once",
        action="store_true",
        help="take what is in the inbox now (and resume work in flight), wait until every file "
        "has finished, exit 0 if all got results, 1 if any got an error report",
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
        help="show queued, in-flight and recently finished files",
        description="One row per file known to the daemon, read from its sidecars: files "
        "waiting in the inbox, queued and in-flight files (job name, job state, age, polls, "
        "next poll, progress where the API reports it) and files finished in the last 24 hours.",
    )
    status.add_argument("-c", "--config", help=config_help)
    status.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
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
        "into place, so the daemon never sees a half-written file.",
    )
    submit.add_argument(
        "files", nargs="+", metavar="FILE", help="*.jsonl files to copy into the inbox"
    )
    submit.add_argument("-c", "--config", help=config_help)
    submit.set_defaults(func=cmd_submit)

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

    config, path = _config(args)
    logs.configure(config.log_level)
    log = logs.get()
    if config.source is None:  # a daemon started in the wrong folder (cron) must say so
        log.warning("configuration", file=config.describe_source())
    else:
        log.info("configuration", file=config.describe_source())
    api_key = _start_checks(config, simulate=args.simulate)  # before anything is started
    simulator = None
    base_url = None
    if args.simulate:
        from .simulator import Simulator

        simulator = Simulator(pending_seconds=0.5, running_seconds=1.0).start()
        base_url = simulator.base_url
        config = _fast_polls(config)
        log.info("simulator started; no request leaves this machine", base_url=base_url)
    logs.add_secret(api_key)

    def reload() -> Config:
        new = load_config(path, must_exist=True)
        raise_problems(new, check_paths(new))  # refused: the log level must not change
        logs.configure(new.log_level)
        return _fast_polls(new) if simulator else new

    service = Service(
        config,
        make_backend(config, api_key, base_url),
        once=args.once,
        reload_config=reload,
        make_backend=lambda c: make_backend(c, api_key, base_url),
    )
    # Everything the daemon imports lives as long as it does: keep those objects out of the
    # garbage collector's full passes, which otherwise walk them all again and again.
    gc.collect()
    gc.freeze()
    # Handlers only set flags and poke the wake-up pipe; the main loop does the work.
    signal.set_wakeup_fd(service.scheduler.wakeup.fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    try:
        return service.run()
    finally:
        service.backend.close()
        if simulator is not None:
            simulator.stop()


def _start_checks(config: Config, *, simulate: bool) -> str:
    """The API key to use, once the folders and files the configuration names are usable; else
    one ConfigError listing every problem, a missing key included."""
    problems = check_paths(config)
    others: list[str] = []
    if simulate:
        raise_problems(config, problems)
        return SIMULATED_API_KEY
    api_key = ""
    try:
        api_key = resolve_api_key(config) or ""
    except ConfigError as exc:
        (problems if config.api.key_file is not None else others).extend(exc.problems)
    else:
        if not api_key:
            others.append(
                "no API key: set api.key_file, $GEMINI_API_KEY or $GOOGLE_API_KEY, or pass one with "
                "systemd LoadCredential=gemini_api_key:...; or use --simulate"
            )
    raise_problems(config, problems, *others)
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


def _known_files(config: Config) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    now = time.time()
    for name in sorted(os.listdir(config.inbox)) if config.inbox.is_dir() else []:
        if is_candidate(name):
            rows.append({"input": name, "state": "inbox", "job_name": None, "job_state": None})
    for folder, recent in (
        (config.processing_dir, False),
        (config.done_dir, True),
        (config.failed_dir, True),
    ):
        if not folder.is_dir():
            continue
        for sidecar in sorted(folder.glob("*" + SIDECAR_SUFFIX)):
            try:
                if recent and now - sidecar.stat().st_mtime > RECENT_SECONDS:
                    continue
                record = jobrecord.load(sidecar)
            except (OSError, SidecarError):
                continue
            row = json.loads(record.to_json())
            row["sidecar"] = str(sidecar)
            rows.append(row)
        if not recent:
            claimed = {r["input"] for r in rows}
            for path in sorted(folder.iterdir()):
                if is_candidate(path.name) and path.name not in claimed:
                    rows.append(
                        {
                            "input": path.name,
                            "state": FileState.CLAIMED.value,
                            "job_name": None,
                            "job_state": None,
                        }
                    )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    config, _ = _config(args)
    rows = _known_files(config)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no files (inbox: {config.inbox})")
        return 0
    header = ("FILE", "STATE", "JOB", "JOB STATE", "AGE", "POLLS", "NEXT POLL", "PROGRESS")
    table = [header] + [_status_row(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _status_row(row: dict[str, Any]) -> tuple[str, ...]:
    job_state = (row.get("job_state") or "").removeprefix("JOB_STATE_")
    return (
        row["input"],
        row["state"],
        row.get("job_name") or "-",
        job_state or "-",
        _age(row.get("created_at")),
        str(row.get("polls", "-")),
        _until(row.get("next_poll_at")) if row["state"] == FileState.RUNNING.value else "-",
        _progress(row.get("progress"), row.get("requests")),
    )


def _age(stamp: str | None) -> str:
    if not stamp:
        return "-"
    return _duration((jobrecord.utcnow() - jobrecord.parse_isotime(stamp)).total_seconds())


def _until(stamp: str | None) -> str:
    if not stamp:
        return "-"
    seconds = (jobrecord.parse_isotime(stamp) - jobrecord.utcnow()).total_seconds()
    return "due" if seconds <= 0 else "in " + _duration(seconds)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _progress(progress: dict[str, int] | None, requests: int | None) -> str:
    """A 10-cell bar from the job's request counts, where the API reports them."""
    if not progress or not requests:
        return "-"
    finished = progress.get("succeeded", 0) + progress.get("failed", 0)
    cells = min(10, round(10 * finished / requests))
    return "[" + "#" * cells + "." * (10 - cells) + f"] {finished}/{requests}"


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
        mode = {"file": "File API", "inline": "inline"}[scan.mode(config.limits.inline_max_bytes)]
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
        amount = f"{usd:,.2f}" if usd >= 1 else f"{usd:.6f}".rstrip("0").rstrip(".")
        text += f" (~${amount} at {config.model} batch price)"
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
    for name in args.files:
        source = Path(name)
        target = config.inbox / source.name
        tmp = config.inbox / f".{source.name}.submit-{os.getpid()}.tmp"
        try:
            shutil.copyfile(source, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            final = atomic.move_new(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        print(final)
    return 0


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
    for sidecar in (
        config.processing_dir.glob("*" + SIDECAR_SUFFIX) if config.processing_dir.is_dir() else []
    ):
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
