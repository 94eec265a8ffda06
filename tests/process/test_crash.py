"""Crashes: `kill -9` at every step of a file's life, then a restart, loses nothing and pays once.

The corpus is cut into parts (limits.max_requests_per_job: 3; the big file's parts go through
the File API) and needs follow-up rounds (a key that fails once, a request that always fails,
one never answered), so the crash points are met in every part and round. For each point the
daemon SIGKILLs itself there (GEMINI_BATCHD_CRASH_AT, `point@N` for the N-th time); a second
process started without it must finish every file with the same results as a run that never
crashed, and no display name may have made a second job at the simulator.

Each scenario drives real daemon processes in a spool and against a simulator of its own. The
scenarios run side by side (most of a daemon's life is waiting for polls, and starting one is
a second of CPU), once per module; each test then checks what its scenario left behind.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon import claims
from daemon.faults import CRASH_ENV, POINTS
from daemon.simulator import Fault, Simulator
from daemon.spool import Spool as DaemonSpool
from tests.support.guarantees import (
    CORPUS,
    assert_no_secret,
    assert_no_stray_traceback,
    assert_nothing_lost,
    baseline_records,
    drop_corpus,
    kill9,
    records,
    state_of,
    wait_killed,
    wait_started,
)
from tests.support.harness import Spool, wait_for

LIMITS: dict[str, Any] = {
    "limits": {"inline_max_bytes": 1000, "max_requests_per_job": 3},
    "log_level": "info",
}
"""alpha and beta: two inline parts each; gamma: four parts through the File API."""
FAIL_ONCE = {"k3": (503, 1)}
"""alpha's k3 fails once (a second round); beta fails one request always and loses one
(rounds two and three)."""
CREATE = ":batchGenerateContent"
PARALLEL = 8
"""Scenarios run at once: enough to keep two cores busy while daemons wait on polls."""

LATER = [
    "after_create@2",  # the second part's job
    "after_upload@3",  # the File API file's third part
    "after_collect@5",  # parts of several files collected, others running
    "before_create@9",  # the first follow-up job (round 2)
    "while_polling@12",  # polling follow-up jobs
    "after_create@11",  # round 3
    "after_round@2",  # the second file's follow-up jobs planned
    "mid_write@2",  # the second file being written
]
"""Crash points met later: in other parts, in follow-up rounds, in the second file written."""


@dataclass
class Run:
    """What a scenario did: its spool (and simulator), the inputs it dropped, what it saw."""

    spool: Spool
    names: list[str] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


Scenario = Callable[[Run], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every scenario, run side by side; then their spools for the tests to check."""
    done: dict[str, Run] = {}
    sims: list[Simulator] = []
    for name in SCENARIOS:
        sim = Simulator(pending_seconds=0.1, running_seconds=0.2, seed=7).start()
        sim.fail_keys_times = dict(FAIL_ONCE)
        sims.append(sim)
        folder = tmp_path_factory.mktemp(name.replace(":", "-").replace("@", "-"))
        done[name] = Run(Spool(folder, sim, **LIMITS))

    def play(name: str) -> None:
        try:
            SCENARIOS[name](done[name])
        except BaseException as exc:  # the test of this scenario reports it
            done[name].error = exc
        finally:
            done[name].spool.stop_all()

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        list(pool.map(play, SCENARIOS))
    yield done
    for sim in sims:
        sim.stop()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return baseline_records(
        tmp_path_factory.mktemp("baseline"), {"fail_keys_times": FAIL_ONCE}, **LIMITS
    )


def result(runs: dict[str, Run], name: str) -> Run:
    run = runs[name]
    if run.error is not None:
        raise run.error
    return run


def assert_same_as_baseline(run: Run, baseline: dict[str, list[dict[str, Any]]]) -> None:
    spool = run.spool
    assert_nothing_lost(spool, run.names)
    for name in run.names:
        assert records(spool, name) == baseline[name], name
    assert_no_secret(spool)
    assert_no_stray_traceback(spool)


# ---- the scenarios -----------------------------------------------------------------------------


