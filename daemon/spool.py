"""Spool names: every folder and file name the daemon, the watcher and the CLI use, in one place.

For an input `inbox/NAME.jsonl` the daemon keeps, in `inbox/processing/`:

- `NAME.jsonl`, the claimed input, and `NAME.jsonl.job.json`, its sidecar (the contract's names);
- `.NAME.jsonl.lock`, whose flock makes one process the owner of the name;
- `.cancel/NAME.jsonl`, a cancel request from `gemini-batchd cancel` (a folder of its own, the
  only one watched with inotify besides the inbox);
- work files of one claim in `.work/{claim_id}.{what}`: a hard link to the claimed input
  (`input`), the compact index of its lines (`index`), and each job's requests (`jN.req`) and
  answers (`jN.out`). A folder of their own, because processing/ is watched with inotify for
  cancel requests and every write there would wake the watcher.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from . import atomic

INPUT_SUFFIX = ".jsonl"
SIDECAR_SUFFIX = ".job.json"
LOCK_SUFFIX = ".lock"
ERROR_SUFFIX = ".error.json"
DAEMON_PREFIX = ".daemon."
"""`processing/.daemon.HOST.PID.json` describes a running daemon; `.lock` beside it is held by it."""

NAME_MAX = 255
"""The longest file name, in bytes, on Linux filesystems."""
NAME_MARGIN = 16
"""Room left for `-N` suffixes and longer pids and clock readings in derived names."""

WORK_FILE = re.compile(r"^([0-9a-f]{12})\.([a-z0-9.]+)$")
"""`{claim_id}.{what}` in `processing/.work/`: a work file of one claim."""

HOST = socket.gethostname().replace(".", "_")

SPOOL_FOLDERS = frozenset({"processing", "done", "failed"})
"""The daemon's own folders in the inbox: never inputs, never listed as ignored."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udcff]")


def not_utf8(name: str) -> bool:
    """Whether a name from the file system held bytes that are not UTF-8 (Python keeps each as
    a lone surrogate): such a name cannot be written into a sidecar, a report or a log line."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return True
    return False


def printable(name: str, *, keep_lines: bool = False) -> str:
    """`name` safe to print on a terminal: control characters (ESC, newlines...) and bytes that
    were not UTF-8 (kept as surrogates by the file system encoding) as `\\xNN`. `keep_lines`:
    newlines and tabs stay (a traceback)."""
    control = _CONTROL_BUT_LINES if keep_lines else _CONTROL
    return control.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", name)


def is_candidate(name: str) -> bool:
    """Whether the daemon takes an inbox entry of this name (see `why_ignored`)."""
    return why_ignored(name) is None


def why_ignored(name: str) -> str | None:
    """Why the daemon leaves an inbox entry of this name alone, or None if it takes the name
    (for `validate`, `status` and the log; agrees with `is_candidate`)."""
    if name.startswith("."):
        return "names starting with '.' are left alone (writers use them while writing)"
    if not_utf8(name):
        return (
            f"the name is not UTF-8 (bytes {printable(name)}): rename it to a UTF-8 name "
            "ending in .jsonl"
        )
    if not name.endswith(INPUT_SUFFIX) or name == INPUT_SUFFIX:
        stem, dot, suffix = name.rpartition(".")
        if dot and suffix.lower() == INPUT_SUFFIX[1:]:
            return (
                f"only names ending in {INPUT_SUFFIX} (lower case) are taken:"
                f" rename it {stem}{INPUT_SUFFIX}"
            )
        if dot and suffix.lower() == "json":
            return (
                f"only names ending in {INPUT_SUFFIX} (one JSON request per line) are taken:"
                f" if it holds one request per line, rename it {stem}{INPUT_SUFFIX}"
            )
        return f"only names ending in {INPUT_SUFFIX} are taken"
    return name_too_long(name)


def name_too_long(name: str) -> str | None:
    """Why input `name` is too long to process, or None.

    The longest name derived from an input is the temporary file of its sidecar; were it over
    NAME_MAX, the sidecar could not be written and the file could not be tracked.
    """
    sidecar = name + SIDECAR_SUFFIX
    derived = (atomic.temp_name(Path(sidecar)).name, sidecar, "." + name + LOCK_SUFFIX)
    size = max(len(os.fsencode(n)) for n in derived) + NAME_MARGIN
    if size <= NAME_MAX:
        return None
    limit = len(os.fsencode(name)) - (size - NAME_MAX)
    return f"the name is {len(os.fsencode(name))} bytes long; the daemon takes names up to {limit}"


def stem(name: str) -> str:
    """`NAME` of `NAME.jsonl`."""
    return name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name


class Spool:
    """The folders of one inbox and its outbox, and the names of everything in them."""

    def __init__(self, inbox: Path, outbox: Path) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.processing = inbox / "processing"
        self.done = inbox / "done"
        self.failed = inbox / "failed"
        self.workdir = self.processing / ".work"
        self.cancels = self.processing / ".cancel"

    def folders(self) -> tuple[Path, ...]:
        return (
            self.inbox,
            self.processing,
            self.workdir,
            self.cancels,
            self.done,
            self.failed,
            self.outbox,
        )

    def heal(self) -> list[Path]:
        """Create whichever folder is missing (an operator's `rm -rf`); returns those created."""
        created = []
        for folder in self.folders():
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                created.append(folder)
        return created

    # ---- per input name -------------------------------------------------------------

    def input(self, name: str) -> Path:
        return self.processing / name

    def sidecar(self, name: str) -> Path:
        return self.processing / (name + SIDECAR_SUFFIX)

    def lock(self, name: str) -> Path:
        return self.processing / ("." + name + LOCK_SUFFIX)

    def cancel_marker(self, name: str) -> Path:
        return self.cancels / name

    def work(self, claim_id: str, what: str) -> Path:
        return self.workdir / f"{claim_id}.{what}"

    def work_files(self, claim_id: str) -> Iterator[Path]:
        """Every work file of a claim (and temp files written for them)."""
        prefix = f"{claim_id}."
        try:
            entries = list(os.scandir(self.workdir))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(prefix) or entry.name.startswith("." + prefix):
                yield Path(entry.path)

    def results_target(self, name: str) -> Path:
        return self.outbox / name

    def report_target(self, name: str) -> Path:
        return self.outbox / (stem(name) + ERROR_SUFFIX)

    def archive_folder(self, failed: bool) -> Path:
        return self.failed if failed else self.done

    def free_archive_name(self, folder: Path, name: str) -> Path:
        """A name in done/ or failed/ free for the input *and* its sidecar."""
        return next(
            p
            for p in atomic.unique_names(folder / name)
            if not os.path.lexists(p) and not os.path.lexists(str(p) + SIDECAR_SUFFIX)
        )

    # ---- daemons --------------------------------------------------------------------

    def daemon_file(self, host: str = HOST, pid: int | None = None) -> Path:
        return self.processing / f"{DAEMON_PREFIX}{host}.{pid or os.getpid()}.json"

    def daemon_files(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.processing))
        except OSError:
            return []
        return [
            self.processing / n
            for n in names
            if n.startswith(DAEMON_PREFIX) and n.endswith(".json")
        ]
