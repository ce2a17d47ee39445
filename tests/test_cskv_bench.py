"""benchmarks/cskv_bench.py's three modes on the tiny model: the speed table, the per-stage profile and the quality
grid (K and V densities apart), so that the commands the CSKV page shows keep running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-model", "tiny-random-llama"]


def bench(*args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/cskv_bench.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


def test_speed_times_the_dense_and_the_latent_cache() -> None:
    rows = table_rows(bench("speed", *TINY, "--density", "0.5", "--value-density", "1.0", "--bits", "4",
                            "--lengths", "64", "--steps", "1", "--window", "8"))
    (row,) = rows
    assert row[0] == "64" and float(row[1]) > float(row[2]) > 0 and float(row[4]) > 0 and float(row[5]) > 0


def test_profile_names_every_stage() -> None:
    rows = table_rows(bench("profile", *TINY, "--length", "64", "--steps", "1", "--window", "8"))
    assert [r[0] for r in rows] == ["dequantize key latents", "dequantize value latents", "reconstruct keys (GEMM)",
                                    "RoPE cos / sin", "RoPE on the keys", "whole reference step", "dense SDPA step"]
    assert all(float(r[1]) >= 0 for r in rows)


def test_quality_grid_sets_key_and_value_densities_apart() -> None:
    rows = table_rows(bench("quality", *TINY, "--densities", "0.5", "--value-densities", "same,1.0", "--bits", "8",
                            "--sources", "svd", "--num-samples", "1", "--context-tokens", "64", "--answer-tokens", "8",
                            "--window", "8"))
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("full cache", "1.0", "1.0", "float32"),
                                                        ("svd", "0.5", "0.5", "8"), ("svd", "0.5", "1.0", "8")]
    full, same, values_kept = (int(r[4]) for r in rows)
    assert full > values_kept > same  # keeping every value channel costs bytes, and both are below the full cache


def test_speed_with_post_rope_keys_times_the_fused_cpu_kernels() -> None:
    out = bench("speed", *TINY, "--density", "0.5", "--value-density", "1.0", "--bits", "8", "--key-space",
                "post_rope", "--quant-group-size", "8", "--lengths", "300", "--steps", "2", "--window", "8")
    assert "post_rope keys" in out and "CSKV fused CPU kernels ms/tok" in out
    (row,) = table_rows(out)
    assert row[0] == "300" and all(float(v) > 0 for v in row[4:7]) and row[7].endswith("x faster")


def test_quality_grid_compares_pre_and_post_rope_keys() -> None:
    rows = table_rows(bench("quality", *TINY, "--densities", "0.5", "--value-densities", "1.0", "--bits", "8",
                            "--sources", "asvd", "--key-spaces", "pre_rope,post_rope", "--num-samples", "1",
                            "--context-tokens", "64", "--answer-tokens", "8", "--window", "8",
                            "--calibration-samples", "2", "--quant-group-size", "8"))
    assert [r[0] for r in rows] == ["full cache", "asvd", "asvd, post-RoPE keys"]
    assert rows[1][4] == rows[2][4]  # the same bytes: only what a key latent projects differs
    assert all(float(r[7]) > 0 for r in rows)
