"""What the simulated model answers to one GenerateContentRequest, in the live API's shapes.

Answers are deterministic (a function of the request, the model and the response id) and
carry what live responses carry: ``responseId``, ``modelVersion``, ``usageMetadata`` with
``promptTokensDetails`` and ``serviceTier``, and a ``thoughtSignature`` in standard base64 on
the answer part. Markers in the prompt text script the rest, one request at a time:

- ``[[sim:error=CODE]]``: the request fails with that code (an entry with ``error``).
- ``[[sim:missing]]``: no entry at all (handled by the simulator).
- ``[[sim:fenced]]``: JSON in a code fence with prose around it and a trailing comma.
- ``[[sim:thought]]``: a ``thought: true`` part first, and ``thoughtsTokenCount``.
- ``[[sim:finish=REASON]]``: the live shape for that finish reason: a blocking reason
  (SAFETY, PROHIBITED_CONTENT, RECITATION, ...) gives ``content: {}`` and no text,
  ``MAX_TOKENS`` gives content with only a role; any other reason gives text.
- ``[[sim:finish_text=REASON]]``: the normal text answer, with that finish reason.
- ``[[sim:finish_message=TEXT]]``: ``finishMessage`` on the candidate.
- ``[[sim:blocked=REASON]]``: the prompt is blocked: no candidates, ``promptFeedback``
  with that ``blockReason`` (PROHIBITED_CONTENT when empty), usage with prompt tokens only.
- ``[[sim:cached=N]]``, ``[[sim:tool_tokens=N]]``: ``cachedContentTokenCount`` (part of
  the prompt tokens) and ``toolUsePromptTokenCount`` (added to the total).
- ``[[sim:image]]``: an extra ``inlineData`` part (image/png, standard base64).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from typing import Any

from .wire import status_name

JSON = dict[str, Any]

MARKER = re.compile(r"\[\[sim:([a-z_]+)(?:=([^\]]*))?\]\]")

NO_TEXT_FINISH = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "LANGUAGE",
        "OTHER",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "MALFORMED_FUNCTION_CALL",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "NO_IMAGE",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
    }
)
"""Finish reasons for which the API withholds the answer: the candidate has ``content: {}``."""

_IMAGE_NOT_SHOWN = (
    "Unable to show the generated image. The model could not generate the image based on "
    "the prompt provided. You will not be charged for blocked images. Try rephrasing the prompt."
)
FINISH_MESSAGES = {
    "MALFORMED_FUNCTION_CALL": "Malformed function call: call:lookup{query:}",
    "UNEXPECTED_TOOL_CALL": "Unexpected tool call: the request declared no tools.",
    "IMAGE_SAFETY": _IMAGE_NOT_SHOWN,
    "IMAGE_PROHIBITED_CONTENT": _IMAGE_NOT_SHOWN,
    "IMAGE_OTHER": _IMAGE_NOT_SHOWN,
    "NO_IMAGE": _IMAGE_NOT_SHOWN,
}
"""The reasons for which the API sends a ``finishMessage`` unasked."""

_SAFETY_RATINGS: list[JSON] = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "LOW", "blocked": True},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]
_STANDARD_ONLY_PREFIX = base64.b64decode("Eqoe++++////")
"""Bytes whose standard base64 holds ``+`` and ``/``: a URL-safe re-encoding shows at once."""
_PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00"  # 9 bytes: keeps the prefix above on a 3-byte boundary


def pick(obj: Any, camel: str) -> Any:
    """Read a field in either casing: the real server accepts camelCase and snake_case."""
    if not isinstance(obj, dict):
        return None
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def texts(contents: Any) -> list[str]:
    """All text parts of a Content list (or a bare string / single Content)."""
    if isinstance(contents, str):
        return [contents]
    if isinstance(contents, dict):
        contents = [contents]
    out: list[str] = []
    for content in contents if isinstance(contents, list) else []:
        for part in pick(content, "parts") or []:
            text = pick(part, "text")
            if isinstance(text, str):
                out.append(text)
    return out


def prompt_text(request: JSON) -> str:
    """The request's prompt: its contents' text parts, one per line."""
    return "\n".join(texts(pick(request, "contents")))


def estimate_tokens(request: JSON) -> int:
    """The enqueued-token estimate of one request: characters of its text / 4, rounded up.

    Counts the text parts of ``contents`` and ``systemInstruction``; at least 1 per request.
    """
    chars = sum(len(t) for t in texts(pick(request, "contents")))
    chars += sum(len(t) for t in texts(pick(request, "systemInstruction")))
    return max(1, math.ceil(chars / 4))


def request_error(code: int, message: str) -> JSON:
    """A per-request google.rpc.Status."""
    return {"code": code, "message": message, "status": status_name(code)}


def standard_base64(seed: str, size: int = 48) -> str:
    """Deterministic standard base64 that contains ``+`` and ``/``."""
    digest = hashlib.sha256(seed.encode()).digest()
    return base64.b64encode(_STANDARD_ONLY_PREFIX + (digest * 2)[:size]).decode()


def image_base64(seed: str) -> str:
    """A small fake PNG in standard base64 (with ``+`` and ``/`` in it)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return base64.b64encode(_PNG_HEADER + _STANDARD_ONLY_PREFIX + digest).decode()


