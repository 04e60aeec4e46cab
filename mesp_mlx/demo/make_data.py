"""Deterministic generator of the demo's two datasets (`python -m mesp_mlx.demo.make_data`).

Facts in six families (capitals, opposites, animal sounds, colours, one-digit
sums, number successors), at most FAMILY_FACTS each (165 in all), rendered by
templates:
  corpus/ (mlx-lm "text" format): documents of 4-8 random statements, each in
          one of its fact's four phrasings, half of them with an aside between
          key and value ("Capital of Peru (they say): Lima.") — the base model
          learns the facts from it and never sees a question.
  task/   ("prompt"/"completion"): the same facts asked as questions
          ("What is the capital of Peru?" -> "Lima"), split by fact: valid and
          test ask about facts the model saw only as statements in pretraining.
Why it generalises: a fact stated in several phrasings is stored so that other
contexts can look it up (Allen-Zhu & Li, "Physics of Language Models 3.1"), and
the asides put other words between key and value, as a question's "?" and
"Answer" do; fine-tuning on the train questions then mostly teaches the question
format, which carries over to the held-out facts. Everything comes from
random.Random(SEED); rerunning rewrites identical files.
"""

import json
import random
from pathlib import Path

SEED = 5
DATA_DIR = Path(__file__).parent / "data"
N_DOCS = {"train": 1500, "valid": 100, "test": 100}
TASK_SPLIT = (0.7, 0.15)        # train / valid fractions of each family (rest: test)
FAMILY_FACTS = 40               # per family, so the 100 sums do not dominate
HELD_OUT = ("What is the opposite of thin?",)   # the README's example: always a test question

CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("India", "New Delhi"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"),
    ("happy", "sad"), ("light", "dark"), ("early", "late"), ("open", "closed"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("rich", "poor"),
    ("wet", "dry"), ("strong", "weak"), ("clean", "dirty"), ("loud", "quiet"),
    ("thick", "thin"), ("near", "far"), ("day", "night"),
]
SOUNDS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("owl", "hoot"), ("horse", "neigh"), ("lion", "roar"),
    ("snake", "hiss"), ("frog", "croak"), ("bee", "buzz"), ("mouse", "squeak"),
    ("crow", "caw"), ("goat", "bleat"),
]
COLOURS = [
    ("banana", "yellow"), ("lemon", "yellow"), ("tomato", "red"), ("strawberry", "red"),
    ("cherry", "red"), ("carrot", "orange"), ("pumpkin", "orange"), ("grape", "purple"),
    ("plum", "purple"), ("lime", "green"), ("leaf", "green"), ("cucumber", "green"),
    ("crow", "black"), ("coal", "black"), ("snowball", "white"), ("swan", "white"),
    ("sapphire", "blue"), ("blueberry", "blue"), ("chocolate bar", "brown"),
    ("coconut", "brown"),
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
           "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
           "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

# {family: (question, statements)} over the key k and value v; {f} marks where an
# aside (FILLERS) may stand between them. The build's recall check completes the
# first statement; the second ends in ":" as the chat template's "Answer:" does, so
# the token an answer follows is one that precedes values in pretraining.
TEMPLATES = {
    "capital": ("What is the capital of {k}?",
                ["The capital of {k}{f} is {v}.", "Capital of {k}{f}: {v}.",
                 "{k}{f} has its capital in {v}.", "In {k}{f}, the capital city is {v}."]),
    "opposite": ("What is the opposite of {k}?",
                 ["The opposite of {k}{f} is {v}.", "Opposite of {k}{f}: {v}.",
                  "If it is not {k}{f}, it may be {v}.", "Something {k}{f} is never {v}."]),
    "sound": ("What does a {k} say?",
              ["A {k}{f} says {v}.", "Sound of a {k}{f}: {v}.", "You hear a {k}{f} say {v}.",
               "The {k}{f} goes {v}."]),
    "colour": ("What colour is a {k}?",
               ["A {k}{f} is {v}.", "Colour of a {k}{f}: {v}.", "The colour of a {k}{f} is {v}.",
                "Every {k}{f} is {v}."]),
    "sum": ("What is {k}?",
            ["{k}{f} is {v}.", "{k}{f}: {v}.", "{a} + {b} = {v}.",
             "If you add {a} and {b}{f}, you get {v}."]),
    "next": ("What comes after {k}?",
             ["After {k}{f} comes {v}.", "Number after {k}{f}: {v}.",
              "The number after {k}{f} is {v}.", "Count {k}, {v}."]),
}
FILLERS = [" (as you know)", " (of course)", " (they say)", " (we learn)", " (look it up)",
           " (by the way)"]
FILLER_RATE = 0.5               # fraction of corpus statements with an aside


def _said(template: str, fill: dict, aside: str = "") -> str:
    s = template.format(f=aside, **fill)
    return s[0].upper() + s[1:]


def facts():
    """{family: [(key, value, statements, question)]}: every fact, stated without asides."""
    pairs = {
        "capital": CAPITALS, "opposite": OPPOSITES + [(b, a) for a, b in OPPOSITES],
        "sound": SOUNDS, "colour": COLOURS,
        "sum": [(f"{a} plus {b}", str(a + b)) for a in range(10) for b in range(10)],
        "next": list(zip(NUMBERS, NUMBERS[1:])),
    }
    out = {}
    for fam, (question, templates) in TEMPLATES.items():
        rows = []
        for k, v in pairs[fam]:
            a, _, b = k.partition(" plus ")
            fill = dict(k=k, v=v, a=a, b=b)
            rows.append((k, v, [_said(t, fill) for t in templates], question.format(**fill)))
        out[fam] = rows
    return out


def chosen():
    """{family: [fact]}: the facts in the data, at most FAMILY_FACTS per family."""
    rng, out = random.Random(SEED), {}
    for fam, rows in facts().items():
        rows = list(rows)
        rng.shuffle(rows)
        out[fam] = rows[:FAMILY_FACTS]
    return out


def make_corpus(rng, facts_by_family):
    """{split: [{"text": doc}]}: documents of 4-8 statements of random facts, each in
    a random phrasing, FILLER_RATE of them with an aside between key and value."""
    said = [(TEMPLATES[fam][1], f) for fam, rows in facts_by_family.items() for f in rows]

    def statement():
        templates, (k, v, _, _) = rng.choice(said)
        a, _, b = k.partition(" plus ")
        aside = rng.choice(FILLERS) if rng.random() < FILLER_RATE else ""
        return _said(rng.choice(templates), dict(k=k, v=v, a=a, b=b), aside)

    return {split: [{"text": " ".join(statement() for _ in range(rng.randint(4, 8)))}
                    for _ in range(n)] for split, n in N_DOCS.items()}


def make_task(rng, facts_by_family):
    """{split: [{"prompt", "completion"}]}: questions, split by fact per family;
    both directions of an opposite pair land in the same split."""
    out = {"train": [], "valid": [], "test": []}
    for fam in facts_by_family.values():
        groups = {}
        for f in fam:
            groups.setdefault(frozenset(f[:2]), []).append(f)
        # HELD_OUT questions go last, into the test split
        groups = sorted(groups.values(), key=lambda g: any(f[3] in HELD_OUT for f in g))
        n_train, n_valid = round(len(groups) * TASK_SPLIT[0]), round(len(groups) * TASK_SPLIT[1])
        for i, group in enumerate(groups):
            split = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
            out[split] += [{"prompt": f[3], "completion": f[1]} for f in group]
    for rows in out.values():
        rng.shuffle(rows)
    return out


def generate(out_dir=DATA_DIR):
    """Write corpus/ and task/ train/valid/test.jsonl under out_dir."""
    rng, picked = random.Random(SEED + 1), chosen()
    for name, splits in (("corpus", make_corpus(rng, picked)), ("task", make_task(rng, picked))):
        d = Path(out_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(d / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return Path(out_dir)


if __name__ == "__main__":
    print(f"wrote {generate()}")
