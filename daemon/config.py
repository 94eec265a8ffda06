"""Configuration: one YAML file, validated into typed settings with the contract's defaults."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from .errors import ConfigError

CONFIG_ENV = "GEMINI_BATCHD_CONFIG"
"""Environment variable naming the configuration file when `-c` is not given."""

CREDENTIAL_NAME = "gemini_api_key"
"""File name of the API key under `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`)."""


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
    lookup_grace_seconds: float = Field(default=120, ge=0)
    backoff_initial_seconds: float = Field(default=5, gt=0)
    backoff_max_seconds: float = Field(default=300, gt=0)
    probe_seconds: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _backoff_max_not_below_initial(self) -> ApiSettings:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError(  # names its keys in full: see _describe
                "'api.backoff_max_seconds': must be >= api.backoff_initial_seconds"
                f" ({self.backoff_initial_seconds:g}) (got {self.backoff_max_seconds:g})"
            )
        return self


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


MAX_FILE_BYTES = 100_000_000_000
"""Default of `limits.max_file_bytes`. Inputs are streamed and split into jobs of at most
`limits.max_job_bytes`, so size costs disk and time, not memory: 100 GB (about 50 jobs of
2 GB) takes a 10 GB input with room to spare and still refuses a runaway writer's file."""


INLINE_MAX_BYTES = 2_000_000
INLINE_MAX_REQUESTS = 1_000
"""Defaults of `limits.inline_max_bytes` and `limits.inline_max_requests`. An inline job's
requests go out in one create call and its answers come back in one reply, both held in
memory (about 4 MiB per MB of requests, and ~16 KiB per answer of ~3 KB); the File API
streams both through files. Measured (bench/bench_rss.py), 15 MB inline peaks at ~280 MiB,
so the API's own 20 MB limit is far above what keeps the daemon under 150 MiB."""


class Limits(_Section):
    max_active_jobs: int = Field(default=100, ge=1)
    inline_max_bytes: int = Field(default=INLINE_MAX_BYTES, ge=1)
    inline_max_requests: int = Field(default=INLINE_MAX_REQUESTS, ge=1)
    max_file_bytes: int = Field(default=MAX_FILE_BYTES, ge=1)
    max_job_bytes: int = Field(default=1_990_000_000, ge=1)
    max_requests_per_job: int | None = Field(default=None, ge=1)
    max_enqueued_tokens: int | None = Field(default=None, ge=1)
    max_quota_wait_seconds: float = Field(default=86400, gt=0)


class ModelPrice(_Section):
    """USD per million tokens of one model at the standard (interactive) price."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)  # thinking tokens are billed as output
    cached: float | None = Field(default=None, ge=0)  # None: priced as input (an upper bound)
    batch_discount: float = Field(default=0.5, ge=0, le=1)

    def batch_cost(
        self,
        *,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        thinking_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> float:
        """USD at batch price; `prompt_tokens` includes `cached_tokens`, as in usageMetadata.

        Cached tokens get no batch discount: Google prices them in a batch as outside one
        (and on Vertex AI the cache discount takes precedence over the batch discount)."""
        cached_price = self.input if self.cached is None else self.cached
        discounted = (
            max(prompt_tokens - cached_tokens, 0) * self.input
            + (output_tokens + thinking_tokens) * self.output
        ) * (1 - self.batch_discount)
        return (discounted + cached_tokens * cached_price) / 1_000_000


STAGING_URI = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?")
"""`gs://BUCKET` or `gs://BUCKET/PREFIX`: where Vertex AI's inputs and predictions are staged."""


