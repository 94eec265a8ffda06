"""The `gemini-batchd` command: `main` and its parser, one parser function per command.

`run.py` runs the daemon, `files.py` holds the commands that act on files (validate, submit,
retry, cancel), `status.py` shows what the daemon does; the simulator brings its own command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError
from ..simulator import cli as simulator_cli
from . import files, run, status
from .common import EXIT_USAGE, CommandError, add_config_option


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="gemini-batchd",
        description="Turn JSONL prompt files dropped into an inbox into Gemini batch jobs, "
        "and their results into an outbox.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(top)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        run.add_parser,
        status.add_parser,
        files.add_validate_parser,
        files.add_submit_parser,
        files.add_retry_parser,
        files.add_cancel_parser,
        simulator_cli.add_parser,
    ):
        add(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
