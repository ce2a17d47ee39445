"""An in-process fake of the huggingface_hub calls ctxzip makes: ``HfApi(token=...)``, its ``create_repo``,
``create_branch`` and ``upload_folder``, and ``snapshot_download``, with their public signatures (keyword-only where
huggingface_hub's are), return types (``RepoUrl``, ``CommitInfo``, a folder path) and errors
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, a 409 conflict, raised by huggingface_hub's own
``hf_raise_for_status``; ``LocalEntryNotFoundError`` for a snapshot not in the local cache).

Repos are folders under ``root``: ``<root>/<repo_id>/<oid>/`` is the whole repo after commit ``oid``. A repo is
born with an empty first commit on ``main`` (as the Hub's is, less its ``.gitattributes``); ``create_branch`` points
a new branch at a commit (main's newest by default); ``upload_folder`` adds a commit on a branch (``revision``,
default main) that copies that branch's last commit and writes the chosen files over it; a revision is a branch name
or a commit oid. ``create_repo`` of a name without a namespace creates it under ``FakeHub.user``, as the Hub puts
it under the token's user. ``snapshot_download`` records what it served per ``cache_dir``; with
``local_files_only=True`` it serves only that. ``FakeHub.calls`` records each call as ``(name, arguments by
keyword)``.

The ``fake_hub`` fixture (tests/conftest.py) sets ``huggingface_hub.HfApi`` and ``huggingface_hub.snapshot_download``
to ``FakeHub.HfApi`` and ``FakeHub.snapshot_download`` (ctxzip imports both from ``huggingface_hub`` inside its
functions). tests/test_wrapper_hub.py checks every signature here against the installed huggingface_hub.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import typing
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, RepoUrl
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status

ENDPOINT = "https://hub.invalid"  # only ever written into URLs, never contacted


def raise_hub_error(status: int, url: str, error_code: str | None = None) -> typing.NoReturn:
    """Raise what huggingface_hub raises when the Hub answers ``status`` (and ``X-Error-Code``) for ``url``."""
    # The response class huggingface_hub's errors take: httpx's (huggingface_hub 1.x) or httpx2's (2.x).
    response_cls = typing.get_type_hints(HfHubHTTPError.__init__)["response"]
    http = importlib.import_module(response_cls.__module__.partition(".")[0])
    headers = {"X-Error-Code": error_code} if error_code else {}
    hf_raise_for_status(http.Response(status, headers=headers, request=http.Request("GET", url)))
    raise AssertionError(f"hf_raise_for_status accepted a {status} answer")


class FakeHub:
    user = "test-user"  # whose namespace a repo name without one lands in

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commits: dict[str, list[str]] = {}  # repo id -> commit oids of every branch, oldest first
        self.branches: dict[str, dict[str, str]] = {}  # repo id -> branch -> its newest commit oid
        self.private: dict[str, bool | None] = {}  # as created
        self.cached: dict[tuple[str | None, str, str], str] = {}  # (cache_dir, repo id, revision) -> oid served
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def called(self, name: str) -> list[dict[str, Any]]:
        """The arguments of every call of ``name`` ("HfApi", "create_repo", ...), in order."""
        return [arguments for called, arguments in self.calls if called == name]

    def resolve(self, repo_id: str, revision: str | None = None) -> str:
        """The commit oid ``revision`` (a branch, default main, or an oid) names; the Hub's errors for an unknown
        repo or revision."""
        if repo_id not in self.commits:
            raise_hub_error(404, f"{ENDPOINT}/api/models/{repo_id}", "RepoNotFound")
        oid = self.branches[repo_id].get(revision or "main", revision)
        if oid not in self.commits[repo_id]:
            raise_hub_error(404, f"{ENDPOINT}/api/models/{repo_id}/revision/{revision}", "RevisionNotFound")
        return oid

    def snapshot(self, repo_id: str, revision: str | None = None) -> Path:
        """The folder of ``repo_id`` at ``revision`` (see ``resolve``)."""
        return self.root / repo_id / self.resolve(repo_id, revision)

    def files(self, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision``: its path in the repo -> its bytes."""
        folder = self.snapshot(repo_id, revision)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def commit(self, repo_id: str, files: dict[str, Path], branch: str = "main") -> str:
        """A new commit of ``repo_id`` on ``branch``: its last snapshot with ``files`` (path in the repo -> source)
        written over it."""
        oids = self.commits.setdefault(repo_id, [])
        heads = self.branches.setdefault(repo_id, {})
        parent = heads.get(branch)
        digest = hashlib.sha1(f"{parent or repo_id}:{branch}:{len(oids)}".encode())  # unique, as a commit is
        for name, source in sorted(files.items()):
            digest.update(name.encode() + b"\0" + source.read_bytes())
        oid = digest.hexdigest()
        target = self.root / repo_id / oid
        if parent:
            shutil.copytree(self.root / repo_id / parent, target)
        target.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / name)
        oids.append(oid)
        heads[branch] = oid
        return oid

    # ----- the public surface -------------------------------------------------------------------
    def HfApi(self, endpoint: str | None = None, token: str | bool | None = None) -> FakeHfApi:  # noqa: N802
        self.calls.append(("HfApi", {"endpoint": endpoint, "token": token}))
        return FakeHfApi(self)

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                          token: bool | str | None = None, local_files_only: bool = False) -> str:
        self.calls.append(("snapshot_download", {"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir,
                                                 "token": token, "local_files_only": local_files_only}))
        key = (None if cache_dir is None else str(cache_dir), repo_id, revision or "main")
        if local_files_only:
            if key not in self.cached:
                raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                              "revision on the local disk and outgoing traffic has been disabled.")
            return str(self.root / repo_id / self.cached[key])
        self.cached[key] = self.resolve(repo_id, revision)
        return str(self.root / repo_id / self.cached[key])


