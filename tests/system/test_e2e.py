"""The daemon end to end: a real `gemini-batchd run` process, the real SDK, the simulator.

Each test drives the program only through what the contract promises: files dropped into
the inbox, the command line and exit status, and what appears in the outbox and the inbox's
done/, failed/ and processing/ folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from daemon.simulator import Fault
from tests.harness import CONTRACT_SIDECAR_FIELDS, ROOT, TEST_API_KEY, Spool, wait_for

MODEL_VERSION = "gemini-2.5-flash-sim-001"


# ---- what the simulator answers, computed independently of the daemon --------------------


def words(text: str) -> int:
    return len(text.split())


def ok_record(
    key: str,
    line: int,
    prompt: str,
    *,
    system: str | None = None,
    json_mime: bool = False,
    thought: bool = False,
    filter_json: bool = False,
) -> dict[str, Any]:
    """The record the daemon must write for a prompt the simulator answers normally."""
    prompt_tokens = words(prompt) + (words(system) if system else 0)
    if json_mime:
        text = json.dumps({"echo": prompt, "words": prompt_tokens}, separators=(",", ":"))
    else:
        text = f"Simulated answer: {prompt}"
    thinking = 1 if thought else 0
    output = words(text)
    record: dict[str, Any] = {"key": key, "line": line, "status": "ok", "text": text}
    if filter_json:
        record["json"] = json.loads(text)
    record.update(
        {
            "finish_reason": "STOP",
            "model_version": MODEL_VERSION,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "output_tokens": output,
                "thinking_tokens": thinking,
                "total_tokens": prompt_tokens + output + thinking,
            },
        }
    )
    return record


def fenced_record(key: str, line: int, prompt: str) -> dict[str, Any]:
    """[[sim:fenced]]: JSON in a code fence, with prose around it and a trailing comma."""
    prompt_tokens = words(prompt)
    body = json.dumps({"echo": prompt, "words": prompt_tokens}, separators=(",", ":"))
    text = f"Here you go:\n```json\n{body[:-1]},}}\n```\nLet me know if you need more."
    return {
        "key": key,
        "line": line,
        "status": "ok",
        "text": text,
        "json": {"echo": prompt, "words": prompt_tokens},
        "finish_reason": "STOP",
        "model_version": MODEL_VERSION,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "output_tokens": words(text),
            "thinking_tokens": 0,
            "total_tokens": prompt_tokens + words(text),
        },
    }


# One line of each form of the contract, with markers scripting the simulator's answers.
NATIVE: dict[str, Any] = {
    "key": "native",
    "request": {
        "contents": [{"role": "user", "parts": [{"text": "native prompt"}]}],
        "generationConfig": {"temperature": 0.1},
    },
}
MIXED_LINES: list[Any] = [
    "plain string prompt",  # 1: a string
    ["first part", "second part"],  # 2: an array of strings, one user turn
    b"",  # 3: blank, skipped but counted
    {  # 4: an object with every optional field
        "key": "obj",
        "prompt": "object prompt",
        "system_prompt": "answer in one word",
        "config": {"temperature": 0.5, "maxOutputTokens": 100},
        "filter_json": False,
    },
    NATIVE,  # 5: a native batch line
    {  # 6: JSON output, parsed
        "key": "js",
        "prompt": ["give", "json"],
        "filter_json": True,
        "config": {"response_mime_type": "application/json"},
    },
    {"key": "fenced", "prompt": "[[sim:fenced]] repair me", "filter_json": True},  # 7
    b"   ",  # 8: whitespace only
    "[[sim:error=400]] refused",  # 9
    {"key": "gone", "prompt": "[[sim:missing]] lost"},  # 10
    "[[sim:thought]] think first",  # 11
]


def mixed_expected() -> list[dict[str, Any]]:
    return [
        ok_record("1", 1, "plain string prompt"),
        ok_record("2", 2, "first part\nsecond part"),
        ok_record("obj", 4, "object prompt", system="answer in one word"),
        ok_record("native", 5, "native prompt"),
        ok_record("js", 6, "give\njson", json_mime=True, filter_json=True),
        fenced_record("fenced", 7, "[[sim:fenced]] repair me"),
        {
            "key": "9",
            "line": 9,
            "status": "error",
            "error": {
                "stage": "request",
                "code": 400,
                "message": "Simulated error requested by the prompt.",
            },
        },
        {
            "key": "gone",
            "line": 10,
            "status": "error",
            "error": {"stage": "missing", "message": "no response came back for this key"},
        },
        ok_record("11", 11, "[[sim:thought]] think first", thought=True),
    ]


def assert_mixed_results(records: list[dict[str, Any]]) -> None:
    expected = mixed_expected()
    assert [(r["key"], r["line"]) for r in records] == [(e["key"], e["line"]) for e in expected]
    for got, want in zip(records, expected, strict=True):
        if want["status"] == "error" and want["error"]["stage"] == "missing":
            assert got["status"] == "error"
            assert got["error"]["stage"] == "missing"
            continue
        assert got == want, f"record of key {want['key']!r}"
    for record in records:
        if record["status"] == "ok":
            assert all(type(v) is int for v in record["usage"].values())
        assert ("json" in record) == (record["key"] in ("js", "fenced"))
        assert "response" not in record
        assert "thinking..." not in record.get("text", "")


def encode(lines: list[Any]) -> bytes:
    """The bytes `Spool.drop` writes for `lines`."""
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def started(spool: Spool) -> bool:
    return any(e.get("event") == "started" for e in spool.log_events())


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
def test_running_daemon_takes_files_however_written(spool: Spool, api_version: str) -> None:
    """Rename, in-place write and cp into a running daemon's inbox: every line form, in order."""
    spool.configure(api={"api_version": api_version})
    spool.sim.shuffle_output = True
    proc = spool.start()
    wait_for(lambda: started(spool), timeout=20)
    names = {"renamed.jsonl": "rename", "written.jsonl": "inplace", "copied.jsonl": "copy"}
    for name, how in names.items():
        spool.drop(name, MIXED_LINES, how=how)
    for name in names:
        wait_for(partial(spool.finished, name), timeout=20)
    assert proc.poll() is None, "the daemon keeps running"

    for name in names:
        assert_mixed_results(spool.results(name))
        assert (spool.inbox / "done" / name).read_bytes() == encode(MIXED_LINES)
        assert not (spool.inbox / name).exists()
        assert not (spool.inbox / "processing" / name).exists()
        assert not (spool.outbox / (name[: -len(".jsonl")] + ".error.json")).exists()

    jobs = list(spool.sim.jobs.values())
    assert len(jobs) == 3, "one job per file"
    requests = {r["key"]: r["request"] for r in jobs[0]["requests"]}
    assert set(requests) == {"1", "2", "obj", "native", "js", "fenced", "9", "gone", "11"}
    assert requests["native"]["contents"] == NATIVE["request"]["contents"]
    assert requests["obj"]["systemInstruction"]["parts"][0]["text"] == "answer in one word"
    assert requests["obj"]["generationConfig"]["temperature"] == 0.5
    assert requests["2"]["contents"][0]["parts"][0]["text"] == "first part\nsecond part"
    assert any(f"/{api_version}/" in path for _, path, _ in spool.sim.requests_log)

    sidecar = spool.sidecar("renamed.jsonl")
    assert set(sidecar) >= CONTRACT_SIDECAR_FIELDS
    assert sidecar["input"] == "renamed.jsonl"
    assert sidecar["sha256"] == sha256(spool.inbox / "done" / "renamed.jsonl")
    assert sidecar["requests"] == 9
    assert sidecar["state"] == "done"
    assert sidecar["job_name"] in spool.sim.jobs
    assert sidecar["job_state"] == "JOB_STATE_SUCCEEDED"
    assert sidecar["model"] == "gemini-2.5-flash"
    assert sidecar["polls"] >= 1
    assert sidecar["error"] is None
    for stamp in ("created_at", "updated_at"):
        assert sidecar[stamp].endswith("Z")

    assert TEST_API_KEY not in spool.logs()
    for path in spool.all_written_files():
        assert TEST_API_KEY.encode() not in path.read_bytes(), path


