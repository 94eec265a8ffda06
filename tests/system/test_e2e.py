"""The daemon end to end, in-process: the Service and the simulator on one clock, the real SDK
over loopback HTTP, real files.

Each test drives the daemon only through what the contract promises: files dropped into the
inbox, the settings, `--once`'s exit status, and what appears in the outbox and the inbox's
done/, failed/ and processing/ folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.simulator import Simulator
from tests.support.guarantees import left_in_processing
from tests.support.harness import CONTRACT_SIDECAR_FIELDS, TEST_API_KEY
from tests.support.inprocess import Daemon

MODEL_VERSION = "gemini-2.5-flash-sim-001"
MakeDaemon = Any


# ---- what the simulator answers, computed independently of the daemon --------------------


def words(text: str) -> int:
    return len(text.split())


def usage(prompt: int, output: int, thinking: int = 0) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "output_tokens": output,
        "thinking_tokens": thinking,
        "total_tokens": prompt + output + thinking,
        "cached_tokens": 0,
        "tool_prompt_tokens": 0,
    }


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
    record: dict[str, Any] = {"key": key, "line": line, "status": "ok", "text": text}
    if filter_json:
        record["json"] = json.loads(text)
    record["finish_reason"] = "STOP"
    record["model_version"] = MODEL_VERSION
    record["usage"] = usage(prompt_tokens, words(text), 1 if thought else 0)
    record["attempts"] = 1
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
        "usage": usage(prompt_tokens, words(text)),
        "attempts": 1,
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


def mixed_expected(rounds: int = 3) -> list[dict[str, Any]]:
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
                "status": "INVALID_ARGUMENT",
            },
            "attempts": 1,  # refused: not worth a follow-up job
        },
        {
            "key": "gone",
            "line": 10,
            "status": "error",
            "error": {"stage": "missing", "message": "no response came back for this key"},
            "attempts": rounds,  # missing every time: sent in every round
        },
        ok_record("11", 11, "[[sim:thought]] think first", thought=True),
    ]


def assert_mixed_results(records: list[dict[str, Any]], rounds: int = 3) -> None:
    expected = mixed_expected(rounds)
    assert [(r["key"], r["line"]) for r in records] == [(e["key"], e["line"]) for e in expected]
    for got, want in zip(records, expected, strict=True):
        assert got == want, f"record of key {want['key']!r}"
    for record in records:
        if "usage" in record:
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


def finished(daemon: Daemon, name: str) -> bool:
    return any(
        (daemon.inbox / folder / name).exists()
        and (daemon.inbox / folder / (name + ".job.json")).exists()
        for folder in ("done", "failed")
    )


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
def test_files_however_written_get_every_line_form_in_order(
    make_daemon: MakeDaemon, sim: Simulator, api_version: str
) -> None:
    """Rename, in-place write and cp into a running daemon's inbox: every line form, in order."""
    daemon = make_daemon(api={"api_version": api_version}).start()
    sim.shuffle_output = True
    names = {"renamed.jsonl": "rename", "written.jsonl": "inplace", "copied.jsonl": "copy"}
    for name, how in names.items():
        daemon.drop(name, MIXED_LINES, how=how)
    daemon.run_all()

    for name in names:
        assert_mixed_results(daemon.results(name))
        assert (daemon.inbox / "done" / name).read_bytes() == encode(MIXED_LINES)
        assert not (daemon.inbox / name).exists()
        assert not (daemon.inbox / "processing" / name).exists()
        assert not (daemon.outbox / (name[: -len(".jsonl")] + ".error.json")).exists()

    first_round = [j for j in sim.jobs.values() if j["display_name"].endswith("/r1p1a1")]
    assert len(first_round) == 3, "one job per file"
    requests = {r["key"]: r["request"] for r in first_round[0]["requests"]}
    assert set(requests) == {"1", "2", "obj", "native", "js", "fenced", "9", "gone", "11"}
    assert requests["native"] == NATIVE["request"]
    assert requests["obj"]["systemInstruction"]["parts"][0]["text"] == "answer in one word"
    assert requests["obj"]["generationConfig"]["temperature"] == 0.5
    assert requests["2"]["contents"][0]["parts"][0]["text"] == "first part\nsecond part"
    assert any(f"/{api_version}/" in path for _, path, _ in sim.requests_log)
    # The missing answer was asked for again in two follow-up rounds of one request each.
    follow_ups = [j for j in sim.jobs.values() if j not in first_round]
    assert len(follow_ups) == 6
    assert all([r["key"] for r in j["requests"]] == ["gone"] for j in follow_ups)

    sidecar = daemon.sidecar("renamed.jsonl")
    assert set(sidecar) >= CONTRACT_SIDECAR_FIELDS
    assert sidecar["input"] == "renamed.jsonl"
    assert sidecar["sha256"] == sha256(daemon.inbox / "done" / "renamed.jsonl")
    assert sidecar["requests"] == 9
    assert sidecar["state"] == "DONE"
    assert sidecar["job_name"] in sim.jobs
    assert sidecar["job_state"] == "JOB_STATE_SUCCEEDED"
    assert sidecar["model"] == "gemini-2.5-flash"
    assert sidecar["polls"] >= 3
    assert sidecar["error"] is None
    assert (sidecar["ok"], sidecar["errors"]) == (7, 2)
    assert [(j["round"], j["part"], j["state"]) for j in sidecar["jobs"]] == [
        (1, 1, "COLLECTED"),
        (2, 1, "COLLECTED"),
        (3, 1, "COLLECTED"),
    ]
    for stamp in ("created_at", "updated_at"):
        assert sidecar[stamp].endswith("Z")

    assert TEST_API_KEY not in daemon.log.getvalue()
    for path in daemon.folder.all_written_files():
        assert TEST_API_KEY.encode() not in path.read_bytes(), path


