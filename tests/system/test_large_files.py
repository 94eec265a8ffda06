"""Large inputs and many inputs: the File API path, the size limit, and a burst of small files."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from daemon.simulator import Simulator
from tests.harness import Spool, wait_for

INLINE_MAX = 2000
FINISHED_AT_SIM = {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED"}


def keyed_lines(count: int, width: int = 60) -> list[dict[str, str]]:
    return [{"key": f"k{i}", "prompt": f"prompt {i} " + "x" * width} for i in range(count)]


def upload_calls(sim: Simulator) -> list[tuple[str, str, int]]:
    return [entry for entry in sim.requests_log if entry[1].startswith("/upload/")]


def test_file_over_inline_limit_goes_through_the_file_api(spool: Spool, sim: Simulator) -> None:
    spool.configure(limits={"inline_max_bytes": INLINE_MAX})
    sim.shuffle_output = True
    sim.fail_keys = {"k3": 400, "k17": 500}
    sim.missing_keys = {"k8"}
    lines = keyed_lines(40)
    path = spool.drop("big.jsonl", lines)
    assert path.stat().st_size > INLINE_MAX

    assert spool.run_once() == 0

    # The resumable protocol: a `start` call, then the chunk(s) on the upload URL.
    uploads = upload_calls(sim)
    assert uploads[0][:1] == ("POST",) and "upload_id" not in uploads[0][1]
    assert any("upload_id=" in p and status == 200 for _, p, status in uploads[1:])
    # The job was created from the uploaded file, not inline.
    (job,) = sim.jobs.values()
    assert job["input_file"] and job["input_file"].startswith("files/")
    assert [r["key"] for r in job["requests"]] == [line["key"] for line in lines]
    assert spool.sidecar("big.jsonl")["mode"] == "file"
    # The uploaded input is deleted once the job has finished; the create was sent once.
    assert job["input_file"] not in sim.uploaded_files
    assert ("DELETE", f"/{_version(sim)}/{job['input_file']}", 200) in sim.requests_log
    assert sim.create_calls == 1

    records = spool.results("big.jsonl")
    assert [r["key"] for r in records] == [line["key"] for line in lines]
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    by_key = {r["key"]: r for r in records}
    assert by_key["k3"]["status"] == "error" and by_key["k3"]["error"]["stage"] == "request"
    assert by_key["k3"]["error"]["code"] == 400
    assert by_key["k17"]["error"]["code"] == 500
    assert by_key["k8"]["error"]["stage"] == "missing"
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == len(lines) - 3
    for record in ok:
        assert record["text"].startswith("Simulated answer: prompt " + record["key"][1:])
    assert spool.finished("big.jsonl")


def test_multi_chunk_upload_keeps_every_request(spool: Spool, sim: Simulator) -> None:
    """Over the SDK's 8 MiB chunk size: the upload takes several chunks, results stay complete."""
    spool.configure(limits={"inline_max_bytes": INLINE_MAX})
    sim.shuffle_output = True
    lines = keyed_lines(4500, width=2000)
    path = spool.drop("huge.jsonl", lines)
    assert path.stat().st_size > 8 * 1024 * 1024

    assert spool.run_once(timeout=120) == 0

    chunks = [p for _, p, _ in upload_calls(sim) if "upload_id=" in p]
    assert len(chunks) >= 2
    records = spool.results("huge.jsonl")
    assert len(records) == len(lines)
    assert [r["key"] for r in records] == [line["key"] for line in lines]
    assert all(r["status"] == "ok" for r in records)
    assert not sim.uploaded_files


def test_file_over_max_file_bytes_gets_a_validation_report(spool: Spool, sim: Simulator) -> None:
    spool.configure(limits={"inline_max_bytes": INLINE_MAX, "max_file_bytes": 5000})
    spool.drop("small.jsonl", keyed_lines(3))
    path = spool.drop("toolarge.jsonl", keyed_lines(100))
    size = path.stat().st_size
    assert size > 5000

    assert spool.run_once() == 1

    report = spool.report("toolarge")
    assert report["stage"] == "validation"
    assert "max_file_bytes" in report["message"] and str(size) in report["message"]
    assert report["job_name"] is None
    assert spool.finished("toolarge.jsonl") and (spool.inbox / "failed" / "toolarge.jsonl").exists()
    # Nothing of it reached the API; the small file went through as usual.
    assert not upload_calls(sim)
    assert sim.create_calls == 1
    assert [r["status"] for r in spool.results("small.jsonl")] == ["ok"] * 3


