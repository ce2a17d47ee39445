"""Retrieval task families with held-out templates, and `build_mixture`, a dataset of mixed families and lengths.

A compressor trained on one needle sentence and tested on the same sentence with another number has
learned a template, not to remember. So each family here (a task in `TASKS`, usable wherever a task
name is: `build_task`, a recipe's ``train_tasks``, ``python -m ctxzip.eval --tasks``) words its needle,
its question and its answer-format instruction in many ways, and holds some of those wordings out.

Families (``MIXTURE_FAMILIES``; every answer is short and checked by substring):

- ``retrieve_number``: the code of a locker, gate, safe... (``num_digits`` digits);
- ``retrieve_word``: the password of a club, a gate, an event (one lower-case word);
- ``retrieve_name``: who runs a place (``First Last``);
- ``retrieve_date``: when an event took place (``14 March 1987``: day, month name, year);
- ``kv_lookup``: key-value records scattered in the text (``num_pairs``, by default one per 128 tokens),
  one key asked (a 6-character code);
- ``multi_fact``: facts about different people (``num_facts``, by default one per 64 tokens, 2 to 8:
  colour, home town, birth year, lucky number, favourite dish), one asked: fact_qa's task, in many wordings.

The ``retrieve_*`` families take ``num_distractors`` (default 0: one needle, as passkey): other records
of the same family, about other keys. The asked needle sits at ``spec.draw_depth`` (the requested
depth, or a uniform one), the others at uniform depths. The question ends with an instruction to answer
briefly ("Answer with the number only.", as passkey), itself one of several wordings, and every row has a
neutral answer prefix (RULER's: "The number of the blue locker is"), one per family in both splits and never
a needle's wording: the reply's form is then fixed, so the score measures what the memory kept. Without it
the embedded SmolLM2-135M answered 0 of 10 held-out number questions at 1k tokens even with the full
context (it restates the question or summarises the text); with it, 5 of 10.

Split rules (fixed; what to pass for each data set):

- Templates: each family lists its needle, question and instruction templates in two explicit tuples,
  ``train`` and ``held_out`` (`Templates`; about a third held out, at least 2 of each). A row built
  with ``split="train"`` uses only ``train`` templates, ``split="test"`` only ``held_out`` ones,
  ``split="all"`` both. A template never moves between the tuples: add new ones, never reorder.
- Training data: ``split="train"`` -- the train templates on the train split of the training corpus
  (``source="pydoc"`` by default): ``build_mixture(tok, num_samples=n, split="train", seed=s)``.
- Held-out-template evaluation: ``split="test"`` -- held-out templates on the held-out split of the
  same corpus: ``build_mixture(tok, num_samples=n, split="test", seed=s)``, or
  ``python -m ctxzip.eval --tasks retrieve_number ...`` (its ``--split`` defaults to test).
- Held-out-corpus evaluation: ``split="test", source="stdlib"`` -- held-out templates on the held-out
  split of the standard library's docstrings, a corpus the default training never reads:
  ``build_mixture(tok, num_samples=n, split="test", seed=s, source="stdlib")``.

Keys and values (people, places, numbers) are drawn from shared vocabularies in both splits: held out
means held out by template and by corpus here, not by value.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets

from .sources import Haystack
from .tasks import (
    CITIES,
    COLOURS,
    FEATURES,
    FIRST_NAMES,
    KEY_ADJECTIVES,
    KEY_NOUNS,
    LAST_NAMES,
    TASKS,
    Sample,
    TaskSpec,
    _haystack,
    _needles_in_filler,
    _sample,
    _validate,
    make_row,
    register_task,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FACT_DRAWS", "FAMILIES", "MIXTURE_FAMILIES", "Family", "Templates", "build_mixture", "draw_length"]

_SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Templates:
    """The wordings of one part of a row (needle, question or instruction), split once and for all."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        """The templates a row of ``split`` may use: train, held out (``"test"``) or both (``"all"``)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        return {"train": self.train, "test": self.held_out, "all": self.train + self.held_out}[split]


