"""Synthetic long-context tasks with controllable length, needle depth and seed.

`build_task` returns a `datasets.Dataset` whose rows all share `FEATURES`, so datasets of
different tasks can be concatenated.  Columns:

- ``id``: ``"<task>-<split>-s<seed>-<index>"``;
- ``task``; ``context`` (the long text); ``question`` (what the user asks, without the
  context; ``""`` for plain continuation); ``answer`` (the exact expected reply);
- ``answer_prefix``: how the expected reply starts, before the answer (RULER's answer prefix, e.g. "The
  pass key is"; ``""`` when none): generation continues it and teacher forcing scores the answer after
  it, so both see the same reply;
- ``context_tokens``: real token count of ``context`` for the tokenizer given;
- ``depth``: where the asked needle sits, as the fraction of the filler's characters before
  it (the requested depth, or the one drawn uniformly per sample), ``-1.0`` when the task
  has no single needle;
- ``needle``: the inserted sentence that holds the answer (``""`` when none);
- ``metadata``: task-specific details as a JSON object string (a string rather than
  per-task columns so that every task has the same schema).

A task is a sample builder registered in `TASKS`: ``fn(rng, spec, **options) -> dict`` with
the keys ``context, question, answer, context_tokens, depth, needle, metadata``.  Each
sample gets its own `random.Random` seeded from (task, split, seed, index), so sample ``i``
does not depend on ``num_samples`` and the splits draw from different streams.
"""

from __future__ import annotations

import bisect
import json
import random
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets

from .sources import BUILTIN_SOURCES, Haystack, load_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FEATURES", "TASKS", "TaskSpec", "build_task", "layout_passages", "make_row", "register_task"]

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_prefix": datasets.Value("string"),
        "context_tokens": datasets.Value("int64"),
        "depth": datasets.Value("float64"),
        "needle": datasets.Value("string"),
        "metadata": datasets.Value("string"),
    }
)

Sample = dict[str, Any]
SampleBuilder = Callable[..., Sample]

#: Registered tasks: name -> sample builder ``fn(rng, spec, **options) -> dict``.
TASKS: dict[str, SampleBuilder] = {}

# Rounds of "measure the context, correct the filler budget"; two almost always suffice.
_FIT_ROUNDS = 6


@dataclass(frozen=True)
class TaskSpec:
    """What every sample builder gets besides its RNG."""

    task: str
    haystack: Haystack
    context_tokens: int
    depth: float | None
    #: The `build_task` split: tasks with held-out templates (``data/mixture.py``) pick theirs by it.
    split: str = "train"

    def draw_depth(self, rng: random.Random) -> float:
        """The requested depth, or a uniform random one when none was requested."""
        return rng.random() if self.depth is None else self.depth

    def count(self, text: str) -> int:
        """Real token count of ``text``."""
        return self.haystack.count_tokens(text)

    def too_small(self, needed: int) -> ValueError:
        """The error for a context length that cannot hold the task's fixed parts."""
        return ValueError(
            f"context_tokens={self.context_tokens} is too small for task {self.task!r}: "
            f"its needles alone take {needed} tokens"
        )


def register_task(name: str) -> Callable[[SampleBuilder], SampleBuilder]:
    """Decorator that adds a sample builder to `TASKS` under ``name``."""

    def add(fn: SampleBuilder) -> SampleBuilder:
        TASKS[name] = fn
        return fn

    return add


