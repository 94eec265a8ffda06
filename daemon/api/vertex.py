"""Vertex AI batch prediction's engine: a Google Cloud project, a service account, and inputs
and predictions in Cloud Storage.

Jobs are `batchPredictionJobs` made and read as REST JSON through the google-genai SDK in
Vertex mode (`sdk.rest`: its credentials, base URL and transport); inputs and predictions go
through `staging.Staging`. Each request line goes to Vertex as `{"request": {...},
"gemini_batchd_key": "k:KEY"}`: Vertex echoes a field beside `request` in its output line (the
prefix keeps a key that looks numeric a string), so answers are matched by key, never by
position or by the re-serialized request, and never through `labels` (billing data).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import msgspec
from google import genai

from .. import logs
from ..config import VertexSettings
from ..errors import BadReply, ConfigError
from ..faults import crash_point
from ..jsonl import (
    STREAM_BUFFER,
    count,
    decode_as,
    dumps,
    dumps_line,
    int_or_none,
    json_type,
    mapping,
    parse_json,
    str_or_none,
)
from . import http, sdk, staging
from .engine import EngineLimits, Progress, RemoteJob, RemoteState

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
"""The OAuth scope Vertex AI and Cloud Storage take."""

KEY_FIELD = "gemini_batchd_key"
"""The field beside `request` that carries a line's key into Vertex's output."""

KEY_PREFIX = "k:"
"""Before every key: Vertex may turn a string that looks numeric into a number."""

MAX_JOB_REQUESTS = 200_000
MAX_JOB_BYTES = 990_000_000
"""Vertex takes 200,000 requests and 1 GB per input file; each line grows by its key field
(about 20 bytes) on the way, hence the margin."""

MAX_NESTING = 15
"""Vertex imports an input file like a BigQuery table: objects nested deeper fail the job."""

FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
"""...and so does a field name BigQuery would not take as a column name (and a list in a list,
or a null in a list)."""

JOB_NAME = re.compile(
    r"projects/[A-Za-z0-9_-]+/locations/[A-Za-z0-9_-]+/batchPredictionJobs/([A-Za-z0-9_-]+)"
)
"""A job's name, as Vertex documents it (the project as a number or an id): never a path."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LABEL_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def request_problem(body: Mapping[str, Any]) -> str | None:
    """Why Vertex would fail a whole job over this request, or None (checked at validation,
    so that one line is refused instead)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_NESTING:
                return f"objects nested {depth} deep: Vertex AI takes at most {MAX_NESTING} levels"
            for name, item in value.items():
                if name not in _GOOD_NAMES and not _good_name(name):
                    return (
                        f"the field name {name!r}: Vertex AI takes only letters, digits and "
                        "underscores (not starting with a digit) in field names"
                    )
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, list) or item is None:
                    what = "a list in a list" if item is not None else "a null in a list"
                    return f"{what}: Vertex AI takes neither"
                stack.append((item, depth))
    return None


_GOOD_NAMES: set[str] = set()
"""Field names found good: a file repeats the same few names on every line."""


def _good_name(name: str) -> bool:
    if FIELD_NAME.fullmatch(name) is None:
        return False
    if len(_GOOD_NAMES) < 10_000:
        _GOOD_NAMES.add(name)
    return True


def _pruned(value: Any) -> Any:
    """`value` without empty objects (Vertex fails a job over one; empty means the default)."""
    if isinstance(value, dict):
        kept = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v != {}}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def vertex_line(raw: bytes) -> bytes:
    """A request-file line `{"key", "request"}` as a line of Vertex's input format."""
    line = parse_json(raw)
    request = line["request"]
    if b"{}" in raw:  # request files are compact JSON: an empty object is always `{}`
        request = _pruned(request)
    return dumps_line({"request": request, KEY_FIELD: KEY_PREFIX + str(line["key"])})


class _Prediction(msgspec.Struct):
    """A prediction line as the usual one is: its key, an empty status, a response (whose
    bytes are kept as they came, not parsed) and the echoed request (skipped)."""

    key: str | None = msgspec.field(default=None, name=KEY_FIELD)
    status: str | None = None
    response: msgspec.Raw | None = None


_PREDICTION = msgspec.json.Decoder(_Prediction)


