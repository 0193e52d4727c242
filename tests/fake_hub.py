"""A test-only Hugging Face hub on 127.0.0.1 (port 0): the dataset endpoints huggingface_hub (HfApi,
HfFileSystem, hf_hub_download) and `datasets` call, served from a local folder, so hub datasets are
tested offline through HF_ENDPOINT exactly as a real endpoint is reached.

Each commit of a repository is a folder, <root>/<org>/<name>/<commit>/<files>; refs (branches and the
parquet conversion's refs/convert/parquet) name commits. Served (as the hub answers them):

    GET  /api/datasets/{repo}[/revision/{rev}]      repo info: sha, siblings
    GET  /api/datasets/{repo}/refs                  branches, converts, tags
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]   listing (?recursive=), one page
    POST /api/datasets/{repo}/paths-info/{rev}      form paths=..., expand=
    HEAD|GET /datasets/{repo}/resolve/{rev}/{path}  ETag, X-Repo-Commit, Content-Length, Range -> 206

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound). Every request is logged (method, path, Range header) in `requests`,
and each Authorization header seen in `authorizations`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

API = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)"
                 r"(?:/(?P<what>revision|refs|tree|paths-info)(?:/(?P<rest>.*))?)?$")
RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def blob_id(data: bytes) -> str:
    """git's blob id, as the hub gives a file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.refs: dict[str, dict[str, str]] = {}  # repo -> ref ("main", "refs/convert/parquet") -> commit
        self.requests: list[tuple[str, str, str | None]] = []  # (method, unquoted path, Range header)
        self.authorizations: set[str] = set()  # the Authorization headers seen (a token comes from the caller's env)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------ repositories

    def commit(self, repo: str, files: dict[str, bytes], ref: str = "main", keep: bool = False) -> str:
        """A new commit of `repo` holding `files` (and, with `keep`, the files `ref` held), which `ref` names now."""
        with self._lock:
            old = self.refs.get(repo, {}).get(ref)
            content = dict(self._files(repo, old)) if keep and old else {}
            content.update(files)
            digest = hashlib.sha1(json.dumps([repo, ref, old, sorted((path, blob_id(data)) for path, data
                                                                    in content.items())]).encode())
            sha = digest.hexdigest()
            folder = self.root / repo / sha
            for path, data in content.items():
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(data)
            folder.mkdir(parents=True, exist_ok=True)
            self.refs.setdefault(repo, {})[ref] = sha
            return sha

    def drop_commit(self, repo: str, sha: str) -> None:
        """The commit is gone from the hub (as when a ref's history is squashed)."""
        shutil.rmtree(self.root / repo / sha)

    def _files(self, repo: str, sha: str) -> dict[str, bytes]:
        folder = self.root / repo / sha
        return {path.relative_to(folder).as_posix(): path.read_bytes()
                for path in sorted(folder.rglob("*")) if path.is_file()}

    def _commit_of(self, repo: str, rev: str) -> str | None:
        refs = self.refs.get(repo, {})
        name = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
        sha = refs.get(name) or (rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None)
        return sha if sha and (self.root / repo / sha).is_dir() else None

    def ranges(self, needle: str) -> list[str | None]:
        """The Range headers of the GETs of files whose path holds `needle`."""
        return [rng for method, path, rng in self.requests if method == "GET" and "/resolve/" in path
                and needle in path]

    # ------------------------------------------------------------ HTTP

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the request log is hub.requests
                pass

            def do_GET(self):
                self._serve("GET")

            def do_HEAD(self):
                self._serve("HEAD")

            def do_POST(self):
                self._serve("POST")

            def _serve(self, method):
                raw = urlsplit(self.path)
                hub.requests.append((method, unquote(raw.path), self.headers.get("Range")))
                if self.headers.get("Authorization"):
                    hub.authorizations.add(self.headers["Authorization"])
                api, resolve = API.match(raw.path), RESOLVE.match(raw.path)
                if resolve:
                    return self._file(method, unquote(resolve["repo"]), unquote(resolve["rev"]),
                                      unquote(resolve["path"]))
                if not api:
                    return self._error(404, "RepoNotFound")
                repo, what, rest = unquote(api["repo"]), api["what"], api["rest"] or ""
                if repo not in hub.refs:
                    return self._error(404, "RepoNotFound")
                if what == "refs":
                    return self._json(self._refs(repo))
                rev, _, path = (rest.partition("/") if what else ("main", "", ""))
                sha = hub._commit_of(repo, unquote(rev) or "main")
                if sha is None:
                    return self._error(404, "RevisionNotFound")
                files = hub._files(repo, sha)
                if what in (None, "revision"):
                    return self._json({"id": repo, "_id": repo, "sha": sha, "private": False, "gated": False,
                                       "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                                       "lastModified": "2026-01-01T00:00:00.000Z",
                                       "siblings": [{"rfilename": name} for name in files]})
                if what == "tree":
                    query = parse_qs(raw.query)
                    recursive = query.get("recursive", ["False"])[0].lower() == "true"
                    return self._json(self._tree(files, unquote(path).strip("/"), recursive))
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                return self._json([entry for asked in form.get("paths", [])
                                   for entry in self._entries(files, asked.strip("/"))])

            def _refs(self, repo):
                def ref(name, full, sha):
                    return {"name": name, "ref": full, "targetCommit": sha}
                refs = hub.refs[repo]
                return {"branches": [ref(name, f"refs/heads/{name}", sha) for name, sha in refs.items()
                                     if not name.startswith("refs/")],
                        "converts": [ref(name.rsplit("/", 1)[1], name, sha) for name, sha in refs.items()
                                     if name.startswith("refs/convert/")],
                        "tags": [], "pullRequests": []}

            def _tree(self, files, folder, recursive):
                prefix = f"{folder}/" if folder else ""
                entries, dirs = [], set()
                for name, data in files.items():
                    if not name.startswith(prefix):
                        continue
                    rest = name[len(prefix):].split("/")
                    for depth in range(1, len(rest)):
                        if depth == 1 or recursive:
                            dirs.add(prefix + "/".join(rest[:depth]))
                    if len(rest) == 1 or recursive:
                        entries.append(_file_entry(name, data))
                if folder and not entries and not dirs:
                    return []
                return sorted([{"type": "directory", "oid": blob_id(d.encode()), "size": 0, "path": d}
                               for d in dirs] + entries, key=lambda e: e["path"])

            def _entries(self, files, asked):
                if asked in files:
                    return [_file_entry(asked, files[asked])]
                if any(name.startswith(asked + "/") for name in files):
                    return [{"type": "directory", "oid": blob_id(asked.encode()), "size": 0, "path": asked}]
                return []

            def _file(self, method, repo, rev, path):
                if repo not in hub.refs:
                    return self._error(404, "RepoNotFound")
                sha = hub._commit_of(repo, rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound")
                data = hub._files(repo, sha).get(path)
                if data is None:
                    return self._error(404, "EntryNotFound", {"X-Repo-Commit": sha})
                headers = {"ETag": f'"{blob_id(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                status, body = 200, data
                asked = RANGE.match(self.headers.get("Range") or "")
                if asked:
                    start = int(asked[1])
                    stop = min(len(data), int(asked[2]) + 1) if asked[2] else len(data)
                    if start >= len(data):
                        return self._error(416, "RangeNotSatisfiable")
                    status, body = 206, data[start:stop]
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                self._send(status, body, headers)

            def _json(self, value):
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _error(self, status, code, extra=None):
                body = json.dumps({"error": code}).encode()
                self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                          **(extra or {})})

            def _send(self, status, body, headers, length=None):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(body)

        return Handler


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": blob_id(data), "size": len(data), "path": path}