@dataclass(frozen=True)
class Family:
    """A retrieval family: its templates (slots ``{key}``, ``{value}`` and, for multi_fact, ``{attr}``) and
    the keys its facts are about. A fact is a dict of slot values; its ``value`` is the answer."""

    name: str
    needles: Templates
    questions: Templates
    instructions: Templates
    keys: tuple[str, ...]
    answer_prefix: str  # how the reply starts (slots as the templates'), the same in both splits


# ---------------------------------------------------------------------------------------
# vocabularies

LOCKABLES = (
    "blue locker", "north gate", "cellar safe", "garden shed", "archive room", "west tower", "old mailbox",
    "supply cabinet", "bicycle lock", "hotel room", "storage unit", "back office", "main vault", "red suitcase",
    "tool chest", "server rack", "gym locker", "attic trunk", "boat cabin", "night depot",
)  # fmt: skip
GATHERINGS = (
    "night watch", "book club", "rowing team", "garden party", "chess circle", "harbour patrol",
    "choir rehearsal", "museum tour", "treasure hunt", "winter ball", "river crossing", "tower guard",
    "puppet theatre", "science fair", "fencing school", "village feast", "poetry evening", "sailing club",
    "astronomy society", "midnight market",
)  # fmt: skip
PLACES = (
    "lighthouse", "bakery", "observatory", "ferry terminal", "botanical garden", "city archive",
    "clock tower", "bookshop", "cider orchard", "boathouse", "railway museum", "weather station",
    "glassworks", "print shop", "harbour office", "greenhouse", "youth hostel", "night market",
    "village school", "flour mill",
)  # fmt: skip
EVENTS = (
    "harbour festival", "bridge opening", "chess tournament", "lantern parade", "museum reopening",
    "spring regatta", "book fair", "orchestra's first concert", "grand auction", "kite contest", "harvest fair",
    "city marathon", "guild's founding", "flower show", "jazz night", "village election",
    "bakery's grand opening", "comet viewing", "ice sculpture contest", "tram line's inauguration",
)  # fmt: skip
WORDS = (
    "lantern", "walrus", "saffron", "glacier", "marble", "pepper", "falcon", "tulip", "velvet", "compass",
    "orchid", "thimble", "cobalt", "juniper", "paprika", "quartz", "riddle", "sparrow", "tundra", "umbrella",
    "vortex", "willow", "zephyr", "almond", "biscuit", "cactus", "dynamo", "emerald", "fjord", "gazelle",
    "hazelnut", "igloo", "jasmine", "kiwi", "lagoon", "mango", "nutmeg", "otter", "pelican", "raven",
)  # fmt: skip
DISHES = (
    "risotto", "paella", "goulash", "ramen", "couscous", "lasagne", "moussaka", "pierogi", "tagine", "ceviche",
    "biryani", "kimchi", "gnocchi", "borscht", "falafel", "dumplings",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
CODE_CHARACTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: a code reads one way
#: multi_fact's attributes and the values each takes (single words or numbers).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "favourite colour": COLOURS,
    "home town": CITIES,
    "birth year": tuple(str(year) for year in range(1931, 2006)),
    "lucky number": tuple(str(n) for n in range(10, 100)),
    "favourite dish": DISHES,
}

# ---------------------------------------------------------------------------------------
# the families: train templates first, then the held-out ones (never moved between the two)

NUMBER = Family(
    "retrieve_number",
    needles=Templates(
        train=(
            "The code for the {key} is {value}.",
            "Remember this: the {key} opens with the number {value}.",
            "Whoever wants to open the {key} has to enter {value}.",
            "According to the ledger, the number assigned to the {key} is {value}.",
            "{value} is the combination of the {key}.",
            "A note taped to the {key} said: {value}.",
        ),
        held_out=(
            "Keep in mind that the {key} is locked with the digits {value}.",
            "The {key} will only open for the sequence {value}.",
            "If you ever need to get into the {key}, dial {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "What is the code for the {key}?",
            "Which number opens the {key}?",
            "What number must be entered to open the {key}?",
            "What number was given for the {key}?",
        ),
        held_out=("The {key} is opened with which digits?", "Recall the secret number of the {key} from the text."),
    ),
    instructions=Templates(
        train=("Answer with the number only.", "Reply with just the digits.", "Give the number and nothing else.",
               "Respond with only that number."),
        held_out=("Write only the digits, no words.", "Your answer should be the number alone."),
    ),
    keys=LOCKABLES,
    answer_prefix="The number of the {key} is",
)

