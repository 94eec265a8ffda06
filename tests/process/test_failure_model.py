"""Issue 8's failure model, proved on the real daemon: one test per fault the issue lists.

Each test runs `gemini-batchd run` as a subprocess against the simulator, injects the fault
on the wire (or in the spool, or with signals and `kill -9`), and checks what a user can
see: one job per file, exact results, no job left running, no file left at the API, and no
error report for a fault that went away.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.faults import CRASH_ENV
from daemon.simulator import Fault, Simulator
from tests.support.guarantees import (
    NoDacSpool,
    assert_exact_answers,
    assert_no_job_running,
    assert_no_remote_files,
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    can_drop_caps,
    kill9,
    left_in_processing,
    state_of,
    wait_killed,
    wait_started,
)
from tests.support.harness import Spool, wait_for
from tests.support.settings import merged

CREATE = ":batchGenerateContent"  # POST models/M:batchGenerateContent
POLL = "batches/"  # GET batches/ID: a poll, or the GET of a finished inline job
LIST = "batches?"  # GET batches?pageSize=...: a lookup by display name, or the pause probe
DOWNLOAD = ":download"  # GET download/.../files/ID:download: a job's responses file
GARBLED = ("html", "truncated", "empty")  # 200 replies a JSON client cannot use

FAST: dict[str, Any] = {
    "log_level": "info",
    "api": {
        "timeout_seconds": 2,
        "retries": 1,
        "lookup_grace_seconds": 3,
        "backoff_initial_seconds": 0.05,
        "backoff_max_seconds": 0.3,
    },
}
"""Small deadlines and backoffs; tests override single keys of a section."""

MakeSpool = Callable[..., Spool]


def settings(**overrides: Any) -> dict[str, Any]:
    """FAST with `overrides`; a section given as a dict overrides single keys of FAST's."""
    return merged(copy.deepcopy(FAST), overrides)


@pytest.fixture
def make_spool(tmp_path: Path, sim: Simulator) -> Iterator[MakeSpool]:
    """Spools with FAST settings (on `sim` and tmp_path unless told); stopped after the test."""
    made: list[Spool] = []

    def make(
        *,
        kind: type[Spool] = Spool,
        root: Path | None = None,
        simulator: Simulator | None = None,
        **overrides: Any,
    ) -> Spool:
        spool = kind(root or tmp_path, simulator or sim, **settings(**overrides))
        made.append(spool)
        return spool

    yield make
    for spool in made:
        spool.stop_all(timeout=10)


def prompts(stem: str, count: int) -> list[str]:
    return [f"{stem} request {i}" for i in range(1, count + 1)]


def events(
    spool: Spool, prefix: str, log: int | None = None, **fields: Any
) -> list[dict[str, Any]]:
    """Log events whose text starts with `prefix` (of one process's log if `log` is given)."""
    found = []
    paths = spool.log_paths if log is None else [spool.log_paths[log]]
    for path in paths:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            text = str(event.get("event", ""))
            if text.startswith(prefix) and all(event.get(k) == v for k, v in fields.items()):
                found.append(event)
    return found


def add_faults(sim: Simulator, *faults: Fault) -> list[Fault]:
    for fault in faults:
        sim.add_fault(fault)
    return list(faults)


def assert_used(faults: list[Fault]) -> None:
    """Every injected fault was met (else the test proved nothing)."""
    left = [f for f in faults if f.times > 0]
    assert not left, f"faults never reached: {left}"


def assert_clean(spool: Spool, files: dict[str, list[str]], jobs: int) -> None:
    """The guarantees, for inputs of plain string prompts: each finished with exact results
    from one job, nothing runs or is stored at the API any more, nothing leaked."""
    assert_nothing_lost(spool, sorted(files), jobs=jobs)
    for name, lines in files.items():
        assert_exact_answers(spool, name, lines)
    assert_no_job_running(spool.sim)
    assert_no_remote_files(spool.sim)
    assert_no_secret(spool)
    assert_no_stray_traceback(spool)


def run_once(spool: Spool, *args: str, env: dict[str, str] | None = None) -> None:
    rc = spool.run_once(*args, env=env, timeout=60)
    assert rc == 0, f"exit status {rc}: {spool.logs()[-4000:]}"