def test_once_exit_status_and_invalid_file(spool: Spool) -> None:
    """An invalid file: an error report with line numbers, failed/, no job; `--once` exits 1."""
    spool.drop("good.jsonl", ["fine"])
    bad = [
        "ok line",
        b"{not json",
        b"",
        42,
        {"prompt": "x", "colour": "red"},
        {"key": "k", "prompt": "a"},
        {"key": "k", "prompt": "b"},
    ]
    spool.drop("bad.jsonl", bad)
    spool.drop(".hidden.jsonl", ["never taken"])
    (spool.inbox / "notes.txt").write_text('"not an input"\n')
    (spool.inbox / "x.jsonl.bak").write_text('"not an input"\n')

    proc = spool.start("--once")
    wait_for(lambda: started(spool), timeout=20)
    spool.drop("later.jsonl", ["dropped after the start"])  # --once leaves it alone
    assert proc.wait(timeout=60) == 1

    report = spool.report("bad")
    assert report["input"] == "bad.jsonl"
    assert report["stage"] == "validation"
    assert report["message"]
    assert report["job_name"] is None
    assert [e["line"] for e in report["errors"]] == [2, 4, 5, 7]
    assert all(e["message"] for e in report["errors"])
    assert "duplicate key" in report["errors"][3]["message"]
    assert report["time"].endswith("Z")
    assert (spool.inbox / "failed" / "bad.jsonl").exists()
    assert spool.sidecar("bad.jsonl")["state"] == "failed"
    assert not (spool.outbox / "bad.jsonl").exists()

    assert [r["status"] for r in spool.results("good.jsonl")] == ["ok"]
    assert (spool.inbox / "done" / "good.jsonl").exists()
    assert [j["display_name"] for j in spool.sim.jobs.values()] == [
        spool.sidecar("good.jsonl")["display_name"]
    ]
    assert spool.sim.create_calls == 1

    for ignored in (".hidden.jsonl", "notes.txt", "x.jsonl.bak", "later.jsonl"):
        assert (spool.inbox / ignored).exists(), ignored
    assert sorted(p.name for p in spool.outbox.iterdir()) == ["bad.error.json", "good.jsonl"]