WORD = Family(
    "retrieve_word",
    needles=Templates(
        train=(
            "The password for the {key} is {value}.",
            "To join the {key}, a visitor must say the word {value}.",
            "Everyone at the {key} was told that the secret word is {value}.",
            "The word chosen for the {key} this year is {value}.",
            "Only one word gets you into the {key}, and it is {value}.",
            "The organisers of the {key} picked {value} as their code word.",
        ),
        held_out=(
            "If someone asks about the {key}, reply with the word {value}.",
            "The {key} uses {value} as its watchword.",
            "Written above the entrance to the {key} is the word {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "What is the password for the {key}?",
            "Which word gets a visitor into the {key}?",
            "What code word was chosen for the {key}?",
            "Which secret word belongs to the {key}?",
        ),
        held_out=("Name the watchword of the {key}.", "The {key} is tied to which word?"),
    ),
    instructions=Templates(
        train=("Answer with one word.", "Reply with that single word.", "Give just the word.",
               "Respond with the word only."),
        held_out=("One word is enough: write it.", "Say only the word, nothing more."),
    ),
    keys=GATHERINGS,
    answer_prefix="The word for the {key} is",
)

NAME = Family(
    "retrieve_name",
    needles=Templates(
        train=(
            "{value} is in charge of the {key}.",
            "The person who runs the {key} is {value}.",
            "Since last spring, the {key} has been looked after by {value}.",
            "If the {key} needs anything, call {value}.",
            "The keys to the {key} were handed to {value}.",
            "Nobody knows the {key} better than {value}, who manages it.",
        ),
        held_out=(
            "{value} took over the {key} when the previous manager retired.",
            "Responsibility for the {key} lies with {value}.",
            "All staff of the {key} report to {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "Who is in charge of the {key}?",
            "Who runs the {key}?",
            "Which person looks after the {key}?",
            "Whom should one call about the {key}?",
        ),
        held_out=("Name the person responsible for the {key}.", "According to the text, who manages the {key}?"),
    ),
    instructions=Templates(
        train=("Answer with the full name only.", "Reply with the person's first and last name.",
               "Give just the name.", "Respond with the name and nothing else."),
        held_out=("Write the name alone, first name then surname.", "Only the name, please."),
    ),
    keys=PLACES,
    answer_prefix="The person in charge of the {key} is",
)

DATE = Family(
    "retrieve_date",
    needles=Templates(
        train=(
            "The {key} took place on {value}.",
            "On {value}, the {key} finally happened.",
            "Records show that the {key} was held on {value}.",
            "Mark the calendar: the {key} is set for {value}.",
            "The date of the {key} was {value}.",
            "Everyone remembers {value} as the day of the {key}.",
        ),
        held_out=(
            "It was on {value} that the {key} went ahead.",
            "The {key} had been scheduled for {value}.",
            "Nobody forgot the {key}, which fell on {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "When did the {key} take place?",
            "On what date was the {key} held?",
            "What was the date of the {key}?",
            "Which day was the {key}?",
        ),
        held_out=("Recall the exact date of the {key}.", "The {key} happened on which date?"),
    ),
    instructions=Templates(
        train=("Answer with the date only.", "Give the date as day, month and year.", "Reply with just the date.",
               "Respond with the date and no other words."),
        held_out=("Write the date exactly as it appears in the text.", "Only the date, please."),
    ),
    keys=EVENTS,
    answer_prefix="The date of the {key} is",
)

