"""A batch engine in memory, for the system tests that run the daemon through the `Engine`
interface alone: no HTTP, no SDK, nothing of Google's. If the daemon runs on it unchanged, a
second real engine is one module behind the same interface.

Its jobs pend, run and succeed on the test's clock; answers come back in a shuffled order;
a request whose prompt holds `[[fail]]` fails retryably the first time it is sent, and one
holding `[[refuse]]` is refused for good.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.api import EngineLimits, Progress, RemoteJob, RemoteState


@dataclass
class _Job:
    name: str
    display_name: str
    created: float
    lines: list[dict[str, Any]]
    cancelled: bool = False
    answers: list[bytes] = field(default_factory=list)


class MemoryEngine:
    kind = "memory"
    endpoint = "memory://test"
    account = "memory-account"

    def __init__(self, clock: Callable[[], float], *, inline: bool = False, seed: int = 3):
        self.limits = EngineLimits(inline=inline, max_job_bytes=10_000_000)
        self._clock = clock
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self.jobs: dict[str, _Job] = {}
        self.files: dict[str, bytes] = {}
        self.sent: dict[str, int] = {}  # key -> times a job carried it
        self.calls: list[str] = []

    # ---- the Engine interface ---------------------------------------------------------

    @staticmethod
    def is_job_name(name: str) -> bool:
        return name.startswith("memory/jobs/")

    def create_job(
        self, model: str, display_name: str, source: Path | str, *, inline: bool
    ) -> RemoteJob:
        self.calls.append("create")
        data = Path(source).read_bytes() if inline else self.files[str(source)]
        lines = [json.loads(raw) for raw in data.splitlines() if raw.strip()]
        job = _Job(f"memory/jobs/{next(self._ids)}", display_name, self._clock(), lines)
        for line in lines:
            self.sent[line["key"]] = self.sent.get(line["key"], 0) + 1
            job.answers.append(self._answer(line))
        self._rng.shuffle(job.answers)
        self.jobs[job.name] = job
        return self._remote(job)

    def find_job(self, display_name: str, *, prefix: bool = False) -> RemoteJob | None:
        self.calls.append("find")
        for job in reversed(self.jobs.values()):
            if job.display_name == display_name or (
                prefix and job.display_name.startswith(display_name)
            ):
                return self._remote(job)
        return None

    def get_job(self, name: str) -> RemoteJob:
        self.calls.append("get")
        return self._remote(self.jobs[name])

    def cancel_job(self, name: str) -> None:
        self.jobs[name].cancelled = True

    def upload(self, path: Path, display_name: str) -> str:
        name = f"memory/files/{next(self._ids)}"
        self.files[name] = path.read_bytes()
        return name

    def find_uploads(self, display_name: str) -> list[str]:
        return []

    def download(self, results: str, destination: Path, expected_bytes: int = 0) -> None:
        destination.write_bytes(self.files[results])

    def delete(self, name: str) -> None:
        self.files.pop(name, None)

    def probe(self) -> None:
        self.calls.append("probe")

    def check_access(self) -> None:
        self.probe()

    def close(self) -> None:
        pass

    # ---- the service's side -----------------------------------------------------------

    def _state(self, job: _Job) -> RemoteState:
        if job.cancelled:
            return RemoteState.CANCELLED
        age = self._clock() - job.created
        if age < 5:
            return RemoteState.PENDING
        return RemoteState.RUNNING if age < 20 else RemoteState.SUCCEEDED

    def _remote(self, job: _Job) -> RemoteJob:
        state = self._state(job)
        results = None
        if state is RemoteState.SUCCEEDED:
            results = f"memory/files/{job.name}.out"
            self.files.setdefault(results, b"".join(a + b"\n" for a in job.answers))
        total = len(job.lines)
        done = total if state is RemoteState.SUCCEEDED else 0
        return RemoteJob(
            name=job.name,
            state=state,
            state_name=state.value,
            display_name=job.display_name,
            progress=Progress(total, done, 0, total - done),
            results=results,
        )

    def _answer(self, line: dict[str, Any]) -> bytes:
        key, request = line["key"], line["request"]
        prompt = " ".join(
            part.get("text", "") for content in request["contents"] for part in content["parts"]
        )
        if "[[refuse]]" in prompt:
            error = {"code": 400, "message": "refused", "status": "INVALID_ARGUMENT"}
            return json.dumps({"key": key, "error": error}).encode()
        if "[[fail]]" in prompt and self.sent[key] == 1:
            error = {"code": 503, "message": "try again", "status": "UNAVAILABLE"}
            return json.dumps({"key": key, "error": error}).encode()
        response = {
            "candidates": [
                {"content": {"parts": [{"text": f"echo: {prompt}"}]}, "finishReason": "STOP"}
            ],
            "usageMetadata": {
                "promptTokenCount": 3,
                "candidatesTokenCount": 2,
                "totalTokenCount": 5,
            },
        }
        return json.dumps({"key": key, "response": response}).encode()
