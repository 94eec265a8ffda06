"""A str -> int map whose memory stays bounded: a dict while small, then SQLite on disk.

Inputs and responses files can hold millions of keys. Up to `memory_bytes` of keys live in
a plain dict (the common case, and the fastest); beyond that every entry moves to a SQLite
database on disk, whose page cache is a few MiB whatever the number of keys.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

MEMORY_BYTES = 4 << 20
"""Rough budget for the in-memory stage: key length plus ~100 bytes of dict overhead per entry."""

_ENTRY_OVERHEAD = 100

KEYSET_MEMORY_BYTES = 32 << 20
"""Budget of an input's keys in memory (~300,000 keys) before they spill to disk: each key
checked on disk costs ~10 us, and the validation pass is most of the daemon's CPU."""


class KeyMap:
    """First value wins, like `dict.setdefault`. `path`: where to spill (None: a private temp file).

    Not thread-safe; one reader/writer at a time. `close()` removes the spill file.
    """

    def __init__(self, path: Path | None = None, memory_bytes: int | None = None) -> None:
        self._path = path
        self._budget = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._size = 0
        self._memory: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[str, int]] = []

    @property
    def spilled(self) -> bool:
        return self._db is not None

    @property
    def size(self) -> int:
        """Roughly how many bytes of keys it holds (0: empty)."""
        return self._size

    def setdefault(self, key: str, value: int) -> int:
        """Store `value` under `key` unless the key is there; return the stored value."""
        if self._db is None:
            stored = self._memory.setdefault(key, value)
            if stored == value:
                self._size += len(key) + _ENTRY_OVERHEAD
                if self._size > self._budget:
                    self._spill()
            return stored
        self._flush()
        cursor = self._db.execute("INSERT OR IGNORE INTO kv VALUES (?, ?)", (key, value))
        if cursor.rowcount:
            return value
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def put(self, key: str, value: int) -> None:
        """Store `value` under `key`, replacing what was there (later answers win)."""
        if self._db is None:
            if key not in self._memory:
                self._size += len(key) + _ENTRY_OVERHEAD
            self._memory[key] = value
            if self._size > self._budget:
                self._spill()
            return
        self._pending.append((key, value))  # buffered: loading answers stays fast once spilled
        if len(self._pending) >= 10_000:
            self._flush()

    def get(self, key: str) -> int | None:
        if self._db is None:
            return self._memory.get(key)
        self._flush()
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self._memory = {}
        self._pending = []
        if self._db is not None:
            self._db.close()
            self._db = None
            if self._path is not None:
                self._path.unlink(missing_ok=True)

    def _spill(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)  # a crash's leftover (journal off): never reuse
        db = sqlite3.connect("" if self._path is None else self._path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value INTEGER) WITHOUT ROWID")
        db.executemany("INSERT INTO kv VALUES (?, ?)", self._memory.items())
        self._memory = {}
        self._db = db

    def _flush(self) -> None:
        if self._pending and self._db is not None:
            self._db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", self._pending)
            self._pending = []


class KeySet:
    """The keys of one input file and the line each was first used on: duplicates found with
    little memory. A line without a key gets its line number as key; such keys cost one bit
    each (they can only clash with a key a line gives itself); given keys go in a `KeyMap`."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self._given = KeyMap(
            memory_bytes=KEYSET_MEMORY_BYTES if memory_bytes is None else memory_bytes
        )
        self._numbered = bytearray()  # bit n: line n has no key of its own

    def add(self, key: str, line: int, *, auto: bool) -> int | None:
        """Record `key` of `line`; the line it was first used on if that is another line."""
        if auto:
            byte = line >> 3
            if byte >= len(self._numbered):
                self._numbered.extend(bytes(max(byte + 1 - len(self._numbered), 4096)))
            self._numbered[byte] |= 1 << (line & 7)
            return self._given.get(key) if self._given.size else None
        if key.isdigit() and key[0] != "0" and len(key) < 19:
            number = int(key)
            if number < line and self._is_numbered(number):
                return number
        first = self._given.setdefault(key, line)
        return None if first == line else first

    def _is_numbered(self, line: int) -> bool:
        byte = line >> 3
        return byte < len(self._numbered) and bool(self._numbered[byte] & (1 << (line & 7)))

    def close(self) -> None:
        self._given.close()
