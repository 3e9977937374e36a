"""A local HTTP server speaking the part of the Hugging Face Hub's API that huggingface_hub's
snapshot_download uses, over model folders on disk, so download-weights runs for real (point
HF_ENDPOINT at ``FakeHub.url``). Every file request is recorded.

- ``GET /api/models/{repo}/revision/{revision}``: the repo's commit and files;
- ``GET /api/models/{repo}/tree/{revision}``: the file listing (recursive, one page);
- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: a file, with the commit, ETag and size headers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """``with FakeHub({"org/name": folder}) as hub``: serves each folder as that repo's main branch."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.downloads: list[str] = []  # "repo/path" of every file body sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path).strip("/")
        parts = path.split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(
                    handler, 404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"}
                )
            root = self.repos[repo]
            files = [str(p.relative_to(root)) for p in self._files(repo)]
            if parts[4] == "revision":
                info = {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return self._send(handler, 200, json.dumps(info).encode(), body)
            if parts[4] == "tree":
                tree = [
                    {"type": "file", "path": f, "size": (root / f).stat().st_size, "oid": _etag(root / f)}
                    for f in files
                ]
                return self._send(handler, 200, json.dumps(tree).encode(), body)
        elif len(parts) > 4 and parts[2] == "resolve":
            repo, file = "/".join(parts[:2]), "/".join(parts[4:])
            target = self.repos.get(repo, Path("/nonexistent")) / file
            if target.is_file():
                if body:
                    self.downloads.append(f"{repo}/{file}")
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(target)}"'}
                return self._send(handler, 200, target.read_bytes(), body, headers)
            return self._send(handler, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
        self._send(handler, 404, b"", body)

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, status: int, data: bytes, body: bool, headers: dict | None = None
    ) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header(
            "Content-Type", "application/json" if data.startswith((b"{", b"[")) else "application/octet-stream"
        )
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
