"""`gemini-batchd simulator`: the simulator alone, scripted by flags the way tests script it.

``--vertex`` serves Vertex AI batch prediction instead, with its Cloud Storage emulator.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Simulator
    from .vertex import VertexSimulator


def add_parser(sub: Any) -> None:
    command = sub.add_parser(
        "simulator",
        help="run the Gemini Batch API simulator alone",
        description="Serve the simulator; its base URL is the first line of stdout. The flags "
        "script how it behaves, the way tests script it. With --vertex: Vertex AI batch "
        "prediction and a Cloud Storage emulator, whose address the second line gives as "
        "STORAGE_EMULATOR_HOST=URL.",
    )
    command.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    command.add_argument("--port", type=int, default=0, help="port; 0 (default) picks a free one")
    command.add_argument(
        "--api-key", metavar="KEY", help="accept only this API key (default: any key)"
    )
    command.add_argument(
        "--pending-seconds",
        type=float,
        metavar="SECONDS",
        default=1.0,
        help="how long each job stays pending (default: %(default)s)",
    )
    command.add_argument(
        "--running-seconds",
        type=float,
        metavar="SECONDS",
        default=2.0,
        help="how long each job then runs before it ends (default: %(default)s)",
    )
    command.add_argument(
        "--outcome",
        choices=["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED", "PARTIALLY_SUCCEEDED"],
        default="SUCCEEDED",
        help="how every job ends (default: %(default)s; PARTIALLY_SUCCEEDED with --vertex only)",
    )
    command.add_argument(
        "--fail-keys",
        type=_key_codes,
        default={},
        metavar="K[=CODE],...",
        help=f"requests with these keys fail with CODE (default {_FAIL_CODE}) in every job",
    )
    command.add_argument(
        "--fail-keys-times",
        type=_key_times,
        default={},
        metavar="K[=CODE]:N,...",
        help=f"requests with these keys fail (CODE, default {_FAIL_CODE}) the first N times "
        "they are submitted, then succeed",
    )
    command.add_argument(
        "--missing-keys",
        type=_key_list,
        default=set(),
        metavar="K,...",
        help="requests with these keys get no response entry",
    )
    command.add_argument(
        "--missing-keys-times",
        type=_key_counts,
        default={},
        metavar="K:N,...",
        help="requests with these keys get no response entry the first N times they are submitted",
    )
    command.add_argument(
        "--shuffle", action="store_true", help="return responses in a random order"
    )
    command.add_argument(
        "--extra-fields",
        action="store_true",
        help="add unknown fields to every object of every JSON reply and result line",
    )
    command.add_argument(
        "--no-echo-metadata",
        action="store_true",
        help="leave request metadata (the key) out of inline responses",
    )
    command.add_argument(
        "--errors-as-status",
        action="store_true",
        help='result-file lines carry a request error as "status" instead of "error"',
    )
    command.add_argument(
        "--list-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="a new job shows in the job list only after this long",
    )
    command.add_argument(
        "--expire-after",
        type=float,
        metavar="SECONDS",
        help="a job still pending or running this long becomes EXPIRED",
    )
    command.add_argument(
        "--quota-tokens",
        type=int,
        metavar="N",
        help="enqueued-token quota: estimated tokens (characters / 4) of pending and running jobs",
    )
    command.add_argument(
        "--quota-mode",
        choices=["refuse", "fail"],
        default="refuse",
        help="over the quota, refuse the create with 429 or create a job that fails "
        "(default: %(default)s)",
    )
    command.add_argument(
        "--reject-key-for",
        type=_rejection,
        metavar="SECONDS[:STATUS]",
        help="reject the API key (STATUS 400, 401 or 403; default 400) for SECONDS after start; "
        "with --vertex, 400 refuses token requests (invalid_grant) and 401 or 403 API calls",
    )
    command.add_argument(
        "--seed", type=int, default=0, help="seed of --shuffle's order (default: %(default)s)"
    )
    _add_vertex_arguments(command)
    command.set_defaults(func=cmd_simulator)


def _add_vertex_arguments(command: Any) -> None:
    vertex = command.add_argument_group("Vertex AI (--vertex)")
    vertex.add_argument(
        "--vertex",
        action="store_true",
        help="serve Vertex AI batch prediction and a Cloud Storage emulator instead",
    )
    vertex.add_argument(
        "--project",
        metavar="P",
        help="accept only this project (its id, or --project-number); default: any",
    )
    vertex.add_argument("--location", metavar="L", help="accept only this location; default: any")
    vertex.add_argument(
        "--project-number",
        metavar="N",
        help="the project number in job names (default: a fixed example number)",
    )
    vertex.add_argument(
        "--storage-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the Cloud Storage emulator; 0 (default) picks a free one",
    )
    vertex.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="create this bucket in the Cloud Storage emulator (repeatable)",
    )
    vertex.add_argument(
        "--queued-seconds",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long each job is QUEUED before it is PENDING (default: %(default)s)",
    )
    vertex.add_argument(
        "--cancelling-seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long a cancelled job is CANCELLING (default: %(default)s)",
    )
    vertex.add_argument(
        "--prediction-files",
        type=_positive,
        default=1,
        metavar="N",
        help="spread each job's predictions over N files (default: %(default)s)",
    )
    vertex.add_argument(
        "--predictions-lag",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the prediction files are all there only this long after a job ends; before that "
        "only the first of several (default: %(default)s)",
    )
    vertex.add_argument(
        "--partial-on-errors",
        action="store_true",
        help="a job with a failed request ends PARTIALLY_SUCCEEDED",
    )
    vertex.add_argument(
        "--in-order",
        action="store_true",
        help="write predictions in input order (default: shuffled, as Vertex AI does)",
    )
    vertex.add_argument(
        "--keep-numeric-strings",
        action="store_true",
        help="echo numeric-looking strings as strings (default: coerced to numbers)",
    )
    vertex.add_argument(
        "--strict-tokens",
        action="store_true",
        help="accept only access tokens issued by the simulator's /token",
    )
    vertex.add_argument(
        "--billing-disabled",
        action="store_true",
        help="answer every API call with 403 BILLING_DISABLED",
    )
    vertex.add_argument(
        "--error-details",
        action="store_true",
        help="job errors carry ErrorInfo details",
    )
    vertex.add_argument(
        "--null-completion-stats",
        action="store_true",
        help='"completionStats": null instead of no field while a job has no counts',
    )


_FAIL_CODE = 500
"""The error code of --fail-keys and --fail-keys-times entries that name none."""


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of at least 1")
    return int(value)


_GEMINI_ONLY = {
    "api_key": ("--api-key", None),
    "quota_tokens": ("--quota-tokens", None),
    "quota_mode": ("--quota-mode", "refuse"),
    "no_echo_metadata": ("--no-echo-metadata", False),
    "errors_as_status": ("--errors-as-status", False),
    "shuffle": ("--shuffle", False),
}
"""Flags of the Gemini simulator that mean nothing to Vertex AI: dest -> (flag, default)."""


def _key_list(value: str) -> set[str]:
    return {key for key in (k.strip() for k in value.split(",")) if key}


def _key_code(item: str) -> tuple[str, int]:
    key, _, code = item.partition("=")
    if not key or (code and not code.isdigit()) or (code and not 400 <= int(code) <= 599):
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY or KEY=CODE (400..599)")
    return key, int(code) if code else _FAIL_CODE


def _key_codes(value: str) -> dict[str, int]:
    """``a,b=429`` -> {"a": 500, "b": 429}."""
    return dict(_key_code(item) for item in _key_list(value))


def _key_times(value: str) -> dict[str, tuple[int, int]]:
    """``a:1,b=429:2`` -> {"a": (500, 1), "b": (429, 2)}."""
    out = {}
    for item in _key_list(value):
        head, _, times = item.rpartition(":")
        if not head or not times.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY[=CODE]:N")
        key, code = _key_code(head)
        out[key] = (code, int(times))
    return out


def _key_counts(value: str) -> dict[str, int]:
    """``a:1,b:2`` -> {"a": 1, "b": 2}."""
    out = {}
    for item in _key_list(value):
        key, _, times = item.rpartition(":")
        if not key or not times.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY:N")
        out[key] = int(times)
    return out


def _rejection(value: str) -> tuple[float, int]:
    """``30`` -> (30.0, 400); ``30:403`` -> (30.0, 403)."""
    seconds, _, status = value.partition(":")
    try:
        pair = float(seconds), int(status or 400)
    except ValueError:
        pair = (-1.0, 0)
    if pair[0] < 0 or pair[1] not in (400, 401, 403):
        raise argparse.ArgumentTypeError(f"{value!r}: expected SECONDS[:400|401|403]")
    return pair


def from_args(args: argparse.Namespace) -> Simulator:
    """The simulator that the `simulator` command's flags describe, not yet started.

    With ``--vertex`` a `VertexSimulator` whose (not yet started) `StorageEmulator` holds the
    ``--bucket`` buckets. A flag that does not apply to the mode chosen is a ValueError.
    """
    from .server import Simulator

    if args.vertex:
        return vertex_from_args(args)
    if args.outcome == "PARTIALLY_SUCCEEDED":
        raise ValueError("--outcome PARTIALLY_SUCCEEDED needs --vertex")
    sim = Simulator(
        host=args.host,
        port=args.port,
        pending_seconds=args.pending_seconds,
        running_seconds=args.running_seconds,
        seed=args.seed,
        api_key=args.api_key,
        outcome=args.outcome,
        shuffle_output=args.shuffle,
        fail_keys=args.fail_keys,
        missing_keys=args.missing_keys,
        fail_keys_times=args.fail_keys_times,
        missing_keys_times=args.missing_keys_times,
        list_lag_seconds=args.list_lag,
        expire_after_seconds=args.expire_after,
        enqueued_token_limit=args.quota_tokens,
        quota_mode=args.quota_mode,
        extra_fields=args.extra_fields,
        echo_metadata=not args.no_echo_metadata,
        errors_as_status=args.errors_as_status,
    )
    if args.reject_key_for is not None:
        seconds, status = args.reject_key_for
        sim.reject_key(status, seconds=seconds)
    return sim


def vertex_from_args(args: argparse.Namespace) -> VertexSimulator:
    """The Vertex AI simulator (and its storage emulator) that the flags describe."""
    from .storage import StorageEmulator
    from .vertex import DEFAULT_PROJECT_NUMBER, VertexSimulator

    for dest, (flag, default) in _GEMINI_ONLY.items():
        if getattr(args, dest) != default:
            raise ValueError(f"{flag} does not apply with --vertex")
    storage = StorageEmulator(args.host, args.storage_port, buckets=args.bucket)
    sim = VertexSimulator(
        storage,
        host=args.host,
        port=args.port,
        seed=args.seed,
        project_number=args.project_number or DEFAULT_PROJECT_NUMBER,
        project=args.project,
        location=args.location,
        queued_seconds=args.queued_seconds,
        pending_seconds=args.pending_seconds,
        running_seconds=args.running_seconds,
        cancelling_seconds=args.cancelling_seconds,
        outcome=args.outcome,
        partial_on_errors=args.partial_on_errors,
        expire_after_seconds=args.expire_after,
        shuffle_output=not args.in_order,
        prediction_files=args.prediction_files,
        predictions_lag_seconds=args.predictions_lag,
        coerce_numeric_strings=not args.keep_numeric_strings,
        fail_keys=args.fail_keys,
        missing_keys=args.missing_keys,
        fail_keys_times=args.fail_keys_times,
        missing_keys_times=args.missing_keys_times,
        list_lag_seconds=args.list_lag,
        strict_tokens=args.strict_tokens,
        billing_disabled=args.billing_disabled,
        error_details=args.error_details,
        null_completion_stats=args.null_completion_stats,
        extra_fields=args.extra_fields,
    )
    if args.reject_key_for is not None:
        seconds, status = args.reject_key_for
        sim.reject_key(status, seconds=seconds)
    return sim


def cmd_simulator(args: argparse.Namespace) -> int:
    try:
        sim = from_args(args)
    except ValueError as exc:
        print(f"gemini-batchd: simulator: {exc}", file=sys.stderr)
        return 2
    from .vertex import VertexSimulator

    storage = sim.storage if isinstance(sim, VertexSimulator) else None
    try:
        if storage is not None:
            where = f"{args.host} port {args.storage_port}"
            storage.start()
        where = f"{args.host} port {args.port}"
        sim.start()
    except OSError as exc:
        if storage is not None:
            storage.stop()
        print(
            f"gemini-batchd: simulator: cannot listen on {where}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with sim:
        print(sim.base_url, flush=True)
        if storage is not None:
            print(f"STORAGE_EMULATOR_HOST={storage.base_url}", flush=True)
        stop.wait()
    if storage is not None:
        storage.stop()
    return 0
