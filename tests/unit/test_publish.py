"""daemon.publish: answers matched to requests by key (later jobs winning; by position only where
no key came back), merged in input order from the index, and written atomically -- results,
error reports, and the checks that tell our own outbox file from another input's."""

from __future__ import annotations

import json
import os
import random
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from daemon import answers, keymap, publish
from daemon.answers import Answers, Entry, Merge, write_results
from daemon.inputs import Defaults
from daemon.jobrecord import JobRecord
from daemon.jsonl import dumps
from daemon.plan import JobLimits, write_plan
from daemon.publish import write_report
from daemon.records import Tally, answer_text
from tests.support.guarantees import CONTRACT_REPORT_FIELDS

DEFAULTS = Defaults()
NO_LIMITS = JobLimits(2**40, None, None)


def response(text: str, **extra: Any) -> dict[str, Any]:
    candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
    return {"candidates": [candidate], "modelVersion": "m-1", **extra}


def ok_line(key: str, text: str) -> bytes:
    return dumps({"key": key, "response": response(text)})


def error_line(key: str, code: int, message: str = "boom") -> bytes:
    return dumps({"key": key, "error": {"code": code, "message": message}})


def answers_file(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def text_of(entry: Entry | None) -> str | None:
    assert entry is not None and entry.response is not None
    return answer_text(entry.response)


def planned(
    folder: Path, lines: list[bytes], *, skip: bool = False, limits: JobLimits = NO_LIMITS
) -> tuple[Path, list[Path]]:
    """An input's index and request files, as the validation pass writes them."""
    source = folder / "in.jsonl"
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    index = folder / ".claim.index"
    plan = write_plan(
        source, DEFAULTS, limits, index, lambda n: folder / f".claim.j{n}.req", keep_invalid=skip
    )
    return index, [job.path for job in plan.jobs]


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- inline answers as answer-file lines ----------------------------------------------------


def test_inline_lines_by_key_in_request_order() -> None:
    items = [
        {"response": response("b"), "metadata": {"key": "b"}},
        {"error": {"code": 500, "message": "x"}, "metadata": {"key": "c"}},
        {"response": response("a"), "metadata": {"key": "a"}},
        {"response": response("stranger"), "metadata": {"key": "zz"}},
    ]
    lines, positional = answers.inline_lines(items, ["a", "b", "c", "d"])
    assert not positional
    decoded = [json.loads(line) for line in lines]
    assert [d["key"] for d in decoded] == ["a", "b", "c"]  # d: missing; zz: not ours
    assert decoded[0]["response"] == response("a")
    assert decoded[2]["error"] == {"code": 500, "message": "x"}


def test_inline_lines_by_position_only_when_no_key_came_back() -> None:
    items = [{"response": response("first")}, {"response": response("second")}]
    lines, positional = answers.inline_lines(items, ["k1", "k2"])
    assert positional
    assert [json.loads(line)["key"] for line in lines] == ["k1", "k2"]
    lines, positional = answers.inline_lines(items, ["k1", "k2", "k3"])  # the counts differ
    assert (lines, positional) == ([], False)


def test_read_entries_and_request_keys_skip_what_is_not_theirs(tmp_path: Path) -> None:
    path = answers_file(
        tmp_path / "a.out", [ok_line("a", "x"), b"not json", b"[1, 2]", error_line("b", 429)]
    )
    assert [(e.key, e.error is None) for e in answers.read_entries(path)] == [
        ("a", True),
        ("b", False),
    ]
    _, (requests,) = planned(tmp_path, [b'"one"', b'{"key": "k", "prompt": "two"}'])
    assert list(answers.request_keys(requests)) == ["1", "k"]


# ---- Answers: key -> answer over several answer files ------------------------------------------


@pytest.mark.parametrize("spilled", [False, True], ids=["memory", "spilled"])
def test_answers_over_a_shuffled_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spilled: bool
) -> None:
    if spilled:
        monkeypatch.setattr(keymap, "MEMORY_BYTES", 0)
    keys = [f"key-{i}" for i in range(300)]
    lines = [ok_line(k, f"answer {k} é") for k in keys]
    lines.append(error_line("bad", 429, "quota"))
    lines.append(dumps({"metadata": {"key": "meta"}, "response": response("via metadata")}))
    lines += [b"", b"not json", dumps({"no": "key"}), b"[1, 2]"]
    random.Random(5).shuffle(lines)
    path = answers_file(tmp_path / "j1.out", lines)
    spill = tmp_path / ".claim.keys"
    answers = Answers([path], spill)
    try:
        for key in reversed(keys):
            assert text_of(answers.get(key)) == f"answer {key} é"
        bad = answers.get("bad")
        assert bad is not None and bad.error == {"code": 429, "message": "quota"}
        assert text_of(answers.get("meta")) == "via metadata"
        assert answers.get("absent") is None
        assert spill.exists() is spilled
    finally:
        answers.close()
    assert not spill.exists()


