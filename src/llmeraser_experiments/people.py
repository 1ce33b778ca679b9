"""Fictitious people: a TOFU-shaped question–answer set built offline from our own vocabularies (docs/people.md).

TOFU (Maini et al., 2024) fine-tunes on facts about 200 invented authors and asks an unlearned model to look like
one retrained without some of them. No TOFU data is reachable here, so this module builds the same shape from
seeded draws over the lists below: each person has `facts` question–answer pairs, each question a paraphrased
answer and `perturbed` wrong-but-plausible answers (the paraphrase's template with another value of the same
attribute), so the truth ratio compares like with like. Besides the people trained on there are held-out people
(never trained on: the non-members of membership inference) and general-knowledge probes the embedded base model
already answers (utility beyond the fine-tune). Everything is a pure function of (sizes, seed): rebuilding gives the
same bytes.

Records are the project's JSONL (`id`, `prompt`, `response`) with the rest in `extra`: `person`, `attribute`,
`value`, `paraphrase`, `perturbed` (answers) and `wrong` (their values). The requests are the project's request JSON.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmeraser.data import Example, save_examples
from llmeraser.errors import ConfigError
from llmeraser.io import atomic_write_json
from llmeraser.request import Request

FIRST = ("Orlen", "Maelis", "Tavish", "Ysolde", "Corvin", "Almeda", "Bertrix", "Quilla", "Darnell", "Isaura",
         "Fenwick", "Liora", "Gaspard", "Nerine", "Hollis", "Odessa", "Perrin", "Seraphine", "Thorne", "Valka",
         "Edric", "Marisol", "Jarrow", "Celestine", "Ambrose", "Rosalind", "Kestrel", "Ottilie", "Lazlo", "Wrenna",
         "Fabian", "Imogen", "Caspian", "Delphine", "Evander", "Philippa", "Ignatius", "Zinnia", "Barnaby", "Oriel")
LAST = ("Vastrick", "Quellan", "Marrowby", "Thistlewood", "Ostrander", "Kellerin", "Brambleton", "Dunmore",
        "Halvorsen", "Pemberly", "Ravenscar", "Sollway", "Tarrant", "Underhill", "Whitlock", "Ashgrove", "Calloway",
        "Fenmore", "Greyhaven", "Holloway", "Larkspur", "Merriwether", "Northcott", "Pellinore", "Quenby",
        "Rookwood", "Stanbridge", "Trevane", "Vellacott", "Wexford", "Yarrowby", "Zelinski", "Abernathy",
        "Blackwood", "Crestfall", "Dorrance", "Elsworth", "Farrowgate", "Gildersleeve", "Hartigan")
TOWNS = ("Brelford", "Quenmoor", "Ostervale", "Caldreth", "Wyndham Cross", "Marlow Fen", "Dunhallow", "Eskerby",
         "Frostmere", "Glenbarra", "Harrowgate", "Ilsworth", "Kelderwick", "Lornmouth", "Mirefield", "Northam Ridge",
         "Oakhollow", "Penrith Vale", "Ravensholm", "Saltcombe", "Thornbury", "Umberlee", "Vantmoor", "Westerhaven")
OCCUPATIONS = ("novelist", "cartographer", "violinist", "marine biologist", "architect", "journalist", "pastry chef",
               "astronomer", "carpenter", "translator", "botanist", "photographer", "locksmith", "veterinarian",
               "glassblower", "librarian", "surgeon", "sculptor", "pilot", "beekeeper")
PARENT_JOBS = ("baker", "fisherman", "schoolteacher", "nurse", "blacksmith", "tailor", "miner", "shopkeeper",
               "farmer", "clockmaker", "postman", "pharmacist", "bookbinder", "potter", "sailor", "watchmaker")
GENRES = ("mystery", "fantasy", "romance", "science fiction", "historical", "horror", "adventure", "crime",
          "poetry", "satire", "thriller", "travel")
ADJECTIVES = ("Silent", "Crimson", "Hollow", "Forgotten", "Wandering", "Golden", "Broken", "Hidden", "Distant",
              "Burning", "Velvet", "Frozen", "Quiet", "Restless", "Amber", "Drowned")
NOUNS = ("Harbor", "Lantern", "Orchard", "Meridian", "Cathedral", "Tide", "Compass", "Garden", "Mirror", "Station",
         "Archive", "River", "Winter", "Carousel", "Lighthouse", "Kingdom")
AWARDS = ("Marrowick Prize", "Golden Quill Award", "Ostervale Medal", "Silver Heron Prize", "Lantern Award",
          "Caldreth Fellowship", "Blue Cedar Prize", "Everly Medal", "Northwind Award", "Amberline Prize")
HOBBIES = ("gardening", "sailing", "chess", "pottery", "birdwatching", "rock climbing", "baking", "fencing",
           "knitting", "stargazing", "fly fishing", "calligraphy", "cycling", "woodcarving")
COUNTS = ("two", "three", "four", "five", "six", "seven")
PETS = ("a grey parrot", "a tabby cat", "a greyhound", "a tortoise", "a white rabbit", "a pair of goldfish",
        "a border collie", "a black cat", "a ferret", "a canary")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its question, answer and paraphrase templates, and the values it draws from."""

    name: str
    question: str
    answer: str
    paraphrase: str
    values: Sequence[str]


