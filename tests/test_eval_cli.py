"""``python -m ctxzip.eval``: outputs, resume without recomputation, clear errors; the text metrics."""

from __future__ import annotations

import json

import pytest
from ports import free_port

from ctxzip.eval import bleu, exact_match, rouge_l, substring_match
from ctxzip.eval.__main__ import main

TINY = ["--base-model", "tiny-random-llama", "--no-progress", "--num-samples", "2", "--context-length", "96",
        "--n-prompts", "2"]


def test_metrics_on_known_inputs():
    assert exact_match("The Cat.", "the cat") == 1.0 and exact_match("a cat", "the cat") == 0.0
    assert substring_match("the pass key is 12345", "12345") == 1.0
    assert substring_match("1234", "12345") == 0.0
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("dog", "the cat sat on the mat") == 0.0
    # unigram 1/1... hand-computed: hyp "the cat", ref "the cat sat": p1 = 1, p2 (+1) = 2/2,
    # p3 = (0+1)/(0+1), p4 = 1 -> precision 1, brevity exp(1 - 3/2)
    assert bleu("the cat", "the cat sat") == pytest.approx(pytest.approx(2.718281828 ** -0.5))
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F1 = 0.75
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0 and rouge_l("same words", "Same words.") == 1.0


def test_run_writes_outputs_and_resumes_without_recomputing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--compressor", "snapkv", "streaming_llm", "--tasks", "passkey", "--ratios", "2", "4", "--output-dir", str(out)]
    assert main(args + TINY) == 0
    for name in ("predictions.jsonl", "metrics.json", "config.yaml", "report.md", "accuracy_vs_ratio.png",
                 "latency_vs_context.png", "memory_vs_context.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "metrics.json").read_text())["results"]
    methods = {(r["method"], r["ratio"]) for r in results}
    assert methods == {("full_context", 1.0), ("no_context", 0.0), ("truncation", 2.0), ("truncation", 4.0),
                       ("snapkv", 2.0), ("snapkv", 4.0), ("streaming_llm", 2.0), ("streaming_llm", 4.0)}
    floor = next(r for r in results if r["method"] == "no_context")
    assert floor["memory_bytes"] == 0 and floor["compress_s"] == 0.0
    full = next(r for r in results if r["method"] == "full_context")
    for r in results:  # N prompts timed end to end, beside the full context's prefix cache and re-reading
        assert r["n_prompts_s"] > 0 and r["n_prompts_prefix_cache_s"] == full["n_prompts_s"]
        assert r["n_prompts_reread_s"] == full["n_prompts_reread_s"] > 0
    for r in results:
        if r["ratio"] > 1:
            assert r["achieved_ratio"] == pytest.approx(r["ratio"], rel=0.05)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * len(methods)
    report = (out / "report.md").read_text()
    assert "Full-context ceiling" in report and "no context (the question alone)" in report
    assert "Beyond the model at this length" in report  # a random tiny model answers nothing

    import ctxzip.eval.runner as runner

    def boom(*a, **k):
        raise AssertionError("a finished configuration was recomputed")

    monkeypatch.setattr(runner, "score_row", boom)
    assert main(args + TINY) == 0  # everything finished: nothing is scored again
    monkeypatch.undo()
    calls = []
    original = runner.score_row
    monkeypatch.setattr(runner, "score_row", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main(["--compressor", "snapkv", "--tasks", "passkey", "--ratios", "2", "8", "--output-dir", str(out)]
                + TINY) == 0
    assert len(calls) == 4  # 2 samples x the 2 new configurations (snapkv, 8) and (truncation, 8)
    capsys.readouterr()
    assert main(["--compare", str(out), str(out), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "snapkv" in capsys.readouterr().out and (tmp_path / "cmp" / "accuracy_vs_ratio.png").is_file()


def test_killed_run_resumes_at_the_sample_where_it_stopped(tmp_path, monkeypatch):
    import ctxzip.eval.runner as runner

    out = tmp_path / "run"
    args = ["--compressor", "streaming_llm", "--tasks", "passkey", "--ratios", "4", "--output-dir", str(out),
            "--base-model", "tiny-random-llama", "--no-progress", "--num-samples", "3", "--context-length", "96", "--n-prompts", "2"]
    original, calls = runner.score_row, []

    def dies_on_the_second_sample(clm, memory, row, *a, **k):
        if row["id"] == runner.build_task("passkey", clm.tokenizer, num_samples=3, context_tokens=96,
                                          seed=0, split="test")[1]["id"]:
            raise KeyboardInterrupt
        calls.append(row["id"])
        return original(clm, memory, row, *a, **k)

    monkeypatch.setattr(runner, "score_row", dies_on_the_second_sample)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert (out / "partial" / "passkey__L96.json").is_file() and not (out / "configs").exists()
    assert len(calls) == 4  # sample 0 of full_context, no_context, truncation and streaming_llm
    monkeypatch.setattr(runner, "score_row", lambda *a, **k: calls.append(a[2]["id"]) or original(*a, **k))
    assert main(args) == 0
    assert len(calls) == 4 + 2 * 4  # only samples 1 and 2 were scored after the restart
    assert not (out / "partial" / "passkey__L96.json").exists()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 3


@pytest.mark.parametrize("args, message", [
    (["--compressor", "snapkv", "--tasks", "no_such_task"], "unknown task"),
    (["--compressor", "no_such_baseline"], "unknown compressor"),
    (["--compressor", "snapkv", "--ratios", "0.5", "2"], "ratios must be >= 1"),
    (["--compressor", "snapkv", "--context-length", "5000", "--no-references"],
     "exceeds the base model's 4096 positions"),
    (["--compressor", "snapkv", "--device_map", "gpu7"], "--device_map must be auto, cuda, cpu"),
    (["--compressor", "snapkv", "--device_map", "meta"], "--device_map meta holds no weights"),
])
def test_clear_errors(tmp_path, capsys, args, message):
    assert main(args + ["--base-model", "tiny-random-llama", "--output-dir", str(tmp_path / "x"),
                        "--num-samples", "1", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_help_names_every_field_with_its_help(capsys):
    from dataclasses import fields

    from ctxzip.eval.runner import EvalConfig

    with pytest.raises(SystemExit) as exit_code:
        main(["--help"])
    assert exit_code.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also after a hyphen)
    for f in fields(EvalConfig):
        assert f"--{f.name}" in text and "".join(f.metadata["help"].split()) in text, f.name


def test_a_yaml_config_sets_defaults_flags_override_and_a_run_config_reruns(tmp_path, monkeypatch):
    import ctxzip.eval.runner as runner

    out = tmp_path / "run"
    config = tmp_path / "eval.yaml"
    config.write_text(f"compressors: [streaming_llm]\ntasks: [passkey]\nratios: [4]\nbase_model: tiny-random-llama\n"
                      f"num_samples: 5\ncontext_lengths: [96]\nn_prompts: 2\nprogress: false\noutput_dir: {out}\n")
    assert main(["--config", str(config), "--num_samples", "1"]) == 0  # the flag overrides the file
    written = (out / "config.yaml").read_text()
    assert "num_samples: 1" in written and "streaming_llm" in written
    monkeypatch.setattr(runner, "score_row", lambda *a, **k: pytest.fail("a finished configuration was rescored"))
    assert main(["--config", str(out / "config.yaml")]) == 0  # the run's own config.yaml is a valid --config


def test_unknown_yaml_keys_and_flags_are_refused(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("compressors: [snapkv]\nnum_sample: 3\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    assert "num_sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--compressor", "snapkv", "--num_sample", "3"])
    assert "num_sample" in capsys.readouterr().err


def test_beyond_the_base_window_only_the_methods_that_read_beyond_it_run(tmp_path, capsys):
    out = tmp_path / "long"
    assert main(["--compressor", "snapkv", "--tasks", "passkey", "--context-length", "256", "5000", "--ratios", "4",
                 "--num-samples", "1", "--n-prompts", "2", "--base-model", "tiny-random-llama", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert "snapkv, full_context cannot run there" in capsys.readouterr().out.replace("full_context, snapkv",
                                                                                        "snapkv, full_context")
    ran = {(s["method"], s["context_length"]) for s in json.loads((out / "metrics.json").read_text())["results"]}
    assert {("truncation", 5000), ("no_context", 5000), ("snapkv", 256), ("full_context", 256)} <= ran
    assert not {("snapkv", 5000), ("full_context", 5000)} & ran


@pytest.mark.parametrize("multi_turn", [False, True])
def test_shared_context_mode_answers_every_question_from_one_memory(tmp_path, monkeypatch, multi_turn):
    from ctxzip.eval import runner, scoring

    memories, answered = [], []
    original_memories, original_shared = runner.Method.memories, scoring.score_shared

    def counting_memories(self, ratios, context, *a, **k):
        memories.append((self.label, context))
        return original_memories(self, ratios, context, *a, **k)

    def recording_shared(clm, memory, questions, *a, **k):
        answered.append((id(memory), len(questions)))
        return original_shared(clm, memory, questions, *a, **k)

    monkeypatch.setattr(runner.Method, "memories", counting_memories)
    monkeypatch.setattr(scoring, "score_shared", recording_shared)
    out = tmp_path / "shared"
    args = ["--compressor", "snapkv", "--tasks", "niah_multikey", "--ratios", "2", "--output-dir", str(out),
            "--num-questions", "3", "--scoring", "generate", "--max-new-tokens", "3", "--timing-samples", "0",
            *(["--multi-turn"] if multi_turn else []), *TINY]
    assert main(args) == 0
    # each (method, context) compressed once; each memory answers all 3 questions
    assert len(memories) == len(set(memories)) == 4 * 2  # full, no context, truncation, snapkv x 2 samples
    assert len(answered) == 4 * 2 and all(n == 3 for _, n in answered)
    results = json.loads((out / "metrics.json").read_text())["results"]
    label = "niah_multikey@3q" + ("-turns" if multi_turn else "")
    assert {r["task"] for r in results} == {label}
    assert all(len(r["accuracy_by_turn"]) == 3 for r in results)
    assert "accuracy by question" in (out / "report.md").read_text()


def test_shared_context_mode_refuses_tasks_with_one_fact(tmp_path, capsys):
    assert main(["--compressor", "snapkv", "--tasks", "passkey", "--num-questions", "2", "--output-dir",
                 str(tmp_path / "x"), *TINY]) != 0
    assert "num-questions" in capsys.readouterr().err


def test_a_benchmark_in_its_published_format_runs_through_the_cli(tmp_path):
    rows = [{"input": f"What is the code of box {i}?", "context": f"Box {i} holds the code {1000 + i}. " * 4,
             "answers": [str(1000 + i)], "_id": str(i), "dataset": "boxes"} for i in range(2)]
    data = tmp_path / "boxes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bench"
    assert main(["--compressor", "snapkv", "--tasks", f"longbench:{data}", "--ratios", "2", "--output-dir", str(out),
                 "--base-model", "tiny-random-llama", "--no-progress", "--num-samples", "2", "--n-prompts", "1"]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert {r["task"] for r in results} == {f"longbench:{data}"} and all(r["n"] == 2 for r in results)
    assert all(r["context_length"] == 0 for r in results)
    assert "its own contexts" in (out / "report.md").read_text()


def test_continuation_rows_give_the_perplexity_with_memory_full_and_no_context(tmp_path):
    import math

    import torch

    from ctxzip.compressors import CompressedLM, load_base
    from ctxzip.compressors.baselines import FullContext, FullContextConfig
    from ctxzip.eval.scoring import score_continuation

    out = tmp_path / "continuation"
    args = ["--compressor", "streaming_llm", "--tasks", "continuation", "--ratios", "4", "--output-dir", str(out)]
    assert main(args + TINY) == 0
    results = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(results) == {"full_context", "no_context", "truncation", "streaming_llm"}
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in results.values())
    assert all(r["scoring"] == "teacher-forced NLL" for r in results.values())
    report = (out / "report.md").read_text()
    assert "Continuation perplexity with the full context" in report and "with no context" in report
    # the floor scores the same continuation tokens after the template's prefix alone
    model, tokenizer = load_base("tiny-random-llama")
    clm = CompressedLM(FullContext(FullContextConfig(), model.eval()), tokenizer)
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
    prefix = clm.layout.prefix_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + ids])).logits[0, len(prefix):-1]
    expected = float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])))
    assert score_continuation(clm, None, row["answer"]) == expected
    floor = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    floor = [r for r in floor if r["method"] == "no_context"]
    assert sum(r["perplexity"] for r in floor) / len(floor) == pytest.approx(results["no_context"]["perplexity"])


def test_a_method_that_makes_a_memory_per_question_gets_one_for_each_and_the_tables_say_so(tmp_path, monkeypatch):
    from ctxzip.compressors import CompressedLM, LCIRCConfig, QDLCIRCCompressor, load_base

    model, tokenizer = load_base("tiny-random-llama")
    config = LCIRCConfig(num_latents=4, segment_length=32, perceiver_layers=1, gate_init=0.5)
    folder = CompressedLM(QDLCIRCCompressor(config, model), tokenizer).save_pretrained(tmp_path / "qd")
    queries: list[int | None] = []
    original = QDLCIRCCompressor.compress

    def recording(self, context_ids, attention_mask=None, query_ids=None, query_mask=None):
        queries.append(None if query_ids is None else query_ids.shape[1])
        return original(self, context_ids, attention_mask, query_ids, query_mask)

    monkeypatch.setattr(QDLCIRCCompressor, "compress", recording)
    out = tmp_path / "run"
    assert main(["--compressor", str(folder), "--tasks", "niah_multikey", "--num-questions", "2", "--scoring",
                 "generate", "--max-new-tokens", "3", "--timing-samples", "0", "--no-references",
                 "--output-dir", str(out), *TINY]) == 0
    # per sample: the runner's memory for the sample, then one for each of its 2 questions; every one for a query
    assert len(queries) == 2 * 3 and all(q for q in queries)
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert any(r["method"] == "qd (a memory per question)" for r in results)
    assert "(a memory per question)" in (out / "report.md").read_text()


def test_learned_config_changes_how_a_saved_compressor_reads_and_the_tables_name_it(tmp_path):
    from ctxzip.compressors import CompressedLM, GistCompressor, GistConfig, load_base

    model, tokenizer = load_base("tiny-random-llama")
    gist = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=2), model)
    folder = CompressedLM(gist, tokenizer).save_pretrained(tmp_path / "gist")
    common = ["--compressor", str(folder), "--tasks", "passkey", "--timing-samples", "0", "--no-references", *TINY]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--learned_config", "recent_tokens=16", "--output-dir", str(tmp_path / "window")]) == 0
    plain, window = (json.loads((tmp_path / run / "metrics.json").read_text())["results"][0]
                     for run in ("plain", "window"))
    assert plain["method"] == "gist" and window["method"] == "gist [recent_tokens=16]"
    # 16 more tokens kept raw: four gists fewer, sixteen raw slots more (the window is 16 tokens per sample)
    assert window["memory_bytes"] > plain["memory_bytes"]
    assert window["achieved_ratio"] < plain["achieved_ratio"]
    assert "gist [recent_tokens=16]" in (tmp_path / "window" / "report.md").read_text()
    assert main([*common, "--learned_config", "recent_tokens", "--output-dir", str(tmp_path / "x")]) == 2


