"""Natural English sentences from a small probabilistic grammar over a fixed word list.

Why a grammar and not word salad: Whisper tiny.en on eSpeak speech scores WER ~0.74 on random word
sequences but ~0.20 on grammatical sentences, so the references only mean something on real
sentences. Why a small fixed vocabulary: the CTC reference models are tiny (~2M parameters) and are
trained for about an hour on CPU; a few hundred words, all of which occur in train, make that feasible.

Properties:
- deterministic: every sentence comes from `random.Random` seeded with a string (never the global
  generator; string seeds are hashed with SHA-512, so they do not depend on PYTHONHASHSEED);
- text uses only `CHARSET` (lowercase a-z, apostrophe, space): the CTC vocabulary is built from it;
- split-disjoint: each distinct sentence belongs to exactly one split, chosen by a hash of its text
  (`sentence_split`), so train/dev/test never share a sentence, whatever their sizes;
- the vocabulary (`VOCABULARY`) is fixed and shared by all splits.

Bump `SENTENCES_VERSION` whenever a word list or rule changes: the corpus cache key includes it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

SENTENCES_VERSION = 1

# The only characters a sentence may contain. The CTC models' vocabulary is built from this string.
CHARSET = "abcdefghijklmnopqrstuvwxyz' "

MIN_WORDS = 5
MAX_WORDS = 14

SPLITS = ("train", "dev", "test")

# Share of distinct sentences assigned to each split by `sentence_split` (out of 100 hash buckets).
# Test and dev only need a few hundred sentences each, so 10 % each still leaves a huge pool.
_SPLIT_BUCKETS = {"test": range(0, 10), "dev": range(10, 20), "train": range(20, 100)}

# ---------------------------------------------------------------------------------------------------
# Word lists. Nouns are (singular, plural) pairs so irregular plurals stay correct.
# ---------------------------------------------------------------------------------------------------
PEOPLE = [
    ("farmer", "farmers"), ("teacher", "teachers"), ("doctor", "doctors"), ("child", "children"),
    ("boy", "boys"), ("girl", "girls"), ("man", "men"), ("woman", "women"), ("student", "students"),
    ("driver", "drivers"), ("baker", "bakers"), ("nurse", "nurses"), ("neighbor", "neighbors"),
    ("friend", "friends"), ("sister", "sisters"), ("brother", "brothers"), ("mother", "mothers"),
    ("father", "fathers"), ("captain", "captains"), ("worker", "workers"), ("painter", "painters"),
    ("singer", "singers"), ("cook", "cooks"), ("pilot", "pilots"), ("soldier", "soldiers"),
    ("fisherman", "fishermen"), ("king", "kings"), ("queen", "queens"), ("visitor", "visitors"),
    ("stranger", "strangers"), ("uncle", "uncles"), ("aunt", "aunts"), ("policeman", "policemen"),
]
# People nouns that read naturally after a possessive ("my sister", "john's teacher").
RELATIONS = {"friend", "sister", "brother", "mother", "father", "neighbor", "teacher", "doctor",
             "uncle", "aunt", "child", "children", "friends", "sisters", "brothers", "neighbors",
             "teachers", "uncles", "aunts", "students", "student", "captain", "nurse"}
ANIMALS = [
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("cow", "cows"),
    ("fox", "foxes"), ("rabbit", "rabbits"), ("duck", "ducks"), ("sheep", "sheep"), ("mouse", "mice"),
    ("goat", "goats"), ("pig", "pigs"), ("puppy", "puppies"), ("kitten", "kittens"),
]
OBJECTS = [
    ("box", "boxes"), ("bag", "bags"), ("book", "books"), ("letter", "letters"),
    ("basket", "baskets"), ("chair", "chairs"), ("ball", "balls"), ("key", "keys"), ("cup", "cups"),
    ("bottle", "bottles"), ("coat", "coats"), ("hat", "hats"), ("picture", "pictures"),
    ("bucket", "buckets"), ("lamp", "lamps"), ("blanket", "blankets"), ("map", "maps"),
    ("ring", "rings"), ("knife", "knives"), ("table", "tables"), ("umbrella", "umbrellas"),
    ("bicycle", "bicycles"), ("clock", "clocks"), ("newspaper", "newspapers"), ("window", "windows"),
    ("door", "doors"), ("toy", "toys"), ("shirt", "shirts"), ("boat", "boats"), ("car", "cars"),
]
FOODS = [
    ("apple", "apples"), ("cake", "cakes"), ("egg", "eggs"), ("orange", "oranges"),
    ("potato", "potatoes"), ("fish", "fish"), ("sandwich", "sandwiches"), ("cookie", "cookies"),
    ("pie", "pies"), ("tomato", "tomatoes"), ("banana", "bananas"), ("carrot", "carrots"),
    ("onion", "onions"), ("lemon", "lemons"), ("loaf of bread", "loaves of bread"),
]
PLACES = [
    "market", "station", "school", "garden", "river", "park", "village", "city", "church",
    "hospital", "library", "kitchen", "farm", "beach", "shop", "office", "bridge", "forest", "hill",
    "lake", "field", "house", "harbor", "castle", "bakery", "museum", "hotel", "restaurant", "island",
]
# Prepositions only fit some places ("in the kitchen", not "in the bridge"); other prepositions
# (to, near, behind, past ...) fit every place.
PLACES_IN = ["garden", "park", "village", "city", "church", "hospital", "library", "kitchen", "shop",
             "office", "forest", "field", "house", "castle", "bakery", "museum", "hotel", "restaurant",
             "school"]
PLACES_AT = ["market", "station", "school", "church", "hospital", "library", "farm", "beach", "office",
             "harbor", "bakery", "museum", "hotel", "restaurant", "lake", "shop"]
PLACES_INTO = ["garden", "park", "village", "city", "church", "library", "kitchen", "shop", "office",
               "forest", "field", "house", "castle", "bakery", "museum", "hotel", "restaurant"]
PLACES_ACROSS = ["bridge", "river", "field", "park", "lake", "beach", "city", "village", "market"]
NAMES = [
    "john", "mary", "peter", "susan", "david", "emma", "james", "anna", "robert", "lucy", "thomas",
    "sarah", "michael", "helen", "george", "alice", "daniel", "kate", "paul", "linda", "mark", "jane",
]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty"]

ADJ_PEOPLE = ["old", "young", "tall", "tired", "happy", "kind", "busy", "angry", "quiet", "hungry",
              "clever", "friendly", "little", "brave", "polite"]
ADJ_ANIMALS = ["old", "young", "little", "big", "black", "white", "brown", "hungry", "tired", "lazy",
               "small", "friendly"]
ADJ_OBJECTS = ["old", "new", "big", "small", "heavy", "red", "blue", "green", "large", "brown",
               "white", "black", "clean", "broken", "wooden", "empty", "yellow", "little", "strange"]
ADJ_FOODS = ["fresh", "warm", "large", "small", "cold", "good"]
ADJ_PLACES = ["old", "new", "small", "busy", "quiet", "big", "empty", "little", "beautiful"]
# Predicate adjectives for "X was very ADJ" (people and animals).
ADJ_PREDICATE = ["tired", "happy", "hungry", "angry", "busy", "quiet", "cold", "sleepy", "sad",
                 "proud", "worried", "surprised", "excited", "late", "ready"]

# Transitive verbs over objects: (past, base).
VERBS_OBJECT = [
    ("carried", "carry"), ("bought", "buy"), ("found", "find"), ("lost", "lose"), ("sold", "sell"),
    ("dropped", "drop"), ("opened", "open"), ("cleaned", "clean"), ("painted", "paint"),
    ("fixed", "fix"), ("moved", "move"), ("brought", "bring"), ("washed", "wash"), ("hid", "hide"),
    ("borrowed", "borrow"), ("kept", "keep"), ("took", "take"), ("needed", "need"), ("wanted", "want"),
    ("picked up", "pick up"), ("left", "leave"),
]
VERBS_FOOD = [
    ("ate", "eat"), ("cooked", "cook"), ("bought", "buy"), ("sold", "sell"), ("brought", "bring"),
    ("cut", "cut"), ("washed", "wash"), ("shared", "share"), ("wanted", "want"), ("dropped", "drop"),
]
VERBS_PERSON = [  # transitive verbs whose object is a person or an animal
    ("saw", "see"), ("watched", "watch"), ("followed", "follow"), ("met", "meet"), ("called", "call"),
    ("helped", "help"), ("visited", "visit"), ("remembered", "remember"), ("found", "find"),
    ("thanked", "thank"), ("waited for", "wait for"), ("looked for", "look for"),
]
VERBS_MOTION = [  # intransitive verbs that take a destination ("to the market")
    ("walked", "walk"), ("ran", "run"), ("went", "go"), ("hurried", "hurry"), ("came back", "come back"),
    ("drove", "drive"), ("rode", "ride"), ("returned", "return"),
]
VERBS_STATIC = [  # intransitive verbs that take a location ("in the garden")
    ("waited", "wait"), ("slept", "sleep"), ("worked", "work"), ("stayed", "stay"), ("sat", "sit"),
    ("played", "play"), ("sang", "sing"), ("read", "read"), ("rested", "rest"), ("ate lunch", "eat lunch"),
]
ANIMAL_MOTION = [("ran", "run"), ("walked", "walk"), ("went", "go"), ("jumped", "jump"),
                 ("hurried", "hurry"), ("came back", "come back")]
ANIMAL_STATIC = [("slept", "sleep"), ("waited", "wait"), ("played", "play"), ("sat", "sit"),
                 ("stayed", "stay"), ("rested", "rest")]

PREP_DESTINATION = ["to", "to", "into", "across", "toward", "past"]
PREP_LOCATION = ["in", "in", "at", "at", "near", "behind", "outside", "beside"]
# Verbs that move their object somewhere take a destination ("carried the boxes to the market");
# the other object verbs take a location ("found the key near the station").
VERBS_WITH_DESTINATION = {"carried", "brought", "moved", "took", "carry", "bring", "move", "take"}
PREP_OBJECT_DEST = ["to", "to", "into", "across", "from"]
# Animals only get verbs that make sense for them ("the dog followed the boy", not "thanked").
ANIMAL_VERBS_PERSON = [("saw", "see"), ("watched", "watch"), ("followed", "follow"), ("found", "find"),
                       ("waited for", "wait for"), ("looked for", "look for")]
# Foods that are not cooked; "cooked" falls back to "ate" for them.
UNCOOKED_FOODS = {"apple", "apples", "banana", "bananas", "orange", "oranges", "lemon", "lemons",
                  "cookie", "cookies", "cake", "cakes", "pie", "pies", "sandwich", "sandwiches"}

TIMES_PAST = ["yesterday", "this morning", "last night", "last week", "on monday", "on tuesday",
              "on friday", "on saturday", "on sunday", "in the evening", "after lunch", "before dinner",
              "every day", "at noon", "in the spring", "in the summer", "in the winter", "early today",
              "two days ago", "last year", "an hour ago"]
TIMES_FUTURE = ["tomorrow", "next week", "tonight", "on monday", "on friday", "next year",
                "after lunch", "before dinner", "in the morning", "this afternoon", "later today", "soon"]
ADVERBS = ["slowly", "quickly", "quietly", "carefully", "happily", "again", "alone", "early"]
POSSESSIVES = ["my", "his", "her", "our", "their", "your"]


def _flatten_words(phrases: Sequence[str]) -> set[str]:
    return {w for p in phrases for w in p.split()}


def _nouns(pairs: Sequence[tuple[str, str]]) -> list[str]:
    return [w for pair in pairs for w in pair]


# Every word the grammar can emit (function words listed explicitly). Fixed across splits.
VOCABULARY: frozenset[str] = frozenset(
    _flatten_words(
        _nouns(PEOPLE) + _nouns(ANIMALS) + _nouns(OBJECTS) + _nouns(FOODS) + PLACES + NAMES + NUMBERS
        + ADJ_PEOPLE + ADJ_ANIMALS + ADJ_OBJECTS + ADJ_FOODS + ADJ_PLACES + ADJ_PREDICATE
        # Past forms of all verbs; base forms only of object/food verbs (used after modals,
        # which skip "want"/"need").
        + [past for past, _ in VERBS_OBJECT + VERBS_FOOD + VERBS_PERSON + VERBS_MOTION + VERBS_STATIC
           + ANIMAL_MOTION + ANIMAL_STATIC]
        + [base for _, base in VERBS_OBJECT + VERBS_FOOD if base not in ("want", "need")]
        + PREP_DESTINATION + PREP_LOCATION + PREP_OBJECT_DEST + TIMES_PAST + TIMES_FUTURE + ADVERBS
        + POSSESSIVES
        + ["the", "a", "an", "some", "this", "that", "these", "those", "very", "there", "was", "were",
           "will", "can", "could", "didn't", "couldn't", "wanted", "had", "to", "home", "he",
           "she", "they", "we", "i", "gave"]
        + [n + "'s" for n in NAMES]
    )
)


class _Phrase:
    """A noun phrase and whether it is plural (needed for was/were agreement)."""

    def __init__(self, text: str, plural: bool) -> None:
        self.text = text
        self.plural = plural


def _article(next_word: str) -> str:
    # "an" before a vowel sound; the word list avoids words where spelling and sound disagree.
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(
    rng: random.Random,
    nouns: Sequence[tuple[str, str]],
    adjectives: Sequence[str],
    *,
    allow_possessive: bool = True,
    allow_number: bool = True,
) -> _Phrase:
    singular, plural_form = rng.choice(nouns)
    adjective = rng.choice(adjectives) if rng.random() < 0.5 else None
    plural = rng.random() < 0.35
    noun = plural_form if plural else singular
    core = f"{adjective} {noun}" if adjective else noun
    if plural:
        options = ["the", "some", "these", "those"]
        if allow_number:
            options += ["NUM", "NUM"]
        if allow_possessive:
            options += ["POSS", "NAME"]
        det = rng.choice(options)
    else:
        options = ["the", "the", "a", "this", "that"]
        if allow_possessive:
            options += ["POSS", "NAME"]
        det = rng.choice(options)
    if det in ("POSS", "NAME") and nouns is PEOPLE and singular not in RELATIONS:
        det = "the"  # "my stranger" / "john's soldier" read oddly
    if det == "NUM":
        det = rng.choice(NUMBERS)
    elif det == "POSS":
        det = rng.choice(POSSESSIVES)
    elif det == "NAME":
        det = rng.choice(NAMES) + "'s"
    elif det == "a":
        det = _article(core)
    return _Phrase(f"{det} {core}", plural)


def _place(rng: random.Random, prep: str | None = None) -> str:
    pools = {"in": PLACES_IN, "at": PLACES_AT, "into": PLACES_INTO, "across": PLACES_ACROSS}
    pool = pools.get(prep or "", PLACES)
    place = rng.choice(pool)
    if rng.random() < 0.3:
        place = f"{rng.choice(ADJ_PLACES)} {place}"
    return f"the {place}"


def _subject(rng: random.Random) -> tuple[_Phrase, bool]:
    """A subject phrase and whether it is a person (True) or an animal (False)."""
    r = rng.random()
    if r < 0.25:
        return _Phrase(rng.choice(NAMES), False), True
    if r < 0.35:
        pronoun = rng.choice(["he", "she", "they", "we", "i"])
        return _Phrase(pronoun, pronoun in ("they", "we")), True
    if r < 0.75:
        return _noun_phrase(rng, PEOPLE, ADJ_PEOPLE, allow_number=True), True
    return _noun_phrase(rng, ANIMALS, ADJ_ANIMALS), False


def _object(rng: random.Random, foods: bool) -> str:
    if foods:
        return _noun_phrase(rng, FOODS, ADJ_FOODS).text
    return _noun_phrase(rng, OBJECTS, ADJ_OBJECTS).text


def _pp(rng: random.Random, preps: Sequence[str]) -> list[str]:
    """A prepositional phrase whose place fits the preposition."""
    prep = rng.choice(preps)
    return [prep, _place(rng, prep)]


def _object_pp(rng: random.Random, verb: str) -> list[str]:
    return _pp(rng, PREP_OBJECT_DEST if verb in VERBS_WITH_DESTINATION else PREP_LOCATION)


def _fix_cooked(verb: str, obj: str) -> str:
    return "ate" if verb == "cooked" and obj.split()[-1] in UNCOOKED_FOODS else verb


def _maybe(rng: random.Random, p: float, text: str) -> list[str]:
    return [text] if rng.random() < p else []


def _time_or_adverb(rng: random.Random, p: float = 0.5) -> list[str]:
    if rng.random() >= p:
        return []
    return [rng.choice(ADVERBS)] if rng.random() < 0.3 else [rng.choice(TIMES_PAST)]


def _be(phrase: _Phrase) -> str:
    if phrase.text == "i":
        return "was"
    return "were" if phrase.plural or phrase.text == "you" else "was"


def make_sentence(rng: random.Random) -> str:
    """One grammatical sentence (not length-checked; see `generate_sentences`)."""
    template = rng.random()
    subject, is_person = _subject(rng)
    s = subject.text
    if template < 0.30 and is_person:
        # the old farmer carried seven heavy boxes to the market this morning
        foods = rng.random() < 0.35
        past, _ = rng.choice(VERBS_FOOD if foods else VERBS_OBJECT)
        obj = _object(rng, foods)
        past = _fix_cooked(past, obj)
        parts = [s, past, obj]
        if rng.random() < 0.45:
            parts += _object_pp(rng, past)
        parts += _time_or_adverb(rng, 0.6)
    elif template < 0.45:
        # mary's dog followed the young nurse across the park
        past, _ = rng.choice(VERBS_PERSON if is_person else ANIMAL_VERBS_PERSON)
        obj = _noun_phrase(rng, PEOPLE, ADJ_PEOPLE) if rng.random() < 0.7 else _noun_phrase(
            rng, ANIMALS, ADJ_ANIMALS
        )
        parts = [s, past, obj.text]
        if rng.random() < 0.4:
            parts += _pp(rng, PREP_LOCATION)
        parts += _time_or_adverb(rng, 0.6)
    elif template < 0.62:
        # the tired children walked slowly to the station after lunch
        past, _ = rng.choice(VERBS_MOTION if is_person else ANIMAL_MOTION)
        parts = [s, past] + _maybe(rng, 0.3, rng.choice(ADVERBS[:5]))
        parts += ["home"] if rng.random() < 0.15 else _pp(rng, PREP_DESTINATION)
        parts += _time_or_adverb(rng, 0.5) if len(parts) < 5 else _maybe(rng, 0.4, rng.choice(TIMES_PAST))
    elif template < 0.74:
        # my brother worked in the bakery on saturday
        past, _ = rng.choice(VERBS_STATIC if is_person else ANIMAL_STATIC)
        parts = [s, past, *_pp(rng, PREP_LOCATION)] + _time_or_adverb(rng, 0.6)
    elif template < 0.82:
        # the little dog was very hungry after the long walk
        parts = [s, _be(subject)] + _maybe(rng, 0.4, "very") + [rng.choice(ADJ_PREDICATE)]
        if rng.random() < 0.5:
            parts += _pp(rng, ["at", "in", "near"])
        parts += _maybe(rng, 0.5, rng.choice(TIMES_PAST))
    elif template < 0.90 and is_person:
        # john will bring the red umbrella to the office tomorrow / she didn't find her keys
        modal = rng.choice(["will", "will", "can", "could", "didn't", "couldn't", "wanted to", "had to"])
        foods = rng.random() < 0.3
        past, base = rng.choice(
            [v for v in (VERBS_FOOD if foods else VERBS_OBJECT) if v[1] not in ("want", "need")]
        )
        obj = _object(rng, foods)
        if _fix_cooked(past, obj) != past:
            base = "eat"
        parts = [s, modal, base, obj]
        if rng.random() < 0.3:
            parts += _object_pp(rng, base)
        times = TIMES_FUTURE if modal == "will" else TIMES_PAST
        parts += _maybe(rng, 0.5, rng.choice(times))
    elif template < 0.95 and is_person:
        # the kind teacher gave three apples to the hungry children
        foods = rng.random() < 0.5
        recipient = _noun_phrase(rng, PEOPLE, ADJ_PEOPLE) if rng.random() < 0.7 else _Phrase(
            rng.choice(NAMES), False
        )
        parts = [s, "gave", _object(rng, foods), "to", recipient.text] + _maybe(
            rng, 0.4, rng.choice(TIMES_PAST)
        )
    else:
        # there were five white ducks near the old bridge this morning
        thing = _noun_phrase(
            rng, rng.choice([ANIMALS, OBJECTS, PEOPLE]), ADJ_OBJECTS[:4] + ADJ_ANIMALS[:6],
            allow_possessive=False,
        )
        det, core = thing.text.split(" ", 1)
        if thing.plural:
            det = rng.choice(NUMBERS + ["some", "two", "three"])
            det_text = f"{det} {core}"
        else:
            det_text = f"{_article(core)} {core}"
        parts = ["there", "were" if thing.plural else "was", det_text, *_pp(rng, PREP_LOCATION)]
        parts += _maybe(rng, 0.5, rng.choice(TIMES_PAST))
    return " ".join(parts)


def sentence_split(text: str) -> str:
    """The split ("train", "dev" or "test") a sentence belongs to, from a hash of its text.

    A pure function of the text: any sentence lands in exactly one split, so splits are disjoint
    by construction, independent of how many sentences each split asks for.
    """
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError("unreachable: buckets cover 0..99")


def generate_sentences(n: int, *, seed: int, split: str) -> list[str]:
    """The first `n` distinct sentences of `split` for `seed` (deterministic, prefix-stable).

    Prefix-stable: `generate_sentences(k, ...)` equals the first k of `generate_sentences(n, ...)`
    for k <= n, so taking a `limit` never changes which sentence an utterance gets.
    """
    if split not in SPLITS:
        raise ValueError(f"generate_sentences(split={split!r}): unknown split; valid splits: {SPLITS}")
    if n < 0:
        raise ValueError(f"generate_sentences(n={n}): n must be >= 0")
    rng = random.Random(f"sq_plugin.sentences:v{SENTENCES_VERSION}:{seed}:{split}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise RuntimeError(f"could not find {n} distinct {split} sentences; the grammar is too small")
        text = make_sentence(rng)
        words = text.split()
        if not MIN_WORDS <= len(words) <= MAX_WORDS or text in seen or sentence_split(text) != split:
            continue
        seen.add(text)
        out.append(text)
    return out
