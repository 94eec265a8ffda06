"""Every exception the daemon defines, on one base class, so that callers can tell the
daemon's own failures from a library's and a bug's (`except BatchdError`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .failures import Call, Failure


class BatchdError(Exception):
    """Base of the daemon's own exceptions."""


class ConfigError(BatchdError):
    """The configuration file is missing, unreadable or has a bad key or value.

    `problems` lists each problem; the message holds all of them on one line, so an operator
    fixes everything in one go rather than one problem per start.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(problems))


class SidecarError(BatchdError):
    """A sidecar exists but cannot be read."""


class InvalidTransition(BatchdError):
    """A bug: code tried a move the state machine does not allow."""


class BadReply(BatchdError, ValueError):
    """A reply the daemon cannot use at all: empty, HTML, truncated, not an object, no name."""


class UnreadableResults(BadReply):
    """A results file arrived whole but cannot be read whole (a line no parser takes)."""


class OutOfOrder(BatchdError):
    """Answers did not come back in request order: match them through an index instead."""


class LeftAlone(BatchdError):
    """The file belongs to another daemon's credential or endpoint: stop tracking it, fail nothing."""


class LLMProviderError(BatchdError):
    """A batch job failed, or some of its requests did; `.results` holds what did come back."""

    def __init__(self, message: str, results: list[object] | None = None) -> None:
        super().__init__(message)
        self.results = results


class CallFailed(BatchdError):
    """An API call failed; `failure` says how (classified once, where the call was made)."""

    def __init__(self, call: Call, failure: Failure) -> None:
        super().__init__(failure.message)
        self.call = call
        self.failure = failure