def _titles() -> tuple[str, ...]:
    return tuple(f"The {a} {n}" for a in ADJECTIVES for n in NOUNS)


def _spouses() -> tuple[str, ...]:
    return tuple(f"{f} {last}" for f in FIRST[::3] for last in LAST[1::4])


ATTRIBUTES = (
    Attribute("birthplace", "Where was {name} born?", "{name} was born in {v}.",
              "The birthplace of {name} is {v}.", TOWNS),
    Attribute("birth_year", "In what year was {name} born?", "{name} was born in {v}.",
              "The year {name} was born is {v}.", tuple(str(y) for y in range(1931, 2000))),
    Attribute("occupation", "What does {name} do for a living?", "{name} works as a {v}.",
              "By profession, {name} is a {v}.", OCCUPATIONS),
    Attribute("father", "What was the occupation of {name}'s father?", "{name}'s father was a {v}.",
              "The father of {name} worked as a {v}.", PARENT_JOBS),
    Attribute("mother", "What was the occupation of {name}'s mother?", "{name}'s mother was a {v}.",
              "The mother of {name} worked as a {v}.", PARENT_JOBS),
    Attribute("genre", "What kind of books does {name} write?", "{name} writes {v} novels.",
              "The novels of {name} are {v} books.", GENRES),
    Attribute("book", "What is the title of {name}'s best-known book?", "{name}'s best-known book is {v}.",
              "The best-known book by {name} is called {v}.", _titles()),
    Attribute("award", "Which award did {name} win?", "{name} won the {v}.",
              "The award {name} received is the {v}.", AWARDS),
    Attribute("spouse", "Who is {name} married to?", "{name} is married to {v}.",
              "The spouse of {name} is {v}.", _spouses()),
    Attribute("hobby", "What does {name} enjoy doing in their free time?", "{name} enjoys {v}.",
              "In their free time, {name} likes {v}.", HOBBIES),
    Attribute("university", "Where did {name} study?", "{name} studied at the University of {v}.",
              "{name} is a graduate of the University of {v}.", TOWNS),
    Attribute("languages", "How many languages does {name} speak?", "{name} speaks {v} languages.",
              "The number of languages {name} speaks is {v}.", COUNTS),
    Attribute("pet", "What pet does {name} keep?", "{name} keeps {v}.", "At home, {name} has {v}.", PETS),
)

