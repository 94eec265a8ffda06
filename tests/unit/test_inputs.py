"""daemon.inputs: the four line forms, keys, bad lines (JSON columns, the keys they keep),
per-line settings and their ranges, the token estimate and the Scan summary."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import inputs
from daemon.config import load_config
from daemon.inputs import (
    CHARS_PER_TOKEN,
    MAX_REPORTED_ERRORS,
    Defaults,
    LineError,
    Request,
    Scan,
    camel,
    estimate_tokens,
    prompt_chars,
    prompt_request,
    read_requests,
    scan_file,
)
from daemon.keymap import KeySet
from tests.support.harness import write_jsonl

DEFAULTS = Defaults(system_prompt="Be brief.", temperature=0.2, thinking_budget=24576)


def write(tmp_path: Path, lines: list[Any] | bytes) -> Path:
    path = tmp_path / "in.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
        return path
    return write_jsonl(path, lines)


def parse(
    tmp_path: Path, lines: list[Any] | bytes, defaults: Defaults = DEFAULTS
) -> list[Request | LineError]:
    return list(read_requests(write(tmp_path, lines), defaults))


def one_request(tmp_path: Path, line: Any, defaults: Defaults = DEFAULTS) -> Request:
    items = parse(tmp_path, [line], defaults)
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, Request), item
    return item


def one_line_error(tmp_path: Path, line: Any) -> LineError:
    items = parse(tmp_path, [line])
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, LineError), item
    assert item.line == 1
    return item


def one_error(tmp_path: Path, line: Any) -> str:
    return one_line_error(tmp_path, line).message


def user_text(request: Request) -> str:
    contents = request.body["contents"]
    assert contents[0]["role"] == "user"
    assert len(contents) == 1 and len(contents[0]["parts"]) == 1
    text: str = contents[0]["parts"][0]["text"]
    return text


# ---- the four line forms ---------------------------------------------------------------------


def test_json_string_line(tmp_path: Path) -> None:
    request = one_request(tmp_path, "What is 2+2?")
    assert request.key == "1"
    assert request.line == 1
    assert user_text(request) == "What is 2+2?"
    assert request.body["generationConfig"] == {
        "temperature": 0.2,
        "thinkingConfig": {"thinkingBudget": 24576},
    }
    assert request.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert request.filter_json is False


def test_array_of_strings_joined_with_newlines_into_one_turn(tmp_path: Path) -> None:
    request = one_request(tmp_path, ["Categorise:", "French", "context"])
    assert user_text(request) == "Categorise:\nFrench\ncontext"


def test_object_prompt_line(tmp_path: Path) -> None:
    request = one_request(tmp_path, {"key": "a1", "prompt": ["x", "y"], "filter_json": True})
    assert request.key == "a1"
    assert user_text(request) == "x\ny"
    assert request.filter_json is True


def test_native_request_sent_as_written(tmp_path: Path) -> None:
    native = {
        "contents": [
            {"role": "user", "parts": [{"text": "hello"}]},
            {"role": "model", "parts": [{"text": "hi"}]},
            {"role": "user", "parts": [{"text": "again"}]},
        ],
        "generationConfig": {"temperature": 1.5, "responseMimeType": "application/json"},
        "systemInstruction": {"parts": [{"text": "native system"}]},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }
    request = one_request(tmp_path, {"key": "n1", "request": native})
    assert request.key == "n1"
    assert request.body == native  # no defaults merged in, nothing dropped
    assert request.filter_json is False


def test_native_request_without_generation_config_gets_no_defaults(tmp_path: Path) -> None:
    native = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    request = one_request(tmp_path, {"key": "n", "request": native, "filter_json": True})
    assert request.body == native
    assert request.filter_json is True


def test_native_request_snake_case_top_level_names_are_camelised(tmp_path: Path) -> None:
    native = {
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "generation_config": {"temperature": 1},
        "system_instruction": {"parts": [{"text": "s"}]},
    }
    request = one_request(tmp_path, {"key": "n", "request": native})
    assert request.body["generationConfig"] == {"temperature": 1}
    assert request.body["systemInstruction"] == {"parts": [{"text": "s"}]}


# ---- keys ------------------------------------------------------------------------------------


def test_default_keys_are_physical_line_numbers(tmp_path: Path) -> None:
    items = parse(tmp_path, [b'"a"', b"", b"   ", b'["b"]', b'{"prompt": "c"}'])
    assert [(i.key, i.line) for i in items if isinstance(i, Request)] == [
        ("1", 1),
        ("4", 4),
        ("5", 5),
    ]


def test_duplicate_key_names_the_first_line(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        [
            {"key": "a", "prompt": "x"},
            {"key": "b", "prompt": "y"},
            {"key": "a", "prompt": "z"},
        ],
    )
    error = items[2]
    assert isinstance(error, LineError)
    assert error.line == 3
    assert "duplicate key 'a'" in error.message
    assert "line 1" in error.message


def test_explicit_key_colliding_with_a_default_key(tmp_path: Path) -> None:
    items = parse(tmp_path, ["first", {"key": "1", "prompt": "second"}])
    assert isinstance(items[0], Request)
    assert isinstance(items[1], LineError)
    assert "first used on line 1" in items[1].message


def test_numeric_key_becomes_a_string(tmp_path: Path) -> None:
    assert one_request(tmp_path, {"key": 7, "prompt": "x"}).key == "7"


@pytest.mark.parametrize("key", ["", True, None, [1], {"a": 1}, 1.5])
def test_bad_keys(tmp_path: Path, key: Any) -> None:
    line = {"key": key, "prompt": "x"}
    if key is None:  # an explicit null key means "no key": the line number
        assert one_request(tmp_path, line).key == "1"
    else:
        assert "'key'" in one_error(tmp_path, line)


# ---- bad lines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"prompt": "x"', "not valid JSON"),
        (b"not json at all", "not valid JSON"),
        (b"42", "got a number"),
        (b"4.5", "got a number"),
        (b"null", "got null"),
        (b"true", "got a boolean"),
        (b'{"key": "a"}', "needs 'prompt'"),
        (b'{"text": "a"}', "needs 'prompt'"),
        (b'{"prompt": "a", "temperature": 1}', "unknown field(s) 'temperature'"),
        (b'{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}, "x": 1}', "'x'"),
        (b'{"prompt": ""}', "empty"),
        (b'{"prompt": "   "}', "empty"),
        (b'""', "empty"),
        (b"[]", "empty array"),
        (b'["a", 1]', "only strings"),
        (b'["a", null]', "only strings"),
        (b'{"prompt": []}', "empty array"),
        (b'{"prompt": 5}', "must be a string or an array of strings"),
        (b'{"prompt": "x", "system_prompt": 5}', "'system_prompt'"),
        (b'{"prompt": "x", "filter_json": "yes"}', "'filter_json'"),
        (b'{"prompt": "x", "config": []}', "'config' must be an object"),
        (b'{"prompt": "x", "config": "hot"}', "'config' must be an object"),
        (b'{"key": "a", "request": "x"}', "'request' must be an object"),
        (b'{"key": "a", "request": {}}', "'request.contents'"),
        (b'{"key": "a", "request": {"contents": []}}', "'request.contents'"),
        (b'{"key": "a", "request": {"contents": [{"parts": [{"txt": "x"}]}]}}', "txt"),
    ],
)
def test_bad_line_messages(tmp_path: Path, raw: bytes, fragment: str) -> None:
    assert fragment in one_error(tmp_path, raw)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    message = one_error(tmp_path, b'"caf\xe9"')
    assert "UTF-8" in message
    assert "0xe9" in message


def test_binary_garbage(tmp_path: Path) -> None:
    items = parse(tmp_path, b"\x00\x01\x02\xff\xfe\n\x89PNG\r\n\x1a\n")
    assert [type(i) for i in items] == [LineError, LineError, LineError]
    assert all(isinstance(i, LineError) for i in items)


def test_bom_is_skipped_on_the_first_line(tmp_path: Path) -> None:
    items = parse(tmp_path, b'\xef\xbb\xbf"first"\n"second"\n')
    assert [user_text(i) for i in items if isinstance(i, Request)] == ["first", "second"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    items = parse(tmp_path, b'"a"\r\n\r\n{"key": "k", "prompt": "b"}\r\n')
    assert [(i.key, i.line, user_text(i)) for i in items if isinstance(i, Request)] == [
        ("1", 1, "a"),
        ("k", 3, "b"),
    ]


def test_last_line_without_newline(tmp_path: Path) -> None:
    items = parse(tmp_path, b'"a"\n"b"')
    assert [i.key for i in items if isinstance(i, Request)] == ["1", "2"]


def test_blank_lines_skipped_but_counted(tmp_path: Path) -> None:
    items = parse(tmp_path, b'\n\n"a"\n \t \nbroken\n\n"b"\n\n')
    assert [(type(i).__name__, i.line) for i in items] == [
        ("Request", 3),
        ("LineError", 5),
        ("Request", 7),
    ]


def test_errors_and_requests_come_in_file_order(tmp_path: Path) -> None:
    items = parse(tmp_path, ["a", 5, "b", None, "c"])
    assert [i.line for i in items] == [1, 2, 3, 4, 5]
    assert [isinstance(i, Request) for i in items] == [True, False, True, False, True]


# ---- per-line settings -----------------------------------------------------------------------


def test_config_overrides_in_camel_and_snake_case_merge_over_defaults(tmp_path: Path) -> None:
    request = one_request(
        tmp_path,
        {
            "prompt": "x",
            "config": {
                "response_mime_type": "application/json",
                "maxOutputTokens": 100,
                "top_p": 0.5,
            },
        },
    )
    assert request.body["generationConfig"] == {
        "temperature": 0.2,
        "thinkingConfig": {"thinkingBudget": 24576},
        "responseMimeType": "application/json",
        "maxOutputTokens": 100,
        "topP": 0.5,
    }


def test_config_override_replaces_a_default(tmp_path: Path) -> None:
    request = one_request(tmp_path, {"prompt": "x", "config": {"temperature": 1.0}})
    assert request.body["generationConfig"]["temperature"] == 1.0


@pytest.mark.parametrize("name", ["thinkingConfig", "thinking_config"])
def test_thinking_config_merges_over_the_default_budget(tmp_path: Path, name: str) -> None:
    request = one_request(tmp_path, {"prompt": "x", "config": {name: {"include_thoughts": True}}})
    assert request.body["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 24576,
        "includeThoughts": True,
    }
    request = one_request(tmp_path, {"prompt": "x", "config": {name: {"thinking_budget": 0}}})
    assert request.body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}


def test_empty_or_null_config_means_defaults(tmp_path: Path) -> None:
    configs: list[dict[str, Any] | None] = [{}, None]
    for config in configs:
        request = one_request(tmp_path, {"prompt": "x", "config": config})
        assert request.body["generationConfig"] == {
            "temperature": 0.2,
            "thinkingConfig": {"thinkingBudget": 24576},
        }


@pytest.mark.parametrize("name", ["bogus", "systemInstruction", "tools", "model"])
def test_unknown_config_field_rejected(tmp_path: Path, name: str) -> None:
    message = one_error(tmp_path, {"prompt": "x", "config": {name: 1}})
    assert f"unknown generation setting {name!r}" in message


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_output_tokens": "many"}, "maxOutputTokens"),
        ({"thinking_config": {"thinking_budget": "x"}}, "thinkingBudget"),
        ({"thinkingConfig": {"bogus": 1}}, "bogus"),
        ({"stop_sequences": "x"}, "stopSequences"),
    ],
)
def test_bad_config_value_rejected_per_line(
    tmp_path: Path, config: dict[str, Any], field: str
) -> None:
    message = one_error(tmp_path, {"prompt": "x", "config": config})
    assert "'config'" in message
    assert field in message


def test_bad_native_generation_config_rejected_per_line(tmp_path: Path) -> None:
    native = {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"temperature": "hot"},
    }
    assert "temperature" in one_error(tmp_path, {"key": "k", "request": native})


@pytest.mark.parametrize(
    "line",
    [
        {"prompt": "x", "config": {"media_resolution": 5}},
        {"prompt": "x", "config": {"thinking_config": {"thinking_level": 5}}},
        {
            "request": {
                "contents": [{"parts": [{"text": "x"}]}],
                "generationConfig": {"mediaResolution": 5},
            }
        },
        b'{"key": "a", "key": "b", "request": {"contents": [{"parts": [{"text": "x"}]}],'
        b' "generationConfig": {"mediaResolution": 5}}}',
    ],
)
def test_settings_the_sdk_cannot_read_are_a_line_error(tmp_path: Path, line: Any) -> None:
    message = one_error(tmp_path, line)
    assert "AttributeError" in message or "twice" in message, message


def test_a_thinking_config_after_a_null_one_of_the_other_name_stands_alone(
    tmp_path: Path,
) -> None:
    line = {
        "prompt": "x",
        "config": {"thinking_config": None, "thinkingConfig": {"thinkingBudget": 5}},
    }
    request = one_request(tmp_path, line)
    assert request.body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 5}


@pytest.mark.parametrize("config", ["hot", [["temperature", 1]], 5, True])
def test_native_generation_config_that_is_no_object_is_a_line_error(
    tmp_path: Path, config: Any
) -> None:
    native = {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": config}
    message = one_error(tmp_path, {"key": "k", "request": native})
    assert message.startswith("'request.generationConfig' must be an object, got "), message


def test_system_prompt_per_line(tmp_path: Path) -> None:
    request = one_request(tmp_path, {"prompt": "x", "system_prompt": "Answer in French."})
    assert request.body["systemInstruction"] == {"parts": [{"text": "Answer in French."}]}


def test_empty_system_prompt_per_line_clears_the_default(tmp_path: Path) -> None:
    request = one_request(tmp_path, {"prompt": "x", "system_prompt": ""})
    assert "systemInstruction" not in request.body


def test_no_system_prompt_anywhere(tmp_path: Path) -> None:
    request = one_request(tmp_path, "x", Defaults())
    assert "systemInstruction" not in request.body


def test_filter_json_default_and_per_line(tmp_path: Path) -> None:
    defaults = Defaults(filter_json=True)
    items = parse(tmp_path, ["a", {"prompt": "b", "filter_json": False}], defaults)
    assert [i.filter_json for i in items if isinstance(i, Request)] == [True, False]


def test_defaults_from_config(tmp_path: Path) -> None:
    (tmp_path / "prompt.md").write_text("From file.")
    (tmp_path / "config.yaml").write_text(
        "system_prompt_file: prompt.md\ntemperature: 0.7\nthinking_budget: 0\nfilter_json: true\n"
    )
    defaults = Defaults.from_config(load_config(tmp_path / "config.yaml"))
    assert defaults == Defaults("From file.", 0.7, 0, True)
    request = one_request(tmp_path, "x", defaults)
    assert request.body["generationConfig"] == {
        "temperature": 0.7,
        "thinkingConfig": {"thinkingBudget": 0},
    }
    assert request.body["systemInstruction"] == {"parts": [{"text": "From file."}]}


def test_prompt_request_library_path() -> None:
    request = prompt_request("k", 3, ["a", "b"], DEFAULTS)
    assert (request.key, request.line, user_text(request)) == ("k", 3, "a\nb")
    with pytest.raises(ValueError, match="empty"):
        prompt_request("k", 1, [], DEFAULTS)


def test_camel() -> None:
    assert camel("response_mime_type") == "responseMimeType"
    assert camel("responseMimeType") == "responseMimeType"
    assert camel("temperature") == "temperature"


# ---- Scan --------------------------------------------------------------------------------------


def test_scan_counts_size_and_hash(tmp_path: Path) -> None:
    data = b'"a"\n\n{"key": "k", "prompt": "b"}\nbroken\n'
    path = write(tmp_path, data)
    scan = scan_file(path, DEFAULTS)
    assert scan.path == path
    assert scan.size == len(data)
    assert scan.sha256 == hashlib.sha256(data).hexdigest()
    assert scan.requests == 2
    assert scan.error_count == 1
    assert scan.errors == [LineError(4, scan.errors[0].message)]
    assert scan.errors[0].as_dict() == {"line": 4, "message": scan.errors[0].message}
    assert "1 invalid line(s): line 4:" in scan.summary()


def test_scan_of_a_good_file(tmp_path: Path) -> None:
    scan = scan_file(write(tmp_path, ["a", "b", "c"]), DEFAULTS)
    assert (scan.requests, scan.error_count, scan.errors) == (3, 0, [])
    assert scan.summary() == "3 request(s)"
    assert scan.payload_bytes > 0


def test_scan_filled_while_iterating(tmp_path: Path) -> None:
    path = write(tmp_path, ["a", "b"])
    scan = Scan(path)
    assert len(list(read_requests(path, DEFAULTS, scan))) == 2
    assert scan.requests == 2
    assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_empty_file(tmp_path: Path) -> None:
    scan = scan_file(write(tmp_path, b"\n\n"), DEFAULTS)
    assert (scan.requests, scan.error_count, scan.size) == (0, 0, 2)


def test_error_list_is_capped_but_all_are_counted(tmp_path: Path) -> None:
    total = MAX_REPORTED_ERRORS + 25
    scan = scan_file(write(tmp_path, [b"broken"] * total + [b'"ok"']), DEFAULTS)
    assert scan.error_count == total
    assert len(scan.errors) == MAX_REPORTED_ERRORS
    assert [e.line for e in scan.errors] == list(range(1, MAX_REPORTED_ERRORS + 1))
    assert scan.requests == 1
    summary = scan.summary()
    assert summary.startswith(f"{total} invalid line(s): line 1:")
    assert f"(and {total - 5} more)" in summary
    assert "\n" not in summary


@pytest.mark.parametrize("text", ["日本語" * 1000, "é" * 3000, "\U0001f600" * 800, "ascii " * 500])
def test_payload_bytes_never_undercounts_what_the_sdk_sends(tmp_path: Path, text: str) -> None:
    """The SDK sends JSON with `\\uXXXX` escapes, plus the default system prompt and settings."""
    defaults = Defaults(system_prompt="Système " * 500)
    lines = [
        json.dumps(text, ensure_ascii=False).encode(),
        json.dumps({"key": "k", "prompt": [text, text]}, ensure_ascii=False).encode(),
        json.dumps(
            {"key": "n", "request": {"contents": [{"role": "user", "parts": [{"text": text}]}]}},
            ensure_ascii=False,
        ).encode(),
    ]
    path = write(tmp_path, lines)
    sent = sum(
        len(json.dumps({"request": i.body, "metadata": {"key": i.key}}))
        for i in read_requests(path, defaults)
        if isinstance(i, Request)
    )
    scan = scan_file(path, defaults)
    assert scan.requests == 3
    assert sent <= scan.payload_bytes <= 3 * sent


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"1" * 5000, "not valid JSON"),
        (b'{"prompt": "x", "config": {"temperature": NaN}}', "NaN"),
        (b'["x", Infinity]', "Infinity"),
        (b'"\\ud800 lone surrogate"', "surrogate"),
        (b'{"prompt": "\\uDC00"}', "surrogate"),
    ],
)
def test_pathological_lines_are_line_errors_not_crashes(
    tmp_path: Path, raw: bytes, fragment: str
) -> None:
    assert fragment in one_error(tmp_path, raw)


def test_escaped_surrogate_pair_is_fine(tmp_path: Path) -> None:
    assert user_text(one_request(tmp_path, b'"\\ud83d\\ude00"')) == "\U0001f600"


# ---- JSON errors point at the right column ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "column", "reason"),
    [
        (b'{"prompt": "missing brace"', 27, "Expecting ',' delimiter"),
        (b'{"prompt": "missing brace"\r', 27, "Expecting ',' delimiter"),
        (b'{"prompt": "missing brace"   ', 27, "Expecting ',' delimiter"),
        (b'{"prompt" "x"}', 11, "Expecting ':' delimiter"),
        (b'{"prompt": "x",}', 16, "Expecting property name"),
        (b'"unterminated', 1, "Unterminated string"),
        (b'{"prompt": "x"} trailing', 17, "Extra data"),
        (b"  {oops", 4, "Expecting property name"),
        ('{"prompt": "日本語", x}'.encode(), 19, "Expecting"),  # characters, not bytes
        (b"\xef\xbb\xbf{,", 2, "Expecting property name"),  # after the byte order mark
    ],
)
def test_json_errors_name_line_column_and_reason(
    tmp_path: Path, raw: bytes, column: int, reason: str
) -> None:
    message = one_error(tmp_path, raw)
    assert message.startswith(f"not valid JSON: {reason}"), message
    assert f"at column {column}" in message


def test_json_error_at_the_end_of_the_line_says_so(tmp_path: Path) -> None:
    assert "end of the line" in one_error(tmp_path, b'{"prompt": "missing brace"')
    assert "end of the line" not in one_error(tmp_path, b'{"prompt" "x"}')


def test_json_error_line_numbers_in_a_file(tmp_path: Path) -> None:
    items = parse(tmp_path, b'"ok"\n\n{"prompt": "missing brace"\n"ok"\n')
    errors = [i for i in items if isinstance(i, LineError)]
    assert [(e.line, "at column 27" in e.message) for e in errors] == [(3, True)]


# ---- per-line settings are range-checked like the configuration file --------------------------


@pytest.mark.parametrize(
    ("config", "field", "expected"),
    [
        ({"temperature": 5}, "temperature", "from 0 to 2 (got 5)"),
        ({"temperature": -0.1}, "temperature", "from 0 to 2"),
        ({"temperature": True}, "temperature", "got a boolean"),
        ({"top_p": 1.5}, "topP", "from 0 to 1"),
        ({"topK": 0}, "topK", "an integer >= 1"),
        ({"topK": 2.5}, "topK", "an integer >= 1"),
        ({"candidate_count": 0}, "candidateCount", ">= 1"),
        ({"maxOutputTokens": 0}, "maxOutputTokens", ">= 1"),
        ({"max_output_tokens": -5}, "maxOutputTokens", ">= 1"),
        ({"max_output_tokens": 10.5}, "maxOutputTokens", "an integer"),
        ({"presence_penalty": 2}, "presencePenalty", "up to (not including) 2"),
        ({"frequencyPenalty": -3}, "frequencyPenalty", "from -2"),
        ({"logprobs": 21}, "logprobs", "from 0 to 20"),
        ({"seed": 2**40}, "seed", "an integer"),
        ({"thinking_config": {"thinking_budget": -2}}, "thinkingConfig.thinkingBudget", ">= -1"),
        ({"thinkingConfig": {"thinkingBudget": 1.5}}, "thinkingConfig.thinkingBudget", "integer"),
        ({"stop_sequences": ["a", "b", "c", "d", "e", "f"]}, "stopSequences", "at most 5"),
        (
            {"thinkingConfig": {"thinkingBudget": 10, "thinking_level": "LOW"}},
            "thinkingConfig",
            "not both",
        ),
    ],
)
def test_config_values_out_of_range_are_line_errors(
    tmp_path: Path, config: dict[str, Any], field: str, expected: str
) -> None:
    message = one_error(tmp_path, {"prompt": "x", "config": config})
    assert message.startswith(f"'config' field '{field}': "), message
    assert expected in message


@pytest.mark.parametrize(
    "config",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"temperature": 1},
        {"top_p": 0},
        {"topP": 1.0},
        {"topK": 40},
        {"topK": 40.0},
        {"candidateCount": 1},
        {"maxOutputTokens": 1},
        {"presencePenalty": -2},
        {"frequency_penalty": 1.99},
        {"logprobs": 0},
        {"seed": -1},
        {"thinking_config": {"thinking_budget": -1}},
        {"thinking_config": {"thinking_budget": 0}},
        {"stop_sequences": ["a", "b", "c", "d", "e"]},
        {"temperature": None},
    ],
)
def test_config_values_in_range_pass(tmp_path: Path, config: dict[str, Any]) -> None:
    one_request(tmp_path, {"prompt": "x", "config": config})


def test_thinking_level_replaces_the_default_budget(tmp_path: Path) -> None:
    request = one_request(
        tmp_path, {"prompt": "x", "config": {"thinking_config": {"thinking_level": "LOW"}}}
    )
    assert request.body["generationConfig"]["thinkingConfig"] == {"thinkingLevel": "LOW"}


def test_native_generation_config_is_range_checked(tmp_path: Path) -> None:
    contents = [{"role": "user", "parts": [{"text": "x"}]}]
    for config, field in (
        ({"temperature": 5}, "temperature"),
        ({"max_output_tokens": 0}, "maxOutputTokens"),
        ({"thinkingConfig": {"thinkingBudget": -7}}, "thinkingConfig.thinkingBudget"),
    ):
        line = {"key": "k", "request": {"contents": contents, "generationConfig": config}}
        message = one_error(tmp_path, line)
        assert message.startswith(f"'request.generationConfig' field '{field}': "), message
    good = {"contents": contents, "generationConfig": {"temperature": 2, "topK": 3}}
    assert one_request(tmp_path, {"key": "k", "request": good}).body == good


def test_validated_lines_of_a_file_and_the_daemon_agree(tmp_path: Path) -> None:
    """`validate` and the daemon read lines through the same function: one verdict."""
    path = write(tmp_path, [{"prompt": "x", "config": {"temperature": 5}}, "fine"])
    scan = scan_file(path, DEFAULTS)
    assert (scan.requests, scan.error_count) == (1, 1)
    assert "temperature" in scan.errors[0].message


# ---- a bad line keeps the key it gave itself ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ({"key": "r", "request": {"contents": []}}, "r"),
        ({"key": "r", "prompt": ""}, "r"),
        ({"key": 7, "prompt": "x", "config": {"temperature": 5}}, "7"),
        ({"key": "r", "prompt": "x", "bogus": 1}, "r"),
        (b'{"key": "r", "prompt": "\\ud800"}', "r"),
        ({"prompt": ""}, None),  # no key of its own: the line number is the record's `line`
        ({"key": "", "prompt": "x"}, None),
        ({"key": True, "prompt": "x"}, None),
        ({"key": ["r"], "prompt": "x"}, None),
        (b'{"key": "\\udc00", "prompt": "x"}', None),  # cannot be written as UTF-8
        (b'{"key": "r", "prompt": "x"', None),  # not JSON: nothing is readable
        (b'["r", 1]', None),
        (b"42", None),
    ],
)
def test_line_error_keeps_a_readable_key(tmp_path: Path, line: Any, key: str | None) -> None:
    assert one_line_error(tmp_path, line).key == key


def test_duplicate_line_keeps_its_key(tmp_path: Path) -> None:
    items = parse(tmp_path, [{"key": "a", "prompt": "x"}, {"key": "a", "prompt": "y"}])
    error = items[1]
    assert isinstance(error, LineError)
    assert (error.line, error.key) == (2, "a")
    assert "duplicate key 'a'" in error.message


# ---- the token estimate ------------------------------------------------------------------------


def test_prompt_chars_count_contents_and_system_instruction() -> None:
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "abcd"}, {"inlineData": {"data": "zz"}}]},
            {"role": "model", "parts": [{"text": "ef"}]},
            "not an object",
        ],
        "systemInstruction": {"parts": [{"text": "123"}]},
    }
    assert prompt_chars(body) == 9
    assert prompt_chars({}) == 0
    assert prompt_chars({"contents": "x", "systemInstruction": 5}) == 0


def test_estimate_tokens_rounds_up() -> None:
    assert CHARS_PER_TOKEN == 4
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_scan_estimates_the_input_tokens_of_valid_requests(tmp_path: Path) -> None:
    defaults = Defaults(system_prompt="12345678")  # 8 characters, sent with every prompt line
    path = write(
        tmp_path,
        [
            "a" * 40,
            ["b" * 10, "c" * 10],  # joined with a newline: 21 characters
            {"key": "n", "request": {"contents": [{"parts": [{"text": "d" * 12}]}]}},
            {"prompt": ""},  # invalid: not counted
        ],
    )
    scan = scan_file(path, defaults)
    assert scan.prompt_chars == (40 + 8) + (21 + 8) + 12
    assert scan.estimated_tokens == estimate_tokens(89) == 23


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"key": "a", "key": "b", "prompt": "x"}', "key"),
        ('{"key": "a", "prompt": "x", "prompt": "y"}', "prompt"),
        ('{"prompt": "x", "config": {"temperature": 1, "temperature": 2}}', "temperature"),
        (
            '{"key": "n", "request": {"contents": [{"parts": [{"text": "a", "text": "b"}]}]}}',
            "text",
        ),
        ('{"key" : "a" ,\t"key"\t:\t"b", "prompt": "x"}', "key"),
    ],
)
def test_a_field_named_twice_is_an_invalid_line_naming_it(
    tmp_path: Path, line: str, field: str
) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text(line + "\n")
    [error] = list(read_requests(path, Defaults()))
    assert isinstance(error, LineError)
    assert error.message == f"an object names the field {field!r} twice"


@pytest.mark.parametrize(
    "line",
    [
        '{"key": "a", "prompt": "Categorise: x: y: z"}',
        '{"key": "a", "prompt": "say \\"a\\": b and \\"a\\": c"}',
        '{"key": "k", "request": {"contents": [{"parts": [{"text": "a"}]}, {"parts": [{"text": "b"}]}]}}',
    ],
)
def test_colons_and_the_same_field_in_different_objects_are_fine(tmp_path: Path, line: str) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text(line + "\n")
    [request] = list(read_requests(path, Defaults()))
    assert not isinstance(request, LineError), request


def test_lines_with_the_same_config_get_the_same_settings_and_the_same_errors(
    tmp_path: Path,
) -> None:
    """Overrides are resolved once per distinct config: the verdict must not leak between
    configs that differ only in order, or between defaults."""
    good = {"max_output_tokens": 5, "maxOutputTokens": 6}
    reordered = {"maxOutputTokens": 6, "max_output_tokens": 5}
    bad = {"temperature": 5}
    lines = [
        {"key": f"k{n}", "prompt": "p", "config": c}
        for n, c in enumerate([good, reordered, bad, good, bad])
    ]
    items = parse(tmp_path, lines)
    assert [type(i).__name__ for i in items] == [
        "Request",
        "Request",
        "LineError",
        "Request",
        "LineError",
    ]
    first, second, _, again, _ = items
    assert isinstance(first, Request) and isinstance(second, Request) and isinstance(again, Request)
    assert first.body["generationConfig"]["maxOutputTokens"] == 6  # the later name wins
    assert second.body["generationConfig"]["maxOutputTokens"] == 5
    assert again.body["generationConfig"] == first.body["generationConfig"]
    assert items[2].message == items[4].message  # type: ignore[union-attr]
    assert "'config' field 'temperature'" in items[2].message  # type: ignore[union-attr]
    cooler = parse(tmp_path, [lines[0]], Defaults(temperature=0.7))[0]
    assert isinstance(cooler, Request)
    assert cooler.body["generationConfig"]["temperature"] == 0.7


def _corpus() -> bytes:
    """Prompt lines in the usual shape and in every way one may step out of it."""
    objects: list[Any] = [
        {"key": "a", "prompt": "p"},
        {"prompt": "no key"},
        {"key": 7, "prompt": "int key"},
        {"key": 2**70, "prompt": "long int key"},
        {"key": True, "prompt": "bool key"},
        {"key": None, "prompt": "null key"},
        {"key": "", "prompt": "empty key"},
        {"key": "3", "prompt": "the key of a line without one"},
        {"key": "a", "prompt": "a duplicate key"},
        {"key": "l1", "prompt": ["one", "two"]},
        {"key": "l2", "prompt": []},
        {"key": "l3", "prompt": ["one", 2]},
        {"key": "l4", "prompt": ["", " "]},
        {"key": "w", "prompt": " \t"},
        {"key": "e", "prompt": ""},
        {"key": "n", "prompt": None},
        {"key": "s1", "prompt": "p", "system_prompt": "be brief"},
        {"key": "s2", "prompt": "p", "system_prompt": None},
        {"key": "s5", "prompt": "p", "system_prompt": None, "filter_json": False},
        {"key": "s3", "prompt": "p", "system_prompt": 5},
        {"key": "s4", "prompt": "p", "system_prompt": ""},
        {"key": "c1", "prompt": "p", "config": {"temperature": 0.5}},
        {"key": "c2", "prompt": "p", "config": {"temperature": 5}},
        {"key": "c3", "prompt": "p", "config": {"colour": 1}},
        {"key": "c4", "prompt": "p", "config": {"thinking_config": {"thinking_level": "LOW"}}},
        {"key": "c5", "prompt": "p", "config": None},
        {"key": "c6", "prompt": "p", "config": []},
        {"key": "c7", "prompt": "p", "config": {}},
        {"key": "c8", "prompt": "p", "config": {"seed": 2**70}},
        {"key": "c9", "prompt": "p", "config": {"max_output_tokens": 5, "maxOutputTokens": 6}},
        {"key": "f1", "prompt": "p", "filter_json": True},
        {"key": "f2", "prompt": "p", "filter_json": None},
        {"key": "f3", "prompt": "p", "filter_json": "yes"},
        {"key": "u", "prompt": "p", "colour": "blue"},
        {"key": "r", "prompt": "p", "request": {"contents": []}},
        {"key": "colons", "prompt": "a: b: c: d"},
        {"key": "native", "request": {"contents": [{"parts": [{"text": "x"}]}]}},
        "a string line",
        ["an", "array", "line"],
        5,
        {"key": "unicode", "prompt": "é 😀 \u2028"},
    ]
    lines = [json.dumps(o).encode() for o in objects]
    lines += [
        b'{"key": "d1", "key": "d2", "prompt": "a key named twice"}',
        b'{"key": "d3", "prompt": "p", "prompt": "prompt twice"}',
        b'{"key": "d4", "prompt": "p", "config": {"temperature": 0.1, "temperature": 0.2}}',
        b'{"key": "sp" , "prompt" : "spaces around colons"}',
        b'{"key": "c10", "prompt": "p", "config": { "temperature" : 0.5 }}',
        b'{"key": "c11", "prompt": "p", "config": {"temperature": 0.5}, "config": null}',
        b'{"key": "c12", "prompt": "p", "config": null, "config": {"temperature": 9}}',
        b'{"key": "nan", "prompt": "p", "config": {"temperature": NaN}}',
        b'{"key": "bad-utf8", "prompt": "\xff"}',
        b'{"key": "bad-utf8-config", "prompt": "p", "config": {"x": "\xff"}}',
        b'{"key": "bad-utf8-key-\xff", "prompt": "p"}',
        b'{"key": "surrogate", "prompt": "\\ud800"}',
        b'{"key": "cut", "prompt": "p"',
        b"   ",
        b"",
        b'{"key": "deep", "prompt": "p", "config": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        b'{"key": "digits", "prompt": "1234567890123456789012345"}',
        b'{"key": "exp", "prompt": "p", "config": {"temperature": 1e400}}',
    ]
    return b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"


def _request_corpus() -> bytes:
    """Native request lines in the usual shape and in every way one may step out of it."""
    text = [{"parts": [{"text": "x"}]}]
    user = [{"role": "user", "parts": [{"text": "a: b"}, {"text": "c"}]}]
    objects: list[Any] = [
        {"key": "a", "request": {"contents": user}},
        {"request": {"contents": text}},
        {"key": 7, "request": {"contents": text}},
        {"key": 2**70, "request": {"contents": text}},
        {"key": True, "request": {"contents": text}},
        {"key": None, "request": {"contents": text}},
        {"key": "", "request": {"contents": text}},
        {"key": "2", "request": {"contents": text}},
        {"key": "a", "request": {"contents": text}},
        {"key": "f1", "request": {"contents": text}, "filter_json": True},
        {"key": "f2", "request": {"contents": text}, "filter_json": None},
        {"key": "u", "request": {"contents": text}, "colour": 1},
        {"key": "p", "request": {"contents": text}, "prompt": "both"},
        {"key": "sp1", "request": {"contents": text}, "system_prompt": None},
        {"key": "sp2", "request": {"contents": text}, "system_prompt": "s"},
        {"key": "cf1", "request": {"contents": text}, "config": None},
        {"key": "cf2", "request": {"contents": text}, "config": {"temperature": 1}},
        {"key": "e1", "request": {"contents": []}},
        {"key": "e2", "request": {"contents": [{"parts": []}]}},
        {"key": "e3", "request": {"contents": [{"role": "user"}]}},
        {"key": "e4", "request": {"contents": [{"parts": [{"text": ""}]}]}},
        {"key": "r1", "request": {"contents": [{"role": None, "parts": [{"text": "x"}]}]}},
        {"key": "r2", "request": {"contents": [{"role": 5, "parts": [{"text": "x"}]}]}},
        {"key": "t1", "request": {"contents": [{"parts": [{"text": 5}]}]}},
        {"key": "t2", "request": {"contents": [{"parts": [{"text": "x", "thought": True}]}]}},
        {"key": "t3", "request": {"contents": [{"parts": [{"inlineData": {"data": "AA=="}}]}]}},
        {"key": "t4", "request": {"contents": [{"parts": [{"inline_data": {"data": "AA=="}}]}]}},
        {"key": "s1", "request": {"contents": "x"}},
        {"key": "s2", "request": {"contents": text, "system_instruction": {"parts": []}}},
        {"key": "s3", "request": {"contents": text, "systemInstruction": {"parts": []}}},
        {"key": "g1", "request": {"contents": text, "generationConfig": {"temperature": 1}}},
        {"key": "g2", "request": {"contents": text, "generationConfig": {"temperature": 9}}},
        {"key": "g3", "request": {"contents": text, "generationConfig": {"colour": 1}}},
        {"key": "g4", "request": {"contents": text, "generationConfig": None}},
        {"key": "g5", "request": {"contents": text, "generationConfig": {}}},
        {"key": "g6", "request": {"contents": text, "generationConfig": "hot"}},
        {"key": "g7", "request": {"contents": text, "generationConfig": [["temperature", 1]]}},
        {"key": "g8", "request": {"contents": text, "generationConfig": {"seed": 2**70}}},
        {"key": "g9", "request": {"contents": text, "generation_config": {"temperature": 1}}},
        {
            "key": "g10",
            "request": {
                "contents": text,
                "generationConfig": {"thinking_config": {"thinking_budget": 0}, "topK": 3},
            },
        },
        {"key": "o", "request": {"generationConfig": {"topK": 3}, "contents": text}},
        {"key": "x", "request": None},
        {"key": "unicode", "request": {"contents": [{"parts": [{"text": "é 😀 \u2028"}]}]}},
        {"key": "request", "prompt": "a prompt line whose key is the word"},
    ]
    lines = [json.dumps(o).encode() for o in objects]
    lines += [
        b'{"key": "d1", "key": "d2", "request": {"contents": [{"parts": [{"text": "x"}]}]}}',
        b'{"key": "d3", "request": {"contents": [{"parts": [{"text": "x", "text": "y"}]}]}}',
        b'{"key": "d4", "request": {"contents": [{"role": "a", "role": "b", "parts": []}]}}',
        b'{"key": "d5", "request": {"contents": [{"parts": [{"text": "x"}]}],'
        b' "generationConfig": {"topK": 1, "topK": 2}}}',
        b'{"key": "d6", "request": {"contents": [{"parts": [{"text": "x"}]}]},'
        b' "request": {"contents": [{"parts": [{"text": "y"}]}]}}',
        b'{"key": "sp" , "request" : { "contents" : [ { "parts" : [ { "text" : "x" } ] } ] } }',
        b'{"key": "nan", "request": {"contents": [{"parts": [{"text": "x"}]}],'
        b' "generationConfig": {"temperature": NaN}}}',
        b'{"key": "bad-utf8", "request": {"contents": [{"parts": [{"text": "\xff"}]}]}}',
        b'{"key": "bad-utf8-config", "request": {"contents": [{"parts": [{"text": "x"}]}],'
        b' "generationConfig": {"x": "\xff"}}}',
        b'{"key": "bad-utf8-role", "request": {"contents": [{"role": "\xff", "parts": []}]}}',
        b'{"key": "surrogate", "request": {"contents": [{"parts": [{"text": "\\ud800"}]}]}}',
        b'{"key": "cut", "request": {"contents": [{"parts": [{"text": "x"}]}]}',
        b'{"key": "deep", "request": {"contents": [], "generationConfig": '
        + b'{"a": ' * 5000
        + b"1"
        + b"}" * 5002,
    ]
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("filter_json", [False, True])
@pytest.mark.parametrize(("corpus", "usual"), [(_corpus, 15), (_request_corpus, 10)])
def test_the_usual_line_reads_as_any_line_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    filter_json: bool,
    corpus: Callable[[], bytes],
    usual: int,
) -> None:
    defaults = Defaults(system_prompt="sys", filter_json=filter_json)
    path = write(tmp_path, corpus())
    fast_scan = Scan(path)
    fast = list(read_requests(path, defaults, fast_scan))
    taken = [n for n in range(1, 70) if inputs._usual_line(_line(path, n), n, defaults, KeySet())]
    assert len(taken) > usual  # the fast way reads the usual lines
    monkeypatch.setattr(inputs, "_usual_line", lambda *args: None)
    slow_scan = Scan(path)
    slow = list(read_requests(path, defaults, slow_scan))
    assert [_meaning(item) for item in fast] == [_meaning(item) for item in slow]
    assert fast_scan == slow_scan


def _meaning(item: Request | LineError) -> Any:
    """A reading as JSON means it: a request's line decoded (its fields may come in any order)."""
    return item._replace(wire=json.loads(item.wire)) if isinstance(item, Request) else item


def test_a_prompt_line_is_written_as_its_request_object_would_be() -> None:
    for defaults in (Defaults(), Defaults(system_prompt="sys é", temperature=0.3)):
        for system in (None, "", "own ☃"):
            request = inputs._prompt_request(
                "k\u2028", 4, 'say "hi"\n', system, {"topK": 3}, False, defaults
            )
            given = defaults.system_prompt if system is None else system
            body: dict[str, Any] = {
                "contents": [{"role": "user", "parts": [{"text": 'say "hi"\n'}]}],
                "generationConfig": request.body["generationConfig"],
            }
            if given:
                body["systemInstruction"] = {"parts": [{"text": given}]}
            assert request.wire == inputs.wire_line("k\u2028", body)
            assert request.body["generationConfig"]["topK"] == 3


def _line(path: Path, number: int) -> bytes:
    lines = path.read_bytes().split(b"\n")
    return lines[number - 1] + b"\n" if number <= len(lines) else b""
