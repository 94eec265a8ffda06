"""daemon.config: defaults, path resolution, one-line errors naming the key, every problem at
once (paths included), where the settings came from, prices, API key lookup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from daemon.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    ModelPrice,
    check_paths,
    default_config_path,
    find_api_key,
    load_config,
    raise_problems,
)
from tests.support.harness import ROOT

CONTRACT_DEFAULTS = {
    "model": "gemini-2.5-flash",
    "system_prompt": None,
    "system_prompt_file": None,
    "temperature": 0.2,
    "thinking_budget": 24576,
    "filter_json": False,
    "include_response": False,
    "on_invalid_line": "reject_file",
    "archive": "keep",
    "log_level": "info",
    "expired_resubmits": 0,
    "retry_requests": 2,
    "metrics_file": None,
    "prices": None,
    "inbox_settle_seconds": 2,
    "inbox_rescan_seconds": 30,
    "backend": "gemini",
}
CONTRACT_VERTEX = {
    "project": None,
    "location": "us-central1",
    "staging_uri": None,
    "credentials_file": None,
    "keep_staged": False,
}
CONTRACT_API = {
    "key_file": None,
    "base_url": None,
    "api_version": None,
    "timeout_seconds": 120,
    "retries": 5,
    "lookup_grace_seconds": 120,
    "backoff_initial_seconds": 5,
    "backoff_max_seconds": 300,
    "probe_seconds": 60,
}
CONTRACT_POLL = {"initial_seconds": 10, "max_seconds": 600, "multiplier": 2.0, "jitter": 0.1}
CONTRACT_LIMITS = {
    "max_active_jobs": 100,
    # issue 12: chosen by measurement, so that an inline job stays under 150 MiB (see config.py)
    "inline_max_bytes": 2_000_000,
    "inline_max_requests": 1_000,
    "max_file_bytes": 100_000_000_000,  # issue 11: a 10 GB input is accepted (it is split)
    "max_job_bytes": 1_990_000_000,
    "max_requests_per_job": None,
    "max_enqueued_tokens": None,
    "max_quota_wait_seconds": 86400,
}


def key_of(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The key `find_api_key` finds, without where it came from."""
    found = find_api_key(config, environ)
    return found.value if found else None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def assert_contract_defaults(config: Config, folder: Path) -> None:
    for key, value in CONTRACT_DEFAULTS.items():
        assert getattr(config, key) == value, key
    for key, value in CONTRACT_API.items():
        assert getattr(config.api, key) == value, f"api.{key}"
    for key, value in CONTRACT_POLL.items():
        assert getattr(config.poll, key) == value, f"poll.{key}"
    for key, value in CONTRACT_LIMITS.items():
        assert getattr(config.limits, key) == value, f"limits.{key}"
    assert config.inbox == folder / "inbox"
    assert config.outbox == folder / "outbox"


