"""Name locks in a running service: taken at claim, released exactly once when the file is done.

Releasing a descriptor twice is no harmless slip in a threaded daemon: between the two closes
another worker may have opened a file or socket under the same number, and the second close
takes it away from under it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from daemon import claims
from tests.support.guarantees import left_in_processing

MakeDaemon = Any


def test_each_name_lock_is_released_once(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: Counter[int] = Counter()
    taken: list[int] = []
    real_release, real_claim = claims.release, claims.claim

    def counting(fd: int) -> None:
        released[fd] += 1
        real_release(fd)

    def claim(*args: Any, **kwargs: Any) -> claims.Claimed | None:
        claimed = real_claim(*args, **kwargs)
        if claimed is not None:
            taken.append(claimed.lock_fd)
        return claimed

    monkeypatch.setattr(claims, "release", counting)
    monkeypatch.setattr(claims, "claim", claim)
    daemon = make_daemon()
    daemon.drop("a.jsonl", ["one"])
    daemon.drop("bad.jsonl", b"{broken\n")
    daemon.run_all()
    assert len(taken) == 2
    assert [released[fd] for fd in taken] == [1, 1]
    assert not left_in_processing(daemon.inbox)
