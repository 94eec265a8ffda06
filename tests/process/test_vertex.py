"""backend: vertex as a real daemon process: `kill -9` at every step of the Vertex path (the
upload, the create, listing and reading the predictions, deleting the staged objects) and a
restart lose nothing and pay once; the start-up check refuses what is missing (exit 2);
`run --simulate` serves both the Vertex simulator and Cloud Storage on loopback.

The daemon authenticates with a service-account key whose token endpoint is the simulator's,
and reaches the storage emulator through `STORAGE_EMULATOR_HOST`, as a real deployment would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.faults import CRASH_ENV, VERTEX_POINTS
from daemon.simulator import StorageEmulator, VertexSimulator
from tests.support.guarantees import (
    assert_exact_answers,
    assert_no_job_running,
    assert_no_stray_traceback,
    assert_nothing_lost,
    wait_killed,
)
from tests.support.harness import Spool
from tests.support.vertex import PROJECT, write_service_account_key

BUCKET = "staging"
FILES = {
    "one.jsonl": [f"first file, prompt {i}" for i in range(5)],
    "two.jsonl": [f"second file, prompt {i}" for i in range(3)],
}
POINTS = [*VERTEX_POINTS, "before_create", "after_create", "while_polling", "after_collect"]


class VertexSpool(Spool):
    """A spool whose daemons use backend: vertex against `sim` and its storage emulator."""

    def __init__(self, root: Path, sim: VertexSimulator, **overrides: Any) -> None:
        self.storage = sim.storage
        key = write_service_account_key(root.parent, sim.token_uri)
        vertex = {
            "project": PROJECT,
            "staging_uri": f"gs://{BUCKET}/batch",
            "credentials_file": str(key),
        }
        vertex.update(overrides.pop("vertex", {}))
        super().__init__(root, sim, backend="vertex", vertex=vertex, **overrides)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = super().env(extra)
        env.pop("GEMINI_API_KEY", None)
        env["STORAGE_EMULATOR_HOST"] = self.storage.base_url
        return env

    def staged(self) -> list[str]:
        return [n for n in self.storage.objects(BUCKET) if ".gemini-batchd-check" not in n]


def vertex_sim() -> VertexSimulator:
    storage = StorageEmulator().start()
    storage.create_bucket(BUCKET)
    return VertexSimulator(
        storage, pending_seconds=0.1, running_seconds=0.2, prediction_files=3, seed=11
    ).start()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Each point, side by side: kill -9 there, then a `run --once` without the crash."""
    runs: dict[str, Any] = {}
    sims: list[VertexSimulator] = []

    def play(point: str) -> None:
        sim = vertex_sim()
        sims.append(sim)
        root = tmp_path_factory.mktemp(point) / "spool"
        spool = VertexSpool(root, sim, limits={"max_requests_per_job": 2})
        runs[point] = spool
        try:
            for name, lines in FILES.items():
                spool.drop(name, lines)
            wait_killed(spool.start("--once", env={CRASH_ENV: point}))
            spool.seen = {"rc": spool.run_once(timeout=90)}  # type: ignore[attr-defined]
        except BaseException as exc:
            spool.seen = {"error": exc}  # type: ignore[attr-defined]
        finally:
            spool.stop_all()

    tmp_path_factory.getbasetemp()  # made once here: threads making it at once collide
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(play, POINTS))
    yield runs
    for sim in sims:
        sim.stop()
        sim.storage.stop()


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_step_of_the_vertex_path_loses_nothing_and_pays_once(
    crashed: dict[str, Any], point: str
) -> None:
    spool: VertexSpool = crashed[point]
    seen = spool.seen  # type: ignore[attr-defined]
    if "error" in seen:
        raise seen["error"]
    assert seen["rc"] == 0, spool.logs()[-4000:]
    assert_nothing_lost(spool, sorted(FILES))
    for name, lines in FILES.items():
        assert_exact_answers(spool, name, lines)
    assert_no_job_running(spool.sim)
    assert not spool.staged(), spool.staged()  # every staged input and prediction deleted
    assert_no_stray_traceback(spool)


# ---- the start-up check -------------------------------------------------------------------------


@pytest.fixture
def vsim() -> Iterator[VertexSimulator]:
    sim = vertex_sim()
    yield sim
    sim.stop()
    sim.storage.stop()


def test_a_denied_permission_stops_the_start_naming_it(
    tmp_path: Path, vsim: VertexSimulator
) -> None:
    vsim.reject_key(403)
    spool = VertexSpool(tmp_path / "spool", vsim)
    assert spool.start().wait(timeout=60) == 2
    log = spool.logs()
    assert "the API rejected the credential from vertex.credentials_file" in log
    assert "aiplatform.batchPredictionJobs.list" in log


def test_a_missing_bucket_stops_the_start_naming_it(tmp_path: Path, vsim: VertexSimulator) -> None:
    spool = VertexSpool(tmp_path / "spool", vsim, vertex={"staging_uri": "gs://no-such-bucket/x"})
    assert spool.start().wait(timeout=60) == 2
    assert "bucket does not exist" in spool.logs()


def test_credentials_never_reach_a_log_or_a_file(tmp_path: Path, vsim: VertexSimulator) -> None:
    spool = VertexSpool(tmp_path / "spool", vsim)
    spool.drop("s.jsonl", ["a secret-free prompt"])
    assert spool.run_once(timeout=60) == 0
    key = json.loads((tmp_path / "service-account.json").read_text())
    private = key["private_key"].splitlines()[1]
    tokens = vsim.issued_tokens
    assert tokens
    for path in spool.all_written_files():
        data = path.read_text(errors="replace")
        assert private not in data and not any(t in data for t in tokens), path


# ---- run --simulate ------------------------------------------------------------------------------


def test_run_simulate_serves_vertex_and_cloud_storage_on_loopback(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = {
        "backend": "vertex",
        "vertex": {"project": "demo", "staging_uri": "gs://demo-bucket/batch"},
        "inbox_settle_seconds": 0,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "inbox" / "hello.jsonl").write_text(
        '"Say hello"\n["Translate to French:", "good morning"]\n'
    )
    sim = vertex_sim()  # only for the harness's process plumbing; --simulate starts its own
    try:
        spool = Spool(root, sim)
        spool.config_path.write_text(yaml.safe_dump(config))
        proc = spool.start("--once", "--simulate")
        assert proc.wait(timeout=90) == 0, spool.logs()[-3000:]
        records = [
            json.loads(line) for line in (root / "outbox" / "hello.jsonl").read_text().splitlines()
        ]
        assert [r["status"] for r in records] == ["ok", "ok"]
        assert sim.create_calls == 0  # its own simulator answered
    finally:
        sim.stop()
        sim.storage.stop()
