"""A local stand-in for the Hugging Face hub that speaks its protocol as huggingface_hub expects
it: the repository's listing (``/api/models/REPO[/revision/REV]`` with its siblings, their size
and LFS sha256), ``HEAD /REPO/resolve/REV/FILE`` answered with a 302 to a CDN on another host
name (localhost: huggingface_hub sends the token only to the hub's own host) carrying
``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``ETag``, and the
CDN's GET with ``Range``. It records every request, and can cut a body short (the connection
closed mid-file), hold it (to cancel a pull or kill the daemon mid-download), or serve bytes
other than the sha256 it advertises.

Imported by tests/test_pull.py; run as a script (``fake_hub.py PORT OWNER/REPO/FILE=PATH...``)
inside the systemd test's namespace, where the daemon under its unit pulls from it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    """The hub's API, its resolve endpoint and its CDN, on one port: the hub as 127.0.0.1,
    the CDN as localhost (another host to huggingface_hub: the token is not sent there)."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_at: dict[str, int] = field(default_factory=dict)  # sha256 -> close the connection after so many bytes (once)
    hold_at: dict[str, int] = field(default_factory=dict)  # sha256 -> wait for ``released`` after so many bytes (once)
    corrupt: set[str] = field(default_factory=set)  # sha256s served with a byte flipped
    released: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = files

    def blob(self, sha: str) -> bytes:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        raise KeyError(sha)

    def seen(self, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.path.startswith(prefix)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _record(self) -> None:
            hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._record()
            if self.path.startswith("/api/models/"):
                return self._listing()
            if self.path.startswith("/cdn/"):
                return self._cdn()
            self._json(404, {"error": "not found"})

        def do_HEAD(self) -> None:
            self._record()
            parts = unquote(self.path.split("?")[0]).lstrip("/").split("/", 4)  # OWNER, REPO, resolve, REV, FILE
            if len(parts) != 5 or parts[2] != "resolve":
                return self._json(404, {"error": "not found"})
            files = hub.repos.get(f"{parts[0]}/{parts[1]}")
            if files is None:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            data = files.get(parts[4])
            if data is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            for key, value in {"Location": f"http://localhost:{hub.port}/cdn/{sha}?signed=1", "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha}"',
                               "X-Linked-Size": str(len(data)), "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()

        def _listing(self) -> None:
            path = self.path.split("?")[0][len("/api/models/"):]
            repo = path.split("/revision/")[0]
            files = hub.repos.get(repo)
            if files is None:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            siblings = []
            for name, data in files.items():
                sibling = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                if not name.endswith(".md"):  # the model files are LFS files, as on the hub
                    sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(sibling)
            self._json(200, {"_id": "x", "id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

        def _cdn(self) -> None:
            sha = self.path.split("?")[0][len("/cdn/"):]
            data = bytearray(hub.blob(sha))
            if sha in hub.corrupt:
                data[len(data) // 2] ^= 0xFF
            start = 0
            ranged = self.headers.get("Range")
            if ranged:
                start = int(ranged.split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            cut, hold = hub.cut_at.pop(sha, None), hub.hold_at.pop(sha, None)
            stop = cut if cut is not None else hold
            if stop is not None and stop > start:
                self.wfile.write(data[start:stop])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-body: the client sees the connection end
                    return
                hub.held.set()
                hub.released.wait(120)
                start = stop
            try:
                self.wfile.write(data[start:])
            except OSError:
                pass  # the daemon was killed meanwhile

    return Handler


def start(hub: FakeHub, port: int = 0) -> ThreadingHTTPServer:
    """Serve ``hub`` on 127.0.0.1 (and as localhost, the CDN) from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(hub))
    hub.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":  # fake_hub.py PORT OWNER/REPO/FILE=PATH...
    hub = FakeHub()
    for spec in sys.argv[2:]:
        where, path = spec.split("=", 1)
        owner, repo, file = where.split("/", 2)
        hub.repos.setdefault(f"{owner}/{repo}", {})[file] = Path(path).read_bytes()
    start(hub, int(sys.argv[1]))
    print(f"serving on {hub.endpoint}", flush=True)
    threading.Event().wait()
