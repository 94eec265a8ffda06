"""daemon.plan: one read of the input writes the compact index and each job's request file,
cut into parts at line boundaries by bytes, request count and the token budget."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.api import EngineLimits
from daemon.config import Limits
from daemon.inputs import Defaults, prompt_request
from daemon.jsonl import dumps
from daemon.plan import IndexEntry, JobLimits, Plan, read_index, write_plan
from tests.support.harness import write_jsonl

DEFAULTS = Defaults()
UNLIMITED = JobLimits(2**40, None, None)


def write_input(folder: Path, lines: list[Any]) -> Path:
    return write_jsonl(folder / "in.jsonl", lines)


def plan_of(
    folder: Path, lines: list[Any], limits: JobLimits = UNLIMITED, *, skip: bool = False
) -> Plan:
    return write_plan(
        write_input(folder, lines),
        DEFAULTS,
        limits,
        folder / ".c.index",
        lambda n: folder / f".c.j{n}.req",
        keep_invalid=skip,
    )


def request_keys(path: Path) -> list[str]:
    return [orjson.loads(line)["key"] for line in path.read_bytes().splitlines()]


def test_one_job_holds_every_request_with_the_index_in_input_order(tmp_path: Path) -> None:
    lines: list[Any] = ["a", b"", ["b", "c"], {"key": "k", "prompt": "d", "filter_json": True}]
    plan = plan_of(tmp_path, lines)
    assert plan.too_big is None
    (job,) = plan.jobs
    assert (job.part, job.path, job.requests) == (1, tmp_path / ".c.j1.req", 3)
    assert job.bytes == job.path.stat().st_size
    assert request_keys(job.path) == ["1", "3", "k"]
    assert list(read_index(tmp_path / ".c.index")) == [
        IndexEntry(1, "1", False, 1),
        IndexEntry(3, "3", False, 1),  # the blank line 2 counts
        IndexEntry(4, "k", True, 1),
    ]
    scan = plan.scan
    assert (scan.requests, scan.error_count, scan.size) == (
        3,
        0,
        (tmp_path / "in.jsonl").stat().st_size,
    )
    assert scan.sha256 == hashlib.sha256((tmp_path / "in.jsonl").read_bytes()).hexdigest()


def test_request_lines_are_the_file_api_batch_format(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, [{"key": "n", "request": {"contents": [{"parts": [{"text": "é"}]}]}}])
    raw = plan.jobs[0].path.read_bytes()
    assert raw.endswith(b"\n") and "é".encode() in raw  # UTF-8, not escaped
    assert orjson.loads(raw) == {"key": "n", "request": {"contents": [{"parts": [{"text": "é"}]}]}}


def test_parts_by_request_count(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, [f"p{i}" for i in range(7)], JobLimits(2**40, 3, None))
    assert [(j.part, j.requests) for j in plan.jobs] == [(1, 3), (2, 3), (3, 1)]
    assert [request_keys(j.path) for j in plan.jobs] == [["1", "2", "3"], ["4", "5", "6"], ["7"]]
    assert [e.part for e in read_index(tmp_path / ".c.index")] == [1, 1, 1, 2, 2, 2, 3]


def test_parts_by_bytes_never_split_a_line(tmp_path: Path) -> None:
    lines = [f"prompt {i} " + "x" * 100 for i in range(10)]
    size = len(prompt_request("1", 1, lines[0], DEFAULTS).wire)
    plan = plan_of(tmp_path, lines, JobLimits(3 * size, None, None))
    assert [j.requests for j in plan.jobs] == [3, 3, 3, 1]
    assert all(j.bytes <= 3 * size for j in plan.jobs)
    assert sum(j.bytes for j in plan.jobs) == sum(j.path.stat().st_size for j in plan.jobs)


def test_a_line_bigger_than_a_part_gets_a_part_of_its_own(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ["small", "x" * 5000, "small too"], JobLimits(1000, None, None))
    assert [j.requests for j in plan.jobs] == [1, 1, 1]
    assert plan.jobs[1].bytes > 1000


def test_parts_by_the_token_budget(tmp_path: Path) -> None:
    """Each part's estimated input tokens (characters / 4) stay within the budget."""
    lines = ["a" * 400] * 5  # 100 tokens each
    plan = plan_of(tmp_path, lines, JobLimits(2**40, None, 250))
    assert [(j.requests, j.tokens) for j in plan.jobs] == [(2, 200), (2, 200), (1, 100)]
    assert plan.tokens == 500 and plan.too_big is None


def test_a_request_over_the_token_budget_is_named(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ["ok", "b" * 4000, "c" * 8000], JobLimits(2**40, None, 500))
    assert plan.too_big is not None
    assert plan.too_big.startswith("line 2 alone is about 1000 input tokens")
    assert "limits.max_enqueued_tokens (500)" in plan.too_big


def test_invalid_lines_are_indexed_only_under_skip_line(tmp_path: Path) -> None:
    lines: list[Any] = [
        "good",
        b"{broken",
        {"key": "kept", "prompt": 42},
        {"key": "k", "prompt": "x"},
    ]
    plan = plan_of(tmp_path, lines, skip=True)
    assert (plan.scan.requests, plan.scan.error_count) == (2, 2)
    entries = list(read_index(tmp_path / ".c.index"))
    assert [(e.line, e.key, e.part) for e in entries] == [
        (1, "1", 1),
        (2, None, 0),  # no key can be read
        (3, "kept", 0),  # a readable key is kept
        (4, "k", 1),
    ]
    assert entries[1].invalid and entries[2].invalid and entries[0].invalid is None
    plan_of(tmp_path, lines, skip=False)
    assert [e.line for e in read_index(tmp_path / ".c.index")] == [1, 4]


def test_no_requests_no_jobs(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, [b"", b"  "])
    assert plan.jobs == [] and plan.scan.requests == 0
    assert not list(tmp_path.glob(".c.j*.req"))


def test_dumps_keeps_integers_beyond_64_bits() -> None:
    assert dumps({"n": 2**70, "s": "é"}) == f'{{"n":{2**70},"s":"é"}}'.encode()
    assert dumps([1, "x"]) == b'[1,"x"]'


@pytest.mark.parametrize("line", [1, 12345])
def test_index_entries_round_trip(tmp_path: Path, line: int) -> None:
    path = tmp_path / "index"
    path.write_bytes(dumps([line, "k", 1, 3]) + b"\n" + dumps([line + 1, None, None, 0, "bad"]))
    assert list(read_index(path)) == [
        IndexEntry(line, "k", True, 3),
        IndexEntry(line + 1, None, None, 0, "bad"),
    ]


def test_job_limits_are_the_configuration_within_the_engine() -> None:
    config = Limits(max_job_bytes=5000, max_requests_per_job=300, inline_max_bytes=100)
    gemini = JobLimits.of(config, EngineLimits(inline=True, max_job_bytes=2_000_000_000))
    assert (gemini.max_job_bytes, gemini.max_requests_per_job) == (5000, 300)
    assert gemini.mode(100, 1000) == "inline" and gemini.mode(101, 1) == "file"
    assert gemini.mode(100, 1001) == "file"  # inline_max_requests (1000)
    vertex = JobLimits.of(Limits(), EngineLimits(False, 1_000_000_000, 200_000))
    assert (vertex.max_job_bytes, vertex.max_requests_per_job) == (1_000_000_000, 200_000)
    assert vertex.mode(1, 1) == "file"  # an engine without inline jobs