def drop_all(spool: Spool, files: dict[str, list[str]]) -> None:
    for name, lines in files.items():
        spool.drop(name, lines)


def job_field(spool: Spool, name: str, field: str = "state", index: int = 0) -> Any:
    """A field of one job entry of NAME's sidecar; None while there is none."""
    try:
        return spool.sidecar(name)["jobs"][index][field]
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return None


class NotifySocket:
    """A stand-in for systemd's notify socket: collects the daemon's sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    def messages(self) -> list[str]:
        while True:
            try:
                self.received.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.received

    def statuses(self) -> list[str]:
        return [
            line[len("STATUS=") :]
            for message in self.messages()
            for line in message.splitlines()
            if line.startswith("STATUS=")
        ]

    def close(self) -> None:
        self.sock.close()


# ---- results thrown away ----------------------------------------------------------------


def test_faults_on_the_results_download_are_retried(make_spool: MakeSpool, sim: Simulator) -> None:
    """A SUCCEEDED File-API job whose responses download gets a 403, a 404, an HTML page, a
    truncated body, a cut connection and an empty body, in turn: its results are written,
    exactly, from the one job (none of it is taken for missing answers and sent again)."""
    spool = make_spool(limits={"inline_max_bytes": 10})
    faults = add_faults(
        sim,
        Fault("GET", DOWNLOAD, status=403),
        Fault("GET", DOWNLOAD, status=404),
        Fault.garbled("html", method="GET", path_contains=DOWNLOAD),
        Fault.garbled("truncated", after=True, method="GET", path_contains=DOWNLOAD),
        Fault.garbled("cut", after=True, method="GET", path_contains=DOWNLOAD),
        Fault.garbled("empty", after=True, method="GET", path_contains=DOWNLOAD),
    )
    files = {"a.jsonl": prompts("a", 5)}
    drop_all(spool, files)
    run_once(spool)
    assert_used(faults)
    assert spool.sidecar("a.jsonl")["jobs"][0]["mode"] == "file"
    assert_clean(spool, files, jobs=1)


def test_garbled_inline_get_after_a_restart_is_retried(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """kill -9 once the inline job SUCCEEDED, before its answers were saved; after the restart
    the GET that fetches them is an HTML page, then truncated, then empty: results written."""
    spool = make_spool()
    files = {"b.jsonl": prompts("b", 4)}
    drop_all(spool, files)
    wait_killed(spool.start("--once", env={CRASH_ENV: "while_fetching"}))
    assert job_field(spool, "b.jsonl") == "ENDED"
    faults = add_faults(
        sim,
        *(Fault.garbled(b, after=True, method="GET", path_contains=POLL) for b in GARBLED),
    )
    run_once(spool)
    assert_used(faults)
    assert_clean(spool, files, jobs=1)


# ---- jobs orphaned ----------------------------------------------------------------------


def test_garbled_create_replies_adopt_the_job(make_spool: MakeSpool, sim: Simulator) -> None:
    """Creates that made the job but answered truncated JSON, an HTML page or an empty body
    (all with 200): each job is found by its display name and adopted, none made twice."""
    spool = make_spool()
    faults = add_faults(
        sim, *(Fault.garbled(b, after=True, method="POST", path_contains=CREATE) for b in GARBLED)
    )
    files = {f"c{i}.jsonl": prompts(f"c{i}", 3) for i in range(len(GARBLED))}
    drop_all(spool, files)
    run_once(spool)
    assert_used(faults)
    assert_clean(spool, files, jobs=len(files))
    assert sim.create_calls == len(files)
    adopted = events(spool, "adopted a job")
    assert sorted(e["file"] for e in adopted) == sorted(files)


def test_lookup_faults_and_a_404_poll_keep_the_one_job(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """A create whose reply is lost; the listing that looks it up answers truncated JSON, then
    403; later one poll answers 404. One job, results, nothing left running."""
    spool = make_spool()
    faults = add_faults(
        sim,
        Fault.reset(after=True, method="POST", path_contains=CREATE),
        Fault.garbled("truncated", after=True, method="GET", path_contains=LIST),
        Fault("GET", LIST, status=403),
        Fault("GET", POLL, status=404),
    )
    files = {"d.jsonl": prompts("d", 3)}
    drop_all(spool, files)
    run_once(spool)
    assert_used(faults)
    assert_clean(spool, files, jobs=1)
    assert sim.create_calls == 1
    assert events(spool, "adopted a job", file="d.jsonl")


# ---- duplicate jobs ---------------------------------------------------------------------


def test_creates_in_doubt_with_list_lag_make_one_job_each(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """The listing shows a new job only 2 s after its creation (lookup grace: 4 s). One create
    is answered after the client's 1 s deadline; another's reply is lost and one listing comes
    back as an empty 200. Both jobs are found within the grace period, neither made again."""
    spool = make_spool(api={"timeout_seconds": 1, "lookup_grace_seconds": 4})
    sim.list_lag_seconds = 2
    faults = add_faults(
        sim,
        Fault.late(2.5, method="POST", path_contains=CREATE),
        Fault.reset(after=True, method="POST", path_contains=CREATE),
        Fault.garbled("empty", after=True, method="GET", path_contains=LIST),
    )
    files = {"e1.jsonl": prompts("e1", 3), "e2.jsonl": prompts("e2", 2)}
    drop_all(spool, files)
    run_once(spool)
    assert_used(faults)
    assert_clean(spool, files, jobs=2)
    assert sim.create_calls == 2
    assert events(spool, "the job is not listed yet"), "the listing lag was never met"
    assert not events(spool, "no job was made")


# ---- operator problems ------------------------------------------------------------------


def test_a_rejected_key_pauses_loudly_and_resumes(
    make_spool: MakeSpool, sim: Simulator, tmp_path: Path
) -> None:
    """The key is rejected (400 API_KEY_INVALID, then 401, then 403) while the daemon runs: no
    file fails, the pause is logged once, systemd's STATUS= says paused. Killed during the
    pause, the daemon does not start while the key is still rejected (exit 2, the start-up key
    check); once the key works again every file finishes with one job."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path)}
    spool = make_spool()
    first = spool.start(env=env)
    wait_started(spool, first)
    rejection = sim.reject_key(400)

    def reject_next(status: int) -> None:
        """The next kind of rejection, with no moment between the two windows."""
        nonlocal rejection
        previous, rejection = rejection, sim.reject_key(status)
        previous.end = sim.clock()
        wait_for(lambda: any(code == status for _, _, code in sim.requests_log), timeout=20)

    files = {f"k{i}.jsonl": prompts(f"k{i}", 2) for i in range(3)}
    drop_all(spool, files)
    wait_for(lambda: events(spool, "paused", log=0), timeout=20)
    reject_next(401)
    reject_next(403)
    time.sleep(1.0)  # paused for a while: the log must not repeat itself
    assert not sim.jobs
    assert not any((spool.inbox / "failed").iterdir())
    assert not list(spool.outbox.iterdir())
    kill9(first)
    second = spool.start(env=env)
    assert second.wait(timeout=30) == 2  # the key check at start: still rejected
    assert "rejected the key" in spool.log_paths[1].read_text()
    sim.accept_key()
    third = spool.start(env=env)
    wait_for(lambda: all(spool.finished(n) for n in files), timeout=30)
    assert third.poll() is None
    paused = events(spool, "paused", log=0)
    assert len(paused) == 1, paused
    assert " 400 " in paused[0]["reason"], paused
    noisy = [
        e
        for e in events(spool, "", log=0)
        if e.get("level") in ("warning", "error") and not str(e["event"]).startswith("paused")
    ]
    assert len(noisy) <= 3, noisy
    statuses = notify.statuses()
    notify.close()
    assert any(s.startswith("paused: API key") for s in statuses), statuses
    assert_clean(spool, files, jobs=len(files))


