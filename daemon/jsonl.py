"""JSON as the daemon reads and writes it: integers kept exact, replies read tolerantly.

`parse_json` reads what a server sent (`BadReply` when it is empty, HTML or cut short, without
quoting it); `dumps` writes compact UTF-8; the small readers take a count, an integer or a
string from wherever a server may have put one, and treat a value of the wrong type as absent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
import orjson

from .errors import BadReply

STREAM_BUFFER = 256 << 10
"""Buffer of a streamed file (an input, a request file, answers, an index): read and written
256 KiB per system call. The default, the file system's 4 KiB block, costs one call per few
lines, and system calls are much of the CPU of a large file on a virtual machine."""

# ---- JSON ----------------------------------------------------------------------------------------

_HTML_TITLE = re.compile(r"<title[^>]*>([^<]{1,80})", re.IGNORECASE)
ANY_JSON = msgspec.json.Decoder()
"""msgspec's reading of any JSON value: strict (no NaN, no Infinity), integers of any size
exact."""

_T = TypeVar("_T")


def loads(body: str | bytes) -> Any:
    """`json.loads`, exactly, through msgspec where it can: integers of any size stay exact
    (orjson would turn those beyond 64 bits into floats); what it refuses (NaN, Infinity,
    lone surrogates, malformed JSON) goes to the stdlib parser, which decides."""
    try:
        return ANY_JSON.decode(body)
    except (ValueError, RecursionError):
        return json.loads(body)


def decode_as(decoder: msgspec.json.Decoder[_T], raw: bytes) -> _T | None:
    """`raw` read by a typed decoder; None where it is not of those types, nested too deep,
    or not UTF-8 throughout (the decoder checks only the strings it keeps, and a parser that
    reads every byte would refuse the line)."""
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            return None
    try:
        return decoder.decode(raw)
    except (ValueError, RecursionError):
        return None


def parse_json(body: str | bytes | None) -> Any:
    """The JSON value of a reply body; `BadReply` when it is empty, HTML or not (whole) JSON."""
    if body is None:
        raise BadReply("the reply is empty")
    try:
        return loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadReply(_describe_bad_body(body, exc)) from None


def _describe_bad_body(body: str | bytes, exc: BaseException) -> str:
    """Why a body is not JSON, without quoting it (a proxy's page may echo request details)."""
    head = body[:2048]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    text = text.lstrip()
    if not text and not body.strip():
        return "the reply is empty"
    if text.startswith("<"):
        title = _HTML_TITLE.search(text)
        found = f" ({' '.join(title.group(1).split())})" if title else ""
        return f"the reply is an HTML page, not JSON{found}"
    if isinstance(exc, RecursionError):
        return f"the reply is nested too deeply to read ({len(body)} bytes)"
    return f"the reply is not valid JSON ({exc}; {len(body)} bytes)"


# ---- small tolerant readers ------------------------------------------------------------------------


def count(value: Any) -> int:
    """A non-negative count from an int, a float or an int64 string; anything else is 0."""
    if type(value) is int:  # the common case, first
        return value if value > 0 else 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0) if math.isfinite(value) else 0
    if isinstance(value, str | bytes):
        try:
            number = int(value.strip() or 0)
        except ValueError:
            return 0
        return max(number, 0)
    return 0


def int_or_none(value: Any) -> int | None:
    """An integer (error codes), from an int or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pick(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field by its REST (camelCase) name, else its snake_case name (gateways may rewrite)."""
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def dumps(value: Any) -> bytes:
    """Compact JSON, UTF-8; orjson where it can (it refuses integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def dumps_line(value: Any) -> bytes:
    """`dumps` and a newline: one line of a JSON lines file."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
