"""/health as TGIS answers it: 200 with an empty body, 503 with a JSON error; /metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.ports import free_port
from tgis_router import metrics
from tgis_router.http_server import start_http_server


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}{path}", timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_health_is_200_with_an_empty_body_or_503_with_the_reason_as_json():
    verdicts: list[str | None] = [None, "shard ping failed: connection refused"]

    async def health() -> str | None:
        return verdicts.pop(0)

    async def main() -> list[tuple[int, str, bytes]]:
        port = free_port()
        server = start_http_server(port, health, asyncio.get_running_loop())
        try:
            return [await asyncio.to_thread(_get, port, "/health") for _ in range(2)]
        finally:
            server.shutdown()

    healthy, unhealthy = asyncio.run(main())
    assert healthy[0] == 200
    assert healthy[2] == b""
    assert unhealthy[0] == 503
    assert unhealthy[1] == "application/json"
    assert json.loads(unhealthy[2]) == {"error": "shard ping failed: connection refused"}


def test_metrics_and_unknown_paths():
    async def health() -> str | None:
        return None

    async def main() -> list[tuple[int, str, bytes]]:
        port = free_port()
        server = start_http_server(port, health, asyncio.get_running_loop())
        try:
            return [await asyncio.to_thread(_get, port, path) for path in ("/metrics", "/nope")]
        finally:
            server.shutdown()

    scraped, unknown = asyncio.run(main())
    assert scraped[0] == 200
    assert b"tgi_request_count" in scraped[2]
    assert unknown[0] == 404


def test_the_readmes_list_every_series_scraped():
    """The series table in the README and deployment/README.md is the one the router registers
    (regenerate it with tgis_router.metrics.metrics_markdown())."""
    table = metrics.metrics_markdown()
    body = metrics.exposition()[0].decode()
    for row in table.splitlines()[2:]:
        name = row.split("`")[1]
        assert f"# HELP {name} " in body or f"# HELP {name}_total " in body, name
    root = Path(__file__).resolve().parents[3]
    for readme in ("README.md", "deployment/README.md"):
        assert table in (root / readme).read_text(), readme