# ---- one slow connection ----------------------------------------------------------------


def test_trickling_polls_are_cut_and_validation_goes_on(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """Polls trickle their replies (body, or status line and headers) a byte at a time, far
    longer than the 1 s deadline, enough of them to hold every API worker: each is cut and
    retried, and a file dropped meanwhile is claimed and validated at once."""
    spool = make_spool(api={"timeout_seconds": 1})
    sim.running_seconds = 3
    files = {f"t{i}.jsonl": prompts(f"t{i}", 2) for i in range(4)}
    drop_all(spool, files)
    proc = spool.start()
    wait_for(lambda: all(state_of(spool, n) == "RUNNING" for n in files), timeout=20)
    faults = add_faults(
        sim,
        Fault.trickling(0.05, method="GET", path_contains=POLL, times=4),
        Fault.trickling(0.05, headers=True, method="GET", path_contains=POLL, times=4),
    )
    total = sum(f.times for f in faults)
    wait_for(lambda: total - sum(f.times for f in faults) >= 4, timeout=10)  # workers held
    held_since = time.monotonic()
    late = {"late.jsonl": prompts("late", 2)}
    drop_all(spool, late)
    wait_for(lambda: events(spool, "validated", file="late.jsonl"), timeout=10)
    validated_in = time.monotonic() - held_since
    assert sum(f.times for f in faults) > 0, "validation waited for the trickles to end"
    assert validated_in < 2, validated_in
    wait_for(lambda: all(spool.finished(n) for n in {**files, **late}), timeout=40)
    assert proc.poll() is None
    assert_used(faults)
    cut = [e for e in events(spool, "will retry") if "deadline" in str(e.get("error"))]
    assert len(cut) == 1, cut  # every trickle was cut and retried (above); said once a minute
    spool.stop_all()
    assert_clean(spool, {**files, **late}, jobs=5)


# ---- signal handler ---------------------------------------------------------------------


def test_signal_storms_while_busy_stop_cleanly(make_spool: MakeSpool, sim: Simulator) -> None:
    """A second of SIGHUP storms, then a storm of SIGHUP and SIGTERM, while jobs are in flight:
    the daemon reloads, exits 0 within a few seconds (no handler deadlock), and a restart
    finishes every file."""
    spool = make_spool()
    sim.running_seconds = 2
    files = {f"s{i}.jsonl": prompts(f"s{i}", 3) for i in range(4)}
    drop_all(spool, files)
    proc = spool.start()
    wait_for(lambda: all(state_of(spool, n) == "RUNNING" for n in files), timeout=20)
    storm_until = time.monotonic() + 1.0
    while time.monotonic() < storm_until:  # at every point of the main loop, locks held or not
        for _ in range(20):
            os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.002)
    assert proc.poll() is None, "SIGHUP stopped the daemon"
    wait_for(lambda: len(events(spool, "configuration reloaded")) >= 2, timeout=5)
    started = time.monotonic()
    for i in range(200):
        os.kill(proc.pid, signal.SIGTERM if i % 2 else signal.SIGHUP)
    rc = proc.wait(timeout=15)
    took = time.monotonic() - started
    assert rc == 0 and took < 5, (rc, took, spool.logs()[-2000:])
    run_once(spool)
    assert_clean(spool, files, jobs=len(files))