def test_model_defaults_equal_the_contract() -> None:
    config = Config()
    assert_contract_defaults(config, Path())
    assert config.inbox == Path("inbox")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_yaml_file_gives_defaults(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert_contract_defaults(config, tmp_path.resolve())


def test_missing_file_allowed_when_not_required(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.yaml", must_exist=False)
    assert_contract_defaults(config, tmp_path.resolve())


def test_missing_file_is_an_error_when_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_config_yaml_equals_the_defaults() -> None:
    config = load_config(ROOT / "config.yaml")
    assert_contract_defaults(config, ROOT)


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _keys(field.annotation, f"{prefix}{name}.")
    return keys


def test_shipped_config_yaml_lists_every_key() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    listed = {k for k, v in raw.items()} | {
        f"{k}.{sub}" for k, v in raw.items() if isinstance(v, dict) for sub in v
    }
    assert listed == _keys(Config)


def test_every_default_is_in_the_tests_tables() -> None:
    """A new key gets its default pinned here (and in config.yaml, checked above)."""
    tables = (
        set(CONTRACT_DEFAULTS)
        | {"inbox", "outbox", "api", "poll", "limits"}
        | {f"api.{k}" for k in CONTRACT_API}
        | {f"poll.{k}" for k in CONTRACT_POLL}
        | {f"limits.{k}" for k in CONTRACT_LIMITS}
        | {"vertex"}
        | {f"vertex.{k}" for k in CONTRACT_VERTEX}
    )
    assert tables == _keys(Config)


def test_every_contract_key_is_accepted(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            **{k: v for k, v in CONTRACT_DEFAULTS.items() if k != "system_prompt_file"},
            "inbox": "in",
            "outbox": "out",
            "api": CONTRACT_API,
            "poll": CONTRACT_POLL,
            "limits": CONTRACT_LIMITS,
            "vertex": CONTRACT_VERTEX,
        }
    )
    config = load_config(write(tmp_path, text))
    assert config.inbox == tmp_path.resolve() / "in"


def test_values_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "model: gemini-2.5-pro\ntemperature: 1\nfilter_json: true\n"
            "poll:\n  initial_seconds: 0.05\n  max_seconds: 0.3\n  jitter: 0\n"
            "api:\n  base_url: http://127.0.0.1:9\n  retries: 1\n",
        )
    )
    assert config.model == "gemini-2.5-pro"
    assert config.temperature == 1.0
    assert config.filter_json is True
    assert config.poll.initial_seconds == 0.05
    assert config.poll.jitter == 0
    assert config.api.base_url == "http://127.0.0.1:9"
    assert config.api.retries == 1
    assert config.poll.multiplier == 2.0  # untouched keys of a section keep their defaults


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        folder,
        "inbox: spool/in\noutbox: ../out\nsystem_prompt_file: prompt.md\n"
        "api:\n  key_file: secrets/key\n",
    )
    config = load_config(path)
    base = folder.resolve()
    assert config.inbox == base / "spool/in"
    assert config.outbox.resolve() == (tmp_path / "out").resolve()
    assert config.system_prompt_file == base / "prompt.md"
    assert config.api.key_file == base / "secrets/key"