KV = Family(
    "kv_lookup",
    needles=Templates(
        train=(
            "Record {key} stores the value {value}.",
            "Lookup table entry: {key} maps to {value}.",
            "The registry pairs the key {key} with {value}.",
            "Key {key}, value {value}.",
            "Entry [{key}] = {value}.",
            "In the index, {key} points to {value}.",
        ),
        held_out=(
            "Under the key {key} you will find {value}.",
            "The store keeps {value} for {key}.",
            "Value of {key}: {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "What value is stored under {key}?",
            "Which value does the key {key} map to?",
            "Look up {key}: what is its value?",
            "Find the entry for {key} and give its value.",
        ),
        held_out=("What is paired with {key}?", "Retrieve the value recorded for {key}."),
    ),
    instructions=Templates(
        train=("Answer with the value only.", "Reply with just the value.", "Give the code and nothing else.",
               "Respond with that value alone."),
        held_out=("Write only the value, exactly as stored.", "Nothing but the value, please."),
    ),
    keys=tuple(f"{a}-{n}" for a in KEY_ADJECTIVES for n in KEY_NOUNS),
    answer_prefix="The value of {key} is",
)

MULTI_FACT = Family(
    "multi_fact",
    needles=Templates(
        train=(
            "The {attr} of {key} is {value}.",
            "{key} once said that their {attr} is {value}.",
            "Ask {key} about their {attr} and you will hear {value}.",
            "For the record, {key} gives {value} as their {attr}.",
            "It is well known that {value} is the {attr} of {key}.",
            "In the notes about {key}, the {attr} is listed as {value}.",
        ),
        held_out=(
            "If anyone wonders about the {attr} of {key}, it is {value}.",
            "{key} has {value} as their {attr}, according to a letter.",
            "When asked for their {attr}, {key} answered {value}.",
        ),
    ),
    questions=Templates(
        train=(
            "What is the {attr} of {key}?",
            "What {attr} does {key} have?",
            "Tell me the {attr} of {key}.",
            "What did {key} give as their {attr}?",
            "Which value is listed as the {attr} of {key}?",
        ),
        held_out=("According to the passage, what is {key}'s {attr}?", "Which {attr} belongs to {key}?"),
    ),
    instructions=Templates(
        train=("Answer with one word or number.", "Reply with the value only.", "Keep it short: just the answer.",
               "Give only the answer, no sentence."),
        held_out=("Respond with the bare answer.", "Just the value, please."),
    ),
    keys=tuple(f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES),
    answer_prefix="{key}'s {attr} is",
)

#: The families by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (NUMBER, WORD, NAME, DATE, KV, MULTI_FACT)}
#: What `build_mixture` draws from by default.
MIXTURE_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

#: kv_lookup's default density: one record per this many tokens of context.
PAIR_EVERY = 128
#: multi_fact's default density: one fact per this many tokens of context (2 to 8 facts).
FACT_EVERY = 64

Fact = dict[str, str]
Draw = Callable[[random.Random, str], Fact]


# ---------------------------------------------------------------------------------------
# the tasks


def number_fact(num_digits: int = 6) -> Draw:
    """Draws a ``num_digits``-digit number for a key."""
    if not 1 <= num_digits <= 18:
        raise ValueError(f"num_digits must be in [1, 18], got {num_digits}")
    low = 10 ** (num_digits - 1)
    return lambda r, key: {"key": key, "value": str(r.randrange(low, 10 * low))}


def _person_fact(r: random.Random, key: str) -> Fact:
    attr = r.choice(sorted(ATTRIBUTES))
    return {"key": key, "attr": attr, "value": r.choice(ATTRIBUTES[attr])}