def answer_line(raw: bytes) -> bytes | None:
    """A prediction line as an answers line (`{"key", "response" | "error"}`); None for a line
    without a key of ours (or no JSON object at all)."""
    usual = decode_as(_PREDICTION, raw)
    if usual is not None and usual.key is not None and not usual.status and usual.response:
        kept = bytes(usual.response)
        if kept[:1] == b"{" and kept[1:].lstrip()[:1] != b"}":  # an object, not empty
            return b'{"key":%s,"response":%s}' % (dumps(_key(usual.key)), kept)
    try:
        obj = parse_json(raw)
    except BadReply:
        return None
    if not isinstance(obj, dict):
        return None
    key = _key(obj.get(KEY_FIELD))
    if key is None:
        return None
    status = obj.get("status")
    response = obj.get("response")
    if status:  # "" on success; else "Bad Request: {...}" or an error object
        return dumps({"key": key, "error": _status_error(status)})
    if isinstance(response, dict) and response:
        return dumps({"key": key, "response": response})
    return dumps({"key": key, "error": {"message": "the prediction holds no response"}})


def _key(value: Any) -> str | None:
    if isinstance(value, str):
        return value.removeprefix(KEY_PREFIX) if value.startswith(KEY_PREFIX) else value
    if isinstance(value, int | float) and not isinstance(value, bool):  # coerced after all
        return str(int(value)) if float(value).is_integer() else str(value)
    return None


def _status_error(status: Any) -> dict[str, Any]:
    """A prediction's `status` as an error object: `Bad Request: {"error": {...}}` (what
    Vertex writes), an error object, or any other text as the message."""
    if isinstance(status, Mapping):
        found: Mapping[str, Any] = mapping(status.get("error")) or status
    else:
        text = str(status)
        found = {}
        start = text.find("{")
        if start >= 0:
            try:
                parsed = parse_json(text[start:])
            except BadReply:
                parsed = None
            found = mapping(mapping(parsed).get("error")) or mapping(parsed)
        if not found:
            return {"message": text}
    error: dict[str, Any] = {"message": str_or_none(found.get("message")) or str(status)}
    code = int_or_none(found.get("code"))
    if code is not None:
        error["code"] = code
    name = str_or_none(found.get("status"))
    if name is not None:
        error["status"] = name
    return error


def parse_job(obj: Any) -> RemoteJob:
    """A `batchPredictionJob` as a RemoteJob; `BadReply` without a name of Vertex's shape."""
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a batch prediction job (a JSON {json_type(obj)})")
    name = str_or_none(obj.get("name"))
    if name is None:
        raise BadReply("the reply names no batch prediction job")
    if JOB_NAME.fullmatch(name) is None:
        raise BadReply(f"the reply names a job of an unknown shape: {name[:120]!r}")
    state, state_name = RemoteState.parse(obj.get("state"))
    error = mapping(obj.get("error"))
    output = str_or_none(mapping(obj.get("outputInfo")).get("gcsOutputDirectory"))
    if output is not None and staging.GS_URI.fullmatch(output) is None:
        raise BadReply(f"the job's output is not a Cloud Storage folder: {output[:120]!r}")
    return RemoteJob(
        name=name,
        state=state,
        state_name=state_name,
        display_name=str_or_none(obj.get("displayName")),
        create_time=str_or_none(obj.get("createTime")),
        error_code=int_or_none(error.get("code")),
        error_message=str_or_none(error.get("message")),
        progress=_progress(obj.get("completionStats")),
        results=output.rstrip("/") + "/" if output else None,
    )


def _progress(stats: Any) -> Progress | None:
    """`completionStats` (int64 counts as strings, some perhaps left out); None while absent."""
    if not isinstance(stats, Mapping):
        return None
    succeeded = count(stats.get("successfulCount"))
    failed = count(stats.get("failedCount"))
    pending = count(stats.get("incompleteCount"))
    return Progress(succeeded + failed + pending, succeeded, failed, pending)


def parse_job_list(obj: Any) -> tuple[list[RemoteJob], str | None]:
    """One page of `batchPredictionJobs.list`: its jobs (unusable entries skipped), next token."""
    if not isinstance(obj, Mapping):
        raise BadReply(f"the reply is not a list of jobs (a JSON {json_type(obj)})")
    jobs: list[RemoteJob] = []
    items = obj.get("batchPredictionJobs")
    for item in items if isinstance(items, list) else []:
        try:
            jobs.append(parse_job(item))
        except BadReply:
            continue
    return jobs, str_or_none(obj.get("nextPageToken"))


def labels_of(display_name: str) -> dict[str, str]:
    """Labels naming the daemon's file, claim and job (`gemini-batchd/NAME/SHA/CLAIM/r1p1a1`):
    shown in billing, and how a job is found again (`find_job`)."""
    parts = display_name.split("/")
    labels = {"gemini-batchd": "file"}
    if len(parts) >= 5:
        labels["batchd-file"] = _label(Path(parts[1]).stem)
        labels["batchd-claim"] = _label(parts[-2])
        labels["batchd-job"] = _label(parts[-1])
    return labels


