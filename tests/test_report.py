"""The report's at-a-glance table: ceiling, floors, the best training-free method, the learned ones."""

from __future__ import annotations

from ctxzip.eval.report import headline, markdown


def summary(task: str, method: str, ratio: float, accuracy: float = float("nan"), source: str | None = None,
            perplexity: float = float("nan"), achieved: float | None = None) -> dict:
    return dict(task=task, context_length=1024, method=method, ratio=ratio, accuracy=accuracy,
                source=source or method, perplexity=perplexity, achieved_ratio=achieved or ratio or 1.0, n=10,
                scoring="generate", memory_bytes=1024)


def test_headline_names_the_best_training_free_method_and_the_learned_ones():
    rows = [summary("passkey", "full_context", 1.0, 0.8), summary("passkey", "no_context", 0.0, 0.0),
            summary("passkey", "truncation", 4.0, 0.1), summary("passkey", "truncation", 16.0, 0.0),
            summary("passkey", "snapkv", 4.0, 0.3), summary("passkey", "pyramidkv", 4.0, 0.3),
            summary("passkey", "qfilters", 4.0, 0.2), summary("passkey", "snapkv", 16.0, 0.1),
            summary("passkey", "qfilters", 16.0, 0.0),
            summary("passkey", "gist-smollm2", 0.0, 0.5, source="out/gist-smollm2", achieved=3.9),
            summary("continuation", "full_context", 1.0, perplexity=10.0),
            summary("continuation", "no_context", 0.0, perplexity=30.0),
            summary("continuation", "snapkv", 4.0, perplexity=12.0),
            summary("continuation", "qfilters", 4.0, perplexity=11.0)]
    lines = headline(rows).splitlines()
    assert lines[0].startswith("| task | length | scoring | full context |")
    assert lines[2] == ("| continuation (perplexity) | 1024 | generate | 10.00 | 30.00 | - / - | qfilters 11.00 | - "
                        "| - |")
    assert lines[3] == ("| passkey | 1024 | generate | 0.800 | 0.000 | 0.100 / 0.000 | pyramidkv, snapkv 0.300 "
                        "| snapkv 0.100 | gist-smollm2 0.500 (3.9x) |")  # ties named together; lower perplexity is better
    assert "## At a glance" in markdown(rows, config={"scoring": "generate"})


def test_every_table_says_how_it_was_scored():
    rows = [summary("passkey", "full_context", 1.0, 0.8), summary("passkey", "snapkv", 4.0, 0.3)]
    rows[1].update(scoring="loglik", bleu=0.5, exact_match=0.0, rouge_l=0.4)
    compared = markdown(rows)  # no run config: a comparison of several runs
    assert "- scoring: **generate** (greedy generation" in compared and "**loglik** (teacher-forced" in compared
    assert "| passkey | 1024 | generate, loglik |" in compared
    assert "| method | ratio | scoring | exact match | BLEU | ROUGE-L |" in compared
    assert "| snapkv | 4 | loglik | 0.000 | 0.500 | 0.400 |" in compared


def test_a_task_beyond_the_model_ranks_nothing():
    rows = [summary("fact_qa", "full_context", 1.0, 0.2), summary("fact_qa", "snapkv", 4.0, 0.3)]
    assert "| beyond the model | beyond the model |" in headline(rows)
    rows = [summary("fact_qa", "full_context", 1.0, 0.8), summary("fact_qa", "snapkv", 16.0, 0.0),
            summary("fact_qa", "qfilters", 16.0, 0.0)]
    assert "| - | none above 0 |" in headline(rows)  # a tie at zero names nothing
