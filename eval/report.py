"""Outputs of an evaluation run: ``metrics.json``, ``predictions.jsonl``, ``config.yaml``,
``report.md`` and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ctxzip.compressors.baselines import BASELINES
from ctxzip.compressors.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from ctxzip.compressors.tables import Column, fmt, markdown_table, missing

from .scoring import with_interval

PLOTS = ("accuracy_vs_ratio.png", "latency_vs_context.png", "memory_vs_context.png")


def _ratio_label(s: dict[str, Any]) -> str:
    if s["method"] == "no_context":
        return "-"
    return "native" if s["ratio"] == 0 else f"{s['ratio']:g}"


BEYOND_THE_MODEL = 0.3  # a full-context ceiling below this: the task is beyond the model at that length


def beyond_the_model(ceiling: float | None) -> bool:
    """Whether a full-context accuracy is too low for the task to rank methods at that length."""
    return not missing(ceiling) and ceiling < BEYOND_THE_MODEL


MAIN_COLUMNS = (
    Column("method", "method"), Column("ratio", cell=lambda s: _ratio_label(s)), Column("scoring", "scoring"),
    Column("achieved ratio", "achieved_ratio", digits=2), Column("accuracy", cell=lambda s: with_interval(s, "accuracy")),
    Column("answer-token acc", cell=lambda s: with_interval(s, "token_accuracy")),
    Column("answer log-prob", cell=lambda s: with_interval(s, "answer_logprob")),
    Column("memory KiB", cell=lambda s: s["memory_bytes"] / 1024, digits=1), Column("compress s", "compress_s"),
    Column("answer s", "answer_s"),
    Column("decode ms/token", cell=lambda s: None if s.get("decode_s_per_token") is None
           else s["decode_s_per_token"] * 1000, digits=1),
    Column("N prompts s (memory / prefix cache / re-read)",
           cell=lambda s: f"{fmt(s.get('n_prompts_s'), 2)} / {fmt(s.get('n_prompts_prefix_cache_s'), 2)} / "
                          f"{fmt(s.get('n_prompts_reread_s'), 2)}"))
BY_QUESTION = Column("accuracy by question (one memory)",
                     cell=lambda s: " / ".join(fmt(a) for a in s.get("accuracy_by_turn") or []) or "-")
PERPLEXITY_COLUMNS = (
    Column("method", "method"), Column("ratio", cell=lambda s: _ratio_label(s)), Column("scoring", "scoring"),
    Column("achieved ratio", "achieved_ratio", digits=2), Column("continuation perplexity", cell=lambda s: with_interval(s, "perplexity", 2)),
    Column("memory KiB", cell=lambda s: s["memory_bytes"] / 1024, digits=1), Column("compress s", "compress_s"))
TEXT_COLUMNS = (Column("method", "method"), Column("ratio", cell=lambda s: _ratio_label(s)), Column("scoring", "scoring"),
                Column("exact match", cell=lambda s: with_interval(s, "exact_match")),
                Column("BLEU", cell=lambda s: with_interval(s, "bleu")),
                Column("ROUGE-L", cell=lambda s: with_interval(s, "rouge_l")))
SCORING_NOTES = {"loglik": "teacher-forced: correct when every answer token is the model's argmax",
                 "generate": "greedy generation, whole-word contains match"}


REFERENCE_METHODS = ("full_context", "no_context", "truncation")


def _score(s: dict[str, Any]) -> float:
    """What ranks a row: accuracy, or (continuation) perplexity, lower is better."""
    return s.get("perplexity", float("nan")) if s["task"] == "continuation" else s["accuracy"]


def _learned(s: dict[str, Any]) -> bool:
    """A trained compressor (a saved folder or Hub id), not a training-free baseline or a reference."""
    return s["method"] not in REFERENCE_METHODS and s.get("source", s["method"]) not in BASELINES


def _training_free(rows: list[dict[str, Any]], with_truncation: bool = False) -> list[dict[str, Any]]:
    """The scored rows of training-free methods. Truncation is one too (``with_truncation``); the headline shows
    it apart, as a floor."""
    skip = ("full_context", "no_context") if with_truncation else REFERENCE_METHODS
    return [s for s in rows if s["method"] not in skip and not _learned(s) and not missing(_score(s))]


def _top(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates sharing the best score (lower perplexity, higher accuracy), by name."""
    lower = candidates[0]["task"] == "continuation"
    best = (min if lower else max)(_score(s) for s in candidates)
    return sorted((s for s in candidates if _score(s) == best), key=lambda s: (s["method"], s["ratio"]))


