"""The `gemini-batchd` command line in-process (daemon.cli.main, output captured): validate,
submit, configuration errors of `run` (found before anything starts), help.

Commands whose point is the process boundary -- a traceback-free exit, a served port, a daemon
that runs -- are in tests/process/test_commands.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import cli

SUBCOMMANDS = ["run", "status", "validate", "submit", "retry", "cancel", "simulator"]


def write_config(folder: Path, **settings: Any) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def jsonl(path: Path, *lines: Any) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keyless(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """No API key anywhere in the environment (and `run` may reconfigure logging)."""
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder with a default config.yaml, made the current directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEMINI_BATCHD_CONFIG", raising=False)
    write_config(tmp_path)
    return tmp_path


# ---- validate ---------------------------------------------------------------------------------


def test_validate_good_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = jsonl(project / "good.jsonl", "a", ["b", "c"], {"key": "k", "prompt": "d"})
    size = path.stat().st_size
    code, out, _ = run_cli(capsys, "validate", "good.jsonl", "-c", "config.yaml")
    assert code == 0
    tokens = -(-len("a" + "b\nc" + "d") // 4)  # characters / 4 of the prompt texts
    assert out.splitlines() == [
        f"good.jsonl: ok: 3 request(s), ~{tokens} input tokens, {size} bytes, inline"
    ]
    assert not (project / "inbox").exists() or not any((project / "inbox").iterdir())


def test_validate_reports_file_api_for_big_payloads(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(project, limits={"inline_max_bytes": 10})
    jsonl(project / "big.jsonl", "a prompt longer than ten bytes")
    code, out, _ = run_cli(capsys, "validate", "big.jsonl")  # ./config.yaml by default
    assert code == 0
    assert out.strip().endswith("File API")


def test_validate_bad_lines(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl(project / "good.jsonl", "fine")
    bad = project / "bad.jsonl"
    bad.write_text('"ok"\n{oops\n\n42\n{"key": "a", "prompt": "x"}\n{"key": "a", "prompt": "y"}\n')
    code, out, _ = run_cli(capsys, "validate", "good.jsonl", "bad.jsonl", "-c", "config.yaml")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("good.jsonl: ok: 1 request(s)")
    assert lines[1].startswith("bad.jsonl: invalid:")
    located = [line for line in lines if line.startswith("bad.jsonl:") and line[10:11].isdigit()]
    assert [line.split(":")[1] for line in located] == ["2", "4", "6"]
    assert all(len(line.split(": ", 1)[1]) > 3 for line in located)  # each has a reason
    assert "duplicate key" in located[2]


@pytest.mark.parametrize(
    ("name", "setup", "expected"),
    [
        ("missing.jsonl", None, "no such file"),
        ("link.jsonl", "symlink", "symbolic link"),
        ("empty.jsonl", "empty", "no requests"),
        ("blank.jsonl", "blank", "no requests"),
        ("folder.jsonl", "folder", "not a regular file"),
    ],
)
def test_validate_unusable_files(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    setup: str | None,
    expected: str,
) -> None:
    path = project / name
    if setup == "symlink":
        jsonl(project / "target.jsonl", "a")
        path.symlink_to(project / "target.jsonl")
    elif setup == "empty":
        path.write_bytes(b"")
    elif setup == "blank":
        path.write_bytes(b"\n  \n\n")
    elif setup == "folder":
        path.mkdir()
    code, out, _ = run_cli(capsys, "validate", name, "-c", "config.yaml")
    assert code == 1
    assert out.startswith(f"{name}: invalid")
    assert expected in out


def test_validate_over_max_file_bytes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, limits={"max_file_bytes": 5})
    jsonl(project / "x.jsonl", "longer than five bytes")
    code, out, _ = run_cli(capsys, "validate", "x.jsonl")
    assert code == 1
    assert "max_file_bytes" in out


def test_validate_follows_skip_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, on_invalid_line="skip_line")
    path = project / "mixed.jsonl"
    path.write_text(
        '"one"\n{"prompt": "missing brace"\n"two"\n'
        '{"key": "t", "prompt": "x", "config": {"temperature": 5}}\n"three"\n'
    )
    code, out, _ = run_cli(capsys, "validate", "mixed.jsonl")
    assert code == 0
    first, *bad = out.splitlines()
    assert first.startswith("mixed.jsonl: ok: 3 request(s), 2 line(s) would be skipped, ~")
    assert bad == [
        "mixed.jsonl:2: not valid JSON: Expecting ',' delimiter at column 27"
        " (the end of the line: is a closing quote or bracket missing?)",
        "mixed.jsonl:4: 'config' field 'temperature': must be a number from 0 to 2 (got 5)",
    ]


def test_validate_under_skip_line_with_nothing_valid_is_invalid(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(project, on_invalid_line="skip_line")
    (project / "bad.jsonl").write_text("{oops\n42\n")
    code, out, _ = run_cli(capsys, "validate", "bad.jsonl")
    assert code == 1
    assert out.splitlines()[0].startswith("bad.jsonl: invalid: 0 valid request(s), 2 bad line(s)")
    assert [line.split(":")[1] for line in out.splitlines()[1:]] == ["1", "2"]


def test_validate_under_reject_file_rejects_a_file_with_any_bad_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "mixed.jsonl").write_text('"one"\n{"prompt": "x", "config": {"topK": 0}}\n')
    code, out, _ = run_cli(capsys, "validate", "mixed.jsonl")
    assert code == 1
    assert out.splitlines() == [
        f"mixed.jsonl: invalid: 1 valid request(s), 1 bad line(s), {(project / 'mixed.jsonl').stat().st_size} bytes",
        "mixed.jsonl:2: 'config' field 'topK': must be an integer >= 1 (got 0)",
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "only names ending in .jsonl are taken"),
        ("UP.JSONL", "only names ending in .jsonl (lower case) are taken: rename it UP.jsonl"),
        ("prompts.json", "rename it prompts.jsonl"),
        (".hidden.jsonl", "names starting with '.' are left alone"),
        ("n" * 240 + ".jsonl", "the name is 246 bytes long"),
    ],
)
def test_validate_says_which_names_the_daemon_ignores(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, reason: str
) -> None:
    jsonl(project / name, "a perfectly good prompt")
    code, out, _ = run_cli(capsys, "validate", name)
    assert code == 1
    assert out.startswith(f"{name}: invalid: ")
    assert reason in out
    assert out.rstrip().endswith("; the daemon would ignore this file")
    assert len(out.splitlines()) == 1


def test_validate_prices_the_estimated_input(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(
        project,
        model="gemini-2.5-pro",
        system_prompt="s" * 100,
        prices={"gemini-2.5-pro": {"input": 1.25, "output": 10.0}},
    )
    jsonl(project / "p.jsonl", *["x" * 300] * 1000)  # 1000 * 400 characters: 100,000 tokens
    code, out, _ = run_cli(capsys, "validate", "p.jsonl")
    assert code == 0
    assert "~100000 input tokens (~$0.0625 at gemini-2.5-pro batch price)" in out
    write_config(project, prices={"gemini-2.5-pro": {"input": 1.25, "output": 10.0}})
    code, out, _ = run_cli(capsys, "validate", "p.jsonl")  # another model: tokens only
    assert code == 0
    assert "~75000 input tokens, " in out and "$" not in out


def test_validate_prices_large_inputs_in_cents(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(project, prices={"gemini-2.5-flash": {"input": 0.3, "output": 2.5}})
    jsonl(project / "p.jsonl", *["y" * 4000] * 10_000)  # 10 million tokens
    code, out, _ = run_cli(capsys, "validate", "p.jsonl")
    assert code == 0
    assert "~10000000 input tokens (~$1.50 at gemini-2.5-flash batch price)" in out


# ---- submit ---------------------------------------------------------------------------------------


def test_submit_copies_atomically(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = jsonl(project / "job.jsonl", "a", "b")
    inbox = project / "inbox"
    seen_during_copy: list[list[str]] = []
    real_copyfile = shutil.copyfile

    def spying_copyfile(src: Any, dst: Any) -> Any:
        result = real_copyfile(src, dst)
        seen_during_copy.append(sorted(p.name for p in inbox.iterdir()))
        return result

    monkeypatch.setattr(shutil, "copyfile", spying_copyfile)  # the module cli uses
    code, out, _ = run_cli(capsys, "submit", "job.jsonl", "-c", "config.yaml")
    assert code == 0
    assert (inbox / "job.jsonl").read_bytes() == source.read_bytes()
    assert out.strip() == str(inbox / "job.jsonl")
    (during,) = seen_during_copy
    assert during and all(name.startswith(".") for name in during)  # only a dot-name meanwhile
    assert sorted(p.name for p in inbox.iterdir()) == ["job.jsonl"]  # no temp left
    assert source.exists()  # a copy, not a move


def test_submit_never_overwrites(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = project / "inbox"
    inbox.mkdir()
    jsonl(inbox / "job.jsonl", "already there")
    jsonl(project / "job.jsonl", "new")
    code, out, _ = run_cli(capsys, "submit", "job.jsonl", "-c", "config.yaml")
    assert code == 0
    assert (inbox / "job.jsonl").read_text() == '"already there"\n'
    assert (inbox / "job-2.jsonl").read_text() == '"new"\n'
    assert out.strip() == str(inbox / "job-2.jsonl")


@pytest.mark.parametrize("name", ["notes.txt", ".hidden.jsonl", "missing.jsonl"])
def test_submit_rejects(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    jsonl(project / "ok.jsonl", "a")
    if name != "missing.jsonl":
        jsonl(project / name, "a")
    code, _, err = run_cli(capsys, "submit", "ok.jsonl", name, "-c", "config.yaml")
    assert code == 2
    assert err.startswith("gemini-batchd: ") and name in err
    assert len(err.strip().splitlines()) == 1
    inbox = project / "inbox"
    assert not inbox.exists() or list(inbox.iterdir()) == []  # nothing copied, not even ok.jsonl


def test_submit_into_configured_inbox(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = project / "elsewhere"
    other.mkdir()
    config = write_config(other, inbox="spool/in")
    jsonl(project / "x.jsonl", "a")
    code, _, _ = run_cli(capsys, "submit", "x.jsonl", "-c", str(config))
    assert code == 0
    assert (other / "spool" / "in" / "x.jsonl").exists()


def test_config_from_environment(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = project / "env"
    other.mkdir()
    monkeypatch.setenv("GEMINI_BATCHD_CONFIG", str(write_config(other, inbox="in")))
    jsonl(project / "x.jsonl", "a")
    assert run_cli(capsys, "submit", "x.jsonl")[0] == 0
    assert (other / "in" / "x.jsonl").exists()


# ---- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"colour": "red"}, "colour"),
        ({"poll": {"initial_secs": 1}}, "poll.initial_secs"),
        ({"temperature": "hot"}, "temperature"),
        ({"limits": {"max_active_jobs": 0}}, "limits.max_active_jobs"),
        ({"on_invalid_line": "ignore"}, "on_invalid_line"),
        ({"archive": "shred"}, "archive"),
        ({"api": {"retries": "many"}}, "api.retries"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    project: Path, capsys: pytest.CaptureFixture[str], settings: dict[str, Any], key: str
) -> None:
    write_config(project, **settings)
    jsonl(project / "x.jsonl", "a")
    for args in (["status"], ["validate", "x.jsonl"], ["submit", "x.jsonl"]):
        code, out, err = run_cli(capsys, *args, "-c", "config.yaml")
        assert code == 2, args
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("gemini-batchd: ")
        assert key in err


def test_unreadable_configs(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "broken.yaml").write_text("inbox: [unclosed\n")
    (project / "list.yaml").write_text("- a\n- b\n")
    for name in ("broken.yaml", "list.yaml", "absent.yaml"):
        code, _, err = run_cli(capsys, "status", "-c", name)
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1, err
        assert name in err


def test_run_with_bad_config_or_no_key_exits_2(
    project: Path, capsys: pytest.CaptureFixture[str], keyless: None
) -> None:
    write_config(project, poll={"jitter": 5})
    code, _, err = run_cli(capsys, "run", "--once", "-c", "config.yaml")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "poll.jitter" in err

    write_config(project)
    code, _, err = run_cli(capsys, "run", "--once")
    assert code == 2
    assert "API key" in err.strip().splitlines()[-1]


def test_missing_system_prompt_file_exits_2(
    project: Path, capsys: pytest.CaptureFixture[str], keyless: None
) -> None:
    write_config(project, system_prompt_file="nope.md")
    code, _, err = run_cli(capsys, "run", "--once", "--simulate")
    assert code == 2
    assert "system_prompt_file" in err.strip().splitlines()[-1]


def test_run_lists_every_configuration_problem_at_once(
    project: Path, capsys: pytest.CaptureFixture[str], keyless: None
) -> None:
    """Without --simulate a missing key does not hide a missing system_prompt_file; a bad inbox
    names its key and the configuration file."""
    (project / "blocker").write_text("a file where the outbox should be\n")
    write_config(project, inbox="/proc/nope", outbox="blocker", system_prompt_file="nope.md")
    code, _, err = run_cli(capsys, "run", "--once")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"gemini-batchd: {project / 'config.yaml'}: 'inbox': cannot create /proc/nope: "
    )
    for fragment in (
        f"'outbox': {project / 'blocker'} is not a folder",
        f"'system_prompt_file': cannot read {project / 'nope.md'}",
        "; no API key: ",
    ):
        assert fragment in last, last


def test_run_checks_the_configuration_before_starting_the_simulator(
    project: Path, capsys: pytest.CaptureFixture[str], keyless: None
) -> None:
    write_config(project, outbox="/proc/nope/out")
    code, _, err = run_cli(capsys, "run", "--once", "--simulate")
    assert code == 2
    assert "simulator started" not in err
    assert "'outbox': cannot create /proc/nope/out" in err.strip().splitlines()[-1]


def test_run_names_an_unreadable_key_file_with_other_problems(
    project: Path, capsys: pytest.CaptureFixture[str], keyless: None
) -> None:
    write_config(project, system_prompt_file="nope.md", api={"key_file": "absent-key"})
    code, _, err = run_cli(capsys, "run", "--once")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "'system_prompt_file'" in last and "'api.key_file': cannot read" in last


def test_cancel_unknown_target(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "cancel", "nothing.jsonl", "-c", "config.yaml")
    assert code == 2
    assert "nothing.jsonl" in err


# ---- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gemini-batchd{'' if command is None else ' ' + command}")
    if command is None:
        for sub in SUBCOMMANDS:
            assert sub in out
    elif command not in ("simulator",):
        assert "--config" in out


def test_every_option_and_argument_has_help() -> None:
    parser = cli.parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    assert sub.choices is not None
    assert set(sub.choices) >= set(SUBCOMMANDS)
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


def test_names_too_long_for_the_daemon(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "n" * 240 + ".jsonl"
    jsonl(project / name, "a")
    code, out, _ = run_cli(capsys, "validate", name, "-c", "config.yaml")
    assert code == 1
    assert out.startswith(f"{name}: invalid: the name is 246 bytes long")
    code, _, err = run_cli(capsys, "submit", name, "-c", "config.yaml")
    assert code == 2
    assert "246 bytes long" in err
    assert not (project / "inbox" / name).exists()


def test_file_system_errors_are_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "blocker").write_text("a file where the inbox should be\n")
    write_config(project, inbox="blocker")
    jsonl(project / "x.jsonl", "a")
    code, out, err = run_cli(capsys, "submit", "x.jsonl", "-c", "config.yaml")
    assert code == 2
    assert out == ""
    assert err.strip() == f"gemini-batchd: {project / 'blocker'}: File exists"


# ---- where the configuration comes from -----------------------------------------------------


def test_submit_without_a_configuration_is_refused_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEMINI_BATCHD_CONFIG", raising=False)
    source = jsonl(tmp_path / "p.jsonl", "a")
    code, out, err = run_cli(capsys, "submit", str(source))
    assert (code, out) == (2, "")
    assert "submit: no configuration" in err and "-c CONFIG" in err
    assert not (tmp_path / "inbox").exists()


def test_the_configuration_option_may_come_before_the_command(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = project / "other"
    other.mkdir()
    write_config(other, inbox="in", outbox="out")
    code, out, _ = run_cli(capsys, "-c", str(other / "config.yaml"), "status", "--json")
    assert code == 0 and json.loads(out)["inbox"] == str(other / "in")
    # given after the command too, the command's own wins
    code, out, _ = run_cli(
        capsys, "-c", "nowhere.yaml", "status", "--json", "-c", str(other / "config.yaml")
    )
    assert code == 0 and json.loads(out)["inbox"] == str(other / "in")


# ---- cancel goes through the daemon that owns the file --------------------------------------


def test_cancel_of_a_file_needs_no_key_and_says_when_no_daemon_runs(
    project: Path, keyless: None, capsys: pytest.CaptureFixture[str]
) -> None:
    processing = project / "inbox" / "processing"
    processing.mkdir(parents=True)
    (processing / "a.jsonl").write_text('"x"\n')
    record = {
        "input": "a.jsonl",
        "state": "RUNNING",
        "jobs": [{"index": 1, "state": "RUNNING", "job_name": "batches/abc"}],
    }
    (processing / "a.jsonl.job.json").write_text(json.dumps(record))
    code, out, err = run_cli(capsys, "cancel", "a.jsonl")
    assert code == 0, err
    assert out == "a.jsonl: cancel requested: the daemon cancels its job(s) batches/abc\n"
    assert "no daemon is running" in err and "when one starts" in err
    assert (processing / ".cancel" / "a.jsonl").exists()


# ---- status with no daemon --------------------------------------------------------------------


def test_status_says_plainly_that_nothing_polls_files_in_flight_without_a_daemon(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processing = project / "inbox" / "processing"
    processing.mkdir(parents=True)
    record = {
        "input": "a.jsonl",
        "state": "RUNNING",
        "job_name": "batches/abc",
        "next_poll_at": "2020-01-01T00:00:00Z",
        "jobs": [{"index": 1, "state": "RUNNING", "job_name": "batches/abc"}],
    }
    (processing / "a.jsonl.job.json").write_text(json.dumps(record))
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert "NOT RUNNING: 1 file(s) queued or in flight, and nothing polls" in out
    row = next(line for line in out.splitlines() if line.startswith("a.jsonl"))
    assert "(no daemon)" in row and "due" not in row
