"""A local stand-in for the Hugging Face Hub, for tests that push to and pull from "the Hub".

Tests cannot reach huggingface.co (no internet at run time), yet `push_to_hub`, `hf_hub_download`
and `snapshot_download` are part of what ctxzip must get right. `LocalHub` is a small stdlib HTTP
server that speaks the part of the Hub API the real `huggingface_hub` client (2.x, httpx-based)
uses, so the real client code runs end to end against it once `HF_ENDPOINT` points here:

- `GET  /api/whoami-v2`
- `POST /api/repos/create`, `DELETE /api/repos/delete`, `POST /api/validate-yaml`,
  `GET /api/agent-harnesses` (asked for by the client's User-Agent code unless telemetry is off)
- `GET  /api/{type}s/{repo}` and `/revision/{rev}` (model_info / repo_info / repo_exists)
- `GET  /api/{type}s/{repo}/tree/{rev}[/{path}]`, `/refs`, `/commits/{rev}`
- `POST /api/{type}s/{repo}/paths-info/{rev}`, `/preupload/{rev}`, `/commit/{rev}`
- `POST /api/{type}s/{repo}/branch/{name}`, `/tag/{rev}`
- `HEAD`/`GET /[{type}s/]{repo}/resolve/{rev}/{path}` (hf_hub_download / snapshot_download)

Every file is stored as a regular git blob: preupload answers `uploadMode: "regular"` for all
files, so the client sends contents base64-encoded inside the NDJSON commit and never attempts
an LFS or Xet transfer (run the client with `HF_HUB_DISABLE_XET=1`). State lives in memory;
every commit gets a fresh 40-hex sha, each commit keeps a full snapshot of its files, and
branch names resolve to their latest commit. Like the real Hub, a new repo starts with one
commit holding a `.gitattributes` file. Errors carry the `X-Error-Code` header that the client
maps to `RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from re import Match, Pattern, compile
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# URL segment for each repo type, as used by `/api/{type}s/...` and by resolve URLs.
TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

# What the Hub puts in a new repo; kept so file listings look like the real thing.
INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_blob_sha(data: bytes) -> str:
    """Git's object id for a blob: the client compares it with its own to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    # The client's `parse_datetime` expects exactly this shape.
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubError(Exception):
    """An HTTP error answer; `code` becomes the `X-Error-Code` header the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]  # full snapshot: path -> content


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def url_path(self) -> str:
        return URL_PREFIX[self.repo_type] + self.repo_id


def _dirs_of(path: str) -> list[str]:
    """Every parent folder of a file path: "a/b/c.txt" -> ["a", "a/b"]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def tree_oid(files: dict[str, bytes], folder: str) -> str | None:
    """A stable id for a folder's content, or None when nothing lives under it."""
    prefix = folder + "/"
    entries = sorted(f"{p}:{git_blob_sha(d)}" for p, d in files.items() if p.startswith(prefix))
    return hashlib.sha1("\n".join(entries).encode()).hexdigest() if entries else None


