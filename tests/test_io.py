"""compressors.io: the one atomic-write helper (a failed write leaves the old file and no temporary)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ctxzip.compressors.io import (
    atomic_path,
    atomic_write,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path, keep: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - keep


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, mode) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, mode) as f:
            f.write("new, half" if mode == "w" else b"new, half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, {"state.json"}) == set()


def test_successful_write_replaces_and_creates_the_parent(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and _leftovers(path.parent, {"out.txt"}) == set()
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_unserializable_json_never_touches_the_file(tmp_path) -> None:
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and _leftovers(tmp_path, {"meta.json"}) == set()


def test_jsonl_lines_are_whole_and_unserializable_records_never_touch_the_file(tmp_path) -> None:
    path = tmp_path / "part-00000.jsonl"
    records = [{"a": 1, "ids": [1, 2]}, {"a": "x"}]
    write_jsonl_atomic(path, records)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"a": 2}, {"b": object()}])
    assert path.read_text().count("\n") == 2 and _leftovers(tmp_path, {"part-00000.jsonl"}) == set()
    write_jsonl_atomic(path, [])
    assert path.read_text() == ""


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        write_jsonl_atomic(tmp_path / "b.jsonl", [{}])
        for name in ("a.txt", "b.jsonl"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    finally:
        os.umask(umask)

def test_atomic_path_for_a_writer_that_takes_a_filename(tmp_path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not path.exists()
        save_file({"x": torch.ones(2)}, str(tmp))
    assert torch.equal(load_file(path)["x"], torch.ones(2))
    with pytest.raises(ValueError):
        with atomic_path(path) as tmp:
            save_file({"x": torch.zeros(3)}, str(tmp))
            raise ValueError("interrupted")
    assert torch.equal(load_file(path)["x"], torch.ones(2)) and _leftovers(tmp_path, {"w.safetensors"}) == set()


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "model"
    with pytest.raises(OSError):
        with atomic_path(target, folder=True) as tmp:
            (tmp / "part").write_text("half")
            raise OSError("killed")
    assert not target.exists() and _leftovers(tmp_path, set()) == set()
    with atomic_path(target, folder=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file() and _leftovers(tmp_path, {"model"}) == set()


def test_atomic_write_refuses_append(tmp_path) -> None:
    with pytest.raises(ValueError, match="whole files"):
        with atomic_write(tmp_path / "x", "a"):
            pass
