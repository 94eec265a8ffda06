"""The validation pass: read a claimed input once and write everything later steps need.

One streaming read of the input checks every line and writes, in processing/:

- the index (`.{claim}.index`): one compact entry per request or invalid line, in input order
  -- line number, key, filter_json, part -- from which results are merged without parsing
  the input again;
- each job's request file (`.{claim}.jN.req`): `{"key", "request"}` lines, the File API's
  batch input format, split into parts at line boundaries so that no job is over
  `limits.max_job_bytes`, `limits.max_requests_per_job` or the enqueued-token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import msgspec

from .api.engine import EngineLimits, RequestCheck
from .config import Limits
from .inputs import Defaults, LineError, Request, Scan, estimate_tokens, read_requests
from .jsonl import STREAM_BUFFER, dumps_line


@dataclass(frozen=True)
class JobLimits:
    """Where a file is cut into parts, and which jobs go inline."""

    max_job_bytes: int
    max_requests_per_job: int | None
    max_job_tokens: int | None
    inline_max_bytes: int = 0  # 0: the engine takes no inline jobs
    inline_max_requests: int = 0
    check: RequestCheck | None = None  # the engine's own rule for each request

    @classmethod
    def of(cls, limits: Limits, engine: EngineLimits) -> JobLimits:
        """The configured limits (`limits.max_job_bytes`, `max_requests_per_job`,
        `max_enqueued_tokens`, `inline_max_*`) within the engine's own."""
        requests = [n for n in (limits.max_requests_per_job, engine.max_job_requests) if n]
        return cls(
            min(limits.max_job_bytes, engine.max_job_bytes),
            min(requests) if requests else None,
            limits.max_enqueued_tokens,
            limits.inline_max_bytes if engine.inline else 0,
            limits.inline_max_requests if engine.inline else 0,
            engine.check,
        )

    def mode(self, payload_bytes: int, requests: int) -> str:
        """`inline` when a job's requests are few enough for one create call and one reply,
        else `file` (uploaded first)."""
        inline = payload_bytes <= self.inline_max_bytes and requests <= self.inline_max_requests
        return "inline" if inline else "file"


class Filling(Protocol):
    """A job being filled with requests: a planned part, or a follow-up job."""

    requests: int
    bytes: int
    tokens: int


@dataclass
class PlannedJob:
    part: int
    path: Path
    requests: int = 0
    bytes: int = 0
    tokens: int = 0


@dataclass
class Plan:
    """What the validation pass found and wrote."""

    scan: Scan
    jobs: list[PlannedJob] = field(default_factory=list)
    index_bytes: int = 0
    too_big: str | None = None  # a request the token budget cannot hold, named

    @property
    def tokens(self) -> int:
        return sum(j.tokens for j in self.jobs)


def write_plan(
    source: Path,
    defaults: Defaults,
    limits: JobLimits,
    index_path: Path,
    job_path: Callable[[int], Path],
    *,
    keep_invalid: bool,
    part_sizes: list[int] | None = None,
) -> Plan:
    """Validate `source` and write its index and request files.

    `job_path(n)` names the request file of job n (1-based). `keep_invalid`: invalid lines get
    index entries (on_invalid_line: skip_line); otherwise the files written are only useful
    when the scan found no error. `part_sizes`: cut the parts after these numbers of requests
    (to write the files of a plan again exactly as it was made), not by the limits.

    The files are not fsynced: after a power failure the sidecar's sizes tell whether they are
    whole, and they are written again from the claimed input if not.
    """
    scan = Scan(source)
    plan = Plan(scan)
    current: PlannedJob | None = None
    handle: IO[bytes] | None = None
    max_tokens = limits.max_job_tokens
    try:
        with index_path.open("wb", buffering=STREAM_BUFFER) as index:
            for item in read_requests(source, defaults, scan, check=limits.check):
                if type(item) is not Request:
                    assert isinstance(item, LineError)
                    if keep_invalid:
                        index.write(dumps_line([item.line, item.key, None, 0, item.message]))
                    continue
                key, number, line, filter_json, chars = item
                tokens = estimate_tokens(chars)
                if max_tokens is not None and tokens > max_tokens:
                    plan.too_big = plan.too_big or (
                        f"line {number} alone is about {tokens} input tokens, over "
                        f"limits.max_enqueued_tokens ({max_tokens})"
                    )
                if current is None:
                    fits = False
                elif part_sizes is not None:  # as recorded (the last part takes any excess)
                    last = current.part >= len(part_sizes)
                    fits = last or current.requests < part_sizes[current.part - 1]
                else:
                    fits = fits_in(current, len(line), tokens, limits)
                if not fits:
                    if handle is not None:
                        handle.close()
                    current = PlannedJob(len(plan.jobs) + 1, job_path(len(plan.jobs) + 1))
                    plan.jobs.append(current)
                    handle = current.path.open("wb", buffering=STREAM_BUFFER)
                assert handle is not None and current is not None
                handle.write(line)
                current.requests += 1
                current.bytes += len(line)
                current.tokens += tokens
                index.write(dumps_line([number, key, int(filter_json), current.part]))
    finally:
        if handle is not None:
            handle.close()
    plan.index_bytes = index_path.stat().st_size
    return plan


def fits_in(job: Filling, size: int, tokens: int, limits: JobLimits) -> bool:
    """Whether one more request of `size` bytes and `tokens` tokens fits in `job`."""
    if not job.requests:
        return True
    if job.bytes + size > limits.max_job_bytes:
        return False
    if limits.max_requests_per_job is not None and job.requests >= limits.max_requests_per_job:
        return False
    return limits.max_job_tokens is None or job.tokens + tokens <= limits.max_job_tokens


class IndexEntry(msgspec.Struct, array_like=True, frozen=True):
    """One input line as the index recorded it: a request (part >= 1) or an invalid line.

    (Decoded straight from its line, a JSON array: `[line, key, filter_json, part]`, or
    `[line, key, null, 0, reason]` for a line skipped under skip_line.)"""

    line: int
    key: str | None
    filter_json: int | None  # 1 or 0; None for an invalid line
    part: int
    invalid: str | None = None  # the reason, for a line skipped under skip_line


_INDEX_ENTRY = msgspec.json.Decoder(IndexEntry)


def read_index(path: Path) -> Iterator[IndexEntry]:
    """The index's entries, in input order."""
    with path.open("rb", buffering=STREAM_BUFFER) as handle:
        for raw in handle:
            yield _INDEX_ENTRY.decode(raw)
