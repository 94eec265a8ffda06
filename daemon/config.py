"""Configuration: one YAML file, validated into typed settings with the contract's defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_ENV = "GEMINI_BATCHD_CONFIG"
"""Environment variable naming the configuration file when `-c` is not given."""

CREDENTIAL_NAME = "gemini_api_key"
"""File name of the API key under `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`)."""


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad key or value."""


class _Section(BaseModel):
    # strict: `true`, `"5"` or `1` are not silently taken for a number, a string or a bool;
    # finite: `.inf` / `.nan` are bad values, not "no limit".
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ApiSettings(_Section):
    key_file: Path | None = Field(default=None, strict=False)
    base_url: str | None = None
    api_version: str | None = None
    timeout_seconds: float = Field(default=120, gt=0)
    retries: int = Field(default=5, ge=1, le=20)


class PollSettings(_Section):
    initial_seconds: float = Field(default=10, gt=0)
    max_seconds: float = Field(default=600, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> PollSettings:
        if self.max_seconds < self.initial_seconds:
            raise ValueError(  # names its keys in full: see _describe
                f"'poll.max_seconds': must be >= poll.initial_seconds ({self.initial_seconds:g})"
                f" (got {self.max_seconds:g})"
            )
        return self


class Limits(_Section):
    max_active_jobs: int = Field(default=100, ge=1)
    inline_max_bytes: int = Field(default=19_000_000, ge=1)
    max_file_bytes: int = Field(default=2_000_000_000, ge=1)


class Config(_Section):
    """Every key of the contract, with its default; paths are absolute once loaded."""

    inbox: Path = Field(default=Path("inbox"), strict=False)
    outbox: Path = Field(default=Path("outbox"), strict=False)
    model: str = Field(default="gemini-2.5-flash", min_length=1)
    system_prompt: str | None = None
    system_prompt_file: Path | None = Field(default=None, strict=False)
    temperature: float = Field(default=0.2, ge=0, le=2)
    thinking_budget: int = Field(default=24576, ge=-1)
    filter_json: bool = False
    include_response: bool = False
    on_invalid_line: Literal["reject_file", "skip_line"] = "reject_file"
    archive: Literal["keep", "delete"] = "keep"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    expired_resubmits: int = Field(default=0, ge=0, le=10)
    api: ApiSettings = ApiSettings()
    poll: PollSettings = PollSettings()
    limits: Limits = Limits()
    inbox_settle_seconds: float = Field(default=2, ge=0)
    inbox_rescan_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _one_system_prompt(self) -> Config:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("'system_prompt' and 'system_prompt_file' are both set; set only one")
        return self

    def system_instruction(self) -> str | None:
        """The system prompt text, read from `system_prompt_file` when that is set."""
        if self.system_prompt_file is None:
            return self.system_prompt
        try:
            return self.system_prompt_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"system_prompt_file: cannot read {self.system_prompt_file}: {exc.strerror}"
            ) from exc

    @property
    def processing_dir(self) -> Path:
        return self.inbox / "processing"

    @property
    def done_dir(self) -> Path:
        return self.inbox / "done"

    @property
    def failed_dir(self) -> Path:
        return self.inbox / "failed"


def default_config_path(explicit: str | None = None) -> Path:
    """`-c` if given, else `$GEMINI_BATCHD_CONFIG`, else `./config.yaml`."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or "config.yaml")


def load_config(path: Path, *, must_exist: bool = True) -> Config:
    """Read and validate the YAML file; relative paths resolve against its folder."""
    raw: Any = {}
    if path.exists() or must_exist:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    base = path.resolve().parent
    return config.model_copy(
        update={
            "inbox": base / config.inbox,
            "outbox": base / config.outbox,
            "system_prompt_file": base / config.system_prompt_file
            if config.system_prompt_file
            else None,
            "api": config.api.model_copy(
                update={"key_file": base / config.api.key_file if config.api.key_file else None}
            ),
        }
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _describe(exc: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
            parts.append(str(err["ctx"]["error"]))  # our validators name their keys themselves
        else:
            value = (
                f" (got {err['input']!r})"
                if "input" in err and not isinstance(err["input"], dict)
                else ""
            )
            parts.append(f"'{key}': {err['msg']}{value}")
    return "; ".join(parts)


def resolve_api_key(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """`api.key_file`, else $GEMINI_API_KEY / $GOOGLE_API_KEY, else the systemd credential."""
    env = os.environ if environ is None else environ
    if config.api.key_file is not None:
        return _read_key(config.api.key_file)
    for name in ("GOOGLE_API_KEY", "GEMINI_API_KEY"):  # the SDK's own precedence
        if env.get(name):
            return env[name].strip()
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return _read_key(Path(creds) / CREDENTIAL_NAME, "$CREDENTIALS_DIRECTORY")
    return None


def _read_key(path: Path, what: str = "api.key_file") -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"{what}: {path} is empty")
    return key
