"""The API key is never written anywhere, and what the daemon writes is not world-readable.

Error paths matter most: the API's own error messages are made to carry the key, and the
daemon must still keep it out of every log line, sidecar, report and results file.
"""

from __future__ import annotations

import io
import logging
import stat
from pathlib import Path

import pytest

from daemon import logs
from daemon.faults import CRASH_ENV
from daemon.simulator import Fault, Simulator
from tests.guarantees import assert_no_secret, assert_nothing_lost, records, report, state_of
from tests.harness import TEST_API_KEY, Spool, wait_for

LEAKY = f"the request carried API key {TEST_API_KEY}, which is refused"
CREATE = ":batchGenerateContent"


def assert_private(spool: Spool) -> None:
    """Every file the daemon wrote (outbox files, sidecars) has no permission bits for others."""
    written = list(spool.outbox.rglob("*")) + list(spool.inbox.rglob("*.job.json"))
    assert written
    for path in written:
        mode = path.lstat().st_mode
        assert stat.S_IMODE(mode) & 0o007 == 0, f"{path} is mode {oct(stat.S_IMODE(mode))}"


def assert_key_nowhere(spool: Spool) -> None:
    assert_no_secret(spool)
    assert TEST_API_KEY not in spool.logs()
    assert_private(spool)


def test_key_absent_from_a_debug_run(spool: Spool) -> None:
    spool.drop("ok.jsonl", ["hello", {"key": "k", "prompt": "again"}])
    assert spool.run_once() == 0
    assert [r["status"] for r in records(spool, "ok.jsonl")] == ["ok", "ok"]
    assert '"level": "debug"' in spool.logs()  # the chattiest level, HTTP libraries included
    assert_key_nowhere(spool)


@pytest.mark.parametrize("status", [400, 403])
def test_key_in_a_create_error_is_redacted(spool: Spool, sim: Simulator, status: int) -> None:
    sim.add_fault(Fault("POST", CREATE, status=status, times=5, message=LEAKY))
    spool.drop("bad.jsonl", ["hello"])
    assert spool.run_once() == 1
    rep = report(spool, "bad.jsonl")
    assert rep["stage"] == "submission"
    assert "[redacted]" in rep["message"]
    assert_nothing_lost(spool, ["bad.jsonl"], jobs=0)
    assert_key_nowhere(spool)


def test_key_in_transient_errors_is_redacted(spool: Spool, sim: Simulator) -> None:
    sim.add_fault(Fault("POST", CREATE, status=503, times=2, message=LEAKY))
    sim.add_fault(Fault("GET", "batches/", status=429, times=2, message=LEAKY))
    spool.drop("retry.jsonl", ["hello"])
    assert spool.run_once() == 0
    assert "[redacted]" in spool.logs()
    assert_nothing_lost(spool, ["retry.jsonl"], jobs=1)
    assert_key_nowhere(spool)


def test_key_in_a_failed_job_message_is_redacted(spool: Spool, sim: Simulator) -> None:
    sim.pending_seconds = 3600
    spool.drop("job.jsonl", ["hello"])
    proc = spool.start()
    wait_for(lambda: state_of(spool, "job.jsonl") == "running", timeout=30)
    sim.set_job_state(spool.sidecar("job.jsonl")["job_name"], "FAILED", message=LEAKY)
    wait_for(lambda: spool.finished("job.jsonl"), timeout=30)
    assert proc.poll() is None
    rep = report(spool, "job.jsonl")
    assert rep["stage"] == "job" and "[redacted]" in rep["message"]
    assert_key_nowhere(spool)


def test_a_wrong_key_gives_a_report_without_it(tmp_path: Path) -> None:
    """The server refuses the key (400 API_KEY_INVALID): a submission error, no key anywhere."""
    with Simulator(api_key="AIzaSOME-other-key", pending_seconds=0.1) as sim:
        spool = Spool(tmp_path, sim)
        try:
            spool.drop("refused.jsonl", ["hello"])
            assert spool.run_once() == 1
            rep = report(spool, "refused.jsonl")
            assert rep["stage"] == "submission" and "400" in rep["message"]
            assert_key_nowhere(spool)
        finally:
            spool.stop_all()


def test_temporary_files_are_private(tmp_path: Path, sim: Simulator) -> None:
    """A crash half-way through writing leaves temp files (prompts, responses): not for others."""
    spool = Spool(tmp_path, sim, limits={"inline_max_bytes": 10})
    try:
        spool.drop("temps.jsonl", [f"prompt {i}" for i in range(6)])
        assert spool.run_once(env={CRASH_ENV: "mid_write"}) == -9
        temps = [p for d in (spool.outbox, spool.inbox / "processing") for p in d.glob(".*")]
        assert temps, "the crash left no temporary file to check"
        for path in temps:
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o007 == 0, f"{path.name} is mode {oct(mode)}"
        assert spool.run_once() == 0
        assert_nothing_lost(spool, ["temps.jsonl"], jobs=1)
        assert_key_nowhere(spool)
    finally:
        spool.stop_all()


def test_logged_exception_text_is_redacted() -> None:
    """A traceback is formatted after the event's fields: its text must be redacted too."""
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    logs.add_secret(TEST_API_KEY)
    try:
        raise RuntimeError(f"something echoed {TEST_API_KEY}")
    except RuntimeError:
        logs.get().exception("unexpected error; will retry")
        logging.getLogger("google_genai").exception("library failure")
    text = stream.getvalue()
    assert "unexpected error" in text and "library failure" in text
    assert "RuntimeError" in text
    assert TEST_API_KEY not in text