# ---- spool folders ----------------------------------------------------------------------


def test_removed_inbox_and_outbox_heal(make_spool: MakeSpool, sim: Simulator) -> None:
    """`rm -rf inbox && mkdir inbox` while the daemon runs, then `rm -rf outbox`: new files are
    still claimed and their results land in a recreated outbox, each folder warned once."""
    spool = make_spool(inbox_rescan_seconds=30)  # healing must not wait for a rescan
    proc = spool.start()
    wait_started(spool, proc)
    first = {"h1.jsonl": prompts("h1", 2)}
    drop_all(spool, first)
    wait_for(lambda: spool.finished("h1.jsonl"), timeout=20)
    shutil.rmtree(spool.inbox)
    spool.inbox.mkdir(exist_ok=True)  # (the daemon may have made it again already)
    second = {"h2.jsonl": prompts("h2", 2)}
    drop_all(spool, second)
    wait_for(lambda: spool.finished("h2.jsonl"), timeout=20)
    assert_exact_answers(spool, "h2.jsonl", second["h2.jsonl"])
    shutil.rmtree(spool.outbox)
    third = {"h3.jsonl": prompts("h3", 2)}
    drop_all(spool, third)
    wait_for(lambda: spool.finished("h3.jsonl"), timeout=20)
    assert proc.poll() is None
    warned = [e["folder"] for e in events(spool, "recreated a missing spool folder")]
    for folder in ("processing", "done", "failed", "outbox"):
        assert sum(1 for w in warned if Path(w).name == folder) == 1, warned
    assert len(events(spool, "the inbox folder was replaced")) == 1
    spool.stop_all()
    assert_exact_answers(spool, "h3.jsonl", third["h3.jsonl"])
    assert_nothing_lost(spool, ["h3.jsonl"])  # the outbox holds h3 alone: h1's went with it


