"""The smallest end-to-end check: one file through a real daemon process and the simulator."""

from tests.harness import Spool


def test_one_file_round_trip(spool: Spool) -> None:
    spool.drop("a.jsonl", ["hello", ["x", "y"]])
    assert spool.run_once() == 0
    records = spool.results("a.jsonl")
    assert [r["key"] for r in records] == ["1", "2"]
    assert all(r["status"] == "ok" for r in records)
    assert spool.finished("a.jsonl")
