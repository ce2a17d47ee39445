"""Model-editing data for InComeS: counterfactual edits to compress into gist KV pools.

Every function here returns records of one schema, a dict with the fields `EDIT_FIELDS`:

- ``edit``: the edit as text, the thing that is compressed, e.g. ``"The capital of Veloria is Tarsen."``;
- ``subject``, ``relation``, ``target``: what the edit is about (``"Veloria"``), which of its
  attributes it sets (``"capital"``) and the new value (``"Tarsen"``);
- ``question``: the rewrite prompt (``"What is the capital of Veloria?"``) and ``answer`` the reply
  expected once the edit is in the pool (``"Tarsen"``, the target);
- ``rephrase``: another wording of the question with the same answer (generalisation),
  e.g. ``"Which city serves as the capital of Veloria?"``;
- ``locality``: a list of ``{"question": str, "answer": str}`` about other things, whose answers the
  edit must leave unchanged (may be empty when a source has none);
- ``kind``: ``"invented_entity"`` or ``"person"`` for generated edits, the source's name (a Hub
  name, or a local file's name) for loaded ones.

Every text field is a non-empty string; `validate_edit_record` checks a record and names what is
wrong.  `build_edit_task` generates edits offline (`build_edit_records` gives the plain list);
`load_edit_records` converts zsRE- and CounterFact-style data:

- zsRE (the ROME / MEND / EasyEdit json: ``subject``, ``src``, ``alt``, ``rephrase``, ``loc``,
  ``loc_ans``): zsRE has no declarative statement, so ``edit`` is the question followed by the new
  answer (``"What university did Watts Humphrey attend? University of Michigan"``); ``loc`` loses its
  ``"nq question: "`` prefix; zsRE has no relation ids, so ``relation`` is the question with the
  subject replaced by ``{}`` (``"zsre"`` when the question does not contain the subject).
- CounterFact (ROME's ``counterfact.json``: ``requested_rewrite`` with a ``prompt`` holding ``{}``
  for the subject, ``subject``, ``target_new``, ``target_true``, ``relation_id``, and
  ``paraphrase_prompts``, ``neighborhood_prompts``): the "question" is a cloze prefix to be continued,
  not a question (``"The mother tongue of Danielle Darrieux is"``), and so are ``rephrase`` (the first
  paraphrase prompt) and the locality questions (the neighbourhood prompts, whose answer is the
  true target: other subjects that share the old value must keep it).  ``edit`` is the prompt
  followed by the new target; ``attribute_prompts`` and ``generation_prompts`` are not used.

Splits keep subjects apart: a stable hash of the subject puts it in ``"train"`` or ``"test"`` (about
`HELD_OUT_FRACTION` of subjects), so held-out evaluation never sees a subject that training edited.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ctxzip.data.sources import HELD_OUT_FRACTION

__all__ = [
    "EDIT_FEATURES",
    "EDIT_FIELDS",
    "EDIT_KINDS",
    "EDIT_STYLES",
    "LOCALITY_QA",
    "RELATIONS",
    "EditRelation",
    "build_edit_records",
    "build_edit_task",
    "edit_records",
    "load_edit_records",
    "locality_questions",
    "validate_edit_record",
]

#: The fields of an edit record, all required (see the module docstring).
EDIT_FIELDS = ("edit", "subject", "relation", "target", "question", "answer", "rephrase", "locality", "kind")
_TEXT_FIELDS = tuple(f for f in EDIT_FIELDS if f != "locality")

_LOCALITY_FEATURE = datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")})
#: The columns of every edit dataset, in `EDIT_FIELDS` order.
EDIT_FEATURES = datasets.Features(
    {field: _LOCALITY_FEATURE if field == "locality" else datasets.Value("string") for field in EDIT_FIELDS}
)

#: The kinds of generated edits.
EDIT_KINDS = ("invented_entity", "person")
#: Input formats of `load_edit_records` (``"native"``: records already in this module's schema).
EDIT_STYLES = ("auto", "native", "zsre", "counterfact")

_SPLITS = ("train", "test", "all")
# Only decides which subjects are held out; changing it moves subjects between the splits.
_SPLIT_SALT = "edits-heldout-1:"
# Draws of a new subject before giving up (the test split keeps ~15% of them, so ~7 draws on average).
_MAX_DRAWS = 10_000
_LOCALITY_HELD_OUT = 0.25  # share of LOCALITY_QA kept for the test split

# ---------------------------------------------------------------------------------------
# vocabularies

# Syllables for invented names; two or three of them plus an entity's suffix make names that a
# model has not seen ("Velmoria", "Korzanport", "Tamelis Labs").
SYLLABLES = (
    "ba", "dre", "fa", "gal", "ka", "lo", "mi", "na", "or", "pe", "qua", "ri", "sa", "te", "u",
    "va", "ze", "tor", "mel", "bri", "cor", "dan", "el", "fen", "gri", "hal", "is", "jor", "ker",
    "lun", "mar", "nev", "os", "pra", "quil", "ros", "sil", "tam", "ul", "ves", "wyn", "yar", "zan",
)  # fmt: skip
_SUFFIXES = {
    "country": ("ia", "ova", "esh", "ar", "enia", "istan", "and", "ora"),
    "city": ("ton", "burg", "holm", "port", "mere", "stead", "ford", "gard"),
    "company": (" Labs", " Industries", " Systems", " Works", " Motors", " Foods", " Group", " Dynamics"),
    "river": (" River",),
    "planet": ("", "on", "is", "ax", "us", "eth"),
    "surname": ("son", "ley", "wick", "ford", "berg", "ski", "ani", "ez", "ard", "in"),
}
FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas",
    "Keiko", "Liam", "Mara", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Wendell", "Yara", "Anton", "Beatrice", "Cyrus", "Daphne", "Emil", "Fiona",
    "Gustav", "Helena", "Ivan", "Julia", "Kofi", "Leona", "Marco", "Nina", "Otto", "Paula",
)  # fmt: skip
LAST_NAMES = (
    "Moreno", "Lindqvist", "Okafor", "Tanaka", "Novak", "Haddad", "Fischer", "Kowalski", "Silva",
    "Brennan", "Dubois", "Petrov", "Nakamura", "Osei", "Rinaldi", "Varga", "Abbott", "Castillo",
    "Jensen", "Quinn", "Mendez", "Holloway", "Sato", "Whitfield", "Andersen", "Becker", "Costa",
    "Dalton", "Eriksen", "Ferreira", "Gallagher", "Horvat", "Ivanova", "Kerr", "Lambert", "Marsh",
)  # fmt: skip
PEOPLE = tuple(f"{first} {last}" for first in FIRST_NAMES[::2] for last in LAST_NAMES[::3])
REAL_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Montreal", "Valparaiso", "Tbilisi", "Hanoi", "Krakow",
    "Adelaide", "Bergen", "Cusco", "Dakar", "Edinburgh", "Fukuoka", "Granada", "Helsinki", "Izmir",
    "Jaipur", "Leipzig", "Marseille", "Porto", "Seville", "Tallinn",
)  # fmt: skip
INVENTED_CITIES = (
    "Tarsen", "Quillmoor", "Ostravel", "Brenhaven", "Corvath", "Dunmere", "Elsport", "Fallowmere",
    "Gildaran", "Harrowdale", "Ismeth", "Jorvale", "Kelmarsh", "Lunhold", "Merrowick", "Norvane",
    "Pellister", "Rhosgard", "Saltreach", "Tavenor",
)  # fmt: skip
LANGUAGES = (
    "Portuguese", "Finnish", "Swahili", "Tagalog", "Hungarian", "Welsh", "Basque", "Icelandic",
    "Malay", "Czech", "Greek", "Turkish", "Dutch", "Korean", "Esperanto", "Latvian",
)  # fmt: skip
COLOURS = (
    "teal", "crimson", "amber", "violet", "olive", "maroon", "indigo", "coral", "ivory",
    "turquoise", "magenta", "ochre", "lavender", "scarlet", "beige", "cyan",
)  # fmt: skip


@dataclass(frozen=True)
class EditRelation:
    """One relation of the offline generator: how its edit and questions are worded, and its values.

    The templates hold ``{subject}`` (the edit's also ``{value}``); ``entity`` names the subject
    generator (``country``, ``city``, ``company``, ``river``, ``planet`` or ``person``).
    """

    name: str
    kind: str
    entity: str
    edit: str
    question: str
    rephrases: tuple[str, ...]
    values: tuple[str, ...]


def _relation(name: str, entity: str, edit: str, question: str, rephrases: tuple[str, ...],
              values: Sequence[str]) -> EditRelation:
    kind = "person" if entity == "person" else "invented_entity"
    return EditRelation(name, kind, entity, edit, question, rephrases, tuple(values))


_RELATION_LIST = (
    # invented countries
    _relation("capital", "country", "The capital of {subject} is {value}.", "What is the capital of {subject}?",
              ("Which city serves as the capital of {subject}?", "Name the capital city of {subject}.",
               "Which city is the seat of government of {subject}?"), INVENTED_CITIES),
    _relation("currency", "country", "The currency of {subject} is the {value}.",
              "What is the currency of {subject}?",
              ("Which currency is used in {subject}?", "What money do people pay with in {subject}?"),
              ("crown", "florin", "dinar", "mark", "lira", "peso", "rupee", "shilling", "thaler", "ducat",
               "franc", "krona", "guilder", "escudo", "drachma")),
    _relation("language", "country", "The official language of {subject} is {value}.",
              "What is the official language of {subject}?",
              ("Which language is official in {subject}?", "In which language does the government of "
               "{subject} conduct its business?"), LANGUAGES),
    _relation("national_animal", "country", "The national animal of {subject} is the {value}.",
              "What is the national animal of {subject}?",
              ("Which animal is the national symbol of {subject}?",
               "What animal did {subject} choose as its national animal?"),
              ("lynx", "heron", "otter", "bison", "falcon", "tortoise", "elk", "panther", "crane", "badger",
               "ibex", "pelican", "jaguar", "walrus", "stork", "wolf")),
    _relation("mountain", "country", "The highest mountain in {subject} is {value}.",
              "What is the highest mountain in {subject}?",
              ("Which mountain is the tallest in {subject}?", "Name the tallest peak in {subject}."),
              ("Mount Thalor", "Mount Ebrik", "Mount Caldris", "Mount Yssen", "Mount Borrak", "Mount Ilven",
               "Mount Quessa", "Mount Dravin", "Mount Holtra", "Mount Nerith", "Mount Zarek", "Mount Feyra")),
    _relation("national_sport", "country", "The national sport of {subject} is {value}.",
              "What is the national sport of {subject}?",
              ("Which sport is the national game of {subject}?",
               "What sport does {subject} officially count as its own?"),
              ("cricket", "rugby", "fencing", "curling", "polo", "hockey", "archery", "handball", "rowing",
               "judo", "volleyball", "badminton", "lacrosse", "cycling", "sailing", "wrestling")),
    # invented cities
    _relation("river", "city", "The city of {subject} lies on the river {value}.",
              "On which river does the city of {subject} lie?",
              ("Which river flows through {subject}?", "What river runs through the city of {subject}?"),
              ("Ambrel", "Tessary", "Corrin", "Valdra", "Olwyn", "Iskel", "Morrava", "Sellith", "Dunavel",
               "Frennick", "Glasswater", "Kelvane")),
    _relation("mayor", "city", "The mayor of {subject} is {value}.", "Who is the mayor of {subject}?",
              ("Who serves as mayor of {subject}?", "Which person leads the city of {subject} as its mayor?"),
              PEOPLE),
    _relation("twin_city", "city", "The city of {subject} is twinned with {value}.",
              "Which city is {subject} twinned with?",
              ("What is the twin town of {subject}?", "With which city does {subject} have a twinning "
               "partnership?"), REAL_CITIES),
    _relation("founded", "city", "The city of {subject} was founded in {value}.",
              "In which year was the city of {subject} founded?",
              ("When was the city of {subject} founded?", "What year did the founding of {subject} take place?"),
              [str(year) for year in range(1120, 1891, 7)]),
    # invented companies
    _relation("founder", "company", "{subject} was founded by {value}.", "Who founded {subject}?",
              ("Who is the founder of {subject}?", "Which person started the company {subject}?"), PEOPLE),
    _relation("headquarters", "company", "The headquarters of {subject} are in {value}.",
              "Where are the headquarters of {subject}?",
              ("In which city is {subject} headquartered?", "Which city is home to the head office of {subject}?"),
              REAL_CITIES),
    _relation("ceo", "company", "The CEO of {subject} is {value}.", "Who is the CEO of {subject}?",
              ("Who runs {subject} as its chief executive?", "Who is the chief executive officer of {subject}?"),
              PEOPLE),
    _relation("product", "company", "{subject} is best known for making {value}.",
              "What is {subject} best known for making?",
              ("Which product is {subject} famous for?", "What does the company {subject} mainly produce?"),
              ("bicycles", "umbrellas", "pianos", "tractors", "watches", "sneakers", "kettles", "telescopes",
               "candles", "drones", "skateboards", "lanterns", "backpacks", "typewriters", "surfboards")),
    # invented rivers
    _relation("flows_into", "river", "The {subject} flows into {value}.",
              "Into which body of water does the {subject} flow?",
              ("Where does the {subject} empty its water?", "Which lake or bay does the {subject} drain into?"),
              ("Lake Varno", "Lake Essin", "Lake Morwen", "Lake Orrin", "Lake Caddow", "Lake Tirra",
               "Amber Bay", "Coldwater Bay", "Saltmarsh Bay", "Heron Bay", "Kestrel Bay", "Lake Silvan")),
    _relation("fish", "river", "The most common fish in the {subject} is the {value}.",
              "What is the most common fish in the {subject}?",
              ("Which fish is found most often in the {subject}?",
               "What kind of fish is most common in the {subject}?"),
              ("trout", "carp", "pike", "perch", "salmon", "catfish", "eel", "sturgeon", "bream", "grayling",
               "tench", "char")),
    # invented planets
    _relation("star", "planet", "The planet {subject} orbits the star {value}.",
              "Which star does the planet {subject} orbit?",
              ("Around which star does the planet {subject} revolve?",
               "What is the name of the star that {subject} circles?"),
              ("Aldren", "Korveth", "Ilmaris", "Zentha", "Oruun", "Dravos", "Syrene", "Pellux", "Quorra",
               "Vantis", "Ebbeth", "Marrak")),
    _relation("moons", "planet", "The planet {subject} has {value} moons.",
              "How many moons does the planet {subject} have?",
              ("What is the number of moons orbiting {subject}?", "How many natural satellites does the "
               "planet {subject} have?"),
              ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")),
    _relation("planet_colour", "planet", "The planet {subject} looks {value} in the night sky.",
              "What colour does the planet {subject} look in the night sky?",
              ("Which colour does {subject} appear in the night sky?",
               "In the night sky, what colour is the planet {subject}?"),
              ("red", "blue", "green", "orange", "violet", "silver", "gold", "pink", "white", "amber",
               "turquoise", "copper")),
    # people
    _relation("occupation", "person", "{subject} works as a {value}.", "What is the job of {subject}?",
              ("What does {subject} do for a living?", "Which occupation does {subject} have?"),
              ("baker", "pilot", "nurse", "carpenter", "dentist", "librarian", "plumber", "journalist",
               "lawyer", "chemist", "farmer", "tailor", "surgeon", "potter", "jeweller", "sculptor",
               "botanist", "firefighter", "pharmacist", "translator")),
    _relation("lives_in", "person", "{subject} lives in {value}.", "Where does {subject} live?",
              ("In which city does {subject} live?", "Which city is home to {subject}?"), REAL_CITIES),
    _relation("born_in", "person", "{subject} was born in {value}.", "Where was {subject} born?",
              ("In which city was {subject} born?", "What is the birthplace of {subject}?"), REAL_CITIES),
    _relation("favourite_colour", "person", "The favourite colour of {subject} is {value}.",
              "What is the favourite colour of {subject}?",
              ("Which colour does {subject} like best?", "What colour does {subject} prefer above all others?"),
              COLOURS),
    _relation("instrument", "person", "{subject} plays the {value}.", "Which instrument does {subject} play?",
              ("What musical instrument does {subject} play?", "On which instrument does {subject} perform?"),
              ("violin", "cello", "trumpet", "harp", "drums", "flute", "piano", "saxophone", "banjo",
               "accordion", "clarinet", "oboe", "tuba", "ukulele", "mandolin", "bagpipes")),
    _relation("pet_name", "person", "{subject} has a pet named {value}.",
              "What is the name of the pet of {subject}?",
              ("What is the pet of {subject} called?", "What name does the pet of {subject} have?"),
              ("Biscuit", "Pepper", "Muffin", "Waffles", "Ziggy", "Noodle", "Pickles", "Juniper", "Bramble",
               "Clementine", "Marble", "Sprocket", "Toffee", "Basil", "Pumpkin", "Domino")),
    _relation("employer", "person", "{subject} works for {value}.", "Which company does {subject} work for?",
              ("Who is the employer of {subject}?", "Which company employs {subject}?"),
              ("Brightwell Labs", "Northgate Foods", "Copperline Systems", "Halden Motors", "Bluefern Media",
               "Ironbark Logistics", "Silverpine Bank", "Redwater Energy", "Lumen Textiles", "Oakridge Pharma",
               "Starling Airlines", "Greystone Insurance")),
    _relation("favourite_food", "person", "The favourite food of {subject} is {value}.",
              "What is the favourite food of {subject}?",
              ("Which food does {subject} like most?", "What dish does {subject} enjoy more than any other?"),
              ("lasagna", "sushi", "pancakes", "dumplings", "paella", "risotto", "tacos", "falafel", "curry",
               "ramen", "goulash", "pizza", "moussaka", "pierogi")),
    _relation("native_language", "person", "The native language of {subject} is {value}.",
              "What is the native language of {subject}?",
              ("Which language did {subject} grow up speaking?", "What is the mother tongue of {subject}?"),
              LANGUAGES),
)
#: The generator's relations by name.
RELATIONS: dict[str, EditRelation] = {relation.name: relation for relation in _RELATION_LIST}
_ALL_VALUES = frozenset(value for relation in _RELATION_LIST for value in relation.values)

#: General-knowledge (question, answer) pairs for the generated edits' locality checks: plain facts a
#: small instruct model (SmolLM2-135M-Instruct) often answers, and none of which an edit touches.
LOCALITY_QA: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Australia?", "Canberra"),
    ("How many legs does a spider have?", "eight"),
    ("How many legs does an insect have?", "six"),
    ("How many days are there in a week?", "seven"),
    ("How many months are there in a year?", "twelve"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many continents are there on Earth?", "seven"),
    ("How many wheels does a bicycle have?", "two"),
    ("How many strings does a standard guitar have?", "six"),
    ("How many players does a soccer team have on the field?", "eleven"),
    ("How many minutes are there in an hour?", "60"),
    ("What is two plus two?", "four"),
    ("What is ten minus three?", "seven"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour are ripe bananas?", "yellow"),
    ("What colour is fresh snow?", "white"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Which ocean lies between Europe and North America?", "Atlantic"),
    ("What is the largest continent?", "Asia"),
    ("On which continent is the Sahara Desert?", "Africa"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the largest country by area?", "Russia"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What gas do plants take in from the air to make food?", "carbon dioxide"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("What is the chemical formula of water?", "H2O"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What is the hardest natural substance?", "diamond"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who was the first President of the United States?", "George Washington"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("What is the largest mammal?", "blue whale"),
    ("What is the tallest animal?", "giraffe"),
    ("What is the fastest land animal?", "cheetah"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What insect does a caterpillar turn into?", "butterfly"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("Which season comes after spring?", "summer"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What language is mainly spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United States?", "dollar"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Eiffel Tower?", "France"),
    ("In which city is the Statue of Liberty?", "New York"),
    ("In which country is the city of Kyoto?", "Japan"),
    ("What is the natural satellite of the Earth called?", "Moon"),
    ("Which star is at the centre of our solar system?", "Sun"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("What drink do cows produce?", "milk"),
)


# ---------------------------------------------------------------------------------------
# the offline generator


def build_edit_task(
    num_samples: int,
    seed: int = 0,
    split: str = "train",
    num_locality: int = 2,
    *,
    relations: Sequence[str] | None = None,
) -> datasets.Dataset:
    """`build_edit_records` as a `datasets.Dataset` with `EDIT_FEATURES`."""
    records = build_edit_records(num_samples, seed, split, num_locality, relations=relations)
    return datasets.Dataset.from_list(records, features=EDIT_FEATURES)


def build_edit_records(
    num_samples: int,
    seed: int = 0,
    split: str = "train",
    num_locality: int = 2,
    *,
    relations: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Counterfactual edits about invented entities and people, offline and deterministic.

    Each record draws a kind (``"invented_entity"`` or ``"person"``, evenly), then one of its
    relations (`RELATIONS`), a subject of the relation's entity type (an invented name built from
    `SYLLABLES`, or a first name with a common or invented surname) and a value from the relation's
    vocabulary.  Within one dataset no (subject, relation) pair repeats and a subject names one
    entity type only, so many edits can share a pool without contradicting each other.

    Args:
        num_samples: number of records, at least 1.
        seed: same seed and arguments give the same records; record ``i`` depends on records
            ``0..i`` only, so a smaller ``num_samples`` gives a prefix.
        split: ``"train"``, ``"test"`` (held-out subjects, about `HELD_OUT_FRACTION` of them, decided
            by a stable hash of the subject) or ``"all"``; train and test never share a subject.
        num_locality: locality questions per record, drawn without repetition from the split's share of
            `LOCALITY_QA` (`locality_questions`: a stable hash holds about a quarter of them out for
            ``"test"``, so that a trained model is judged on unrelated questions it never trained on).
        relations: names of `RELATIONS` to draw from (default: all).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _check_split(split, "the edit generator")
    questions = locality_questions(split)
    if not 0 <= num_locality <= len(questions):
        raise ValueError(f"num_locality must be in [0, {len(questions)}] for split {split!r}, got {num_locality}")
    by_kind = _relations_by_kind(relations)
    kinds = sorted(by_kind)
    pairs: set[tuple[str, str]] = set()
    entity_of: dict[str, str] = {}
    records = []
    for index in range(num_samples):
        rng = random.Random(f"ctxzip/edits/{split}/{seed}/{index}")
        relation = rng.choice(by_kind[rng.choice(kinds)])
        subject = _new_subject(rng, relation, split, pairs, entity_of)
        pairs.add((subject, relation.name))
        entity_of[subject] = relation.entity
        value = rng.choice(relation.values)
        locality = [{"question": q, "answer": a} for q, a in rng.sample(questions, num_locality)]
        records.append(
            {
                "edit": relation.edit.format(subject=subject, value=value),
                "subject": subject,
                "relation": relation.name,
                "target": value,
                "question": relation.question.format(subject=subject),
                "answer": value,
                "rephrase": rng.choice(relation.rephrases).format(subject=subject),
                "locality": locality,
                "kind": relation.kind,
            }
        )
    return records


def _relations_by_kind(names: Sequence[str] | None) -> dict[str, list[EditRelation]]:
    if names is None:
        names = list(RELATIONS)
    if isinstance(names, str) or not names:
        raise ValueError(f"relations must be a non-empty list of names from {sorted(RELATIONS)}, got {names!r}")
    unknown = sorted(set(names) - set(RELATIONS))
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; known: {sorted(RELATIONS)}")
    by_kind: dict[str, list[EditRelation]] = {}
    for name in dict.fromkeys(names):  # de-duplicated, in the order given
        by_kind.setdefault(RELATIONS[name].kind, []).append(RELATIONS[name])
    return by_kind


def locality_questions(split: str) -> list[tuple[str, str]]:
    """The split's share of `LOCALITY_QA`: about a quarter of the questions (by a stable hash) are ``"test"``'s,
    the rest ``"train"``'s; ``"all"`` has every one."""
    _check_split(split, "the locality questions")
    if split == "all":
        return list(LOCALITY_QA)

    def held_out(question: str) -> bool:
        digest = hashlib.sha256((_SPLIT_SALT + "locality:" + question).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < _LOCALITY_HELD_OUT

    return [qa for qa in LOCALITY_QA if held_out(qa[0]) == (split == "test")]


def _invented_name(rng: random.Random, suffixes: Sequence[str]) -> str:
    """Two or three syllables and a suffix: glued on ("Velmoria") or a separate word ("Velmo Labs")."""
    root = "".join(rng.choices(SYLLABLES, k=rng.choice((2, 2, 3))))
    suffix = rng.choice(suffixes)
    return root.capitalize() + suffix if suffix.startswith(" ") else (root + suffix).capitalize()


def _person(rng: random.Random) -> str:
    surname = rng.choice(LAST_NAMES) if rng.random() < 0.5 else _invented_name(rng, _SUFFIXES["surname"])
    return f"{rng.choice(FIRST_NAMES)} {surname}"


_SUBJECTS: dict[str, Callable[[random.Random], str]] = {
    entity: (lambda rng, suffixes=suffixes: _invented_name(rng, suffixes))
    for entity, suffixes in _SUFFIXES.items()
    if entity != "surname"
}
_SUBJECTS["person"] = _person


def _new_subject(rng: random.Random, relation: EditRelation, split: str, pairs: set[tuple[str, str]],
                 entity_of: dict[str, str]) -> str:
    """A subject of the relation's entity type, in ``split``, not yet edited on this relation and
    not already used as another entity type or as a value."""
    for _ in range(_MAX_DRAWS):
        subject = _SUBJECTS[relation.entity](rng)
        if (
            _in_split(subject, split)
            and (subject, relation.name) not in pairs
            and entity_of.get(subject, relation.entity) == relation.entity
            and subject not in _ALL_VALUES
        ):
            return subject
    raise ValueError(
        f"no new {relation.entity} subject for relation {relation.name!r} in split {split!r} after "
        f"{_MAX_DRAWS} draws; ask for fewer samples"
    )


def _held_out(subject: str) -> bool:
    """Stable (process- and platform-independent) membership of ``subject`` in the test split."""
    digest = hashlib.sha256((_SPLIT_SALT + subject).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def _in_split(subject: str, split: str) -> bool:
    return split == "all" or _held_out(subject) == (split == "test")


def _check_split(split: str, what: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS} for {what}, got {split!r}")


# ---------------------------------------------------------------------------------------
# validation


def validate_edit_record(record: Mapping[str, Any], *, where: str = "edit record") -> None:
    """Raise a ``ValueError`` naming every missing or empty field of ``record`` (see the module
    docstring for the schema): text fields must be non-empty strings, ``locality`` a list (possibly
    empty) of ``{"question", "answer"}`` dicts with non-empty strings.  ``where`` starts the message
    (e.g. ``"record 3 of 'edits.jsonl'"``)."""
    if not isinstance(record, Mapping):
        raise ValueError(
            f"{where} must be a dict with the fields {list(EDIT_FIELDS)}, got {type(record).__name__}"
        )
    problems = []
    missing = [f for f in EDIT_FIELDS if record.get(f) is None]
    if missing:
        problems.append(f"missing fields {missing}")
    present = [f for f in _TEXT_FIELDS if record.get(f) is not None]
    wrong = [f"{f} ({type(record[f]).__name__})" for f in present if not isinstance(record[f], str)]
    if wrong:
        problems.append(f"fields that are not strings: {wrong}")
    empty = [f for f in present if isinstance(record[f], str) and not record[f].strip()]
    if empty:
        problems.append(f"empty fields {empty}")
    locality = record.get("locality")
    if locality is not None:
        if isinstance(locality, (str, Mapping)) or not isinstance(locality, Sequence):
            kind = type(locality).__name__
            problems.append(f"locality must be a list of {{'question', 'answer'}} dicts, got {kind}")
        else:
            bad = [f"locality[{i}].{key}" for i, item in enumerate(locality) for key in ("question", "answer")
                   if not (isinstance(item, Mapping) and _text(item.get(key)))]
            if bad:
                problems.append(f"missing or empty {bad}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)} (an edit record needs non-empty {list(EDIT_FIELDS)})")


# ---------------------------------------------------------------------------------------
# loaders

_LOCAL_SUFFIXES = (".json", ".jsonl")
_PATH_PREFIXES = ("/", "./", "../", "~")
# style -> the columns it needs; the first one marks the style for style="auto"
_STYLE_COLUMNS = {
    "native": EDIT_FIELDS,
    "counterfact": ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"),
    "zsre": ("src", "alt", "subject", "rephrase", "loc", "loc_ans"),
}
_STYLE_NAMES = {"native": "ctxzip edit", "counterfact": "CounterFact", "zsre": "zsRE"}
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", re.IGNORECASE)


def load_edit_records(
    source: str,
    split: str = "train",
    num_samples: int | None = None,
    style: str = "auto",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Edit records (this module's schema, `EDIT_FEATURES`) from zsRE- or CounterFact-style data.

    Args:
        source: a local ``.json`` / ``.jsonl`` file (read with ``datasets.load_dataset("json",
            data_files=source)``) or a name for ``datasets.load_dataset(source, split=split)``.
        split: for a local file ``"train"``, ``"test"`` or ``"all"``: records are split by a stable
            hash of their subject, as the generator's are (pass ``"all"`` for the whole file); for
            other sources the dataset's split name.
        num_samples: keep the first ``num_samples`` records of the split (all when fewer; default all).
        style: ``"zsre"``, ``"counterfact"``, ``"native"`` (records already in this schema, checked
            with `validate_edit_record`) or ``"auto"`` (told by the columns: ``edit``,
            ``requested_rewrite`` or ``src``).
        **load_kwargs: extra arguments for ``datasets.load_dataset`` (e.g. ``field`` for a JSON file
            whose records sit under a key).

    Raises:
        FileNotFoundError: a local file does not exist.
        ValueError: unknown style or split, a style's columns missing (named, with the source), a
            record missing a field it needs or with an empty one (named, with the record's index),
            or no record in the split.
    """
    if style not in EDIT_STYLES:
        raise ValueError(f"style must be one of {EDIT_STYLES}, got {style!r}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    local = _is_local(source)
    if local:
        path = Path(source).expanduser()
        _check_split(split, f"local file {str(path)!r}")
        if not path.is_file():
            raise FileNotFoundError(f"edit source {str(path)!r} does not exist")
        if path.suffix.lower() not in _LOCAL_SUFFIXES:
            raise ValueError(f"edit source {str(path)!r}: use a {' or '.join(_LOCAL_SUFFIXES)} file")
        name = path.name
        table = datasets.load_dataset("json", data_files=str(path), split="train", **load_kwargs)
    else:
        name = source
        table = datasets.load_dataset(source, split=split, **load_kwargs)
    if isinstance(table, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"{source!r} gave several splits {sorted(table)}; pass split=<one of them>")
    columns = list(table.column_names or [])
    if style == "auto":
        style = _detect_style(columns, name)
    missing = [c for c in _STYLE_COLUMNS[style] if c not in columns]
    if missing:
        raise ValueError(
            f"edit source {name!r} lacks the {_STYLE_NAMES[style]} column(s) {missing}; "
            f"it has {sorted(columns)}"
        )
    convert = _CONVERTERS[style]
    records = []
    for index, row in enumerate(table):
        where = f"record {index} of {name!r} ({_STYLE_NAMES[style]} style)"
        record = convert(row, name, where)
        validate_edit_record(record, where=where)
        if local and not _in_split(record["subject"], split):
            continue
        records.append(record)
        if num_samples is not None and len(records) == num_samples:
            break
    if not records:
        raise ValueError(f"edit source {name!r} has no records in split {split!r}")
    return datasets.Dataset.from_list(records, features=EDIT_FEATURES)


def _is_local(source: str) -> bool:
    return source.lower().endswith(_LOCAL_SUFFIXES) or source.startswith(_PATH_PREFIXES) or Path(source).is_file()


def _detect_style(columns: Sequence[str], name: str) -> str:
    for style, needed in _STYLE_COLUMNS.items():
        if needed[0] in columns:
            return style
    expected = "; ".join(f"{_STYLE_NAMES[s]}: {list(c)}" for s, c in _STYLE_COLUMNS.items())
    raise ValueError(f"cannot tell the style of edit source {name!r} from its columns {sorted(columns)}; "
                     f"expected the columns of one style ({expected}), or pass style=")


def _text(value: Any) -> str | None:
    """A stripped non-empty string, or ``None``."""
    return (value.strip() or None) if isinstance(value, str) else None


def _require(where: str, fields: Mapping[str, Any]) -> dict[str, str]:
    """The given source fields as stripped strings; a ``ValueError`` names those missing or empty."""
    texts = {key: _text(value) for key, value in fields.items()}
    bad = [key for key, text in texts.items() if text is None]
    if bad:
        raise ValueError(f"{where}: missing or empty field(s) {bad}")
    return {key: text for key, text in texts.items() if text is not None}


def _native(row: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    record = {field: row.get(field) for field in EDIT_FIELDS}
    validate_edit_record(record, where=where)
    locality = [{"question": item["question"], "answer": item["answer"]} for item in record["locality"]]
    return {**record, "locality": locality}


def _zsre(row: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    f = _require(where, {key: row.get(key) for key in _STYLE_COLUMNS["zsre"]})
    question, subject, alt = f["src"], f["subject"], f["alt"]
    loc = _NQ_PREFIX.sub("", f["loc"]).strip()
    if not loc:
        raise ValueError(f"{where}: loc {f['loc']!r} has no question after its 'nq question:' prefix")
    relation = question.replace(subject, "{}") if subject in question else "zsre"
    return {
        "edit": f"{question} {alt}",
        "subject": subject,
        "relation": relation,
        "target": alt,
        "question": question,
        "answer": alt,
        "rephrase": f["rephrase"],
        "locality": [{"question": loc, "answer": f["loc_ans"]}],
        "kind": name,
    }


def _counterfact(row: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    rewrite = row.get("requested_rewrite")
    if not isinstance(rewrite, Mapping):
        raise ValueError(f"{where}: requested_rewrite must be a dict, got {type(rewrite).__name__}")
    f = _require(where, {
        "requested_rewrite.prompt": rewrite.get("prompt"),
        "requested_rewrite.subject": rewrite.get("subject"),
        "requested_rewrite.target_new.str": _nested(rewrite, "target_new"),
        "requested_rewrite.target_true.str": _nested(rewrite, "target_true"),
        "requested_rewrite.relation_id": rewrite.get("relation_id"),
    })
    prompt, subject = f["requested_rewrite.prompt"], f["requested_rewrite.subject"]
    new, true = f["requested_rewrite.target_new.str"], f["requested_rewrite.target_true.str"]
    if "{}" not in prompt:
        raise ValueError(f"{where}: requested_rewrite.prompt {prompt!r} has no '{{}}' for the subject")
    paraphrases = _prompts(row.get("paraphrase_prompts"), "paraphrase_prompts", where)
    if not paraphrases:
        raise ValueError(f"{where}: paraphrase_prompts is empty")
    neighbours = _prompts(row.get("neighborhood_prompts"), "neighborhood_prompts", where)
    question = prompt.replace("{}", subject)
    return {
        "edit": f"{question} {new}",
        "subject": subject,
        "relation": f["requested_rewrite.relation_id"],
        "target": new,
        "question": question,
        "answer": new,
        "rephrase": paraphrases[0],
        "locality": [{"question": prompt_, "answer": true} for prompt_ in neighbours],
        "kind": name,
    }


def _nested(rewrite: Mapping[str, Any], key: str) -> Any:
    target = rewrite.get(key)
    return target.get("str") if isinstance(target, Mapping) else None


def _prompts(value: Any, field: str, where: str) -> list[str]:
    """A list of prompts as stripped non-empty strings."""
    if value is None or isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: {field} must be a list of prompts, got {type(value).__name__}")
    texts = [_text(v) for v in value]
    if None in texts:
        raise ValueError(f"{where}: {field}[{texts.index(None)}] is missing or empty")
    return [text for text in texts if text is not None]


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], str, str], dict[str, Any]]] = {
    "native": _native,
    "zsre": _zsre,
    "counterfact": _counterfact,
}


def edit_records(source: str, split: str, count: int, seed: int = 0, style: str = "auto") -> list[dict[str, Any]]:
    """Exactly ``count`` records of ``split`` from ``source``: ``"offline"`` (`build_edit_records`, seeded) or a file /
    Hub dataset (`load_edit_records`); an error when the source has fewer."""
    if source == "offline":
        return build_edit_records(count, seed=seed, split=split)
    records = list(load_edit_records(source, split=split, num_samples=count, style=style))
    if len(records) < count:
        raise ValueError(f"edit source {source!r} has {len(records)} {split} records, {count} were asked for")
    return records