class VertexSettings(_Section):
    """Vertex AI batch prediction (`backend: vertex`): a Google Cloud project, its location,
    a Cloud Storage folder for inputs and predictions, and a service account."""

    project: str | None = Field(default=None, min_length=1)
    location: str = Field(default="us-central1", pattern=r"^[a-z][a-z0-9-]*$")
    staging_uri: str | None = None
    credentials_file: Path | None = Field(default=None, strict=False)
    keep_staged: bool = False

    @model_validator(mode="after")
    def _staging_uri_is_a_folder_of_a_bucket(self) -> VertexSettings:
        uri = self.staging_uri
        if uri is not None and (STAGING_URI.fullmatch(uri) is None or "//" in uri[5:]):
            raise ValueError(  # names its key in full: see _describe
                f"'vertex.staging_uri': must be gs://BUCKET or gs://BUCKET/PREFIX (got {uri!r})"
            )
        return self

    @property
    def bucket(self) -> str:
        """The staging bucket's name."""
        return self._parts()[0]

    @property
    def prefix(self) -> str:
        """The staging folder inside the bucket, without slashes at either end ('' for none)."""
        return self._parts()[1]

    def _parts(self) -> tuple[str, str]:
        match = STAGING_URI.fullmatch(self.staging_uri or "")
        if match is None:
            raise ValueError("vertex.staging_uri is not set")
        return match.group(1), (match.group(2) or "").strip("/")


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
    retry_requests: int = Field(default=2, ge=0, le=10)
    metrics_file: Path | None = Field(default=None, strict=False)
    prices: dict[str, ModelPrice] | None = None
    api: ApiSettings = ApiSettings()
    poll: PollSettings = PollSettings()
    limits: Limits = Limits()
    inbox_settle_seconds: float = Field(default=2, ge=0)
    inbox_rescan_seconds: float = Field(default=30, gt=0)
    backend: Literal["gemini", "vertex"] = "gemini"
    vertex: VertexSettings = VertexSettings()

    # Where the settings came from (set by load_config); not keys of the file.
    _source: Path | None = PrivateAttr(default=None)
    _looked_for: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _vertex_needs_a_project_and_a_bucket(self) -> Config:
        if self.backend == "vertex":
            missing = [
                f"'vertex.{key}': required with backend: vertex"
                for key in ("project", "staging_uri")
                if getattr(self.vertex, key) is None
            ]
            if missing:
                raise ValueError("; ".join(missing))  # names its keys in full: see _describe
        return self

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
                f"'system_prompt_file': cannot read {self.system_prompt_file}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError:
            raise ConfigError(
                f"'system_prompt_file': {self.system_prompt_file} is not UTF-8 text"
            ) from None

    @property
    def source(self) -> Path | None:
        """The configuration file these settings came from; None when only defaults apply."""
        return self._source

    def describe_source(self) -> str:
        """For the start-up log and `status`: the file, or why there is none."""
        if self._source is not None:
            return str(self._source)
        if self._looked_for is not None:
            return f"none: defaults ({self._looked_for} not found)"
        return "none: defaults"

    def cost_of(self, model: str | None, tokens: Mapping[str, int]) -> float | None:
        """USD at batch price of the tokens a file's results report (`usage` names), where
        `prices` has the model; None where it has not."""
        price = self.price(model) if model else None
        if price is None or not tokens:
            return None
        usd = price.batch_cost(
            prompt_tokens=tokens.get("prompt_tokens", 0),
            output_tokens=tokens.get("output_tokens", 0),
            thinking_tokens=tokens.get("thinking_tokens", 0),
            cached_tokens=tokens.get("cached_tokens", 0),
        )
        return round(usd, 6)

    def price(self, model: str | None = None) -> ModelPrice | None:
        """The configured price of `model` (default: the configured one; `models/` prefix or
        not), if any."""
        model = model or self.model
        if not self.prices:
            return None
        name = model.removeprefix("models/")
        return self.prices.get(name) or self.prices.get(f"models/{name}")