def _label(text: str) -> str:
    return _LABEL_UNSAFE.sub("-", text.lower())[:63]


def staged_name(prefix: str, display_name: str) -> str:
    """The staging folder of one job (`PREFIX/gemini-batchd/NAME/SHA/CLAIM/r1p1a1`): names
    its file, claim, part and attempt, in characters any tool takes."""
    path = "/".join(_UNSAFE.sub("_", part) or "_" for part in display_name.split("/"))
    return f"{prefix}/{path}" if prefix else path


class VertexEngine(http.RestCalls):
    """The `Engine` of Vertex AI batch prediction."""

    kind: ClassVar[str] = "vertex"
    jobs_path: ClassVar[str] = "batchPredictionJobs"
    limits: ClassVar[EngineLimits] = EngineLimits(
        inline=False,
        max_job_bytes=MAX_JOB_BYTES,
        max_job_requests=MAX_JOB_REQUESTS,
        check=request_problem,
    )

    def __init__(
        self,
        settings: VertexSettings,
        credentials: Any,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        timeout_seconds: float = 120,
        retries: int = 5,
        storage_endpoint: str | None = None,
    ) -> None:
        assert settings.project is not None
        self.settings = settings
        self.timeout = timeout_seconds
        options = http.http_options(
            base_url=base_url,
            api_version=api_version,
            timeout_seconds=timeout_seconds,
            retry_options=http.retry_options(retries, timeout_seconds),
        )
        assert options.httpx_client is not None
        self._own_http = options.httpx_client
        self.client = genai.Client(
            vertexai=True,
            project=settings.project,
            location=settings.location,
            credentials=credentials,
            http_options=options,
        )
        where = f"projects/{settings.project}/locations/{settings.location}"
        self.endpoint = f"{sdk.endpoint(self.client)}/{where}"
        self.account = hashlib.sha256(b"vertex:" + settings.project.encode()).hexdigest()[:12]
        self.staging = staging.Staging(
            settings.bucket,
            credentials,
            project=settings.project,
            endpoint=storage_endpoint,
            timeout_seconds=timeout_seconds,
        )

    @staticmethod
    def is_job_name(name: str) -> bool:
        return JOB_NAME.fullmatch(name) is not None

    def create_job(
        self, model: str, display_name: str, source: Path | str, *, inline: bool
    ) -> RemoteJob:
        """Create a job reading the staged request file `source` (`gs://...`), writing its
        predictions beside it, labelled with the daemon's names."""
        if inline or not str(source).startswith("gs://"):
            raise ValueError("Vertex AI takes no inline jobs: stage the requests first")
        folder = str(source).rsplit("/", 1)[0]
        body = {
            "displayName": display_name,
            "model": _model_path(model),
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [str(source)]}},
            "outputConfig": {
                "predictionsFormat": "jsonl",
                "gcsDestination": {"outputUriPrefix": f"{folder}/predictions/"},
            },
            "labels": labels_of(display_name),
        }
        return parse_job(self._json("post", "batchPredictionJobs", body, once=True))

    def get_job(self, name: str) -> RemoteJob:
        return parse_job(self._json("get", _job_path(name), {}))

    def find_job(self, display_name: str, *, prefix: bool = False) -> RemoteJob | None:
        """Listed by the claim's label (a filter Vertex applies), then matched by display
        name (`RestCalls._find`)."""
        labels = labels_of(display_name)
        query = (
            {"filter": f'labels.batchd-claim="{labels["batchd-claim"]}"'} if len(labels) > 1 else {}
        )
        return self._find(display_name, prefix, query, parse_job_list)

    def cancel_job(self, name: str) -> None:
        self._json("post", f"{_job_path(name)}:cancel", {})

    def check_access(self) -> None:
        """The start-up check: list jobs in the project and location, and write and delete an
        object under the staging folder (each raises what it meets)."""
        self.probe()
        self._deadline(lambda: self.staging.check_access(self.settings.prefix))

    def upload(self, path: Path, display_name: str) -> str:
        """Stage a request file in Vertex's input format; its `gs://` URI."""
        converted = path.with_name(path.name + ".vertex")
        try:
            with (
                path.open("rb", buffering=STREAM_BUFFER) as source,
                converted.open("wb", buffering=STREAM_BUFFER) as target,
            ):
                for raw in source:
                    target.write(vertex_line(raw))
            name = f"{staged_name(self.settings.prefix, display_name)}/input.jsonl"
            size = converted.stat().st_size
            uri = self._deadline(lambda: self.staging.upload(converted, name), size)
            crash_point("vertex_uploaded")
            return uri
        finally:
            converted.unlink(missing_ok=True)

    def find_uploads(self, display_name: str) -> list[str]:
        """None to clean up: an upload in doubt is settled by name and checksum in `upload`."""
        return []

    def download(self, results: str, destination: Path, expected_bytes: int = 0) -> None:
        """Stream every prediction file of the job's output folder (several, any order) into
        answers lines."""

        def call() -> None:
            names = [n for n in self.staging.objects(results) if n.endswith(".jsonl")]
            crash_point("vertex_listed")
            with destination.open("wb", buffering=STREAM_BUFFER) as handle:

                def take(raw: bytes) -> None:
                    line = answer_line(raw)
                    if line is not None:
                        handle.write(line + b"\n")

                for number, name in enumerate(names):
                    if number == len(names) // 2:
                        crash_point("vertex_reading")
                    self.staging.read_lines(name, take)

        self._deadline(call, expected_bytes)

    def delete(self, name: str) -> None:
        """Delete a staged input or a job's predictions; nothing with `vertex.keep_staged`."""
        if not self.settings.keep_staged:
            self._deadline(lambda: self.staging.delete(name))
            crash_point("vertex_deleting")

    def close(self) -> None:
        self.client.close()
        self._own_http.close()
        self.staging.close()


