"""daemon.atomic: complete-or-absent writes, unique names, moves that never overwrite, temp cleanup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import atomic
from tests.support.harness import ROOT


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---- write_file ------------------------------------------------------------------------------


def test_write_file_creates_with_mode_640(tmp_path: Path, umask022: None) -> None:
    target = tmp_path / "out.jsonl"
    atomic.write_file(target, [b"a\n", b"b\n"])
    assert target.read_bytes() == b"a\nb\n"
    assert mode(target) == atomic.FILE_MODE == 0o640
    assert list(tmp_path.iterdir()) == [target]


def test_umask_can_only_narrow_the_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic.write_file(tmp_path / "x", [b"x"])
    finally:
        os.umask(old)
    assert mode(tmp_path / "x") == 0o600


def test_write_file_replaces_by_default(tmp_path: Path, umask022: None) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")
    target.chmod(0o644)
    atomic.write_file(target, [b"new"])
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o640
    assert list(tmp_path.iterdir()) == [target]


def test_write_file_no_replace_refuses_an_existing_name(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl"
    target.write_text("theirs")
    with pytest.raises(FileExistsError):
        atomic.write_file(target, [b"ours"], replace=False)
    assert target.read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [target]  # the temp file is gone too


def test_write_file_no_replace_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl"
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        atomic.write_file(target, [b"ours"], replace=False)
    assert not (tmp_path / "elsewhere").exists()


def test_write_file_no_replace_creates_a_new_name(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl"
    atomic.write_file(target, iter([b"1", b"2"]), replace=False)
    assert target.read_bytes() == b"12"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("replace", [True, False])
def test_no_partial_file_when_the_chunks_fail_half_way(tmp_path: Path, replace: bool) -> None:
    target = tmp_path / "out.jsonl"
    seen_temps: list[list[str]] = []

    def chunks() -> Iterator[bytes]:
        yield b"first half\n"
        seen_temps.append([p.name for p in tmp_path.iterdir()])
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        atomic.write_file(target, chunks(), replace=replace)
    assert list(tmp_path.iterdir()) == []
    # While writing, only a dot-file named after the target existed.
    assert len(seen_temps[0]) == 1
    assert seen_temps[0][0].startswith(".out.jsonl.")
    assert seen_temps[0][0].endswith(".tmp")


def test_failed_replace_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "sidecar.json"
    target.write_text("old")

    def chunks() -> Iterator[bytes]:
        yield b"new"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_file(target, chunks())
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_write_bytes_replaces(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl.job.json"
    atomic.write_bytes(target, b"1")
    atomic.write_bytes(target, b"2")
    assert target.read_bytes() == b"2"


def test_temp_names_are_unique_dot_files(tmp_path: Path) -> None:
    target = tmp_path / "x.jsonl"
    names = {atomic.temp_name(target) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path
        assert name.name.startswith(".x.jsonl.")
        assert name.name.endswith(".tmp")
        assert f".{os.getpid()}." in name.name


# ---- unique names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "second", "third"),
    [
        ("x.jsonl", "x-2.jsonl", "x-3.jsonl"),
        ("x.error.json", "x-2.error.json", "x-3.error.json"),
        ("x.jsonl.job.json", "x-2.jsonl.job.json", "x-3.jsonl.job.json"),
        ("a.b.jsonl", "a.b-2.jsonl", "a.b-3.jsonl"),
        ("notes.txt", "notes-2.txt", "notes-3.txt"),
        ("noext", "noext-2", "noext-3"),
    ],
)
def test_unique_names(tmp_path: Path, name: str, second: str, third: str) -> None:
    names = atomic.unique_names(tmp_path / name)
    assert [next(names).name for _ in range(3)] == [name, second, third]


def test_free_name(tmp_path: Path) -> None:
    assert atomic.free_name(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    (tmp_path / "x.jsonl").touch()
    assert atomic.free_name(tmp_path / "x.jsonl") == tmp_path / "x-2.jsonl"
    (tmp_path / "x-2.jsonl").symlink_to(tmp_path / "missing")  # a dangling link takes the name
    assert atomic.free_name(tmp_path / "x.jsonl") == tmp_path / "x-3.jsonl"
    (tmp_path / "x.error.json").touch()
    assert atomic.free_name(tmp_path / "x.error.json") == tmp_path / "x-2.error.json"
    (tmp_path / "x.jsonl.job.json").touch()
    assert atomic.free_name(tmp_path / "x.jsonl.job.json") == tmp_path / "x-2.jsonl.job.json"


# ---- move_new --------------------------------------------------------------------------------


def test_move_new_to_a_free_name(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_text("data")
    (tmp_path / "done").mkdir()
    moved = atomic.move_new(source, tmp_path / "done" / "x.jsonl")
    assert moved == tmp_path / "done" / "x.jsonl"
    assert moved.read_text() == "data"
    assert not source.exists()


def test_move_new_never_overwrites(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "x.jsonl").write_text("first")
    (done / "x-2.jsonl").write_text("second")
    source = tmp_path / "x.jsonl"
    source.write_text("third")
    moved = atomic.move_new(source, done / "x.jsonl")
    assert moved == done / "x-3.jsonl"
    assert [(done / n).read_text() for n in ("x.jsonl", "x-2.jsonl", "x-3.jsonl")] == [
        "first",
        "second",
        "third",
    ]
    assert not source.exists()


def test_move_new_sidecar_names(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl.job.json").write_text("old")
    source = tmp_path / "incoming"
    source.write_text("new")
    assert atomic.move_new(source, tmp_path / "x.jsonl.job.json").name == "x-2.jsonl.job.json"


def test_move_new_moves_a_symlink_itself(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("r")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    moved = atomic.move_new(link, tmp_path / "failed.jsonl")
    assert moved.is_symlink()
    assert os.readlink(moved) == str(real)
    assert not os.path.lexists(link)


def test_move_new_finishes_a_move_interrupted_by_a_crash(tmp_path: Path) -> None:
    """A crash between link and unlink leaves both names: the move completes, no `-2` copy."""
    source = tmp_path / "x.jsonl"
    source.write_text("data")
    done = tmp_path / "done"
    done.mkdir()
    os.link(source, done / "x.jsonl")
    moved = atomic.move_new(source, done / "x.jsonl")
    assert moved == done / "x.jsonl"
    assert not source.exists()
    assert [p.name for p in done.iterdir()] == ["x.jsonl"]


def test_move_new_of_a_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic.move_new(tmp_path / "absent", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


# ---- remove_stale_temps ------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def temp_for(folder: Path, name: str, pid: int, host: str | None = None) -> Path:
    path = folder / f".{name}.{host or atomic._HOST}.{pid}.{time.monotonic_ns()}.tmp"
    path.write_text("partial")
    return path


def test_removes_a_dead_pids_temp_but_not_a_live_ones(tmp_path: Path) -> None:
    dead = temp_for(tmp_path, "x.jsonl", dead_pid())
    parent = temp_for(tmp_path, "y.jsonl", os.getppid())
    mine = atomic.temp_name(tmp_path / "z.jsonl")
    mine.write_text("in progress")
    removed = atomic.remove_stale_temps(tmp_path)
    assert removed == [dead]
    assert not dead.exists()
    assert parent.exists()
    assert mine.exists()


def test_removes_a_temp_left_by_a_predecessor_with_our_pid(tmp_path: Path) -> None:
    """In a container the restarted daemon often gets the crashed one's pid again."""
    old = tmp_path / f".x.jsonl.{atomic._HOST}.{os.getpid()}.1.tmp"
    old.write_text("left by a crash")
    stamp = time.time() - 3600
    os.utime(old, (stamp, stamp))
    assert atomic.remove_stale_temps(tmp_path) == [old]