class HubStore:
    """Repos, refs and commits, in memory; one lock because the server is threaded."""

    def __init__(self, username: str = "test-user") -> None:
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> tuple[Repo, bool]:
        """Create a repo with its initial commit; return (repo, created) and leave an existing one alone."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return self.repos[(repo_type, repo_id)], False
            repo = Repo(repo_type, repo_id, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            self.add_commit(
                repo, "refs/heads/main", None, {".gitattributes": INITIAL_GITATTRIBUTES}, "initial commit"
            )
            return repo, True

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self.lock:
            self.get_repo(repo_id, repo_type)
            del self.repos[(repo_type, repo_id)]

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch, tag, PR ref or full commit sha -> commit (branch names give the latest commit)."""
        with self.lock:
            for ref in (f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
                if ref in repo.refs:
                    return repo.commits[repo.refs[ref]]
            if revision in repo.commits:
                return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def branch_ref(self, repo: Repo, revision: str) -> str:
        """The full ref a commit to `revision` moves; commits only go onto branches and PR refs."""
        for ref in (f"refs/heads/{revision}", revision):
            if ref in repo.refs and not ref.startswith("refs/tags/"):
                return ref
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes | None],
        message: str = "commit",
        repo_type: str = "model",
        revision: str = "main",
    ) -> str:
        """Commit directly (test seeding): a None content deletes the path. Returns the commit sha."""
        with self.lock:
            repo = self.get_repo(repo_id, repo_type)
            ref = self.branch_ref(repo, revision)
            snapshot = dict(repo.commits[repo.refs[ref]].files)
            for path, data in files.items():
                if data is None:
                    snapshot.pop(path, None)
                else:
                    snapshot[path] = data
            return self.add_commit(repo, ref, repo.refs[ref], snapshot, message).sha

    def add_commit(
        self, repo: Repo, ref: str, parent: str | None, files: dict[str, bytes], title: str, message: str = ""
    ) -> Commit:
        # A counter keeps shas unique even for identical content committed within the same second.
        seed = f"{repo.repo_id}:{parent}:{title}:{time.time_ns()}:{next(self._counter)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        repo.refs[ref] = commit.sha
        return commit

    def last_commit_touching(self, repo: Repo, head: Commit, path: str) -> Commit:
        """Walk back while the parent holds the same file (or folder) content: that is the last change."""

        def state(c: Commit) -> str | None:
            return git_blob_sha(c.files[path]) if path in c.files else tree_oid(c.files, path)

        current, wanted = head, state(head)
        while current.parent is not None and state(repo.commits[current.parent]) == wanted:
            current = repo.commits[current.parent]
        return current