def test_skip_line_delete_archive_include_response_system_prompt_file(spool: Spool) -> None:
    """Settings that change the records and what is kept, all at once."""
    (spool.root / "prompts").mkdir()
    (spool.root / "prompts" / "system.md").write_text("You are very terse.\n")
    spool.configure(
        on_invalid_line="skip_line",
        archive="delete",
        include_response=True,
        filter_json=True,
        system_prompt_file="prompts/system.md",
    )
    spool.drop("s.jsonl", [{"key": "a", "prompt": "[[sim:fenced]] go"}, b"[1, 2", "plain words"])
    assert spool.run_once() == 0

    a, invalid, plain = spool.results("s.jsonl")
    assert a["key"] == "a" and a["status"] == "ok"
    assert a["json"] == {"echo": "[[sim:fenced]] go", "words": 2 + 4}
    assert a["usage"]["prompt_tokens"] == 2 + 4  # the system prompt's words count too
    assert a["response"]["candidates"][0]["content"]["parts"][0]["text"] == a["text"]
    assert a["response"]["modelVersion"] == MODEL_VERSION
    assert invalid["line"] == 2
    assert invalid["status"] == "error"
    assert invalid["error"]["stage"] == "invalid"
    assert invalid["error"]["message"]
    assert plain["key"] == "3" and plain["line"] == 3
    assert plain["status"] == "error"
    assert plain["error"]["stage"] == "parse"
    assert plain["text"] == "Simulated answer: plain words"
    assert "json" not in plain

    (job,) = spool.sim.jobs.values()
    assert len(job["requests"]) == 2
    for request in job["requests"]:
        system = request["request"]["systemInstruction"]["parts"][0]["text"]
        assert system == "You are very terse.\n"

    # archive: delete leaves nothing of the input behind
    for folder in ("", "processing", "done", "failed"):
        leftovers = [p.name for p in (spool.inbox / folder).iterdir() if p.is_file()]
        assert leftovers == [], folder