def default_config_path(explicit: str | None = None) -> Path:
    """`-c` if given, else `$GEMINI_BATCHD_CONFIG`, else `./config.yaml`."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or "config.yaml")


def load_config(path: Path, *, must_exist: bool = True) -> Config:
    """Read and validate the YAML file; relative paths resolve against its folder.

    Without `must_exist`, a missing file means the defaults; `Config.source` is then None so
    the caller can say so (a daemon started in the wrong folder is otherwise a silent trap).
    """
    raw: Any = {}
    found = path.exists() or must_exist
    if found:
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
    resolved = config.model_copy(
        update={
            "inbox": base / config.inbox,
            "outbox": base / config.outbox,
            "system_prompt_file": base / config.system_prompt_file
            if config.system_prompt_file
            else None,
            "metrics_file": base / config.metrics_file if config.metrics_file else None,
            "api": config.api.model_copy(
                update={"key_file": base / config.api.key_file if config.api.key_file else None}
            ),
            "vertex": config.vertex.model_copy(
                update={
                    "credentials_file": base / config.vertex.credentials_file
                    if config.vertex.credentials_file
                    else None
                }
            ),
        }
    )
    resolved._source = path.absolute() if found else None
    resolved._looked_for = path.absolute()
    return resolved


def check_paths(config: Config) -> list[str]:
    """Every problem with the folders and files the settings name, each naming its key.

    Creates the inbox and outbox where missing (the daemon needs them) and reports those it
    cannot create or write to, and a `system_prompt_file` or `metrics_file` it cannot use.
    """
    problems = [
        problem
        for key, folder in (("inbox", config.inbox), ("outbox", config.outbox))
        if (problem := _folder_problem(key, folder))
    ]
    if os.path.realpath(config.inbox) == os.path.realpath(config.outbox):
        problems.append("'outbox': is the inbox; results would be taken as new input")
    try:
        config.system_instruction()
    except ConfigError as exc:
        problems.extend(exc.problems)
    if config.metrics_file is not None:
        problem = _metrics_file_problem(config.metrics_file)
        if problem:
            problems.append(problem)
    return problems


def raise_problems(config: Config, problems: Iterable[str], *others: str) -> None:
    """Raise one ConfigError naming the configuration file and listing every problem.

    `others` are problems not of the file itself (e.g. no API key), listed after its own.
    """
    own = list(problems)
    if not own and not others:
        return
    where = str(config.source) if config.source is not None else "the default configuration"
    listed = [f"{where}: " + "; ".join(own)] if own else []
    raise ConfigError(*listed, *others)


def _folder_problem(key: str, folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"'{key}': {folder} is not a folder"
    except OSError as exc:
        return f"'{key}': cannot create {folder}: {exc.strerror or exc}"
    if not folder.is_dir():  # e.g. a link to a file: mkdir(exist_ok) does not always say
        return f"'{key}': {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"'{key}': cannot write to {folder}: {os.strerror(errno.EACCES)}"
    return None


def _metrics_file_problem(path: Path) -> str | None:
    if path.is_dir():
        return f"'metrics_file': {path} is a folder"
    folder = path.parent
    if not folder.is_dir():
        return f"'metrics_file': no folder {folder}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"'metrics_file': cannot write to {folder}: {os.strerror(errno.EACCES)}"
    return None


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


@dataclass(frozen=True)
class Credential:
    """What an engine authenticates with -- an API key (`gemini`) or Google credentials
    (`vertex`) -- and where it came from (for messages: the credential is never printed)."""

    value: Any = field(repr=False)
    source: str  # e.g. "$GEMINI_API_KEY", "api.key_file PATH", "vertex.credentials_file PATH"


def find_api_key(config: Config, environ: Mapping[str, str] | None = None) -> Credential | None:
    """`api.key_file`, else $GOOGLE_API_KEY / $GEMINI_API_KEY, else the systemd credential."""
    env = os.environ if environ is None else environ
    if config.api.key_file is not None:
        return Credential(_read_key(config.api.key_file), f"api.key_file {config.api.key_file}")
    for name in ("GOOGLE_API_KEY", "GEMINI_API_KEY"):  # the SDK's own precedence
        if env.get(name):
            return Credential(env[name].strip(), f"${name}")
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        path = Path(creds) / CREDENTIAL_NAME
        key = _read_key(path, "$CREDENTIALS_DIRECTORY")
        return Credential(key, f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} ({path})")
    return None


def _read_key(path: Path, what: str = "'api.key_file'") -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"{what}: {path} is empty")
    return key
