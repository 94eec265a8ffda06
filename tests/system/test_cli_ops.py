"""The operator commands' pieces in-process: retry names and times, key sources, summaries."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import cli
from daemon.cli import files, status
from daemon.config import find_api_key, load_config
from daemon.jobrecord import FileState, JobRecord, isotime

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"prices": {"gemini-2.5-flash": {"input": 1.0, "output": 2.0}}}))
    for folder in ("inbox/failed", "inbox/done", "inbox/processing", "outbox"):
        (tmp_path / folder).mkdir(parents=True)
    return path


def failed(root: Path, name: str, *, input_name: str | None = None, at: str = "") -> Path:
    path = root / "inbox" / "failed" / name
    path.write_text('"x"\n')
    record = JobRecord(input=input_name or name, state=FileState.FAILED)
    record.finished_at = at or isotime(NOW)
    (root / "inbox" / "failed" / (name + ".job.json")).write_bytes(record.to_json())
    return path


def test_parse_since() -> None:
    assert files.parse_since("2h", NOW) == datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    assert files.parse_since("90m", NOW) == datetime(2026, 12, 1, 10, 30, tzinfo=timezone.utc)
    assert files.parse_since("1d", NOW) == datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    assert files.parse_since("2026-12-01T09:15:00Z", NOW) == datetime(
        2026, 12, 1, 9, 15, tzinfo=timezone.utc
    )
    assert files.parse_since("2026-12-01T09:15:00z", NOW).tzinfo is not None
    local = files.parse_since("2026-12-01T09:15", NOW)
    assert local == datetime(2026, 12, 1, 9, 15).astimezone().astimezone(timezone.utc)
    with pytest.raises(cli.CommandError, match="neither an ISO time"):
        files.parse_since("yesterday", NOW)


def test_retry_takes_a_fresh_name_where_taken(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = config_path.parent
    failed(root, "a.jsonl")
    failed(root, "a-2.jsonl", input_name="a.jsonl", at="2026-12-01T11:00:00Z")
    (root / "inbox" / "a.jsonl").write_text('"waiting"\n')  # the name is taken in the inbox
    code = cli.main(["retry", "a.jsonl", "-c", str(config_path)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out == f"{root / 'inbox/failed/a.jsonl'} -> {root / 'inbox/a-2.jsonl'}\n"
    assert (root / "inbox" / "a.jsonl").read_text() == '"waiting"\n'
    assert not [p for p in (root / "inbox").iterdir() if p.name.startswith(".")]
    # failed/a-2.jsonl failed under the input name a.jsonl: that name finds it now
    code = cli.main(["retry", "a.jsonl", "-c", str(config_path)])
    out, _ = capsys.readouterr()
    assert code == 0 and out == f"{root / 'inbox/failed/a-2.jsonl'} -> {root / 'inbox/a-3.jsonl'}\n"
    assert not list((root / "inbox" / "failed").glob("*.jsonl"))


def test_retry_all_failed_since_and_messages(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = config_path.parent
    failed(root, "old.jsonl", at="2020-01-01T00:00:00Z")
    failed(root, "new.jsonl", at=isotime(datetime.now(timezone.utc)))
    (root / "inbox" / "processing" / "busy.jsonl").write_text('"x"\n')
    code = cli.main(["retry", "busy.jsonl", "--all-failed-since", "1h", "-c", str(config_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == f"{root / 'inbox/failed/new.jsonl'} -> {root / 'inbox/new.jsonl'}\n"
    assert (
        err
        == "gemini-batchd: retry: busy.jsonl is still being processed (in "
        + str(root / "inbox" / "processing")
        + ")\n"
    )
    assert cli.main(["retry", "-c", str(config_path)]) == 2
    assert "name a failed input" in capsys.readouterr().err


def test_find_api_key_says_where_the_key_came_from(tmp_path: Path) -> None:
    config = load_config(tmp_path / "none.yaml", must_exist=False)
    assert find_api_key(config, {}) is None
    found = find_api_key(config, {"GEMINI_API_KEY": "k1", "GOOGLE_API_KEY": "k2"})
    assert found is not None and (found.value, found.source) == ("k2", "$GOOGLE_API_KEY")
    assert "k2" not in repr(found)
    (tmp_path / "gemini_api_key").write_text("k3\n")
    found = find_api_key(config, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert found is not None and found.value == "k3"
    assert found.source.startswith("$CREDENTIALS_DIRECTORY/gemini_api_key (")


def test_summary_lines(config_path: Path) -> None:
    config = load_config(config_path)
    done = JobRecord(input="a.jsonl", state=FileState.DONE, model="gemini-2.5-flash")
    done.ok, done.errors, done.output = 3, 1, "/out/a.jsonl"
    done.tokens = {"prompt_tokens": 1_000_000, "output_tokens": 500_000, "total_tokens": 1_500_000}
    bad = JobRecord(input="b.jsonl", state=FileState.FAILED, report="/out/b.error.json")
    bad.error = {"stage": "validation", "message": "b.jsonl: 1 invalid line(s)"}
    assert status.outcome_line(done, config) == (
        "DONE a.jsonl: 3 ok, 1 errors, 1500000 tokens, ~$1.00 -> /out/a.jsonl"
    )
    assert status.outcome_line(bad, config) == (
        "FAILED b.jsonl: failed (validation): b.jsonl: 1 invalid line(s) -> /out/b.error.json"
    )
    assert status.totals_line([done, bad], config) == (
        "total: 2 files (1 done, 1 failed), 3 requests ok, 1 errors, 1500000 tokens, ~$1.00"
    )


def test_status_json_and_table_without_a_daemon(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = config_path.parent
    (root / "inbox" / "w.jsonl").write_text('"x"\n')
    assert cli.main(["status", "-c", str(config_path), "--json"]) == 0
    snap: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert snap["daemon"]["running"] is False and snap["config"] == str(config_path)
    assert [(r["input"], r["state"]) for r in snap["files"]] == [("w.jsonl", "WAITING")]
    assert cli.main(["status", "-c", str(config_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"daemon: not running (no daemon holds {root / 'inbox'})"
    assert lines[1] == f"config: {config_path}"
    assert (
        lines[2] == "files: 1 waiting, 0 queued, 0 active, 0 done, 0 failed (finished: last 24 h)"
    )
    assert lines[4].split() == [
        "FILE",
        "STATE",
        "JOB",
        "JOB",
        "STATE",
        "AGE",
        "POLLS",
        "NEXT",
        "POLL",
        "PROGRESS",
    ]
    assert cli.main(["status", "-c", str(config_path), "--watch", "--interval", "0"]) == 2
