"""Crashes: `kill -9` at every step of a file's life, then a restart, loses nothing and pays once.

For each crash point the daemon SIGKILLs itself there (GEMINI_BATCHD_CRASH_AT); a second
process started without it must finish every file with the same results as a run that never
crashed, and the simulator must hold exactly one job per file.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.faults import CRASH_ENV, POINTS
from daemon.simulator import Fault, Simulator
from tests.guarantees import (
    BIG_INLINE_LIMIT,
    CORPUS,
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    baseline_records,
    drop_corpus,
    kill9,
    records,
    sigterm_and_wait,
    state_of,
    wait_killed,
    wait_started,
)
from tests.harness import Spool, wait_for

LIMITS = {"limits": {"inline_max_bytes": BIG_INLINE_LIMIT}}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return baseline_records(tmp_path_factory.mktemp("baseline"), **LIMITS)


@pytest.fixture
def crash_spool(tmp_path: Path, sim: Simulator) -> Iterator[Spool]:
    s = Spool(tmp_path, sim, **LIMITS)
    yield s
    s.stop_all()


def assert_same_as_baseline(
    spool: Spool, names: list[str], baseline: dict[str, list[dict[str, Any]]]
) -> None:
    assert_nothing_lost(spool, names, jobs=len(names))
    for name in names:
        assert records(spool, name) == baseline[name], name
    assert_no_secret(spool)
    assert_no_stray_traceback(spool)


@pytest.mark.parametrize("point", POINTS)
def test_crash_point_then_restart(
    point: str, crash_spool: Spool, baseline: dict[str, list[dict[str, Any]]]
) -> None:
    proc = crash_spool.start(env={CRASH_ENV: point})
    wait_started(crash_spool, proc)
    names = drop_corpus(crash_spool)
    wait_killed(proc)
    assert crash_spool.run_once() == 0, crash_spool.logs()[-4000:]
    assert_same_as_baseline(crash_spool, names, baseline)


@pytest.mark.parametrize("point", ["while_fetching", "mid_write"])
def test_crash_on_the_file_api_path(
    point: str, crash_spool: Spool, baseline: dict[str, list[dict[str, Any]]]
) -> None:
    """A File API job crashes with its responses file downloaded: no temp file survives."""
    names = drop_corpus(crash_spool, ["gamma.jsonl"])
    wait_killed(crash_spool.start("--once", env={CRASH_ENV: point}))
    assert crash_spool.run_once() == 0, crash_spool.logs()[-4000:]
    assert_same_as_baseline(crash_spool, names, baseline)


def test_kill_while_uploading(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 1000})
    try:
        sim.add_fault(Fault("POST", "upload/", status=503, times=2))  # stays uploading a while
        spool.drop("huge.jsonl", _big_file_lines(1000, 8_000))
        proc = spool.start()
        wait_for(lambda: state_of(spool, "huge.jsonl") == "uploading", timeout=60, interval=0.005)
        time.sleep(0.05)  # converting the input or sending it
        kill9(proc)
        assert spool.run_once(timeout=120) == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["huge.jsonl"], jobs=1)
        assert len(records(spool, "huge.jsonl")) == 1000
    finally:
        spool.stop_all()


def test_crash_at_every_point_in_turn(
    crash_spool: Spool, baseline: dict[str, list[dict[str, Any]]]
) -> None:
    """One restart per crash point, each crashing again further on: the worst day possible."""
    names = drop_corpus(crash_spool)
    for point in POINTS:
        rc = crash_spool.run_once(env={CRASH_ENV: point})
        assert rc in (0, -9), f"{point}: exit status {rc}"
    assert crash_spool.run_once() == 0, crash_spool.logs()[-4000:]
    assert_same_as_baseline(crash_spool, names, baseline)


def test_random_kills_while_files_flow(
    tmp_path: Path, baseline: dict[str, list[dict[str, Any]]]
) -> None:
    """Seeded random `kill -9` over many rounds while files keep arriving."""
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261128")))
    with Simulator(pending_seconds=0.05, running_seconds=0.15, seed=3) as sim:
        spool = Spool(tmp_path, sim, **LIMITS)
        names: list[str] = []
        try:
            deadline = time.monotonic() + 60
            for round_ in range(15):
                if time.monotonic() > deadline:
                    break
                proc = spool.start()
                wait_started(spool, proc)
                for _ in range(rng.randint(0, 2)):
                    source = rng.choice(sorted(CORPUS))
                    name = f"r{round_:02d}-{len(names)}-{source}"
                    spool.drop(name, CORPUS[source])
                    names.append(name)
                time.sleep(rng.uniform(0.0, 0.5))
                kill9(proc)
            assert names
            assert spool.run_once(timeout=90) == 0, spool.logs()[-4000:]
            assert_nothing_lost(spool, names, jobs=len(names))
            for name in names:
                source = name.split("-", 2)[2]
                assert records(spool, name) == baseline[source], name
            assert_no_stray_traceback(spool)
        finally:
            spool.stop_all()


# ---- SIGTERM: a graceful stop at each stage, then a restart finishes the work -----------


def polls_of(spool: Spool, name: str) -> int:
    try:
        return int(spool.sidecar(name).get("polls") or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _big_file_lines(count: int, width: int) -> list[str]:
    return [f"{i} " + "w" * width for i in range(count)]


def test_sigterm_while_uploading(tmp_path: Path, sim: Simulator) -> None:
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 1000})
    try:
        sim.add_fault(Fault("POST", "upload/", status=503, times=2))  # stays uploading a while
        spool.drop("huge.jsonl", _big_file_lines(1000, 8_000))  # 8 MB through the File API
        proc = spool.start()
        wait_for(lambda: state_of(spool, "huge.jsonl") == "uploading", timeout=60, interval=0.005)
        sigterm_and_wait(proc)
        assert not spool.finished("huge.jsonl")
        assert spool.run_once(timeout=120) == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["huge.jsonl"], jobs=1)
        assert len(records(spool, "huge.jsonl")) == 1000
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_sigterm_while_polling(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 3600  # the job stays pending until the test finishes it
    spool.drop("slow.jsonl", ["a", "b"])
    proc = spool.start()
    wait_for(lambda: polls_of(spool, "slow.jsonl") >= 2, timeout=30)
    assert state_of(spool, "slow.jsonl") == "running"
    sigterm_and_wait(proc)
    job = spool.sidecar("slow.jsonl")["job_name"]
    sim.set_job_state(job, "SUCCEEDED")
    assert spool.run_once() == 0, spool.logs()[-3000:]
    assert_nothing_lost(spool, ["slow.jsonl"], jobs=1)
    assert [r["status"] for r in records(spool, "slow.jsonl")] == ["ok", "ok"]
    assert_no_stray_traceback(spool)


def test_sigterm_while_fetching(tmp_path: Path, sim: Simulator) -> None:
    """The job is done but its responses file cannot be downloaded yet: stop, restart, finish."""
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 10})
    try:
        sim.add_fault(Fault("GET", ":download", status=503, times=10_000))
        spool.drop("fetch.jsonl", ["a", "b", "c"])
        proc = spool.start()
        wait_for(lambda: state_of(spool, "fetch.jsonl") == "writing", timeout=30)
        wait_for(lambda: any(":download" in p for _, p, _ in sim.requests_log), timeout=30)
        sigterm_and_wait(proc)
        with sim._lock:  # the outage is over
            sim._faults.clear()
        assert spool.run_once() == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["fetch.jsonl"], jobs=1)
        assert len(records(spool, "fetch.jsonl")) == 3
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_sigterm_while_writing(tmp_path: Path, sim: Simulator) -> None:
    """SIGTERM as soon as the results are being written: the write finishes, exit 0."""
    spool = Spool(tmp_path, sim)
    try:
        spool.drop("many.jsonl", [f"prompt {i}" for i in range(1000)])
        proc = spool.start()
        wait_for(
            lambda: state_of(spool, "many.jsonl") in ("writing", "done"), timeout=60, interval=0.002
        )
        sigterm_and_wait(proc)
        # Either the write finished before the exit, or the restart does it.
        assert spool.run_once() == 0, spool.logs()[-3000:]
        assert_nothing_lost(spool, ["many.jsonl"], jobs=1)
        assert len(records(spool, "many.jsonl")) == 1000
        assert_no_stray_traceback(spool)
    finally:
        spool.stop_all()


def test_sigterm_while_a_request_hangs(tmp_path: Path, sim: Simulator) -> None:
    """The API accepts the connection and never answers: SIGTERM still stops within 10 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connections; nobody ever reads or answers
        hang_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        spool = Spool(tmp_path, sim, api={"base_url": hang_url, "timeout_seconds": 60})
        try:
            spool.drop("hang.jsonl", ["a", "b"])
            proc = spool.start()
            wait_for(lambda: state_of(spool, "hang.jsonl") == "submitting", timeout=30)
            time.sleep(0.3)  # the create request is on its way
            sigterm_and_wait(proc)
        finally:
            spool.stop_all()
    spool.configure()  # the real (simulated) API again
    assert spool.run_once() == 0, spool.logs()[-3000:]
    assert_nothing_lost(spool, ["hang.jsonl"], jobs=1)