def test_once_exit_status_and_invalid_file(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """An invalid file: an error report with line numbers, failed/, no job; `--once` exits 1."""
    daemon = make_daemon(once=True)
    daemon.drop("good.jsonl", ["fine"])
    bad = [
        "ok line",
        b"{not json",
        b"",
        42,
        {"prompt": "x", "colour": "red"},
        {"key": "k", "prompt": "a"},
        {"key": "k", "prompt": "b"},
    ]
    daemon.drop("bad.jsonl", bad)
    daemon.drop(".hidden.jsonl", ["never taken"])
    (daemon.inbox / "notes.txt").write_text('"not an input"\n')
    (daemon.inbox / "x.jsonl.bak").write_text('"not an input"\n')
    daemon.start()
    daemon.drop("later.jsonl", ["dropped after the start"])  # --once leaves it alone
    daemon.run_until(daemon.service.once_finished)
    assert daemon.exit_status() == 1

    report = daemon.report("bad.jsonl")
    assert report["input"] == "bad.jsonl"
    assert report["stage"] == "validation"
    assert report["message"]
    assert (report["job_name"], report["job_state"]) == (None, None)
    assert [e["line"] for e in report["errors"]] == [2, 4, 5, 7]
    assert report["error_count"] == 4
    assert all(e["message"] for e in report["errors"])
    assert "duplicate key" in report["errors"][3]["message"]
    assert report["time"].endswith("Z")
    assert (daemon.inbox / "failed" / "bad.jsonl").exists()
    assert daemon.sidecar("bad.jsonl")["state"] == "FAILED"
    assert not (daemon.outbox / "bad.jsonl").exists()

    assert [r["status"] for r in daemon.results("good.jsonl")] == ["ok"]
    assert (daemon.inbox / "done" / "good.jsonl").exists()
    good_jobs = daemon.sidecar("good.jsonl")["jobs"]
    assert [j["display_name"] for j in sim.jobs.values()] == [good_jobs[0]["display_name"]]
    assert sim.create_calls == 1

    for ignored in (".hidden.jsonl", "notes.txt", "x.jsonl.bak", "later.jsonl"):
        assert (daemon.inbox / ignored).exists(), ignored
    assert sorted(p.name for p in daemon.outbox.iterdir()) == ["bad.error.json", "good.jsonl"]


def test_skip_line_delete_archive_include_response_system_prompt_file(
    make_daemon: MakeDaemon, sim: Simulator, tmp_path: Path
) -> None:
    """Settings that change the records and what is kept, all at once."""
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "system.md").write_text("You are very terse.\n")
    daemon = make_daemon(
        on_invalid_line="skip_line",
        archive="delete",
        include_response=True,
        filter_json=True,
        system_prompt_file="prompts/system.md",
    )
    daemon.drop("s.jsonl", [{"key": "a", "prompt": "[[sim:fenced]] go"}, b"[1, 2", "plain words"])
    daemon.run_all()
    assert daemon.exit_status() == 0

    a, invalid, plain = daemon.results("s.jsonl")
    assert a["key"] == "a" and a["status"] == "ok"
    assert a["json"] == {"echo": "[[sim:fenced]] go", "words": 2 + 4}
    assert a["usage"]["prompt_tokens"] == 2 + 4  # the system prompt's words count too
    assert a["response"]["candidates"][0]["content"]["parts"][0]["text"] == a["text"]
    assert a["response"]["modelVersion"] == MODEL_VERSION
    assert invalid["line"] == 2
    assert invalid["status"] == "error"
    assert invalid["error"]["stage"] == "invalid"
    assert invalid["error"]["message"]
    assert invalid["attempts"] == 0
    assert plain["key"] == "3" and plain["line"] == 3
    assert plain["status"] == "error"
    assert plain["error"]["stage"] == "parse"
    assert plain["text"] == "Simulated answer: plain words"
    assert "json" not in plain

    (job,) = sim.jobs.values()
    assert len(job["requests"]) == 2
    for request in job["requests"]:
        system = request["request"]["systemInstruction"]["parts"][0]["text"]
        assert system == "You are very terse.\n"

    # archive: delete leaves nothing of the input behind
    for folder in ("", "done", "failed"):
        leftovers = [p.name for p in (daemon.inbox / folder).iterdir() if p.is_file()]
        assert leftovers == [], folder
    assert not left_in_processing(daemon.inbox)


