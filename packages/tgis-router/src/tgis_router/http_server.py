"""HTTP port: /metrics (Prometheus) and /health (see tgis_router.health)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tgis_router.metrics import exposition

log = logging.getLogger(__name__)

# A safety net: the check's gRPC deadline starts only once its call leaves, which a forward
# pass does after the step the shards are running.
_HEALTH_TIMEOUT_S = 65.0


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug(format, *args)


def start_http_server(
    port: int, health: Callable[[], Awaitable[str | None]], loop: asyncio.AbstractEventLoop
) -> _ThreadingWSGIServer:
    """Serves in a daemon thread; ``health`` (None: healthy, else why not) runs on the router's
    event loop. /health answers 200 with an empty body, or 503 with a JSON error."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body, content_type = exposition()
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/health":
            try:
                reason = asyncio.run_coroutine_threadsafe(health(), loop).result(timeout=_HEALTH_TIMEOUT_S)
            except Exception as e:  # the router's loop is gone or stuck
                reason = f"health check failed: {e!r}"
            if reason is None:
                start_response("200 OK", [("Content-Length", "0")])
                return [b""]
            body = json.dumps({"error": reason}).encode()
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    server = make_server("0.0.0.0", port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
