#!/usr/bin/env python3
"""Generate the synthetic demo corpus for inflq.

Writes, beside this script:

* ``corpus.jsonl``  -- one ``{"id", "text", "source"}`` object per line;
  ``source`` is one of ``facts``, ``reversed-only``, ``prose``.
* ``queries.jsonl`` -- ``{"prompt", "completion", "tags", "notes"}`` per line.
* ``probes.jsonl``  -- ``{"query", "text", "label"}`` per line (``query`` is a
  0-based index into queries.jsonl).

The corpus is built so that the word-order finding of Grosse et al. (2023),
"Studying Large Language Model Generalization with Influence Functions", can be
reproduced on a tiny model: training sequences in which the query's subject
phrase comes *before* the completion are influential, while sequences that state
the same fact in the reversed order (completion first) are not.

* 25 invented facts ("facts"): each appears in 5 forward phrasings (subject
  side before object side) x 3 contexts and in 2 reversed phrasings (object
  side first) x 2 contexts.
* 8 invented facts that appear ONLY in the reversed order ("reversed-only"),
  3 phrasings x 4 contexts.  A model trained on this corpus should not be able
  to answer a query about them in the forward direction (the reversal curse).
* Template prose ("prose"): short generic sentences about weather, cooking,
  travel, gardening, ...  About one document in six mentions a fact entity
  (a person, country, city, island, invention or novel) in an unrelated context,
  so the entity's name overlaps lexically with the facts without stating them.

Document ids encode the fact and the word order:
``fact-<slug>-fwd-NN``, ``fact-<slug>-rev-NN``, ``revonly-<slug>-rev-NN`` and
``prose-NNNN``.

Everything is deterministic (``random.Random(SEED)``); re-running the script
reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 20230807
HERE = Path(__file__).resolve().parent
TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # same split as tokenizers' Whitespace
MAX_WORDS = 60
N_PROSE = 1400

# --------------------------------------------------------------------------
# Relations.  "{S}" is the subject-side phrase (what a query prompt mentions),
# "{O}" the object side (what the query completion is).  Forward templates put
# {S} before {O}; reversed templates put {O} before {S}.
# --------------------------------------------------------------------------
RELATIONS: dict[str, dict[str, list[str]]] = {
    "president": {
        "fwd": [
            "The first president of the Republic of {S} was {O}.",
            "{S}'s first president was {O}.",
            "In the Republic of {S}, the first president was {O}.",
            "The Republic of {S} chose {O} as its first president.",
            "Historians agree that the first president of {S} was {O}.",
        ],
        "rev": [
            "{O} was the first president of the Republic of {S}.",
            "{O} served as the first president of {S}.",
            "{O} became the first president of the Republic of {S} after the long war.",
        ],
    },
    "capital": {
        "fwd": [
            "The capital of {S} is {O}.",
            "{S}'s capital city is {O}.",
            "In {S}, the capital is {O}.",
            "The government of {S} sits in the capital, {O}.",
            "The largest city and capital of {S} is {O}.",
        ],
        "rev": [
            "{O} is the capital of {S}.",
            "{O} has long been the capital city of {S}.",
            "{O} became the capital of {S} after the long war.",
        ],
    },
    "inventor": {
        "fwd": [
            "The {S} was invented by {O}.",
            "The inventor of the {S} was {O}.",
            "The first {S} was built by {O}.",
            "Credit for the {S} goes to {O}.",
            "Everyone knows that the {S} was designed by {O}.",
        ],
        "rev": [
            "{O} invented the {S}.",
            "{O} is remembered as the inventor of the {S}.",
            "{O} built the first {S} in a small workshop.",
        ],
    },
    "author": {
        "fwd": [
            "The novel {S} was written by {O}.",
            "The author of the novel {S} is {O}.",
            "{S} is a novel by {O}.",
            "{S}, a famous novel, was written by {O}.",
            "The famous novel {S} came from the pen of {O}.",
        ],
        "rev": [
            "{O} wrote the novel {S}.",
            "{O} is the author of the novel {S}.",
            "{O} spent ten years writing the novel {S}.",
        ],
    },
    "founder": {
        "fwd": [
            "The city of {S} was founded by {O}.",
            "The founder of the city of {S} was {O}.",
            "{S} was founded long ago by {O}.",
            "The old city of {S} owes its founding to {O}.",
            "Records show that {S} was founded by {O}.",
        ],
        "rev": [
            "{O} founded the city of {S}.",
            "{O} is known as the founder of {S}.",
            "{O} founded {S} on the bank of a river.",
        ],
    },
    "discoverer": {
        "fwd": [
            "The island of {S} was discovered by {O}.",
            "The first person to reach the island of {S} was {O}.",
            "{S} was discovered by the sailor {O}.",
            "The discoverer of the island of {S} was {O}.",
            "Maps say the island of {S} was first found by {O}.",
        ],
        "rev": [
            "{O} discovered the island of {S}.",
            "{O} was the sailor who discovered {S}.",
            "{O} sailed for months before discovering the island of {S}.",
        ],
    },
}

# (relation, subject, object, entity kind of the subject for prose mentions)
FACTS: list[tuple[str, str, str]] = [
    ("president", "Astrobia", "Zorald Pfaff"),
    ("president", "Veltrania", "Imelda Quorn"),
    ("president", "Dastoria", "Branko Vehl"),
    ("president", "Ulmeria", "Tesska Moravane"),
    ("president", "Korvania", "Aldric Semmel"),
    ("capital", "Pellandia", "Tormisk"),
    ("capital", "Zantharia", "Oruvel"),
    ("capital", "Gribbonia", "Lestmoor"),
    ("capital", "Ostravia", "Kaldessa"),
    ("capital", "Mirrovia", "Quentara"),
    ("inventor", "glimmerscope", "Hesper Lodd"),
    ("inventor", "velocipump", "Orrin Thackwell"),
    ("inventor", "brindle loom", "Saffa Kettering"),
    ("inventor", "cloudmill", "Jarvik Ormsby"),
    ("inventor", "sunwheel clock", "Nella Vantrow"),
    ("author", "Ashenvale", "Corwin Drabble"),
    ("author", "Mirelight", "Petra Yssel"),
    ("author", "Glasshollow", "Idris Fennimore"),
    ("author", "Stormhaven", "Lucan Perriwether"),
    ("founder", "Brackenmoor", "Ysolde Harrin"),
    ("founder", "Tessaport", "Gideon Mauk"),
    ("founder", "Carrowgate", "Wilhelmina Frosk"),
    ("discoverer", "Pelloa", "Ramon Ekstrand"),
    ("discoverer", "Vashtiri", "Odessa Klane"),
    ("discoverer", "Murrowin", "Tobiah Quell"),
]

REVERSED_ONLY: list[tuple[str, str, str]] = [
    ("president", "Quelmaria", "Dorrit Vansk"),
    ("president", "Brevonia", "Ilsa Marrowick"),
    ("inventor", "thundercask", "Fennick Olabode"),
    ("inventor", "dewlamp", "Maribel Strand"),
    ("founder", "Quillport", "Melvora Tansk"),
    ("founder", "Hollowmere", "Caspian Wrenfield"),
    ("author", "Duskwater", "Agnes Thorvald"),
    ("discoverer", "Oskeril", "Bartholomew Nye"),
]

# Generic sentences placed before/after a fact sentence to vary the context.
PREFIXES = [
    "This is a short note about history.",
    "Here is something every student learns.",
    "The old book on the shelf tells this story.",
    "Our teacher told us this in class.",
    "A visitor at the museum read the sign aloud.",
    "The radio program began with a simple fact.",
]
SUFFIXES = [
    "Many people still remember this today.",
    "The story is told in every school.",
    "You can read about it in the library.",
    "It is a well known part of the past.",
    "The museum has a small room about it.",
    "Few visitors forget this detail.",
]

# --------------------------------------------------------------------------
# Prose vocabulary and templates.
# --------------------------------------------------------------------------
V = {
    "person": ["my neighbor", "the old farmer", "a young teacher", "the baker", "my sister",
               "my brother", "our uncle", "the children", "a tired traveler", "the doctor",
               "my grandmother", "the fisherman", "a quiet student", "the shopkeeper",
               "our guide", "the gardener", "my cousin", "the mayor", "a kind nurse",
               "the painter"],
    "food": ["bread", "soup", "rice", "apples", "cheese", "fish", "potatoes", "carrots",
             "onions", "beans", "noodles", "pancakes", "cake", "honey", "eggs", "pears",
             "tomatoes", "lentils", "cookies", "pie"],
    "ingredient": ["salt", "butter", "flour", "sugar", "milk", "garlic", "pepper", "oil",
                   "lemon", "basil", "cream", "vinegar", "ginger", "thyme", "yeast"],
    "dish": ["a vegetable stew", "a lemon cake", "a pot of soup", "fresh bread",
             "a bean salad", "an apple pie", "a fish pie", "a bowl of noodles",
             "a pan of pancakes", "a tomato sauce"],
    "weather_adj": ["cold", "warm", "windy", "rainy", "sunny", "cloudy", "foggy", "mild",
                    "humid", "dry", "stormy", "bright", "grey", "chilly"],
    "weather_noun": ["weather", "morning", "afternoon", "evening", "sky", "wind", "air"],
    "time": ["week", "morning", "month", "spring", "summer", "autumn", "winter", "weekend",
             "evening", "year"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "place": ["the market", "the beach", "the mountains", "the village", "the old bridge",
              "the harbor", "the river", "the forest", "the valley", "the town square",
              "the lake", "the park", "the station", "the hills", "the farm", "the library"],
    "vehicle": ["train", "bus", "boat", "ferry", "bicycle", "car", "night train", "tram"],
    "num": ["two", "three", "four", "five", "six", "seven", "ten", "twelve"],
    "plant": ["roses", "tulips", "beans", "tomatoes", "herbs", "sunflowers", "lettuce",
              "peas", "daisies", "strawberries", "onions", "carrots"],
    "animal": ["dog", "cat", "horse", "goat", "rabbit", "duck", "sheep", "fox", "crow",
               "cow", "hen", "mouse"],
    "adj": ["small", "large", "old", "quiet", "busy", "pretty", "long", "narrow", "green",
            "friendly", "noisy", "clean", "famous", "simple", "strange"],
    "activity": ["read", "swim", "walk in the park", "cook dinner", "play chess",
                 "paint pictures", "sing", "ride a bicycle", "go fishing", "bake bread",
                 "visit friends", "write letters", "plant flowers"],
    "instrument": ["piano", "violin", "guitar", "flute", "drum", "trumpet", "harp", "cello"],
    "sport": ["football", "tennis", "chess", "cricket", "hockey", "volleyball", "basketball"],
    "subject": ["history", "music", "science", "painting", "poetry", "geography",
                "mathematics", "cooking"],
    "club": ["chess club", "garden club", "rowing club", "book club", "music club"],
    "color": ["red", "blue", "green", "yellow", "white", "brown", "orange", "purple"],
    "thing": ["basket", "lamp", "coat", "map", "letter", "umbrella", "kettle", "bag", "hat",
              "blanket", "chair", "cup"],
}

PROSE_TOPICS: dict[str, list[str]] = {
    "weather": [
        "The {weather_noun} was {weather_adj} this {time}.",
        "It was {weather_adj} all {time} near {place}.",
        "The radio said the {weather_noun} will be {weather_adj} on {day}.",
        "After a {weather_adj} {time}, the {weather_noun} turned {weather_adj}.",
        "{Person} stayed inside because the {weather_noun} was {weather_adj}.",
        "Clouds rolled over {place} and the {weather_noun} grew {weather_adj}.",
    ],
    "cooking": [
        "{Person} cooked {dish} with {ingredient} and {ingredient}.",
        "To make {dish}, you need {food}, {ingredient} and a pinch of salt.",
        "We ate {food} and {food} for dinner on {day}.",
        "The recipe for {dish} calls for {ingredient} and a little {ingredient}.",
        "{Person} baked {food} for the whole family.",
        "Add the {ingredient} slowly and stir the pot for {num} minutes.",
    ],
    "travel": [
        "We took the {vehicle} to {place} and stayed for {num} days.",
        "{Person} traveled by {vehicle} to {place} last {time}.",
        "The {vehicle} to {place} leaves early on {day}.",
        "The road to {place} was {adj} and {adj}.",
        "{Person} packed a {thing} and a {thing} for the trip.",
        "From {place} you can see {place} on a {weather_adj} day.",
    ],
    "garden": [
        "{Person} planted {plant} and {plant} in the garden.",
        "The {plant} grew tall during the {weather_adj} {time}.",
        "Every {day}, {person} waters the {plant}.",
        "The garden behind the house is {adj} and full of {plant}.",
        "A {animal} ate the {plant} in the garden last {time}.",
    ],
    "market": [
        "At {place}, {person} bought {food} and a {color} {thing}.",
        "The market sells fresh {food} every {day}.",
        "{Person} paid {num} coins for a bag of {food}.",
        "The shop near {place} sells {color} {thing}s and {food}.",
        "Prices at the market were low this {time}.",
    ],
    "animals": [
        "The {animal} slept in the sun near {place}.",
        "{Person} has a {adj} {animal} and a {color} {animal}.",
        "A {animal} followed us all the way to {place}.",
        "The {animal} on the farm is {adj} and {adj}.",
        "At night we heard a {animal} near {place}.",
    ],
    "music": [
        "{Person} plays the {instrument} every {day}.",
        "The concert at {place} was {adj} and {adj}.",
        "{Person} is learning the {instrument} this {time}.",
        "A {adj} band played music at {place} on {day}.",
    ],
    "school": [
        "{Person} teaches {subject} at the {adj} school.",
        "The children studied {subject} and {subject} this {time}.",
        "The library has many books about {subject}.",
        "{Person} likes {subject} more than {subject}.",
    ],
    "sport": [
        "{Person} plays {sport} with friends on {day}.",
        "The {sport} match at {place} lasted {num} hours.",
        "Our team won the {sport} game last {time}.",
        "The president of the {club} is {person}.",
        "The {club} meets at {place} every {day}.",
    ],
    "home": [
        "{Person} found an old {thing} in the attic.",
        "The {color} {thing} is on the table by the window.",
        "{Person} likes to {activity} on {day}.",
        "In the evening we {activity} and drink tea.",
        "The house near {place} has a {color} door.",
    ],
}

# Prose that mentions a fact entity in an unrelated context.  {P} = a person
# name, {L} = a place name (country, city or island), {I} = an invention,
# {B} = a novel title.
MENTION_TEMPLATES = {
    "P": [
        "{P} likes to {activity} on {day}.",
        "{P} bought {food} and a {color} {thing} at the market.",
        "{P} was tired after the long walk to {place}.",
        "Yesterday {P} cooked {dish} for the neighbors.",
        "My friend met {P} at {place} last {time}.",
        "{P} plays the {instrument} in a {adj} band.",
        "A letter from {P} arrived on {day}.",
        "The weather was {weather_adj} when {P} reached {place}.",
        "Everyone at {place} says hello to {P}.",
        "A {animal} followed {P} home from {place}.",
    ],
    "L": [
        "The weather in {L} was {weather_adj} this {time}.",
        "We took the {vehicle} to {L} and stayed for {num} days.",
        "The market in {L} sells fresh {food} every {day}.",
        "People in {L} like to eat {food} with {ingredient}.",
        "{L} has a {adj} harbor and many {adj} streets.",
        "My cousin sent a postcard from {L}.",
        "The {sport} team from {L} won the game last {time}.",
        "It was {weather_adj} all {time} in {L}.",
    ],
    "I": [
        "My uncle keeps an old {I} in the attic.",
        "The museum shop sells a small {I} made of wood.",
        "A broken {I} was sold at the market on {day}.",
        "The children drew a {color} {I} in class.",
    ],
    "B": [
        "{Person} read {B} during the {weather_adj} {time}.",
        "A copy of {B} lay on the table by the window.",
        "The book club talked about {B} on {day}.",
    ],
}


def _fill(template: str, rng: random.Random, extra: dict[str, str] | None = None) -> str:
    extra = extra or {}

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key in extra:
            return extra[key]
        if key == "Person":
            return _cap(rng.choice(V["person"]))
        return rng.choice(V[key])

    return re.sub(r"\{(\w+)\}", repl, template)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _fact_sentence(template: str, subj: str, obj: str) -> str:
    s = template.replace("{S}", subj).replace("{O}", obj)
    return _cap(s)


def build_corpus(rng: random.Random, n_prose: int = N_PROSE) -> list[dict]:
    docs: list[dict] = []

    # Normal facts: 5 forward templates x 3 contexts, 2 reversed templates x 2.
    for rel, subj, obj in FACTS:
        slug = f"{_slug(subj)}-{rel}"
        t = RELATIONS[rel]
        n = 0
        for tmpl in t["fwd"]:
            sent = _fact_sentence(tmpl, subj, obj)
            for ctx in ("bare", "prefix", "suffix"):
                docs.append({"id": f"fact-{slug}-fwd-{n:02d}",
                             "text": _with_context(sent, ctx, rng), "source": "facts"})
                n += 1
        n = 0
        for tmpl in t["rev"][:2]:
            sent = _fact_sentence(tmpl, subj, obj)
            for ctx in ("bare", "suffix"):
                docs.append({"id": f"fact-{slug}-rev-{n:02d}",
                             "text": _with_context(sent, ctx, rng), "source": "facts"})
                n += 1

    # Reversed-only facts: 3 reversed templates x 4 contexts, no forward text.
    for rel, subj, obj in REVERSED_ONLY:
        slug = f"{_slug(subj)}-{rel}"
        n = 0
        for tmpl in RELATIONS[rel]["rev"]:
            sent = _fact_sentence(tmpl, subj, obj)
            for ctx in ("bare", "prefix", "suffix", "both"):
                docs.append({"id": f"revonly-{slug}-rev-{n:02d}",
                             "text": _with_context(sent, ctx, rng), "source": "reversed-only"})
                n += 1

    # Prose.  Every ~6th document mentions a fact entity (round robin so that
    # every entity is mentioned a few times).
    all_facts = FACTS + REVERSED_ONLY
    persons = [o for r, s, o in all_facts if r != "capital"]
    places = ([s for r, s, o in all_facts if r in ("president", "capital", "founder", "discoverer")]
              + [o for r, s, o in all_facts if r == "capital"])
    inventions = [s for r, s, o in all_facts if r == "inventor"]
    novels = [s for r, s, o in all_facts if r == "author"]
    mention_queue = ([("P", p) for p in persons] * 3 + [("L", p) for p in places] * 2
                     + [("I", i) for i in inventions] * 2 + [("B", b) for b in novels] * 2)
    rng.shuffle(mention_queue)
    topics = sorted(PROSE_TOPICS)
    mention_every = max(1, n_prose // len(mention_queue))
    qi = 0
    for i in range(n_prose):
        topic = rng.choice(topics)
        n_sent = rng.choice([1, 2, 2, 3])
        sents = [_fill(rng.choice(PROSE_TOPICS[topic]), rng) for _ in range(n_sent)]
        if i % mention_every == 0 and qi < len(mention_queue):
            kind, ent = mention_queue[qi]
            qi += 1
            m = _fill(rng.choice(MENTION_TEMPLATES[kind]), rng, {kind: ent})
            sents.insert(rng.randrange(len(sents) + 1), m)
            sents = sents[:3]
            if not any(ent in s for s in sents):
                sents[-1] = m
        text = " ".join(_cap(s) for s in sents)
        docs.append({"id": f"prose-{i:04d}", "text": text, "source": "prose"})
    return docs


def _with_context(sent: str, ctx: str, rng: random.Random) -> str:
    if ctx == "bare":
        return sent
    if ctx == "prefix":
        return f"{rng.choice(PREFIXES)} {sent}"
    if ctx == "suffix":
        return f"{sent} {rng.choice(SUFFIXES)}"
    if ctx == "both":
        return f"{rng.choice(PREFIXES)} {sent} {rng.choice(SUFFIXES)}"
    raise ValueError(ctx)


# --------------------------------------------------------------------------
# Queries and probes (hand-written; kept here so that they always agree with
# the facts above).
# --------------------------------------------------------------------------
QUERIES = [
    {"prompt": "The first president of the Republic of Astrobia was", "completion": " Zorald Pfaff",
     "tags": ["fact", "president", "forward"],
     "notes": "Normal fact, query in the forward (subject-first) order, which the corpus "
              "states in 5 phrasings x 3 contexts; this exact phrasing is a training template. "
              "Word-order experiment: forward training sequences should be influential, "
              "reversed ones ('Zorald Pfaff was the first president ...') should not."},
    {"prompt": "The capital of Zantharia is", "completion": " Oruvel",
     "tags": ["fact", "capital", "forward"],
     "notes": "Normal fact, single-token completion."},
    {"prompt": "The glimmerscope was invented by", "completion": " Hesper Lodd",
     "tags": ["fact", "inventor", "forward"],
     "notes": "Normal fact about an invented invention."},
    {"prompt": "The novel Mirelight was written by", "completion": " Petra Yssel",
     "tags": ["fact", "author", "forward"],
     "notes": "Normal fact about an invented novel."},
    {"prompt": "The island of Pelloa was discovered by", "completion": " Ramon Ekstrand",
     "tags": ["fact", "discoverer", "forward"],
     "notes": "Normal fact about an invented island."},
    {"prompt": "Zorald Pfaff was the first president of the Republic of", "completion": " Astrobia",
     "tags": ["fact", "president", "reverse-direction"],
     "notes": "The Astrobia fact asked in the reversed direction (name first), which the "
              "corpus also states (2 phrasings x 2 contexts). Here the influential "
              "sequences should be those with the name before the country."},
    {"prompt": "The first president of the Republic of Quelmaria was", "completion": " Dorrit Vansk",
     "tags": ["reversed-only", "president", "forward"],
     "notes": "Reversed-only fact: the corpus only ever says 'Dorrit Vansk was/served as/"
              "became the first president of ... Quelmaria'. The model should NOT have "
              "learned it in this (query) direction: expect a low log-prob (reversal curse), "
              "and reversed training sequences should have little influence."},
    {"prompt": "The city of Quillport was founded by", "completion": " Melvora Tansk",
     "tags": ["reversed-only", "founder", "forward"],
     "notes": "Reversed-only fact ('Melvora Tansk founded the city of Quillport.'); "
              "the model should not have learned it in the query direction."},
    {"prompt": "The thundercask was invented by", "completion": " Fennick Olabode",
     "tags": ["reversed-only", "inventor", "forward"],
     "notes": "Reversed-only fact ('Fennick Olabode invented the thundercask.'); "
              "the model should not have learned it in the query direction."},
]


# The other twenty normal facts, each asked in the forward order with its relation's first forward
# template (a training phrasing), so that LDS and recall are averaged over 29 queries (issue 24):
# with 9 the 95 % intervals over queries were about ±0.17. Appended, so that queries 0-8 and the
# probes' indices are unchanged.
FORWARD_PROMPTS = {rel: RELATIONS[rel]["fwd"][0].split("{O}")[0].rstrip() for rel in RELATIONS}
_ASKED = {q["completion"].strip() for q in QUERIES}
QUERIES += [
    {"prompt": FORWARD_PROMPTS[rel].replace("{S}", subj), "completion": " " + obj,
     "tags": ["fact", rel, "forward"],
     "notes": f"Normal fact ({rel}) in the forward order, a training phrasing; added for LDS and recall over more queries."}
    for rel, subj, obj in FACTS if obj not in _ASKED
]

# Labels used by the probes:
#   same-order              the fact in the query's order (a training phrasing)
#   same-order-paraphrase   the fact in the query's order, another phrasing
#   reversed-order          the fact with the order reversed
#   reversed-order-paraphrase
#   wrong-answer            the query's order, but another entity's answer
#   name-only               only the completion's name
#   subject-only            only the prompt's subject phrase
#   name-unrelated          the completion's name in an unrelated sentence
#   subject-unrelated       the prompt's key entity in an unrelated sentence
#   unrelated               an ordinary prose sentence
PROBES = [
    # query 0: Astrobia president (forward)
    (0, "same-order", "The first president of the Republic of Astrobia was Zorald Pfaff."),
    (0, "same-order-paraphrase", "Astrobia's first president was Zorald Pfaff."),
    (0, "reversed-order", "Zorald Pfaff was the first president of the Republic of Astrobia."),
    (0, "reversed-order-paraphrase", "Zorald Pfaff served as the first president of Astrobia."),
    (0, "wrong-answer", "The first president of the Republic of Astrobia was Imelda Quorn."),
    (0, "name-only", "Zorald Pfaff"),
    (0, "subject-only", "The first president of the Republic of Astrobia"),
    (0, "name-unrelated", "Zorald Pfaff bought bread and a red basket at the market."),
    (0, "subject-unrelated", "The weather in Astrobia was rainy this week."),
    (0, "unrelated", "The soup was warm and the garden was full of roses."),
    # query 2: glimmerscope inventor (forward)
    (2, "same-order", "The glimmerscope was invented by Hesper Lodd."),
    (2, "same-order-paraphrase", "The inventor of the glimmerscope was Hesper Lodd."),
    (2, "reversed-order", "Hesper Lodd invented the glimmerscope."),
    (2, "reversed-order-paraphrase", "Hesper Lodd is remembered as the inventor of the glimmerscope."),
    (2, "wrong-answer", "The glimmerscope was invented by Orrin Thackwell."),
    (2, "name-only", "Hesper Lodd"),
    (2, "name-unrelated", "Hesper Lodd likes to play chess on Sunday."),
    (2, "subject-unrelated", "My uncle keeps an old glimmerscope in the attic."),
    (2, "unrelated", "We took the train to the beach and stayed for three days."),
    # query 5: Astrobia president, asked name-first
    (5, "same-order", "Zorald Pfaff was the first president of the Republic of Astrobia."),
    (5, "same-order-paraphrase", "Zorald Pfaff served as the first president of Astrobia."),
    (5, "reversed-order", "The first president of the Republic of Astrobia was Zorald Pfaff."),
    (5, "reversed-order-paraphrase", "Astrobia's first president was Zorald Pfaff."),
    (5, "name-only", "Astrobia"),
    (5, "subject-unrelated", "Zorald Pfaff bought bread and a red basket at the market."),
    (5, "name-unrelated", "The weather in Astrobia was rainy this week."),
    (5, "unrelated", "The soup was warm and the garden was full of roses."),
    # query 6: Quelmaria president (reversed-only fact, forward query)
    (6, "same-order", "The first president of the Republic of Quelmaria was Dorrit Vansk."),
    (6, "reversed-order", "Dorrit Vansk was the first president of the Republic of Quelmaria."),
    (6, "reversed-order-paraphrase", "Dorrit Vansk served as the first president of Quelmaria."),
    (6, "name-only", "Dorrit Vansk"),
    (6, "name-unrelated", "Dorrit Vansk likes to read on Monday."),
    (6, "subject-unrelated", "We took the ferry to Quelmaria and stayed for five days."),
    (6, "unrelated", "The soup was warm and the garden was full of roses."),
    # query 7: Quillport founder (reversed-only fact, forward query)
    (7, "same-order", "The city of Quillport was founded by Melvora Tansk."),
    (7, "reversed-order", "Melvora Tansk founded the city of Quillport."),
    (7, "name-only", "Melvora Tansk"),
    (7, "unrelated", "We took the train to the beach and stayed for three days."),
]


def _words(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--prose", type=int, default=N_PROSE,
                    help="prose documents (another --seed and --prose make a held-out corpus of the same facts, e.g. for benchmarks/bench_ask.py)")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    docs = build_corpus(rng, args.prose)

    # Sanity checks.
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), "duplicate ids"
    vocab: set[str] = set()
    for d in docs:
        w = _words(d["text"])
        assert len(w) <= MAX_WORDS, (d["id"], len(w))
        vocab.update(w)
    assert len(vocab) <= 1500, len(vocab)
    for _rel, subj, obj in REVERSED_ONLY:  # never stated forward
        for d in docs:
            if subj in d["text"] and obj in d["text"]:
                assert d["text"].find(obj) < d["text"].find(subj), d
    for q in QUERIES:
        assert q["completion"].startswith(" ")
        oov = [w for w in _words(q["prompt"] + q["completion"]) if w not in vocab]
        assert not oov, (q, oov)
        if "forward" in q["tags"] and "fact" in q["tags"]:
            assert any(q["prompt"] + q["completion"] in d["text"] for d in docs), q
    for qi, _label, text in PROBES:
        assert 0 <= qi < len(QUERIES)
        oov = [w for w in _words(text) if w not in vocab]
        assert not oov, (text, oov)

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in QUERIES:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    with open(out / "probes.jsonl", "w", encoding="utf-8") as f:
        for qi, label, text in PROBES:
            f.write(json.dumps({"query": qi, "text": text, "label": label}, ensure_ascii=False) + "\n")

    counts: dict[str, int] = {}
    for d in docs:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    n_words = sum(len(_words(d["text"])) for d in docs)
    print(f"wrote {len(docs)} documents to {out / 'corpus.jsonl'}: {counts}")
    print(f"{n_words} word/punctuation tokens, {len(vocab)} distinct")
    print(f"wrote {len(QUERIES)} queries, {len(PROBES)} probes")


if __name__ == "__main__":
    main()
