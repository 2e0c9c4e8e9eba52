"""Regenerate ``ner.jsonl``: a small, deterministic named-entity set with BIO tags.

Sentences come from templates with slots for people (PER), places (LOC) and organisations
(ORG); many names span several words ("New York", "Maria da Silva"), and some words are
names in one slot and ordinary words elsewhere ("Jordan" the person, "Jordan" the country;
"Apple" the company, "an apple"), so the tags are not a word lookup, and a fifth of the names
occur only in the test sentences. Each line:
``{"tokens": [...], "tags": ["B-PER", "I-PER", "O", ...], "split": "train" | "test"}``.
Run from anywhere: ``python examples/data/make_ner.py`` (same output every time).
"""

from __future__ import annotations

import json
import os
import random

SEED = 2024
N_SENTENCES = 600
TEST_FRACTION = 0.25
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

PEOPLE = [
    "Alice", "Bob Smith", "Maria da Silva", "Chen Wei", "Jordan", "Priya Patel", "Tom",
    "Ahmed Hassan", "Sofia", "Lucas Martin", "Olga Ivanova", "Kenji Sato", "Grace Hopper",
    "Jean-Luc", "Fatima", "Diego Ramirez", "Emma Brown", "Noah", "Hannah Schmidt", "Paris Hilton",
]
PLACES = [
    "Paris", "New York", "Berlin", "Tokyo", "Jordan", "Cape Town", "Lima", "Toronto", "Oslo",
    "Rio de Janeiro", "Mumbai", "Cairo", "San Francisco", "Lagos", "Madrid", "Seoul",
    "Buenos Aires", "Helsinki", "Hong Kong", "Nairobi",
]
ORGS = [
    "Apple", "Acme Corp", "the United Nations", "Siemens", "Red Cross", "Toyota",
    "General Electric", "Oxfam", "the World Bank", "Nokia", "Banco Santander", "Unilever",
    "Greenpeace", "Tata Steel", "the Louvre", "Samsung", "Airbus", "the BBC", "Interpol", "FIFA",
]
# "the" opens some organisation names but is not part of the entity
TEMPLATES = [
    "{PER} flew to {LOC} last week .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened an office in {LOC} .",
    "Yesterday {PER} met {PER} at {ORG} .",
    "The team from {LOC} signed with {ORG} .",
    "{PER} was born in {LOC} and moved to {LOC} .",
    "According to {ORG} , prices in {LOC} rose again .",
    "{PER} said {ORG} will hire more people .",
    "She bought an apple and a bus ticket to {LOC} .",
    "We visited {LOC} with {PER} in the spring .",
    "{ORG} and {ORG} announced a joint project .",
    "A report by {ORG} praised {PER} .",
    "Nobody in {LOC} had heard of {PER} before .",
    "The weather was cold , so {PER} stayed home .",
]


def _entity_tokens(name: str, kind: str) -> tuple[list[str], list[str]]:
    words = name.split()
    if words[0] == "the":  # "the United Nations": the article stays O
        return words, ["O", f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 2)
    return words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def pools(split: str) -> dict[str, list[str]]:
    """Names by type; every fifth name appears only in test sentences, so the test F1 measures
    recognising unseen names from context, not recalling the training names."""
    test = split == "test"
    return {kind: [name for i, name in enumerate(names) if (i % 5 == 4) == test]
            for kind, names in (("PER", PEOPLE), ("LOC", PLACES), ("ORG", ORGS))}


def sentence(rng: random.Random, pools: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    tokens: list[str] = []
    tags: list[str] = []
    for piece in rng.choice(TEMPLATES).split():
        kind = piece[1:-1] if piece.startswith("{") else None
        if kind in pools:
            words, word_tags = _entity_tokens(rng.choice(pools[kind]), kind)
        else:
            words, word_tags = [piece], ["O"]
        tokens += words
        tags += word_tags
    tokens[0] = tokens[0][0].upper() + tokens[0][1:]
    return tokens, tags


def generate(seed: int = SEED, n: int = N_SENTENCES) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    n_test = int(n * TEST_FRACTION)
    while len(rows) < n:
        split = "test" if len(rows) < n_test else "train"
        tokens, tags = sentence(rng, pools(split))
        key = " ".join(tokens)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"tokens": tokens, "tags": tags, "split": split})
    return rows


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ner.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in generate())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
