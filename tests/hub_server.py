"""A local stand-in for the Hugging Face Hub, serving model directories the way huggingface_hub's client reads them
(repo info, the recursive tree listing, and `resolve` downloads with the commit and ETag headers), so that download
tests never touch the internet. Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class HubRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False  # needs an Authorization header


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)
    url: str = ""

    def add_model_dir(self, repo_id: str, directory: Path, commit: str, branches: tuple[str, ...] = ("main",),
                      gated: bool = False) -> None:
        """Commit `directory`'s files to repo_id as `commit`, pointed at by `branches`."""
        repo = self.repos.setdefault(repo_id, HubRepo(gated=gated))
        repo.commits[commit] = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
                                if p.is_file()}
        repo.branches.update({name: commit for name in branches})

    @staticmethod
    def commit_of(repo: HubRepo, revision: str) -> str | None:
        return repo.branches.get(revision) or (revision if revision in repo.commits else None)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            self._reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                      "Content-Type": "application/json"})

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            if path.startswith("/api/models/"):
                rest = path.removeprefix("/api/models/")
                for marker in ("/revision/", "/tree/"):
                    if marker in rest:
                        repo_id, revision = rest.split(marker, 1)
                        return self._api(repo_id, revision.split("/", 1)[0], marker.strip("/"))
                return self._api(rest, "main", "revision")
            if "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                revision, filename = rest.split("/", 1)
                return self._resolve(repo_id, revision, filename)
            self._error(404, "EntryNotFound")

        def _commit(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
            """(commit sha, its files), or None once the hub's error is answered: an unknown (or private) repo is a
            401, a gated one without a token too, an unknown revision a 404."""
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(401, "RepoNotFound")
            if repo.gated and not self.headers.get("Authorization"):
                return self._error(401, "GatedRepo")
            commit = hub.commit_of(repo, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            return commit, repo.commits[commit]

        def _api(self, repo_id: str, revision: str, kind: str) -> None:
            found = self._commit(repo_id, revision)
            if found is None:
                return
            commit, files = found
            if kind == "revision":
                body = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
            else:
                body = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
            self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            found = self._commit(repo_id, revision)
            if found is None:
                return
            commit, files = found
            data = files.get(filename)
            if data is None:
                return self._error(404, "EntryNotFound")
            self._reply(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                    "Content-Type": "application/octet-stream"})

        do_GET = do_HEAD = _route

    return Handler


def serve(hub: FakeHub) -> tuple[ThreadingHTTPServer, FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hub