def test_a_later_answer_file_wins(tmp_path: Path) -> None:
    """Round 2 answered what round 1 failed: its answer replaces the error."""
    first = answers_file(tmp_path / "j1.out", [ok_line("a", "a1"), error_line("b", 503)])
    second = answers_file(tmp_path / "j2.out", [ok_line("b", "b2")])
    answers = Answers([first, second])
    try:
        assert text_of(answers.get("a")) == "a1"
        assert text_of(answers.get("b")) == "b2"
    finally:
        answers.close()


def test_a_line_that_is_no_json_answers_nothing(tmp_path: Path) -> None:
    path = answers_file(tmp_path / "j1.out", [b'{"key": "broken", "response": ', ok_line("k", "x")])
    answers = Answers([path])
    try:
        assert answers.get("broken") is None  # the quick key scan saw it; the line is no JSON
        assert text_of(answers.get("k")) == "x"
    finally:
        answers.close()


# ---- merging and writing results ----------------------------------------------------------------


def test_write_results_matches_by_key_in_input_order(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(50)]
    index, _ = planned(tmp_path, [dumps({"key": k, "prompt": k}) for k in keys])
    lines = [ok_line(k, f"answer {k}") for k in keys]
    random.Random(3).shuffle(lines)
    answers = answers_file(tmp_path / ".claim.j1.out", lines)
    target = tmp_path / "out" / "in.jsonl"
    target.parent.mkdir()
    seen: list[int] = []
    tally = write_results(target, Merge(index, [answers]), progress=seen.append)
    records = read_records(target)
    assert [r["key"] for r in records] == keys
    assert [r["text"] for r in records] == [f"answer {k}" for k in keys]
    assert [r["line"] for r in records] == list(range(1, 51))
    assert all(r["attempts"] == 1 for r in records)
    assert (tally.ok, tally.total) == (50, 50)
    # Shuffled: a pass in request order finds it out at its end; a pass by key writes them.
    assert seen == list(range(1, 51)) * 2


def test_write_results_mixed_outcomes(tmp_path: Path) -> None:
    index, _ = planned(
        tmp_path,
        [
            b'"first"',
            b"",
            b"broken line",
            b'{"key": "j", "prompt": "x", "filter_json": true}',
            b'{"key": "gone", "prompt": "x"}',
            b'{"key": "bad", "prompt": "x"}',
        ],
        skip=True,
    )
    answers = answers_file(
        tmp_path / ".claim.j1.out",
        [
            error_line("bad", 500),
            ok_line("j", '{"n": 1,}'),
            ok_line("1", "one"),
            ok_line("unrelated", "never asked for"),
        ],
    )
    target = tmp_path / "out.jsonl"
    tally = write_results(target, Merge(index, [answers]))
    records = read_records(target)
    assert [(r["key"], r["line"], r["status"]) for r in records] == [
        ("1", 1, "ok"),
        (None, 3, "error"),
        ("j", 4, "ok"),
        ("gone", 5, "error"),
        ("bad", 6, "error"),
    ]
    assert records[1]["error"]["stage"] == "invalid" and records[1]["attempts"] == 0
    assert records[2]["json"] == {"n": 1}  # filter_json from the line, kept in the index
    assert "json" not in records[0]
    assert records[3]["error"]["stage"] == "missing"
    assert records[4]["error"] == {"stage": "request", "code": 500, "message": "boom"}
    assert tally.ok == 2
    assert tally.errors == {"invalid": 1, "missing": 1, "request": 1}


