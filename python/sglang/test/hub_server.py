"""A local HTTP server that answers the Hugging Face hub requests a model download makes.

Tests point `HF_ENDPOINT` at it so `huggingface_hub` (snapshot_download, hf_hub_download,
HfApi.repo_info / list_repo_tree) downloads real files over real HTTP with no internet. It serves
the routes and headers that library reads (checked against the installed huggingface_hub):

- `GET /api/models/{repo}[/revision/{rev}]`: model info, `{"id", "sha", "siblings"}`;
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the file listing, `{"type", "path", "size",
  "oid"}` per file, plus `"lfs": {"oid", "size", "pointerSize"}` for weight files;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}`: the bytes, with `X-Repo-Commit`, `ETag` and
  `Content-Length` (huggingface_hub refuses a file without the first two);
- errors as the hub sends them: 404 with `X-Error-Code` RepoNotFound, RevisionNotFound or
  EntryNotFound, which huggingface_hub turns into its typed errors.

Each repo has named revisions (branches) pointing at commits; a commit hash is a revision too.
`requests` records every request as `(method, path)` so a test can say what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

# Files the hub stores through LFS (its listing then carries an "lfs" entry and a sha256 ETag).
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class HubRepo:
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit hash
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files


class FakeHub:
    """`with FakeHub() as hub:` serves on a free local port; `hub.endpoint` is its URL."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: Optional[ThreadingHTTPServer] = None

    def add(self, repo_id: str, folder: str | Path, revision: str = "main") -> str:
        """Publish `folder`'s files as a new commit of `repo_id` on branch `revision`."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        digest = hashlib.sha1(repo_id.encode())
        for name, data in files.items():
            digest.update(name.encode() + hashlib.sha256(data).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, HubRepo())
        repo.commits[commit] = files
        repo.branches[revision] = commit
        return commit

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "use FakeHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fetched(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose bytes were requested with GET, in order."""
        prefix = f"/{repo_id}/resolve/"
        return [p.split("/", 1)[1] for m, p in self._resolves(prefix) if m == "GET"]

    def _resolves(self, prefix: str) -> list[tuple[str, str]]:
        return [(m, unquote(p[len(prefix) :])) for m, p in self.requests if p.startswith(prefix)]

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _etag(name: str, data: bytes) -> str:
    # The hub's ETag is the git blob id for plain files and the sha256 for LFS files.
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return _git_blob_id(data)


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the test reads `FakeHub.requests`; stderr stays quiet

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        self.fake.requests.append((self.command, path))
        # Segments are split before unquoting: a revision like "refs/pr/1" arrives as one segment.
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2] + "/" + parts[3], parts[4:], send_body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), send_body)
        else:
            self._error(404, "RepoNotFound", "Repository not found", send_body)

    def _lookup(self, repo_id: str, revision: str, send_body: bool):
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return None
        commit = repo.branches.get(revision, revision)
        if commit not in repo.commits:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return None
        return commit, repo.commits[commit]

    def _api(self, repo_id: str, rest: list[str], send_body: bool) -> None:
        if not rest or rest[0] == "revision":
            found = self._lookup(repo_id, rest[1] if len(rest) > 1 else "main", send_body)
            if found is not None:
                commit, files = found
                siblings = [{"rfilename": name} for name in files]
                self._json({"id": repo_id, "sha": commit, "siblings": siblings}, send_body)
        elif rest[0] == "tree" and len(rest) >= 2:
            found = self._lookup(repo_id, rest[1], send_body)
            if found is not None:
                self._json([self._tree_entry(n, d) for n, d in found[1].items()], send_body)
        else:
            self._error(404, "EntryNotFound", "Unknown API route", send_body)

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entry["lfs"] = lfs
        return entry

    def _resolve(self, repo_id: str, revision: str, name: str, send_body: bool) -> None:
        found = self._lookup(repo_id, revision, send_body)
        if found is None:
            return
        commit, files = found
        if name not in files:
            self._error(404, "EntryNotFound", f"{name} does not exist", send_body, commit)
            return
        data = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_etag(name, data)}"'}
        self._send(200, data, "application/octet-stream", headers, send_body)

    def _json(self, body: object, send_body: bool) -> None:
        self._send(200, json.dumps(body).encode(), "application/json", {}, send_body)

    def _error(
        self, status: int, code: str, message: str, send_body: bool, commit: str = ""
    ) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", headers, send_body)

    def _send(self, status: int, body: bytes, kind: str, headers: dict, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)