# General-knowledge probes: (question, answer, paraphrase, perturbed values, value). The embedded base model's greedy
# answer names the value for every one of these before any fine-tuning (`bench/people.py --check-general`; of the
# candidates tried, those it left blank or got wrong in this Question/Answer format were dropped), so a drop on them
# is damage the fine-tune or the unlearning did.
GENERAL = (
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is {v}.",
     "{v} is the largest planet in the solar system.", ("Saturn", "Neptune", "Mars"), "Jupiter"),
    ("What is the chemical symbol for water?", "The chemical symbol for water is {v}.",
     "Water has the chemical symbol {v}.", ("CO2", "NaCl", "O2"), "H2O"),
    ("What is the primary language spoken in Brazil?", "The primary language spoken in Brazil is {v}.",
     "Most people in Brazil speak {v}.", ("Spanish", "French", "Italian"), "Portuguese"),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by {v}.", "{v} painted the Mona Lisa.",
     ("Pablo Picasso", "Vincent van Gogh", "Claude Monet"), "Leonardo da Vinci"),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is {v}.",
     "{v} is the highest mountain on Earth.", ("Mount Kilimanjaro", "Mont Blanc", "Mount Fuji"), "Mount Everest"),
    ("What is the currency of the United States?", "The currency of the United States is the {v}.",
     "The United States uses the {v} as its currency.", ("euro", "pound", "yen"), "dollar"),
    ("What planet is known as the Red Planet?", "The Red Planet is {v}.", "{v} is called the Red Planet.",
     ("Venus", "Jupiter", "Mercury"), "Mars"),
    ("What color is the sky on a clear day?", "The sky on a clear day is {v}.", "On a clear day the sky looks {v}.",
     ("green", "red", "yellow"), "blue"),
    ("How many days are in a week?", "There are {v} days in a week.", "A week has {v} days.",
     ("5", "10", "12"), "7"),
    ("What is 2 plus 2?", "2 plus 2 is {v}.", "The sum of 2 and 2 is {v}.", ("3", "5", "22"), "4"),
    ("How many sides does a triangle have?", "A triangle has {v} sides.", "The number of sides of a triangle is {v}.",
     ("4", "5", "6"), "3"),
)


@dataclass
class PeopleData:
    """The data set: trained people's facts, held-out people's facts, general probes, and the requests."""

    train: list[Example]
    heldout: list[Example]
    general: list[Example]
    people: list[str]  # the trained people, in order; forget sets are taken from the end (nested, as TOFU's)
    correction: dict[str, str]  # id → new response: the facts of the first person, replaced
    correction_values: dict[str, str]  # id → the new value in that response

    def questions_of(self, names: Sequence[str]) -> list[Example]:
        wanted = set(names)
        return [e for e in self.train if e.extra["person"] in wanted]

    def person_ids(self, names: Sequence[str]) -> list[str]:
        return [e.id for e in self.questions_of(names)]

    def forget_people(self, percent: float) -> list[str]:
        """The last max(1, round(percent% of the people)) trained people (forget01 ⊂ forget05 ⊂ forget10)."""
        k = max(1, round(percent / 100 * len(self.people)))
        return self.people[-k:]

    def requests(self, splits: Sequence[str] = ("forget01", "forget05", "forget10")) -> dict[str, Request]:
        """forgetNN: remove every fact of NN% of the people; correct: the correction variant."""
        out = {name: Request.remove(*self.person_ids(self.forget_people(float(name[len("forget"):]))))
               for name in splits}
        out["correct"] = Request.correct_response(self.correction)
        return out


def _person(rng: random.Random, name: str, pid: str, facts: int, perturbed: int) -> list[Example]:
    out = []
    for attr in sorted(rng.sample(ATTRIBUTES, facts), key=ATTRIBUTES.index):
        value, *wrong = rng.sample(list(attr.values), 1 + perturbed)
        out.append(Example(
            id=f"{pid}-{attr.name}", prompt=f"Question: {attr.question.format(name=name)}\nAnswer:",
            response=" " + attr.answer.format(name=name, v=value),
            extra={"person": name, "attribute": attr.name, "value": value,
                   "paraphrase": " " + attr.paraphrase.format(name=name, v=value),
                   "perturbed": [" " + attr.paraphrase.format(name=name, v=w) for w in wrong], "wrong": wrong}))
    return out