def test_each_method_is_the_type_that_says_how_it_makes_its_memories_and_what_they_cost(monkeypatch):
    """``method_for`` picks the type once (a ``PrefillSelection`` baseline starts from the shared prefill, the floor
    has no memory, the others compress per ratio); ``compress_s`` keeps its meaning on every path."""
    import torch

    from ctxzip.compressors import load_base
    from ctxzip.compressors.baselines import SnapKV
    from ctxzip.eval import runner

    model, tokenizer = load_base("tiny-random-llama")
    model.eval()
    names = ("full_context", "no_context", "truncation", "snapkv", "selective_context")
    made = {name: runner.method_for(name, model, tokenizer) for name in names}
    assert {name: type(m).__name__ for name, m in made.items()} == {
        "full_context": "FromPrefill", "no_context": "NoContext", "truncation": "Method", "snapkv": "FromPrefill",
        "selective_context": "FromPrefill"}
    assert [made[n].ratios([2.0, 4.0]) for n in names] == [[1.0], [0.0], [2.0, 4.0], [2.0, 4.0], [2.0, 4.0]]
    assert [made[n].reads_beyond_window for n in names] == [False, True, True, False, False]
    assert [made[n].prefill_needs() for n in names] == [(0, False), None, None, (32, False), (0, True)]
    context = "The pass key is 48213. Remember it. " + "Grass is green. " * 12
    prefill = runner.shared_prefill(list(made.values()), model, tokenizer, context)
    assert prefill.window == 32 and prefill.token_nll is not None

    def same(first, second):
        return [m.slots for m in first] == [m.slots for m in second] and all(
            torch.allclose(a.tensors[k], b.tensors[k], atol=1e-5) for a, b in zip(first, second) for k in a.tensors)

    # from the shared prefill: its time plus the selection's; alone: every ratio from one pass of its own
    shared, shared_s = made["snapkv"].memories([2.0, 4.0], context, prefill, time_alone=True)
    alone, alone_s = made["snapkv"].memories([2.0, 4.0], context)
    assert same(shared, alone) and shared_s >= prefill.seconds and alone_s > 0
    (full,), full_s = made["full_context"].memories([1.0], context, prefill)
    assert full.slots == prefill.length and full_s >= prefill.seconds
    # a method whose own pass is not a full prefill (EHPC) runs alone on the timed samples, untimed elsewhere
    monkeypatch.setattr(SnapKV, "prefill_is_own_cost", False)
    timed, timed_s = made["snapkv"].memories([2.0, 4.0], context, prefill, time_alone=True)
    untimed, untimed_s = made["snapkv"].memories([2.0, 4.0], context, prefill, time_alone=False)
    assert same(timed, alone) and same(untimed, alone) and timed_s is not None and untimed_s is None
    # one compression per ratio: the longest one; the floor has no memory and costs nothing
    kept, kept_s = made["truncation"].memories([2.0, 4.0], context, prefill)
    assert [m.ratio for m in kept] == [pytest.approx(2.0, rel=0.1), pytest.approx(4.0, rel=0.1)] and kept_s > 0
    assert made["no_context"].memories([0.0], context, prefill) == ([None], 0.0)