def test_outbox_name_taken_while_down_is_not_mistaken_for_ours(
    spool: Spool, sim: Simulator
) -> None:
    """A second `a.jsonl` picks outbox/a-2.jsonl, then crashes before writing; meanwhile an
    input really named a-2.jsonl publishes outbox/a-2.jsonl. The first must not take that
    file for its own results (and lose them): it writes its own under another free name."""
    spool.drop("a.jsonl", ["first a"])
    assert spool.run_once() == 0
    spool.drop("a.jsonl", ["second a", "second a, line 2"])
    wait_killed(spool.start("--once", env={CRASH_ENV: "while_fetching"}))
    job = spool.sidecar("a.jsonl")["job_name"]
    assert spool.sidecar("a.jsonl")["output"].endswith("/a-2.jsonl")
    sim.add_fault(Fault("GET", job.removeprefix("batches/"), status=503, times=10_000))
    proc = spool.start()
    spool.drop("a-2.jsonl", ["really a-2"])
    wait_for(lambda: spool.finished("a-2.jsonl"), timeout=30)
    with sim._lock:
        sim._faults.clear()
    wait_for(lambda: not (spool.inbox / "processing" / "a.jsonl").exists(), timeout=30)
    sigterm_and_wait(proc)
    texts = {
        tuple(json.loads(line)["text"] for line in path.read_text().splitlines())
        for path in spool.outbox.iterdir()
    }
    assert texts == {
        ("Simulated answer: first a",),
        ("Simulated answer: second a", "Simulated answer: second a, line 2"),
        ("Simulated answer: really a-2",),
    }
    assert len(sim.jobs) == 3


