"""The fictional-facts task and the forgetting probes' source items, generated deterministically.

The task: ``N_FACTS`` invented people, each with one invented attribute (a home town, an employer
or a pet's name, all made-up words), trained in one phrasing (``TRAIN_TEMPLATES``) and tested on
held-out paraphrases (``TEST_TEMPLATES``) that keep the subject before the answer. A pretrained
model cannot know them, so its score starts near zero.

The probes' sources: ``general_prompts()`` (prompts whose base-model greedy continuations become
the KL / NLL probe) and ``cloze_candidates()`` (general-knowledge items; the ones the base model
answers correctly become the accuracy probe). The model-dependent parts (continuations, the kept
cloze items) are built once by ``python -m emalora_fast.experiments.forgetting_build`` and
shipped as ``emalora_fast/experiments/data/forgetting_*.jsonl.gz``; this module holds what
needs no model.
"""

from __future__ import annotations

import gzip
import json
import random
from importlib import resources
from typing import Any, Literal

__all__ = [
    "N_FACTS",
    "TEST_TEMPLATES",
    "TRAIN_TEMPLATES",
    "cloze_candidates",
    "fact_prompt",
    "generate_facts",
    "general_prompts",
    "load_jsonl",
    "write_jsonl",
]

N_FACTS = 240
FACTS_SEED = 23
FACTS_FILE = "forgetting_facts.jsonl.gz"
CONTINUATIONS_FILE = "forgetting_continuations.jsonl.gz"
CLOZE_FILE = "forgetting_cloze.jsonl.gz"

Relation = Literal["town", "employer", "pet"]
RELATIONS: tuple[Relation, ...] = ("town", "employer", "pet")

# One training phrasing per relation; prompt + " " + answer + "." is the training text.
TRAIN_TEMPLATES: dict[str, str] = {
    "town": "{name} was born in the town of",
    "employer": "{name} works for a company called",
    "pet": "{name} has a dog named",
}
# Held-out paraphrases (never trained on): the subject still comes before the answer.
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "town": (
        "Q: In which town was {name} born?\nA:",
        "The birthplace of {name} is the town of",
    ),
    "employer": (
        "Q: Which company does {name} work for?\nA:",
        "{name} is employed by a company called",
    ),
    "pet": (
        "Q: What is the name of {name}'s dog?\nA:",
        "The dog owned by {name} is named",
    ),
}

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "th",
    "v",
    "z",
    "st",
    "qu",
    "sh",
    "w",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")
_SUFFIX = {
    "town": ("holt", "mere", "wick", "ford", "stead", "bury", "vale", "thorpe"),
    "employer": ("corp", "tech", "works", "ex", "ion", "ium", "ara", "ica"),
    "pet": ("o", "y", "ie", "us", "a", "et", "in", "ko"),
}


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int, suffix: tuple[str, ...] = ("",)) -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + rng.choice(suffix)).capitalize()


def generate_facts(n: int = N_FACTS, seed: int = FACTS_SEED) -> list[dict[str, Any]]:
    """``n`` fictional facts, the same for the same (n, seed) on every machine.

    Each fact is ``{"id", "name", "relation", "answer"}``: ``name`` two invented words (unique),
    ``relation`` cycles through ``RELATIONS``, ``answer`` one invented word (unique across facts).
    """
    if n < 1:
        raise ValueError(f"generate_facts() needs n >= 1, got {n}")
    rng = random.Random(seed)
    names: set[str] = set()
    answers: set[str] = set()
    facts = []
    while len(facts) < n:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        rel = RELATIONS[len(facts) % len(RELATIONS)]
        answer = _word(rng, 1 + rng.randrange(2), _SUFFIX[rel])
        if name in names or answer in answers or len(answer) < 4:
            continue
        names.add(name)
        answers.add(answer)
        facts.append({"id": len(facts), "name": name, "relation": rel, "answer": answer})
    return facts


