"""Peak RSS of the daemon process (`run --once`) for inputs of growing size.

The simulator runs in its own process (it keeps every uploaded file in memory), so the
figure is the daemon's alone: `ru_maxrss` of the daemon child, from wait4().
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import common

MB = 1_000_000


def _one(size: int, mode: str, root: Path) -> list[str]:
    overrides: dict[str, object] = {
        "inbox_settle_seconds": 0,
        "poll": {"initial_seconds": 0.2, "max_seconds": 2, "jitter": 0},
    }
    if mode == "file":
        overrides["limits"] = {"inline_max_bytes": 1000}
    with common.simulator() as sim:
        config = common.spool(root, sim.base_url, **overrides)
        requests = common.write_input(root / "inbox" / "big.jsonl", size) if size else 0
        result = common.run_measured(common.daemon_command(config, "--once"), root / "log", root)
    if result.returncode != 0:
        raise RuntimeError(f"the daemon failed: {(root / 'log').read_text()[-3000:]}")
    got_mode = "-"
    if size:
        out = root / "outbox" / "big.jsonl"
        written = sum(1 for _ in out.open("rb"))
        if written != requests:
            raise RuntimeError(f"{written} records for {requests} requests")
        with out.open("rb") as handle:
            first = json.loads(handle.readline())
        if first.get("status") != "ok":
            raise RuntimeError(f"unexpected first record {first}")
        sidecar = root / "inbox" / "done" / "big.jsonl.job.json"
        got_mode = json.loads(sidecar.read_text())["mode"]
    label = f"{size // MB} MB" if size else "empty inbox"
    return [
        label,
        f"{requests:,}",
        got_mode,
        common.mib(result.max_rss_bytes),
        f"{result.wall_seconds:.1f}",
        f"{result.cpu_seconds:.1f}",
    ]


def run(quick: bool) -> str:
    cases: list[tuple[int, str]] = [(0, "inline"), (10 * MB, "inline")]
    if not quick:
        cases.append((15 * MB, "inline"))  # about the largest inline input by default
    cases += [(10 * MB, "file"), (100 * MB, "file")]
    if not quick:
        cases.append((1000 * MB, "file"))
    rows = []
    peaks: list[tuple[int, str, float]] = []
    for size, mode in cases:
        with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
            row = _one(size, mode, Path(tmp))
        rows.append(row)
        peaks.append((size, row[2], float(row[3])))  # the mode the daemon chose
        print(f"  rss: {row}", file=sys.stderr, flush=True)
    floor = peaks[0][2]
    files = [(size, peak) for size, mode, peak in peaks if mode == "file"]
    inline = [(size, peak) for size, mode, peak in peaks if mode == "inline" and size]
    low, high = min(p for _, p in files), max(p for _, p in files)
    flat = high < 150 and high - low < 0.25 * low
    headers = ["input", "requests", "mode", "peak RSS (MiB)", "wall (s)", "daemon CPU (s)"]
    return (
        "### Peak RSS of the daemon (`run --once`, simulator in its own process)\n\n"
        + common.table(headers, rows)
        + f"\n\nInputs of ~1 KB keyed lines in all four input forms. `file`: through the File "
        f"API (`inline_max_bytes` set to 1000); `inline`: the default `inline_max_bytes` (19 MB). "
        f"Idle floor (imports, SDK client): {floor:.0f} MiB.\n\n"
        f"Target flat and under 150 MiB — File API path: {'met' if flat else 'NOT met'}, "
        f"{low:.0f}-{high:.0f} MiB from {files[0][0] // MB} MB to {files[-1][0] // MB} MB of "
        f"input. Inline path: bounded by `inline_max_bytes` rather than flat, "
        + ", ".join(f"{peak:.0f} MiB at {size // MB} MB" for size, peak in inline)
        + " (the SDK holds an inline job's requests and its responses whole, several times over:"
        " pydantic models, dicts and JSON text)."
    )


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
