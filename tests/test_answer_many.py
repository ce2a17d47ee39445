"""benchmarks/answer_many.sh, the compress-once-answer-many timing, with only sizes overridden (later flags win):
every method answers N prompts from one memory, beside the reused full cache and re-reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_answer_many_script_times_every_method_beside_the_references(tmp_path: Path) -> None:
    out = tmp_path / "answer-many"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/answer_many.sh"), "streaming_llm", "--", "--base-model",
                             "tiny-random-llama", "--context-length", "96", "--n-prompts", "2", "--no-progress",
                             "--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())["results"]
    timed = {(r["method"], r.get("ratio")) for r in rows if r.get("n_prompts") == 2}
    assert {("snapkv", 4.0), ("snapkv", 16.0), ("truncation", 16.0), ("streaming_llm", 16.0)} <= timed, timed
    for row in rows:
        if row.get("n_prompts"):
            assert row["n_prompts_s"] > 0 and row["n_prompts_prefix_cache_s"] > 0 and row["n_prompts_reread_s"] > 0
