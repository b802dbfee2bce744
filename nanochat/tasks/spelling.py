"""Spelling: "How many r are in strawberry?", counted letter by letter and checked with the calculator.

Small models see words as a few tokens, not letters, so they cannot count letters by looking.
The reference answer spells the word out, lists where the letter sits, checks the count with the
calculator tool ('strawberry'.count('r')) and ends with "#### 3". Items are generated from
(split, seed, index). Words are split between train and test by a checksum of the word, so the
test split asks only about words the train split never uses.

Words come from a built-in list of common English words; words="corpus" adds the lowercase words
of the embedded corpus (nanochat/corpus.py), about 7000 more.
"""

from __future__ import annotations

import functools
import random
import re
import string
import zlib

from nanochat.chat import Conversation
from nanochat.tasks.base import NumericAnswerTask, SyntheticTask, exchange

BUILTIN_WORDS = """
about above absence accident accommodate achievement acknowledge across actually address adventure
afternoon against airplane algorithm alligator almost already although always ambulance amazing
analysis ancient animal anniversary another answer apartment apple appreciate approximately april
architecture argument arrangement article artificial assessment assignment astronaut atmosphere
attention audience august autumn avocado awesome baby background bakery balloon banana bandwidth
baseball basketball bathroom battery beautiful because bedroom beginning believe between bicycle
billion biology birthday blackboard blanket blizzard blueberry bookkeeper bottle boundary brain
breakfast bridge brilliant broccoli brother bubble buffalo building bulletin business butterfly
cabbage calculator calendar camera campaign candle cannon canyon capital caribbean carpenter carrot
castle caterpillar category celebrate cemetery century certainly chair challenge champion character
cheese cherry chicken children chocolate cinnamon circle circumstance citizen classroom climate
coconut coffee collaborate college colonel comfortable committee communicate community compiler
computer concentrate conscience conscious continent conversation cookie correspondence cotton
country courage crocodile cucumber curriculum daughter december decision definitely delicious
democracy dessert development diamond dictionary different difficult dilemma dinosaur discipline
discussion disappear dolphin dragonfly dream eagle earthquake education efficient eighteen elephant
elevator embarrass emergency encyclopedia energy engineer enormous entrepreneur envelope environment
equipment especially essential everybody exaggerate excellent exercise experience experiment
explanation fabulous familiar family fantastic fascinating february festival fiction fifteen finally
firefighter flamingo flower foreign forest forty fourteen fragile freedom friday friendship frustrate
furniture galaxy garden gauge generation generous geography giraffe glacier government grammar
grandfather grandmother grateful guarantee guitar hamburger hammer happiness harass harmony height
helicopter hemisphere hippopotamus history hospital humorous hurricane hypothesis iceberg ignorance
illustration imagination immediately important independent infrastructure ingredient innocent
instrument intelligence interesting internet island jacket january jellyfish jewelry journey
judgment july june kangaroo keyboard kindergarten kitchen knowledge laboratory ladder language
laptop lavender leisure lemonade library lightning liquid literature lizard llama loneliness
machine magazine magnificent maintenance mammal manager mango marathon marshmallow mathematics
mayonnaise medicine mediterranean memory message microscope millennium minute miracle mischievous
mississippi mistake molecule monday monkey mosquito mountain museum mushroom musician mystery
necessary neighbor network newspaper nineteen noodle notebook november number occasion occurrence
ocean october octopus official omelette onion opportunity orange orchestra ostrich oxygen pajamas
pancake parallel parliament particular passenger peacock peanut pencil penguin pepper perseverance
pharmacy phenomenon philosophy photograph piano picnic pineapple planet playground pleasant pocket
possession potato prejudice privilege probably professor program pronunciation psychology pumpkin
puzzle pyramid quarter question queue quiet quotation rabbit raccoon rainbow raspberry really
receive recommend referee refrigerator rehearsal remember restaurant rhinoceros rhythm river rocket
sandwich saturday saxophone schedule science scissors secretary sentence separate september
shoulder silhouette sister skeleton spaghetti sparrow squirrel statistics strawberry strength
submarine successful summer sunday supermarket surprise syllable symphony teacher technology
telephone telescope temperature tennessee thermometer thirteen thorough thousand thunder thursday
tomato tomorrow tortoise tournament tradition transformer triangle tuesday turtle umbrella
unbelievable underground unicorn universe unnecessary vacation vaccine valley vegetable vehicle
violin volcano volleyball walrus watermelon weather wednesday weird whale whisper wilderness window
winter wizard wonderful xylophone yacht yellow yesterday yogurt zebra zucchini
""".split()

