"""The private trainer hooks ctxzip overrides (trainers/compat.py) still exist as they were written.

Written for transformers 5.17 and 5.24 and TRL 1.16 (``trainers.compat.WRITTEN_FOR``). On another
version this fails with a message that names the library, its version and the hook that changed.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import ctxzip.trainers as trainers
import ctxzip.trainers.compat as compat


def test_every_private_hook_fits_the_installed_libraries() -> None:
    problems = compat.private_hook_problems()
    assert not problems, "\n".join(problems)


def test_a_changed_hook_is_reported_with_the_library_version() -> None:
    from importlib.metadata import version

    renamed = compat.PrivateHook("transformers", "transformers:Trainer", "_load_from_checkpoint", ("self", "path"))
    message = renamed.problem()
    assert message is not None
    assert f"transformers {version('transformers')}" in message and "written for transformers 5.17.0" in message
    assert "resume_from_checkpoint" in message  # the parameters it has now
    gone = compat.PrivateHook("trl", "trl:DPOTrainer", "_no_such_hook", ("self",)).problem()
    assert gone is not None and "no longer exists" in gone and "trl 1.16.0" in gone


@pytest.mark.parametrize(("mixin", "hook"), [("TrainedTensorsResume", "_load_from_checkpoint"),
                                             ("PretokenizedPreferences", "_prepare_dataset")])
def test_overrides_keep_the_signature_of_the_hook_they_replace(mixin: str, hook: str) -> None:
    listed = next(h for h in compat.PRIVATE_HOOKS if h.method == hook)
    override = getattr(getattr(compat, mixin), hook)
    assert tuple(inspect.signature(override).parameters) == listed.parameters


def test_no_other_trainer_module_touches_private_library_names() -> None:
    """The list in compat.py is complete: no other trainers/ module overrides or reads these."""
    private = [h.method for h in compat.PRIVATE_HOOKS] + [
        "_save", "_compute_loss", "_metrics", "_tag_names", "_hf_deepspeed_config_weak_ref"]
    for path in Path(trainers.__file__).parent.glob("*.py"):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        for name in private:
            assert f"def {name}(" not in text and f".{name}" not in text.replace(f".{name}_", ""), (path.name, name)
