"""InboxWatcher: which inbox files are complete, judged by events, settling time and rescans.

The watcher's clock is a fake one the tests move by hand. File modification times are set in
the future where a test needs a "fresh" file, so the watcher's wall-clock age shortcut (a file
found already old is ready at once) never depends on how fast the machine is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.spool import is_candidate, name_too_long
from daemon.watcher import InboxWatcher, open_for_writing
from tests.support.harness import FakeClock, wait_for

SETTLE = 2.0
HOUR_NS = 3600 * 10**9


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def watcher(inbox: Path, clock: FakeClock) -> InboxWatcher:
    return InboxWatcher(inbox, SETTLE, clock)


def fresh(path: Path, data: bytes = b'"x"\n', *, bump: int = 0) -> Path:
    """Write `path` and date it in the future: it never looks old enough to skip settling."""
    path.write_bytes(data)
    stamp = time.time_ns() + HOUR_NS + bump
    os.utime(path, ns=(stamp, stamp))
    return path


def old(path: Path, data: bytes = b'"x"\n') -> Path:
    """Write `path` dated an hour ago: it has obviously been left alone for a while."""
    path.write_bytes(data)
    stamp = time.time_ns() - HOUR_NS
    os.utime(path, ns=(stamp, stamp))
    return path


def names(ready: list[tuple[Path, int]]) -> list[str]:
    return [path.name for path, _ in ready]


def paths(ready: list[tuple[Path, int]]) -> list[Path]:
    return [path for path, _ in ready]


# ---- events ---------------------------------------------------------------------------------


def test_closed_after_write_is_ready_at_once(watcher: InboxWatcher, inbox: Path) -> None:
    fresh(inbox / "a.jsonl")
    watcher.note("a.jsonl", complete=False)  # created, written ...
    assert watcher.ready() == []
    watcher.note("a.jsonl", complete=True)  # ... closed
    assert paths(watcher.ready()) == [inbox / "a.jsonl"]


def test_moved_in_is_ready_at_once(watcher: InboxWatcher, inbox: Path) -> None:
    fresh(inbox / "b.jsonl")
    watcher.note("b.jsonl", complete=True)
    assert paths(watcher.ready()) == [inbox / "b.jsonl"]


def test_created_only_waits_until_settled(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    fresh(inbox / "c.jsonl")
    watcher.note("c.jsonl", complete=False)
    assert watcher.ready() == []
    clock.advance(SETTLE - 0.01)
    assert watcher.ready() == []
    clock.advance(0.02)
    assert paths(watcher.ready()) == [inbox / "c.jsonl"]


def test_a_file_that_keeps_changing_is_not_ready(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    path = fresh(inbox / "d.jsonl")
    watcher.note("d.jsonl", complete=False)
    data = b""
    for i in range(10):  # 10 * 0.75 * SETTLE: far past the settle time in all
        clock.advance(0.75 * SETTLE)
        data += b'"more"\n'
        fresh(path, data, bump=i)  # changed without an event (events can be dropped)
        assert watcher.ready() == [], f"round {i}"
    clock.advance(SETTLE)
    assert paths(watcher.ready()) == [path]


def test_a_write_after_close_starts_settling_again(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    path = fresh(inbox / "e.jsonl")
    watcher.note("e.jsonl", complete=True)
    fresh(path, b'"changed"\n', bump=1)
    watcher.note("e.jsonl", complete=False)  # modified again after the close
    assert watcher.ready() == []
    clock.advance(SETTLE)
    assert paths(watcher.ready()) == [path]


def test_ready_hands_each_file_out_once_in_the_order_first_seen(
    watcher: InboxWatcher, inbox: Path
) -> None:
    for name in ("z.jsonl", "a.jsonl", "m.jsonl"):
        fresh(inbox / name)
        watcher.note(name, complete=True)
    assert names(watcher.ready(limit=2)) == ["z.jsonl", "a.jsonl"]
    assert names(watcher.ready()) == ["m.jsonl"]
    assert watcher.ready() == []  # handed out: claimed, or put back
    assert watcher.pending == 3
    watcher.put_back("a.jsonl")  # its name was busy: it waits
    watcher.forget("z.jsonl")  # claimed
    assert names(watcher.ready()) == ["a.jsonl"]
    assert watcher.pending == 2


def test_arrival_is_when_a_file_was_moved_in_however_the_watcher_heard_of_it(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    """Job slots go in arrival order: the file's ctime (its rename into place), the same for a
    file noted by an event and one found by a rescan -- not when the watcher got to it."""
    for name in ("first.jsonl", "second.jsonl", "third.jsonl"):
        (inbox / f".{name}").write_bytes(b'"x"\n')
    for name in ("first.jsonl", "second.jsonl", "third.jsonl"):
        os.rename(inbox / f".{name}", inbox / name)
        time.sleep(0.02)  # past the file system's timestamp granularity
    watcher.note("third.jsonl", complete=True)  # its event came first
    watcher.rescan()  # the others' events were dropped
    ready = watcher.ready()  # only the one moved in is complete yet
    clock.advance(SETTLE)  # found by a rescan: ready once settled
    ready += watcher.ready()
    assert sorted(names(ready)) == ["first.jsonl", "second.jsonl", "third.jsonl"]
    for path, arrival in ready:
        assert arrival == path.lstat().st_ctime_ns
    by_arrival = [path.name for path, arrival in sorted(ready, key=lambda item: item[1])]
    assert by_arrival == ["first.jsonl", "second.jsonl", "third.jsonl"]


# ---- rescans and names --------------------------------------------------------------------------


def test_rescan_finds_files_whose_events_were_missed(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    old(inbox / "old.jsonl")
    fresh(inbox / "new.jsonl")
    assert watcher.ready() == []  # no event came
    watcher.rescan()
    assert watcher.pending == 2
    assert paths(watcher.ready()) == [inbox / "old.jsonl"]  # unchanged for an hour already
    clock.advance(SETTLE)
    assert names(watcher.ready()) == ["new.jsonl"]


def test_rescan_keeps_what_it_already_knows(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    fresh(inbox / "f.jsonl")
    watcher.note("f.jsonl", complete=True)
    watcher.rescan()
    assert paths(watcher.ready()) == [inbox / "f.jsonl"]


@pytest.mark.parametrize(
    "name", [".hidden.jsonl", ".f.jsonl.part", "notes.txt", "f.jsonl.bak", ".jsonl", "f.JSONL"]
)
def test_dot_files_and_other_names_are_ignored(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock, name: str
) -> None:
    old(inbox / name)
    watcher.note(name, complete=True)
    watcher.rescan()
    clock.advance(10 * SETTLE)
    assert watcher.ready() == []
    assert watcher.pending == 0
    assert not is_candidate(name)


# ---- writers that keep the file open -------------------------------------------------------------


def test_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'"x"\n')
    if open_for_writing(path) is None:
        pytest.skip("file leases are not available here")
    assert open_for_writing(path) is False
    with path.open("ab") as handle:
        handle.write(b'"y"\n')
        assert open_for_writing(path) is True
    assert open_for_writing(path) is False
    with path.open("rb"):
        assert open_for_writing(path) is False  # readers do not count
    assert open_for_writing(tmp_path / "missing.jsonl") is None


def test_a_file_held_open_for_writing_is_not_ready(
    watcher: InboxWatcher, inbox: Path, clock: FakeClock
) -> None:
    path = old(inbox / "held.jsonl")
    if open_for_writing(path) is None:
        pytest.skip("file leases are not available here")
    watcher.note("held.jsonl", complete=True)
    with path.open("ab"):
        clock.advance(10 * SETTLE)
        assert watcher.ready() == []
    assert paths(watcher.ready()) == [path]


# ---- the real inotify observer ----------------------------------------------------------------


@pytest.fixture
def observed(inbox: Path, clock: FakeClock) -> Iterator[InboxWatcher]:
    """A started watcher whose settle time never passes: only events can make files ready."""
    (inbox / "processing" / ".cancel").mkdir(parents=True)
    watcher = InboxWatcher(inbox, 10_000, clock)
    watcher.start()
    yield watcher
    watcher.stop()


def test_observer_rename_into_place(observed: InboxWatcher, inbox: Path) -> None:
    tmp = fresh(inbox / ".r.jsonl.part")
    os.rename(tmp, inbox / "r.jsonl")
    assert wait_for(lambda: names(observed.ready()), timeout=10) == ["r.jsonl"]


def test_observer_write_in_place(observed: InboxWatcher, inbox: Path) -> None:
    path = inbox / "w.jsonl"
    with path.open("wb") as handle:
        handle.write(b'"half')
        handle.flush()
        wait_for(lambda: observed.pending, timeout=10)
        assert observed.ready() == []  # created and open: not complete
        handle.write(b'"\n')
    assert wait_for(lambda: names(observed.ready()), timeout=10) == ["w.jsonl"]


def test_observer_start_lists_existing_files(inbox: Path, clock: FakeClock) -> None:
    old(inbox / "there.jsonl")
    fresh(inbox / "young.jsonl")
    watcher = InboxWatcher(inbox, SETTLE, clock)
    watcher.start()
    try:
        assert names(watcher.ready()) == ["there.jsonl"]
    finally:
        watcher.stop()


def test_observer_cancel_marker(observed: InboxWatcher, inbox: Path) -> None:
    (inbox / "processing" / ".cancel" / "job.jsonl").write_bytes(b"")
    assert wait_for(observed.take_cancel_requests, timeout=10) == {"job.jsonl"}
    assert observed.take_cancel_requests() == set()
    assert observed.ready() == []


def test_rescan_finds_cancel_markers_of_files_in_processing(
    watcher: InboxWatcher, inbox: Path
) -> None:
    processing = inbox / "processing"
    (processing / ".cancel").mkdir(parents=True)
    (processing / "a.jsonl").write_bytes(b'"x"\n')
    (processing / ".cancel" / "a.jsonl").write_bytes(b"")
    (processing / ".cancel" / "gone.jsonl").write_bytes(b"")  # its file has finished
    (processing / ".cancel" / ".b.jsonl.host.1.2.tmp").write_bytes(b"")
    watcher.rescan()
    assert watcher.take_cancel_requests() == {"a.jsonl"}
    assert watcher.take_cancel_requests() == set()
    assert watcher.ready() == []


def test_names_too_long_for_the_sidecar_are_not_candidates(
    watcher: InboxWatcher, inbox: Path
) -> None:
    assert name_too_long("a.jsonl") is None
    assert name_too_long("n" * 150 + ".jsonl") is None
    reason = name_too_long("n" * 240 + ".jsonl")
    assert reason is not None and "246 bytes" in reason
    long_name = "é" * 120 + ".jsonl"  # 246 bytes in UTF-8
    assert name_too_long(long_name) is not None
    assert not is_candidate(long_name)
    old(inbox / long_name)
    watcher.rescan()
    watcher.note(long_name, complete=True)
    assert watcher.ready() == []
    assert watcher.pending == 0


def test_rescan_says_which_inbox_entries_are_ignored_and_why(
    watcher: InboxWatcher, inbox: Path
) -> None:
    for name in ("notes.txt", "UP.JSONL", ".writing.jsonl", "a.jsonl"):
        old(inbox / name)
    for folder in ("processing", "done", "failed"):
        (inbox / folder).mkdir()
    watcher.rescan()
    assert sorted(watcher.ignored) == ["UP.JSONL", "notes.txt"]  # dot-files and folders: silent
    assert "rename it UP.jsonl" in watcher.ignored["UP.JSONL"]
    (inbox / "notes.txt").unlink()
    watcher.rescan()
    assert sorted(watcher.ignored) == ["UP.JSONL"]