def test_same_name_waits_for_the_first(spool: Spool) -> None:
    """A second NAME.jsonl waits in the inbox while the first is processed; nothing is overwritten."""
    spool.sim.pending_seconds = 600
    spool.drop("same.jsonl", ["first version"])
    proc = spool.start()
    wait_for(lambda: processing_state(spool, "same.jsonl") == "running", timeout=20)
    spool.drop("same.jsonl", ["second version", "has two lines"])

    def waiting() -> bool:
        return any(
            e.get("event", "").startswith("waiting") and e.get("file") == "same.jsonl"
            for e in spool.log_events()
        )

    wait_for(waiting, timeout=20)
    assert (spool.inbox / "same.jsonl").exists()
    (first_job,) = spool.sim.jobs
    spool.sim.pending_seconds = 0
    spool.sim.set_job_state(first_job, "SUCCEEDED")

    wait_for(lambda: (spool.outbox / "same-2.jsonl").exists(), timeout=30)
    wait_for(lambda: (spool.inbox / "done" / "same-2.jsonl.job.json").exists(), timeout=20)
    assert proc.poll() is None
    assert [r["text"] for r in spool.results("same.jsonl")] == ["Simulated answer: first version"]
    assert [r["text"] for r in spool.results("same-2.jsonl")] == [
        "Simulated answer: second version",
        "Simulated answer: has two lines",
    ]
    done = spool.inbox / "done"
    assert (done / "same.jsonl").read_text() == '"first version"\n'
    assert (done / "same-2.jsonl").read_text().startswith('"second version"')
    assert json.loads((done / "same.jsonl.job.json").read_text())["input"] == "same.jsonl"
    assert len(spool.sim.jobs) == 2
    assert not (spool.inbox / "same.jsonl").exists()


