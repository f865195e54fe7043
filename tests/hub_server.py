"""A loopback Hugging Face Hub for tests: stdlib only, in memory, spoken to by the real `huggingface_hub` client.

It answers the subset of the Hub API that `create_repo`, `upload_folder`, `hf_hub_download`, `snapshot_download`,
`HfApi.model_info` / `list_repo_files` and `from_pretrained("org/name")` use (wire format read from
huggingface_hub 2.4's `hf_api.py`, `_commit_api.py`, `_upload_pipeline.py`, `file_download.py`):

- `GET  /api/whoami-v2`
- `POST /api/repos/create`                                    (409 when the repo exists)
- `POST /api/validate-yaml`                                   (always valid)
- `GET  /api/agent-harnesses`                                 (empty registry; the client asks once per process)
- `GET  /api/{type}s/{ns}/{name}[/revision/{rev}]`             (repo info with `sha` and `siblings`)
- `GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]`          (`?recursive=true|false`)
- `POST /api/{type}s/{ns}/{name}/preupload/{rev}`              (every file `uploadMode: "regular"`)
- `POST /api/{type}s/{ns}/{name}/commit/{rev}`                 (NDJSON; inline base64 files and deletions)
- `POST /api/{type}s/{ns}/{name}/branch/{branch}`
- `POST /api/{type}s/{ns}/{name}/discussions`, `GET .../discussions/{num}`   (draft pull requests)
- `HEAD|GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}`       (`ETag` = git blob sha1, `X-Repo-Commit`)

Xet and LFS stay out of the way: preupload answers "regular" for every file, so the client inlines content in
the commit, and no response carries `X-Xet-Hash` / a `xet-auth` link or a tree entry with `xetHash`/`lfs`, which is
what makes the client take its Xet download path. Anything else is answered 404 and recorded in `unhandled`.

Knobs for tests: `require_token` (every request must carry `Authorization: Bearer <token>`, else 401),
`fail_commits` (the commit endpoint answers 500). Records: `requests` (every "METHOD /path"), `commits` (every
commit made through the commit endpoint, with the paths it added and deleted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "tester"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which the client compares with the preupload `oid` to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    """One commit received on the commit endpoint."""

    oid: str
    repo_id: str
    repo_type: str
    revision: str
    message: str
    added: list[str]
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str = field(default_factory=_now)
    refs: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    pull_requests: list[dict] = field(default_factory=list)

    def add_commit(self, ref: str, files: dict[str, bytes], message: str) -> str:
        parent = self.refs.get(ref, "")
        digest = hashlib.sha1(f"{parent}\n{message}\n{_now()}\n{len(self.snapshots)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}".encode())
        oid = digest.hexdigest()
        self.snapshots[oid] = files
        self.refs[ref] = oid
        return oid

    def resolve(self, revision: str) -> str | None:
        """The commit oid for a branch, PR ref or commit oid; None when unknown."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.snapshots else None


