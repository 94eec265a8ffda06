"""A live smoke test against Google's Batch API: skipped unless GEMINI_API_KEY is set.

It creates one tiny inline job (billed at batch prices), checks that the backend can see and
cancel it, and never waits for it to finish (batch jobs can take hours).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from daemon.api.gemini import GeminiEngine
from daemon.inputs import Defaults, prompt_request

KEY = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")

pytestmark = pytest.mark.skipif(
    not KEY or os.environ.get("CI") == "true", reason="live test: needs GEMINI_API_KEY and network"
)


def test_create_find_and_cancel_a_real_job(tmp_path: Path) -> None:
    assert KEY
    backend = GeminiEngine(KEY, retries=3)
    display_name = f"gemini-batchd-live-test/{uuid.uuid4().hex[:12]}"
    requests = tmp_path / "j1.req"
    requests.write_bytes(prompt_request("1", 1, "Say OK.", Defaults(thinking_budget=0)).wire)
    job = backend.create_job("gemini-2.5-flash", display_name, requests, inline=True)
    try:
        assert job.name.startswith("batches/")
        assert job.display_name == display_name and not job.done
        found = backend.find_job(display_name)
        assert found is not None and found.name == job.name
        assert backend.get_job(job.name).name == job.name
    finally:
        backend.cancel_job(job.name)
        backend.close()
