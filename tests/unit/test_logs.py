"""Logging: JSON lines off a terminal, console lines on one, journald priorities, redaction
(tracebacks included), and library records in the same pipeline."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import logs
from tests.support.harness import TEST_API_KEY, FakeClock


@pytest.fixture(autouse=True)
def _restore(restore_logging: None) -> None:
    """logs.configure changes process-wide state: put it back for the other tests."""


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(stream)]


def test_json_lines_when_not_a_tty() -> None:
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream, environ={})
    logs.get().info("claimed", file="a.jsonl", requests=3)
    [event] = json_lines(stream)
    assert event["event"] == "claimed"
    assert event["file"] == "a.jsonl"
    assert event["requests"] == 3
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")


def test_console_lines_on_a_tty() -> None:
    stream = FakeStream(tty=True)
    logs.configure("info", stream=stream, environ={})
    logs.get().info("claimed", file="a.jsonl")
    [line] = lines(stream)
    assert "claimed" in line and "file=a.jsonl" in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_console_lines_on_a_real_pty() -> None:
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as stream:
            logs.configure("info", stream=stream, environ={})
            logs.get().warning("on a terminal", file="t.jsonl")
            stream.flush()
        output = os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "on a terminal" in output and "file=t.jsonl" in output
    assert not output.lstrip().startswith("{")


@pytest.fixture
def journal_file(tmp_path: Path) -> Iterator[io.TextIOWrapper]:
    """A real file standing in for the journal's stream socket."""
    with (tmp_path / "journal").open("w+") as stream:
        yield stream


def journal_env(stream: io.TextIOWrapper) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_priority_prefix_when_journal_stream_matches(
    journal_file: io.TextIOWrapper,
) -> None:
    logs.configure("debug", stream=journal_file, environ=journal_env(journal_file))
    log = logs.get()
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    journal_file.flush()
    journal_file.seek(0)
    written = journal_file.read().splitlines()
    assert [line[:3] for line in written] == ["<3>", "<4>", "<6>", "<7>"]
    assert [json.loads(line[3:])["event"] for line in written] == ["e", "w", "i", "d"]


@pytest.mark.parametrize("value", ["", "1:2", "garbage", "12", "1:2:3"])
def test_no_prefix_when_journal_stream_does_not_match(
    journal_file: io.TextIOWrapper, value: str
) -> None:
    logs.configure("info", stream=journal_file, environ={"JOURNAL_STREAM": value})
    logs.get().error("e")
    journal_file.flush()
    journal_file.seek(0)
    assert json.loads(journal_file.read())["event"] == "e"


def test_journal_stream_of_another_file_gives_no_prefix(
    journal_file: io.TextIOWrapper, tmp_path: Path
) -> None:
    with (tmp_path / "other").open("w") as other:
        env = journal_env(other)
    logs.configure("info", stream=journal_file, environ=env)
    logs.get().info("i")
    journal_file.flush()
    journal_file.seek(0)
    assert journal_file.read().startswith("{")


def test_stringio_with_journal_stream_set_gives_no_prefix() -> None:
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream, environ={"JOURNAL_STREAM": "1:2"})
    logs.get().info("i")
    assert lines(stream)[0].startswith("{")


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["d", "i", "w", "e"]),
        ("info", ["i", "w", "e"]),
        ("warning", ["w", "e"]),
        ("error", ["e"]),
    ],
)
def test_log_level_is_honoured(level: str, expected: list[str]) -> None:
    stream = FakeStream(tty=False)
    logs.configure(level, stream=stream, environ={})
    log = logs.get()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [e["event"] for e in json_lines(stream)] == expected


def test_library_records_share_the_json_pipeline() -> None:
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream, environ={})
    logging.getLogger("google_genai").warning("retrying %s", "batches/x")
    logging.getLogger("google_genai").info("chatty, dropped at info")
    logging.getLogger("some.library").error("plain stdlib")
    events = json_lines(stream)
    assert [e["event"] for e in events] == ["retrying batches/x", "plain stdlib"]
    assert events[0]["logger"] == "google_genai"
    assert events[0]["level"] == "warning"
    assert "timestamp" in events[0]


def test_library_info_records_appear_when_debugging() -> None:
    stream = FakeStream(tty=False)
    logs.configure("debug", stream=stream, environ={})
    logging.getLogger("httpx").info("HTTP Request: GET ...")
    assert [e["event"] for e in json_lines(stream)] == ["HTTP Request: GET ..."]


def test_secrets_are_redacted_everywhere() -> None:
    secret = "AIzaSECRET-value-123"
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream, environ={})
    logs.add_secret(secret)
    log = logs.get()
    log.info(f"event text {secret}", value=secret, nested={"a": [f"x{secret}y", {"b": secret}]})
    try:
        raise RuntimeError(f"request failed for key={secret}")
    except RuntimeError:
        log.exception("structlog exception")
        logging.getLogger("google_genai").error("library exception", exc_info=True)
    log.error("exc_info tuple", exc_info=(ValueError, ValueError(secret), None))
    logging.getLogger("google_genai").warning("args %s", secret)
    output = stream.getvalue()
    assert secret not in output
    events = json_lines(stream)
    assert events[0]["event"] == "event text [redacted]"
    assert events[0]["value"] == "[redacted]"
    assert events[0]["nested"] == {"a": ["x[redacted]y", {"b": "[redacted]"}]}
    assert "key=[redacted]" in events[1]["exception"]
    assert "RuntimeError" in events[2]["exception"]
    assert "ValueError: [redacted]" in events[3]["exception"]
    assert events[4]["event"] == "args [redacted]"