def simulate_project(tmp_path: Path) -> Path:
    """The project's own layout in a scratch folder: its config.yaml, empty inbox and outbox."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "config.yaml", project / "config.yaml")
    (project / "inbox").mkdir()
    (project / "outbox").mkdir()
    (project / "inbox" / "hello.jsonl").write_text('"hello"\n["a", "b"]\n')
    return project


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMINI_", "GOOGLE_", "NOTIFY_", "JOURNAL_", "CREDENTIALS_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_run_simulate(tmp_path: Path) -> None:
    """`gemini-batchd run --simulate --once` in the project's layout: no key, no base_url.

    Through the installed console script when there is one (every other test runs
    `python -m daemon`).
    """
    script = Path(sysconfig.get_path("scripts")) / "gemini-batchd"
    found = str(script) if script.exists() else shutil.which("gemini-batchd")
    command = [found] if found else [sys.executable, "-m", "daemon"]
    project = simulate_project(tmp_path)
    proc = subprocess.run(
        [*command, "run", "--simulate", "--once"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = [
        json.loads(line) for line in (project / "outbox" / "hello.jsonl").read_text().splitlines()
    ]
    assert [(r["key"], r["status"]) for r in records] == [("1", "ok"), ("2", "ok")]
    assert records[1]["text"] == "Simulated answer: a\nb"
    assert (project / "inbox" / "done" / "hello.jsonl").exists()


def test_unusual_inputs_get_error_reports_or_results(spool: Spool) -> None:
    """Links, empty files, folders, oversized files; odd names; names already taken."""
    spool.configure(limits={"max_file_bytes": 200})
    target = spool.root / "target.jsonl"
    target.write_text('"through a link"\n')
    (spool.inbox / "link.jsonl").symlink_to(target)
    (spool.inbox / "empty.jsonl").write_bytes(b"")
    (spool.inbox / "folder.jsonl").mkdir()
    spool.drop("huge.jsonl", ["x" * 300])
    spool.drop("naïve name.jsonl", ["unicode"])
    (spool.inbox / "crlf.jsonl").write_bytes(
        b'\xef\xbb\xbf"bom"\r\n\r\n{"key": 7, "prompt": "int key"}\r\n'
    )
    spool.drop("taken.jsonl", ["again"])
    spool.outbox.mkdir(exist_ok=True)
    (spool.outbox / "taken.jsonl").write_text("a user's file\n")
    (spool.inbox / "done").mkdir()
    (spool.inbox / "done" / "taken.jsonl").write_text("an older input\n")
    long_name = "n" * 240 + ".jsonl"  # no room left for the sidecar's temporary name
    (spool.inbox / long_name).write_text('"a"\n')

    assert spool.run_once() == 1

    for stem, words_ in (
        ("link", "symbolic link"),
        ("empty", "no requests"),
        ("folder", "not a regular file"),
        ("huge", "max_file_bytes"),
    ):
        report = spool.report(stem)
        assert report["stage"] == "validation", stem
        assert words_ in report["message"], stem
        assert spool.finished(f"{stem}.jsonl"), stem
        assert (spool.inbox / "failed" / f"{stem}.jsonl").exists(), stem
    assert (spool.inbox / "failed" / "link.jsonl").is_symlink()
    assert target.read_text() == '"through a link"\n'

    assert [r["text"] for r in spool.results("naïve name.jsonl")] == ["Simulated answer: unicode"]
    assert [(r["key"], r["line"], r["text"]) for r in spool.results("crlf.jsonl")] == [
        ("1", 1, "Simulated answer: bom"),
        ("7", 3, "Simulated answer: int key"),
    ]
    assert (spool.outbox / "taken.jsonl").read_text() == "a user's file\n"
    assert [r["text"] for r in spool.results("taken-2.jsonl")] == ["Simulated answer: again"]
    assert (spool.inbox / "done" / "taken.jsonl").read_text() == "an older input\n"
    assert (spool.inbox / "done" / "taken-2.jsonl").read_text() == '"again"\n'
    assert spool.sidecar("taken-2.jsonl")["input"] == "taken.jsonl"
    assert len(spool.sim.jobs) == 3

    assert (spool.inbox / long_name).read_text() == '"a"\n'  # left alone, with a warning
    (warning,) = [e for e in spool.log_events() if e.get("file") == long_name]
    assert warning["level"] == "warning"
    assert "bytes long" in warning["reason"]


def test_file_api_path_keeps_input_order(spool: Spool) -> None:
    """Inputs over limits.inline_max_bytes are uploaded; results come back through a file."""
    spool.configure(limits={"inline_max_bytes": 100})
    spool.sim.shuffle_output = True
    spool.drop("big.jsonl", MIXED_LINES)
    assert spool.run_once() == 0
    assert_mixed_results(spool.results("big.jsonl"))
    assert spool.sidecar("big.jsonl")["mode"] == "file"
    (job,) = spool.sim.jobs.values()
    assert job["input_file"] and job["input_file"].startswith("files/")
    assert spool.sim.uploaded_files == {}, "the uploaded input is deleted once finished"


def sidecar_in_processing(spool: Spool, name: str) -> dict[str, Any] | None:
    sidecar = spool.inbox / "processing" / (name + ".job.json")
    try:
        record: dict[str, Any] = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None
    return record


def processing_state(spool: Spool, name: str) -> str | None:
    record = sidecar_in_processing(spool, name)
    return None if record is None else str(record["state"])


def test_status_and_cancel(spool: Spool) -> None:
    """`status` shows files in flight; `cancel` works on a running job and on a queued file."""
    spool.configure(limits={"max_active_jobs": 1})
    spool.sim.pending_seconds = 60
    spool.drop("slow.jsonl", ["a", "b"])
    proc = spool.start()
    wait_for(lambda: processing_state(spool, "slow.jsonl") == "running", timeout=20)
    spool.drop("queued.jsonl", ["c"])
    wait_for(lambda: processing_state(spool, "queued.jsonl") == "queued", timeout=20)

    def status() -> dict[str, dict[str, Any]]:
        done = spool.cli("status", "-c", str(spool.config_path), "--json")
        assert done.returncode == 0, done.stderr
        return {row["input"]: row for row in json.loads(done.stdout)}

    rows = status()
    job_name = rows["slow.jsonl"]["job_name"]
    assert rows["slow.jsonl"]["state"] == "running"
    assert job_name in spool.sim.jobs
    assert rows["queued.jsonl"]["state"] == "queued"
    assert rows["queued.jsonl"]["job_name"] is None
    table = spool.cli("status", "-c", str(spool.config_path))
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("FILE")
    assert any("slow.jsonl" in line and job_name in line for line in table.stdout.splitlines())

    cancel = spool.cli("cancel", "queued.jsonl", "-c", str(spool.config_path))
    assert cancel.returncode == 0, cancel.stderr
    wait_for(lambda: spool.finished("queued.jsonl"), timeout=20)
    report = spool.report("queued")
    assert (report["stage"], report["job_name"]) == ("job", None)
    assert report["job_state"] == "JOB_STATE_CANCELLED"

    cancel = spool.cli("cancel", job_name, "-c", str(spool.config_path))
    assert cancel.returncode == 0, cancel.stderr
    assert job_name in cancel.stdout
    wait_for(lambda: spool.finished("slow.jsonl"), timeout=20)
    report = spool.report("slow")
    assert (report["stage"], report["job_name"]) == ("job", job_name)
    assert report["job_state"] == "JOB_STATE_CANCELLED"
    assert (spool.inbox / "failed" / "slow.jsonl").exists()
    assert len(spool.sim.jobs) == 1, "the queued file never got a job"
    assert proc.poll() is None


def test_cancel_while_the_job_is_being_created(spool: Spool) -> None:
    """A cancel that comes while the create call is failing and being retried is not lost."""
    fault = Fault(method="POST", path_contains="batchGenerateContent", status=503, times=10**6)
    spool.sim.add_fault(fault)
    spool.sim.pending_seconds = 600
    spool.drop("s.jsonl", ["a"])
    proc = spool.start()
    wait_for(lambda: (sidecar_in_processing(spool, "s.jsonl") or {}).get("create_calls"))
    cancel = spool.cli("cancel", "s.jsonl", "-c", str(spool.config_path))
    assert cancel.returncode == 0, cancel.stderr
    assert "batches/" not in cancel.stdout  # there was no job for the CLI to cancel
    fault.times = 0  # the API recovers: the job is created, then must be cancelled
    wait_for(lambda: spool.finished("s.jsonl"), timeout=30)
    report = spool.report("s")
    assert report["job_state"] == "JOB_STATE_CANCELLED"
    assert not (spool.outbox / "s.jsonl").exists()
    assert proc.poll() is None


def test_cancel_while_the_daemon_is_down(spool: Spool) -> None:
    """`cancel` of a file without a job yet, while no daemon runs: the next start honours it."""
    spool.configure(limits={"max_active_jobs": 1})
    spool.sim.pending_seconds = 600
    spool.drop("slow.jsonl", ["a"])
    proc = spool.start()
    wait_for(lambda: processing_state(spool, "slow.jsonl") == "running")
    spool.drop("queued.jsonl", ["b"])
    wait_for(lambda: processing_state(spool, "queued.jsonl") == "queued")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    (job,) = spool.sim.jobs
    spool.sim.set_job_state(job, "SUCCEEDED")
    cancel = spool.cli("cancel", "queued.jsonl", "-c", str(spool.config_path))
    assert cancel.returncode == 0, cancel.stderr
    assert "batches/" not in cancel.stdout  # there was no job for the CLI to cancel

    assert spool.run_once() == 1
    report = spool.report("queued")
    assert (report["stage"], report["job_state"]) == ("job", "JOB_STATE_CANCELLED")
    assert [r["status"] for r in spool.results("slow.jsonl")] == ["ok"]
    assert len(spool.sim.jobs) == 1
    assert not list((spool.inbox / "processing").iterdir())


def test_once_exit_1_counts_every_file_of_the_same_name(spool: Spool) -> None:
    """A file left in processing/ fails; a same-named file then succeeds: still exit 1."""
    processing = spool.inbox / "processing"
    processing.mkdir()
    (processing / "same.jsonl").write_bytes(b"{broken\n")  # as if claimed just before a crash
    spool.drop("same.jsonl", ["fine"])
    assert spool.run_once() == 1
    assert spool.report("same")["stage"] == "validation"
    assert [r["status"] for r in spool.results("same.jsonl")] == ["ok"]
    assert (spool.inbox / "failed" / "same.jsonl").read_bytes() == b"{broken\n"
    assert (spool.inbox / "done" / "same.jsonl").read_text() == '"fine"\n'