def build_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_samples: int,
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    split: str = "train",
    source: str | Haystack = "pydoc",
    **kw: Any,
) -> datasets.Dataset:
    """Build ``num_samples`` samples of task ``name`` as a `datasets.Dataset`.

    Args:
        name: a key of `TASKS`.
        tokenizer: lengths are counted in its tokens (no special tokens).
        num_samples: number of rows, at least 1.
        context_tokens: target length of each context.  Tasks built on filler text land on
            it within a few tokens and never above it when possible; ``kv_retrieval``
            lands within one key/value record below it.
        seed: same seed (and arguments) gives the same dataset.
        depth: needle depth in [0, 1] for tasks with a needle; ``None`` draws one per sample.
        split: text split for the filler (``"test"`` = held-out text) and RNG stream.
        source: a `load_texts` source, or a ready `Haystack` (used as given).
        **kw: task options, e.g. ``num_digits`` (passkey), ``num_facts`` (fact_qa),
            ``num_needles`` (niah_multikey), ``num_chains`` / ``num_hops``
            (variable_tracking), ``answer_tokens`` (continuation).
    """
    builder = _lookup(name)
    _validate(num_samples, context_tokens, depth)
    haystack = source if isinstance(source, Haystack) else _haystack(source, split, tokenizer)
    spec = TaskSpec(name, haystack, context_tokens, depth, split)
    rows = [make_row(builder, random.Random(f"ctxzip/{name}/{split}/{seed}/{index}"), spec,
                     f"{name}-{split}-s{seed}-{index}", kw) for index in range(num_samples)]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def make_row(builder: SampleBuilder, rng: random.Random, spec: TaskSpec, row_id: str, options: dict[str, Any],
             extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `FEATURES` row of ``builder``'s sample (its metadata, with ``extra_metadata``, as a JSON string):
    shared by `build_task` and by datasets that mix tasks and lengths row by row (`data.mixture`)."""
    sample = builder(rng, spec, **options)
    sample["metadata"] = json.dumps({**sample.get("metadata", {}), **(extra_metadata or {})}, sort_keys=True)
    return {"id": row_id, "task": spec.task, **sample}


# ---------------------------------------------------------------------------------------
# the tasks


@register_task("passkey")
def passkey(rng: random.Random, spec: TaskSpec, *, num_digits: int = 5) -> Sample:
    """A pass key sentence hidden in filler text at the requested depth."""
    if num_digits < 1:
        raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    key = str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = spec.draw_depth(rng)
    context, n = _needles_in_filler(rng, spec, [(depth, needle)])
    # The answer-format instruction makes SmolLM2 answer with the key (without it, it explains what a pass
    # key is). No answer prefix here: with RULER's "The pass key is" in the SFT target, the quickstart gist
    # compressor stayed at chance on the digits for 200 steps (loss 1.64 = 5 ln 10 / 7), where without it
    # it reached 0.98 (benchmarks/results/gist_quickstart_cpu.md).
    return _sample(context, n, "What is the pass key? Answer with the number only.", key, depth, needle,
                   {"num_digits": num_digits})


FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas",
    "Keiko", "Liam", "Mara", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Wendell", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Moreno", "Lindqvist", "Okafor", "Tanaka", "Novak", "Haddad", "Fischer", "Kowalski",
    "Silva", "Brennan", "Dubois", "Petrov", "Nakamura", "Osei", "Rinaldi", "Varga", "Abbott",
    "Castillo", "Jensen", "Quinn", "Mendez", "Holloway", "Sato", "Whitfield",
)  # fmt: skip
COLOURS = (
    "teal", "crimson", "amber", "violet", "olive", "maroon", "indigo", "coral", "ivory",
    "turquoise", "magenta", "ochre", "lavender", "scarlet", "beige", "cyan",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Montreal", "Valparaiso", "Tbilisi", "Hanoi",
    "Krakow", "Adelaide", "Bergen", "Cusco", "Dakar", "Edinburgh", "Fukuoka", "Granada",
    "Helsinki", "Izmir", "Jaipur", "Leipzig",
)  # fmt: skip
OBJECTS = (
    "telescope", "violin", "compass", "lantern", "typewriter", "kettle", "sundial",
    "banjo", "microscope", "parasol", "chessboard", "harmonica", "globe", "metronome",
    "sextant", "gramophone",
)  # fmt: skip
ANIMALS = (
    "parrot", "tortoise", "ferret", "hamster", "lizard", "goldfish", "rabbit", "beagle",
    "canary", "chinchilla", "gecko", "poodle", "hedgehog", "salamander", "cockatoo", "dachshund",
)  # fmt: skip

# relation -> (fact template, question template, values); each answer is a single word.
# Objects and animals all start with a consonant sound, so "is a {value}" reads right.
FACT_RELATIONS: dict[str, tuple[str, str, Sequence[str]]] = {
    "colour": ("The favourite colour of {name} is {value}.", "What is the favourite colour of {name}?", COLOURS),
    "city": ("{name} works in the city of {value}.", "In which city does {name} work?", CITIES),
    "object": (
        "The most treasured possession of {name} is a {value}.",
        "What is the most treasured possession of {name}?",
        OBJECTS,
    ),
    "pet": ("The pet of {name} is a {value}.", "What kind of animal is the pet of {name}?", ANIMALS),
    "year": ("{name} was born in the year {value}.", "In which year was {name} born?",
             tuple(str(y) for y in range(1931, 2006))),
}  # fmt: skip
# relation -> the reply's start, before the one-word answer (the fact template up to its value)
FACT_PREFIXES = {relation: template.split("{value}")[0].rstrip()
                 for relation, (template, _, _) in FACT_RELATIONS.items()}


def _shared_questions(asked: list[tuple[str, str, str]], num_questions: int, available: int) -> list[dict[str, str]]:
    """The first ``num_questions`` of the ``asked`` (question, answer, answer prefix) triples, for the
    shared-context mode (SCBench): one context, several questions about different facts of it."""
    if not 1 <= num_questions <= available:
        raise ValueError(f"num_questions must be in [1, {available}] (one per fact in the context), got {num_questions}")
    return [{"question": q, "answer": a, "answer_prefix": p} for q, a, p in asked[:num_questions]]


@register_task("fact_qa")
def fact_qa(rng: random.Random, spec: TaskSpec, *, num_facts: int = 4, num_questions: int = 1) -> Sample:
    """Several templated facts about different people; one of them is asked (``num_questions`` > 1: the
    first ``num_questions`` are asked about the same context, in ``metadata['questions']``)."""
    if not 1 <= num_facts <= len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"num_facts must be in [1, {len(FIRST_NAMES) * len(LAST_NAMES)}], got {num_facts}")
    people = rng.sample([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], num_facts)
    facts = []
    for person in people:
        relation = rng.choice(sorted(FACT_RELATIONS))
        template, question, values = FACT_RELATIONS[relation]
        value = rng.choice(values)
        facts.append(
            (template.format(name=person, value=value), question.format(name=person), value, relation)
        )
    depth = spec.draw_depth(rng)
    # The first fact is the asked one; the distractors go to random depths.
    placed = [(depth if i == 0 else rng.random(), fact[0]) for i, fact in enumerate(facts)]
    context, n = _needles_in_filler(rng, spec, placed)
    asked = [(q + " Answer with one word.", value, FACT_PREFIXES[rel].format(name=person))
             for (_, q, value, rel), person in zip(facts, people)]
    needle, _, answer, relation = facts[0]
    meta = {"num_facts": num_facts, "relation": relation, "subject": people[0]}
    if num_questions > 1:
        meta["questions"] = _shared_questions(asked, num_questions, num_facts)
    return _sample(context, n, asked[0][0], answer, depth, needle, meta, answer_prefix=asked[0][2])


PASSAGE_LINE = "ID: {id} | CONTENT: {passage} | END ID: {id}"
RETRIEVAL_QUESTION = "Query: {query}\nWhich passage answers the query? Reply with its ID only."


def layout_passages(passages: Sequence[str]) -> str:
    """The corpus as the retrieval task shows it: one ``ID: i | CONTENT: ... | END ID: i`` line
    per passage (a corpus given in context); a passage compressor is evaluated on the same layout of
    its compressed passages."""
    return "\n".join(PASSAGE_LINE.format(id=i, passage=p) for i, p in enumerate(passages))


@register_task("passage_retrieval")
def passage_retrieval(rng: random.Random, spec: TaskSpec, *, passage_tokens: int = 64) -> Sample:
    """A corpus of real paragraphs, each holding one templated fact about a distinct person
    (retrieval from a corpus in context); the question asks one fact and the answer is its passage's ID.
    As many passages as fit in ``context_tokens``; the passages are in ``metadata['passages']``."""
    per_passage = passage_tokens + spec.count(PASSAGE_LINE.format(id=99, passage="")) + 1
    count = spec.context_tokens // per_passage
    if count < 2:
        raise spec.too_small(2 * per_passage)
    people = rng.sample([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], count)
    passage_spec = TaskSpec(spec.task, spec.haystack, passage_tokens, None)
    passages, queries = [], []
    for person in people:
        template, question, values = FACT_RELATIONS[rng.choice(sorted(FACT_RELATIONS))]
        fact = template.format(name=person, value=rng.choice(values))
        passage, _ = _needles_in_filler(rng, passage_spec, [(rng.random(), fact)])
        passages.append(passage)
        queries.append((question.format(name=person), fact))
    gold = rng.randrange(count)
    context = layout_passages(passages)
    meta = {"passages": passages, "gold": gold, "num_passages": count}
    return _sample(context, spec.count(context), RETRIEVAL_QUESTION.format(query=queries[gold][0]), str(gold),
                   gold / count, queries[gold][1], meta)


KEY_ADJECTIVES = (
    "ancient", "brisk", "clumsy", "dusty", "eager", "fragile", "gentle", "hollow", "icy",
    "jolly", "lucky", "mellow", "noisy", "polite", "quiet", "rusty", "silent", "tidy",
    "vivid", "wild",
)  # fmt: skip
KEY_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kitten", "ladder", "meadow", "needle", "orchard", "pebble", "river", "saddle",
    "tunnel", "walnut",
)  # fmt: skip


@register_task("niah_multikey")
def niah_multikey(rng: random.Random, spec: TaskSpec, *, num_needles: int = 4, num_digits: int = 7,
                  num_questions: int = 1) -> Sample:
    """RULER-style multi-key needle in a haystack: several keyed numbers, one key asked (``num_questions``
    > 1: the first ``num_questions`` keys are asked about the same context, in ``metadata['questions']``)."""
    if not 1 <= num_needles <= len(KEY_ADJECTIVES) * len(KEY_NOUNS):
        raise ValueError(
            f"num_needles must be in [1, {len(KEY_ADJECTIVES) * len(KEY_NOUNS)}], got {num_needles}"
        )
    keys = rng.sample([f"{a}-{b}" for a in KEY_ADJECTIVES for b in KEY_NOUNS], num_needles)
    values = [str(rng.randrange(10 ** (num_digits - 1), 10**num_digits)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    depth = spec.draw_depth(rng)
    placed = [(depth if i == 0 else rng.random(), needle) for i, needle in enumerate(needles)]
    context, n = _needles_in_filler(rng, spec, placed)
    asked = [(f"What is the special magic number for {key} mentioned in the provided text?", value,
              f"The special magic number for {key} mentioned in the provided text is") for key, value in zip(keys, values)]
    meta = {"num_needles": num_needles, "key": keys[0]}
    if num_questions > 1:
        meta["questions"] = _shared_questions(asked, num_questions, num_needles)
    return _sample(context, n, asked[0][0], values[0], depth, needles[0], meta, answer_prefix=asked[0][2])


@register_task("kv_retrieval")
def kv_retrieval(rng: random.Random, spec: TaskSpec) -> Sample:
    """A JSON object of random uuid keys and values; the value of one key is asked.

    The context is made of whole records, so it lands within one record below the target.
    """
    depth = spec.draw_depth(rng)
    pairs: list[tuple[str, str]] = []

    def render(count: int) -> str:
        while len(pairs) < count:  # drawn lazily, always in the same order
            pairs.append((_uuid(rng), _uuid(rng)))
        body = ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs[:count])
        return "JSON data:\n{" + body + "}"

    count, context, n = _fit_records(spec, render)
    index = round(depth * (count - 1))
    key, value = pairs[index]
    question = f'What is the value associated with the key "{key}" in the JSON data?'
    needle = f"{json.dumps(key)}: {json.dumps(value)}"
    meta = {"num_pairs": count, "key": key, "key_index": index}
    return _sample(context, n, question, value, depth, needle, meta,
                   answer_prefix=f'The value associated with the key "{key}" is')


@register_task("variable_tracking")
def variable_tracking(
    rng: random.Random, spec: TaskSpec, *, num_chains: int = 1, num_hops: int = 4
) -> Sample:
    """RULER-style variable tracking: chains of assignments; name all variables of one value.

    Chain statements keep their order in the text; other chains are distractors.
    """
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains and num_hops must be >= 1, got {num_chains} and {num_hops}")
    names = _distinct(
        rng, num_chains * (num_hops + 1), lambda: "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
    )
    values = _distinct(rng, num_chains, lambda: str(rng.randrange(10000, 100000)))
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    placed = []
    for chain, value in zip(chains, values):
        statements = [f"VAR {chain[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        placed += zip(sorted(rng.random() for _ in statements), statements)
    context, n = _needles_in_filler(rng, spec, placed)
    question = (
        f"Find all variables that are assigned the value {values[0]} in the text above. "
        "Answer with their names separated by spaces."
    )
    meta = {"num_chains": num_chains, "num_hops": num_hops, "value": values[0], "variables": chains[0]}
    return _sample(context, n, question, " ".join(chains[0]), -1.0, placed[0][1], meta,
                   answer_prefix=f"The variables assigned the value {values[0]} are:")


@register_task("autoencoding")
def autoencoding(rng: random.Random, spec: TaskSpec) -> Sample:
    """A chunk of text to be reproduced verbatim (reconstruction objective)."""
    start = spec.haystack.random_start(rng)
    context, n = _fit(spec, 0, lambda budget: spec.haystack.text(budget, start))
    return _sample(context, n, "Repeat the text.", context, -1.0, "", {})


RECONSTRUCTION_QUESTION = "Repeat the text, continuing from the words your reply begins with."


@register_task("reconstruction")
def reconstruction(rng: random.Random, spec: TaskSpec, *, span_tokens: int = 64, cue_tokens: tuple[int, int] = (10, 20),
                   ) -> Sample:
    """A span of the context to be copied, cued by its first 10-20 tokens (RCC's reconstruction pre-training):
    ``answer_prefix`` is the cue (the reply starts with it), ``answer`` the rest of the span (the loss and the
    score are on it). The span starts at a random token of the context; the cue ends before a token that opens
    a word, so that cue + answer is the span's text exactly."""
    low, high = cue_tokens
    if not 1 <= low <= high < span_tokens:
        raise ValueError(f"cue_tokens must be 1 <= low <= high < span_tokens={span_tokens}, got {cue_tokens}")
    if spec.context_tokens < span_tokens:
        raise spec.too_small(span_tokens)
    hay = spec.haystack
    ids = hay.tokenizer(hay.text(spec.context_tokens + 16, hay.random_start(rng)), add_special_tokens=False).input_ids
    if len(ids) < spec.context_tokens:
        raise ValueError(f"source text too short for {spec.context_tokens} tokens")
    ids = ids[:spec.context_tokens]
    context = hay.decode(ids)
    start = rng.randrange(0, len(ids) - span_tokens + 1)
    span = ids[start:start + span_tokens]
    cut = rng.randint(low, high)
    opens_word = [i for i in range(low, high + 1) if hay.decode(span[i:i + 1])[:1].isspace()]
    if opens_word:
        cut = min(opens_word, key=lambda i: abs(i - cut))
    cue, rest = hay.decode(span[:cut]), hay.decode(span[cut:])
    return _sample(context, spec.count(context), RECONSTRUCTION_QUESTION, rest, start / len(ids), "",
                   {"span_start": start, "span_tokens": span_tokens, "cue_tokens": cut}, answer_prefix=cue.lstrip())


@register_task("continuation")
def continuation(rng: random.Random, spec: TaskSpec, *, answer_tokens: int = 32) -> Sample:
    """Running text cut at ``context_tokens`` tokens; the answer is the next tokens."""
    if answer_tokens < 1:
        raise ValueError(f"answer_tokens must be >= 1, got {answer_tokens}")
    hay, target = spec.haystack, spec.context_tokens
    # Slack: joining texts can merge a few tokens, and the cut needs target + answer tokens.
    text = hay.text(target + answer_tokens + 16, hay.random_start(rng))
    ids = hay.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < target + answer_tokens:
        raise ValueError(f"source text too short for {target} + {answer_tokens} tokens")
    context = hay.decode(ids[:target])
    whole = hay.decode(ids[: target + answer_tokens])
    # Cut the decoded string so context + answer is exactly the source text, when the
    # tokenizer decodes prefixes faithfully; otherwise decode the answer ids alone.
    answer = (
        whole[len(context) :]
        if whole.startswith(context)
        else hay.decode(ids[target : target + answer_tokens])
    )
    return _sample(context, spec.count(context), "", answer, -1.0, "", {"answer_tokens": answer_tokens})


# ---------------------------------------------------------------------------------------
# helpers


def _sample(
    context: str, n: int, question: str, answer: str, depth: float, needle: str, metadata: dict[str, Any],
    answer_prefix: str = "",
) -> Sample:
    return {
        "context": context,
        "question": question,
        "answer": answer,
        "answer_prefix": answer_prefix,
        "context_tokens": n,
        "depth": float(depth),
        "needle": needle,
        "metadata": metadata,
    }


def _lookup(name: str) -> SampleBuilder:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _validate(num_samples: int, context_tokens: int, depth: float | None) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context_tokens must be an integer >= 1, got {context_tokens!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None, got {depth!r}")


# Token ids of the built-in texts (pydoc, stdlib), per tokenizer, so repeated build_task calls
# tokenize a corpus once.  Only ids are cached: a Haystack refers to its tokenizer, which would
# keep the weak key alive forever.  Local files may change between calls: never cached.
_BUILTIN_IDS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], list[list[int]]]] = weakref.WeakKeyDictionary()