def test_relative_config_path_resolves_from_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "inbox: x\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("config.yaml"))
    assert config.inbox == tmp_path.resolve() / "x"
    assert config.inbox.is_absolute()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"inbox: {tmp_path / 'abs'}\n"))
    assert config.inbox == tmp_path / "abs"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus: 1\n", "bogus"),
        ("poll:\n  bogus: 1\n", "poll.bogus"),
        ("api:\n  apikey: x\n", "api.apikey"),
        ("limits:\n  max_jobs: 3\n", "limits.max_jobs"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = error_of(tmp_path, text)
    assert f"unknown key '{key}'" in message
    assert str(tmp_path) in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll:\n  jitter: 2\n", "poll.jitter"),
        ("poll:\n  jitter: -0.1\n", "poll.jitter"),
        ("poll:\n  jitter: abc\n", "poll.jitter"),
        ("poll:\n  initial_seconds: 0\n", "poll.initial_seconds"),
        ("poll:\n  multiplier: 0.5\n", "poll.multiplier"),
        ("poll:\n  max_seconds: .inf\n", "poll.max_seconds"),
        ("poll:\n  initial_seconds: 10\n  max_seconds: 5\n", "poll.max_seconds"),
        ("poll:\n  initial_seconds: 1000\n", "poll.max_seconds"),
        ("poll: 3\n", "poll"),
        ("temperature: 3\n", "temperature"),
        ("temperature: .nan\n", "temperature"),
        ("temperature: true\n", "temperature"),
        ("thinking_budget: -2\n", "thinking_budget"),
        ("thinking_budget: 1.5\n", "thinking_budget"),
        ("filter_json: 'yes'\n", "filter_json"),
        ("include_response: 1\n", "include_response"),
        ("on_invalid_line: skip\n", "on_invalid_line"),
        ("archive: move\n", "archive"),
        ("log_level: INFO\n", "log_level"),
        ("model: ''\n", "model"),
        ("model: 5\n", "model"),
        ("inbox: null\n", "inbox"),
        ("inbox: [a]\n", "inbox"),
        ("api:\n  retries: 0\n", "api.retries"),
        ("api:\n  retries: 1.5\n", "api.retries"),
        ("api:\n  timeout_seconds: '5'\n", "api.timeout_seconds"),
        ("api:\n  timeout_seconds: .inf\n", "api.timeout_seconds"),
        ("limits:\n  max_active_jobs: 0\n", "limits.max_active_jobs"),
        ("inbox_settle_seconds: -1\n", "inbox_settle_seconds"),
        ("inbox_rescan_seconds: 0\n", "inbox_rescan_seconds"),
        ("retry_requests: -1\n", "retry_requests"),
        ("retry_requests: 11\n", "retry_requests"),
        ("retry_requests: 1.5\n", "retry_requests"),
        ("retry_requests: true\n", "retry_requests"),
        ("metrics_file: [a]\n", "metrics_file"),
        ("metrics_file: 5\n", "metrics_file"),
        ("prices: 3\n", "prices"),
        ("prices: [a]\n", "prices"),
        ("prices:\n  m: 1\n", "prices.m"),
        ("prices:\n  m: {input: 1}\n", "prices.m.output"),
        ("prices:\n  m: {input: -1, output: 1}\n", "prices.m.input"),
        ("prices:\n  m: {input: 1, output: '2'}\n", "prices.m.output"),
        ("prices:\n  m: {input: 1, output: 2, cached: -0.1}\n", "prices.m.cached"),
        ("prices:\n  m: {input: 1, output: 2, batch_discount: 1.5}\n", "prices.m.batch_discount"),
        ("prices:\n  m: {input: 1, output: 2, discount: 0.5}\n", "prices.m.discount"),
        ("prices:\n  m: {input: .inf, output: 2}\n", "prices.m.input"),
        ("limits:\n  max_job_bytes: 0\n", "limits.max_job_bytes"),
        ("limits:\n  max_job_bytes: 1.5e9\n", "limits.max_job_bytes"),
        ("limits:\n  max_requests_per_job: 0\n", "limits.max_requests_per_job"),
        ("limits:\n  inline_max_requests: 0\n", "limits.inline_max_requests"),
        ("limits:\n  max_requests_per_job: many\n", "limits.max_requests_per_job"),
        ("limits:\n  max_enqueued_tokens: 0\n", "limits.max_enqueued_tokens"),
        ("limits:\n  max_enqueued_tokens: 1.5\n", "limits.max_enqueued_tokens"),
        ("limits:\n  max_file_bytes: 0\n", "limits.max_file_bytes"),
        ("api:\n  lookup_grace_seconds: -1\n", "api.lookup_grace_seconds"),
        ("api:\n  lookup_grace_seconds: soon\n", "api.lookup_grace_seconds"),
        ("api:\n  backoff_initial_seconds: 0\n", "api.backoff_initial_seconds"),
        ("api:\n  backoff_max_seconds: -5\n", "api.backoff_max_seconds"),
        (
            "api:\n  backoff_initial_seconds: 10\n  backoff_max_seconds: 5\n",
            "api.backoff_max_seconds",
        ),
        ("api:\n  backoff_initial_seconds: 600\n", "api.backoff_max_seconds"),
        ("expired_resubmits: 11\n", "expired_resubmits"),
    ],
)
def test_bad_value_is_a_one_line_error_naming_the_dotted_key(
    tmp_path: Path, text: str, key: str
) -> None:
    message = error_of(tmp_path, text)
    assert f"'{key}'" in message


def test_several_problems_are_all_named_on_one_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "poll:\n  jitter: 2\nbogus: 1\ntemperature: x\n")
    assert "'poll.jitter'" in message
    assert "'bogus'" in message
    assert "'temperature'" in message


def test_system_prompt_and_file_together_is_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "system_prompt: be brief\nsystem_prompt_file: p.md\n")
    assert "system_prompt" in message
    assert "system_prompt_file" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "mapping" in error_of(tmp_path, "just a string\n")


def test_invalid_yaml_is_a_one_line_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "inbox: [\n")
    assert "not valid YAML" in message
    assert "line" in message


