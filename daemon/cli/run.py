"""`gemini-batchd run`: check the configuration and the credential, then run the `Service`."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import signal

from .. import logs
from ..api import Engine, connect
from ..config import (
    Config,
    Credential,
    check_paths,
    load_config,
    raise_problems,
)
from ..errors import ConfigError
from . import status
from .common import CommandError, Subcommands, add_config_option, find_credential, load

SIMULATED_API_KEY = "simulated-key"
"""What `run --simulate` sends; the simulator accepts any key."""


def add_parser(sub: Subcommands) -> None:
    command = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Watch the inbox and process files until SIGTERM/SIGINT. SIGHUP reloads "
        "the configuration. Before it takes any file it checks the API key with one cheap call: "
        "a rejected key exits 2 (naming where the key came from); an unreachable API only warns. "
        "With --once a line per finished file and a total are printed on stdout.",
    )
    add_config_option(command)
    command.add_argument(
        "--once",
        action="store_true",
        help="take what is in the inbox now (and resume work in flight), wait until every file "
        "has finished, exit 0 if all got results, 1 if any got an error report",
    )
    command.add_argument(
        "--strict",
        action="store_true",
        help="with --once: exit 1 also when any result record is an error",
    )
    command.add_argument(
        "--simulate",
        action="store_true",
        help="start the built-in Gemini Batch API simulator on a loopback port and use it "
        "instead of Google (no API key needed)",
    )
    command.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ..service import Service

    if args.strict and not args.once:
        raise CommandError("--strict needs --once (a daemon that runs on has no final status)")
    config, path = load(args)
    logs.configure(config.log_level)
    log = logs.get()
    if config.source is None:  # a daemon started in the wrong folder (cron) must say so
        log.warning("configuration", file=config.describe_source())
    else:
        log.info("configuration", file=config.describe_source())
    credential = _start_checks(config, simulate=args.simulate)  # before anything is started
    logs.add_secret(credential.value if isinstance(credential.value, str) else None)
    endpoints: dict[str, str] = {}
    with contextlib.ExitStack() as simulated:
        if args.simulate:
            endpoints = _simulate(config, simulated)
            config = _fast_polls(config)
            log.info("simulator started; no request leaves this machine", **endpoints)
        else:
            check_credential(config, credential)  # before anything is claimed

        def reload() -> Config:
            new = load_config(path, must_exist=True)
            raise_problems(new, check_paths(new))  # refused: the log level must not change
            logs.configure(new.log_level)
            return _fast_polls(new) if args.simulate else new

        def engine(settings: Config) -> Engine:
            return connect(settings, credential.value, **endpoints)

        service = Service(
            config, engine(config), once=args.once, reload_config=reload, make_engine=engine
        )
        # Everything the daemon imports lives as long as it does: keep those objects out of
        # the garbage collector's full passes, which otherwise walk them all again and again.
        # (No full pass first: the few cycles imports leave behind cost less kept than the
        # 30 ms such a pass takes at every start.) Parsing a big reply makes objects by the
        # million, nearly all without cycles: a young generation of 50,000 instead of 700
        # halves the time an inline job's answers take.
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
            service.engine.close()
    if not args.once:
        return code
    finished = service.outcomes
    for record in finished:
        print(status.outcome_line(record, service.config))
    unfinished = [t.record for t in service.files.values()]
    for record in unfinished:
        print(status.unfinished_line(record))
    print(status.totals_line(finished, service.config, unfinished=len(unfinished)), flush=True)
    return 1 if code or (args.strict and any(r.errors for r in finished)) else 0


def _simulate(config: Config, stack: contextlib.ExitStack) -> dict[str, str]:
    """Start the simulator the backend needs (and, for Vertex AI, Cloud Storage on loopback,
    with the staging bucket); the endpoints the engine is to use instead of Google's."""
    if config.backend == "vertex":
        from ..simulator import StorageEmulator, VertexSimulator

        storage = stack.enter_context(StorageEmulator())
        storage.create_bucket(config.vertex.bucket)
        sim = stack.enter_context(
            VertexSimulator(storage=storage, pending_seconds=0.5, running_seconds=1.0)
        )
        return {"base_url": sim.base_url, "storage_endpoint": storage.base_url}
    from ..simulator import Simulator

    gemini = stack.enter_context(Simulator(pending_seconds=0.5, running_seconds=1.0))
    return {"base_url": gemini.base_url}


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


def check_credential(config: Config, credential: Credential) -> None:
    """The start-up check: for `gemini` one cheap authenticated call; for `vertex` listing jobs
    in the project and location, and writing and deleting an object under the staging folder.
    A rejected credential or permission, or a missing bucket, is a CommandError naming where
    the credential came from and what is missing; a service that cannot be reached only gets a
    warning (the daemon retries later)."""
    from ..failures import Kind, classify

    api = config.api.model_copy(
        update={"timeout_seconds": min(config.api.timeout_seconds, KEY_CHECK_SECONDS), "retries": 1}
    )
    engine = connect(config.model_copy(update={"api": api}), credential.value)
    gemini = config.backend == "gemini"
    what = "API key" if gemini else "credential"
    try:
        engine.check_access()
    except Exception as exc:
        failure = classify(exc, "key check" if gemini else "credential check")
        if failure.kind is Kind.AUTH:
            fix = (
                "fix or replace that key"
                if gemini
                else "grant the service account what it lacks (see docs/vertex.md), or fix "
                "vertex.project, vertex.location and vertex.staging_uri"
            )
            rejected = "key" if gemini else "credential"
            raise CommandError(
                f"the API rejected the {rejected} from {credential.source} ({failure.message}); "
                f"{fix}"
            ) from None
        logs.get().warning(
            f"cannot check the {what} now; starting anyway",
            source=credential.source,
            error=failure.message,
        )
    else:
        logs.get().info(f"{what} accepted", source=credential.source)
    finally:
        engine.close()


def _start_checks(config: Config, *, simulate: bool) -> Credential:
    """The credential to use, once the folders and files the configuration names are usable;
    else one ConfigError listing every problem, a missing credential included."""
    problems = check_paths(config)
    others: list[str] = []
    if simulate:
        raise_problems(config, problems)
        if config.backend == "vertex":
            from google.oauth2.credentials import Credentials

            token = Credentials(token=SIMULATED_API_KEY)  # type: ignore[no-untyped-call]
            return Credential(token, "--simulate")
        return Credential(SIMULATED_API_KEY, "--simulate")
    found: Credential | None = None
    try:
        found = find_credential(config)
    except ConfigError as exc:
        own = config.api.key_file is not None or config.vertex.credentials_file is not None
        (problems if own else others).extend(exc.problems)
    else:
        if found is None:
            others.append(
                "no API key: set api.key_file, $GEMINI_API_KEY or $GOOGLE_API_KEY, or pass one with "
                "systemd LoadCredential=gemini_api_key:...; or use --simulate"
            )
    raise_problems(config, problems, *others)
    assert found is not None
    return found


def _fast_polls(config: Config) -> Config:
    """The simulator finishes jobs in about a second: poll it at that pace."""
    poll = config.poll.model_copy(
        update={
            "initial_seconds": min(config.poll.initial_seconds, 0.25),
            "max_seconds": min(config.poll.max_seconds, 2.0),
        }
    )
    return config.model_copy(update={"poll": poll})