def _word_count(text: str) -> int:
    return len(text.split())


def _count(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _answer_text(prompt: str, prompt_tokens: int, markers: dict[str, str], mime: str) -> str:
    payload = {"echo": prompt, "words": prompt_tokens}
    if "fenced" in markers:
        body = json.dumps(payload, separators=(",", ":"))[:-1] + ",}"
        return f"Here you go:\n```json\n{body}\n```\nLet me know if you need more."
    if mime.startswith("application/json"):
        return json.dumps(payload, separators=(",", ":"))
    return f"Simulated answer: {prompt}"


def simulate_response(request: JSON, model: str, response_id: str) -> JSON:
    """The deterministic ``{"response": GenerateContentResponse}`` (or ``{"error": ...}``).

    The markers in the module docstring script it; ``[[sim:missing]]`` is the caller's.
    """
    prompt = prompt_text(request)
    markers = {m.group(1): m.group(2) or "" for m in MARKER.finditer(prompt)}
    if "error" in markers:
        code = int(markers["error"]) if markers["error"].isdigit() else 500
        return {"error": request_error(code, "Simulated error requested by the prompt.")}
    system_words = _word_count(" ".join(texts(pick(request, "systemInstruction"))))
    prompt_tokens = _word_count(prompt) + system_words
    usage: JSON = {
        "promptTokenCount": prompt_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    cached = min(_count(markers.get("cached")), prompt_tokens)
    if cached:
        usage["cachedContentTokenCount"] = cached
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    tool_tokens = _count(markers.get("tool_tokens"))
    if tool_tokens:
        usage["toolUsePromptTokenCount"] = tool_tokens
        usage["toolUsePromptTokensDetails"] = [{"modality": "TEXT", "tokenCount": tool_tokens}]
    response: JSON = {}
    output_tokens = thoughts = 0
    if "blocked" in markers:
        response["promptFeedback"] = {"blockReason": markers["blocked"] or "PROHIBITED_CONTENT"}
    else:
        candidate, output_tokens, thoughts = _candidate(
            request, prompt, prompt_tokens, markers, response_id
        )
        response["candidates"] = [candidate]
    if output_tokens:
        usage["candidatesTokenCount"] = output_tokens
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    usage["totalTokenCount"] = prompt_tokens + output_tokens + thoughts + tool_tokens
    usage["serviceTier"] = "standard"
    response["usageMetadata"] = usage
    response["modelVersion"] = f"{model.removeprefix('models/')}-sim-001"
    response["responseId"] = response_id
    return {"response": response}


def _candidate(
    request: JSON, prompt: str, prompt_tokens: int, markers: dict[str, str], response_id: str
) -> tuple[JSON, int, int]:
    """One candidate, its output token count and its thought token count."""
    reason = (markers.get("finish") or markers.get("finish_text") or "STOP").upper()
    thoughts = 1 if "thought" in markers else 0
    candidate: JSON
    if "finish" in markers and reason in NO_TEXT_FINISH:
        candidate = {"content": {}, "finishReason": reason, "index": 0}
        if reason == "SAFETY":
            candidate["safetyRatings"] = [dict(r) for r in _SAFETY_RATINGS]
        output = thoughts = 0
    elif "finish" in markers and reason == "MAX_TOKENS":
        candidate = {"content": {"role": "model"}, "finishReason": reason, "index": 0}
        output = 0
    else:
        config = pick(request, "generationConfig") or {}
        mime = str(pick(config, "responseMimeType") or "").lower()
        text = _answer_text(prompt, prompt_tokens, markers, mime)
        answer: JSON = {"text": text, "thoughtSignature": standard_base64(response_id)}
        parts: list[JSON] = [answer]
        if thoughts:
            parts.insert(0, {"text": "thinking...", "thought": True})
        if "image" in markers:
            parts.append({"inlineData": {"mimeType": "image/png", "data": image_base64(prompt)}})
        candidate = {
            "content": {"role": "model", "parts": parts},
            "finishReason": reason,
            "index": 0,
        }
        output = _word_count(text)
    message = markers.get("finish_message")
    if not message and "finish" in markers:
        message = FINISH_MESSAGES.get(reason)
    if message:
        candidate["finishMessage"] = message
    return candidate, output, thoughts
