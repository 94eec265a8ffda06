"""Files in flight under the previous version (one job per sidecar) are finished after an upgrade."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.api.gemini import GeminiEngine
from daemon.inputs import Defaults, prompt_request
from daemon.simulator import Simulator
from tests.support.harness import TEST_API_KEY


def _old_sidecar(state: str, **fields: Any) -> bytes:
    record = {
        "input": "old.jsonl",
        "state": state,
        "sha256": "0" * 64,
        "size_bytes": 10,
        "requests": 2,
        "mode": "inline",
        "model": "gemini-2.5-flash",
        "filter_json": False,
        "include_response": False,
        "claim_id": "abcdef012345",
        "display_name": "gemini-batchd/old.jsonl/0000000000000000/abcdef012345",
        "uploaded_file": None,
        "job_name": None,
        "job_state": None,
        "progress": None,
        "created_at": "2026-11-30T10:00:00Z",
        "updated_at": "2026-11-30T10:00:00Z",
        "polls": 3,
        "next_poll_at": "2026-11-30T10:10:00Z",
        "retries": 0,
        "create_calls": 1,
        "expired_resubmits": 0,
        "error": None,
        "output": None,
        "archived_as": None,
        **fields,
    }
    return json.dumps(record).encode()


def test_a_running_job_of_the_old_format_is_collected(
    make_daemon: Any, sim: Simulator, tmp_path: Path
) -> None:
    daemon = make_daemon()
    processing = daemon.inbox / "processing"
    processing.mkdir(parents=True, exist_ok=True)
    (processing / "old.jsonl").write_text('"one"\n"two"\n')
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(
        b"".join(prompt_request(str(i), i, p, Defaults()).wire for i, p in [(1, "one"), (2, "two")])
    )
    backend = GeminiEngine(TEST_API_KEY, base_url=sim.base_url)
    job = backend.create_job("gemini-2.5-flash", "old job", requests, inline=True)
    backend.close()
    (processing / "old.jsonl.job.json").write_bytes(
        _old_sidecar("running", job_name=job.name, job_state="JOB_STATE_PENDING")
    )
    daemon.run_all()
    assert [r["text"] for r in daemon.results("old.jsonl")] == [
        "Simulated answer: one",
        "Simulated answer: two",
    ]
    assert len(sim.jobs) == 1


def test_an_old_create_in_doubt_is_looked_up(make_daemon: Any, sim: Simulator) -> None:
    daemon = make_daemon()
    processing = daemon.inbox / "processing"
    processing.mkdir(parents=True, exist_ok=True)
    (processing / "old.jsonl").write_text('"one"\n"two"\n')
    (processing / "old.jsonl.job.json").write_bytes(_old_sidecar("submitting"))
    daemon.run_all()
    assert [r["status"] for r in daemon.results("old.jsonl")] == ["ok", "ok"]
    assert len(sim.jobs) == 1
