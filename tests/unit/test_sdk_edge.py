"""The private names of google-genai and httpx2 the daemon uses, each touched once: an upgrade
that renames one fails here, in CI, and not in production (daemon/api/sdk.py, daemon/api/http.py).
"""

from __future__ import annotations

import inspect
import ssl
from typing import Any

import httpcore2
import httpx2
import pytest
from google import genai
from google.genai import types

from daemon.api import http, sdk
from daemon.api.gemini import GeminiEngine
from daemon.simulator import Simulator


def test_the_sdk_client_keeps_its_http_client_and_options_where_sdk_py_reads_them(
    sim: Simulator,
) -> None:
    options = types.HttpOptions(base_url=sim.base_url, api_version="v1beta")
    client = genai.Client(api_key="k", http_options=options)
    api_client = client._api_client
    assert callable(api_client.request)
    assert list(inspect.signature(api_client.request).parameters)[:4] == [
        "http_method",
        "path",
        "request_dict",
        "http_options",
    ]
    assert api_client._http_options.base_url == sim.base_url
    assert api_client._http_options.api_version == "v1beta"
    assert sdk.endpoint(client) == f"{sim.base_url}/v1beta"
    assert sdk.rest(client, "get", "batches?pageSize=1", {}, once=True) == {}


def test_httpx2_builds_transports_and_pools_where_http_py_wraps_them() -> None:
    for name in ("_init_transport", "_init_proxy_transport"):
        assert callable(getattr(httpx2.Client, name))
    transport = httpx2.HTTPTransport()
    assert isinstance(transport._pool, httpcore2.ConnectionPool)
    assert isinstance(transport._pool._network_backend, httpcore2.NetworkBackend)
    client = http.DeadlineClient(default_seconds=5)
    assert isinstance(client._transport, http._DeadlineTransport)
    client.close()


def test_the_sdk_s_clients_reuse_the_daemon_s_one_ssl_context(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the trust store costs tens of milliseconds of CPU: the SDK would load it for
    its async and websocket clients too, at every client; it is given ours instead."""
    made: list[object] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    monkeypatch.setattr(httpx2, "create_ssl_context", counting)
    http._ssl_context.cache_clear()
    for _ in range(3):
        engine = GeminiEngine("k", base_url=sim.base_url)
        engine.probe()
        engine.close()
    assert len(made) <= 1


def test_the_sdk_streams_a_download_as_the_network_delivers_it(
    sim: Simulator, tmp_path: Any
) -> None:
    """sdk.download passes `chunk_size=None` to the client's download_file (no re-cutting)."""
    params = inspect.signature(genai.Client(api_key="k")._api_client.download_file).parameters
    assert {"path", "destination", "chunk_size"} <= set(params)
    options = types.HttpOptions(base_url=sim.base_url, api_version="v1beta")
    client = genai.Client(api_key="k", http_options=options)
    source = tmp_path / "source.jsonl"
    source.write_bytes(b"".join(b'{"key": "k%d"}\n' % n for n in range(50_000)))
    uploaded = client.files.upload(file=source, config=types.UploadFileConfig(mime_type="jsonl"))
    assert uploaded.name is not None
    with (tmp_path / "copy").open("wb") as handle:
        sdk.download(client, uploaded.name, handle)
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
