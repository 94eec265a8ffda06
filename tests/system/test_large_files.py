"""Large inputs and many inputs, in-process: the File API path, the size limit, inputs split into
parts, and a burst of small files under the job-slot limit."""

from __future__ import annotations

import json
import os
from typing import Any

from daemon.simulator import Simulator
from tests.support.inprocess import Daemon

INLINE_MAX = 2000
MakeDaemon = Any


def keyed_lines(count: int, width: int = 60) -> list[dict[str, str]]:
    return [{"key": f"k{i}", "prompt": f"prompt {i} " + "x" * width} for i in range(count)]


def upload_calls(sim: Simulator) -> list[tuple[str, str, int]]:
    return [entry for entry in sim.requests_log if entry[1].startswith("/upload/")]


def version(sim: Simulator) -> str:
    create = next(p for _, p, _ in sim.requests_log if p.endswith(":batchGenerateContent"))
    return create.split("/")[1]


def test_file_over_inline_limit_goes_through_the_file_api(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    daemon = make_daemon(limits={"inline_max_bytes": INLINE_MAX}, retry_requests=0)
    sim.shuffle_output = True
    sim.fail_keys = {"k3": 400, "k17": 500}
    sim.missing_keys = {"k8"}
    lines = keyed_lines(40)
    path = daemon.drop("big.jsonl", lines)
    assert path.stat().st_size > INLINE_MAX
    daemon.run_all()

    # The resumable protocol: a `start` call, then the chunk(s) on the upload URL.
    uploads = upload_calls(sim)
    assert uploads[0][0] == "POST" and "upload_id" not in uploads[0][1]
    assert any("upload_id=" in p and status == 200 for _, p, status in uploads[1:])
    # The job was created from the uploaded file, not inline.
    (job,) = sim.jobs.values()
    assert job["input_file"] and job["input_file"].startswith("files/")
    assert [r["key"] for r in job["requests"]] == [line["key"] for line in lines]
    assert daemon.sidecar("big.jsonl")["jobs"][0]["mode"] == "file"
    # The upload and the responses file are deleted once collected; the create was sent once.
    assert job["input_file"] not in sim.uploaded_files and not sim.files
    assert ("DELETE", f"/{version(sim)}/{job['input_file']}", 200) in sim.requests_log
    assert sim.create_calls == 1

    records = daemon.results("big.jsonl")
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
    assert (daemon.inbox / "done" / "big.jsonl").exists()


def test_many_small_requests_go_through_the_file_api_by_default(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """A small input of many requests is not inline: its answers would come back in one reply
    held in memory (limits.inline_max_requests); a few requests still go inline."""
    daemon = make_daemon(retry_requests=0)
    many = daemon.drop("many.jsonl", [f"p{i}" for i in range(1001)])
    assert many.stat().st_size < 20_000
    daemon.drop("few.jsonl", [f"p{i}" for i in range(1000)])
    daemon.run_all()
    assert daemon.sidecar("many.jsonl")["jobs"][0]["mode"] == "file"
    assert daemon.sidecar("few.jsonl")["jobs"][0]["mode"] == "inline"
    assert len(daemon.results("many.jsonl")) == 1001
    assert len(daemon.results("few.jsonl")) == 1000


def test_multi_chunk_upload_keeps_every_request(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """Over the SDK's 8 MiB chunk size: the upload takes several chunks, results stay complete."""
    daemon = make_daemon(limits={"inline_max_bytes": INLINE_MAX})
    sim.shuffle_output = True
    lines = keyed_lines(4500, width=2000)
    path = daemon.drop("huge.jsonl", lines)
    assert path.stat().st_size > 8 * 1024 * 1024
    daemon.run_all()

    chunks = [p for _, p, _ in upload_calls(sim) if "upload_id=" in p]
    assert len(chunks) >= 2
    records = daemon.results("huge.jsonl")
    assert len(records) == len(lines)
    assert [r["key"] for r in records] == [line["key"] for line in lines]
    assert all(r["status"] == "ok" for r in records)
    assert not sim.files


def test_file_over_max_file_bytes_gets_a_validation_report(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    daemon = make_daemon(limits={"inline_max_bytes": INLINE_MAX, "max_file_bytes": 5000})
    daemon.drop("small.jsonl", keyed_lines(3))
    path = daemon.drop("toolarge.jsonl", keyed_lines(100))
    size = path.stat().st_size
    assert size > 5000
    daemon.run_all()
    assert daemon.exit_status() == 1

    report = daemon.report("toolarge.jsonl")
    assert report["stage"] == "validation"
    assert "max_file_bytes" in report["message"] and str(size) in report["message"]
    assert report["job_name"] is None
    assert (daemon.inbox / "failed" / "toolarge.jsonl").exists()
    # Nothing of it reached the API; the small file went through as usual.
    assert not upload_calls(sim)
    assert sim.create_calls == 1
    assert [r["status"] for r in daemon.results("small.jsonl")] == ["ok"] * 3


def test_an_input_split_into_parts_inline_and_file_api(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """limits.max_job_bytes cuts the input into parts, each its own job, merged back in input
    order. The file as a whole decides inline or File API (as `validate` says): over
    inline_max_bytes, every part goes through the File API."""
    lines = keyed_lines(30, width=100)
    daemon = make_daemon(limits={"max_job_bytes": 2500, "inline_max_bytes": 2400})
    sim.shuffle_output = True
    daemon.drop("parts.jsonl", lines)
    daemon.run_all()
    records = daemon.results("parts.jsonl")
    assert [r["key"] for r in records] == [line["key"] for line in lines]
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in records)
    jobs = daemon.sidecar("parts.jsonl")["jobs"]
    assert len(jobs) >= 2 and [j["part"] for j in jobs] == list(range(1, len(jobs) + 1))
    assert {j["mode"] for j in jobs} == {"file"}
    assert sum(j["requests"] for j in jobs) == 30
    assert len(sim.jobs) == len(jobs) and not sim.files


def test_one_failed_part_fails_the_file_but_its_answers_are_kept(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    """One part's job FAILED: the file gets an error report naming the part, and the results
    of the parts that succeeded are written too (`job` records for the failed part's requests)."""
    daemon = make_daemon(limits={"max_requests_per_job": 2})
    sim.pending_seconds = 3600
    daemon.drop("p.jsonl", ["a", "b", "c", "d", "e"])
    daemon.run_until(lambda: len(sim.jobs) == 3)
    names = [j["job_name"] for j in daemon.sidecar("p.jsonl")["jobs"]]
    sim.set_job_state(names[1], "FAILED", "the second part broke")
    for name in (names[0], names[2]):
        sim.set_job_state(name, "SUCCEEDED")
    daemon.run_all()
    assert daemon.exit_status() == 1
    report = daemon.report("p.jsonl")
    assert report["stage"] == "job" and report["job_name"] == names[1]
    assert report["message"].startswith(f"part 2 of 3 (job {names[1]}): ")
    assert "the second part broke" in report["message"]
    records = daemon.results("p.jsonl")
    assert [(r["status"], r.get("error", {}).get("stage")) for r in records] == [
        ("ok", None),
        ("ok", None),
        ("error", "job"),
        ("error", "job"),
        ("ok", None),
    ]
    assert (daemon.inbox / "failed" / "p.jsonl").exists()


# ---- many small files -----------------------------------------------------------------------

BURST_FILES = 60
MAX_ACTIVE = 5


def test_a_burst_of_small_files_under_the_job_slot_limit(
    make_daemon: MakeDaemon, sim: Simulator
) -> None:
    daemon: Daemon = make_daemon(limits={"max_active_jobs": MAX_ACTIVE}, log_level="info")
    daemon.start()
    names = [f"f{i:04d}.jsonl" for i in range(BURST_FILES)]
    for i, name in enumerate(names):  # written as dot-files, renamed into place in one burst
        (daemon.inbox / f".{name}").write_text(json.dumps({"key": f"q{i}", "prompt": "hi"}))
    for name in names:
        os.rename(daemon.inbox / f".{name}", daemon.inbox / name)
    peak = 0

    def all_done() -> bool:
        nonlocal peak
        unfinished = [j for j in sim.jobs.values() if not j["state"].endswith("SUCCEEDED")]
        peak = max(peak, len(unfinished))
        return daemon.finished == BURST_FILES

    daemon.service.watcher.rescan()
    daemon.run_until(all_done)

    # Exactly one job per file, each with its one request; every file got its result.
    jobs = sim.jobs
    assert sim.create_calls == BURST_FILES == len(jobs)
    display_names = sorted(job["display_name"] for job in jobs.values())
    assert len(set(display_names)) == BURST_FILES
    assert all(sim.jobs_created_for(n) == 1 for n in display_names)
    for i, name in enumerate(names):
        (record,) = daemon.results(name)
        assert record["status"] == "ok" and record["key"] == f"q{i}"

    # Never more than MAX_ACTIVE jobs unfinished at the simulator: sampled at every turn, and
    # exactly from each job's life span there ([create, create + pending + running]).
    assert peak <= MAX_ACTIVE
    life = sim.pending_seconds + sim.running_seconds
    created = {name: job.created for name, job in sim._jobs.items()}  # on the test's clock
    points = sorted(
        [(at, 1) for at in created.values()] + [(at + life, -1) for at in created.values()]
    )
    overlap = most = 0
    for _, step in points:  # an end sorts before a start at the same moment
        overlap += step
        most = max(most, overlap)
    assert most <= MAX_ACTIVE
    # Slots are granted in arrival order: files were created in the order they arrived.
    order = sorted(created, key=lambda name: created[name])
    first_keys = [jobs[name]["requests"][0]["key"] for name in order[:MAX_ACTIVE]]
    assert sorted(first_keys) == [f"q{i}" for i in range(MAX_ACTIVE)]
