"""daemon.inputs: the four line forms, keys, bad lines, per-line settings and the Scan summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.inputs import (
    MAX_REPORTED_ERRORS,
    Defaults,
    LineError,
    Request,
    Scan,
    camel,
    prompt_request,
    read_requests,
    scan_file,
)

DEFAULTS = Defaults(system_prompt="Be brief.", temperature=0.2, thinking_budget=24576)


def write(tmp_path: Path, lines: list[Any] | bytes) -> Path:
    path = tmp_path / "in.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_bytes(
            b"".join(
                (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                for line in lines
            )
        )
    return path


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


def one_error(tmp_path: Path, line: Any) -> str:
    items = parse(tmp_path, [line])
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, LineError), item
    assert item.line == 1
    return item.message


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
