"""Shipped compressors: loadable offline by their short name ``ctxzip/<name>``, each with its measured table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ctxzip.compressors import CompressedLM, CtxzipError, GistCompressor, GistConfig
from ctxzip.compressors.hub import CONFIG_NAME
from ctxzip.compressors.shipped import shipped_folder, shipped_names, shipped_root

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The passkey is 58213. Remember it. The grass is green and the sky is blue, again and again."


@pytest.fixture
def own_shipped(tiny, tmp_path, monkeypatch) -> tuple[str, CompressedLM]:
    """A tiny gist compressor shipped in a shipped folder of this test's own."""
    model, tokenizer = tiny()
    gist = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=4), model).eval()
    with torch.no_grad():
        gist.gist_embeddings.weight.normal_(generator=torch.Generator().manual_seed(0))
    clm = CompressedLM(gist, tokenizer)
    monkeypatch.setenv("CTXZIP_SHIPPED_DIR", str(tmp_path / "shipped"))
    clm.save_pretrained(tmp_path / "shipped" / "gist-tiny")
    return "ctxzip/gist-tiny", clm


def test_a_short_name_loads_the_shipped_folder_without_the_hub(own_shipped, monkeypatch) -> None:
    name, clm = own_shipped
    assert shipped_names() == [name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = CompressedLM.from_pretrained(name)
    assert torch.equal(loaded.compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)
    assert loaded.answer_many(loaded.compress(CONTEXT), ["What is the passkey?"], max_new_tokens=4) == \
        clm.answer_many(clm.compress(CONTEXT), ["What is the passkey?"], max_new_tokens=4)


def test_names_that_are_not_shipped_are_left_to_the_hub(own_shipped, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert shipped_folder("ctxzip/no-such-compressor") is None
    assert shipped_folder("someone/gist-tiny") is None  # another namespace is never looked up here
    with pytest.raises(CtxzipError, match="no-such-compressor"):
        CompressedLM.from_pretrained("ctxzip/no-such-compressor")


def test_a_shipped_compressor_has_no_revisions(own_shipped) -> None:
    with pytest.raises(CtxzipError, match="no revisions"):
        CompressedLM.from_pretrained(own_shipped[0], revision="v1")


def test_an_incomplete_folder_is_not_shipped(own_shipped) -> None:
    folder = shipped_root() / "gist-tiny"
    shutil.copytree(folder, folder.parent / "half-written")
    (folder.parent / "half-written" / CONFIG_NAME).unlink()  # save_compressor writes its config last
    assert shipped_names() == ["ctxzip/gist-tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped_names())
def test_each_shipped_compressor_loads_offline_with_its_table(name: str, monkeypatch) -> None:
    """The artifacts in the package itself: small, complete, with the model card's measured table, and each
    loads onto the embedded base model with the Hub out of reach and compresses a context."""
    folder = shipped_folder(name)
    assert folder is not None
    size = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    assert size < 8 * 2**20, f"{name} is {size / 2**20:.1f} MiB: a shipped compressor must stay adapter-sized"
    card = (Path(folder) / "README.md").read_text()
    assert "full_context" in card and "no_context" in card, "its card must show the measured ceiling and floor"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clm = CompressedLM.from_pretrained(name)
    memory = clm.compress(CONTEXT * 4)
    assert memory.slots < len(clm.tokenizer(CONTEXT * 4).input_ids)


def test_ship_copies_the_artifact_with_its_table_and_replaces_an_older_copy(own_shipped, tmp_path, monkeypatch) -> None:
    from ctxzip.compressors import shipped

    name, clm = own_shipped
    export = tmp_path / "run"
    clm.save_pretrained(export)
    (export / "checkpoint-5").mkdir()
    (export / "checkpoint-5" / "optimizer.pt").write_bytes(b"local only")
    folder = shipped.ship(export, "gist-run", "## Held-out\n\n| method | accuracy |\n")
    assert shipped_names() == sorted([name, "ctxzip/gist-run"])
    assert not (folder / "checkpoint-5").exists()
    assert (folder / "README.md").read_text().endswith("## Held-out\n\n| method | accuracy |\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = CompressedLM.from_pretrained("ctxzip/gist-run")
    assert torch.equal(loaded.compressor.gist_embeddings.weight, clm.compressor.gist_embeddings.weight)

    shipped.ship(export, "gist-run", "## Measured again\n")
    card = (folder / "README.md").read_text()
    assert "Measured again" in card and "Held-out" not in card
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gist-run", "gist-tiny"]  # nothing staged is left


def test_ship_refuses_bad_names_folders_that_are_no_export_and_big_artifacts(own_shipped, tmp_path, monkeypatch) -> None:
    from ctxzip.compressors import shipped

    export = shipped_root() / "gist-tiny"
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="one folder name"):
            shipped.ship(export, bad)
    with pytest.raises(CtxzipError):
        shipped.ship(tmp_path, "empty")
    monkeypatch.setattr(shipped, "SHIPPED_MAX_BYTES", 1024)
    with pytest.raises(ValueError, match="MiB of artifact"):
        shipped.ship(export, "too-big")
    assert shipped_names() == [own_shipped[0]]
    assert shipped_folder("ctxzip/.gist-tiny.new") is None
