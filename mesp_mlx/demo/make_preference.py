"""Deterministic generator of the demo's preference pairs
(`python -m mesp_mlx.demo.make_preference`).

From the demo task's questions (data/task: {"prompt", "completion"}), split by
split, so valid and test ask about facts no training pair shows: chosen = the
right answer, rejected = the answer of a question of another kind ("What is the
capital of Peru?": "Lima" over "moo"). The preference is one the tiny demo model
can learn and carry to new questions: an answer of the kind the question asks for.
A question's kind is its wording without digits and without the words in fewer
than KIND_MIN questions (its subject). Train holds PER_TRAIN pairs per question
(different rejected answers), valid and test one. Everything comes from
random.Random(SEED) and the task files; rerunning rewrites identical files.
"""

import json
import random
import re
from collections import Counter
from pathlib import Path

SEED = 7
HERE = Path(__file__).parent
TASK_DIR = HERE / "data" / "task"
DATA_DIR = HERE / "data" / "preference"
SPLITS = ("train", "valid", "test")
PER_TRAIN = 2
KIND_MIN = 5          # a word in fewer questions than this is a subject, not wording


def _words(question: str) -> list:
    return re.findall(r"[A-Za-z]+", question.lower())


def _read(split: str) -> list:
    with open(TASK_DIR / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_pairs(rng: random.Random, tasks: dict) -> dict:
    """{split: [{"prompt", "chosen", "rejected"}]} from {split: task records}."""
    counts = Counter(w for rows in tasks.values() for r in rows
                     for w in set(_words(r["prompt"])))
    kind = lambda q: tuple(w for w in _words(q) if counts[w] >= KIND_MIN)  # noqa: E731
    out = {}
    for split in SPLITS:
        rows = tasks[split]
        answers = {}
        for r in rows:
            answers.setdefault(kind(r["prompt"]), set()).add(r["completion"])
        pairs = []
        for r in rows:
            own = kind(r["prompt"])
            wrong = sorted({a for k, v in answers.items() if k != own for a in v}
                           - answers[own])
            n = PER_TRAIN if split == "train" else 1
            for rejected in rng.sample(wrong, min(n, len(wrong))):
                pairs.append({"prompt": r["prompt"], "chosen": r["completion"],
                              "rejected": rejected})
        rng.shuffle(pairs)
        out[split] = pairs
    return out


def generate(out_dir=DATA_DIR) -> Path:
    """Write train/valid/test.jsonl of preference pairs under out_dir."""
    pairs = make_pairs(random.Random(SEED), {s: _read(s) for s in SPLITS})
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in pairs.items():
        with open(d / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


if __name__ == "__main__":
    print(f"wrote {generate()}")
