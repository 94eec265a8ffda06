"""backend: vertex, in-process: files through Vertex AI batch prediction and Cloud Storage,
on the Vertex simulator and a real Cloud Storage emulator, with the real google-genai,
google-auth (a service-account key whose token endpoint is the simulator's) and
google-cloud-storage clients. Every guarantee of the Gemini backend, on this engine too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import metrics
from daemon.api.vertex import KEY_FIELD, VertexEngine, find_credentials
from daemon.cli import status
from daemon.config import Config
from daemon.simulator import Fault, StorageEmulator, VertexSimulator
from tests.support.guarantees import left_in_processing
from tests.support.inprocess import Daemon, WallClock
from tests.support.vertex import PROJECT, write_service_account_key

BUCKET = "batch-staging"
STAGING = f"gs://{BUCKET}/spool"
LINES: list[Any] = [
    "alpha",
    {"key": "007", "prompt": "a key that looks numeric"},
    ["beta", "gamma"],
    {"key": "n", "request": {"contents": [{"role": "user", "parts": [{"text": "native"}]}]}},
]
MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def storage() -> Iterator[StorageEmulator]:
    with StorageEmulator() as emulator:
        emulator.create_bucket(BUCKET)
        yield emulator


@pytest.fixture
def vsim(storage: StorageEmulator, clock: WallClock) -> Iterator[VertexSimulator]:
    with VertexSimulator(
        storage, clock=clock, pending_seconds=5, running_seconds=20, prediction_files=3, seed=5
    ) as sim:
        yield sim


@pytest.fixture
def make_vertex(
    tmp_path: Path, vsim: VertexSimulator, storage: StorageEmulator, clock: WallClock
) -> Iterator[MakeDaemon]:
    key = write_service_account_key(tmp_path, vsim.token_uri)
    made: list[Daemon] = []

    def engine(config: Config) -> VertexEngine:
        credentials, _ = find_credentials(config.vertex)
        return VertexEngine(
            config.vertex,
            credentials,
            base_url=config.api.base_url,
            timeout_seconds=config.api.timeout_seconds,
            retries=config.api.retries,
            storage_endpoint=storage.base_url,
        )

    def make(**overrides: Any) -> Daemon:
        vertex = {"project": PROJECT, "staging_uri": STAGING, "credentials_file": str(key)}
        vertex.update(overrides.pop("vertex", {}))
        daemon = Daemon(
            tmp_path, vsim, clock, engine=engine, backend="vertex", vertex=vertex, **overrides
        )
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


def staged(storage: StorageEmulator) -> dict[str, bytes]:
    return {n: d for n, d in storage.objects(BUCKET).items() if ".gemini-batchd-check" not in n}


def texts(daemon: Daemon, name: str) -> list[tuple[str, str, str]]:
    return [(r["key"], r["status"], r.get("text", "")) for r in daemon.results(name)]


# ---- a file's path on Vertex ----------------------------------------------------------------


def test_a_file_comes_back_exact_matched_by_key_from_shuffled_split_predictions(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator
) -> None:
    daemon = make_vertex()
    daemon.drop("a.jsonl", LINES)
    daemon.run_all()
    records = daemon.results("a.jsonl")
    assert [(r["key"], r["line"], r["status"]) for r in records] == [
        ("1", 1, "ok"),
        ("007", 2, "ok"),
        ("3", 3, "ok"),
        ("n", 4, "ok"),
    ]
    assert "a key that looks numeric" in records[1]["text"]
    assert all(r["usage"]["total_tokens"] > 0 for r in records)
    [job] = vsim.jobs.values()
    assert job["labels"]["batchd-claim"] == daemon.sidecar("a.jsonl")["claim_id"]
    assert job["labels"]["batchd-job"] == "r1p1a1"
    assert not staged(storage)  # input and predictions deleted once the results were written
    assert not left_in_processing(daemon.inbox)
    assert daemon.sidecar("a.jsonl")["jobs"][0]["job_name"].startswith("projects/")


def test_each_line_carries_its_key_beside_the_request_never_in_labels(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator
) -> None:
    daemon = make_vertex(vertex={"keep_staged": True})
    daemon.drop("k.jsonl", LINES)
    daemon.run_all()
    inputs = [d for n, d in staged(storage).items() if n.endswith("/input.jsonl")]
    [data] = inputs
    lines = [json.loads(raw) for raw in data.splitlines()]
    assert [line[KEY_FIELD] for line in lines] == ["k:1", "k:007", "k:3", "k:n"]
    assert all(set(line) == {"request", KEY_FIELD} for line in lines)
    [job] = vsim.jobs.values()
    assert "007" not in json.dumps(job["labels"])
    predictions = [n for n in staged(storage) if "/predictions/" in n]
    assert len(predictions) == 3  # kept: vertex.keep_staged


def test_failed_requests_come_back_as_follow_up_jobs_and_refused_ones_as_errors(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    vsim.fail_keys_times = {"1": (503, 1)}
    vsim.fail_keys = {"n": 400}
    vsim.partial_on_errors = True
    daemon = make_vertex()
    daemon.drop("r.jsonl", LINES)
    daemon.run_all()
    records = {r["key"]: r for r in daemon.results("r.jsonl")}
    assert (records["1"]["status"], records["1"]["attempts"]) == ("ok", 2)
    assert records["n"]["error"]["stage"] == "request" and records["n"]["error"]["code"] == 400
    states = sorted(j["state"] for j in vsim.jobs.values())
    assert states == ["JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_SUCCEEDED"]  # round 2: "1" only


def test_an_input_is_split_by_vertex_s_limits_and_merged_in_order(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    daemon = make_vertex(limits={"max_requests_per_job": 2})
    daemon.drop("p.jsonl", [f"prompt {i}" for i in range(5)])
    daemon.run_all()
    assert [r["key"] for r in daemon.results("p.jsonl")] == ["1", "2", "3", "4", "5"]
    assert len(vsim.jobs) == 3


def test_predictions_that_arrive_late_are_waited_for(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    vsim.predictions_lag_seconds = 120
    daemon = make_vertex()
    daemon.drop("late.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("late.jsonl")] == ["ok"] * 4
    assert all(r["attempts"] == 1 for r in daemon.results("late.jsonl"))  # none went missing


def test_a_line_vertex_would_fail_the_job_over_is_refused_at_validation(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    schema = {"type": "OBJECT", "properties": {"first-name": {"type": "STRING"}}}
    bad = {"key": "bad", "prompt": "x", "config": {"responseSchema": schema}}
    daemon = make_vertex(on_invalid_line="skip_line")
    daemon.drop("v.jsonl", ["fine", bad])
    daemon.run_all()
    records = daemon.results("v.jsonl")
    assert records[0]["status"] == "ok"
    assert (
        records[1]["error"]["stage"] == "invalid" and "first-name" in records[1]["error"]["message"]
    )


# ---- exactly once ---------------------------------------------------------------------------


def test_a_lost_create_reply_is_found_by_its_labels_and_adopted(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    vsim.list_lag_seconds = 30
    vsim.add_fault(Fault("POST", "batchPredictionJobs", status=0, after=True))
    daemon = make_vertex()
    daemon.drop("once.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("once.jsonl")] == ["ok"] * 4
    assert vsim.create_calls == 1 and len(vsim.jobs) == 1
    assert daemon.events("adopted a job created before a crash or a lost reply")
    assert any("labels.batchd-claim" in p for _, p, _ in vsim.requests_log)


@pytest.mark.parametrize("same", [True, False], ids=["same-bytes", "other-bytes"])
def test_an_upload_in_doubt_is_settled_by_name_and_checksum(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator, same: bool
) -> None:
    """Its object exists already (an upload whose reply was lost, a crash): with the same
    bytes it is used as it is; with other bytes it is replaced. One job either way."""
    daemon = make_vertex(vertex={"keep_staged": True})
    daemon.drop("u.jsonl", LINES)
    daemon.run_until(lambda: daemon.state().get("u.jsonl") == "RUNNING")
    [(name, data)] = [(n, d) for n, d in staged(storage).items() if n.endswith("input.jsonl")]
    first = storage.generation(BUCKET, name)
    daemon.restart()
    record_path = daemon.inbox / "processing" / "u.jsonl.job.json"
    record = json.loads(record_path.read_text())
    job = record["jobs"][0]
    job.update(state="UPLOADING", job_name=None, job_state=None, uploaded_file=None)
    job["upload_pending_since"] = job["create_pending_since"] = None
    record_path.write_text(json.dumps(record))
    for old in list(vsim.jobs):
        vsim.forget_job(old)  # as if the first job had never been made
    if not same:
        storage.client().bucket(BUCKET).blob(name).upload_from_string(b"other bytes\n")
    daemon.run_all()
    assert [r["status"] for r in daemon.results("u.jsonl")] == ["ok"] * 4
    assert staged(storage)[name] == data
    assert (storage.generation(BUCKET, name) == first) is same


# ---- what time or an operator can fix -------------------------------------------------------


def test_a_permission_revoked_for_a_while_pauses_and_resumes(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    vsim.reject_key(403, seconds=300)
    daemon = make_vertex()
    daemon.drop("perm.jsonl", LINES)
    try:
        daemon.run_until(lambda: daemon.service.health.paused)
    finally:
        for e in daemon.log_events():
            if e.get("level") != "debug" and e.get("logger") == "gemini-batchd":
                print({k: v for k, v in e.items() if k not in ("timestamp", "logger")})
    assert "aiplatform.batchPredictionJobs" in (daemon.service.health.paused or "")
    daemon.run_all()
    assert daemon.service.health.paused is None
    assert [r["status"] for r in daemon.results("perm.jsonl")] == ["ok"] * 4
    assert len(vsim.jobs) == 1


def test_a_bucket_that_refuses_writes_pauses_until_it_is_fixed(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator
) -> None:
    storage.add_fault("POST", r"/b/batch-staging/o", 403, times=3)
    daemon = make_vertex()
    daemon.drop("b.jsonl", LINES)
    daemon.run_until(lambda: daemon.service.health.paused)
    assert "storage.objects.create" in (daemon.service.health.paused or "")
    daemon.run_all()
    assert [r["status"] for r in daemon.results("b.jsonl")] == ["ok"] * 4


@pytest.mark.parametrize("outcome", ["FAILED", "CANCELLED"])
def test_a_job_vertex_ends_without_answers_gets_a_report(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator, outcome: str
) -> None:
    vsim.outcome = outcome
    daemon = make_vertex()
    daemon.drop("f.jsonl", LINES)
    daemon.run_all()
    report = daemon.report("f.jsonl")
    assert (report["stage"], report["job_state"]) == ("job", f"JOB_STATE_{outcome}")
    assert report["job_name"].startswith("projects/")
    assert not staged(storage)


def test_paused_updating_and_cancelling_jobs_are_still_in_flight(
    make_vertex: MakeDaemon, vsim: VertexSimulator
) -> None:
    daemon = make_vertex()
    daemon.drop("s.jsonl", LINES)
    daemon.run_until(lambda: vsim.jobs)
    [name] = vsim.jobs
    for state in ("PAUSED", "UPDATING"):
        vsim.set_job_state(name, state)
        daemon.run_until(lambda s=state: daemon.sidecar("s.jsonl")["job_state"] == f"JOB_STATE_{s}")
        assert daemon.state()["s.jsonl"] == "RUNNING"
    vsim.set_job_state(name, "SUCCEEDED")
    daemon.run_all()
    assert [r["status"] for r in daemon.results("s.jsonl")] == ["ok"] * 4


# ---- status and metrics ------------------------------------------------------------------------


def test_status_and_metrics_show_vertex_jobs_like_gemini_ones(
    make_vertex: MakeDaemon, vsim: VertexSimulator, tmp_path: Path
) -> None:
    daemon = make_vertex(metrics_file=str(tmp_path / "m.prom"))
    daemon.drop("m.jsonl", LINES)
    daemon.run_until(
        lambda: (daemon.sidecar("m.jsonl").get("progress") or {}).get("succeeded", 0) > 0
    )
    row = next(r for r in status.snapshot(daemon.config)["files"] if r["input"] == "m.jsonl")
    assert row["state"] == "RUNNING" and row["job_name"].startswith("projects/")
    assert row["job_state"] == "JOB_STATE_RUNNING" and row["progress"]["succeeded"] > 0
    daemon.run_all()
    text = metrics.render(daemon.service._metrics_view())
    assert 'gemini_batchd_api_calls_total{call="create",outcome="ok"} 1' in text
    assert "gemini_batchd_requests_ok_total 4" in text


@pytest.mark.parametrize("status", [0, 503], ids=["dropped", "unavailable"])
def test_a_prediction_download_that_fails_is_made_again_never_the_job(
    make_vertex: MakeDaemon, vsim: VertexSimulator, storage: StorageEmulator, status: int
) -> None:
    """Reading predictions fails as the network does (a dropped connection, 503s): the
    download is made again until it goes through; the job is never created again. (The
    storage client's own retries wait in real time: two faults keep that to seconds.)"""
    storage.add_fault("GET", r"/predictions_[0-9-of]+\.jsonl$", status, times=2)
    daemon = make_vertex()
    daemon.drop("d.jsonl", LINES)
    daemon.run_all()
    assert [r["status"] for r in daemon.results("d.jsonl")] == ["ok"] * 4
    assert len(vsim.jobs) == 1
    failed = [p for m, p, s in storage.requests_log if m == "GET" and s == status]
    assert len(failed) == 2 and all("predictions_" in p for p in failed)  # the faults were met