def _best(rows: list[dict[str, Any]], ratio: float) -> str:
    """The best training-free method at ``ratio`` (ties named together), as ``name value``."""
    candidates = [s for s in _training_free(rows) if s["ratio"] == ratio]
    if not candidates:
        return "-"
    top = _top(candidates)
    lower, best = rows[0]["task"] == "continuation", _score(top[0])
    if not lower and best == 0:
        return "none above 0"  # a tie at zero names nothing
    return f"{', '.join(s['method'] for s in top)} {fmt(best, 2 if lower else 3)}"


def headline(summaries: list[dict[str, Any]]) -> str:
    """Per task and length: the ceiling, the floors (no context, truncation), the best training-free method at
    4x and 16x and every learned compressor at its own ratio: what a user reads first."""
    table = []
    for task in sorted({s["task"] for s in summaries}):
        for length in sorted({s["context_length"] for s in summaries if s["task"] == task}):
            rows = [s for s in summaries if s["task"] == task and s["context_length"] == length]
            by = {(s["method"], s["ratio"]): s for s in rows}
            digits = 2 if task == "continuation" else 3
            ceiling = by.get(("full_context", 1.0))
            beyond = ceiling is not None and task != "continuation" and beyond_the_model(ceiling["accuracy"])
            learned = [s for s in rows if _learned(s)]
            table.append({
                "task": task + (" (perplexity)" if task == "continuation" else ""), "length": length,
                "scoring": ", ".join(sorted({str(s.get("scoring", "-")) for s in rows})),
                "full context": fmt(_score(ceiling), digits) if ceiling else "-",
                "no context": fmt(_score(by[("no_context", 0.0)]), digits) if ("no_context", 0.0) in by else "-",
                "truncation 4x / 16x": " / ".join(fmt(_score(by[("truncation", r)]), digits)
                                                   if ("truncation", r) in by else "-" for r in (4.0, 16.0)),
                "best training-free 4x": "beyond the model" if beyond else _best(rows, 4.0),
                "best training-free 16x": "beyond the model" if beyond else _best(rows, 16.0),
                "learned (achieved ratio)": "; ".join(f"{s['method']} {fmt(_score(s), digits)} "
                                                      f"({fmt(s['achieved_ratio'], 1)}x)" for s in learned) or "-"})
    columns = [Column(key, key) for key in (table[0] if table else {})]
    return markdown_table(table, columns)


def interval_verdict(learned: tuple[float, float] | None, other: tuple[float, float] | None,
                     lower_is_better: bool = False) -> str:
    """``better`` / ``worse`` only when the two 95% intervals do not overlap, ``tie`` when they do: a
    difference inside the intervals is not one. ``-`` when either has no interval."""
    if learned is None or other is None or any(missing(v) for v in (*learned, *other)):
        return "-"
    if learned[0] > other[1]:
        return "worse" if lower_is_better else "better"
    if learned[1] < other[0]:
        return "better" if lower_is_better else "worse"
    return "tie"


def _score_interval(s: dict[str, Any]) -> tuple[float, float] | None:
    """The 95% interval of the score that ranks a row (``ci_low`` / ``ci_high``)."""
    low, high = s.get("ci_low"), s.get("ci_high")
    return None if missing(low) or missing(high) else (float(low), float(high))


def _kib(s: dict[str, Any]) -> float | None:
    value = s.get("memory_bytes")
    return None if missing(value) else value / 1024


def _positive(value: Any) -> bool:
    return not missing(value) and value > 0