def test_samples_split_into_contiguous_blocks_and_a_process_may_have_none():
    from accelerate import PartialState

    from ctxzip.eval.runner import samples_of

    class Process:  # accelerate's own split, as process ``index`` of ``count``
        split_between_processes = PartialState.split_between_processes

        def __init__(self, index: int, count: int) -> None:
            self.process_index, self.num_processes = index, count

    assert [samples_of(3, Process(i, 2)) for i in range(2)] == [[0, 1], [2]]
    assert [samples_of(5, Process(i, 3)) for i in range(3)] == [[0, 1], [2, 3], [4]]
    assert [samples_of(1, Process(i, 2)) for i in range(2)] == [[0], []]  # fewer samples than processes
    assert samples_of(4, Process(0, 1)) == [0, 1, 2, 3]


TIMING = {"compress_s", "answer_s", "prompt_s", "decode_s_per_token", "n_prompts_s", "n_prompts_reread_s",
          "n_prompts_prefix_cache_s"}  # measured per process


def _without_timing(row: dict) -> dict:
    return {k: ("nan" if isinstance(v, float) and v != v else v) for k, v in row.items() if k not in TIMING}


def test_accelerate_launch_splits_the_samples_and_writes_what_one_process_writes(tmp_path):
    """2 CPU processes (gloo, ``accelerate launch --multi_gpu``: ``--cpu --num_processes 2`` starts ONE process
    without mpirun): each answers its block of every task's samples, checkpoints to its own file, and
    the main process merges one result whose numbers are the single-process run's (timings aside); a checkpoint
    is resumed, a task with fewer samples than processes runs, and a rerun of the finished run scores nothing."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = tmp_path / "one.jsonl"  # a benchmark of ONE row: fewer samples than processes
    bench.write_text(json.dumps({"input": "What is the code of box 7?", "context": "Box 7 holds the code 1007. " * 4,
                                 "answers": ["1007"], "_id": "0", "dataset": "boxes"}) + "\n")
    args = ["--compressor", "snapkv", "--tasks", "passkey", "continuation", f"longbench:{bench}", "--ratios", "4",
            "--scoring", "loglik", "--base_model", "tiny-random-llama", "--no_progress", "--num_samples", "3",
            "--context_lengths", "96", "--n_prompts", "2"]
    # on the CPU (gloo) even where GPUs are; ``--multi_gpu`` is what makes accelerate spawn the processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    port = str(free_port())
    root = Path(__file__).resolve().parents[1]

    def launch(*command: str) -> str:
        result = subprocess.run([sys.executable, *command], cwd=root, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    one, two = tmp_path / "one", tmp_path / "two"
    launch("-m", "ctxzip.eval", *args, "--output_dir", str(one))
    # a 2-process run killed after process 0 checkpointed passkey's sample 0 (marked: answer_s = -1)
    (two / "partial").mkdir(parents=True)
    seeded = {}
    for path in sorted((one / "configs").glob("passkey__L96__*.json")):
        seeded[path.stem] = {0: dict(json.loads(path.read_text())["rows"][0], answer_s=-1.0)}
    (two / "partial" / "passkey__L96__process0.json").write_text(json.dumps(seeded))
    accelerate = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                  "-m", "ctxzip.eval", *args, "--output_dir", str(two)]
    out = launch(*accelerate)
    assert out.count("# ctxzip evaluation") == 1  # one report, from the main process
    scored = dict(re.findall(r"process (\d) of 2: (\d+) answers scored", out))
    # 4 configurations (full, no context, truncation, snapkv) per task; samples 0-1 to process 0, 2 to process 1;
    # passkey's sample 0 came from the checkpoint; the one-row benchmark is process 0's alone
    assert scored == {"0": str(4 * 1 + 4 * 2 + 4 * 1), "1": str(4 * 1 + 4 * 1 + 0)}
    assert not (two / "partial").exists()
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert ({k: v for k, v in metrics[0]["config"].items() if k != "output_dir"}
            == {k: v for k, v in metrics[1]["config"].items() if k != "output_dir"})
    results = [[_without_timing(r) for r in m["results"]] for m in metrics]
    assert len(results[1]) == 12 and results[0] == results[1]
    assert {r["task"] for r in results[1]} == {"passkey", "continuation", f"longbench:{bench}"}
    assert any(r["perplexity"] not in ("nan", 1.0) for r in results[1])  # real numbers were compared
    rows = [[json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(rows[1]) == 4 * (3 + 3 + 1) and [_without_timing(r) for r in rows[0]] == [
        _without_timing(r) for r in rows[1]]
    first = next(r["id"] for r in rows[1] if r["task"] == "passkey")
    resumed = [r for r in rows[1] if r["task"] == "passkey" and r["id"] == first]
    assert len(resumed) == 4 and all(r["answer_s"] == -1.0 for r in resumed)  # taken from the checkpoint
    # everything finished: a rerun scores nothing and rewrites no configuration
    stamps = {p.name: p.stat().st_mtime_ns for p in (two / "configs").iterdir()}
    out = launch(*accelerate)
    assert dict(re.findall(r"process (\d) of 2: (\d+) answers scored", out)) == {"0": "0", "1": "0"}
    assert {p.name: p.stat().st_mtime_ns for p in (two / "configs").iterdir()} == stamps


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_device_map_without_cuda_is_refused_before_loading(tmp_path, capsys):
    assert main(["--compressor", "snapkv", "--device_map", "cuda", "--output-dir", str(tmp_path / "x"), *TINY]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_the_device_map_resolves_per_process_and_everything_loads_there():
    from types import SimpleNamespace

    import torch

    from ctxzip.compressors.errors import CtxzipError
    from ctxzip.eval import runner

    one_cpu = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    one_gpu = SimpleNamespace(num_processes=1, device=torch.device("cuda"))
    second_gpu = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    second_cpu = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert [runner.resolve_device_map(v, one_cpu) for v in (None, "auto", "cpu")] == ["cpu", "auto", "cpu"]
    assert [runner.resolve_device_map(v, one_gpu) for v in (None, "cuda", "cuda:1")] == ["cuda", "cuda", "cuda:1"]
    # several processes: the default, cuda and auto are each process's own device; a named device stays
    assert [runner.resolve_device_map(v, second_gpu) for v in (None, "cuda", "auto", "cuda:0", "cpu")] == [
        "cuda:1", "cuda:1", "cuda:1", "cuda:0", "cpu"]
    assert [runner.resolve_device_map(v, second_cpu) for v in (None, "auto")] == ["cpu", "cpu"]
    # auto for a model built in-process (no device map): the default device; a learned compressor follows its base
    model, _ = runner.load_on("tiny-random-llama", "float32", "auto")
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    gist = runner.load_learned("gist", "tiny-random-llama", "float32", "cpu")
    assert {p.device.type for p in gist.parameters()} == {"cpu"} and gist.device.type == "cpu"
    gist.base_lm.lm_head.to("meta")  # a base spread over two devices: a learned compressor there is refused
    with pytest.raises(CtxzipError, match="spread over several devices"):
        runner.on_base_device(gist)


def test_a_method_task_refuses_several_processes_and_a_device_map(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from ctxzip.eval import runner

    args = ["--compressor", "incomes", "--tasks", "edits", "--base-model", "tiny-random-llama", "--num-samples", "1",
            "--output-dir", str(tmp_path / "edits")]
    assert main([*args, "--device_map", "cpu"]) == 2
    assert "does not take --device_map" in capsys.readouterr().err
    monkeypatch.setattr(runner, "process_state", lambda: SimpleNamespace(num_processes=2))
    assert main(args) == 2
    assert "cannot split its samples over the 2 processes" in capsys.readouterr().err


def test_the_filler_source_reaches_the_synthetic_tasks(tmp_path, monkeypatch):
    """--source picks the filler corpus (held-out-corpus evaluation: a text the training never read)."""
    import ctxzip.eval.runner as runner

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i} tells of ships, harbours and the weather at sea, "
                                f"with many plain words to fill a context of some length. " * 3 for i in range(40)))
    seen = []
    original = runner.build_task
    monkeypatch.setattr(runner, "build_task", lambda *a, **k: seen.append(k) or original(*a, **k))
    args = ["--compressor", "truncation", "--tasks", "passkey", "--ratios", "2", "--output-dir", str(tmp_path / "r"),
            "--source", str(text)]
    assert main(args + TINY) == 0
    assert [k["source"] for k in seen] == [str(text)]
    predictions = (tmp_path / "r" / "predictions.jsonl").read_text()
    assert predictions and all(k["split"] == "test" for k in seen)
