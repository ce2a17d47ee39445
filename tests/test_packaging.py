"""One import name: ``ctxzip`` and its subpackages, never shadowed by a user's own ``data/`` or ``eval/``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SHADOWS = ("compressors", "trainers", "data", "eval", "recipes")


def test_every_package_folder_is_in_the_distribution() -> None:
    """pyproject lists packages explicitly (they map onto top-level folders): a new method package must be
    listed, or a wheel would lack it while an editable install still finds it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, listed = setuptools["package-dir"], set(setuptools["packages"])
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == listed, f"listed but absent: {sorted(listed - found)}; present but unlisted: {sorted(found - listed)}"


def test_a_users_own_folders_do_not_shadow_ctxzip(tmp_path: Path) -> None:
    """A script next to its own ``data/``, ``eval/`` ... packages still gets ctxzip's (each of these would
    raise on import), for the public API and for the evaluation CLI."""
    for name in SHADOWS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user folder {name} was imported')\n")
    (tmp_path / "eval.py").write_text("raise ImportError('the user module eval.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": ""}
    code = ("from ctxzip import CompressedLM, Memory, load_compressor; import ctxzip.data, ctxzip.eval, "
            "ctxzip.trainers; from ctxzip.data import build_task; print(CompressedLM.__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ctxzip.compressors.wrapper"
    result = subprocess.run([sys.executable, "-m", "ctxzip.eval", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--compressor" in result.stdout


def test_importing_the_data_package_loads_no_model_code() -> None:
    code = ("import sys, ctxzip, ctxzip.data; bad = [m for m in sys.modules if m.startswith(('ctxzip.compressors', "
            "'ctxzip.trainers', 'ctxzip.eval'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