def _haystack(source: str, split: str, tokenizer: PreTrainedTokenizerBase) -> Haystack:
    haystack = Haystack(load_texts(source, split=split), tokenizer)
    if source in BUILTIN_SOURCES:
        per_tokenizer = _BUILTIN_IDS.setdefault(tokenizer, {})
        if (source, split) in per_tokenizer:
            haystack._ids = per_tokenizer[source, split]
        else:
            per_tokenizer[source, split] = haystack.token_ids
    return haystack


def _needles_in_filler(
    rng: random.Random, spec: TaskSpec, placed: Sequence[tuple[float, str]]
) -> tuple[str, int]:
    """Insert needles at their depths into filler sized so the whole context fits."""
    start = spec.haystack.random_start(rng)
    # One extra token per needle for the space that joins it to the filler.
    reserved = sum(spec.count(needle) + 1 for _, needle in placed)
    return _fit(spec, reserved, lambda budget: _insert(spec.haystack.text(budget, start), placed))


def _fit(spec: TaskSpec, reserved: int, build: Callable[[int], str]) -> tuple[str, int]:
    """Call ``build(filler_budget)`` until the context has ``spec.context_tokens`` tokens.

    Token merges across joins make the first guess off by a few tokens, so the budget is
    corrected by the measured error.  Returns the closest context not above the target
    (and its real token count).
    """
    target = spec.context_tokens
    if reserved > target:
        raise spec.too_small(reserved)
    budget = target - reserved
    tried: dict[int, tuple[int, str]] = {}
    for _ in range(_FIT_ROUNDS):
        context = build(budget)
        n = spec.count(context)
        tried[budget] = (n, context)
        budget = max(0, budget + target - n)
        if n == target or budget in tried:
            break
    fits = [t for t in tried.values() if t[0] <= target]
    if not fits:
        if 0 not in tried:
            context = build(0)
            tried[0] = (spec.count(context), context)
        if tried[0][0] > target:
            raise spec.too_small(tried[0][0])
        fits = [tried[0]]
    n, context = max(fits, key=lambda t: t[0])
    return context, n