def test_a_failed_part_fails_only_its_own_requests(tmp_path: Path) -> None:
    limits = JobLimits(2**40, 2, None)
    index, requests = planned(tmp_path, [b'"a"', b'"b"', b'"c"', b'"d"', b'"e"'], limits=limits)
    assert len(requests) == 3
    part1 = answers_file(tmp_path / ".claim.j1.out", [ok_line("1", "a"), ok_line("2", "b")])
    part3 = answers_file(tmp_path / ".claim.j3.out", [ok_line("5", "e")])
    merge = Merge(index, [part1, part3], part_errors={2: "the batch job ended FAILED: boom"})
    write_results(tmp_path / "out.jsonl", merge)
    records = read_records(tmp_path / "out.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok", "error", "error", "ok"]
    assert records[2]["error"] == {"stage": "job", "message": "the batch job ended FAILED: boom"}


def test_attempts_count_the_jobs_that_carried_a_request(tmp_path: Path) -> None:
    index, _ = planned(tmp_path, [b'"a"', b'"b"', b'"c"'])
    round1 = answers_file(
        tmp_path / ".claim.j1.out", [ok_line("1", "a"), error_line("2", 503), error_line("3", 503)]
    )
    round2 = answers_file(tmp_path / ".claim.j2.out", [ok_line("2", "b"), error_line("3", 503)])
    merge = Merge(index, [round1, round2], attempts={"2": 2, "3": 2})
    write_results(tmp_path / "out.jsonl", merge)
    records = read_records(tmp_path / "out.jsonl")
    assert [(r["status"], r["attempts"]) for r in records] == [
        ("ok", 1),
        ("ok", 2),
        ("error", 2),
    ]
    assert records[1]["text"] == "b"


def test_write_results_include_response_and_non_ascii(tmp_path: Path) -> None:
    index, _ = planned(tmp_path, [b'"a"'])
    raw = dumps({"key": "1", "response": response("日本", futureField={"x": "AAE="})})
    answers = answers_file(tmp_path / ".claim.j1.out", [raw])
    target = tmp_path / "out.jsonl"
    write_results(target, Merge(index, [answers], include_response=True))
    assert "日本" in target.read_text(encoding="utf-8")
    (record,) = read_records(target)
    assert record["response"] == json.loads(raw)["response"]


