"""Passage retrieval data for CoLoR: corpus and queries, candidate compressions, labels and pairs.

The pipeline has four stages; each is cached on disk under one folder, written in parts with atomic
renames (a killed run never leaves half a file), and resumes where it stopped:

1. ``corpus``: passages (``passage_id``, ``passage``) and queries (``query``, ``gold_id``), each query
   with exactly one gold passage. Offline default (`offline_corpus`): one templated fact about a
   distinct person embedded in a real paragraph of the offline text source, and the question about
   that fact as the query. Any Hub or local dataset with those columns works too (`load_corpus`).
   Passages are grouped into *windows* of ``corpus_size``: the corpus a reader sees at once.
2. ``candidates`` (`generate_candidates`): several compressions per passage, one per *variant*
   (a prompt / length target / sampling setting), written by a caller-given function.
3. ``labels`` (`label_candidates`): for each variant, the window's passages are replaced by their
   compressions under that variant (or one candidate at a time among the others as they are) and a
   reader ranks them for each query; a candidate succeeds when every query of its passage ranks the
   passage first.
4. ``pairs`` (`make_pairs`): per passage, chosen = the shortest successful candidate and rejected =
   the longest failed one; the released CoLoR code's variants cover passages with no failure
   (shortest vs longest) and with no success (skipped, its "hard" setting, or shortest vs longest).

This module imports neither the compressor nor the readers (``evaluation``): generators and readers
are passed in. Tables are read with the generic ``data.sources.load_table``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import datasets

from ctxzip.data.mixture import FACT_DRAWS, FAMILIES
from ctxzip.data.sources import Haystack, load_table, load_texts
from ctxzip.data.tasks import TaskSpec, _needles_in_filler

from ..io import write_json_atomic, write_jsonl_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "LABEL_NEGATIVES", "PASSAGE_COLUMNS", "QUERY_COLUMNS", "PairRules", "Retriever", "RetrievalCorpus", "Stage",
    "Variant", "extract", "generate_candidates", "label_candidates", "load_corpus", "make_pair", "make_pairs",
    "offline_corpus", "parse_variants", "passage_pairs", "split_sentences",
]

#: Part of every stage's cache key: bump it when a stage's logic changes, so old caches are recomputed.
PIPELINE_VERSION = 3
PASSAGE_COLUMNS = ("passage_id", "passage")
QUERY_COLUMNS = ("query", "gold_id")


# ---------------------------------------------------------------------------------------
# stage cache


def _fingerprint(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """One cached, resumable pipeline stage: records computed batch by batch into atomic part files.

    ``config`` identifies what the stage computes (including the fingerprints of the stages it
    reads); a folder left by a different config is discarded and recomputed, with a notice.
    """

    def __init__(self, root: str | os.PathLike, name: str, config: dict[str, Any], verbose: bool = True) -> None:
        self.dir = Path(root) / name
        self.name = name
        config = {**config, "pipeline_version": PIPELINE_VERSION}
        self.fingerprint = _fingerprint(config)
        self.verbose = verbose
        manifest = self.dir / "stage.json"
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text()).get("fingerprint")
            except json.JSONDecodeError:
                old = None
            if old != self.fingerprint:
                if verbose:
                    print(f"[{name}] cached stage in {self.dir} was made with other settings: recomputing it")
                shutil.rmtree(self.dir)
        if not manifest.is_file():
            write_json_atomic(manifest, {"fingerprint": self.fingerprint, "config": config, "complete": False},
                              indent=1, default=str)

    @property
    def complete(self) -> bool:
        return bool(json.loads((self.dir / "stage.json").read_text()).get("complete"))

    def _part(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.jsonl"

    def run(self, items: Sequence[Any], fn: Callable[[list[Any]], list[dict[str, Any]]], batch_size: int,
            desc: str | None = None, unit: str = "item") -> list[dict[str, Any]]:
        """Apply ``fn`` to ``items`` in batches, skipping batches already on disk; all records in order."""
        from tqdm.auto import tqdm

        batch_size = max(1, batch_size)
        starts = list(range(0, len(items), batch_size))
        done = [s for i, s in enumerate(starts) if self._part(i).is_file()]
        todo = len(starts) - len(done)
        if done and todo and self.verbose:
            print(f"[{self.name}] resuming: {len(done)} of {len(starts)} batches already cached in {self.dir}")
        initial = sum(min(batch_size, len(items) - s) for s in done)
        bar = tqdm(total=len(items), initial=initial, desc=desc or self.name, unit=unit, disable=not todo)
        for index, start in enumerate(starts):
            if self._part(index).is_file():
                continue
            batch = list(items[start:start + batch_size])
            records = fn(batch)
            write_jsonl_atomic(self._part(index), records)
            bar.update(len(batch))
        bar.close()
        manifest = json.loads((self.dir / "stage.json").read_text())
        if not manifest.get("complete"):
            manifest.update(complete=True, parts=len(starts))
            write_json_atomic(self.dir / "stage.json", manifest, indent=1, default=str)
        return self.records(len(starts))

    def records(self, parts: int | None = None) -> list[dict[str, Any]]:
        count = parts if parts is not None else json.loads((self.dir / "stage.json").read_text()).get("parts", 0)
        out: list[dict[str, Any]] = []
        for index in range(count):
            out += [json.loads(line) for line in self._part(index).read_text().splitlines() if line.strip()]
        return out


# ---------------------------------------------------------------------------------------
# 1. corpus and queries


@dataclass
class RetrievalCorpus:
    """Passages and queries of one split, grouped into windows of ``corpus_size`` passages."""

    passages: list[dict[str, Any]]  # passage_id, passage, window
    queries: list[dict[str, Any]]  # query_id, query, gold_id, window
    corpus_size: int
    fingerprint: str = ""

    @property
    def windows(self) -> list[list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for p in self.passages:
            out.setdefault(p["window"], []).append(p)
        return [out[w] for w in sorted(out)]

    def queries_of(self, window: int) -> list[dict[str, Any]]:
        return [q for q in self.queries if q["window"] == window]

    def passage(self, passage_id: str) -> dict[str, Any]:
        return self._by_id[passage_id]

    @property
    def _by_id(self) -> dict[str, dict[str, Any]]:
        return {p["passage_id"]: p for p in self.passages}

    def to_datasets(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        return datasets.Dataset.from_list(self.passages), datasets.Dataset.from_list(self.queries)


def _windowed(passages: list[dict[str, Any]], queries: list[dict[str, Any]], corpus_size: int,
              fingerprint: str) -> RetrievalCorpus:
    if corpus_size < 1:
        raise ValueError(f"corpus_size must be >= 1, got {corpus_size}")
    window_of = {}
    for i, p in enumerate(passages):
        p["window"] = i // corpus_size
        window_of[p["passage_id"]] = p["window"]
    for q in queries:
        q["window"] = window_of[q["gold_id"]]
    return RetrievalCorpus(passages, queries, corpus_size, fingerprint)


def offline_corpus(tokenizer: PreTrainedTokenizerBase, num_passages: int, passage_tokens: int = 96,
                   corpus_size: int = 8, seed: int = 0, split: str = "train", source: str = "pydoc",
                   cache_dir: str | os.PathLike | None = None,
                   families: Sequence[str] = ("multi_fact",)) -> RetrievalCorpus:
    """Passages of ``passage_tokens`` real text, each holding one fact that its query asks.

    The facts and queries come from `data.mixture`'s retrieval ``families`` (``multi_fact``: "Ask Rosa
    Sato about their favourite colour and you will hear amber." / "Which favourite colour belongs to Rosa
    Sato?"; ``retrieve_number``: "The code for the blue locker is 418203." / ...), passage ``i`` from
    family ``i mod len(families)``, worded with the templates of ``split``: ``"train"`` uses the
    families' training wordings, ``"test"`` only their held-out ones, so a held-out query and its fact
    are phrased in ways the policy never saw. The filler is the ``split`` part of ``source`` (by topic
    for pydoc, by module for stdlib); the recipe's held-out corpus reads another source as well
    (``eval_data_source``). A family's keys are dealt from one shuffle of its key list, so no key
    repeats within a window of ``corpus_size`` passages (each query has exactly one gold passage where
    it is asked); a family with fewer keys than passages repeats them, in other windows. Cached as
    stage ``corpus-<split>`` under ``cache_dir`` when given.
    """
    check_fact_families(families)
    if num_passages < 1:
        raise ValueError(f"num_passages must be >= 1, got {num_passages}")
    uses = {f: len(range(i, num_passages, len(families))) for i, f in enumerate(families)}
    pools = {f: random.Random(_key_stream(split, seed, f)).sample(FAMILIES[f].keys, min(uses[f], len(FAMILIES[f].keys)))
             for f in families}
    per_window = -(-min(corpus_size, num_passages) // len(families))  # passages of one family in a window
    short = [f for f in families if len(FAMILIES[f].keys) < per_window]
    if short:
        raise ValueError(f"windows of {corpus_size} passages need {per_window} keys per family; {short} have fewer")
    config = {"kind": "offline-facts", "num_passages": num_passages, "passage_tokens": passage_tokens,
              "seed": seed, "split": split, "source": source, "families": list(families),
              "tokenizer": getattr(tokenizer, "name_or_path", "")}
    haystack = Haystack(load_texts(source, split=split), tokenizer)
    spec = TaskSpec("color_retrieval", haystack, passage_tokens, None, split=split)

    def build(indices: list[int]) -> list[dict[str, Any]]:
        rows = []
        for i in indices:
            r = random.Random(f"ctxzip/color-corpus/{split}/{seed}/{i}")
            name = families[i % len(families)]
            family, pool = FAMILIES[name], pools[name]
            fact = FACT_DRAWS[name](r, pool[(i // len(families)) % len(pool)])
            needle = r.choice(family.needles.of(split)).format(**fact)
            query = r.choice(family.questions.of(split)).format(**fact)
            passage, _ = _needles_in_filler(r, spec, [(r.random(), needle)])
            pid = f"{split}-{source}-{i}"
            rows.append({"passage_id": pid, "passage": passage, "query_id": f"q-{pid}", "query": query,
                         "gold_id": pid, "answer": fact["value"], "needle": needle, "family": name})
        return rows

    items = list(range(num_passages))
    if cache_dir is not None:
        stage = Stage(cache_dir, f"corpus-{split}", config)
        rows = stage.run(items, build, batch_size=64, desc=f"corpus ({split})", unit="passage")
    else:
        rows = build(items)
    passages = [{"passage_id": r["passage_id"], "passage": r["passage"]} for r in rows]
    queries = [{"query_id": r["query_id"], "query": r["query"], "gold_id": r["gold_id"], "answer": r["answer"],
                "needle": r["needle"], "family": r["family"]} for r in rows]
    return _windowed(passages, queries, corpus_size, _fingerprint(config))


def check_fact_families(families: Sequence[str], what: str = "families") -> None:
    """Refuse an empty, repeated or unknown list of retrieval families (the ones `offline_corpus` can draw)."""
    if not families or len(set(families)) != len(families) or any(f not in FACT_DRAWS for f in families):
        raise ValueError(f"{what} must be distinct retrieval families of data.mixture ({', '.join(FACT_DRAWS)}), "
                         f"got {list(families)}")


def _key_stream(split: str, seed: int, family: str) -> str:
    """The seed of the shuffle a family's keys are dealt from; multi_fact's is the one the corpus had when it was
    that family alone, so its passages (the default held-out set) stay the ones every published figure used."""
    return f"ctxzip/color-corpus/{split}/{seed}" + ("" if family == "multi_fact" else f"/{family}")


def check_columns(table: datasets.Dataset, needed: Sequence[str], what: str, name: str) -> None:
    """Raise a ``ValueError`` naming the missing columns and the ones the table has."""
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{what} {name!r} lacks the column(s) {missing} that CoLoR needs; it has {sorted(table.column_names)}. "
            f"A passages table needs {list(PASSAGE_COLUMNS)}, a queries table {list(QUERY_COLUMNS)}")


def load_corpus(passages: str | datasets.Dataset, queries: str | datasets.Dataset, corpus_size: int = 8,
                split: str = "train", max_passages: int | None = None, seed: int = 0) -> RetrievalCorpus:
    """A corpus from any Hub or local dataset(s) with ``passage_id``/``passage`` and ``query``/``gold_id``.

    ``passages`` and ``queries`` may name the same dataset when it holds all four columns. Only the
    first ``max_passages`` passages that some query asks for are kept (with their queries); they
    are shuffled with ``seed`` before being cut into windows, so windows mix topics.
    """
    name_p = passages if isinstance(passages, str) else "<Dataset>"
    name_q = queries if isinstance(queries, str) else "<Dataset>"
    p_table = load_table(passages, split, "passages dataset")
    check_columns(p_table, PASSAGE_COLUMNS, "passages dataset", name_p)
    q_table = p_table if queries is passages else load_table(queries, split, "queries dataset")
    check_columns(q_table, QUERY_COLUMNS, "queries dataset", name_q)
    texts: dict[str, str] = {}
    for row in p_table.select_columns(list(PASSAGE_COLUMNS)):
        texts.setdefault(str(row["passage_id"]), str(row["passage"]))
    asked: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(q_table.select_columns(list(QUERY_COLUMNS))):
        gold = str(row["gold_id"])
        if gold not in texts:
            raise ValueError(f"query {i} ({row['query']!r}) names gold_id {gold!r}, which is not a passage_id of "
                             f"the passages dataset {name_p!r}")
        asked.setdefault(gold, []).append({"query_id": f"q{i}", "query": str(row["query"]), "gold_id": gold})
    ids = sorted(asked)
    random.Random(f"ctxzip/color-load/{seed}").shuffle(ids)
    if max_passages is not None:
        ids = ids[:max_passages]
    if not ids:
        raise ValueError(f"no query of {name_q!r} has its gold passage in {name_p!r}")
    rows = [{"passage_id": pid, "passage": texts[pid]} for pid in ids]
    qs = [q for pid in ids for q in asked[pid]]
    fingerprint = _fingerprint({"passages": name_p, "queries": name_q, "split": split, "ids": ids,
                                "hash": _fingerprint([r["passage"] for r in rows] + [q["query"] for q in qs])})
    return _windowed(rows, qs, corpus_size, fingerprint)


# ---------------------------------------------------------------------------------------
# 2. candidates


@dataclass(frozen=True)
class Variant:
    """One way of writing a candidate: the policy under a prompt / length target / sampling setting, or
    an extract of the passage's own sentences (the paper draws candidates from several writers; an
    extract is a writer that needs no model)."""

    name: str
    words_fraction: float | None = None  # None = the compressor's own prompt
    do_sample: bool = False
    temperature: float = 1.0
    extract_sentences: int | None = None  # an extract: this many sentences drawn at random, in order
    draw: int = 0  # which random draw (extract) or which group of one shuffle (group)
    disjoint: bool = False  # group: draws of one size are disjoint groups of one shuffle of the sentences

    @property
    def generates(self) -> bool:
        """Whether the policy writes this candidate (extracts are cut from the passage, no model)."""
        return self.extract_sentences is None


VARIANT_HELP = ("'greedy', 'words:F' (at most F x the passage's words, greedy; 0 < F <= 1), 'sample:T' (T > 0) "
                "'extract:N[:D]' (N of the passage's sentences at random, draw D) or 'group:N:D' (the D-th group of N "
                "sentences of one shuffle: groups of one N do not overlap)")


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """Candidate variants from their specs (`VARIANT_HELP`)."""
    out = []
    for spec in specs:
        kind, _, value = spec.partition(":")
        try:
            if kind == "greedy" and not value:
                out.append(Variant(spec))
            elif kind == "words" and 0 < float(value) <= 1:
                out.append(Variant(spec, words_fraction=float(value)))
            elif kind == "sample" and float(value) > 0:
                out.append(Variant(spec, do_sample=True, temperature=float(value)))
            elif kind in ("extract", "group"):
                count, _, draw = value.partition(":")
                if int(count) < 1 or int(draw or 0) < 0 or (kind == "group" and not draw):
                    raise ValueError
                out.append(Variant(spec, extract_sentences=int(count), draw=int(draw or 0), disjoint=kind == "group"))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad candidate variant {spec!r}: use {VARIANT_HELP}") from None
    if len({v.name for v in out}) != len(out):
        raise ValueError(f"candidate variants repeat: {list(specs)}")
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """The passage's sentences (a split after ``.``, ``!``, ``?`` followed by white space, and at line breaks)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def extract(passage: str, variant: Variant, seed: int | str, passage_id: str) -> str:
    """``variant.extract_sentences`` of the passage's sentences drawn at random, joined in their original order.

    ``extract:N:D``: an independent draw, reproducible from the seed, the variant and the passage id (two
    draws may pick the same sentences). ``group:N:D``: the sentences are shuffled once per passage and
    size, and draw D takes the D-th group of N of that shuffle, so ``group:1:0`` ... ``group:1:K`` are K+1
    different sentences; past the last group the draws start again from the first."""
    assert variant.extract_sentences is not None
    sentences = split_sentences(passage)
    if not sentences:
        return ""
    size = min(variant.extract_sentences, len(sentences))
    if not variant.disjoint:
        rng = random.Random(f"ctxzip/color-extract/{seed}/{variant.name}/{passage_id}")
        return " ".join(sentences[i] for i in sorted(rng.sample(range(len(sentences)), size)))
    order = list(range(len(sentences)))
    random.Random(f"ctxzip/color-extract/{seed}/{size}/{passage_id}").shuffle(order)
    start = (variant.draw % max(1, len(sentences) // size)) * size
    return " ".join(sentences[i] for i in sorted(order[start:start + size]))


#: ``generate(passages, variant) -> [(token_ids, text), ...]``, one per passage.
Generator = Callable[[list[dict[str, Any]], Variant], list[tuple[list[int], str]]]


def generate_candidates(corpus: RetrievalCorpus, variants: Sequence[Variant], generate: Generator,
                        cache_dir: str | os.PathLike, config: dict[str, Any], batch_size: int = 8,
                        name: str = "candidates") -> list[dict[str, Any]]:
    """One compression of every passage per variant (cached stage ``name``).

    ``config`` describes the writer (model, prompt, generation settings); it and the corpus
    fingerprint decide whether the cache is reused. Records: passage_id, variant, ids, text, tokens.
    """
    stage = Stage(cache_dir, name, {"corpus": corpus.fingerprint, "variants": [asdict(v) for v in variants],
                                    "writer": config})
    items = [(v, p) for v in variants for p in corpus.passages]

    def run(batch: list[tuple[Variant, dict[str, Any]]]) -> list[dict[str, Any]]:
        records = []
        for variant in dict.fromkeys(v for v, _ in batch):
            passages = [p for v, p in batch if v == variant]
            for p, (ids, text) in zip(passages, generate(passages, variant)):
                records.append({"passage_id": p["passage_id"], "variant": variant.name, "ids": list(ids),
                                "text": text, "tokens": len(ids)})
        return records

    return stage.run(items, run, batch_size, desc=f"{name} (generating)", unit="candidate")


# ---------------------------------------------------------------------------------------
# 3. labels


class Retriever(Protocol):
    """What the labels stage needs from a reader (``evaluation`` has the real ones)."""

    name: str

    def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
        """For each query, passage indices from best to worst."""


def corpus_texts(corpus: RetrievalCorpus, candidates: list[dict[str, Any]] | None,
                 variant: str | None) -> dict[str, str]:
    """passage_id -> the text a reader sees: the passage itself or its compression under ``variant``."""
    if candidates is None:
        return {p["passage_id"]: p["passage"] for p in corpus.passages}
    texts = {c["passage_id"]: c["text"] for c in candidates if c["variant"] == variant}
    missing = [p["passage_id"] for p in corpus.passages if p["passage_id"] not in texts]
    if missing:
        raise ValueError(f"no {variant!r} compression of passages {missing[:5]}")
    return texts


def retrieve(corpus: RetrievalCorpus, texts: dict[str, str], reader: Retriever,
             windows: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Rank each window's passages (as ``texts``) for its queries; one record per query."""
    out = []
    for window in corpus.windows:
        index = window[0]["window"]
        if windows is not None and index not in windows:
            continue
        queries = corpus.queries_of(index)
        if not queries:
            continue
        ids = [p["passage_id"] for p in window]
        rankings = reader.rank([texts[pid] for pid in ids], [q["query"] for q in queries])
        for q, ranking in zip(queries, rankings):
            order = [ids[i] for i in ranking]
            out.append({"query_id": q["query_id"], "gold_id": q["gold_id"], "window": index,
                        "gold_rank": order.index(q["gold_id"]) + 1, "top": order[0]})
    return out


#: What a candidate competes against when it is labelled (``label_candidates``' ``negatives``).
LABEL_NEGATIVES = ("compressed", "original")


def label_candidates(corpus: RetrievalCorpus, candidates: list[dict[str, Any]], variants: Sequence[Variant],
                     reader: Retriever, cache_dir: str | os.PathLike, candidates_fingerprint: str = "",
                     name: str = "labels", negatives: str = "compressed") -> list[dict[str, Any]]:
    """Success of each (passage, variant) candidate with ``reader`` in the loop (cached stage ``name``).

    ``negatives="compressed"`` (the paper): every passage of a window is replaced by its compression under
    the variant at once, the corpus the reader sees compressed as a whole. ``"original"``: each candidate is
    ranked alone among the window's other passages as they are, so it cannot win because the others lost
    their facts too (with ``compressed``, a short extract that keeps nothing of the fact still ranks first
    about once per window size by chance). A candidate succeeds when every query whose gold it is ranks it
    first. Records: passage_id, variant, success, gold_rank.
    """
    if negatives not in LABEL_NEGATIVES:
        raise ValueError(f"label negatives must be one of {list(LABEL_NEGATIVES)}, got {negatives!r}")
    stage = Stage(cache_dir, name, {"corpus": corpus.fingerprint, "candidates": candidates_fingerprint,
                                    "variants": [v.name for v in variants], "reader": reader.name,
                                    "corpus_size": corpus.corpus_size, "negatives": negatives})
    windows = [w[0]["window"] for w in corpus.windows]
    items = [(v.name, w) for v in variants for w in windows]
    originals = corpus_texts(corpus, None, None)

    def rankings(variant: str, window: int) -> list[dict[str, Any]]:
        texts = corpus_texts(corpus, candidates, variant)
        if negatives == "compressed":
            return retrieve(corpus, texts, reader, windows=[window])
        out = []
        for passage in corpus.windows[windows.index(window)]:
            pid = passage["passage_id"]
            alone = retrieve(corpus, {**originals, pid: texts[pid]}, reader, windows=[window])
            out.extend(r for r in alone if r["gold_id"] == pid)
        return out

    def run(batch: list[tuple[str, int]]) -> list[dict[str, Any]]:
        records = []
        for variant, window in batch:
            ranks: dict[str, list[int]] = {}
            for r in rankings(variant, window):
                ranks.setdefault(r["gold_id"], []).append(r["gold_rank"])
            for pid, gold_ranks in ranks.items():
                records.append({"passage_id": pid, "variant": variant, "success": all(g == 1 for g in gold_ranks),
                                "gold_rank": max(gold_ranks)})
        return records

    return stage.run(items, run, batch_size=1, desc=f"{name} ({reader.name} reader)", unit="window")


# ---------------------------------------------------------------------------------------
# 4. pairs


@dataclass(frozen=True)
class PairRules:
    """How pairs are made when a passage's candidates are not a mix of successes and failures.

    ``all_success``: ``"shortest_vs_longest"`` (the released code) or ``"skip"``.
    ``all_failed``: ``"skip"`` (the released code's "hard" setting, the one it trains on) or
    ``"shortest_vs_longest"`` (its default "weak" setting).
    ``rejected`` (mixed outcomes): ``"longest"`` failure (the released code: one pair per passage) or
    ``"every"`` failure (one pair each, against the same chosen: pairs that differ in what they keep, not
    only in length).
    """

    all_success: str = "shortest_vs_longest"
    all_failed: str = "skip"
    rejected: str = "longest"

    def __post_init__(self) -> None:
        for name, value in (("all_success", self.all_success), ("all_failed", self.all_failed)):
            if value not in ("skip", "shortest_vs_longest"):
                raise ValueError(f"{name} must be 'skip' or 'shortest_vs_longest', got {value!r}")
        if self.rejected not in ("longest", "every"):
            raise ValueError(f"rejected must be 'longest' or 'every', got {self.rejected!r}")


def make_pair(candidates: list[dict[str, Any]], rules: PairRules = PairRules()) -> dict[str, Any] | None:
    """Chosen/rejected from one passage's labelled candidates (``tokens``, ``success``), or None.

    Mixed outcomes: chosen = the shortest success, rejected = the longest failure (``rule``
    ``"contrast"``). All successes or all failures: per ``rules``, shortest vs longest overall
    (``"all_success"`` / ``"all_failed"``) or no pair. No pair either when the two would be the
    same text. Among equally long candidates the shortest is the first and the longest the last
    (what the released code's stable sort by length picks).
    """
    wins = [c for c in candidates if c["success"]]
    losses = [c for c in candidates if not c["success"]]
    if wins and losses:
        chosen, rejected, rule = _shortest(wins), _longest(losses), "contrast"
    else:
        rule = "all_success" if wins else "all_failed"
        if not candidates or getattr(rules, rule) == "skip":
            return None
        chosen, rejected = _shortest(candidates), _longest(candidates)
    if chosen["text"] == rejected["text"] or chosen is rejected:
        return None
    return {"chosen": chosen, "rejected": rejected, "rule": rule}


def passage_pairs(candidates: list[dict[str, Any]], rules: PairRules = PairRules()) -> list[dict[str, Any]]:
    """Every pair of one passage: `make_pair`'s, and with ``rules.rejected == "every"`` the shortest success
    against each other failure too (longest first; a text already paired is not repeated)."""
    first = make_pair(candidates, rules)
    if first is None or first["rule"] != "contrast" or rules.rejected == "longest":
        return [] if first is None else [first]
    pairs, seen = [first], {first["rejected"]["text"]}
    for loss in sorted((c for c in candidates if not c["success"]), key=lambda c: -c["tokens"]):
        if loss["text"] not in seen and loss["text"] != first["chosen"]["text"]:
            seen.add(loss["text"])
            pairs.append({"chosen": first["chosen"], "rejected": loss, "rule": "contrast"})
    return pairs


def _shortest(cands: list[dict[str, Any]]) -> dict[str, Any]:
    return min(cands, key=lambda c: c["tokens"])  # min keeps the first of equals


def _longest(cands: list[dict[str, Any]]) -> dict[str, Any]:
    return max(reversed(cands), key=lambda c: c["tokens"])  # the last of equals, as a stable sort's [-1]


def make_pairs(corpus: RetrievalCorpus, candidates: list[dict[str, Any]], labels: list[dict[str, Any]],
               prompt: Callable[[dict[str, Any]], tuple[str, list[int]]], end_ids: list[int], end_text: str,
               cache_dir: str | os.PathLike, rules: PairRules = PairRules(), labels_fingerprint: str = "",
               name: str = "pairs") -> datasets.Dataset:
    """The preference dataset in TRL's format (cached stage ``name``).

    Columns: ``prompt``/``chosen``/``rejected`` (text, TRL's standard preference format) and the
    exact tokens ``prompt_ids``/``chosen_ids``/``rejected_ids`` (what the policy generated, plus the
    end of turn), with ``passage_id``, ``rule``, ``chosen_tokens`` and ``rejected_tokens``.
    ``prompt(passage) -> (text, ids)`` renders the compressor's own prompt.
    """
    stage = Stage(cache_dir, name, {"labels": labels_fingerprint, "rules": asdict(rules), "end": end_ids})
    success = {(r["passage_id"], r["variant"]): r["success"] for r in labels}
    by_passage: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        key = (c["passage_id"], c["variant"])
        if key in success:
            by_passage.setdefault(c["passage_id"], []).append({**c, "success": success[key]})

    def run(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for passage in batch:
            for pair in passage_pairs(by_passage.get(passage["passage_id"], []), rules):
                text, ids = prompt(passage)
                rows.append({"passage_id": passage["passage_id"], "rule": pair["rule"], "prompt": text,
                             "chosen": pair["chosen"]["text"] + end_text,
                             "rejected": pair["rejected"]["text"] + end_text,
                             "prompt_ids": list(ids), "chosen_ids": pair["chosen"]["ids"] + list(end_ids),
                             "rejected_ids": pair["rejected"]["ids"] + list(end_ids),
                             "chosen_tokens": pair["chosen"]["tokens"], "rejected_tokens": pair["rejected"]["tokens"],
                             "chosen_variant": pair["chosen"]["variant"],
                             "rejected_variant": pair["rejected"]["variant"]})
        return rows

    rows = stage.run(corpus.passages, run, batch_size=max(1, len(corpus.passages)), desc=name, unit="passage")
    features = datasets.Features({
        "passage_id": datasets.Value("string"), "rule": datasets.Value("string"), "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "prompt_ids": datasets.Sequence(datasets.Value("int64")), "chosen_ids": datasets.Sequence(datasets.Value("int64")),
        "rejected_ids": datasets.Sequence(datasets.Value("int64")), "chosen_tokens": datasets.Value("int64"),
        "rejected_tokens": datasets.Value("int64"), "chosen_variant": datasets.Value("string"),
        "rejected_variant": datasets.Value("string")})
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def stage_fingerprint(cache_dir: str | os.PathLike, name: str) -> str:
    """The fingerprint of a finished stage (for chaining stages), or '' when it is not there."""
    path = Path(cache_dir) / name / "stage.json"
    return json.loads(path.read_text()).get("fingerprint", "") if path.is_file() else ""
