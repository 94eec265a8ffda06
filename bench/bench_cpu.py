"""Local work per request (validate + convert + match + write) vs a bare JSON load-and-dump loop.

Everything runs in this process on the same files: the daemon's own functions for each stage,
and as the yardstick a loop that only loads and dumps each input line and each response line
with `json` (and `orjson` when it is installed).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

from daemon.backend import file_line
from daemon.inputs import Defaults, Request, read_requests, scan_file
from daemon.results import ResponsesFileIndex, write_results
from daemon.simulator import simulate_response

try:
    import orjson
except ImportError:  # the yardstick falls back to json alone
    orjson = None

MODEL = "models/gemini-2.5-flash"


def _responses_file(path: Path, source: Path, defaults: Defaults, seed: int) -> None:
    """What the Batch API would send back for `source`: one line per key, shuffled."""
    lines = []
    for i, item in enumerate(read_requests(source, defaults)):
        if isinstance(item, Request):
            entry = simulate_response(item.body, MODEL, f"bench-{i}")
            lines.append(json.dumps({"key": item.key, **entry}, separators=(",", ":")) + "\n")
    random.Random(seed).shuffle(lines)
    path.write_text("".join(lines))


def _best(reps: int, work: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()  # CPU time: steadier than wall time on a shared machine
        work()
        best = min(best, time.process_time() - started)
    return best


def _measure(
    folder: Path, requests: int, width: int, filter_json: bool, reps: int
) -> dict[str, float]:
    source = folder / "input.jsonl"
    count = 0
    with source.open("wb") as out:
        rng = random.Random(3)
        for i in range(requests):
            out.write(common.prompt_line(f"r{i}", i % 4, rng, width))
            count += 1
    defaults = Defaults(filter_json=filter_json)
    responses = folder / "responses.jsonl"
    _responses_file(responses, source, defaults, seed=5)
    upload = folder / "upload.jsonl"
    outputs = iter(range(1_000_000))

    def validate() -> None:
        scan = scan_file(source, defaults)
        assert scan.requests == count and not scan.error_count

    def convert() -> None:
        with upload.open("wb") as handle:
            for item in read_requests(source, defaults):
                if isinstance(item, Request):
                    handle.write(file_line(item))

    def match_and_write() -> None:
        index = ResponsesFileIndex(responses)
        try:
            tally = write_results(
                folder / f"out-{next(outputs)}.jsonl",
                source,
                defaults,
                index,
                include_response=False,
            )
        finally:
            index.close()
        assert tally.total == count, tally

    def match_only() -> None:
        ResponsesFileIndex(responses).close()

    def baseline(
        loads: Callable[[bytes], Any], dumps: Callable[[Any], bytes]
    ) -> Callable[[], None]:
        def loop() -> None:
            with (folder / "baseline.jsonl").open("wb") as out:
                for path in (source, responses):
                    with path.open("rb") as handle:
                        for raw in handle:
                            out.write(dumps(loads(raw)) + b"\n")

        return loop

    times = {
        "validate": _best(reps, validate),
        "convert": _best(reps, convert),
        "match (index the responses)": _best(reps, match_only),
        "match + write": _best(reps, match_and_write),
        "json": _best(reps, baseline(json.loads, lambda v: json.dumps(v).encode())),
    }
    if orjson is not None:
        times["orjson"] = _best(reps, baseline(orjson.loads, orjson.dumps))
    for out in folder.glob("out-*.jsonl"):
        out.unlink()
    return {k: v / count * 1e6 for k, v in times.items()}


def run(quick: bool) -> str:
    requests = 10_000 if quick else 50_000
    reps = 2 if quick else 3
    rows = []
    ratios = []
    for width, filter_json in ((300, False), (2000, False), (300, True)):
        with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
            us = _measure(Path(tmp), requests, width, filter_json, reps)
        local = us["validate"] + us["convert"] + us["match + write"]
        label = f"~{width} B prompts" + (", filter_json" if filter_json else "")
        rows.append(
            [
                label,
                f"{us['validate']:.1f}",
                f"{us['convert']:.1f}",
                f"{us['match (index the responses)']:.1f}",
                f"{us['match + write'] - us['match (index the responses)']:.1f}",
                f"{local:.1f}",
                f"{us['json']:.1f}",
                f"{us['orjson']:.1f}" if "orjson" in us else "n/a",
            ]
        )
        ratios.append(
            [
                label,
                f"{local / us['json']:.2f}x",
                f"{local / us['orjson']:.2f}x" if "orjson" in us else "n/a",
            ]
        )
    headers = [
        "input",
        "validate",
        "convert",
        "match",
        "write",
        "local total",
        "json loop",
        "orjson loop",
    ]
    return (
        f"### Local work per request (CPU µs/request, {requests:,} requests, best of {reps})\n\n"
        + common.table(headers, rows)
        + "\n\n"
        + common.table(["input", "local / json loop", "local / orjson loop"], ratios)
        + "\n\nTarget: local total <= 2x the bare load-and-dump loop over the same lines "
        "(each input line and each response line loaded and dumped once)."
    )


if __name__ == "__main__":
    import sys

    print(run("--quick" in sys.argv))