class HubError(Exception):
    """An HTTP error answer, with the `X-Error-Code` the client maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.body = {"error": message, **body}


class HubServer:
    """An in-memory Hub on `127.0.0.1:<free port>`, served from a background thread.

    Example:

    ```python
    with HubServer() as hub:
        HfApi(endpoint=hub.url).create_repo("org/name")
        assert hub.repo_files("org/name") == {".gitattributes": ...}
    ```
    """

    def __init__(self, require_token: str | None = None) -> None:
        self.require_token = require_token
        self.fail_commits = False
        self.failed_commit_attempts = 0
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.commits: list[Commit] = []
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision, for assertions."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.snapshots[repo.resolve(revision)])

    # ------------------------------------------------------------------ API handlers (called under the lock)

    def whoami(self) -> dict:
        return {
            "type": "user",
            "name": USER,
            "fullname": "Test User",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def create_repo(self, body: dict) -> dict:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = self.repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.repos:
            # `create_repo(exist_ok=True)` reads the repo url from this 409 answer
            raise HubError(409, f"You already created this {repo_type} repo: {url}", url=url)
        repo = Repo(repo_id, repo_type, private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.add_commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id}

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.url}/{prefix}{repo_id}"

    def repo_info(self, repo: Repo, revision: str) -> dict:
        oid = self._resolve(repo, revision)
        files = repo.snapshots[oid]
        return {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo.created_at,
            "lastModified": _now(),
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
                for path, data in sorted(files.items())
            ],
        }

    def tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        files = repo.snapshots[self._resolve(repo, revision)]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to the file
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        sub,
                        {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0, "path": sub},
                    )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if prefix and not entries:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return list(entries.values())

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        files = repo.snapshots[self._resolve(repo, revision)]
        return {
            "files": [
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(files[item["path"]]) if item["path"] in files else None,
                }
                for item in body["files"]
            ]
        }

    def commit(self, repo: Repo, revision: str, lines: list[dict], create_pr: bool) -> dict:
        if self.fail_commits:
            self.failed_commit_attempts += 1
            raise HubError(500, "Internal Error: commit failed (simulated by the test server)")
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        pr_url = None
        if create_pr:
            revision, pr_url = self.open_pull_request(repo, header.get("summary", ""), base=revision)
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.refs[revision]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}")
        files = dict(repo.snapshots[head])
        added, deleted = [], []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                deleted += [path for path in files if path.startswith(folder)]
                files = {path: data for path, data in files.items() if not path.startswith(folder)}
            elif key != "header":
                raise HubError(400, f"This test server only accepts inline files, got a {key!r} line")
        message = header.get("summary", "")
        oid = repo.add_commit(revision, files, message)
        self.commits.append(Commit(oid, repo.repo_id, repo.repo_type, revision, message, added, deleted))
        return {
            "commitUrl": f"{self.repo_url(repo.repo_type, repo.repo_id)}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": pr_url,
        }

    def create_branch(self, repo: Repo, branch: str, body: dict) -> dict:
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.refs[branch] = self._resolve(repo, body.get("startingPoint") or "main")
        return {}

    def open_pull_request(self, repo: Repo, title: str, base: str = "main") -> tuple[str, str]:
        num = len(repo.pull_requests) + 1
        ref = f"refs/pr/{num}"
        repo.refs[ref] = self._resolve(repo, base)
        repo.pull_requests.append({"num": num, "title": title, "base": f"refs/heads/{base}", "createdAt": _now()})
        return ref, f"{self.repo_url(repo.repo_type, repo.repo_id)}/discussions/{num}"

    def pull_request_details(self, repo: Repo, num: int) -> dict:
        if not 0 < num <= len(repo.pull_requests):
            raise HubError(404, f"Discussion {num} not found")
        pr = repo.pull_requests[num - 1]
        return {
            "num": num,
            "title": pr["title"],
            "author": {"name": USER},
            "createdAt": pr["createdAt"],
            "status": "draft",
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "isPullRequest": True,
            "changes": {"base": pr["base"]},
            "filesWithConflicts": [],
            "events": [],
        }

    def file(self, repo: Repo, revision: str, path: str) -> tuple[str, bytes]:
        oid = self._resolve(repo, revision)
        if path not in repo.snapshots[oid]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=oid)
        return oid, repo.snapshots[oid][path]

    def find_repo(self, repo_type: str, repo_id: str) -> Repo:
        if (repo_type, repo_id) not in self.repos:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[(repo_type, repo_id)]

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to `HubServer` and writes the answer; errors become JSON bodies like the Hub's."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections are closed after this many seconds

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _serve(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        body = self._read_body()  # always drain the body, so the keep-alive connection stays in sync
        split = urlsplit(self.path)
        segments = [unquote(part) for part in split.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        with hub.lock:
            hub.requests.append(f"{self.command} {split.path}")
        try:
            self._check_token(hub)
            with hub.lock:
                answer = self._route(hub, segments, query, body)
        except HubError as error:
            self._send_error(error)
            return
        if answer is None:
            with hub.lock:
                hub.unhandled.append(f"{self.command} {self.path}")
            self._send_error(HubError(404, f"Not implemented by the test server: {self.command} {split.path}"))
        elif isinstance(answer, tuple):
            self._send_file(*answer)
        else:
            self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def _route(self, hub: HubServer, segments: list[str], query: dict, body: bytes):
        method = self.command
        if segments == ["api", "whoami-v2"] and method == "GET":
            return hub.whoami()
        if segments == ["api", "repos", "create"] and method == "POST":
            return hub.create_repo(json.loads(body))
        if segments == ["api", "validate-yaml"] and method == "POST":
            return {"errors": [], "warnings": []}
        if segments == ["api", "agent-harnesses"] and method == "GET":  # the client's AI-agent detection registry
            return {"standardEnvVars": [], "harnesses": {}}
        if len(segments) >= 4 and segments[0] == "api" and segments[1] in REPO_TYPES:
            repo = hub.find_repo(REPO_TYPES[segments[1]], f"{segments[2]}/{segments[3]}")
            return self._route_repo_api(hub, repo, segments[4:], query, body)
        type_prefix = segments[0] if segments and segments[0] in ("datasets", "spaces") else None
        rest = segments[1:] if type_prefix else segments
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub.find_repo(REPO_TYPES.get(type_prefix, "model"), f"{rest[0]}/{rest[1]}")
            oid, data = hub.file(repo, rest[3], "/".join(rest[4:]))
            return oid, data
        return None

    def _route_repo_api(self, hub: HubServer, repo: Repo, action: list[str], query: dict, body: bytes):
        method = self.command
        if method == "GET" and action == []:
            return hub.repo_info(repo, "main")
        if method == "GET" and len(action) == 2 and action[0] == "revision":
            return hub.repo_info(repo, action[1])
        if method == "GET" and len(action) >= 2 and action[0] == "tree":
            return hub.tree(repo, action[1], "/".join(action[2:]), query.get("recursive", "").lower() == "true")
        if method == "POST" and len(action) == 2 and action[0] == "preupload":
            return hub.preupload(repo, action[1], json.loads(body))
        if method == "POST" and len(action) == 2 and action[0] == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            return hub.commit(repo, action[1], lines, create_pr=query.get("create_pr") == "1")
        if method == "POST" and len(action) == 2 and action[0] == "branch":
            return hub.create_branch(repo, action[1], json.loads(body or b"{}"))
        if method == "POST" and action == ["discussions"]:
            payload = json.loads(body)
            if not payload.get("pullRequest"):
                return None
            return {"num": int(hub.open_pull_request(repo, payload.get("title", ""))[0].rsplit("/", 1)[1])}
        if method == "GET" and len(action) == 2 and action[0] == "discussions" and action[1].isdigit():
            return hub.pull_request_details(repo, int(action[1]))
        return None

    def _check_token(self, hub: HubServer) -> None:
        if hub.require_token is None:
            return
        authorization = self.headers.get("Authorization")
        if authorization is None:
            raise HubError(401, "Invalid username or password.")
        if authorization != f"Bearer {hub.require_token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send_file(self, commit: str, data: bytes) -> None:
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
        }
        status, start, end = 200, 0, len(data)
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and data:
            first, _, last = range_header[len("bytes=") :].partition("-")
            start, end = int(first or 0), min(int(last) + 1 if last else len(data), len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(status, data[start:end], headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send(error.status, json.dumps(error.body).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def point_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Send `huggingface_hub` and `transformers` to `endpoint`, online, with a fresh cache and no token.

    `huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME`... into `huggingface_hub.constants` at import
    time, its module-level `HfApi` (behind `create_repo`, `upload_folder`...) keeps the endpoint it was built with,
    and `transformers.utils.hub` caches a shared `HfApi`: all are patched here, and restored by `monkeypatch`.
    """
    import huggingface_hub.hf_api
    import transformers.utils.hub
    from huggingface_hub import constants

    hub_cache = hf_home / "hub"
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    patched_constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
    }
    for name, value in patched_constants.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)


def skip_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `huggingface_hub`'s HTTP retries (5 retries, 1 s to 8 s apart, on 5xx answers) immediate."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running `HubServer` that `huggingface_hub` and `transformers` talk to for the duration of the test.

    Sets `HF_ENDPOINT` (and the constants that cached it) to the server, turns offline mode off, uses a fresh
    `HF_HOME` (cache and token file) and no token; everything is restored afterwards.
    """
    from huggingface_hub.utils._http import close_session

    server = HubServer().start()
    point_clients_at(monkeypatch, server.url, tmp_path_factory.mktemp("hf_home"))
    try:
        yield server
    finally:
        close_session()  # drop pooled keep-alive connections to this server
        server.stop()
