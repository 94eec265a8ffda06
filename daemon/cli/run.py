"""`gemini-batchd run`: check the configuration and the credential, then run the `Service`."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import signal

from .. import logs
from ..api import connect
from ..config import (
    ApiKey,
    Config,
    check_paths,
    find_api_key,
    load_config,
    raise_problems,
)
from ..errors import ConfigError
from . import status
from .common import CommandError, Subcommands, add_config_option, load

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
    api_key = _start_checks(config, simulate=args.simulate)  # before anything is started
    logs.add_secret(api_key.value)
    simulator = None
    base_url = None
    if args.simulate:
        from ..simulator import Simulator

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
        connect(config, api_key.value, base_url=base_url),
        once=args.once,
        reload_config=reload,
        make_engine=lambda c: connect(c, api_key.value, base_url=base_url),
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
        service.engine.close()
        if simulator is not None:
            simulator.stop()
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
    from ..failures import Kind, classify

    api = config.api.model_copy(
        update={"timeout_seconds": min(config.api.timeout_seconds, KEY_CHECK_SECONDS), "retries": 1}
    )
    engine = connect(config.model_copy(update={"api": api}), api_key.value)
    try:
        engine.probe()
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