def crash_then_finish(point: str) -> Scenario:
    def play(run: Run) -> None:
        spool = run.spool
        if point.startswith("in_lookup"):  # met only when a create is in doubt: lose a reply
            spool.sim.add_fault(Fault("POST", CREATE, status=503, times=1, after=True))
        run.names = drop_corpus(spool)
        wait_killed(spool.start("--once", env={CRASH_ENV: point}))
        run.seen["rc"] = spool.run_once()

    return play


for _point in [*POINTS, *LATER]:
    scenario(f"point:{_point}")(crash_then_finish(_point))


def crash_in_the_file_api_path(point: str) -> Scenario:
    def play(run: Run) -> None:
        spool = run.spool
        run.names = drop_corpus(spool, ["gamma.jsonl"])
        wait_killed(spool.start("--once", env={CRASH_ENV: point}))
        left = [p for d in (spool.outbox, spool.inbox / "processing") for p in d.glob(".*")]
        # Not `.{claim}.input`: the user's input itself (a second link), in the user's mode.
        written = [p for p in left if not p.name.endswith(".input")]
        run.seen["left"] = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in written}
        run.seen["rc"] = spool.run_once()

    return play


for _point in ("while_fetching", "mid_write"):
    scenario(f"file-api:{_point}")(crash_in_the_file_api_path(_point))


LOST_SIDECAR_POINTS = ("after_create", "while_polling", "after_collect@3", "after_round")


def lose_sidecars_at(point: str) -> Scenario:
    """`kill -9` at `point`, and every sidecar deleted meanwhile (an operator's `rm`): the
    claims' work files remain, so each job is looked up before it is made again."""

    def play(run: Run) -> None:
        spool = run.spool
        run.names = drop_corpus(spool)
        wait_killed(spool.start("--once", env={CRASH_ENV: point}))
        lost = list((spool.inbox / "processing").glob("*.job.json"))
        for sidecar in lost:
            sidecar.unlink()
        run.seen["lost"] = len(lost)
        run.seen["rc"] = spool.run_once()

    return play


for _point in LOST_SIDECAR_POINTS:
    scenario(f"sidecar-lost:{_point}")(lose_sidecars_at(_point))


@scenario("every-point-in-turn")
def every_point_in_turn(run: Run) -> None:
    """One restart per crash point, each crashing again further on: the worst day possible."""
    run.names = drop_corpus(run.spool)
    run.seen["rcs"] = [run.spool.run_once(env={CRASH_ENV: point}) for point in POINTS]
    run.seen["rc"] = run.spool.run_once()


@scenario("random-kills")
def random_kills(run: Run) -> None:
    """Seeded random `kill -9` over several rounds while files keep arriving."""
    spool = run.spool
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261128")))
    deadline = time.monotonic() + 20
    for round_ in range(8):
        if time.monotonic() > deadline:
            break
        proc = spool.start()
        wait_started(spool, proc)
        for _ in range(rng.randint(1, 2)):
            source = rng.choice(sorted(CORPUS))
            name = f"r{round_:02d}-{len(run.names)}-{source}"
            spool.drop(name, CORPUS[source])
            run.names.append(name)
        time.sleep(rng.uniform(0.0, 0.8))
        kill9(proc)
    run.seen["rc"] = spool.run_once(timeout=90)


@scenario("kill-while-uploading")
def kill_while_uploading(run: Run) -> None:
    """`kill -9` while a big input is being uploaded (its upload may or may not have arrived)."""
    spool = run.spool
    spool.configure(limits={"inline_max_bytes": 1000})
    spool.sim.add_fault(Fault("POST", "upload/", status=503, times=3))  # stays uploading a while
    spool.drop("huge.jsonl", [f"{i} " + "w" * 8000 for i in range(1000)])
    run.names = ["huge.jsonl"]
    proc = spool.start()
    wait_for(lambda: state_of(spool, "huge.jsonl") == "UPLOADING", timeout=60, interval=0.005)
    time.sleep(0.05)  # sending it
    kill9(proc)
    run.seen["rc"] = spool.run_once(timeout=120)


