"""The GPU suite (benchmarks/gpu/) in its reduced CPU form, so that it cannot rot between GPU runs.

``run_suite.py --smoke`` runs every section on the CPU (the CSKV kernel under ``TRITON_INTERPRET=1``,
a tiny Llama for training throughput, the gist recipe on the tiny model for the real run and for
both gist stages, stage 1 stopped by its time limit) in a fresh interpreter (triton must be imported
after ``TRITON_INTERPRET`` is set). The pieces that
must work the first time on the GPU machine are tested directly: carried wheels unpacked without
pip, the weights split / reassembled with their hashes checked, the real run's recipe arguments
parsed by the recipe's own parser, the SmolLM2 shapes equal to the embedded model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu"
for folder in (SUITE, ROOT):  # the suite's modules, and the recipes they import (as run_suite.py has them)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import suite_common  # noqa: E402
import suite_real  # noqa: E402
import weights  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # --stage1-minutes 0: stage 1 is stopped by the clock after its first step (stage 2 by its smoke max_steps)
    result = subprocess.run([sys.executable, str(SUITE / "run_suite.py"), "--out", str(out), "--smoke",
                             "--wheels", str(out / "no-wheels"), "--stage1-minutes", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    return {"out": out, "data": data, "stdout": result.stdout}


def test_every_section_runs_and_is_recorded(smoke: dict) -> None:
    sections = smoke["data"]["sections"]
    assert list(sections) == ["kernel_correctness", "kernel_speed", "training_throughput", "real_run",
                              "gist_stages"]
    for name, record in sections.items():
        assert record["status"] in ("ok", "skipped"), (name, record.get("error"), record.get("traceback"))
    assert smoke["data"]["meta"]["finished"].startswith("yes")
    markdown = (smoke["out"] / "results.md").read_text()
    for title in [*suite_common.SECTION_TITLES.values(), suite_real.STAGES_TITLE]:
        assert title in markdown
    log = (smoke["out"] / "log.txt").read_text()
    assert "kernel_correctness: start" in log and "done:" in log


def test_kernel_sections_measure(smoke: dict) -> None:
    correctness = smoke["data"]["sections"]["kernel_correctness"]
    assert correctness["failed"] == 0 and correctness["passed"] >= 4
    assert {r["bits"] for r in correctness["rows"]} >= {"float", 8, 4}
    speed = smoke["data"]["sections"]["kernel_speed"]
    import suite_kernels

    methods = {r["method"]: r for r in speed["rows"]}
    bits = suite_kernels.cskv_gpu_shape().bits  # the smoke run times the GPU recipe's latent width only
    kernel, reference = methods[f"cskv_kernel_{bits}bit"], methods[f"cskv_reference_{bits}bit"]
    assert methods["sdpa"]["ms"] > 0 and kernel["ms"] > 0, speed["rows"]
    assert 0 < kernel["bytes_mb"]  # smaller than the dense cache at the real shapes: the byte-count test below
    assert reference["ms"] > 0
    assert speed["copy_bandwidth"]["gb_per_s"] > 0 and methods["sdpa"]["roofline"] > 0


def test_training_section_measures_every_variant(smoke: dict) -> None:
    from ctxzip.trainers.fused_loss import liger_available

    rows = {r["variant"]: r for r in smoke["data"]["sections"]["training_throughput"]["rows"]}
    expected = ["lora_sft", "gist", "cskv_reconstruction"]
    if liger_available():
        expected += ["lora_sft_fused_ce", "gist_fused_ce"]
    for name in expected:
        assert rows[name].get("tokens_per_s", 0) > 0 and rows[name]["loss_finite"], rows[name]
    assert rows["cskv_reconstruction"]["trainer"] == "CSKVTrainer"


def test_real_run_trains_and_evaluates_or_says_why_not(smoke: dict) -> None:
    record = smoke["data"]["sections"]["real_run"]
    if record["status"] == "skipped":
        assert record["reason"].startswith("skipped: weights absent")
        return
    assert record["train_steps"] == 2 and record["train_loss_first_last"]
    assert {r["method"] for r in record["rows"]} >= {"trained", "full_context"}


ARTIFACT = {"compressor_config.json", "compressor.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "README.md"}


def test_gist_stages_train_evaluate_and_bring_both_artifacts_back_or_say_why_not(smoke: dict) -> None:
    record = smoke["data"]["sections"]["gist_stages"]
    if record["status"] == "skipped":
        assert record["reason"].startswith("skipped: weights absent")
        return
    one, two = record["stage1"], record["stage2"]
    assert (one["stopped_by"], one["train_steps"]) == ("time limit", 1)  # the clock stops it, the recipe exports
    assert (two["stopped_by"], two["train_steps"]) == ("max_steps", 2)
    for stage in (one, two):
        assert stage["loss_finite"] and stage["train_tokens"] > 0 and stage["tokens_per_s"] > 0, stage
        assert stage["provisional_export"].startswith("saved") and stage["export"].startswith("final: 5 files")
    assert "pretrain.yaml" in record["stage1_command"] and "mixture.yaml" in record["stage2_command"]
    assert "--init_from" in record["stage2_command"] and "--bf16 False" in record["stage2_command"]
    from safetensors.torch import load_file

    folder = smoke["out"] / "gist_stages"
    for stage in ("stage1", "stage2"):
        files = {p.relative_to(folder / stage).as_posix() for p in (folder / stage).rglob("*") if p.is_file()}
        assert files == ARTIFACT, files  # the artifact, no checkpoint
    first, second = (load_file(folder / s / "compressor.safetensors") for s in ("stage1", "stage2"))
    assert first.keys() == second.keys() and any(not first[k].equal(second[k]) for k in first)  # stage 2 trained
    rows = [r for r in record["rows"] if r["stage"] == 2]
    assert {r["method"] for r in rows} == {"trained", "before training (init_from)", "truncation", "full_context",
                                           "no_context"}
    assert all(r["n"] == 2 and r["scoring"] == "generate" and r["accuracy_ci"] for r in rows), rows
    assert {r["task"] for r in record["rows"] if r["stage"] == 1} == {"continuation"}
    markdown = (smoke["out"] / "results.md").read_text()
    assert "accuracy_ci" in markdown and "| 2 | retrieve_number | trained | generate |" in markdown


def test_publish_copies_results_under_the_device_name(smoke: dict, tmp_path: Path, monkeypatch) -> None:
    import run_suite

    monkeypatch.setattr(suite_common, "ROOT", tmp_path)
    target = run_suite.publish(smoke["out"])
    assert target.parent == tmp_path / "benchmarks" / "results" / "gpu"
    assert (target / "results.md").is_file() and (target / "results.json").is_file()


# ----- the pieces the GPU machine depends on --------------------------------------------------------
def _wheel(folder: Path, name: str, module: str, body: str) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", body)
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/top_level.txt", module + "\n")
    return path


def test_carried_wheels_are_unpacked_only_when_missing(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "ctxzip_fake_pkg", "ctxzip_fake_pkg", "VALUE = 42\n")
    _wheel(wheels, "json", "json", "raise RuntimeError('the machine has json: never shadow it')\n")
    try:
        report = suite_common.install_wheels(wheels, site)
        assert report == {"ctxzip_fake_pkg-1.0-py3-none-any.whl": "installed", "json-1.0-py3-none-any.whl": "present"}
        import ctxzip_fake_pkg

        assert ctxzip_fake_pkg.VALUE == 42
        from importlib import metadata

        assert metadata.version("ctxzip_fake_pkg") == "1.0"
        assert not (site / "json").exists()
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("ctxzip_fake_pkg", None)


def test_weights_split_stage_and_reassemble(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(3000))
    parts, stash = tmp_path / "parts", tmp_path / "stash"
    monkeypatch.setattr(weights, "PARTS_DIR", parts)
    monkeypatch.setattr(weights, "PACKAGE", "ctxzip_no_such_package")
    monkeypatch.setenv("CTXZIP_GPU_STASH", str(stash))
    assert weights.assemble()[0] is None and "no GGUF parts" in weights.assemble()[1]
    manifest = weights.split(source, parts, first=2000, expected_sha256=None)
    assert [p["bytes"] for p in manifest["parts"]] == [2000, 1000]
    # run 1 carries part 1 and stashes it; run 2 carries only part 2
    (parts / "part-2").rename(tmp_path / "part-2")
    assert weights.stage() == ["part-1"]
    (parts / "part-1").unlink()
    root, message = weights.assemble()
    assert root is None and "part-2" in message
    (tmp_path / "part-2").rename(parts / "part-2")
    root, message = weights.assemble()
    assert root is not None and "sha256 ok" in message, message
    assert (root / "ctxzip_no_such_package" / "model.gguf").read_bytes() == source.read_bytes()
    # a corrupt part is refused
    (root / "ctxzip_no_such_package" / "model.gguf").unlink()
    (parts / "part-2").write_bytes(b"x" * 1000)
    root, message = weights.assemble()
    assert root is None and "corrupt" in message


def test_weights_parts_fit_the_carry_limit() -> None:
    second = weights.GGUF_BYTES - weights.FIRST_PART
    assert weights.FIRST_PART <= 56 * 2**20 and second <= 56 * 2**20


def test_real_run_arguments_parse_with_the_recipes_parser() -> None:
    pytest.importorskip("trl")
    import suite_real

    import recipes.gist as recipe

    planned = suite_real.plan(0.4, 2.0, batch=8, accumulation=4, tasks=5, max_rows_per_task=160)
    assert planned["max_steps"] == int(120 / (0.4 * 4 * 1.15)) and planned["train_samples_per_task"] == 160
    values = suite_real.overrides(False, planned, "/tmp/x", eval_samples=50)
    assert "bf16" not in values  # the GPU run keeps the config's bf16 ...
    values.update(bf16=False, use_cpu=True)  # ... which TrainingArguments refuses on a machine without a GPU
    argv = suite_real.recipe_argv(ROOT / "recipes/configs/gist/gpu.yaml", values)
    script_args, gist_config, training_args, _ = recipe.make_parser().parse_args_and_config(args=argv)
    assert training_args.max_steps == planned["max_steps"] and script_args.num_eval_samples == 50
    assert script_args.context_tokens == 2048 and gist_config.segment_length == 512


def test_suite_shapes_are_the_embedded_models() -> None:
    import suite_kernels
    import suite_training

    from ctxzip.compressors.cskv.config import rank_for
    from ctxzip.compressors.models import EMBEDDED_MODEL, config_for, model_signature

    try:
        embedded = config_for(EMBEDDED_MODEL)
    except Exception as exc:  # noqa: BLE001 - the embedded package is optional for this check
        pytest.skip(f"embedded model not available: {exc}")
    assert model_signature(suite_training.base_config(smoke=False)) == model_signature(embedded)
    assert (suite_kernels.Q_HEADS, suite_kernels.KV_HEADS, suite_kernels.HEAD_DIM) == (
        embedded.num_attention_heads, embedded.num_key_value_heads, embedded.head_dim)
    shape = suite_kernels.cskv_gpu_shape()
    assert (shape.rank_k, shape.rank_v, shape.bits) == (rank_for(0.5, 192), 192, 8) == (96, 192, 8)


def test_gpu_mode_kernel_cases_build_and_the_reference_runs_on_them() -> None:
    """The cases only the GPU run checks: every one builds, and the fp32 oracle runs on it."""
    import suite_kernels
    import torch

    from ctxzip.compressors.cskv.reference import decode_attention_reference
    from ctxzip.compressors.cskv.testing import kernel_inputs

    cases = suite_kernels.correctness_cases(smoke=False)
    assert {c[2] for c in cases} == {torch.float16, torch.bfloat16}
    assert {c[1][8] for c in cases} == {None, 8, 4}
    for name, shape, _dtype, _split, _block_n, group in cases:
        args, kwargs = kernel_inputs(*shape, seed=0, group_size=group)
        out = decode_attention_reference(**{**args, "q": args["q"].float()}, **kwargs)
        assert out.shape == args["q"].shape and bool(torch.isfinite(out).all()), name


def test_gpu_mode_speed_inputs_and_byte_counts() -> None:
    import suite_kernels
    import torch

    from ctxzip.compressors.cskv.reference import decode_attention_reference

    shape = suite_kernels.cskv_gpu_shape()
    for bits in (None, 8, 4):
        args = suite_kernels.latent_cache(2, 100, shape, bits, torch.float16, "cpu")
        assert args["latent_k"].length == 100 - shape.window and args["window_k"].shape[2] == shape.window
        out = decode_attention_reference(**args, sm_scale=0.125)
        assert out.shape == (2, 9, 64) and bool(torch.isfinite(out).all())
    # 4-bit latents: rank / 2 code bytes + rank / 32 groups x (scale + zero) x 2 bytes per token, for K (rank 96)
    # and V (rank 192); positions 4 bytes
    args = suite_kernels.latent_cache(1, 1000, shape, 4, torch.bfloat16, "cpu")
    per_token = (48 + 3 * 2 * 2) + (96 + 6 * 2 * 2) + 4
    window = 2 * 3 * shape.window * 64 * 2
    fixed = 192 * 96 * 2 + 192 * 192 * 2 + 2 * 9 * 64 * 2 + 32 * 4
    assert suite_kernels.cskv_bytes(args) == 968 * per_token + window + fixed
    dense = 2 * 3 * 1000 * 64 * 2  # the bf16 K and V of the same 1000 tokens
    for bits in (8, 4):
        assert suite_kernels.cskv_bytes(suite_kernels.latent_cache(1, 1000, shape, bits, torch.bfloat16, "cpu")) < dense
    assert suite_kernels.memory_needed(16, 131072, shape, with_reference=False) < 60 * 2**30


def test_gpu_mode_training_shapes_build_the_recipes_configs() -> None:
    import suite_training

    from ctxzip.compressors.cskv import CSKVConfig
    from ctxzip.compressors.gist import GistConfig

    sh = suite_training.shapes(smoke=False)
    assert (sh.batch, sh.context, sh.target) == (8, 2048, 512)
    assert GistConfig(**sh.gist).num_gists == 128 and CSKVConfig(**sh.cskv).quant_bits == 8
    assert sh.cskv_tokens == 2048 and sh.fused_chunk is None


def test_real_run_is_skipped_with_the_reason_when_weights_are_absent(tmp_path: Path, monkeypatch) -> None:
    import suite_real

    monkeypatch.setattr(weights, "PARTS_DIR", tmp_path / "parts")
    monkeypatch.setattr(weights, "PACKAGE", "ctxzip_no_such_package")
    monkeypatch.setenv("CTXZIP_GPU_STASH", str(tmp_path / "stash"))
    record: dict = {}
    clock = suite_common.Clock(100.0)
    assert not suite_real.weights_present(record, clock)
    assert record["status"] == "skipped" and record["reason"].startswith("skipped: weights absent (no GGUF parts")


# ----- section 5, gist_stages: the pieces the GPU run depends on -----------------------------------
def test_gist_stages_arguments_parse_with_the_recipes_parser() -> None:
    pytest.importorskip("trl")
    import recipes.gist as recipe

    parsed = []
    for stage in (1, 2):
        values = suite_real.stage_overrides(stage, False, f"/tmp/stage{stage}", batch=16, eval_samples=100,
                                            init_from="/tmp/stage1" if stage == 2 else None)
        assert values["bf16"] is True and values["use_cpu"] is False and values["fused_lm_loss"] is True
        values.update(bf16=False, use_cpu=True)  # TrainingArguments refuses bf16 on a machine without a GPU
        argv = suite_real.recipe_argv(suite_real.STAGE_CONFIGS[stage - 1], values)
        parsed.append(recipe.make_parser().parse_args_and_config(args=argv))
    (first, config1, train1, _), (second, config2, train2, _) = parsed
    assert train1.per_device_train_batch_size == train2.per_device_train_batch_size == 16
    assert train1.max_steps == train2.max_steps == 10**6 and train1.lr_scheduler_type == "constant_with_warmup"
    assert first.train_tasks == ["continuation", "reconstruction"] and first.context_tokens == 512
    assert first.init_from is None and first.fused_lm_loss and train1.output_dir == "/tmp/stage1"
    assert second.init_from == "/tmp/stage1" and second.num_eval_samples == 100 and second.eval_scoring == "generate"
    assert (second.context_tokens, second.max_train_context_tokens, second.eval_data_source) == (128, 512, "stdlib")
    assert (config1.adapter_scope, config1.gist_layout) == (config2.adapter_scope, config2.gist_layout) == ("gists", "interleaved")
    assert (config1.tokens_per_gist, config1.lora_r) == (config2.tokens_per_gist, config2.lora_r)  # init_from fits
    with pytest.raises(ValueError, match="init_from"):
        suite_real.stage_overrides(2, False, "/tmp/stage2", batch=16, eval_samples=100)


def test_gist_stage_minutes_shrink_to_the_budget_together() -> None:
    assert suite_real.stage_minutes((3.0, 3.0), 400.0) == (3.0, 3.0)
    assert suite_real.stage_minutes((3.0, 3.0), 300.0) == (2.5, 2.5)
    assert suite_real.stage_minutes((2.0, 4.0), 180.0) == (1.0, 2.0)
    assert suite_real.stage_minutes((3.0, 3.0), 50.0) is None  # under half a minute each: not worth running
    assert suite_real.stage_minutes((3.0, 3.0), -10.0) is None


def test_gist_stages_say_why_they_did_not_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights, "PARTS_DIR", tmp_path / "parts")
    monkeypatch.setattr(weights, "PACKAGE", "ctxzip_no_such_package")
    monkeypatch.setenv("CTXZIP_GPU_STASH", str(tmp_path / "stash"))
    results = suite_common.Results(tmp_path / "out", {})
    record: dict = {}
    suite_real.section_stages(record, results, suite_common.Clock(1000.0), "cuda", smoke=False)
    assert record["status"] == "skipped" and record["reason"].startswith("skipped: weights absent (no GGUF parts")
    # with the weights, a budget too short for both stages and the evaluation is a reason too
    monkeypatch.setattr(suite_real, "weights_present", lambda record, clock: True)
    record = {}
    suite_real.section_stages(record, results, suite_common.Clock(200.0), "cuda", smoke=False)
    assert record["status"] == "skipped" and "budget left" in record["reason"]
    assert not (tmp_path / "out" / "gist_stages").exists()


def test_sections_can_be_chosen_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    import run_suite

    assert run_suite.parse(["--out", str(tmp_path)]).sections.split(",")[-1] == "gist_stages"
    assert run_suite.parse(["--out", str(tmp_path), "--sections", "gist_stages"]).stage1_minutes == 3.0
    with pytest.raises(SystemExit):
        run_suite.parse(["--out", str(tmp_path), "--sections", "gist_stage"])