# ---------------------------------------------------------------------------------------------
# Request handling
# ---------------------------------------------------------------------------------------------

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # "namespace/name" (or a legacy single-segment id)
_API = r"^/api/(?P<type>models|datasets|spaces|kernels)/" + _REPO
_RESOLVE = r"^/(?:(?P<type>datasets|spaces|kernels)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
# (methods, path pattern, handler suffix). Revisions arrive URL-quoted as one segment ("refs%2Fpr%2F1").
_ROUTES: list[tuple[set[str], Pattern[str], str]] = [
    ({"GET"}, compile(r"^/api/whoami-v2$"), "whoami"),
    ({"POST"}, compile(r"^/api/repos/create$"), "create_repo"),
    ({"DELETE"}, compile(r"^/api/repos/delete$"), "delete_repo"),
    ({"POST"}, compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ({"GET"}, compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    ({"GET"}, compile(_API + r"(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ({"GET"}, compile(_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ({"GET"}, compile(_API + r"/refs$"), "refs"),
    ({"GET"}, compile(_API + r"/commits/(?P<rev>[^/]+)$"), "commits"),
    ({"POST"}, compile(_API + r"/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ({"POST"}, compile(_API + r"/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ({"POST"}, compile(_API + r"/commit/(?P<rev>[^/]+)$"), "commit"),
    ({"POST"}, compile(_API + r"/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ({"POST"}, compile(_API + r"/tag/(?P<rev>[^/]+)$"), "create_tag"),
    ({"HEAD", "GET"}, compile(_RESOLVE), "resolve"),
]


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(obj: Any, status: int = 200, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def error_reply(err: HubError) -> Reply:
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_reply({"error": err.message}, err.status, headers)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to an `api_*` method; each returns a `Reply` or raises `HubError`."""

    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:  # silent by default: pytest output stays readable
            super().log_message(format, *args)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def base_url(self) -> str:
        # Echo the host the client used, so URLs in answers match its HF_ENDPOINT exactly.
        return f"http://{self.headers.get('Host') or self.server.url.split('://', 1)[1]}"

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        try:
            reply = self._route(method, split.path)
        except HubError as err:
            reply = error_reply(err)
        except Exception as err:  # a server bug must show up in the test, not hang it
            traceback.print_exc(file=sys.stderr)
            reply = error_reply(HubError(500, f"LocalHub internal error: {err!r}"))
        self.server.requests.append(f"{method} {self.path} {reply.status}")
        self._write(method, reply)

    def _route(self, method: str, path: str) -> Reply:
        for methods, pattern, name in _ROUTES:
            match = pattern.match(path)
            if method in methods and match:
                return getattr(self, f"api_{name}")(match)
        raise HubError(404, f"LocalHub does not serve {method} {path}")

    def _write(self, method: str, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if "Content-Length" not in reply.headers:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked_body()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _chunked_body(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk
        self.rfile.readline()  # final CRLF
        return b"".join(chunks)

    def _json_body(self) -> dict:
        body = self._body()
        return json.loads(body) if body else {}

    def _repo(self, match: Match) -> Repo:
        repo_type = TYPE_FROM_PLURAL.get(match["type"] or "", "model")
        return self.store.get_repo(unquote(match["repo"]), repo_type)

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in {"1", "true"}

    # -- account and repos ---------------------------------------------------------------------

    def api_whoami(self, match: Match) -> Reply:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        name = self.store.username
        token = {"displayName": "local-test-token", "role": "write"}
        return json_reply(
            {
                "type": "user",
                "id": "0" * 24,
                "name": name,
                "fullname": name,
                "email": f"{name}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def api_create_repo(self, match: Match) -> Reply:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.store.username}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo, created = self.store.create_repo(repo_id, repo_type, private)
        url = f"{self.base_url}/{repo.url_path()}"
        if not created:  # the client reads "url" from the 409 body too when exist_ok=True
            return json_reply({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        return json_reply({"url": url, "name": repo_id, "id": repo.commits[repo.refs["refs/heads/main"]].sha})

    def api_delete_repo(self, match: Match) -> Reply:
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self.store.username}/{payload['name']}"
        self.store.delete_repo(repo_id, payload.get("type") or "model")
        return Reply(200)

    def api_validate_yaml(self, match: Match) -> Reply:
        self._body()  # metadata is not validated: no YAML parser in the stdlib
        return json_reply({"errors": [], "warnings": []})

    def api_agent_harnesses(self, match: Match) -> Reply:
        # Fetched for the User-Agent unless telemetry is off; an empty registry means "no agent".
        return json_reply({"standardEnvVars": [], "harnesses": {}})

    def api_repo_info(self, match: Match) -> Reply:
        repo = self._repo(match)
        head = self.store.resolve(repo, unquote(match.groupdict().get("rev") or "main"))
        siblings = [
            {"rfilename": p, "size": len(d), "blobId": git_blob_sha(d)} for p, d in sorted(head.files.items())
        ]
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": head.sha,
            "lastModified": head.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return json_reply(info)

    # -- listings ------------------------------------------------------------------------------

    def _entry(self, repo: Repo, head: Commit, path: str, expand: bool) -> dict:
        """One `/tree` or `/paths-info` item, in the shape `RepoFile` / `RepoFolder` parse."""
        if path in head.files:
            data = head.files[path]
            entry = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
        else:
            entry = {"type": "directory", "oid": tree_oid(head.files, path), "size": 0, "path": path}
        if expand:
            last = self.store.last_commit_touching(repo, head, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    def api_tree(self, match: Match) -> Reply:
        repo = self._repo(match)
        head = self.store.resolve(repo, unquote(match["rev"]))
        folder = unquote(match["path"] or "").strip("/")
        if folder and folder not in head.files and tree_oid(head.files, folder) is None:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": head.sha})
        paths = _tree_paths(head.files, folder, recursive=self._flag("recursive"))
        return json_reply([self._entry(repo, head, p, self._flag("expand")) for p in paths])

    def api_paths_info(self, match: Match) -> Reply:
        repo = self._repo(match)
        head = self.store.resolve(repo, unquote(match["rev"]))
        form = _form_or_json(self.headers.get("Content-Type", ""), self._body())
        expand = str(form.get("expand", ["false"])[0]).lower() == "true"
        known = [
            p.strip("/")
            for p in form.get("paths", [])
            if p.strip("/") in head.files or tree_oid(head.files, p.strip("/"))
        ]
        return json_reply([self._entry(repo, head, p, expand) for p in known])

    def api_refs(self, match: Match) -> Reply:
        repo = self._repo(match)
        groups: dict[str, list] = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
        prefixes = {
            "refs/heads/": "branches",
            "refs/convert/": "converts",
            "refs/tags/": "tags",
            "refs/pr/": "pullRequests",
        }
        with self.store.lock:
            for ref, sha in sorted(repo.refs.items()):
                prefix = next(p for p in prefixes if ref.startswith(p))
                groups[prefixes[prefix]].append({"name": ref[len(prefix) :], "ref": ref, "targetCommit": sha})
        return json_reply(groups)

    def api_commits(self, match: Match) -> Reply:
        repo = self._repo(match)
        commit: Commit | None = self.store.resolve(repo, unquote(match["rev"]))
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.store.username}],
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        return json_reply(history)

    # -- writing -------------------------------------------------------------------------------

    def api_preupload(self, match: Match) -> Reply:
        repo = self._repo(match)
        head = self.store.resolve(repo, unquote(match["rev"]))
        files = self._json_body().get("files", [])
        # "regular" for every file: contents then travel base64 in the commit, no LFS/Xet transfer.
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha(head.files[f["path"]]) if f["path"] in head.files else None,
            }
            for f in files
        ]
        return json_reply({"files": answer, "commitOid": head.sha})

    def api_commit(self, match: Match) -> Reply:
        repo = self._repo(match)
        revision = unquote(match["rev"])
        header, operations = _parse_ndjson_commit(self._body())
        with self.store.lock:
            ref, parent, pr_num = self._commit_target(repo, revision, header.get("parentCommit"))
            files = _apply_operations(dict(repo.commits[parent].files), operations)
            commit = self.store.add_commit(
                repo, ref, parent, files, header.get("summary", ""), header.get("description", "")
            )
        answer = {
            "commitUrl": f"{self.base_url}/{repo.url_path()}/commit/{commit.sha}",
            "commitOid": commit.sha,
            "success": True,
            "pullRequestUrl": None,
        }
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{self.base_url}/{repo.url_path()}/discussions/{pr_num}"
        return json_reply(answer)

    def _commit_target(
        self, repo: Repo, revision: str, parent_commit: str | None
    ) -> tuple[str, str, int | None]:
        """(ref to move, parent sha, PR number or None); a PR gets a fresh `refs/pr/N` off the branch."""
        base_ref = self.store.branch_ref(repo, revision)
        head = repo.refs[base_ref]
        if parent_commit and parent_commit != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        if not self._flag("create_pr"):
            return base_ref, head, None
        pr_num = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
        return f"refs/pr/{pr_num}", head, pr_num

    def api_create_branch(self, match: Match) -> Reply:
        repo = self._repo(match)
        branch = unquote(match["rev"])
        start = self.store.resolve(repo, self._json_body().get("startingPoint") or "main")
        with self.store.lock:
            if f"refs/heads/{branch}" in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.refs[f"refs/heads/{branch}"] = start.sha
        return Reply(200)

    def api_create_tag(self, match: Match) -> Reply:
        repo = self._repo(match)
        target = self.store.resolve(repo, unquote(match["rev"]))
        tag = self._json_body()["tag"]
        with self.store.lock:
            if f"refs/tags/{tag}" in repo.refs:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.refs[f"refs/tags/{tag}"] = target.sha
        return Reply(200)

    # -- downloads -----------------------------------------------------------------------------

    def api_resolve(self, match: Match) -> Reply:
        repo = self._repo(match)
        head = self.store.resolve(repo, unquote(match["rev"]))
        path = unquote(match["path"])
        if path not in head.files:
            # X-Repo-Commit lets the client cache the file's absence for this commit, as with the Hub.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": head.sha})
        data = head.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(data)}"',
            "X-Repo-Commit": head.sha,
            "Accept-Ranges": "bytes",
        }
        return _ranged(data, self.headers.get("Range"), headers)


def _tree_paths(files: dict[str, bytes], folder: str, recursive: bool) -> list[str]:
    """Files and folders under `folder`: direct children only unless recursive; folders first."""
    prefix = f"{folder}/" if folder else ""
    under = [p for p in files if p.startswith(prefix)]
    dirs = {d for p in under for d in _dirs_of(p) if d.startswith(prefix)}
    if not recursive:
        depth = prefix.count("/")
        under = [p for p in under if p.count("/") == depth]
        dirs = {d for d in dirs if d.count("/") == depth}
    return sorted(dirs) + sorted(under)


def _form_or_json(content_type: str, body: bytes) -> dict[str, list]:
    # The client posts paths-info as a form (`paths=a&paths=b&expand=false`); accept JSON too.
    if "json" in content_type:
        payload = json.loads(body or b"{}")
        paths = payload.get("paths", [])
        return {
            "paths": paths if isinstance(paths, list) else [paths],
            "expand": [payload.get("expand", False)],
        }
    return parse_qs(body.decode())


def _parse_ndjson_commit(body: bytes) -> tuple[dict, list[dict]]:
    """Split the commit NDJSON into its header value and its list of operation items."""
    header: dict = {}
    operations = []
    for line in body.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if item["key"] == "header":
            header = item["value"]
        else:
            operations.append(item)
    return header, operations


def _apply_operations(files: dict[str, bytes], operations: Iterable[dict]) -> dict[str, bytes]:
    appliers: dict[str, Callable[[dict[str, bytes], dict], None]] = {
        "file": _add_file,
        "deletedFile": _delete_file,
        "deletedFolder": _delete_folder,
        "lfsFile": _reject_lfs,
    }
    for item in operations:
        if item["key"] not in appliers:
            raise HubError(400, f"LocalHub does not support commit operation {item['key']!r}")
        appliers[item["key"]](files, item["value"])
    return files


def _add_file(files: dict[str, bytes], value: dict) -> None:
    content = value["content"]
    files[value["path"]] = (
        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
    )


def _delete_file(files: dict[str, bytes], value: dict) -> None:
    if files.pop(value["path"], None) is None:
        # The client looks for this sentence to add a hint about file vs folder deletions.
        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")


def _delete_folder(files: dict[str, bytes], value: dict) -> None:
    prefix = value["path"].rstrip("/") + "/"
    doomed = [p for p in files if p.startswith(prefix)]
    if not doomed:
        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
    for path in doomed:
        del files[path]


def _reject_lfs(files: dict[str, bytes], value: dict) -> None:
    # Only reachable through copies of LFS files: preupload never hands out "lfs" here.
    raise HubError(422, f"LocalHub stores regular files only; got an LFS pointer for {value['path']}")


def _ranged(data: bytes, range_header: str | None, headers: dict[str, str]) -> Reply:
    """Honour a single `bytes=start-[end]` range: the client sends one to resume a download."""
    if not range_header or not range_header.startswith("bytes=") or "," in range_header:
        return Reply(200, data, headers)
    start_text, _, end_text = range_header[len("bytes=") :].partition("-")
    if not start_text:  # suffix range "bytes=-N": the last N bytes
        start, end = max(len(data) - int(end_text), 0), len(data) - 1
    else:
        start, end = int(start_text), min(int(end_text) if end_text else len(data) - 1, len(data) - 1)
    if start >= len(data) or start > end:
        return Reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
    return Reply(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client connection must not block `stop()`

    def __init__(self, address: tuple[str, int], store: HubStore, verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.store, self.verbose = store, verbose
        self.requests: list[str] = []  # "METHOD /path?query STATUS", in order (list.append is atomic)
        self.url = f"http://{address[0]}:{self.server_address[1]}"


class LocalHub:
    """A Hub-compatible HTTP server on 127.0.0.1 running in a background thread.

    >>> with LocalHub() as hub:
    ...     os.environ["HF_ENDPOINT"] = hub.url  # must happen before huggingface_hub is imported

    `store` holds the repos (seed it directly with `store.create_repo` / `store.commit_files`);
    `requests` lists every request received, e.g. to assert that no LFS endpoint was called.
    """

    def __init__(
        self, port: int = 0, *, host: str = "127.0.0.1", username: str = "test-user", verbose: bool = False
    ) -> None:
        self.host, self.port, self.verbose = host, port, verbose
        self.store = HubStore(username)
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL to use as HF_ENDPOINT; only known once started when port=0."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running: call start() first")
        return self._server.url

    @property
    def requests(self) -> list[str]:
        return self._server.requests if self._server is not None else []

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = _HubHTTPServer((self.host, self.port), self.store, self.verbose)
        self.port = self._server.server_address[1]
        # A short poll interval keeps stop() fast (the default makes shutdown wait up to 0.5 s).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def reset(self) -> None:
        """Forget every repo and logged request (state is shared by a session-scoped fixture)."""
        with self.store.lock:
            self.store.repos.clear()
        self.requests.clear()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