def test_redaction_also_on_the_console() -> None:
    stream = FakeStream(tty=True)
    logs.configure("info", stream=stream, environ={})
    logs.add_secret("s3cr3t-key")
    logs.get().info("x", value="s3cr3t-key")
    assert "s3cr3t-key" not in stream.getvalue()
    assert "[redacted]" in stream.getvalue()


def test_short_secret_does_not_mangle_other_text() -> None:
    """A short key (no real one is) is not searched for inside words: `ab` must not turn
    `cabbage` into `c[redacted]bage`; where it is a whole value or follows `key=`, it is hidden."""
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream, environ={})
    assert logs.add_secret("ab") is False
    log = logs.get()
    log.info("cabbage and kebab", file="ab.jsonl", value="ab", padded=" ab\n")
    log.warning(
        "GET https://host/v1beta/batches?key=ab&pageSize=1", headers={"x-goog-api-key": "ab"}
    )
    first, second = json_lines(stream)
    assert first["event"] == "cabbage and kebab"
    assert first["file"] == "ab.jsonl"
    assert first["value"] == first["padded"] == "[redacted]"
    assert second["event"] == "GET https://host/v1beta/batches?key=[redacted]&pageSize=1"
    assert second["headers"] == {"x-goog-api-key": "[redacted]"}


def test_secret_of_plausible_length_is_redacted_anywhere() -> None:
    secret = "k" * logs.MIN_SECRET_CHARS
    assert logs.add_secret(secret) is True
    assert logs.add_secret(secret) is True  # registering twice is harmless
    assert logs._secrets.count(secret) == 1
    assert logs.redact(f"x{secret}y") == "x[redacted]y"
    assert logs.add_secret(None) is False and logs.add_secret("") is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://h/v1/files/x:download?alt=media&key=SOMEKEY", "...&key=[redacted]"),
        ("https://h/v1/batches?key=SOMEKEY#frag", "...?key=[redacted]#frag"),
        ("{'x-goog-api-key': 'SOMEKEY', 'a': 1}", "{'x-goog-api-key': '[redacted]', 'a': 1}"),
        ("X-Goog-Api-Key: SOMEKEY\r\nHost: h", "X-Goog-Api-Key: [redacted]\r\nHost: h"),
        ('{"apiKey": "SOMEKEY"}', '{"apiKey": "[redacted]"}'),
        ("Client(api_key='SOMEKEY')", "Client(api_key='[redacted]')"),
        ("duplicate key 'a' (first used on line 2)", "duplicate key 'a' (first used on line 2)"),
        ("monkey=3&donkey=4", "monkey=3&donkey=4"),
        ("a key=value pair in prose", "a key=value pair in prose"),
    ],
)
def test_keys_in_key_contexts_are_redacted_whether_registered_or_not(
    text: str, expected: str
) -> None:
    result = logs.redact(text)
    assert "SOMEKEY" not in result
    if expected.startswith("..."):
        assert result.endswith(expected[3:]), result
    else:
        assert result == expected


def test_redact_with_explicit_secrets_follows_the_length_rule() -> None:
    assert logs.redact("cabbage", ["ab"]) == "cabbage"
    assert logs.redact("ab", ["ab"]) == "[redacted]"
    long_key = "AIza" + "x" * 35
    assert logs.redact(f"refused {long_key}!", [long_key]) == "refused [redacted]!"


def test_the_run_command_never_logs_the_key_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `run` logs at start names where settings come from, never the key (however short)."""
    from daemon import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("inbox: /proc/nope\n")
    monkeypatch.setenv("GEMINI_API_KEY", "k1")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    stream = FakeStream(tty=False)
    configure = logs.configure
    monkeypatch.setattr(logs, "configure", lambda level, **_: configure(level, stream, {}))
    assert cli.main(["run", "--once", "-c", "config.yaml"]) == 2
    assert "k1" not in stream.getvalue()
    assert [e["event"] for e in json_lines(stream)] == ["configuration"]


def test_logged_exception_text_is_redacted() -> None:
    """A traceback is formatted after the event's fields: its text must be redacted too."""
    stream = FakeStream(tty=False)
    logs.configure("info", stream=stream)
    logs.add_secret(TEST_API_KEY)
    try:
        raise RuntimeError(f"something echoed {TEST_API_KEY}")
    except RuntimeError:
        logs.get().exception("unexpected error; will retry")
        logging.getLogger("google_genai").exception("library failure")
    text = stream.getvalue()
    assert "unexpected error" in text and "library failure" in text
    assert "RuntimeError" in text
    assert TEST_API_KEY not in text


def test_throttle_says_each_cause_once_a_minute() -> None:
    clock = FakeClock()
    throttle = logs.Throttle(clock)
    assert throttle.due("disk full in /spool") is True
    assert throttle.due("disk full in /spool") is False
    assert throttle.due("another cause") is True
    clock.advance(59.9)
    assert throttle.due("disk full in /spool") is False
    clock.advance(0.1)
    assert throttle.due("disk full in /spool") is True
