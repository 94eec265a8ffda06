"""KeyMap: bounded memory for the keys of huge files (duplicate detection, the responses index)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from daemon import keymap
from daemon.inputs import Defaults, LineError, Request, read_requests
from daemon.keymap import KeyMap
from daemon.results import ResponsesFileIndex, answer_text, line_key


@pytest.mark.parametrize("budget", [None, 0, 2000])
def test_first_value_wins_in_memory_and_on_disk(tmp_path: Path, budget: int | None) -> None:
    spill = tmp_path / "kv.db"
    keys = KeyMap(spill, budget)
    for i in range(200):
        assert keys.setdefault(f"k{i}", i) == i
    assert keys.spilled is (budget is not None)
    assert spill.exists() is keys.spilled
    assert keys.setdefault("k5", 999) == 5
    keys.add("k6", 999)
    keys.add("new", 7)
    assert keys.get("k6") == 6 and keys.get("new") == 7 and keys.get("absent") is None
    keys.close()
    assert not spill.exists()


def test_private_temporary_spill_without_a_path() -> None:
    keys = KeyMap(memory_bytes=0)
    assert keys.setdefault("a", 1) == 1 and keys.spilled
    assert keys.setdefault("a", 2) == 1 and keys.get("a") == 1
    keys.close()


def test_duplicate_keys_are_found_after_the_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keymap, "MEMORY_BYTES", 1000)  # spills after about ten keys
    source = tmp_path / "in.jsonl"
    lines = [{"key": f"k{i}", "prompt": "p"} for i in range(100)]
    lines += [{"key": "k3", "prompt": "again"}, {"key": "k99", "prompt": "again"}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = list(read_requests(source, Defaults()))
    assert [i.key for i in items if isinstance(i, Request)] == [f"k{i}" for i in range(100)]
    errors = [i for i in items if isinstance(i, LineError)]
    assert [(e.line, e.message) for e in errors] == [
        (101, "duplicate key 'k3' (first used on line 4)"),
        (102, "duplicate key 'k99' (first used on line 100)"),
    ]


def ok_line(key: str, text: str) -> str:
    response = {"candidates": [{"content": {"parts": [{"text": text}]}}]}
    return json.dumps({"key": key, "response": response})


@pytest.mark.parametrize("budget", [None, 0])
def test_responses_index_in_memory_and_spilled(tmp_path: Path, budget: int | None) -> None:
    lines = [ok_line(f"k{i}", f"answer {i}") for i in range(500)]
    lines.append(ok_line("k7", "a second answer for k7"))
    lines += ['{"key": "broken", "response": ', '{"response": {}, "key": "late"}']
    random.Random(2).shuffle(lines)
    lines.insert(0, ok_line("k9", "first one wins"))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(lines) + "\n")
    index = ResponsesFileIndex(responses, memory_bytes=budget)
    try:
        for i in (0, 42, 499):
            entry = index.get(f"k{i}")
            assert entry is not None and answer_text(entry["response"]) == f"answer {i}"
        first = index.get("k9")
        assert first is not None and answer_text(first["response"]) == "first one wins"
        assert index.get("broken") is None  # the quick key scan saw it; the line is no JSON
        assert index.get("late") == {"response": {}, "key": "late"}
        assert index.get("absent") is None
    finally:
        index.close()
    assert not responses.with_name(responses.name + ".idx").exists()


def test_quick_key_scan_agrees_with_a_full_parse() -> None:
    cases = [
        b'{"key": "a", "response": {}}\n',
        b'{"key":"a b","error":{}}',
        b'{ "key" : "\xc3\xa9t\xc3\xa9" , "response": {}}',
        b'{"key": "a\\"b", "response": {}}',  # an escape: parsed in full
        b'{"key": "x"}',
        b'{"key": 12, "response": {}}',
        b'{"metadata": {"key": "m"}, "response": {}}',
    ]
    for raw in cases:
        value = json.loads(raw)
        expected = value.get("key", value.get("metadata", {}).get("key"))
        assert line_key(raw) == str(expected), raw
