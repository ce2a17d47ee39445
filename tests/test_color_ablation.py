"""benchmarks/color_ablation.py on the tiny model: each ablation is one recipe run, the summary has them all."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ablations_run_the_recipe_and_summarize(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("color_ablation", ROOT / "benchmarks" / "color_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sizes = ["--model_name_or_path", "tiny-random-llama", "--num_train_passages", "4", "--num_eval_passages", "2",
             "--passage_tokens", "40", "--corpus_size", "2", "--pairs_all_failed", "shortest_vs_longest",
             "--max_new_tokens", "6", "--max_steps", "1", "--per_device_train_batch_size", "2",
             "--length_probe_steps", "0", "--warmup_steps", "0", "--extractive_baselines", "lead"]
    out, work = tmp_path / "results", tmp_path / "work"
    module.main(["--ablations", "default", "compressed_labels", "--out", str(out), "--work_dir", str(work), "--",
                 *sizes])
    for name in ("default", "compressed_labels"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["wall_s"] > 0 and {r["corpus"] for r in record["rows"]} >= {"trained", "untrained",
                                                                                   "extractive (lead)"}

    def fingerprint(cache: str, stage: str) -> str:
        return json.loads((work / cache / stage / "stage.json").read_text())["fingerprint"]

    # the same candidates, copied and kept; labels made the other way
    assert fingerprint("compressed-labels-data", "candidates") == fingerprint("data", "candidates")
    assert fingerprint("compressed-labels-data", "labels") != fingerprint("data", "labels")
    module.main(["--ablations", "two_epochs", "six_families", "--out", str(out), "--work_dir", str(work), "--", *sizes])
    assert fingerprint("random-extracts-data", "candidates") != fingerprint("data", "candidates")  # recomputed
    assert fingerprint("random-extracts-data", "corpus-test") == fingerprint("data", "corpus-test")
    table = (out / "results.md").read_text()
    for name in ("default", "compressed_labels", "two_epochs", "six_families"):
        assert f"| {name} |" in table
    assert "trained minus best extract (paired)" in table
    assert re.search(r"\| [+-]\d\.\d{3} \[[+-]\d\.\d\d, [+-]\d\.\d\d\] \|", table)  # the paired difference
    assert "(lead)" in table and (work / "six_families-data" / "corpus-test").is_dir()
