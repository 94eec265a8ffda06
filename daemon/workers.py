"""Worker threads: a pool runs tasks, urgent ones first, and knows how long each thread has
been on its current task (a daemon whose every worker is stuck stops feeding the watchdog)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable

Task = Callable[[], None]


class WorkerPool:
    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self._queue: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self.busy_since: dict[int, float] = {}
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"{name}-{i}")
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, task: Task, urgent: bool = False) -> None:
        """Queue a task; `urgent` ones (a claim, a job to create) go before polls and downloads."""
        self._queue.put((0 if urgent else 1, next(self._seq), task))

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put((-1, next(self._seq), None))

    def stuck(self, now: float, limit: float) -> bool:
        """Whether every thread has been on one task for longer than `limit` seconds."""
        busy = list(self.busy_since.values())
        return len(busy) == len(self._threads) and all(now - since > limit for since in busy)

    def _loop(self, number: int) -> None:
        while True:
            _, _, task = self._queue.get()
            if task is None:
                return
            self.busy_since[number] = time.monotonic()
            try:
                task()
            finally:
                self.busy_since.pop(number, None)
