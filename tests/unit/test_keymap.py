"""KeyMap: bounded memory for the keys of huge files (duplicate detection, answers by key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import keymap
from daemon.answers import line_key
from daemon.inputs import Defaults, LineError, Request, read_requests
from daemon.keymap import KeyMap


@pytest.mark.parametrize("budget", [None, 0, 2000])
def test_first_value_wins_in_memory_and_on_disk(tmp_path: Path, budget: int | None) -> None:
    spill = tmp_path / "kv.db"
    keys = KeyMap(spill, budget)
    for i in range(200):
        assert keys.setdefault(f"k{i}", i) == i
    assert keys.spilled is (budget is not None)
    assert spill.exists() is keys.spilled
    assert keys.setdefault("k5", 999) == 5
    keys.setdefault("k6", 999)
    keys.setdefault("new", 7)
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


@pytest.mark.parametrize("budget", [None, 0, 2000])
def test_put_replaces_in_memory_and_on_disk(tmp_path: Path, budget: int | None) -> None:
    """`put`: later answers win (a follow-up job's answer replaces the first job's)."""
    keys = KeyMap(tmp_path / "kv.db", budget)
    for i in range(200):
        keys.put(f"k{i}", i)
    keys.put("k5", 500)
    keys.put("k6", 600)
    keys.put("k6", 601)  # buffered after a spill: the later put still wins
    assert [keys.get(k) for k in ("k0", "k5", "k6", "k199", "absent")] == [0, 500, 601, 199, None]
    assert keys.spilled is (budget is not None)
    keys.put("k7", 700)
    assert keys.setdefault("k7", 1) == 700  # a buffered put is seen by setdefault too
    keys.close()


def test_put_of_a_known_key_does_not_grow_the_budget() -> None:
    keys = KeyMap(memory_bytes=1000)
    for value in range(1000):
        keys.put("the same key", value)
    assert not keys.spilled and keys.get("the same key") == 999
    for i in range(20):
        keys.put(f"new {i}", i)
    assert keys.spilled and keys.get("the same key") == 999 and keys.get("new 19") == 19
    keys.close()


def test_a_spill_file_left_by_a_crash_is_never_reused(tmp_path: Path) -> None:
    spill = tmp_path / "kv.db"
    stale = KeyMap(spill, memory_bytes=0)
    stale.put("a", 1)  # never closed: as if the process was killed
    keys = KeyMap(spill, memory_bytes=0)
    keys.put("b", 2)
    assert keys.get("a") is None and keys.get("b") == 2
    keys.close()


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