# ---- many small files -----------------------------------------------------------------------

BURST_FILES = 1000
MAX_ACTIVE = 5


@pytest.fixture
def quick_sim() -> Iterator[Simulator]:
    """Jobs that finish 20 ms after creation, so a thousand of them fit in a short test."""
    with Simulator(pending_seconds=0.01, running_seconds=0.01, seed=11) as simulator:
        yield simulator


def test_a_thousand_small_files_at_once(tmp_path: Path, quick_sim: Simulator) -> None:
    sim = quick_sim
    spool = Spool(
        tmp_path,
        sim,
        limits={"max_active_jobs": MAX_ACTIVE},
        poll={"initial_seconds": 0.025, "max_seconds": 0.1},
        log_level="info",
    )
    peak = {"unfinished": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            states = [job["state"] for job in sim.jobs.values()]
            unfinished = sum(1 for s in states if s not in FINISHED_AT_SIM)
            peak["unfinished"] = max(peak["unfinished"], unfinished)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        proc = spool.start()
        wait_for(lambda: '"started"' in spool.logs(), timeout=20)
        sampler.start()
        started = time.monotonic()
        # Written as dot-files first, then renamed into place in one burst.
        names = [f"f{i:04d}.jsonl" for i in range(BURST_FILES)]
        for i, name in enumerate(names):
            (spool.inbox / f".{name}").write_text(json.dumps({"key": f"q{i}", "prompt": "hi"}))
        for name in names:
            os.rename(spool.inbox / f".{name}", spool.inbox / name)

        done = spool.inbox / "done"

        def all_done() -> bool:
            return done.is_dir() and sum(1 for p in done.glob("*.jsonl")) == BURST_FILES

        wait_for(all_done, timeout=90, interval=0.2)
        elapsed = time.monotonic() - started
        wait_for(lambda: all(spool.finished(n) for n in names), timeout=10)
        assert proc.poll() is None
    finally:
        sampling.set()
        spool.stop_all()
    sampler.join(timeout=5)

    # Exactly one job per file, each with its one request; every file got its result.
    jobs = sim.jobs
    assert sim.create_calls == BURST_FILES == len(jobs)
    names_seen = sorted(job["display_name"] for job in jobs.values())
    assert len(set(names_seen)) == BURST_FILES
    assert all(sim.jobs_created_for(n) == 1 for n in names_seen)
    for i, name in enumerate(names[:: BURST_FILES // 20]):
        (record,) = spool.results(name)
        assert record["status"] == "ok" and record["key"] == f"q{i * (BURST_FILES // 20)}"
    assert sum(1 for _ in spool.outbox.glob("*.jsonl")) == BURST_FILES

    # Never more than MAX_ACTIVE jobs unfinished at the simulator: sampled while running, and
    # exactly from each job's life span there ([create, create + pending + running]).
    assert peak["unfinished"] <= MAX_ACTIVE
    life = sim.pending_seconds + sim.running_seconds
    points: list[tuple[float, int]] = []
    for job in jobs.values():
        created = datetime.fromisoformat(job["create_time"].replace("Z", "+00:00")).timestamp()
        points += [(created, 1), (created + life, -1)]
    overlap = most = 0
    for _, step in sorted(points):
        overlap += step
        most = max(most, overlap)
    assert most <= MAX_ACTIVE

    # The daemon's own log agrees: never more than MAX_ACTIVE jobs submitted and not yet seen done.
    in_flight = peak_in_flight = 0
    for event in spool.log_events():
        if event.get("event") == "submitted":
            in_flight += 1
        elif event.get("event") == "job state changed" and event.get("job_state", "").endswith(
            "SUCCEEDED"
        ):
            in_flight -= 1
        peak_in_flight = max(peak_in_flight, in_flight)
    assert peak_in_flight <= MAX_ACTIVE
    print(f"{BURST_FILES} files in {elapsed:.1f}s")  # ~45 s on 2 busy cores; the wait allows 90


def _version(sim: Simulator) -> str:
    create = next(p for m, p, _ in sim.requests_log if p.endswith(":batchGenerateContent"))
    return create.split("/")[1]