def _model_path(model: str) -> str:
    """A model as Vertex names it: `gemini-2.5-flash` -> `publishers/google/models/...`."""
    if model.startswith(("publishers/", "projects/")):
        return model
    return f"publishers/google/models/{model.removeprefix('models/')}"


def _job_path(name: str) -> str:
    """The path of a job relative to our project and location (the SDK adds those)."""
    match = JOB_NAME.fullmatch(name)
    if match is None:  # a name from an older sidecar: never a path to call
        raise BadReply(f"not a batch prediction job name: {name[:120]!r}")
    return f"batchPredictionJobs/{match.group(1)}"


CREDENTIAL_NAME = "vertex_credentials"
"""File name of a service-account key under `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`)."""


def find_credentials(
    settings: VertexSettings, environ: Mapping[str, str] | None = None
) -> tuple[Any, str]:
    """Google credentials for Vertex AI and Cloud Storage, and where they came from (for
    messages; a credential itself is never printed): the service-account key file
    `vertex.credentials_file`, else the file `$GOOGLE_APPLICATION_CREDENTIALS` names, else the
    key `$CREDENTIALS_DIRECTORY/vertex_credentials` (systemd), else the rest of Application
    Default Credentials (gcloud's, or the metadata server's on Google Cloud). `ConfigError`
    naming the source when none can be used."""
    import google.auth
    from google.auth import exceptions as auth_exceptions

    env = os.environ if environ is None else environ
    keys: list[tuple[Path, str, str]] = []
    if settings.credentials_file is not None:
        path = settings.credentials_file
        keys.append((path, f"vertex.credentials_file {path}", "'vertex.credentials_file'"))
    elif not env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        folder = env.get("CREDENTIALS_DIRECTORY")
        if folder and (Path(folder) / CREDENTIAL_NAME).exists():
            path = Path(folder) / CREDENTIAL_NAME
            source = f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} ({path})"
            keys.append((path, source, source))
    for path, source, name in keys:
        try:
            return _watched(_service_account(path)), source
        except (OSError, ValueError, KeyError, auth_exceptions.GoogleAuthError) as exc:
            raise ConfigError(f"{name}: cannot use {path}: {_one_line(exc)}") from None
    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except auth_exceptions.GoogleAuthError as exc:
        if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
            raise ConfigError(f"$GOOGLE_APPLICATION_CREDENTIALS: {_one_line(exc)}") from None
        raise ConfigError(
            "no Google credentials for backend: vertex: set vertex.credentials_file or "
            "$GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, pass one with "
            f"systemd LoadCredential={CREDENTIAL_NAME}:..., or run where Application Default "
            "Credentials exist; or use --simulate"
        ) from None
    source = (
        "$GOOGLE_APPLICATION_CREDENTIALS"
        if env.get("GOOGLE_APPLICATION_CREDENTIALS")
        else "Application Default Credentials"
    )
    return _watched(credentials), source


def _service_account(path: Path) -> Any:
    """A service-account key file as Google issues it (its `token_uri` is honoured)."""
    from google.oauth2 import service_account

    return service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
        str(path), scopes=[CLOUD_PLATFORM]
    )


def _watched(credentials: Any) -> Any:
    """`credentials`, whose every new access token is registered as a secret first: it is
    never printed, whatever a library logs."""
    refresh = credentials.refresh

    def refresh_and_hide(request: Any) -> None:
        refresh(request)
        logs.add_secret(getattr(credentials, "token", None))

    credentials.refresh = refresh_and_hide
    logs.add_secret(getattr(credentials, "token", None))
    return credentials


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