@pytest.mark.skipif(not can_drop_caps(), reason="needs root and setpriv to drop CAP_DAC_*")
def test_an_unwritable_processing_folder_is_logged_once_a_minute(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """processing/ turns read-only (0555) with a job in flight and files waiting in the inbox:
    nothing fails, each cause is logged about once, and all finish once it is writable again."""
    spool = make_spool(kind=NoDacSpool)
    sim.running_seconds = 1.5
    running = {"u0.jsonl": prompts("u0", 2)}
    drop_all(spool, running)
    proc = spool.start()
    wait_for(lambda: state_of(spool, "u0.jsonl") == "RUNNING", timeout=20)
    processing = spool.inbox / "processing"
    processing.chmod(0o555)
    waiting = {f"u{i}.jsonl": prompts(f"u{i}", 2) for i in (1, 2)}
    try:
        drop_all(spool, waiting)
        time.sleep(2.0)  # the job ends meanwhile: its sidecar cannot be saved either
        assert all((spool.inbox / n).exists() for n in waiting)
    finally:
        processing.chmod(0o755)
    wait_for(lambda: all(spool.finished(n) for n in {**running, **waiting}), timeout=30)
    assert proc.poll() is None
    noisy = [
        e
        for e in events(spool, "")
        if e.get("level") in ("warning", "error") and "ermission" in str(e)
    ]
    causes: dict[str, int] = {}
    for event in noisy:
        causes[str(event["event"])] = causes.get(str(event["event"]), 0) + 1
    assert all(count <= 2 for count in causes.values()), noisy
    spool.stop_all()
    assert_clean(spool, {**running, **waiting}, jobs=3)


# ---- input replaced in flight -----------------------------------------------------------


def test_an_input_replaced_in_flight(make_spool: MakeSpool, sim: Simulator) -> None:
    """With two daemons on the inbox, another file is renamed over processing/NAME while NAME's
    job runs: NAME gets the answers to what was claimed; the replacement gets an error report
    saying so and ends in failed/ (once, over several rescans); one daemon owns the name."""
    spool = make_spool()
    sim.running_seconds = 2
    procs = [spool.start(), spool.start()]
    for proc in procs:
        wait_started(spool, proc)
    original = prompts("original", 3)
    spool.drop("r.jsonl", original)
    wait_for(lambda: state_of(spool, "r.jsonl") == "RUNNING", timeout=20)
    replacement = b'"replacement 1"\n"replacement 2"\n'
    staged = spool.root / "replacement.jsonl"
    staged.write_bytes(replacement)
    os.rename(staged, spool.inbox / "processing" / "r.jsonl")
    wait_for(lambda: spool.finished("r.jsonl"), timeout=30)
    time.sleep(1.3)  # a rescan by each daemon after the fact (inbox_rescan_seconds: 1)
    assert all(p.poll() is None for p in procs)
    assert_exact_answers(spool, "r.jsonl", original)
    report_path = spool.outbox / "r.error.json"
    assert "replaced" in report_path.read_text()
    assert sorted(p.name for p in spool.outbox.iterdir()) == ["r.error.json", "r.jsonl"]
    failed = sorted(p.name for p in (spool.inbox / "failed").iterdir())
    assert failed == ["r.jsonl"], failed
    assert (spool.inbox / "failed" / "r.jsonl").read_bytes() == replacement
    done = sorted(p.name for p in (spool.inbox / "done").iterdir())
    assert done == ["r.jsonl", "r.jsonl.job.json"], done
    assert (spool.inbox / "done" / "r.jsonl").read_text().splitlines()[0] == '"original request 1"'
    assert not left_in_processing(spool.inbox)
    claimed = events(spool, "claimed", file="r.jsonl") + events(spool, "resumed", file="r.jsonl")
    assert len(claimed) == 1, claimed
    assert len(sim.jobs) == 1
    assert_no_job_running(sim)


# ---- peers with other settings ----------------------------------------------------------


@pytest.fixture
def second_sim() -> Iterator[Simulator]:
    """Another API endpoint, whose jobs run until a test ends them."""
    with Simulator(pending_seconds=0.1, running_seconds=30, seed=8) as simulator:
        yield simulator


@pytest.mark.parametrize("other", ["endpoint", "key"])
def test_a_dead_peers_files_with_other_settings_are_left_alone(
    other: str, make_spool: MakeSpool, sim: Simulator, second_sim: Simulator, tmp_path: Path
) -> None:
    """A peer with another API endpoint (or another key) is killed with jobs in flight. The
    survivor leaves its files alone, says so once, fails nothing; the peer, started again,
    finishes them.

    With another key, one file's job is known by name (the survivor's key gets 404 for it) and
    one file's create is in doubt (kill -9 during its lookup: only the peer's key can list it).
    """
    peer_sim = sim if other == "key" else second_sim
    peer_env = {"GEMINI_API_KEY": "AIzaPEER-other-key-9876543210"} if other == "key" else {}
    shared = {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")}
    peer = make_spool(root=tmp_path / "peer", simulator=peer_sim, **shared)
    survivor = make_spool()
    sim.running_seconds = 30
    named = {"p1.jsonl": prompts("p1", 2)}
    drop_all(survivor, named)
    if other == "key":
        peer_env[CRASH_ENV] = "in_lookup"
    victim = peer.start(env=peer_env)
    p1_job = wait_for(lambda: job_field(survivor, "p1.jsonl", "job_name"), timeout=20)
    unnamed: dict[str, list[str]] = {}
    if other == "key":
        sim.add_fault(Fault.reset(after=True, method="POST", path_contains=CREATE))
        unnamed = {"p2.jsonl": prompts("p2", 2)}
        drop_all(survivor, unnamed)
        wait_killed(victim)
        gone = Fault("GET", f"{p1_job}", status=404, times=10**6)  # not for the survivor's key
        sim.add_fault(gone)
    else:
        kill9(victim)
    files = {**named, **unnamed}
    proc = survivor.start()
    wait_started(survivor, proc)
    wait_for(lambda: len(events(survivor, "left alone")) >= len(files), timeout=20)
    time.sleep(1.3)  # another rescan (inbox_rescan_seconds: 1)
    left_alone = events(survivor, "left alone")
    assert sorted(e["file"] for e in left_alone) == sorted(files), left_alone
    assert not list(survivor.outbox.iterdir())
    assert all(state_of(survivor, n) not in (None, "WRITING", "FAILED") for n in files)
    assert proc.poll() is None
    if other == "key":
        gone.times = 0
    for name in list(peer_sim.jobs):
        peer_sim.set_job_state(name, "SUCCEEDED")
    peer_env.pop(CRASH_ENV, None)
    peer.start(env=peer_env)
    wait_for(lambda: all(survivor.finished(n) for n in files), timeout=30)
    assert proc.poll() is None
    survivor.stop_all()
    peer.stop_all()
    finished = copy.copy(survivor)
    finished.sim = peer_sim  # the jobs are at the peer's endpoint
    assert_nothing_lost(finished, sorted(files))
    for name, lines in files.items():
        assert_exact_answers(survivor, name, lines)
    assert len(peer_sim.jobs) == len(files)
    for job in peer_sim.jobs.values():
        assert peer_sim.jobs_created_for(job["display_name"]) == 1
    if other == "endpoint":
        assert not sim.jobs, "the survivor made jobs at its own endpoint"


# ---- expired resubmits ------------------------------------------------------------------


def test_an_expired_file_api_job_is_resubmitted_without_leaks(
    make_spool: MakeSpool, sim: Simulator
) -> None:
    """With `expired_resubmits: 1`, a File-API job expires: its uploaded input is deleted at
    the API, the file is uploaded and submitted again, and finishes with exact results."""
    spool = make_spool(expired_resubmits=1, limits={"inline_max_bytes": 10})
    sim.pending_seconds = 30
    sim.expire_after_seconds = 0.5
    files = {"x.jsonl": prompts("x", 3)}
    drop_all(spool, files)
    proc = spool.start()
    first = wait_for(lambda: list(sim.jobs.values()), timeout=20)[0]
    sim.expire_after_seconds = None
    sim.pending_seconds = 0.1
    first_upload = first["input_file"]
    assert first_upload
    wait_for(lambda: spool.finished("x.jsonl"), timeout=30)
    assert proc.poll() is None
    spool.stop_all()
    assert sim.jobs[first["name"]]["state"] == "BATCH_STATE_EXPIRED"
    assert first_upload not in sim.files, "the expired job's upload was left at the API"
    deleted = [p for m, p, s in sim.requests_log if m == "DELETE" and s == 200]
    assert any(p.endswith(f"/{first_upload}") for p in deleted), deleted
    assert_nothing_lost(spool, ["x.jsonl"], jobs=2)
    assert_no_job_running(sim)
    assert_no_remote_files(sim)
    assert_exact_answers(spool, "x.jsonl", files["x.jsonl"])


# ---- kill -9 at the new crash points ----------------------------------------------------


@pytest.mark.parametrize("case", ["in_lookup", "after_upload", "after_upload_unlisted"])
def test_kill_at_a_new_crash_point_then_restart(
    case: str, make_spool: MakeSpool, sim: Simulator
) -> None:
    """kill -9 during the lookup grace period of a create whose reply was lost (the job not yet
    listed), or just after an upload (its name not yet recorded): the restart makes one job,
    deletes the orphaned upload, and writes exact results. Where the API refuses to list files
    (404), the upload goes on and the orphan is left to expire: the file does not fail."""
    point = case.removesuffix("_unlisted")
    spool = make_spool(limits={"inline_max_bytes": 10} if point == "after_upload" else {})
    if point == "in_lookup":
        sim.list_lag_seconds = 1.5
        add_faults(sim, Fault.reset(after=True, method="POST", path_contains=CREATE))
    files = {"z.jsonl": prompts("z", 3)}
    drop_all(spool, files)
    wait_killed(spool.start("--once", env={CRASH_ENV: point}))
    orphans = set(sim.uploaded_files)
    if point == "after_upload":
        assert len(orphans) == 1 and not sim.jobs
    else:
        assert len(sim.jobs) == 1 and sim.create_calls == 1
    unlisted = add_faults(sim, Fault("GET", "/files?", status=404)) if "unlisted" in case else []
    run_once(spool)
    assert_used(unlisted)
    assert sim.create_calls == 1
    if unlisted:
        assert set(sim.files) == orphans, "only the orphan is left, to expire"
        with sim._lock:
            for name in orphans:
                del sim._files[name]
    else:
        assert not orphans & set(sim.files)
    assert_clean(spool, files, jobs=1)


@pytest.mark.parametrize("mode", ["refuse", "fail"])
def test_kill_during_a_quota_wait_then_the_quota_frees(
    make_spool: MakeSpool, sim: Simulator, mode: str
) -> None:
    """`kill -9` while a file waits for the enqueued-token quota (refused at create, or its job
    failed for it): the restart goes on waiting, its kept upload is used, and once the quota
    frees the file finishes with one job per attempt and nothing left at the API. A `run
    --once` meanwhile leaves it queued and exits 1."""
    sim.enqueued_token_limit = 1
    sim.quota_mode = mode
    spool = make_spool(limits={"inline_max_bytes": 10})
    files = {"q.jsonl": prompts("q", 3)}
    drop_all(spool, files)
    proc = spool.start()
    wait_for(lambda: (job_field(spool, "q.jsonl", "quota_waits") or 0) >= 2, timeout=30)
    kill9(proc)
    assert spool.run_once(timeout=60) == 1  # nothing of its own will free the quota
    assert (
        "UNFINISHED q.jsonl: waiting for the enqueued-token quota"
        in spool.log_paths[-1].read_text()
    )
    uploads = [p for m, p, _ in sim.requests_log if m == "POST" and "upload_id=" in p]
    sim.enqueued_token_limit = None
    run_once(spool)
    assert [p for m, p, _ in sim.requests_log if m == "POST" and "upload_id=" in p] == uploads
    assert len(uploads) == 1  # uploaded once, before the first refusal
    made = [j for j in sim.jobs.values() if j["state"] == "BATCH_STATE_SUCCEEDED"]
    assert len(made) == 1
    assert all(sim.jobs_created_for(j["display_name"]) == 1 for j in sim.jobs.values())
    assert_exact_answers(spool, "q.jsonl", files["q.jsonl"])
    assert_no_remote_files(sim)