def test_same_name_waits_for_the_first(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """A second NAME.jsonl waits in the inbox while the first is processed; nothing is overwritten."""
    sim.pending_seconds = 3600
    daemon = make_daemon()
    daemon.drop("same.jsonl", ["first version"])
    daemon.run_until(lambda: daemon.state().get("same.jsonl") == "RUNNING")
    daemon.drop("same.jsonl", ["second version", "has two lines"])
    for _ in range(5):
        daemon.tick()
        daemon.clock.advance(60)
    assert (daemon.inbox / "same.jsonl").exists()
    assert daemon.state() == {"same.jsonl": "RUNNING"}
    (first_job,) = sim.jobs
    sim.pending_seconds = 0
    sim.set_job_state(first_job, "SUCCEEDED")
    daemon.run_all()

    assert [r["text"] for r in daemon.results("same.jsonl")] == ["Simulated answer: first version"]
    assert [r["text"] for r in daemon.results("same-2.jsonl")] == [
        "Simulated answer: second version",
        "Simulated answer: has two lines",
    ]
    done = daemon.inbox / "done"
    assert (done / "same.jsonl").read_text() == '"first version"\n'
    assert (done / "same-2.jsonl").read_text().startswith('"second version"')
    assert json.loads((done / "same.jsonl.job.json").read_text())["input"] == "same.jsonl"
    assert json.loads((done / "same-2.jsonl.job.json").read_text())["input"] == "same.jsonl"
    assert len(sim.jobs) == 2
    assert not (daemon.inbox / "same.jsonl").exists()


def test_unusual_inputs_get_error_reports_or_results(
    make_daemon: MakeDaemon, sim: Simulator, tmp_path: Path
) -> None:
    """Links, empty files, folders, oversized files; odd names; names already taken."""
    daemon = make_daemon(limits={"max_file_bytes": 200})
    inbox = daemon.inbox
    target = tmp_path / "target.jsonl"
    target.write_text('"through a link"\n')
    (inbox / "link.jsonl").symlink_to(target)
    (inbox / "empty.jsonl").write_bytes(b"")
    (inbox / "folder.jsonl").mkdir()
    daemon.drop("huge.jsonl", ["x" * 300])
    daemon.drop("naïve name.jsonl", ["unicode"])
    (inbox / "crlf.jsonl").write_bytes(
        b'\xef\xbb\xbf"bom"\r\n\r\n{"key": 7, "prompt": "int key"}\r\n'
    )
    daemon.drop("taken.jsonl", ["again"])
    daemon.outbox.mkdir(exist_ok=True)
    (daemon.outbox / "taken.jsonl").write_text("a user's file\n")
    (inbox / "done").mkdir(exist_ok=True)
    (inbox / "done" / "taken.jsonl").write_text("an older input\n")
    long_name = "n" * 240 + ".jsonl"  # no room left for the sidecar's temporary name
    (inbox / long_name).write_text('"a"\n')

    daemon.run_until(
        lambda: (
            not daemon.service.files
            and daemon.finished
            and all(
                not (inbox / n).exists()
                for n in ("link.jsonl", "empty.jsonl", "huge.jsonl", "crlf.jsonl")
            )
        )
    )
    assert daemon.exit_status() == 1

    for stem, fragment in (
        ("link", "symbolic link"),
        ("empty", "no requests"),
        ("folder", "not a regular file"),
        ("huge", "max_file_bytes"),
    ):
        report = daemon.report(f"{stem}.jsonl")
        assert report["stage"] == "validation", stem
        assert fragment in report["message"], stem
        assert finished(daemon, f"{stem}.jsonl"), stem
        assert os.path.lexists(inbox / "failed" / f"{stem}.jsonl"), stem
    assert (inbox / "failed" / "link.jsonl").is_symlink()
    assert target.read_text() == '"through a link"\n'

    assert [r["text"] for r in daemon.results("naïve name.jsonl")] == ["Simulated answer: unicode"]
    assert [(r["key"], r["line"], r["text"]) for r in daemon.results("crlf.jsonl")] == [
        ("1", 1, "Simulated answer: bom"),
        ("7", 3, "Simulated answer: int key"),
    ]
    assert (daemon.outbox / "taken.jsonl").read_text() == "a user's file\n"
    assert [r["text"] for r in daemon.results("taken-2.jsonl")] == ["Simulated answer: again"]
    assert (inbox / "done" / "taken.jsonl").read_text() == "an older input\n"
    assert (inbox / "done" / "taken-2.jsonl").read_text() == '"again"\n'
    assert daemon.sidecar("taken-2.jsonl")["input"] == "taken.jsonl"
    assert len(sim.jobs) == 3

    assert (inbox / long_name).read_text() == '"a"\n'  # left alone, with a warning
    (warning,) = [e for e in daemon.log_events() if e.get("file") == long_name]
    assert warning["level"] == "warning"
    assert "bytes long" in warning["reason"]


def test_file_api_path_keeps_input_order(make_daemon: MakeDaemon, sim: Simulator) -> None:
    """Inputs over limits.inline_max_bytes are uploaded; results come back through a file."""
    daemon = make_daemon(limits={"inline_max_bytes": 100}, retry_requests=0)
    sim.shuffle_output = True
    daemon.drop("big.jsonl", MIXED_LINES)
    daemon.run_all()
    assert_mixed_results(daemon.results("big.jsonl"), rounds=1)
    (job_entry,) = daemon.sidecar("big.jsonl")["jobs"]
    assert job_entry["mode"] == "file"
    (job,) = sim.jobs.values()
    assert job["input_file"] and job["input_file"].startswith("files/")
    assert sim.uploaded_files == {}, "the uploaded input is deleted once finished"
    assert sim.files == {}, "and so is the responses file"


def test_once_exit_1_counts_every_file_of_the_same_name(make_daemon: MakeDaemon) -> None:
    """A file left in processing/ fails; a same-named file then succeeds: still exit 1."""
    daemon = make_daemon(once=True)
    processing = daemon.inbox / "processing"
    processing.mkdir(exist_ok=True)
    (processing / "same.jsonl").write_bytes(b"{broken\n")  # as if claimed just before a crash
    daemon.drop("same.jsonl", ["fine"])
    daemon.start()
    daemon.run_until(daemon.service.once_finished)
    assert daemon.exit_status() == 1
    assert daemon.report("same.jsonl")["stage"] == "validation"
    assert [r["status"] for r in daemon.results("same.jsonl")] == ["ok"]
    assert (daemon.inbox / "failed" / "same.jsonl").read_bytes() == b"{broken\n"
    assert (daemon.inbox / "done" / "same.jsonl").read_text() == '"fine"\n'


def test_once_takes_a_file_written_just_before_the_start(make_daemon: MakeDaemon) -> None:
    """`--once` takes what is in the inbox when it starts, even a file written a moment ago
    (not yet unchanged for inbox_settle_seconds), and exits only once it has finished."""
    daemon = make_daemon(once=True, inbox_settle_seconds=30)
    daemon.drop("fresh.jsonl", ["just written"])
    daemon.start()
    daemon.run_until(daemon.service.once_finished)
    assert [r["status"] for r in daemon.results("fresh.jsonl")] == ["ok"]
    assert daemon.exit_status() == 0