def test_results_gone_after_a_crash_give_a_report(crash_spool: Spool) -> None:
    """A crash before the results were written, then the job vanishes: the file is failed
    with stage `results` (failing a file already in WRITING once killed a worker thread)."""
    proc = crash_spool.start(env={CRASH_ENV: "while_fetching"})
    wait_started(crash_spool, proc)
    crash_spool.drop("gone.jsonl", ["a", "b"])
    wait_killed(proc)
    job_name = crash_spool.sidecar("gone.jsonl")["job_name"]
    crash_spool.sim.forget_job(job_name)
    assert crash_spool.run_once() == 1, crash_spool.logs()[-4000:]
    report = crash_spool.report("gone")
    assert report["stage"] == "results"
    assert report["job_name"] == job_name
    assert crash_spool.finished("gone.jsonl")
    assert not (crash_spool.outbox / "gone.jsonl").exists()


def test_restart_under_a_changed_config_writes_results_as_claimed(crash_spool: Spool) -> None:
    """`filter_json` and `include_response` are recorded at claim: a restart after the
    configuration changed still writes the results the way the file was submitted."""
    crash_spool.configure(filter_json=True, include_response=True, **LIMITS)
    proc = crash_spool.start(env={CRASH_ENV: "while_polling"})
    wait_started(crash_spool, proc)
    crash_spool.drop(
        "claimed.jsonl",
        [{"prompt": "json please", "config": {"responseMimeType": "application/json"}}],
    )
    wait_killed(proc)
    assert crash_spool.sidecar("claimed.jsonl")["filter_json"] is True
    crash_spool.configure(filter_json=False, include_response=False, **LIMITS)
    assert crash_spool.run_once() == 0, crash_spool.logs()[-4000:]
    (record,) = crash_spool.results("claimed.jsonl")
    assert record["status"] == "ok"
    assert record["json"] == {"echo": "json please", "words": 2}
    assert "response" in record
