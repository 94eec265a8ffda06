"""Helpers for tests against the Vertex AI simulator: a fake service-account key whose token
endpoint is the simulator's, and a google-genai client in Vertex mode bound to it.

The key is a real RSA key, so google-auth signs a real JWT assertion and trades it for an
access token at ``sim.base_url + "/token"``: the whole service-account flow runs offline.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google import genai
from google.genai import types
from google.oauth2 import service_account

from daemon.simulator import VertexSimulator

PROJECT = "sim-project"
LOCATION = "us-central1"
CLIENT_EMAIL = f"batchd@{PROJECT}.iam.gserviceaccount.com"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


@functools.cache
def _private_key_pem() -> str:
    """One RSA key per test session (making one costs tens of milliseconds)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def service_account_info(token_uri: str, project: str = PROJECT) -> dict[str, str]:
    """The fields of a service-account key file whose token endpoint is `token_uri` (a
    simulator's)."""
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": _private_key_pem(),
        "client_email": CLIENT_EMAIL,
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    }


def write_service_account_key(directory: Path, token_uri: str, project: str = PROJECT) -> Path:
    """Write a fake service-account key file into `directory` (e.g. pytest's `tmp_path`) whose
    token endpoint is `token_uri` (a simulator's)."""
    path = directory / "service-account.json"
    path.write_text(json.dumps(service_account_info(token_uri, project), indent=2))
    return path


def credentials_from_key(path: Path) -> service_account.Credentials:
    """Credentials as the daemon makes them: from the key file, cloud-platform scope."""
    credentials: service_account.Credentials = (
        service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(path), scopes=SCOPES
        )
    )
    return credentials


def vertex_client(
    sim: VertexSimulator,
    credentials: Any,
    *,
    project: str = PROJECT,
    location: str = LOCATION,
    version: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> genai.Client:
    """A google-genai client in Vertex mode whose calls go to the simulator (API version:
    the SDK's default, v1beta1, unless `version` says otherwise)."""
    options = types.HttpOptions(base_url=sim.base_url, api_version=version, extra_body=extra_body)
    return genai.Client(
        vertexai=True,
        project=project,
        location=location,
        credentials=credentials,
        http_options=options,
    )