def test_system_instruction_text_or_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "system_prompt: be brief\n")).system_instruction() == (
        "be brief"
    )
    (tmp_path / "prompt.md").write_text("from a file\n")
    config = load_config(write(tmp_path, "system_prompt_file: prompt.md\n"))
    assert config.system_instruction() == "from a file\n"
    assert load_config(write(tmp_path, "")).system_instruction() is None


def test_unreadable_system_prompt_file_names_the_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "system_prompt_file: absent.md\n"))
    with pytest.raises(ConfigError, match="system_prompt_file"):
        config.system_instruction()


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert default_config_path() == Path("config.yaml")
    monkeypatch.setenv(CONFIG_ENV, "/etc/gemini-batchd.yaml")
    assert default_config_path() == Path("/etc/gemini-batchd.yaml")
    assert default_config_path("mine.yaml") == Path("mine.yaml")


# ---- API key -------------------------------------------------------------------------------


def key_config(tmp_path: Path, key_file: str | None = None) -> Config:
    text = f"api:\n  key_file: {key_file}\n" if key_file else ""
    return load_config(write(tmp_path, text))


def creds_dir(tmp_path: Path, key: str = "from-credentials\n") -> str:
    folder = tmp_path / "creds"
    folder.mkdir(exist_ok=True)
    (folder / "gemini_api_key").write_text(key)
    return str(folder)


def test_key_file_wins_over_everything(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    env = {
        "GOOGLE_API_KEY": "google",
        "GEMINI_API_KEY": "gemini",
        "CREDENTIALS_DIRECTORY": creds_dir(tmp_path),
    }
    assert key_of(key_config(tmp_path, "key"), env) == "from-file"


def test_google_key_wins_over_gemini_key(tmp_path: Path) -> None:
    env = {
        "GOOGLE_API_KEY": "google\n",
        "GEMINI_API_KEY": "gemini",
        "CREDENTIALS_DIRECTORY": creds_dir(tmp_path),
    }
    assert key_of(key_config(tmp_path), env) == "google"


def test_gemini_key_wins_over_credentials(tmp_path: Path) -> None:
    env = {"GEMINI_API_KEY": "gemini", "CREDENTIALS_DIRECTORY": creds_dir(tmp_path)}
    assert key_of(key_config(tmp_path), env) == "gemini"


def test_empty_env_variable_is_skipped(tmp_path: Path) -> None:
    env = {"GOOGLE_API_KEY": "", "GEMINI_API_KEY": "gemini"}
    assert key_of(key_config(tmp_path), env) == "gemini"


def test_credentials_directory_key_trailing_newline_stripped(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": creds_dir(tmp_path, "secret-key\n")}
    assert key_of(key_config(tmp_path), env) == "secret-key"


def test_no_key_anywhere_is_none(tmp_path: Path) -> None:
    assert key_of(key_config(tmp_path), {}) is None
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "no-such-folder")}
    assert key_of(key_config(tmp_path), env) is None


def test_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "from-environ")
    assert key_of(key_config(tmp_path)) == "from-environ"


def test_missing_or_empty_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.key_file"):
        key_of(key_config(tmp_path, "absent"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        key_of(key_config(tmp_path, "empty"), {})


def test_empty_credential_file_is_an_error_naming_it(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": creds_dir(tmp_path, "\n")}
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        key_of(key_config(tmp_path), env)


# ---- new keys: values ------------------------------------------------------------------------


def test_new_keys_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "retry_requests: 0\nmetrics_file: metrics/gemini.prom\n"
            "limits:\n  max_job_bytes: 1000\n  max_requests_per_job: 10\n"
            "  max_enqueued_tokens: 5000\n  max_file_bytes: 10000000000\n"
            "api:\n  lookup_grace_seconds: 0.2\n  backoff_initial_seconds: 0.05\n"
            "  backoff_max_seconds: 0.05\n",
        )
    )
    assert config.retry_requests == 0
    assert config.metrics_file == tmp_path.resolve() / "metrics/gemini.prom"
    assert config.limits.max_job_bytes == 1000
    assert config.limits.max_requests_per_job == 10
    assert config.limits.max_enqueued_tokens == 5000
    assert config.limits.max_file_bytes == 10_000_000_000
    assert config.api.lookup_grace_seconds == 0.2
    assert config.api.backoff_initial_seconds == config.api.backoff_max_seconds == 0.05


def test_a_10_gb_input_is_within_the_default_limit() -> None:
    assert Config().limits.max_file_bytes >= 10 * 1024**3


def test_absolute_metrics_file_is_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"metrics_file: {tmp_path / 'x.prom'}\n"))
    assert config.metrics_file == tmp_path / "x.prom"