@scenario("outbox-name-taken")
def outbox_name_taken(run: Run) -> None:
    """A second `a.jsonl` picks outbox/a-2.jsonl, then crashes half-way through writing it;
    meanwhile an input really named a-2.jsonl publishes outbox/a-2.jsonl."""
    spool = run.spool
    spool.configure()
    spool.drop("a.jsonl", ["first a"])
    run.seen["first"] = spool.run_once()
    spool.drop("a.jsonl", ["second a", "second a, line 2"])
    wait_killed(spool.start("--once", env={CRASH_ENV: "mid_write"}))
    run.seen["chosen"] = spool.sidecar("a.jsonl")["output"]
    held = claims.lock_name(DaemonSpool(spool.inbox, spool.outbox), "a.jsonl")
    assert held is not None  # a live peer owns a.jsonl for a while
    try:
        spool.drop("a-2.jsonl", ["really a-2"])
        run.seen["peer"] = spool.run_once()
    finally:
        claims.release(held)
    run.seen["rc"] = spool.run_once()
    run.names = ["a.jsonl", "a-2.jsonl"]


@scenario("results-gone")
def results_gone(run: Run) -> None:
    """A crash before the answers were saved; then the job vanishes, and fetching its answers
    has failed for as long as the API keeps them."""
    spool = run.spool
    spool.configure()
    spool.drop("gone.jsonl", ["a", "b"])
    wait_killed(spool.start("--once", env={CRASH_ENV: "while_fetching"}))
    run.seen["job_name"] = spool.sidecar("gone.jsonl")["job_name"]
    spool.sim.forget_job(run.seen["job_name"])
    car = spool.inbox / "processing" / "gone.jsonl.job.json"
    record = json.loads(car.read_text())
    record["jobs"][0]["collect_failing_seconds"] = 48 * 3600 + 1  # the API keeps answers 48 h
    car.write_text(json.dumps(record))
    run.seen["rc"] = spool.run_once()
    run.names = ["gone.jsonl"]


@scenario("changed-config")
def changed_config(run: Run) -> None:
    """The configuration changes while a file's job runs and the daemon is down."""
    spool = run.spool
    spool.configure(filter_json=True, include_response=True)
    spool.drop("claimed.jsonl", [{"prompt": "json please", "config": {"responseMimeType": "application/json"}}])  # fmt: skip
    wait_killed(spool.start("--once", env={CRASH_ENV: "while_polling"}))
    run.seen["claimed_filter_json"] = spool.sidecar("claimed.jsonl")["filter_json"]
    spool.configure(filter_json=False, include_response=False)
    run.seen["rc"] = spool.run_once()
    run.names = ["claimed.jsonl"]


# ---- the tests ---------------------------------------------------------------------------------


def test_the_corpus_needs_parts_rounds_and_the_file_api(
    baseline: dict[str, list[dict[str, Any]]],
) -> None:
    """What the crash tests rely on: records of follow-up rounds and of every kind."""
    attempts = {name: [r["attempts"] for r in recs] for name, recs in baseline.items()}
    assert attempts["alpha.jsonl"] == [1, 1, 2, 1]
    assert attempts["beta.jsonl"] == [1, 3, 3, 1]
    assert set(attempts["gamma.jsonl"]) == {1}


@pytest.mark.parametrize("point", [*POINTS, *LATER])
def test_crash_point_then_restart(
    point: str, runs: dict[str, Run], baseline: dict[str, list[dict[str, Any]]]
) -> None:
    run = result(runs, f"point:{point}")
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    assert_same_as_baseline(run, baseline)


@pytest.mark.parametrize("point", ["while_fetching", "mid_write"])
def test_a_crash_on_the_file_api_path_leaves_only_private_files(
    point: str, runs: dict[str, Run], baseline: dict[str, list[dict[str, Any]]]
) -> None:
    """What a crash left (prompts, answers, half a results file) is for no other user, and is
    cleaned up by the restart."""
    run = result(runs, f"file-api:{point}")
    assert run.seen["left"], "the crash left no work or temporary file to check"
    for name, mode in run.seen["left"].items():
        assert mode & 0o007 == 0, f"{name} is mode {oct(mode)}"
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    assert_same_as_baseline(run, baseline)


def test_crash_at_every_point_in_turn(
    runs: dict[str, Run], baseline: dict[str, list[dict[str, Any]]]
) -> None:
    run = result(runs, "every-point-in-turn")
    assert set(run.seen["rcs"]) <= {0, -9}, run.seen["rcs"]
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    assert_same_as_baseline(run, baseline)


