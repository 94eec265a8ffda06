"""Input parsing: one JSONL prompt file -> `Request`s in the REST shape of a GenerateContentRequest.

The file is streamed line by line, so memory does not grow with its size; the keys seen so
far (to reject duplicates) move from memory to a temporary file on disk when there are many.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import orjson
from google.genai import types
from pydantic import TypeAdapter, ValidationError

from .config import Config
from .jsonl import ANY_JSON, STREAM_BUFFER, dumps, dumps_line, loads
from .keymap import KeySet

MAX_REPORTED_ERRORS = 100
"""Bad lines listed one by one in a report; the rest are only counted."""

_BOM = b"\xef\xbb\xbf"
_ASCII = bytes(range(128))
_PROMPT_FIELDS = {"key", "prompt", "system_prompt", "config", "filter_json"}
_NATIVE_FIELDS = {"key", "request", "filter_json"}
# Fields the SDK lifts out of a request's config to the request itself, by REST name.
LIFTED_FIELDS = {
    "systemInstruction": "system_instruction",
    "tools": "tools",
    "toolConfig": "tool_config",
    "safetySettings": "safety_settings",
    "cachedContent": "cached_content",
}
# generationConfig fields the SDK can carry in an inline request, camelCase.
_GENERATION_FIELDS = {
    f.alias or name
    for name, f in types.GenerationConfig.model_fields.items()
    if name in types.GenerateContentConfig.model_fields
}


_CONTENTS = TypeAdapter(list[types.Content])

CHARS_PER_TOKEN = 4
"""The token estimate: characters of text / 4, Google's rule of thumb for English prose. An
estimate only (other languages and code take more tokens per character; images none here)."""


@dataclass(frozen=True, slots=True)
class _Bounds:
    """The values the API takes for one numeric generation setting."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    high_excluded: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self._text()}, got {_kind(value)}"
        if self.integer and isinstance(value, float) and not value.is_integer():
            return f"must be {self._text()} (got {value!r})"
        too_high = self.high is not None and (
            value >= self.high if self.high_excluded else value > self.high
        )
        if (self.low is not None and value < self.low) or too_high:
            return f"must be {self._text()} (got {value!r})"
        return None

    def _text(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{what} >= {self.low}"
        if self.low is None:
            return f"{what} <= {self.high}"
        if self.high_excluded:
            return f"{what} from {self.low} up to (not including) {self.high}"
        return f"{what} from {self.low} to {self.high}"


# What the API accepts for generationConfig fields (REST names). The SDK's types check only the
# types, so without this a `temperature: 5` line fails the whole create call, not the one line.
_GENERATION_BOUNDS = {
    "temperature": _Bounds(0, 2),
    "topP": _Bounds(0, 1),
    "topK": _Bounds(1, integer=True),
    "candidateCount": _Bounds(1, integer=True),
    "maxOutputTokens": _Bounds(1, integer=True),
    "presencePenalty": _Bounds(-2, 2, high_excluded=True),
    "frequencyPenalty": _Bounds(-2, 2, high_excluded=True),
    "logprobs": _Bounds(0, 20, integer=True),
    "seed": _Bounds(-(2**31), 2**31 - 1, integer=True),
}
_THINKING_BOUNDS = {"thinkingBudget": _Bounds(-1, integer=True)}  # -1: the model decides
_MAX_STOP_SEQUENCES = 5


@functools.lru_cache(maxsize=1024)
def camel(name: str) -> str:
    """`response_mime_type` -> `responseMimeType`; camelCase names pass unchanged."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a line gets when it does not say otherwise: the configuration's generation settings."""

    system_prompt: str | None = None
    temperature: float = 0.2
    thinking_budget: int = 24576
    filter_json: bool = False

    @classmethod
    def from_config(cls, config: Config) -> Defaults:
        return cls(
            system_prompt=config.system_instruction(),
            temperature=config.temperature,
            thinking_budget=config.thinking_budget,
            filter_json=config.filter_json,
        )


class Request(NamedTuple):
    """One prompt line, ready to send: its key, physical line number and its line of a File
    API batch input, `{"key", "request"}` (written once, as the request files take it).

    (A named tuple: millions are made, and a frozen dataclass costs several times as much.)"""

    key: str
    line: int
    wire: bytes
    filter_json: bool
    chars: int = (
        0  # characters of text it sends (prompt and system instruction): the token estimate
    )

    @property
    def body(self) -> dict[str, Any]:
        """The REST request body (read back from `wire`)."""
        body: dict[str, Any] = loads(self.wire)["request"]
        return body


def wire_line(key: str, body: Mapping[str, Any]) -> bytes:
    """A request's line of a File API batch input: `{"key", "request"}`."""
    return dumps_line({"key": key, "request": body})


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that cannot be sent: its number, why, and the key it gave itself if readable
    (so that its record under `on_invalid_line: skip_line` can still be matched by key)."""

    line: int
    message: str
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "message": self.message}


@dataclass
class Scan:
    """What a full read of an input file found."""

    path: Path
    size: int = 0
    sha256: str = ""
    requests: int = 0
    payload_bytes: int = 0
    prompt_chars: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def estimated_tokens(self) -> int:
        """Input tokens of the valid requests, estimated (see CHARS_PER_TOKEN)."""
        return estimate_tokens(self.prompt_chars)

    def summary(self) -> str:
        if self.error_count:
            lines = "; ".join(f"line {e.line}: {e.message}" for e in self.errors[:5])
            tail = f" (and {self.error_count - 5} more)" if self.error_count > 5 else ""
            return f"{self.error_count} invalid line(s): {lines}{tail}"
        return f"{self.requests} request(s)"


class _BadLine(Exception):
    pass


def read_requests(
    path: Path,
    defaults: Defaults,
    scan: Scan | None = None,
    *,
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> Iterator[Request | LineError]:
    """Yield each non-blank line of `path` as a `Request` or a `LineError`, in file order.

    When `scan` is given it is filled in as the file is read (size, hash, counts, errors);
    `check` is the engine's own rule for each request (a reason refuses the line).
    """
    scan = scan if scan is not None else Scan(path)
    digest = hashlib.sha256()
    keys = KeySet()
    overhead = payload_overhead(defaults)
    with path.open("rb", buffering=STREAM_BUFFER) as handle, contextlib.closing(keys):
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            scan.size += len(raw)
            item = _parse_raw(raw, number, defaults, keys)
            if item is None:
                continue
            if check is not None and type(item) is Request:
                problem = check(item.body)
                if problem is not None:
                    item = LineError(
                        number, f"the request would fail the whole job: {problem}", item.key
                    )
            if type(item) is Request:
                scan.requests += 1
                scan.payload_bytes += payload_bytes(raw, item.key, overhead)
                scan.prompt_chars += item.chars
            else:
                assert isinstance(item, LineError)
                scan.error_count += 1
                if len(scan.errors) < MAX_REPORTED_ERRORS:
                    scan.errors.append(item)
            yield item
    scan.sha256 = digest.hexdigest()


def payload_overhead(defaults: Defaults) -> int:
    """Bytes an inline create call adds to each request: metadata and the default settings."""
    return 160 + (len(json.dumps(defaults.system_prompt)) if defaults.system_prompt else 0)


def payload_bytes(raw: bytes, key: str, overhead: int) -> int:
    """Size of a line's request in an inline create call. The SDK sends JSON with non-ASCII
    characters escaped (at most 2 more bytes per non-ASCII byte: `é` -> `\\u00e9`)."""
    wide = 0 if raw.isascii() else len(raw.translate(None, _ASCII))
    return len(raw) + 2 * wide + len(key) + overhead


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters of text a request body sends: its contents and system instruction."""
    total = 0
    contents = body.get("contents")
    system = body.get("systemInstruction")
    for content in [*(contents if isinstance(contents, list) else []), system]:
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else []:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                total += len(text)
    return total


def estimate_tokens(chars: int) -> int:
    """Tokens for `chars` characters of text, rounded up (see CHARS_PER_TOKEN)."""
    return -(-chars // CHARS_PER_TOKEN)


def scan_file(
    path: Path, defaults: Defaults, check: Callable[[Mapping[str, Any]], str | None] | None = None
) -> Scan:
    """Read the whole file once, keeping only counts, the hash and the first errors."""
    scan = Scan(path)
    for _ in read_requests(path, defaults, scan, check=check):
        pass
    return scan


_DIGITS = b"0123456789"
_LONG_NUMBER = re.compile(rb"\d{19}")
"""orjson reads integers beyond 64 bits as floats: lines with such numbers take the slow path."""


class _TextPart(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class _TextContent(msgspec.Struct, forbid_unknown_fields=True):
    parts: list[_TextPart]
    role: str | msgspec.UnsetType = msgspec.UNSET


class _TextRequest(msgspec.Struct, forbid_unknown_fields=True):
    contents: list[_TextContent]
    generationConfig: msgspec.Raw = msgspec.Raw(b"")  # settled once per distinct config


class _UsualLine(msgspec.Struct, forbid_unknown_fields=True):
    """A line in one of the two usual shapes, decoded and type-checked in one pass: a prompt
    line, or a native request of text contents (perhaps with generation settings)."""

    prompt: str | list[str] | msgspec.UnsetType = msgspec.UNSET
    request: _TextRequest | msgspec.UnsetType = msgspec.UNSET
    key: str | int | msgspec.UnsetType = msgspec.UNSET
    system_prompt: str | msgspec.UnsetType | None = msgspec.UNSET
    config: msgspec.Raw = msgspec.Raw(b"")  # as it came: settled once per distinct config
    filter_json: bool | msgspec.UnsetType = msgspec.UNSET


_USUAL_LINE = msgspec.json.Decoder(_UsualLine)


def _parse_raw(
    raw: bytes, number: int, defaults: Defaults, keys: KeySet
) -> Request | LineError | None:
    usual = _usual_line(raw, number, defaults, keys)
    if usual is not None:
        return usual
    return _parse_any(raw, number, defaults, keys)


def _usual_line(
    raw: bytes, number: int, defaults: Defaults, keys: KeySet
) -> Request | LineError | None:
    """A well-formed line of a usual shape, read without building its object first; None for
    anything else, which `_parse_any` then reads and explains. Both read a line alike (a
    test holds them equal)."""
    try:
        line = _USUAL_LINE.decode(raw)  # integers stay exact; bad UTF-8, BOMs are refused
    except (ValueError, RecursionError):
        return None
    if line.request is msgspec.UNSET:
        request = _usual_prompt(line, raw, number, defaults)
    elif line.prompt is msgspec.UNSET and line.system_prompt is msgspec.UNSET and not line.config:
        request = _usual_request(line, line.request, raw, number, defaults)
    else:
        return None
    if request is None:
        return None
    first = keys.add(request.key, number, auto=line.key is msgspec.UNSET)
    if first is not None:
        key = request.key
        return LineError(number, f"duplicate key {key!r} (first used on line {first})", key)
    return request


def _usual_key(line: _UsualLine, number: int) -> str:
    """`_key`'s rule for the decoded types ("" for a key it refuses)."""
    key = line.key
    if key is msgspec.UNSET:
        return str(number)
    return key if type(key) is str else str(key)


def _usual_prompt(line: _UsualLine, raw: bytes, number: int, defaults: Defaults) -> Request | None:
    """The request of a usual prompt line; None where `_parse_any` must read it."""
    if line.prompt is msgspec.UNSET:
        return None
    config, fields = bytes(line.config), 1
    fields += (line.key is not msgspec.UNSET) + (line.system_prompt is not msgspec.UNSET)
    fields += bool(config) + (line.filter_json is not msgspec.UNSET)
    generation = _default_generation(defaults.temperature, defaults.thinking_budget)
    if config and config != b"null":
        settings = _settings(config, defaults)
        if settings is None:
            return None
        generation, config_fields = settings
        fields += config_fields
    if not _names_no_field_twice(raw, fields):
        return None
    key = _usual_key(line, number)
    # `_prompt_text`'s rule for the decoded types, inlined: a call costs a tenth of a line.
    prompt = "\n".join(line.prompt) if isinstance(line.prompt, list) else line.prompt
    if not key or not prompt or prompt.isspace():
        return None
    filter_json = defaults.filter_json if line.filter_json is msgspec.UNSET else line.filter_json
    system = None if line.system_prompt is msgspec.UNSET else line.system_prompt
    return _prompt_body(key, number, prompt, system, generation, filter_json, defaults)


def _usual_request(
    line: _UsualLine, request: _TextRequest, raw: bytes, number: int, defaults: Defaults
) -> Request | None:
    """The request of a usual native request line; None where `_parse_any` must read it."""
    if not request.contents:
        return None
    fields = 2 + (line.key is not msgspec.UNSET) + (line.filter_json is not msgspec.UNSET)
    contents: list[dict[str, Any]] = []
    chars = 0
    for content in request.contents:
        parts = [{"text": part.text} for part in content.parts]
        chars += sum(len(part.text) for part in content.parts)
        fields += 1 + len(parts)
        if content.role is msgspec.UNSET:
            contents.append({"parts": parts})
        else:
            contents.append({"parts": parts, "role": content.role})
            fields += 1
    body: dict[str, Any] = {"contents": contents}
    config = bytes(request.generationConfig)
    if config:
        settings = _request_settings(config)
        if settings is None:
            return None
        body["generationConfig"], config_fields = settings
        fields += 1 + config_fields
    if not _names_no_field_twice(raw, fields):
        return None
    key = _usual_key(line, number)
    if not key:
        return None
    filter_json = defaults.filter_json if line.filter_json is msgspec.UNSET else line.filter_json
    return Request(key, number, wire_line(key, body), filter_json, chars)


_Settled = tuple[Any, int]
"""A generationConfig as a request sends it, and how many fields the line gave it."""


def _settings(config: bytes, defaults: Defaults) -> _Settled | None:
    """The generationConfig of a prompt line's `config` (its bytes as they came) and how many
    fields the config has; None where it is not an object of valid settings."""
    memo = (defaults.temperature, defaults.thinking_budget, config)
    return _remembered(memo, config, _prompt_settings, defaults)


def _prompt_settings(overrides: Any, defaults: Defaults) -> _Settled | None:
    if type(overrides) is not dict:
        return None
    try:
        generation = (
            _generation(overrides, defaults)
            if overrides
            else _default_generation(defaults.temperature, defaults.thinking_budget)
        )
    except _BadLine:
        return None
    return generation, _count_fields(overrides)


def _request_settings(config: bytes) -> _Settled | None:
    """The generationConfig of a native request (its bytes as they came, null included) and
    its number of fields; None where it is not valid settings."""
    return _remembered((config,), config, _native_settings, None)


def _native_settings(generation: Any, _: Any) -> _Settled | None:
    if generation is not None and type(generation) is not dict:
        return None
    try:
        _check_request_settings({"generationConfig": generation})
    except _BadLine:
        return None
    return generation, _count_fields(generation)


def _remembered(
    memo: tuple[Any, ...],
    config: bytes,
    settle: Callable[[Any, Any], _Settled | None],
    defaults: Any,
) -> _Settled | None:
    """`settle(the config's JSON value, defaults)` (a value of `_NOT_PARSED` if it is not
    JSON), remembered per `memo` (a file repeats a few configs): the lines that share one
    share its dict, only ever read."""
    try:
        return _SETTINGS[memo]  # one step: a file on another thread may clear the memo
    except KeyError:
        pass
    try:
        value = ANY_JSON.decode(config)
    except (ValueError, RecursionError):
        value = _NOT_PARSED
    found = settle(value, defaults)
    if len(_SETTINGS) >= _VERDICTS_KEPT:
        _SETTINGS.clear()
    if len(config) <= _VERDICT_MAX_CHARS:
        _SETTINGS[memo] = found
    return found


_SETTINGS: dict[tuple[Any, ...], _Settled | None] = {}


def _parse_any(
    raw: bytes, number: int, defaults: Defaults, keys: KeySet
) -> Request | LineError | None:
    if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    if not raw.strip():
        return None
    value: Any = _NOT_PARSED
    digits = len(raw) - len(raw.translate(None, _DIGITS))
    if digits < 19 or _LONG_NUMBER.search(raw) is None:
        try:  # noqa: SIM105 (a context manager a line costs more than the parse itself)
            value = orjson.loads(raw)  # fast, strict; anything it refuses is explained below
        except orjson.JSONDecodeError:
            pass
    if value is _NOT_PARSED:
        parsed = _parse_slowly(raw, number)
        if isinstance(parsed, LineError):
            return parsed
        value = parsed
    if type(value) is dict:
        repeated = _repeated_field(raw, value)
        if repeated is not None:
            key = None if repeated == "key" else _given_key(value)
            return LineError(number, f"an object names the field {repeated!r} twice", key)
    try:
        request = _to_request(value, number, defaults)
    except _BadLine as exc:
        return LineError(number, str(exc), _given_key(value))
    auto = not isinstance(value, dict) or value.get("key") is None
    first = keys.add(request.key, number, auto=auto)
    if first is not None:
        return LineError(
            number, f"duplicate key {request.key!r} (first used on line {first})", request.key
        )
    return request


_NOT_PARSED = object()

_FIELD_END = re.compile(rb'"[ \t\r\n]*:')
"""How every field name of a JSON object ends (a quote, perhaps white space, a colon)."""


def _repeated_field(raw: bytes, value: dict[str, Any]) -> str | None:
    """A field that an object of this line names twice (parsers keep its last value only).

    Every field of every object ends in `":`, so a line with no more colons -- then no more
    such ends -- than its parsed objects have fields repeats none: the usual line is cleared
    by two counts, and only the rest is parsed again, by a parser that sees every field."""
    if raw.count(b":") <= len(value) or _names_no_field_twice(raw, _count_fields(value)):
        return None
    repeated: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names: set[str] = set()
        for name, _ in pairs:
            if name in names and not repeated:
                repeated.append(name)
            names.add(name)
        return dict(pairs)

    try:
        json.loads(raw, object_pairs_hook=check)
    except (ValueError, RecursionError):  # what orjson took and json refuses: nothing to say
        return None
    return repeated[0] if repeated else None


def _names_no_field_twice(raw: bytes, fields: int) -> bool:
    """Whether a line whose objects have `fields` fields in all surely names none twice: it
    has no more colons, or no more `"` + colon runs, than that (every field ends in one)."""
    return raw.count(b":") <= fields or len(_FIELD_END.findall(raw)) <= fields


def _count_fields(value: Any) -> int:
    """Fields of every object in a parsed JSON value."""
    total = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            total += len(item)
            item = item.values()
        elif type(item) is not list:
            continue
        for inner in item:
            if type(inner) is dict or type(inner) is list:
                pending.append(inner)
    return total


def _parse_slowly(raw: bytes, number: int) -> Any:
    """The standard parser, for what orjson refused: it names the column and the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineError(
            number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        )
    text = text.rstrip(" \t\r\n")  # JSON's white space: an error at the end points there
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        at_end = " (the end of the line: is a closing quote or bracket missing?)"
        return LineError(
            number,
            f"not valid JSON: {exc.msg} at column {exc.colno}{at_end if exc.pos >= len(text) else ''}",
        )
    except RecursionError:
        return LineError(number, "not valid JSON: nested too deeply")
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        return LineError(number, f"not valid JSON: {exc}")
    if b"\\ud" in raw or b"\\uD" in raw:  # an escaped lone surrogate cannot be sent as UTF-8
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return LineError(
                number,
                "holds an unpaired surrogate escape (\\udXXX): not valid Unicode",
                _given_key(value),
            )
    return value


def _given_key(value: Any) -> str | None:
    """The key a line gives itself, where it is a usable key (not the default line number)."""
    if not isinstance(value, dict) or value.get("key") is None:
        return None
    try:
        key = _key(value["key"], 0)
        key.encode()
    except (_BadLine, UnicodeEncodeError):
        return None
    return key


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _to_request(value: Any, number: int, defaults: Defaults) -> Request:
    """The request of a parsed line (exact types are checked: a parser makes no subclasses)."""
    if type(value) is str or type(value) is list:
        return _prompt_request(
            str(number),
            number,
            _prompt_text(value, "the line"),
            None,
            {},
            defaults.filter_json,
            defaults,
        )
    if type(value) is not dict:
        raise _BadLine(f"expected a string, an array of strings or an object, got {_kind(value)}")
    key = _key(value.get("key"), number)
    filter_json = value.get("filter_json", defaults.filter_json)
    if type(filter_json) is not bool:
        raise _BadLine(f"'filter_json' must be true or false, got {_kind(filter_json)}")
    if "request" in value:
        _no_unknown(value, _NATIVE_FIELDS, "a native request line")
        body = value["request"]
        if type(body) is not dict:
            raise _BadLine(f"'request' must be an object, got {_kind(body)}")
        for name in body:
            if "_" in name:  # snake_case names, as the SDK's own types have them
                body = {camel(k): v for k, v in body.items()}
                break
        contents = body.get("contents")
        if type(contents) is not list or not contents:
            raise _BadLine("'request.contents' must be a non-empty array")
        if not _plain_text_contents(contents):
            _check(_CONTENTS.validate_python, contents, "'request.contents'")
        if len(body) > 1:  # more than contents: settings to check
            _check_request_settings(body)
        return Request(key, number, wire_line(key, body), filter_json, prompt_chars(body))
    if "prompt" not in value:
        raise _BadLine("an object line needs 'prompt' (or 'key' and 'request')")
    _no_unknown(value, _PROMPT_FIELDS, "a prompt line")
    system = value.get("system_prompt")
    if system is not None and type(system) is not str:
        raise _BadLine(f"'system_prompt' must be a string, got {_kind(system)}")
    overrides = value.get("config")
    overrides = {} if overrides is None else overrides
    if type(overrides) is not dict:
        raise _BadLine(f"'config' must be an object, got {_kind(overrides)}")
    return _prompt_request(
        key,
        number,
        _prompt_text(value["prompt"], "'prompt'"),
        system,
        overrides,
        filter_json,
        defaults,
    )


def _check_request_settings(body: Mapping[str, Any]) -> None:
    """Reject a native request's settings (generationConfig and the fields the SDK lifts)
    that the API would refuse at create time."""
    generation = body.get("generationConfig")
    if generation is not None and type(generation) is not dict:
        raise _BadLine(f"'request.generationConfig' must be an object, got {_kind(generation)}")
    _check_bounds(generation, "'request.generationConfig'")
    config = dict(generation or {})
    config.update({LIFTED_FIELDS[k]: v for k, v in body.items() if k in LIFTED_FIELDS})
    if config:
        _check(types.GenerateContentConfig.model_validate, config, "'request'")


def prompt_request(key: str, line: int, prompts: str | list[str], defaults: Defaults) -> Request:
    """A request for one prompt or prompt sequence with the default settings (the library API's path)."""
    try:
        text = _prompt_text(prompts, "the prompt")
    except _BadLine as exc:
        raise ValueError(str(exc)) from None
    return _prompt_request(key, line, text, None, {}, defaults.filter_json, defaults)


def _prompt_request(
    key: str,
    number: int,
    prompt: str,
    system: str | None,
    overrides: dict[str, Any],
    filter_json: bool,
    defaults: Defaults,
) -> Request:
    if not overrides:  # the common case: settings shared by every such line of the file
        generation = _default_generation(defaults.temperature, defaults.thinking_budget)
    else:
        generation = _generation(overrides, defaults)
    return _prompt_body(key, number, prompt, system, generation, filter_json, defaults)


def _prompt_body(
    key: str,
    number: int,
    prompt: str,
    system: str | None,
    generation: dict[str, Any],
    filter_json: bool,
    defaults: Defaults,
) -> Request:
    """The request of a prompt, its line written from parts: as `wire_line` writes
    `{"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": ...,
    "systemInstruction": ...}` (a test holds them equal), without building that object."""
    if system is None:
        system = defaults.system_prompt
        tail = _prompt_tail(generation, system, remember=True)
    else:
        tail = _prompt_tail(generation, system, remember=False)
    wire = b"".join((_PROMPT_HEAD, dumps(key), _PROMPT_TEXT, dumps(prompt), tail))
    return Request(key, number, wire, filter_json, len(prompt) + len(system or ""))


_PROMPT_HEAD = b'{"key":'
_PROMPT_TEXT = b',"request":{"contents":[{"role":"user","parts":[{"text":'


def _prompt_tail(generation: dict[str, Any], system: str | None, *, remember: bool) -> bytes:
    """What follows the prompt in its line: the settings, the system instruction, the end.
    `remember`: for settings and a system prompt shared by many lines (the file's defaults,
    a remembered config), kept by identity; the memo holds them, so no id is reused."""
    memo = (id(generation), id(system))
    found = _TAILS.get(memo)
    if found is not None and found[0] is generation and found[1] is system:
        return found[2]
    tail = b'}]}],"generationConfig":' + dumps(generation)
    if system:
        tail += b',"systemInstruction":' + dumps(_system_instruction(system))
    tail += b"}}\n"
    if remember and len(tail) <= _TAIL_MAX_BYTES:  # (a config of one line may be huge)
        if len(_TAILS) >= _TAILS_KEPT:
            _TAILS.clear()
        _TAILS[memo] = (generation, system, tail)
    return tail


_TAILS: dict[tuple[int, int], tuple[dict[str, Any], str | None, bytes]] = {}
_TAILS_KEPT = 64
_TAIL_MAX_BYTES = 64 << 10
"""At most 4 MiB of remembered tails, whatever the input."""


def _generation(overrides: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    """The generationConfig of a line with `config` overrides, checked."""
    generation: dict[str, Any] = {
        "temperature": defaults.temperature,
        "thinkingConfig": {"thinkingBudget": defaults.thinking_budget},
    }
    for name, setting in overrides.items():
        field_name = camel(name)
        if field_name not in _GENERATION_FIELDS:
            raise _BadLine(f"'config' has unknown generation setting {name!r}")
        if field_name == "thinkingConfig" and isinstance(setting, dict):
            own = {camel(k): v for k, v in setting.items()}
            # A thinking level replaces the default budget: the API refuses both at once.
            levelled = own.get("thinkingLevel") is not None
            # (The default budget may be gone: an earlier name of the field set it to null.)
            base = generation["thinkingConfig"]
            setting = own if levelled or type(base) is not dict else {**base, **own}
        generation[field_name] = setting
    _check_bounds(generation, "'config'")
    _check(types.GenerateContentConfig.model_validate, generation, "'config'")
    return generation


@functools.lru_cache(maxsize=16)
def _default_generation(temperature: float, thinking_budget: int) -> dict[str, Any]:
    """The generationConfig of a line without overrides. One object shared by every request
    that uses it: request bodies are only ever read (dumped), never changed."""
    return {"temperature": temperature, "thinkingConfig": {"thinkingBudget": thinking_budget}}


@functools.lru_cache(maxsize=16)
def _system_instruction(text: str) -> dict[str, Any]:
    """The systemInstruction for `text`, shared like `_default_generation`'s dict."""
    return {"parts": [{"text": text}]}


def _prompt_text(value: Any, what: str) -> str:
    """A prompt string, or a sequence of strings joined with newlines into one turn."""
    if type(value) is list:
        if not value:
            raise _BadLine(f"{what} is an empty array; it needs at least one string")
        bad = [v for v in value if not isinstance(v, str)][:1]  # a null element is bad too
        if bad:
            raise _BadLine(f"{what} must hold only strings, found {_kind(bad[0])}")
        value = "\n".join(value)
    if not isinstance(value, str):
        raise _BadLine(f"{what} must be a string or an array of strings, got {_kind(value)}")
    if not value or value.isspace():
        raise _BadLine(f"{what} is empty")
    return value


def _key(value: Any, number: int) -> str:
    if value is None:
        return str(number)
    if type(value) is str and value:
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _BadLine(f"'key' must be a string, got {_kind(value)}")
    key = str(value)
    if not key:
        raise _BadLine("'key' is empty")
    return key


def _check_bounds(config: Any, what: str) -> None:
    """Reject generation settings the API would refuse at create time (see _GENERATION_BOUNDS)."""
    if not isinstance(config, dict):
        return  # not an object: the SDK's check says so
    for name, value in config.items():
        field_name = camel(name)
        if value is None:
            continue
        if field_name == "thinkingConfig" and isinstance(value, dict):
            thinking = {camel(k): v for k, v in value.items() if v is not None}
            if "thinkingBudget" in thinking and "thinkingLevel" in thinking:
                raise _BadLine(
                    f"{what} field 'thinkingConfig': set thinkingBudget or thinkingLevel, not both"
                )
            for sub, bounds in _THINKING_BOUNDS.items():
                problem = bounds.problem(thinking[sub]) if sub in thinking else None
                if problem:
                    raise _BadLine(f"{what} field 'thinkingConfig.{sub}': {problem}")
        elif field_name == "stopSequences" and isinstance(value, list):
            if len(value) > _MAX_STOP_SEQUENCES:
                raise _BadLine(
                    f"{what} field 'stopSequences': at most {_MAX_STOP_SEQUENCES} sequences"
                    f" (got {len(value)})"
                )
        elif field_name in _GENERATION_BOUNDS:
            problem = _GENERATION_BOUNDS[field_name].problem(value)
            if problem:
                raise _BadLine(f"{what} field {field_name!r}: {problem}")


def _check(validate: Callable[[Any], Any], value: Any, what: str) -> None:
    """Reject a value the SDK would refuse at create time (failing the whole file), naming the field.

    Verdicts are remembered by value: files repeat the same few configs, and pydantic is slow.
    """
    try:
        memo = what + orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # an integer beyond 64 bits
        memo = what + json.dumps(value, sort_keys=True, default=repr)
    try:
        message = _VERDICTS[memo]  # one step: a file on another thread may clear the memo
    except KeyError:
        message = None
        try:
            validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = f"{what}{f' field {where!r}' if where else ''}: {err['msg']}"
        except Exception as exc:  # the SDK's own readers fail on some types (an enum given 5)
            message = f"{what}: the SDK cannot read these settings ({type(exc).__name__}: {exc})"
        if len(memo) <= _VERDICT_MAX_CHARS:
            if len(_VERDICTS) >= _VERDICTS_KEPT:
                _VERDICTS.clear()
            _VERDICTS[memo] = message
    if message is not None:
        raise _BadLine(message)


_VERDICTS: dict[str, str | None] = {}
_VERDICTS_KEPT = 256
_VERDICT_MAX_CHARS = 4096


def _plain_text_contents(contents: list[Any]) -> bool:
    """Contents of only roles and text parts: valid as they are, no need to ask pydantic."""
    for content in contents:
        if not isinstance(content, dict) or not content.keys() <= {"role", "parts"}:
            return False
        parts = content.get("parts")
        if not isinstance(content.get("role", ""), str) or not isinstance(parts, list):
            return False
        for part in parts:
            if not isinstance(part, dict) or part.keys() != {"text"}:
                return False
            if not isinstance(part["text"], str):
                return False
    return True


def _no_unknown(value: dict[str, Any], allowed: set[str], what: str) -> None:
    if value.keys() <= allowed:
        return
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _BadLine(
            f"unknown field(s) {', '.join(map(repr, unknown))} in {what}; allowed: {', '.join(sorted(allowed))}"
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
