"""The README's main job, ``scripts/quickstart.sh``: its training command, as the script writes it, runs on the
embedded SmolLM2 with only sizes overridden, and its table scores the shipped compressor beside this run's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--train_samples_per_task", "4", "--max_steps", "1", "--warmup_steps", "0", "--logging_steps", "1",
         "--save_steps", "1", "--num_eval_samples", "2"]


def training_command() -> str:
    """The script's command after it activates the environment (setup is the install, tested on its own)."""
    script = (ROOT / "scripts" / "quickstart.sh").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in script.splitlines()]
    command = lines[lines.index(". .venv/bin/activate") + 1:]
    assert len(command) == 1 and command[0].startswith("accelerate launch"), command
    return command[0]


@pytest.mark.slow
def test_the_quickstart_command_trains_and_scores_the_shipped_compressor_beside_its_own(tmp_path: Path) -> None:
    command = training_command()
    assert command.endswith('"$@"')
    overrides = " ".join([*SIZES, "--output_dir", str(tmp_path / "out")])
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command.replace('"$@"', overrides)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {match.group(1) for match in re.finditer(r"^\| ([\w./-]+) \|", result.stdout, re.MULTILINE)}
    assert {"trained", "ctxzip/gist-smollm2-135m", "untrained", "truncation", "full_context", "no_context"} <= rows, rows
    assert (tmp_path / "out" / "compressor.safetensors").exists()