def test_random_kills_while_files_flow(
    runs: dict[str, Run], baseline: dict[str, list[dict[str, Any]]]
) -> None:
    run = result(runs, "random-kills")
    assert run.names
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    assert_nothing_lost(run.spool, run.names)
    for name in run.names:
        expected = baseline[name.split("-", 2)[2]]
        found = records(run.spool, name)
        # fail_keys_times counts across files: only the first alpha's k3 needed a second job.
        assert [(r["key"], r["status"]) for r in found] == [
            (r["key"], r["status"]) for r in expected
        ], name
    assert_no_stray_traceback(run.spool)


def test_kill_while_uploading(runs: dict[str, Run]) -> None:
    run = result(runs, "kill-while-uploading")
    assert run.seen["rc"] == 0, run.spool.logs()[-3000:]
    assert_nothing_lost(run.spool, run.names, jobs=1)
    assert len(records(run.spool, "huge.jsonl")) == 1000
    assert not run.spool.sim.files, "a stray upload was left at the API"


def test_outbox_name_taken_while_down_is_not_mistaken_for_ours(runs: dict[str, Run]) -> None:
    """The first must not take the other input's file for its own results (and lose them): it
    writes its own under another free name."""
    run = result(runs, "outbox-name-taken")
    spool = run.spool
    assert (run.seen["first"], run.seen["peer"], run.seen["rc"]) == (0, 0, 0), spool.logs()[-3000:]
    assert run.seen["chosen"].endswith("/a-2.jsonl")
    texts = {
        tuple(json.loads(line)["text"] for line in path.read_text().splitlines())
        for path in spool.outbox.iterdir()
    }
    assert texts == {
        ("Simulated answer: first a",),
        ("Simulated answer: second a", "Simulated answer: second a, line 2"),
        ("Simulated answer: really a-2",),
    }
    second = json.loads((spool.outbox / "a-3.jsonl").read_text().splitlines()[0])
    assert second["text"] == "Simulated answer: second a"
    assert len(spool.sim.jobs) == 3


def test_results_gone_after_a_crash_give_a_report(runs: dict[str, Run]) -> None:
    """Failed with stage `results` once the API can no longer keep the answers (48 h)."""
    run = result(runs, "results-gone")
    spool = run.spool
    assert run.seen["rc"] == 1, spool.logs()[-4000:]
    report = json.loads((spool.outbox / "gone.error.json").read_text())
    assert report["stage"] == "results"
    assert report["job_name"] == run.seen["job_name"]
    assert spool.finished("gone.jsonl")
    assert not (spool.outbox / "gone.jsonl").exists()


def test_restart_under_a_changed_config_writes_results_as_claimed(runs: dict[str, Run]) -> None:
    """`filter_json` and `include_response` are recorded at claim: a restart after the
    configuration changed still writes the results the way the file was submitted."""
    run = result(runs, "changed-config")
    assert run.seen["claimed_filter_json"] is True
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    (record,) = run.spool.results("claimed.jsonl")
    assert record["status"] == "ok"
    assert record["json"] == {"echo": "json please", "words": 2}
    assert "response" in record


@pytest.mark.parametrize("point", LOST_SIDECAR_POINTS)
def test_a_lost_sidecar_and_a_crash_never_pay_twice(
    runs: dict[str, Run], baseline: dict[str, list[dict[str, Any]]], point: str
) -> None:
    run = result(runs, f"sidecar-lost:{point}")
    assert run.seen["lost"] >= 1
    assert run.seen["rc"] == 0, run.spool.logs()[-4000:]
    assert_same_as_baseline(run, baseline)


def test_every_scenario_has_a_test() -> None:
    tested = {f"point:{p}" for p in [*POINTS, *LATER]} | {
        "file-api:while_fetching",
        "file-api:mid_write",
        "every-point-in-turn",
        "random-kills",
        "kill-while-uploading",
        "outbox-name-taken",
        "results-gone",
        "changed-config",
        *(f"sidecar-lost:{p}" for p in LOST_SIDECAR_POINTS),
    }
    assert set(SCENARIOS) == tested