def test_prices(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "model: models/gemini-2.5-flash\n"
            "prices:\n"
            "  gemini-2.5-flash: {input: 0.30, output: 2.5, cached: 0.03}\n"
            "  gemini-2.5-pro: {input: 1, output: 10, batch_discount: 0}\n",
        )
    )
    assert config.prices is not None
    flash = config.prices["gemini-2.5-flash"]
    assert flash == ModelPrice(input=0.3, output=2.5, cached=0.03, batch_discount=0.5)
    assert config.price() == flash  # the `models/` prefix does not matter
    pro = config.prices["gemini-2.5-pro"]
    assert pro.cached is None and pro.batch_discount == 0
    assert config.model_copy(update={"model": "gemini-2.0"}).price() is None
    assert Config().price() is None


def test_batch_cost() -> None:
    price = ModelPrice(input=1.0, output=10.0, cached=0.25, batch_discount=0.5)
    assert price.batch_cost(prompt_tokens=1_000_000) == pytest.approx(0.5)
    assert price.batch_cost(output_tokens=100_000, thinking_tokens=100_000) == pytest.approx(1.0)
    # cached tokens are part of the prompt count, billed at the cached price: no batch discount
    assert price.batch_cost(prompt_tokens=1_000_000, cached_tokens=1_000_000) == pytest.approx(0.25)
    assert price.batch_cost(prompt_tokens=3_000_000, cached_tokens=1_000_000) == pytest.approx(1.25)
    no_cached_price = ModelPrice(input=1.0, output=10.0, batch_discount=0)
    assert no_cached_price.batch_cost(
        prompt_tokens=2_000_000, cached_tokens=1_000_000
    ) == pytest.approx(2.0)


def test_all_bad_new_keys_named_at_once(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        "retry_requests: -1\nlimits:\n  max_job_bytes: 0\napi:\n  lookup_grace_seconds: -1\n"
        "prices:\n  m: {input: 1}\n",
    )
    for key in ("retry_requests", "limits.max_job_bytes", "api.lookup_grace_seconds", "prices.m"):
        assert f"'{key}" in message, key


# ---- where the settings came from ------------------------------------------------------------


def test_source_is_the_file_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("config.yaml"))
    assert config.source == tmp_path / "config.yaml"
    assert config.source.is_absolute()
    assert config.describe_source() == str(tmp_path / "config.yaml")


def test_no_file_means_defaults_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("config.yaml"), must_exist=False)
    assert config.source is None
    assert config.describe_source() == f"none: defaults ({tmp_path / 'config.yaml'} not found)"
    assert Config().describe_source() == "none: defaults"


