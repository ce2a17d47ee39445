"""The README and docs say what the code does: short README, no dead links, every documented command parses.

Commands are parsed, not run: ``python -m ctxzip.eval`` by its own parser, each recipe command by its recipe's
``make_parser()`` with the YAML it names (unknown keys and flags are errors). Running them on CPU with sizes
overridden is what the recipe, distributed and eval tests do."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The project's history belongs in git, not in what a user reads.
HISTORY = re.compile(r"\b(issue|issues|session|sessions)\b", re.IGNORECASE)


def commands(page: Path) -> list[list[str]]:
    """Every command line of the page's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(shlex.split(line))
    return found


def after(words: list[str], marker: str) -> list[str] | None:
    return words[words.index(marker) + 1:] if marker in words else None


def eval_argv(words: list[str]) -> list[str] | None:
    """The eval CLI's arguments of a documented command: after ``python -m ctxzip.eval`` or ``ctxzip-eval``, or,
    in ``accelerate launch [launch flags] -m ctxzip.eval ...``, what accelerate's own launch parser hands the
    module (the launch flags must parse there too); None for another command."""
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # DS_ACCELERATOR=cpu accelerate launch ...
        words = words[1:]
    if words[:2] == ["accelerate", "launch"] or "accelerate.commands.launch" in words[:3]:
        from accelerate.commands.launch import launch_command_parser

        tail = words[2:] if words[0] == "accelerate" else after(words, "accelerate.commands.launch")
        launch = launch_command_parser().parse_args(tail)
        if launch.training_script not in ("ctxzip.eval", "ctxzip-eval"):
            return None
        assert launch.module == (launch.training_script == "ctxzip.eval"), f"run the eval module with -m: {words}"
        return list(launch.training_script_args)
    if "ctxzip.eval" in words:
        return after(words, "ctxzip.eval")
    return after(words, "ctxzip-eval")


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_have_live_links_and_no_history(page: Path) -> None:
    text = page.read_text()
    assert not HISTORY.findall(text), f"{page.name} speaks of the project's history: {HISTORY.findall(text)}"
    assert "from compressors" not in text and "python -m eval " not in text, "an import name that no longer exists"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_eval_commands_parse(page: Path) -> None:
    from ctxzip.eval.__main__ import make_parser

    for words in commands(page):
        argv = eval_argv(words)
        if argv is None or argv == ["--help"]:
            continue
        from_file = "--config" in argv
        if from_file:  # a user's YAML, or a run's own config.yaml made by the run before it
            index = argv.index("--config")
            del argv[index:index + 2]
        config, *_ = make_parser().parse_args_and_config(argv)
        assert config.compressors or config.compare or from_file, words


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_recipe_commands_parse(page: Path) -> None:
    for words in commands(page):
        recipe = next((w for w in words if re.fullmatch(r"recipes/\w+\.py", w)), None)
        if recipe is None or "<method>" in " ".join(words):
            continue
        spec = importlib.util.spec_from_file_location(f"recipe_{Path(recipe).stem}", ROOT / recipe)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        argv = after(words, recipe)
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        assert config is None or (ROOT / config).is_file(), f"{page.name}: no config {config}"
        # TrainingArguments refuses bf16 on a machine without it: the GPU configs parse here with it off
        module.make_parser().parse_args_and_config([*argv, "--bf16", "false"])
