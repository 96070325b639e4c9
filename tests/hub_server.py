"""A fake Hugging Face Hub on 127.0.0.1, for testing `grpoflow.hub.push_folder` without the network.

It answers the requests huggingface_hub's `HfApi.create_repo` + `HfApi.upload_folder` make for a
folder of small files (checked against huggingface_hub 2.4.0, with and without hf_xet: both paths call create,
validate-yaml, preupload, commit):

    POST /api/repos/create                              create a repo; 409 if it exists
    GET  /api/models/{ns}/{name}[/revision/{rev}]       repo info (create_repo calls it after a 401/403)
    POST /api/models/{ns}/{name}/preupload/{revision}   every file is "regular" (inline base64), never LFS
    POST /api/models/{ns}/{name}/commit/{revision}      NDJSON: a header line, then one line per file
    POST /api/validate-yaml                             model card metadata check (README.md in the commit)
    GET  /api/whoami-v2                                 who the token belongs to (not called by 2.4.0 here)

`make pipeline` runs it as a process (`python tests/hub_server.py --port N --token T --dir D`) and
pushes the export there; pushed files are written under D/<repo>/.

Anything else is answered 404 and recorded in `FakeHub.unknown`, so a test can show what a newer
client started asking for.

What it does NOT cover, so tests must not rely on it:
- LFS and Xet transfer, which the real Hub uses for large files and for any file its .gitattributes
  marks as LFS (the default one marks *.safetensors and *.gguf, whatever their size). Here every file
  is "regular" (inline base64) and a commit with an `lfsFile` line is refused with 400, so tests keep
  files small (a few KB), and a .safetensors file takes the regular path here but not on the real Hub.
- Auth scopes (fine-grained tokens, org permissions): a token is either the expected one or refused.
- Rate limits and the Hub's real error bodies: faults are injected by the test (`FakeHub.fail`).
- No-op detection: preupload returns no `oid`, so the client re-sends files that did not change.
- Model card validation: validate-yaml accepts any README.md metadata.
- Branches, PRs, deletions, copies, private-repo visibility rules.

Deliberately leaky: a 401 body quotes the Authorization header it got, as a badly behaved proxy might,
so a test can prove the token is scrubbed from every message built from a client exception.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # (method, regex, endpoint name used by `FakeHub.fail`)
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
]


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries, oldest first


@dataclass
class _Fault:
    status: int | None  # None: drop the connection without an answer
    times: int | None  # None: forever


class FakeHub:
    """State of the fake Hub. Tests read `repos`, `calls`, `unknown`; they inject faults with `fail`."""

    def __init__(self, token: str, store: Path | None = None, port: int = 0):
        self.token = token  # the only token accepted
        self.store = store  # when set, each commit's files are also written under store/<repo>/
        self.port = port
        self.repos: dict[str, Repo] = {}
        self.calls: list[tuple[str, str]] = []  # (method, endpoint name or raw path), in arrival order
        self.unknown: list[tuple[str, str]] = []
        self.create_payloads: list[dict] = []
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def fail(self, endpoint: str, status: int | None, times: int | None = 1) -> None:
        """Make the next `times` requests to `endpoint` ("create", "preupload", "commit", ...) fail with
        `status`; `status=None` drops the connection after reading part of the body; `times=None` is forever."""
        self._faults[endpoint] = _Fault(status, times)

    def count(self, endpoint: str) -> int:
        return sum(1 for _, name in self.calls if name == endpoint)

    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _take_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get(endpoint)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[endpoint]
            return fault


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a dropped connection stays local

        def log_message(self, *args):  # keep pytest output clean; `hub.calls` is the log
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if route_method == method and match:
                    break
            else:
                hub.calls.append((method, path))
                hub.unknown.append((method, path))
                return self._reply(404, {"error": f"fake hub: no route for {method} {path}"})
            hub.calls.append((method, name))

            fault = hub._take_fault(name)
            if fault is not None and fault.status is None:
                self.rfile.read(min(16, int(self.headers.get("Content-Length") or 0)))
                self.connection.shutdown(2)  # mid-request: the client sees the server disconnect
                self.close_connection = True
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if fault is not None:
                return self._reply(fault.status, {"error": f"fake hub: injected {fault.status}"})

            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {hub.token}":
                return self._reply(401, {"error": f"Invalid credentials in Authorization header: {auth!r}"})

            handler = getattr(self, f"_{name}")
            handler(match, body)

        def _create(self, match, body: bytes) -> None:
            payload = json.loads(body)
            hub.create_payloads.append(payload)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": url})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._reply(200, {"url": url, "name": repo_id})

        def _repo_info(self, match, body: bytes) -> None:
            repo = hub.repos.get(match["repo"])
            if repo is None:
                return self._reply(404, {"error": "Repository not found"})
            siblings = [{"rfilename": path} for path in sorted(repo.files)]
            self._reply(200, {"id": match["repo"], "private": repo.private, "siblings": siblings})

        def _preupload(self, match, body: bytes) -> None:
            if match["repo"] not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self._reply(200, {"files": modes})

        def _commit(self, match, body: bytes) -> None:
            repo = hub.repos.get(match["repo"])
            if repo is None:
                return self._reply(404, {"error": "Repository not found"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return self._reply(400, {"error": "fake hub: commit must start with a header line"})
            added = {}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    return self._reply(400, {"error": f"fake hub: unsupported commit line {line['key']!r}"})
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo.files.update(added)  # all or nothing, like a git commit
            if hub.store is not None:
                for path, data in added.items():
                    target = hub.store / match["repo"] / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
            repo.commits.append(lines[0]["value"]["summary"])
            oid = hashlib.sha1(body).hexdigest()
            url = f"{hub.url}/{match['repo']}/commit/{oid}"
            self._reply(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

        def _validate_yaml(self, match, body: bytes) -> None:
            self._reply(200, {"errors": [], "warnings": []})  # the real Hub checks license, tags...

        def _whoami(self, match, body: bytes) -> None:
            self._reply(200, {"type": "user", "name": "fake-user", "orgs": []})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    """Serve a fake Hub until killed: `make pipeline` pushes its export here (files under --dir)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True, help="the only token accepted")
    parser.add_argument("--dir", type=Path, required=True, help="where pushed files are written")
    args = parser.parse_args()
    hub = FakeHub(args.token, store=args.dir, port=args.port).start()
    print(f"fake Hub on {hub.url}, pushed files under {args.dir}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
