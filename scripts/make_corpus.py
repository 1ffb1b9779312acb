#!/usr/bin/env python3
"""Writes data/corpus.txt: the small English corpus the GPT demo and tests train on.

The text is generated, deterministically (a fixed seed and Python's own Mersenne Twister), from a
small grammar of short stories about a town, so the project ships its own data with no licence
question. It is regular enough that a byte-level model of a few million parameters learns words,
spelling and punctuation within a minute, and varied enough that it cannot just memorise it.

Usage: scripts/make_corpus.py [OUT] [KILOBYTES]   (defaults: data/corpus.txt, 200)
"""
import random
import sys
from pathlib import Path

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lena",
         "Marco", "Nora", "Oscar", "Paula", "Sam", "Tess", "Victor", "Wendy", "Yusuf"]
PLACES = ["the market", "the old bridge", "the library", "the harbour", "the bakery", "the hill",
          "the school", "the river bank", "the station", "the garden", "the town square", "the mill"]
THINGS = ["a red kite", "an old map", "a basket of apples", "a small boat", "a lost key", "a letter",
          "a wooden box", "a loaf of bread", "a silver coin", "a blue umbrella", "a book of songs",
          "a broken clock", "a jar of honey", "a paper lantern"]
ANIMALS = ["a grey cat", "a small dog", "a white goose", "an old horse", "a clever fox", "a brown owl"]
ADJ = ["quiet", "busy", "cold", "bright", "windy", "warm", "grey", "golden", "long", "strange"]
TIMES = ["In the morning", "At noon", "In the evening", "Late at night", "On Sunday", "Before dawn",
         "After the rain", "One autumn day", "Early in spring", "At the end of summer"]
VERBS_GO = ["walked to", "ran to", "went down to", "climbed up to", "hurried to", "wandered to"]
VERBS_FIND = ["found", "saw", "noticed", "picked up", "carried", "looked for", "mended", "painted"]
FEEL = ["happy", "tired", "curious", "worried", "surprised", "calm", "proud", "hungry"]
SAY = ["said", "asked", "whispered", "shouted", "laughed", "replied"]
QUOTES = ["Where does this come from?", "We should take it home.", "Look at the sky!",
          "I have never seen anything like it.", "Let us ask the baker.", "It is getting late.",
          "Can you help me carry it?", "The river is high today.", "Tomorrow we will try again.",
          "Nobody will believe us."]
ENDINGS = ["and everyone went home for supper.", "and the town was quiet again.",
           "and they promised to come back the next day.", "and the story was told for many years.",
           "and nobody ever found out why.", "and the lamps were lit one by one."]


def sentence(r):
    a, b = r.sample(NAMES, 2)
    kind = r.randrange(7)
    if kind == 0:
        return f"{r.choice(TIMES)}, {a} {r.choice(VERBS_GO)} {r.choice(PLACES)}."
    if kind == 1:
        return f"There {a} {r.choice(VERBS_FIND)} {r.choice(THINGS)} near {r.choice(PLACES)}."
    if kind == 2:
        return f"\"{r.choice(QUOTES)}\" {r.choice(SAY)} {a}."
    if kind == 3:
        return f"The day was {r.choice(ADJ)} and {a} felt {r.choice(FEEL)}."
    if kind == 4:
        return f"{a} and {b} followed {r.choice(ANIMALS)} to {r.choice(PLACES)}."
    if kind == 5:
        return f"{b} {r.choice(SAY)}, \"{r.choice(QUOTES)}\""
    return f"When {a} met {b} at {r.choice(PLACES)}, they talked about {r.choice(THINGS)}."


def story(r):
    lines = [sentence(r) for _ in range(r.randint(4, 9))]
    a = r.choice(NAMES)
    lines.append(f"In the end {a} smiled, {r.choice(ENDINGS)}")
    return " ".join(lines)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
    kib = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    r = random.Random(20240520)
    parts, size = [], 0
    while size < kib * 1024:
        s = story(r) + "\n\n"
        parts.append(s)
        size += len(s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts), encoding="ascii")
    print(f"wrote {out} ({size} bytes)")


if __name__ == "__main__":
    main()
