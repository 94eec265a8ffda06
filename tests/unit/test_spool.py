"""daemon.spool: every folder and file name of the spool, which inbox names are taken, and
healing folders an operator removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import atomic
from daemon.spool import (
    NAME_MAX,
    WORK_FILE,
    Spool,
    is_candidate,
    name_too_long,
    stem,
    why_ignored,
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "inbox", tmp_path / "outbox")


def test_names_of_one_input(spool: Spool) -> None:
    processing = spool.inbox / "processing"
    assert spool.processing == processing
    assert (spool.done, spool.failed) == (spool.inbox / "done", spool.inbox / "failed")
    assert spool.input("a.jsonl") == processing / "a.jsonl"
    assert spool.sidecar("a.jsonl") == processing / "a.jsonl.job.json"
    assert spool.lock("a.jsonl") == processing / ".a.jsonl.lock"
    assert spool.cancel_marker("a.jsonl") == processing / ".cancel" / "a.jsonl"
    assert spool.work("0123456789ab", "j3.req") == processing / ".work" / "0123456789ab.j3.req"
    assert spool.results_target("a.jsonl") == spool.outbox / "a.jsonl"
    assert spool.report_target("a.jsonl") == spool.outbox / "a.error.json"
    assert spool.archive_folder(failed=True) == spool.failed
    assert spool.archive_folder(failed=False) == spool.done


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("0123456789ab.index", ("0123456789ab", "index")),
        ("0123456789ab.j12.req", ("0123456789ab", "j12.req")),
        ("0123456789ab.input", ("0123456789ab", "input")),
        (".a.jsonl.lock", None),
        ("0123456789AB.index", None),
        (".0123456789ab.index", None),
    ],
)
def test_work_file_names(name: str, match: tuple[str, str] | None) -> None:
    found = WORK_FILE.match(name)
    assert (found.groups() if found else None) == match


def test_work_files_of_one_claim(spool: Spool) -> None:
    spool.heal()
    mine = [spool.work("aaaaaaaaaaaa", what) for what in ("index", "j1.req", "j1.out")]
    for path in [*mine, spool.work("bbbbbbbbbbbb", "index"), spool.input("x.jsonl")]:
        path.write_bytes(b"")
    assert sorted(spool.work_files("aaaaaaaaaaaa")) == sorted(mine)


def test_work_files_without_a_processing_folder(spool: Spool) -> None:
    assert list(spool.work_files("aaaaaaaaaaaa")) == []


def test_heal_creates_what_is_missing_and_says_what(spool: Spool) -> None:
    assert spool.heal() == list(spool.folders())
    assert spool.heal() == []
    os.rmdir(spool.failed)
    os.rmdir(spool.outbox)
    assert spool.heal() == [spool.failed, spool.outbox]
    assert all(folder.is_dir() for folder in spool.folders())


def test_a_free_archive_name_is_free_for_the_input_and_its_sidecar(spool: Spool) -> None:
    spool.heal()
    assert spool.free_archive_name(spool.done, "a.jsonl") == spool.done / "a.jsonl"
    (spool.done / "a.jsonl").write_text("older input")
    (spool.done / "a-2.jsonl.job.json").write_text("an orphan sidecar")
    os.symlink("nowhere", spool.done / "a-3.jsonl")  # a dangling link is taken too
    assert spool.free_archive_name(spool.done, "a.jsonl") == spool.done / "a-4.jsonl"


def test_daemon_files(spool: Spool) -> None:
    spool.heal()
    mine = spool.daemon_file()
    assert mine.parent == spool.processing
    assert mine.name.startswith(".daemon.") and mine.name.endswith(f".{os.getpid()}.json")
    other = spool.daemon_file("otherhost", 7)
    for path in (mine, other, spool.processing / ".daemon.x.lock"):
        path.write_text("{}")
    assert spool.daemon_files() == sorted([mine, other])


def test_stem() -> None:
    assert stem("a.b.jsonl") == "a.b"
    assert stem("no-suffix") == "no-suffix"


# ---- which inbox names are taken -------------------------------------------------------------


def test_candidates() -> None:
    assert is_candidate("a.jsonl")
    assert is_candidate("with space é.jsonl")
    assert is_candidate("x.y.jsonl")
    assert not is_candidate(".a.jsonl")
    assert not is_candidate("a.json")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("a.jsonl", None),
        ("with space.jsonl", None),
        ("notes.txt", "only names ending in .jsonl are taken"),
        ("README", "only names ending in .jsonl are taken"),
        ("a.jsonl.tmp", "only names ending in .jsonl are taken"),
        ("UP.JSONL", "(lower case) are taken: rename it UP.jsonl"),
        ("Mixed.Jsonl", "rename it Mixed.jsonl"),
        ("prompts.json", "if it holds one request per line, rename it prompts.jsonl"),
        (".hidden.jsonl", "names starting with '.' are left alone"),
        (".jsonl", "names starting with '.'"),
        ("n" * 240 + ".jsonl", "the name is 246 bytes long"),
    ],
)
def test_why_ignored_explains_and_agrees_with_is_candidate(name: str, fragment: str | None) -> None:
    reason = why_ignored(name)
    assert (reason is None) == is_candidate(name)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason


def test_the_longest_name_taken_leaves_room_for_every_derived_name(tmp_path: Path) -> None:
    """Up to the limit `name_too_long` gives, the sidecar's temporary file can be written."""
    limit = next(
        n for n in range(NAME_MAX, 0, -1) if name_too_long("n" * (n - 6) + ".jsonl") is None
    )
    name = "n" * (limit - 6) + ".jsonl"
    reason = name_too_long("n" + name)
    assert reason is not None and f"up to {limit}" in reason
    sidecar = tmp_path / (name + ".job.json")
    atomic.write_bytes(sidecar, b"{}")
    assert sidecar.read_bytes() == b"{}"
    assert len(os.fsencode(atomic.temp_name(sidecar).name)) <= NAME_MAX
