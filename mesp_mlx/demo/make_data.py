"""Deterministic generator of the demo's two datasets (`python -m mesp_mlx.demo.make_data`).

How it was made: 225 fixed facts in six families (capitals, opposites, animal
sounds, colours, one-digit sums, number successors) are rendered by templates.
  corpus/ (mlx-lm "text" format): documents of 4-8 random statements, each fact
          in several phrasings ("Lima is the capital of Peru.") — the base
          model learns the facts and English-like syntax from it.
  task/   ("prompt"/"completion"): the same facts asked as questions
          ("What is the capital of Peru?" -> "Lima"), at most 40 per family,
          split by fact: valid and test ask about facts the model saw only
          as statements in pretraining.
Everything comes from random.Random(SEED); rerunning rewrites identical files.
"""

import json
import random
from pathlib import Path

SEED = 5
DATA_DIR = Path(__file__).parent / "data"
N_DOCS = {"train": 1500, "valid": 100, "test": 100}
TASK_SPLIT = (0.7, 0.15)        # train / valid fractions of each family (rest: test)
TASK_MAX_FACTS = 40             # per family, so the 100 sums do not dominate the task

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


def _facts():
    """{family: [(key, value, statements, question)]} — one entry per fact."""
    cap = [(c, x, [f"The capital of {c} is {x}.", f"{x} is the capital of {c}.",
                   f"{c} has its capital in {x}.", f"The city of {x} is in {c}."],
            f"What is the capital of {c}?") for c, x in CAPITALS]
    pairs = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    opp = [(a, b, [f"The opposite of {a} is {b}.", f"{b.capitalize()} is the opposite of {a}.",
                   f"If it is not {a}, it may be {b}."],
            f"What is the opposite of {a}?") for a, b in pairs]
    snd = [(a, s, [f"A {a} says {s}.", f"The {a} goes {s}.", f"You hear a {a} say {s}."],
            f"What does a {a} say?") for a, s in SOUNDS]
    col = [(t, c, [f"A {t} is {c}.", f"The colour of a {t} is {c}.", f"Every {t} is {c}."],
            f"What colour is a {t}?") for t, c in COLOURS]
    add = [(f"{a}+{b}", str(a + b), [f"{a} plus {b} is {a + b}.", f"{a} + {b} = {a + b}.",
                                     f"If you add {a} and {b}, you get {a + b}."],
            f"What is {a} plus {b}?") for a in range(10) for b in range(10)]
    nxt = [(NUMBERS[n], NUMBERS[n + 1], [f"After {NUMBERS[n]} comes {NUMBERS[n + 1]}.",
                                         f"{NUMBERS[n + 1].capitalize()} comes after {NUMBERS[n]}.",
                                         f"Count {NUMBERS[n]}, {NUMBERS[n + 1]}."],
            f"What comes after {NUMBERS[n]}?") for n in range(len(NUMBERS) - 1)]
    return {"capital": cap, "opposite": opp, "sound": snd, "colour": col,
            "sum": add, "next": nxt}


def make_corpus(rng, facts):
    """{split: [{"text": doc}]}: documents of 4-8 statements from any family."""
    statements = [s for fam in facts.values() for f in fam for s in f[2]]
    return {split: [{"text": " ".join(rng.choice(statements) for _ in range(rng.randint(4, 8)))}
                    for _ in range(n)] for split, n in N_DOCS.items()}


def make_task(rng, facts):
    """{split: [{"prompt", "completion"}]}: questions, split by fact per family."""
    out = {"train": [], "valid": [], "test": []}
    for fam in facts.values():
        fam = list(fam)
        rng.shuffle(fam)
        fam = fam[:TASK_MAX_FACTS]
        n_train, n_valid = round(len(fam) * TASK_SPLIT[0]), round(len(fam) * TASK_SPLIT[1])
        for i, (_, value, _, question) in enumerate(fam):
            split = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
            out[split].append({"prompt": question, "completion": value})
    for rows in out.values():
        rng.shuffle(rows)
    return out


def generate(out_dir=DATA_DIR):
    """Write corpus/ and task/ train/valid/test.jsonl under out_dir."""
    rng = random.Random(SEED)
    facts = _facts()
    for name, splits in (("corpus", make_corpus(rng, facts)), ("task", make_task(rng, facts))):
        d = Path(out_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(d / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return Path(out_dir)


if __name__ == "__main__":
    print(f"wrote {generate()}")