def test_outbox_file_mode_and_no_temp_left(tmp_path: Path) -> None:
    index, _ = planned(tmp_path, [b'"a"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    old = os.umask(0o022)
    try:
        write_results(outbox / "in.jsonl", Merge(index, []))
    finally:
        os.umask(old)
    assert stat.S_IMODE((outbox / "in.jsonl").stat().st_mode) == 0o640
    assert [p.name for p in outbox.iterdir()] == ["in.jsonl"]


def test_existing_outbox_name_is_never_overwritten(tmp_path: Path) -> None:
    index, _ = planned(tmp_path, [b'"a"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "in.jsonl").write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        write_results(outbox / "in.jsonl", Merge(index, []))
    assert (outbox / "in.jsonl").read_text() == "someone else's\n"
    assert [p.name for p in outbox.iterdir()] == ["in.jsonl"]


def test_failure_while_writing_publishes_nothing(tmp_path: Path) -> None:
    index, _ = planned(tmp_path, [b'"a"', b'"b"', b'"c"'])
    outbox = tmp_path / "outbox"
    outbox.mkdir()

    def explode(written: int) -> None:
        if written == 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_results(outbox / "in.jsonl", Merge(index, []), progress=explode)
    assert list(outbox.iterdir()) == []


# ---- is an outbox file found at our recorded name ours? -------------------------------------


def written_results(tmp_path: Path) -> tuple[Path, Path]:
    index, _ = planned(tmp_path, [b'"a"', b'{"key": "k", "prompt": "b"}'])
    target = tmp_path / "out.jsonl"
    write_results(target, Merge(index, []))
    return target, index


def test_results_are_ours_when_keys_and_lines_agree(tmp_path: Path) -> None:
    target, index = written_results(tmp_path)
    assert publish.results_are_ours(target, index)


@pytest.mark.parametrize(
    "content",
    [
        b'{"key": "1", "line": 1}\n',  # shorter
        b'{"key": "1", "line": 1}\n{"key": "k", "line": 2}\n{"key": "x", "line": 3}\n',  # longer
        b'{"key": "1", "line": 1}\n{"key": "k", "line": 3}\n',  # another line
        b'{"key": "1", "line": 1}\n{"key": "other", "line": 2}\n',  # another key
        b"a user's notes\n",  # not JSON
        b"[1]\n[2]\n",  # JSON, not records
    ],
)
def test_results_of_another_input_are_not_ours(tmp_path: Path, content: bytes) -> None:
    target, index = written_results(tmp_path)
    target.write_bytes(content)
    assert not publish.results_are_ours(target, index)


def test_results_that_cannot_be_read_count_as_ours(tmp_path: Path) -> None:
    """Never two outbox files for one input: when in doubt, keep the one there."""
    target, index = written_results(tmp_path)
    target.unlink()
    target.mkdir()  # reading it fails with an OSError
    assert publish.results_are_ours(target, index)


def test_report_is_ours_by_claim_id(tmp_path: Path) -> None:
    target = tmp_path / "x.error.json"
    write_report(target, {"claim_id": "abc"})
    assert publish.report_is_ours(target, "abc")
    assert not publish.report_is_ours(target, "other")
    target.unlink()
    target.write_text("not json")
    assert not publish.report_is_ours(target, "abc")


# ---- error reports ------------------------------------------------------------------------------


def test_write_report_is_private_and_never_overwrites(tmp_path: Path) -> None:
    report = {"input": "x.jsonl", "stage": "validation", "message": "bad", "errors": []}
    target = tmp_path / "x.error.json"
    write_report(target, report)
    assert json.loads(target.read_text()) == report
    assert stat.S_IMODE(target.stat().st_mode) & 0o007 == 0
    with pytest.raises(FileExistsError):
        write_report(target, report)


NOW = datetime(2026, 11, 28, 16, 4, tzinfo=timezone.utc)
REPORT_FIELDS = CONTRACT_REPORT_FIELDS | {"claim_id"}  # claim_id: an addition


def test_report_always_carries_every_field() -> None:
    record = JobRecord("x.jsonl")
    record.error = {"stage": "submission", "message": "refused"}
    report = publish.report(record, NOW)
    assert set(report) == REPORT_FIELDS
    assert report == {
        "input": "x.jsonl",
        "stage": "submission",
        "message": "refused",
        "job_name": None,
        "job_state": None,
        "errors": [],
        "error_count": 0,
        "time": "2026-11-28T16:04:00Z",
        "claim_id": record.claim_id,
    }


def test_report_of_a_validation_error_counts_every_bad_line() -> None:
    record = JobRecord("x.jsonl")
    errors = [{"line": 2, "message": "not JSON"}]
    record.error = {"stage": "validation", "message": "m", "errors": errors, "error_count": 7}
    report = publish.report(record, NOW)
    assert (report["errors"], report["error_count"]) == (errors, 7)


def test_report_of_a_failed_job_names_the_job() -> None:
    record = JobRecord("x.jsonl", job_name="batches/summary", job_state="JOB_STATE_RUNNING")
    record.error = {
        "stage": "job",
        "message": "the batch job ended JOB_STATE_FAILED",
        "job_name": "batches/failed",
        "job_state": "JOB_STATE_FAILED",
    }
    report = publish.report(record, NOW)
    assert (report["job_name"], report["job_state"]) == ("batches/failed", "JOB_STATE_FAILED")
    record.error = {"stage": "job", "message": "cancelled"}
    report = publish.report(record, NOW)
    assert (report["job_name"], report["job_state"]) == ("batches/summary", "JOB_STATE_RUNNING")


def test_save_answers_replaces_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / ".claim.j1.out"
    target.write_bytes(b'{"key": "1", "resp')  # cut short by a crash
    answers.save_answers(target, iter([ok_line("1", "x"), ok_line("2", "y")]))
    assert [e.key for e in answers.read_entries(target)] == ["1", "2"]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_tally_counts_stages_and_tokens() -> None:
    tally = Tally()
    usage = {"prompt_tokens": 2, "output_tokens": 3, "total_tokens": 5, "cached_tokens": 1}
    records: Iterator[dict[str, Any]] = iter(
        [
            {"status": "ok", "usage": usage},
            {"status": "error", "error": {"stage": "parse"}, "usage": usage},
            {"status": "error", "error": {"stage": "missing"}},
        ]
    )
    for record in records:
        tally.add(record)
    assert (tally.ok, tally.errors, tally.error_count, tally.total) == (
        1,
        {"parse": 1, "missing": 1},
        2,
        3,
    )
    assert tally.tokens["total_tokens"] == 10 and tally.tokens["cached_tokens"] == 2