def within_budget(learned: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The training-free rows (truncation included) a learned configuration is compared with, and the budget
    that chose them: memory bytes no more than its own, the cost a user pays, when it reports bytes; else
    the same requested ratio, or (a native ratio) at least its achieved ratio."""
    free = _training_free(rows, with_truncation=True)
    if _positive(learned.get("memory_bytes")):
        limit = learned["memory_bytes"]
        return ([s for s in free if _positive(s.get("memory_bytes")) and s["memory_bytes"] <= limit],
                f"<= {fmt(limit / 1024, 1)} KiB")
    if learned["ratio"] > 1:
        return [s for s in free if s["ratio"] == learned["ratio"]], f"ratio {learned['ratio']:g}x"
    achieved = learned.get("achieved_ratio")
    if missing(achieved):
        return [], "no budget"
    return ([s for s in free if not missing(s.get("achieved_ratio")) and s["achieved_ratio"] >= achieved],
            f"ratio >= {fmt(achieved, 1)}x")


def _as_rows(summaries: list[Any]) -> list[dict[str, Any]]:
    """Summary dicts of ``python -m ctxzip.eval``, or ``scoring.Summary`` objects (a recipe's held-out
    comparison: one task, one length, no requested ratio), as dicts."""
    defaults = {"task": "-", "context_length": "-", "ratio": 0.0}
    return [{**defaults, **(asdict(s) if is_dataclass(s) else s)} for s in summaries]


def _versus_row(learned: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """One learned configuration beside the best training-free method within its budget, with the references."""
    task, lower = learned["task"], learned["task"] == "continuation"
    key, digits = ("perplexity", 2) if lower else ("accuracy", 3)
    ceiling = next((s for s in rows if s["method"] == "full_context"), None)
    floor = next((s for s in rows if s["method"] == "no_context"), None)
    candidates, budget = within_budget(learned, rows)
    top = _top(candidates) if candidates else []
    row = {"task": task + (" (perplexity)" if lower else ""), "length": str(learned["context_length"]),
           "ratio": _ratio_label(learned),
           "learned (achieved ratio, KiB)": f"{learned['method']} ({fmt(learned.get('achieved_ratio'), 1)}x, "
                                            f"{fmt(_kib(learned), 1)} KiB)",
           "learned score": with_interval(learned, key, digits),
           "best training-free (budget)": (", ".join(f"{s['method']} {fmt(s.get('achieved_ratio'), 1)}x" for s in top)
                                           if top else "none") + f" ({budget})",
           "its score": with_interval(top[0], key, digits) if top else "-",
           "difference": "-", "verdict": "-",
           "full context (ceiling)": with_interval(ceiling, key, digits) if ceiling else "-",
           "no context (floor)": with_interval(floor, key, digits) if floor else "-"}
    if top and not missing(_score(learned)):
        row["difference"] = f"{_score(learned) - _score(top[0]):+.{digits}f}"
        row["verdict"] = interval_verdict(_score_interval(learned), _score_interval(top[0]), lower)
        if ceiling is not None and not lower and beyond_the_model(ceiling["accuracy"]):
            row["verdict"] = "beyond the model"
    return row


def learned_vs_training_free(summaries: list[Any]) -> str:
    """Per task, context length and requested ratio: each learned compressor's score and 95% interval beside
    the best training-free method's at the same memory bytes or fewer (``within_budget``), their difference,
    and the verdict (``interval_verdict``: better / worse only when the intervals are disjoint), with the
    full-context ceiling and the no-context floor on the same row. Takes the summaries of ``python -m
    ctxzip.eval`` or a recipe's ``compare_with_baselines``; a markdown table, or ``""`` with no learned
    compressor."""
    rows = _as_rows(summaries)
    table = []
    for learned in sorted((s for s in rows if _learned(s) and not missing(_score(s))),  # unscored: nothing to say
                          key=lambda s: (s["task"], str(s["context_length"]), s["ratio"], s["method"])):
        cell = [s for s in rows if s["task"] == learned["task"] and s["context_length"] == learned["context_length"]]
        table.append(_versus_row(learned, cell))
    if not table:
        return ""
    headers = ("task", "length", "ratio", "learned (achieved ratio, KiB)", "learned score",
               "best training-free (budget)", "its score", "difference", "verdict", "full context (ceiling)",
               "no context (floor)")
    return markdown_table(table, [Column(key, key) for key in headers])


def markdown(summaries: list[dict[str, Any]], title: str = "Evaluation", config: dict[str, Any] | None = None) -> str:
    lines = [f"# {title}", ""]
    if config:
        lines += [f"- base model: `{config.get('base_model')}`",
                  f"- samples per configuration: {config.get('num_samples')}, seed {config.get('seed')}, "
                  f"split `{config.get('split')}`",
                  f"- scoring: **{config.get('scoring')}** ({SCORING_NOTES.get(config.get('scoring'), '')})",
                  f"- dtype: `{config.get('dtype')}`", ""]
    elif summaries:  # a comparison of several runs: say how each scoring present was done
        scorings = sorted({str(s.get("scoring")) for s in summaries if s.get("scoring")})
        lines += ["- scoring: " + "; ".join(f"**{name}** ({SCORING_NOTES.get(name, '')})" for name in scorings)
                  + " (each row's own in its scoring column)", ""]
    if summaries:
        lines += ["## At a glance", "", "Accuracy (continuation: perplexity, lower is better) per task and length; "
                  "a task whose full-context ceiling is under " f"{BEYOND_THE_MODEL} is beyond the model there and "
                  "ranks nothing; the tables below give each number's 95% interval.", "", headline(summaries), ""]
        versus = learned_vs_training_free(summaries)
        if versus:
            lines += ["## Learned vs the best training-free method at the same bytes", "",
                      "Each learned compressor beside the best training-free method (truncation included) whose "
                      "memory holds no more bytes than its own, with 95% intervals (Wilson for accuracies, a seeded "
                      "bootstrap of the mean otherwise): *better* or *worse* only when the intervals do not overlap, "
                      "else *tie*.", "", versus, ""]
    for task in sorted({s["task"] for s in summaries}):
        for length in sorted({s["context_length"] for s in summaries if s["task"] == task}):
            rows = sorted((s for s in summaries if s["task"] == task and s["context_length"] == length),
                          key=lambda s: (s["method"] != "full_context", s["method"], s["ratio"]))
            full = [s for s in rows if s["method"] == "full_context"]
            floor = [s for s in rows if s["method"] == "no_context"]
            lines += [f"## {task}, " + ("its own contexts" if length == 0 else f"{length}-token contexts"), ""]
            if task == "continuation":  # no answers to count: how well the memory predicts what follows
                lines += ([_perplexity_line(full, floor), ""] if full or floor else [])
                lines += [markdown_table(rows, PERPLEXITY_COLUMNS), "", ""]
                continue
            if full:
                ceiling = full[0]["accuracy"]
                lines += [f"Full-context ceiling: accuracy **{with_interval(full[0], 'accuracy')}** (n={full[0]['n']})"
                          + (f"; no context (the question alone): **{with_interval(floor[0], 'accuracy')}**"
                             if floor else "")
                          + "."]
                if beyond_the_model(ceiling):
                    lines += [f"**Beyond the model at this length**: the ceiling is under {BEYOND_THE_MODEL}, so "
                              "these accuracies do not rank the methods (read the answer log-probability instead)."]
                lines.append("")
            by_turn = any(s.get("accuracy_by_turn") for s in rows)
            lines += [markdown_table(rows, MAIN_COLUMNS + ((BY_QUESTION,) if by_turn else ())), ""]
            extra = [s for s in rows if not missing(s.get("bleu"))]
            if extra:
                lines += [markdown_table(extra, TEXT_COLUMNS), ""]
            lines.append("")
    n = summaries[0].get("n_prompts", 10) if summaries else 10
    lines += ["Notes: *achieved ratio* = context tokens / real memory slots per layer (requested ratio in "
              "the second column). *memory KiB* = bytes the Memory tensors really hold (PyramidKV's padded "
              "layers included). *answer-token acc*: fraction of answer tokens that are the model's argmax "
              "(partial credit; loglik scoring). *compress s* is what one compression of one context "
              "costs the method alone: the runner prefills each sample ONCE for every method that can "
              "start from a prefill (KV selection, full context, Selective Context's self-information, "
              "EHPC's scores) and charges that prefill to each of them plus its own work; EHPC, whose own "
              "path is a cheaper early-exit pass, is timed alone on the timed samples; the one-time "
              "calibration of Q-Filters and EHPC is not included. *answer s* "
              "reads the question and answer after the memory. *decode ms/token*: greedy decoding after "
              f"the memory (first sample). *N prompts*: N={n} prompts about one context, timed end to end on the first sample: compress "
              "once + N answers from the memory, beside the full cache built once and reused (prefix caching) "
              "and re-reading the full context for every prompt.", ""]
    return "\n".join(lines)


def _perplexity_line(full: list[dict[str, Any]], floor: list[dict[str, Any]]) -> str:
    """The references of the continuation task: perplexity of the next tokens after the full context (the
    ceiling: lower is better) and after no context at all."""
    parts = ([f"Continuation perplexity with the full context: **{with_interval(full[0], 'perplexity', 2)}**"]
             if full else [])
    if floor:
        parts.append(f"with no context: **{with_interval(floor[0], 'perplexity', 2)}**")
    return "; ".join(parts) + ". Each method's perplexity lies between them when its memory helps (lower is better)."


def plot(summaries: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({s["task"] for s in summaries})
    if not tasks:
        return written
    length = max(s["context_length"] for s in summaries)
    # loglik scoring also has the per-token accuracy: a second row, readable when every exact
    # accuracy is 0 (a small model on long contexts)
    metrics = [("accuracy", "accuracy")]
    if any(not missing(s.get("token_accuracy")) for s in summaries):
        metrics.append(("token_accuracy", "answer-token accuracy"))
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.5 * len(tasks), 3.6 * len(metrics)),
                             squeeze=False)
    for (key, ylabel), row_axes in zip(metrics, axes):
        for ax, task in zip(row_axes, tasks):
            rows = [s for s in summaries if s["task"] == task and s["context_length"] == length]
            continuation = task == "continuation"  # perplexity, lower is better, instead of an accuracy
            shown = "perplexity" if continuation else key
            for method in sorted({s["method"] for s in rows}):
                pts = sorted((s["achieved_ratio"], s.get(shown, float("nan"))) for s in rows if s["method"] == method)
                if method == "full_context":
                    ax.axhline(pts[0][1], color="black", linestyle="--", label="full context (ceiling)")
                    continue
                style = dict(color="grey", linestyle=":", marker="x") if method == "truncation" else dict(marker="o")
                label = "truncation (floor)" if method == "truncation" else method
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("achieved compression ratio")
            ax.set_ylabel("continuation perplexity" if continuation else ylabel)
            if not continuation:
                ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{task} ({length} tokens)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    written.append(out / PLOTS[0])
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for name, key, ylabel, scale in ((PLOTS[1], "compress_s", "compression (prefill) s", 1.0),
                                     (PLOTS[2], "memory_bytes", "memory MiB", 1 / 2**20)):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ratios = sorted({s["ratio"] for s in summaries if s["ratio"] > 1})
        ref_ratio = ratios[len(ratios) // 2] if ratios else None
        for method in sorted({s["method"] for s in summaries}):
            rows = [s for s in summaries if s["method"] == method and
                    (s["ratio"] in (0.0, 1.0) or s["ratio"] == ref_ratio)]
            by_len: dict[int, list[float]] = {}
            for s in rows:
                by_len.setdefault(s["context_length"], []).append(s[key] * scale)
            xs = sorted(by_len)
            ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker="o", label=method)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} (ratio {ref_ratio:g})" if ref_ratio else ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def read_predictions(out: Path) -> list[dict[str, Any]]:
    """Every scored row of the finished configurations in ``out`` (``configs/*.json``)."""
    rows = []
    for path in sorted((out / "configs").glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    return rows


def write_outputs(out: Path, summaries: list[dict[str, Any]], config: dict[str, Any]) -> None:
    write_json_atomic(out / "metrics.json", {"config": config, "results": summaries}, indent=1, default=float)
    write_jsonl_atomic(out / "predictions.jsonl", read_predictions(out), default=float)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(out / "report.md", markdown(summaries, f"ctxzip evaluation: {out.name}", config))
    plot(summaries, out)


def compare(dirs: list[str], output_dir: str | None = None) -> str:
    """One table (and plots, with ``output_dir``) over the ``metrics.json`` of several runs.

    References (full context, truncation) measured by several runs are kept once (the first)."""
    merged: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d} has no metrics.json (is it an evaluation output folder?)")
        for s in json.loads(path.read_text())["results"]:
            key = (s["task"], s["context_length"], s["method"], s["ratio"])
            if key in seen:
                continue
            seen.add(key)
            merged.append(s)
    text = markdown(merged, "ctxzip comparison: " + ", ".join(Path(d).name for d in dirs))
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", {"config": {"compare": dirs}, "results": merged}, indent=1,
                          default=float)
        write_text_atomic(out / "report.md", text)
        plot(merged, out)
    return text
