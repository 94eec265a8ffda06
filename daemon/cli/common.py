"""What every command shares: its configuration option, its one-line errors, its exit codes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeAlias

from ..config import Config, Credential, default_config_path, find_api_key, load_config
from ..errors import BatchdError

EXIT_USAGE = 2
"""Bad configuration, missing API key, unknown target: the command could not start its work."""

CONFIG_HELP = "configuration file (default: $GEMINI_BATCHD_CONFIG, else ./config.yaml)"


def find_credential(config: Config) -> Credential | None:
    """The backend's credential (see `config.find_api_key`, `api.vertex.find_credentials`);
    None where no API key is set; ConfigError for one that cannot be used."""
    if config.backend == "vertex":
        from ..api.vertex import find_credentials

        return Credential(*find_credentials(config.vertex))
    return find_api_key(config)


class CommandError(BatchdError):
    """A user-facing failure: printed as one line, exit status 2."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """`-c/--config`, on the command and before it (`gemini-batchd -c FILE status`): the
    command's own default is SUPPRESS, so it does not overwrite one given before it."""
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)


def load(args: argparse.Namespace) -> tuple[Config, Path]:
    """The configuration the command names (`-c`, `$GEMINI_BATCHD_CONFIG`, `./config.yaml`)."""
    given = getattr(args, "config", None)
    path = default_config_path(given)
    explicit = bool(given or os.environ.get("GEMINI_BATCHD_CONFIG"))
    return load_config(path, must_exist=explicit), path


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What `add_subparsers` returns: each command adds its own parser to it."""