def test_other_hosts_temps_are_removed_only_when_old(tmp_path: Path) -> None:
    fresh = temp_for(tmp_path, "a.jsonl", 1, host="otherhost")
    old = temp_for(tmp_path, "b.jsonl", 1, host="otherhost")
    stamp = time.time() - atomic.STALE_TEMP_SECONDS - 10
    os.utime(old, (stamp, stamp))
    assert atomic.remove_stale_temps(tmp_path) == [old]
    assert fresh.exists()


def test_other_files_are_left_alone(tmp_path: Path) -> None:
    keep = [
        tmp_path / "x.jsonl",
        tmp_path / ".x.jsonl.part",
        tmp_path / ".notes.tmp",
        tmp_path / "visible.a.b.c.tmp",
    ]
    for path in keep:
        path.write_text("keep")
    assert atomic.remove_stale_temps(tmp_path) == []
    assert all(p.exists() for p in keep)


def test_missing_folder(tmp_path: Path) -> None:
    assert atomic.remove_stale_temps(tmp_path / "absent") == []


def test_a_crashed_writer_leaves_a_temp_that_the_next_start_removes(tmp_path: Path) -> None:
    """End to end: a child process dies mid-write (SIGKILL); its temp file is removed after."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from daemon import atomic\n"
        "def chunks():\n"
        "    yield b'half'\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic.write_file(Path(sys.argv[1]), chunks(), replace=False)\n"
    )
    target = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == -9
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.jsonl.")
    assert not target.exists()
    assert atomic.remove_stale_temps(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_fsync_dir(tmp_path: Path) -> None:
    atomic.fsync_dir(tmp_path)


# ---- group commit -------------------------------------------------------------------------------


def test_a_group_commit_makes_concurrent_writes_durable_in_few_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder_syncs: list[Path] = []
    real_fsync_dir = atomic.fsync_dir

    def counting(folder: Path) -> None:
        folder_syncs.append(folder)
        time.sleep(0.005)  # a disk: meanwhile the other writers queue up behind the leader
        real_fsync_dir(folder)

    monkeypatch.setattr(atomic, "fsync_dir", counting)
    group = atomic.GroupCommit()
    names = [tmp_path / f"f{i}.json" for i in range(40)]
    threads = [
        threading.Thread(target=group.write, args=(path, path.name.encode())) for path in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.read_bytes() for p in names] == [p.name.encode() for p in names]
    assert len(folder_syncs) < len(names)  # one folder sync a round, not one a file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_group_commit_fails_only_the_writer_whose_file_failed(tmp_path: Path) -> None:
    group = atomic.GroupCommit()
    group.write(tmp_path / "ok.json", b"1")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        group.write(tmp_path / "taken", b"2")  # a folder is in the way of the rename
    group.write(tmp_path / "ok.json", b"3")
    assert (tmp_path / "ok.json").read_bytes() == b"3"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_round_that_raises_ends_for_every_writer_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something other than an OSError escaping a round fails each writer in it (none waits for
    ever, none is told its file is durable), leaves no temp file, and the next round works."""
    real_fsync_dir = atomic.fsync_dir
    entered = threading.Event()

    def broken(folder: Path) -> None:
        entered.set()
        time.sleep(0.05)  # the other writers queue up behind this round or the next
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(atomic, "fsync_dir", broken)
    group = atomic.GroupCommit()
    errors: list[BaseException] = []

    def write(path: Path) -> None:
        try:
            group.write(path, b"x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(tmp_path / f"f{i}",)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 5 and all(isinstance(e, RuntimeError) for e in errors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(atomic, "fsync_dir", real_fsync_dir)
    group.write(tmp_path / "after", b"ok")
    assert (tmp_path / "after").read_bytes() == b"ok"