class FakeHfApi:
    """What ``FakeHub.HfApi(...)`` returns: the ``HfApi`` methods ctxzip calls."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub

    def create_repo(self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                    exist_ok: bool = False) -> RepoUrl:
        self.hub.calls.append(("create_repo", {"repo_id": repo_id, "token": token, "private": private,
                                               "exist_ok": exist_ok}))
        repo_id = repo_id if "/" in repo_id else f"{self.hub.user}/{repo_id}"
        if repo_id in self.hub.commits and not exist_ok:
            raise_hub_error(409, f"{ENDPOINT}/api/repos/create")
        if repo_id not in self.hub.commits:
            self.hub.private[repo_id] = private
            self.hub.commit(repo_id, {})
        return RepoUrl(f"{ENDPOINT}/{repo_id}", endpoint=ENDPOINT)

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None, token: bool | str | None = None,
                      exist_ok: bool = False) -> None:
        self.hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, "revision": revision,
                                                 "token": token, "exist_ok": exist_ok}))
        oid = self.hub.resolve(repo_id, revision)
        if branch in self.hub.branches[repo_id]:
            if not exist_ok:
                raise_hub_error(409, f"{ENDPOINT}/api/models/{repo_id}/branch/{branch}")
            return
        self.hub.branches[repo_id][branch] = oid

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      token: str | bool | None = None, revision: str | None = None,
                      allow_patterns: list[str] | str | None = None,
                      ignore_patterns: list[str] | str | None = None) -> CommitInfo:
        self.hub.calls.append(("upload_folder", {
            "repo_id": repo_id, "folder_path": folder_path, "commit_message": commit_message, "token": token,
            "revision": revision, "allow_patterns": allow_patterns, "ignore_patterns": ignore_patterns}))
        branch = revision or "main"
        self.hub.snapshot(repo_id)  # RepositoryNotFoundError for a repo never created
        if branch not in self.hub.branches[repo_id]:  # the Hub commits to a branch only
            raise_hub_error(404, f"{ENDPOINT}/api/models/{repo_id}/commit/{branch}", "RevisionNotFound")
        folder = Path(folder_path)
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        chosen = filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        oid = self.hub.commit(repo_id, {name: folder / name for name in chosen}, branch)
        message = commit_message or "Upload folder using huggingface_hub"
        return CommitInfo(commit_url=f"{ENDPOINT}/{repo_id}/commit/{oid}", commit_message=message,
                          commit_description="", oid=oid, _endpoint=ENDPOINT)
