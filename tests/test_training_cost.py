"""benchmarks/training_cost.py, the CPU training-cost table, on the tiny model (two variants, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "training_cost.py"


def test_training_cost_measures_each_variant_against_lora_sft(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants", "lora_sft,gist", "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"lora_sft", "gist"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0 and row["loss_finite"], row
    assert rows["lora_sft"]["vs_lora_sft_tokens_per_s"] == 1.0
    gist = rows["gist"]
    assert gist["vs_lora_sft_tokens_per_s"] == gist["tokens_per_s"] / rows["lora_sft"]["tokens_per_s"]
    assert gist["target_ratio"] == 0.8 and gist["meets_target"] == (gist["vs_lora_sft_tokens_per_s"] >= 0.8)
    table = (tmp_path / "results.md").read_text()
    assert "| gist | MemoryCompressorTrainer |" in table and "vs LoRA SFT" in table


def test_training_cost_refuses_an_unknown_variant(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--variants", "gist,nope", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown variants ['nope']" in result.stderr
