"""The test configuration, written once: what every test daemon shares, and its two paces.

`REAL_TIME` is for daemons that run as processes (tests/process/): they poll, settle, back
off and look jobs up in fractions of a second. `STEPPED` is for the in-process daemon on a
fake clock (tests/support/inprocess.py), where a second costs nothing: round numbers that
make backoff arithmetic readable.
"""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "log_level": "debug",
    "api": {"retries": 1, "timeout_seconds": 10},
    "poll": {"multiplier": 2.0, "jitter": 0.0},
}

REAL_TIME: dict[str, Any] = {
    "inbox_settle_seconds": 0.3,
    "inbox_rescan_seconds": 1,
    "api": {
        "lookup_grace_seconds": 1,
        "backoff_initial_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "probe_seconds": 0.5,
    },
    "poll": {"initial_seconds": 0.05, "max_seconds": 0.3},
}

STEPPED: dict[str, Any] = {
    "inbox_settle_seconds": 0,
    "inbox_rescan_seconds": 3600,
    "api": {
        "lookup_grace_seconds": 60,
        "backoff_initial_seconds": 1,
        "backoff_max_seconds": 30,
        "probe_seconds": 30,
    },
    "poll": {"initial_seconds": 1, "max_seconds": 30},
}


def test_config(base_url: str, pace: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The configuration of a test daemon at `pace` against `base_url`, with `overrides`."""
    config = merged(copy.deepcopy(BASE), pace)
    config = merged(config, {"api": {"base_url": base_url}})
    return merged(config, overrides)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name


def merged(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with `overrides`; a section given as a dict is merged key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