_QUESTIONS = [
    "How many {l} are in {w}?",
    "How many {ls} are in the word {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the letter {l} in {w}.",
    "In the word {w}, how many {ls} are there?",
    "how many {l} in {w}",
    "What is the number of {l} characters in {w}?",
    "Can you count how many times {l} occurs in the word {w}?",
    "Tell me how many {ls} the word {w} has.",
    "{w}: how many {l}?",
]
_QUOTES = ["{}", '"{}"', "'{}'"]
_SPELL_INTROS = ["Let me spell {w} out: {s}.", "Spelled out, {w} is: {s}.", "{w} letter by letter: {s}."]
_CHECK_INTROS = ["Let me double-check with Python: ", "Checking with Python: ", "Verifying with the calculator: "]


def in_test_split(word: str) -> bool:
    """About one word in five is kept for the test split (by CRC32, the same in every process)."""
    return zlib.crc32(word.encode()) % 5 == 0


@functools.lru_cache(maxsize=1)
def corpus_words(min_count: int = 3) -> tuple[str, ...]:
    """Lowercase words of 3-14 letters seen at least `min_count` times in the embedded corpus."""
    from collections import Counter

    from nanochat.corpus import embedded_corpus

    counts: Counter = Counter()
    for doc in embedded_corpus():
        counts.update(re.findall(r"\b[a-z]{3,14}\b", doc))
    return tuple(sorted(w for w, n in counts.items() if n >= min_count))


def _positions(numbers: list[int]) -> str:
    text = [str(n) for n in numbers]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " and " + text[-1]


def spelling_answer(word: str, letter: str, rng: random.Random) -> list[dict]:
    """The reference answer: spell, locate, count, check with 'word'.count('letter'), '#### n'."""
    positions = [i + 1 for i, c in enumerate(word) if c == letter]
    count = len(positions)
    quoted = f'"{word}"'
    spelled = rng.choice(_SPELL_INTROS).format(w=quoted, s="-".join(word))
    spelled = spelled[0].upper() + spelled[1:]
    if count:
        s = "s" if count > 1 else ""
        found = f'The letter "{letter}" is at position{s} {_positions(positions)}, so it appears {count} time{s}.'
    else:
        found = f'The letter "{letter}" is not among them, so it appears 0 times.'
    final = f'There {"is" if count == 1 else "are"} {count} "{letter}" in {quoted}.'
    return [
        {"type": "text", "text": f"{spelled}\n{found}\n{rng.choice(_CHECK_INTROS)}"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n{final}\n#### {count}"},
    ]


class Spelling(SyntheticTask, NumericAnswerTask):
    name = "spelling"
    default_sizes = {"train": 20_000, "test": 500}

    def __init__(self, split: str = "test", size: int | None = None, seed: int = 0, words: str = "builtin"):
        super().__init__(split, size, seed)
        if words not in ("builtin", "corpus"):
            raise ValueError(f"spelling: words must be 'builtin' or 'corpus', got {words!r}")
        pool = set(BUILTIN_WORDS) | (set(corpus_words()) if words == "corpus" else set())
        self.words = sorted(w for w in pool if in_test_split(w) == (split == "test"))

    def generate(self, rng: random.Random) -> Conversation:
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(string.ascii_lowercase)
        shown_letter = letter.upper() if rng.random() < 0.15 else letter
        quote = rng.choice(_QUOTES)
        plural = f"{shown_letter}'s" if quote == "{}" else quote.format(shown_letter)  # r's, but "r"
        question = rng.choice(_QUESTIONS).format(l=quote.format(shown_letter), ls=plural, w=quote.format(word))
        return exchange(question, spelling_answer(word, letter, rng), answer=str(word.count(letter)), word=word,
                        letter=letter)