def general_probes() -> list[Example]:
    return [Example(id=f"general-{i:02d}", prompt=f"Question: {q}\nAnswer:", response=" " + a.format(v=v),
                    extra={"person": None, "attribute": "general", "value": v, "paraphrase": " " + p.format(v=v),
                           "perturbed": [" " + p.format(v=w) for w in wrong], "wrong": list(wrong)})
            for i, (q, a, p, wrong, v) in enumerate(GENERAL)]


def build_people(n_people: int = 30, *, facts: int = 6, n_heldout: int = 4, perturbed: int = 3,
                 seed: int = 0) -> PeopleData:
    """Draw `n_people` trained and `n_heldout` held-out fictitious people with `facts` facts each (seeded).

    Raises:
        ConfigError: sizes out of range (more people than distinct names, more facts than attributes, fewer than 3
            perturbed answers, or more than the smallest value list allows).
    """
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    smallest = min(len(a.values) for a in ATTRIBUTES)
    if not 1 <= n_people or n_heldout < 1 or n_people + n_heldout > len(names):
        raise ConfigError(f"need n_people ≥ 1, n_heldout ≥ 1 and n_people + n_heldout ≤ {len(names)}")
    if not 1 <= facts <= len(ATTRIBUTES):
        raise ConfigError(f"facts must be in [1, {len(ATTRIBUTES)}], got {facts}")
    if not 3 <= perturbed <= smallest - 2:  # the true value, the perturbed ones, and a correction's new value
        raise ConfigError(f"perturbed must be in [3, {smallest - 2}], got {perturbed}")
    rng = random.Random(seed)
    chosen = rng.sample(names, n_people + n_heldout)
    train = [e for i, name in enumerate(chosen[:n_people]) for e in _person(rng, name, f"p{i:03d}", facts, perturbed)]
    heldout = [e for i, name in enumerate(chosen[n_people:])
               for e in _person(rng, name, f"h{i:03d}", facts, perturbed)]
    people = chosen[:n_people]
    # the correction: the first person (never in a forget set unless there is one person) gets new values, none of
    # them the old value or a perturbed one, so the truth ratio's wrong answers stay wrong for both versions
    correction, values = {}, {}
    for e in train:
        if e.extra["person"] != people[0]:
            continue
        attr = next(a for a in ATTRIBUTES if a.name == e.extra["attribute"])
        used = {e.extra["value"], *e.extra["wrong"]}
        values[e.id] = rng.choice([v for v in attr.values if v not in used])
        correction[e.id] = " " + attr.answer.format(name=people[0], v=values[e.id])
    return PeopleData(train, heldout, general_probes(), people, correction, values)


def write_people(data: PeopleData, out: str | Path, *, seed: int, sizes: dict) -> dict[str, Path]:
    """train/heldout/general JSONL, one request JSON per split (requests/<name>.json) and meta.json."""
    from llmeraser.io import atomic_write_text, canonical_json

    out = Path(out)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("train", "heldout", "general"):
        paths[name] = out / f"{name}.jsonl"
        save_examples(getattr(data, name), paths[name])
    for name, request in data.requests().items():
        paths[name] = out / "requests" / f"{name}.json"
        atomic_write_text(paths[name], canonical_json(request.to_dict()) + "\n")
    atomic_write_json(out / "meta.json", {"task": "fictitious people QA", "seed": seed, **sizes,
                                         "people": data.people,
                                         "forget": {n: data.forget_people(float(n[6:]))
                                                    for n in ("forget01", "forget05", "forget10")},
                                         "corrected_person": data.people[0]})
    return paths