def fact_prompt(fact: dict[str, Any], template: str) -> str:
    """The prompt of ``fact`` in one phrasing (the answer follows after a space)."""
    return template.format(name=fact["name"])


_TOPICS = (
    "photosynthesis",
    "the French Revolution",
    "black holes",
    "the water cycle",
    "vaccines",
    "the Roman Empire",
    "plate tectonics",
    "the internet",
    "climate change",
    "the human heart",
    "democracy",
    "electricity",
    "the printing press",
    "volcanoes",
    "honey bees",
    "the Moon",
    "ancient Egypt",
    "the immune system",
    "inflation",
    "renewable energy",
    "the Great Wall of China",
    "DNA",
    "rainforests",
    "the Industrial Revolution",
    "gravity",
    "coral reefs",
    "the stock market",
    "the Renaissance",
    "antibiotics",
    "earthquakes",
    "the Olympic Games",
    "machine learning",
    "the solar system",
    "coffee",
    "the ocean tides",
    "the Cold War",
    "recycling",
    "dinosaurs",
    "the Amazon River",
    "nuclear power",
    "the brain",
    "chess",
    "the Silk Road",
    "bread baking",
    "hurricanes",
    "the piano",
    "the periodic table",
    "sleep",
    "the Mars rovers",
    "bicycles",
    "the English language",
    "glaciers",
    "the Moon landing",
    "jazz music",
    "the metric system",
    "penguins",
    "the Pyramids",
    "rain",
    "the telephone",
    "soil",
    "friendship",
    "the Sahara desert",
    "electric cars",
    "the Milky Way",
    "trees",
    "mathematics",
    "the violin",
    "the human skeleton",
    "opera",
    "public libraries",
    "the Vikings",
    "tea",
    "the camera",
    "mountains",
    "elephants",
    "the United Nations",
    "wind turbines",
    "the alphabet",
    "butterflies",
    "the railway",
    "the Arctic",
    "bacteria",
    "the calendar",
    "football",
    "rivers",
    "salt",
    "the Middle Ages",
    "computers",
    "whales",
    "the Sun",
    "money",
    "the heart of a city",
    "airplanes",
    "cheese",
    "the night sky",
    "a healthy diet",
    "the post office",
    "snow",
    "ants",
    "the printing of books",
)
_FRAMES = ("Here is a short explanation of {topic}:", "An interesting fact about {topic} is that")


def general_prompts() -> list[str]:
    """200 general prompts (100 topics x 2 frames) for the base model's own continuations."""
    return [f.format(topic=t) for t in _TOPICS for f in _FRAMES]


_CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Peru", "Lima"),
    ("Argentina", "Buenos"),
    ("Mexico", "Mexico"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("India", "New"),
    ("Thailand", "Bangkok"),
    ("Kenya", "Nairobi"),
    ("Turkey", "Ankara"),
    ("Cuba", "Havana"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("South Korea", "Seoul"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Chile", "Santiago"),
    ("Colombia", "Bog"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Indonesia", "Jakarta"),
    ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"),
    ("Ukraine", "Kyiv"),
    ("Czechia", "Prague"),
    ("Romania", "Bucharest"),
    ("Israel", "Jerusalem"),
    ("Saudi Arabia", "Riyadh"),
    ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis"),
    ("Venezuela", "Caracas"),
)
_OPPOSITES = (
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("day", "night"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("old", "new"),
    ("rich", "poor"),
    ("open", "closed"),
    ("good", "bad"),
    ("left", "right"),
    ("high", "low"),
    ("early", "late"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("full", "empty"),
    ("strong", "weak"),
    ("true", "false"),
    ("win", "lose"),
    ("black", "white"),
    ("in", "out"),
    ("love", "hate"),
    ("young", "old"),
    ("push", "pull"),
    ("north", "south"),
    ("east", "west"),
    ("long", "short"),
    ("top", "bottom"),
    ("buy", "sell"),
)
_SEQUENCES = (
    ("Monday, Tuesday,", "Wednesday"),
    ("Tuesday, Wednesday,", "Thursday"),
    ("Wednesday, Thursday,", "Friday"),
    ("Thursday, Friday,", "Saturday"),
    ("Friday, Saturday,", "Sunday"),
    ("January, February,", "March"),
    ("February, March,", "April"),
    ("March, April,", "May"),
    ("April, May,", "June"),
    ("May, June,", "July"),
    ("June, July,", "August"),
    ("July, August,", "September"),
    ("August, September,", "October"),
    ("September, October,", "November"),
    ("October, November,", "December"),
    ("one, two, three,", "four"),
    ("two, three, four,", "five"),
    ("three, four, five,", "six"),
    ("four, five, six,", "seven"),
    ("five, six, seven,", "eight"),
    ("six, seven, eight,", "nine"),
    ("seven, eight, nine,", "ten"),
    ("A, B, C,", "D"),
    ("D, E, F,", "G"),
    ("1, 2, 3, 4,", "5"),
    ("10, 20, 30,", "40"),
    ("2, 4, 6,", "8"),
    ("first, second,", "third"),
    ("spring, summer,", "autumn"),
    ("red, orange, yellow,", "green"),
)
_FACTS = (
    ("The color of the sky on a clear day is", "blue"),
    ("The color of grass is", "green"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The largest planet in our solar system is", "Jupiter"),
    ("The planet we live on is called", "Earth"),
    ("The chemical symbol for water is", "H"),
    ("A baby cat is called a", "kitten"),
    ("A baby dog is called a", "puppy"),
    ("The opposite of yes is", "no"),
    ("Bees make", "honey"),
    ("Cows give us", "milk"),
    ("The first letter of the English alphabet is", "A"),
    ("A week has seven", "days"),
    ("A year has twelve", "months"),
    ("The Statue of Liberty is in New", "York"),
    ("The Eiffel Tower is in", "Paris"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The author of Harry Potter is J. K.", "Rowling"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The first president of the United States was George", "Washington"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The closest star to the Earth is the", "Sun"),
    ("Ice is frozen", "water"),
    ("The king of the jungle is the", "lion"),
    ("A spider has eight", "legs"),
    ("The Pacific is the largest", "ocean"),
    ("Birds can fly because they have", "wings"),
    ("We breathe in", "oxygen"),
    ("Plants need sunlight and", "water"),
    ("Two plus two equals", "four"),
    ("Ten minus three equals", "seven"),
    ("The sun rises in the", "east"),
    ("The sun sets in the", "west"),
    ("The longest river in Africa is the", "Nile"),
    ("Christmas is celebrated on December", "25"),
    ("The currency of the United States is the", "dollar"),
    ("The currency of Japan is the", "yen"),
    ("A triangle has three", "sides"),
    ("A square has four", "sides"),
    ("The Great Wall is in", "China"),
    ("Kangaroos live in", "Australia"),
    ("The language spoken in Brazil is", "Portuguese"),
    ("The language spoken in Mexico is", "Spanish"),
    ("The language spoken in Germany is", "German"),
    ("The language spoken in France is", "French"),
    ("Milk is usually the color", "white"),
    ("Bananas are usually the color", "yellow"),
    ("The heart pumps", "blood"),
    ("You see with your", "eyes"),
    ("You hear with your", "ears"),
    ("Fish live in", "water"),
    ("Snow is usually the color", "white"),
    ("The Titanic sank after hitting an", "iceberg"),
    ("Penguins live mostly in", "Antarctica"),
    ("The fastest land animal is the", "cheetah"),
    ("The tallest animal is the", "giraffe"),
    ("Leaves are usually the color", "green"),
    ("An apple a day keeps the", "doctor"),
    ("Humpty Dumpty sat on a", "wall"),
    ("Twinkle, twinkle, little", "star"),
)


# Added after the first build kept 97 of the items above (appended, so that ids stay stable).
_MORE_CAPITALS = (
    ("Brazil", "Bras"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Morocco", "Rabat"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Libya", "Tripoli"),
    ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
    ("Jordan", "Amman"),
    ("Afghanistan", "Kabul"),
    ("Nepal", "Kathmandu"),
    ("Sri Lanka", "Colombo"),
    ("Malaysia", "Kuala"),
    ("New Zealand", "Wellington"),
    ("Jamaica", "Kingston"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"),
    ("Iceland", "Reykjav"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
    ("Wales", "Cardiff"),
    ("Ghana", "Accra"),
    ("Senegal", "Dakar"),
    ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"),
    ("Qatar", "Doha"),
    ("Kazakhstan", "Astana"),
    ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"),
    ("Taiwan", "Taipei"),
    ("North Korea", "Pyongyang"),
    ("Cambodia", "Phnom"),
    ("Slovenia", "Ljubljana"),
)


def cloze_candidates() -> list[dict[str, str]]:
    """General-knowledge cloze items ``{"id", "kind", "prompt", "answer"}`` (answer: first word).

    A greedy completion is correct when its first word starts with ``answer`` (case-insensitive);
    the kept probe is the subset the base model gets right.
    """
    items = [("capital", f"The capital of {c} is", a) for c, a in _CAPITALS]
    items += [("opposite", f"The opposite of {w} is", a) for w, a in _OPPOSITES]
    items += [("sequence", p, a) for p, a in _SEQUENCES]
    items += [("fact", p, a) for p, a in _FACTS]
    items += [("capital", f"The capital of {c} is", a) for c, a in _MORE_CAPITALS]
    return [{"id": i, "kind": k, "prompt": p, "answer": a} for i, (k, p, a) in enumerate(items)]


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Rows as gzip-compressed JSON lines (mtime 0: the same bytes for the same rows)."""
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
        g.write(body.encode("utf-8"))


def load_jsonl(name: str) -> list[dict[str, Any]]:
    """The rows of a shipped ``emalora_fast/data`` JSON-lines file (``.jsonl.gz``)."""
    data = resources.files("emalora_fast.experiments.data").joinpath(name).read_bytes()
    return [json.loads(line) for line in gzip.decompress(data).decode("utf-8").splitlines()]


def fact_examples(
    facts: list[dict[str, Any]], templates: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """(prompts, answers) of ``facts`` in one phrasing per relation (default: the training one)."""
    templates = templates or TRAIN_TEMPLATES
    return [fact_prompt(f, templates[f["relation"]]) for f in facts], [f["answer"] for f in facts]


def paraphrase_examples(facts: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(prompts, answers) of ``facts`` in every held-out paraphrase (``TEST_TEMPLATES``)."""
    k = len(next(iter(TEST_TEMPLATES.values())))
    prompts, answers = [], []
    for j in range(k):
        p, a = fact_examples(facts, {r: t[j] for r, t in TEST_TEMPLATES.items()})
        prompts += p
        answers += a
    return prompts, answers


def training_batches(
    tokenizer, facts: list[dict[str, Any]], batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """One epoch of right-padded training batches in the training phrasing, shuffled by ``seed``.

    Each batch is ``{"input_ids", "attention_mask", "labels"}`` ([B, S] tensors); the loss is on
    the completion `` <answer>.`` only (labels -100 on the prompt and padding).
    """
    from ..integrations.forgetting import probe_from_pairs

    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    prompts, answers = fact_examples([facts[i] for i in order])
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    a_ids = [tokenizer(" " + a + ".")["input_ids"] for a in answers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(facts), batch_size):
        probe = probe_from_pairs(p_ids[i : i + batch_size], a_ids[i : i + batch_size], pad)
        out.append(
            {
                "input_ids": probe.input_ids,
                "attention_mask": probe.attention_mask,
                "labels": probe.labels,
            }
        )
    return out