#: One fact of each family (its default form: six-digit numbers, six-character codes), by family name.
FACT_DRAWS: dict[str, Draw] = {
    "retrieve_number": number_fact(),
    "retrieve_word": lambda r, key: {"key": key, "value": r.choice(WORDS)},
    "retrieve_name": lambda r, key: {"key": key, "value": f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"},
    "retrieve_date": lambda r, key: {"key": key, "value": _date(r)},
    "kv_lookup": lambda r, key: {"key": key, "value": "".join(r.choices(CODE_CHARACTERS, k=6))},
    "multi_fact": _person_fact,
}


@register_task("retrieve_number")
def retrieve_number(rng: random.Random, spec: TaskSpec, *, num_digits: int = 6, num_distractors: int = 0) -> Sample:
    """The number of one lockable thing, in one of the family's wordings (``num_digits`` digits)."""
    return _ask(NUMBER, rng, spec, 1 + num_distractors, number_fact(num_digits))


@register_task("retrieve_word")
def retrieve_word(rng: random.Random, spec: TaskSpec, *, num_distractors: int = 0) -> Sample:
    """The password of one gathering (a lower-case word)."""
    return _ask(WORD, rng, spec, 1 + num_distractors, FACT_DRAWS["retrieve_word"])


@register_task("retrieve_name")
def retrieve_name(rng: random.Random, spec: TaskSpec, *, num_distractors: int = 0) -> Sample:
    """Who runs one place (first and last name)."""
    return _ask(NAME, rng, spec, 1 + num_distractors, FACT_DRAWS["retrieve_name"])


@register_task("retrieve_date")
def retrieve_date(rng: random.Random, spec: TaskSpec, *, num_distractors: int = 0) -> Sample:
    """When one event took place, written ``14 March 1987``."""
    return _ask(DATE, rng, spec, 1 + num_distractors, FACT_DRAWS["retrieve_date"])


@register_task("kv_lookup")
def kv_lookup(rng: random.Random, spec: TaskSpec, *, num_pairs: int | None = None) -> Sample:
    """``num_pairs`` key-value records scattered in the text, each in one of the family's wordings; one asked.
    By default one record per ``PAIR_EVERY`` tokens of context (at least 2): as dense at 2k tokens as at 128."""
    if num_pairs is None:
        num_pairs = max(2, spec.context_tokens // PAIR_EVERY)
    return _ask(KV, rng, spec, num_pairs, FACT_DRAWS["kv_lookup"], what="num_pairs")


@register_task("multi_fact")
def multi_fact(rng: random.Random, spec: TaskSpec, *, num_facts: int | None = None) -> Sample:
    """``num_facts`` facts about different people; one asked. By default one fact per ``FACT_EVERY`` tokens of
    context, 2 to 8 (4 at 256 tokens)."""
    if num_facts is None:
        num_facts = max(2, min(8, spec.context_tokens // FACT_EVERY))
    return _ask(MULTI_FACT, rng, spec, num_facts, _person_fact, what="num_facts")


# ---------------------------------------------------------------------------------------
# the mixture


def build_mixture(
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_samples: int,
    split: str = "train",
    seed: int = 0,
    families: Sequence[str] | None = None,
    min_tokens: int = 128,
    max_tokens: int = 2048,
    source: str | Haystack = "pydoc",
    depth: float | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> datasets.Dataset:
    """``num_samples`` rows (`FEATURES`), each of a family and a context length drawn for it.

    Each row draws its family uniformly from ``families`` and its length log-uniformly in
    ``[min_tokens, max_tokens]`` (`draw_length`), from a stream seeded by (split, seed, row), so row
    ``i`` does not depend on ``num_samples`` and the same arguments give the same dataset.

    Args:
        tokenizer: lengths are counted in its tokens.
        num_samples: number of rows, at least 1.
        split: ``"train"`` (train templates, train text), ``"test"`` (held-out templates and text) or
            ``"all"``; see the module docstring for the three evaluation settings.
        seed: the random stream.
        families: task names to draw from (default ``MIXTURE_FAMILIES``); any registered task works,
            e.g. ``"continuation"`` or ``"reconstruction"`` for rows that rebuild or continue the text.
        min_tokens, max_tokens: the range of context lengths (``min_tokens == max_tokens``: one length).
        source: the filler corpus (a `load_texts` source: ``"pydoc"``, ``"stdlib"``, ...) or a `Haystack`.
        depth: needle depth in [0, 1], or ``None`` for a uniform one per row.
        options: per-family task options, e.g. ``{"kv_lookup": {"num_pairs": 4}}``.

    Raises:
        ValueError: an unknown or empty family list, options for a family not drawn from, a bad
            length range, or a length too short for a family's needles.
    """
    names = tuple(MIXTURE_FAMILIES if families is None else families)
    options = dict(options or {})
    _check_families(names, options)
    _check_lengths(min_tokens, max_tokens)
    _validate(num_samples, min_tokens, depth)
    haystack = source if isinstance(source, Haystack) else _haystack(source, split, tokenizer)
    rows = []
    for index in range(num_samples):
        draw = random.Random(f"ctxzip/mixture/{split}/{seed}/{index}")
        name = draw.choice(names)
        length = draw_length(draw, min_tokens, max_tokens)
        spec = TaskSpec(name, haystack, length, depth, split)
        rng = random.Random(f"ctxzip/mixture/{name}/{split}/{seed}/{index}")
        rows.append(make_row(TASKS[name], rng, spec, f"mixture-{name}-{split}-s{seed}-{index}",
                             dict(options.get(name, {})), {"target_tokens": length}))
    return datasets.Dataset.from_list(rows, features=FEATURES)


def draw_length(rng: random.Random, min_tokens: int, max_tokens: int) -> int:
    """A length log-uniform in ``[min_tokens, max_tokens]``, rounded: as many short rows per doubling of
    length as long ones, so short contexts are not swamped by long ones."""
    return min(max_tokens, max(min_tokens, round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))))


# ---------------------------------------------------------------------------------------
# helpers


def _ask(family: Family, rng: random.Random, spec: TaskSpec, num_facts: int, draw: Draw,
         what: str = "num_distractors") -> Sample:
    """Facts about ``num_facts`` distinct keys, each worded by a template of the row's split, in the filler;
    the first is asked, with a question and an instruction of that split."""
    if not 1 <= num_facts <= len(family.keys):
        shift = 1 if what == "num_distractors" else 0
        raise ValueError(f"{what} must be in [{1 - shift}, {len(family.keys) - shift}] for {family.name}, "
                         f"got {num_facts - shift}")
    facts = _facts(rng, family, num_facts, draw)
    templates = [rng.choice(family.needles.of(spec.split)) for _ in facts]
    needles = [template.format(**fact) for template, fact in zip(templates, facts)]
    question = rng.choice(family.questions.of(spec.split))
    instruction = rng.choice(family.instructions.of(spec.split))
    depth = spec.draw_depth(rng)
    placed = [(depth if i == 0 else rng.random(), needle) for i, needle in enumerate(needles)]
    context, n = _needles_in_filler(rng, spec, placed)
    meta = {"family": family.name, "split": spec.split, "facts": facts, "needle_template": templates[0],
            "question_template": question, "instruction": instruction}
    return _sample(context, n, f"{question.format(**facts[0])} {instruction}", facts[0]["value"], depth,
                   needles[0], meta, answer_prefix=family.answer_prefix.format(**facts[0]))


def _facts(rng: random.Random, family: Family, count: int, draw: Draw) -> list[Fact]:
    """Facts about ``count`` distinct keys; no other fact has the asked (first) one's value, so the answer
    is found in one place only."""
    facts = [draw(rng, key) for key in rng.sample(family.keys, count)]
    for fact in facts[1:]:
        while fact["value"] == facts[0]["value"]:
            fact.update(draw(rng, fact["key"]))
    return facts


def _date(rng: random.Random) -> str:
    """A date written one way (``14 March 1987``): day 1-28 (valid in every month), year 1900-2030."""
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 2030)}"


def _check_families(names: tuple[str, ...], options: Mapping[str, Any]) -> None:
    if not names:
        raise ValueError(f"families must name at least one task; the mixture's own: {', '.join(MIXTURE_FAMILIES)}")
    unknown = sorted({name for name in names if name not in TASKS})
    if unknown:
        raise ValueError(f"unknown family {', '.join(map(repr, unknown))}; mixture families: "
                         f"{', '.join(MIXTURE_FAMILIES)}; any task of data.TASKS also works: {', '.join(sorted(TASKS))}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for {stray}, which are not among the families {list(names)}")


def _check_lengths(min_tokens: int, max_tokens: int) -> None:
    for label, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    if min_tokens > max_tokens:
        raise ValueError(f"min_tokens={min_tokens} must not exceed max_tokens={max_tokens}")
