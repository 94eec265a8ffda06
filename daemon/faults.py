"""Crash points for the crash tests: the daemon kills itself with SIGKILL at a named point.

Set `GEMINI_BATCHD_CRASH_AT=<point>` (comma-separated for several; `point@N` for the N-th
time it is reached). Unset in production, where each check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

CRASH_ENV = "GEMINI_BATCHD_CRASH_AT"
POINTS = (
    "after_claim",  # input moved into processing/, sidecar not yet written
    "after_upload",  # File API: the input is uploaded, the sidecar does not know its name yet
    "before_create",  # the sidecar records a create in doubt, create not yet sent
    "after_create",  # the job exists, the sidecar does not know its name yet
    "in_lookup",  # a create in doubt is being looked up (the grace period)
    "while_polling",  # a poll has returned, its result not yet saved
    "while_fetching",  # the job finished; its answers not yet saved
    "after_collect",  # a job's answers saved and its remote files deleted
    "after_round",  # follow-up jobs planned for failed requests, none created yet
    "mid_write",  # half the results records written to the temp file
    "after_write",  # outbox file published; input not yet archived
    "while_archiving",  # input archived and work files removed; the sidecar still in processing/
)
VERTEX_POINTS = (
    "vertex_uploaded",  # a request file staged in Cloud Storage, no job made yet
    "vertex_listed",  # the job's prediction files listed, none read yet
    "vertex_reading",  # half-way through reading the predictions
    "vertex_deleting",  # one staged object deleted, the others not yet
)
"""Points met only with backend: vertex (tests/process/test_vertex.py)."""
_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process if the environment asks for a crash at `name`."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        count = _counts[name]
    for spec in wanted.split(","):
        point, _, nth = spec.partition("@")
        if point == name and count == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
