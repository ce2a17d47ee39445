"""The real huggingface_hub client round-trips through LocalHub (see tests/hub_server.py)."""

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

README = """---
license: apache-2.0
tags:
- ctxzip
---

# Tiny test model
"""


@pytest.fixture
def api(local_hub: LocalHub) -> HfApi:
    return HfApi()


@pytest.fixture
def repo_id(api: HfApi) -> str:
    """A fresh repo per test: the hub is shared by the whole session."""
    return api.create_repo(f"test-user/repo-{uuid.uuid4().hex[:10]}").repo_id


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8, "model_type": "llama"}))
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    (folder / "README.md").write_text(README)
    (folder / "sub" / "notes.txt").write_text("nested file\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_create_repo_is_idempotent_and_whoami_works(api: HfApi, local_hub: LocalHub) -> None:
    url = api.create_repo("test-user/idempotent")
    again = api.create_repo("test-user/idempotent", exist_ok=True)
    assert url.repo_id == again.repo_id == "test-user/idempotent"
    assert api.create_repo("no-namespace", exist_ok=True).repo_id == "test-user/no-namespace"
    assert api.repo_exists("test-user/idempotent") and not api.repo_exists("test-user/never-created")
    assert api.whoami()["name"] == "test-user"


def test_upload_folder_then_snapshot_download_round_trips(
    api: HfApi, repo_id: str, model_folder: Path, tmp_path: Path, local_hub: LocalHub
) -> None:
    info = api.upload_folder(folder_path=model_folder, repo_id=repo_id, commit_message="add model")

    assert api.model_info(repo_id).sha == info.oid
    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *_files(model_folder)])
    snapshot = Path(snapshot_download(repo_id, local_dir=tmp_path / "snapshot"))
    downloaded = {k: v for k, v in _files(snapshot).items() if not k.startswith(".cache/")}
    assert downloaded.pop(".gitattributes")
    assert downloaded == _files(model_folder)
    assert torch.equal(load_file(snapshot / "model.safetensors")["w"], torch.arange(12.0).reshape(3, 4))
    # Every file went inline in the commit: no LFS batch or Xet token request reached the server.
    assert not [r for r in local_hub.requests if "lfs" in r or "xet" in r]


def test_hf_hub_download_returns_file_from_cache(api: HfApi, repo_id: str, model_folder: Path) -> None:
    info = api.upload_folder(folder_path=model_folder, repo_id=repo_id)

    path = Path(hf_hub_download(repo_id, "sub/notes.txt"))
    assert path.read_text() == "nested file\n"
    assert info.oid in path.parts  # cached under snapshots/<commit sha>/
    assert api.file_exists(repo_id, "config.json") and not api.file_exists(repo_id, "nope.json")


def test_second_commit_is_served_on_main_and_old_commit_stays_readable(api: HfApi, repo_id: str) -> None:
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.txt", repo_id=repo_id)
    assert Path(hf_hub_download(repo_id, "weights.txt")).read_bytes() == b"v1"

    second = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="weights.txt", repo_id=repo_id)
    latest = Path(hf_hub_download(repo_id, "weights.txt"))

    assert second.oid != first.oid and len(second.oid) == 40
    assert latest.read_bytes() == b"version 2" and second.oid in latest.parts
    assert Path(hf_hub_download(repo_id, "weights.txt", revision=first.oid)).read_bytes() == b"v1"
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [second.oid, first.oid]


def test_unchanged_file_makes_no_new_commit(api: HfApi, repo_id: str) -> None:
    # The client skips files whose preupload "oid" equals its own git sha1 of the content.
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo_id)
    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo_id)
    assert again.oid == first.oid


def test_missing_repo_raises_repository_not_found(local_hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test-user/does-not-exist", local_dir=tmp_path / "missing")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("test-user/does-not-exist")


def test_missing_file_or_revision_raises_specific_errors(repo_id: str) -> None:
    with pytest.raises(RemoteEntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "no-such-file.json")
    assert isinstance(excinfo.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")


def test_tree_refs_paths_info_branches_and_deletions(api: HfApi, repo_id: str, model_folder: Path) -> None:
    api.upload_folder(folder_path=model_folder, repo_id=repo_id)

    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id)}
    assert top["sub"] == "RepoFolder" and top["config.json"] == "RepoFile" and "sub/notes.txt" not in top
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="sub")] == ["sub/notes.txt"]
    infos = api.get_paths_info(repo_id, ["config.json", "sub", "absent.txt"], expand=True)
    assert [i.path for i in infos] == ["config.json", "sub"] and infos[0].last_commit is not None

    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    assert "dev.txt" in api.list_repo_files(repo_id, revision="dev")
    assert "dev.txt" not in api.list_repo_files(repo_id)
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "dev"}

    api.delete_file("sub/notes.txt", repo_id=repo_id)
    assert "sub/notes.txt" not in api.list_repo_files(repo_id)


def test_create_pr_leaves_main_untouched(api: HfApi, repo_id: str) -> None:
    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True)

    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert "pr.txt" not in api.list_repo_files(repo_id)
    assert Path(hf_hub_download(repo_id, "pr.txt", revision=pr.pr_revision)).read_bytes() == b"proposal"


def test_standalone_server_starts_stops_and_reports_unknown_routes() -> None:
    with LocalHub() as hub:
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"{hub.url}/api/unknown-endpoint", timeout=5)
        assert excinfo.value.code == 404
        assert "does not serve" in json.loads(excinfo.value.read())["error"]
        url = hub.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=5)