def _fit_records(spec: TaskSpec, render: Callable[[int], str]) -> tuple[int, str, int]:
    """Largest record count whose rendering fits ``spec.context_tokens`` (from an estimate)."""
    target = spec.context_tokens
    one = spec.count(render(1))
    if one > target:
        raise spec.too_small(one)
    per_record = max(1, spec.count(render(2)) - one)
    count = max(1, 1 + (target - one) // per_record)
    best = (1, render(1), one)
    tried: set[int] = set()
    while count not in tried:
        tried.add(count)
        context = render(count)
        n = spec.count(context)
        if n <= target:
            best = max(best, (count, context, n), key=lambda t: t[0])
            count += (target - n) // per_record
        else:
            count = max(1, count - max(1, (n - target) // per_record))
    return best


# A sentence end: terminal punctuation (and closing quotes/brackets) before a line break or
# before a capitalised word, so "from ... import" or "e.g. the" do not count.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\n|\s+[\"'(\[*]?[A-Z])")


def _insert(filler: str, placed: Sequence[tuple[float, str]]) -> str:
    """Insert each needle at (a sentence boundary near) its depth in ``filler``.

    Needles at the same spot keep their given order (variable chains rely on it).
    """
    sentence_ends = [0] + [m.end() for m in _SENTENCE_END.finditer(filler)] + [len(filler)]
    spots = sorted((_snap(filler, depth, sentence_ends), i) for i, (depth, _) in enumerate(placed))
    groups: dict[int, list[str]] = {}
    for spot, i in spots:
        groups.setdefault(spot, []).append(placed[i][1])
    parts: list[str] = []
    last = 0
    for spot, needles in groups.items():  # insertion order = ascending spots
        text = " ".join(needles)
        parts += [filler[last:spot], " " + text if spot else text + (" " if filler else "")]
        last = spot
    parts.append(filler[last:])
    return "".join(parts)


def _snap(filler: str, depth: float, sentence_ends: list[int]) -> int:
    """Character offset for a needle at ``depth``: the nearest sentence end, or word gap."""
    want = depth * len(filler)
    i = bisect.bisect_left(sentence_ends, want)
    nearest = min(sentence_ends[max(0, i - 1) : i + 1], key=lambda p: abs(p - want))
    # Sentence ends read naturally; accept one within ~10% of the text (+100 characters,
    # about a sentence, for short contexts).
    if abs(nearest - want) <= 0.1 * len(filler) + 100:
        return nearest
    # A long stretch without sentence ends (a trimmed text): fall back to a word gap.
    gaps = [m.start() for m in re.finditer(r"\s", filler)] or [nearest]
    return min(gaps, key=lambda p: abs(p - want))


def _uuid(rng: random.Random) -> str:
    """A uuid4-looking string drawn from ``rng`` (uuid.uuid4 is not seedable)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _distinct(rng: random.Random, count: int, draw: Callable[[], str]) -> list[str]:
    """``count`` distinct values from ``draw`` (redrawing repeats)."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(draw(), None)
    return list(seen)
