"""Regenerate ``sentiment.jsonl``: a small, deterministic binary sentiment set (1 = positive).

Sentences come from templates over subjects and opinion words; a third of them are negated
("was not great", "was far from awful") so that the label is not a bag-of-words lookup.
Each line: ``{"text": ..., "label": 0 | 1, "split": "train" | "test"}``. Run from anywhere:
``python examples/data/make_sentiment.py`` (same output every time).
"""

from __future__ import annotations

import json
import os
import random

SEED = 1234
N_SENTENCES = 480
TEST_FRACTION = 0.25

SUBJECTS = [
    "movie",
    "film",
    "book",
    "restaurant",
    "meal",
    "hotel room",
    "concert",
    "phone",
    "laptop",
    "service",
    "coffee",
    "game",
    "show",
    "album",
    "trip",
    "class",
    "app",
    "camera",
    "pizza",
    "museum",
    "flight",
    "haircut",
    "novel",
    "play",
    "headphones",
]
POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "charming",
    "superb",
    "enjoyable",
    "brilliant",
    "lovely",
    "impressive",
    "pleasant",
    "amazing",
    "satisfying",
]
NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "dreadful",
    "mediocre",
    "horrible",
    "tedious",
    "annoying",
    "poor",
    "painful",
    "bland",
    "frustrating",
    "unpleasant",
]
PLAIN = [
    "The {s} was {a}.",
    "Honestly, the {s} is {a}.",
    "I thought the {s} was {a}.",
    "What a {a} {s}!",
    "Our {s} turned out {a}.",
    "My friends agreed the {s} felt {a}.",
    "Overall a {a} {s}, and I would say so again.",
]
NEGATED = [
    "The {s} was not {a}.",
    "I would not call the {s} {a}.",
    "The {s} was far from {a}.",
    "Nobody could say the {s} was {a}.",
]


def generate(seed: int = SEED, n: int = N_SENTENCES) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        positive_word = rng.random() < 0.5
        negated = rng.random() < 1 / 3
        template = rng.choice(NEGATED if negated else PLAIN)
        adjective = rng.choice(POSITIVE if positive_word else NEGATIVE)
        text = template.format(s=rng.choice(SUBJECTS), a=adjective)
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": int(positive_word != negated)})
    n_test = int(n * TEST_FRACTION)
    for i, row in enumerate(rows):
        row["split"] = "test" if i < n_test else "train"
    return rows


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentiment.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in generate())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