def test_source_survives_copies(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    copy = config.model_copy(update={"poll": config.poll.model_copy(update={"max_seconds": 2.0})})
    assert copy.source == config.source


# ---- every problem at once: paths and files --------------------------------------------------


def path_problems(tmp_path: Path, text: str) -> list[str]:
    return check_paths(load_config(write(tmp_path, text)))


def test_good_paths_have_no_problems_and_folders_are_created(tmp_path: Path) -> None:
    (tmp_path / "prompt.md").write_text("be brief")
    problems = path_problems(
        tmp_path,
        "inbox: a/in\noutbox: b/out\nsystem_prompt_file: prompt.md\nmetrics_file: m.prom\n",
    )
    assert problems == []
    assert (tmp_path / "a/in").is_dir() and (tmp_path / "b/out").is_dir()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("inbox: /proc/nope\n", "'inbox': cannot create /proc/nope: "),
        ("outbox: /proc/nope/deeper\n", "'outbox': cannot create /proc/nope/deeper: "),
        ("inbox: blocker\n", "'inbox': {tmp}/blocker is not a folder"),
        ("outbox: blocker/sub\n", "'outbox': cannot create {tmp}/blocker/sub: Not a directory"),
        ("inbox: spool\noutbox: spool/\n", "'outbox': is the inbox"),
        ("system_prompt_file: absent.md\n", "'system_prompt_file': cannot read {tmp}/absent.md"),
        ("system_prompt_file: latin1.md\n", "'system_prompt_file': {tmp}/latin1.md is not UTF-8"),
        ("system_prompt_file: .\n", "'system_prompt_file': cannot read"),
        ("metrics_file: nodir/m.prom\n", "'metrics_file': no folder {tmp}/nodir"),
        ("metrics_file: .\n", "'metrics_file': {tmp} is a folder"),
    ],
)
def test_path_problems_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    (tmp_path / "latin1.md").write_bytes(b"caf\xe9\n")
    [problem] = path_problems(tmp_path, text)
    assert problem.startswith(expected.format(tmp=tmp_path.resolve())), problem


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        if Path(path).name == "in":
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)  # the tests run as root: pretend
    [problem] = path_problems(tmp_path, "inbox: in\n")
    assert problem.startswith(f"'inbox': cannot write to {tmp_path.resolve() / 'in'}: ")


def test_all_path_problems_are_listed_together(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    config = load_config(
        write(tmp_path, "inbox: /proc/nope\noutbox: blocker\nsystem_prompt_file: absent.md\n")
    )
    problems = check_paths(config)
    assert [p.split(":")[0] for p in problems] == ["'inbox'", "'outbox'", "'system_prompt_file'"]
    with pytest.raises(ConfigError) as info:
        raise_problems(config, problems, "no API key: set api.key_file")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.yaml'}: 'inbox': cannot create /proc/nope: ")
    for fragment in ("'outbox'", "'system_prompt_file'", "; no API key"):
        assert fragment in message
    assert info.value.problems[-1] == "no API key: set api.key_file"


def test_raise_problems_without_problems_returns(tmp_path: Path) -> None:
    raise_problems(load_config(write(tmp_path, "")), [])


def test_raise_problems_under_defaults_says_so(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.yaml", must_exist=False)
    with pytest.raises(ConfigError, match=r"^the default configuration: 'inbox'"):
        raise_problems(config, ["'inbox': bad"])
    with pytest.raises(ConfigError, match=r"^no API key$"):
        raise_problems(config, [], "no API key")


# ---- backend: vertex --------------------------------------------------------------------------


def test_vertex_needs_a_project_and_a_staging_folder_naming_each_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, "backend: vertex\n")
    assert "'vertex.project': required with backend: vertex" in message
    assert "'vertex.staging_uri': required with backend: vertex" in message


@pytest.mark.parametrize(
    "uri", ["s3://bucket/x", "gs://", "gs:///x", "gs://B/x", "gs://bucket//x", "/local/path"]
)
def test_a_staging_uri_must_be_a_cloud_storage_folder(tmp_path: Path, uri: str) -> None:
    text = f"backend: vertex\nvertex:\n  project: p\n  staging_uri: '{uri}'\n"
    assert "'vertex.staging_uri': must be gs://BUCKET or gs://BUCKET/PREFIX" in error_of(
        tmp_path, text
    )


def test_vertex_settings_are_read(tmp_path: Path) -> None:
    text = (
        "backend: vertex\nvertex:\n  project: my-project\n  location: europe-west4\n"
        "  staging_uri: gs://my-bucket/batch/in/\n  credentials_file: sa.json\n"
        "  keep_staged: true\n"
    )
    config = load_config(write(tmp_path, text))
    vertex = config.vertex
    assert (vertex.project, vertex.location, vertex.keep_staged) == (
        "my-project",
        "europe-west4",
        True,
    )
    assert (vertex.bucket, vertex.prefix) == ("my-bucket", "batch/in")
    assert vertex.credentials_file == tmp_path.resolve() / "sa.json"


def test_unknown_vertex_keys_are_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, "vertex:\n  projekt: p\n  location: Europe\n")
    assert "unknown key 'vertex.projekt'" in message and "'vertex.location'" in message
