"""The demo's accuracy command: held-out questions stay held out, answers are
graded as `mlx_lm generate` shows them, and the base model cannot answer."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.datasets import CompletionsDataset
from mlx_lm.tuner.utils import linear_to_lora_layers

from mesp_mlx import demo
from mesp_mlx.demo import accuracy
from mesp_mlx.demo.make_data import chosen

ROOT = Path(__file__).resolve().parents[1]


def read(name, split):
    with open(Path(demo.data_path(name)) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def norm(text):
    return " ".join(text.casefold().split())


@pytest.fixture(scope="module")
def loaded():
    return load(demo.model_path())


@pytest.mark.parametrize("answer, completion, right", [
    (" thick", "thick", True),
    ("Thick.", "thick", True),                # case and punctuation do not count
    (" thick and thin", "thick", True),       # only the first word is graded
    ("\n  Lima", "Lima", True),
    (" Mexico City", "Mexico City", True),
    (" Mexico", "Mexico City", True),         # first word of the completion
    (" 12.", "12", True),
    (" thin", "thick", False),
    (" thickness", "thick", False),           # whole words, not prefixes
    (" 1", "12", False),
    ("", "thick", False),
    (" ...", "thick", False),
    (" the capital is Lima", "Lima", False),  # the answer must come first
])
def test_grading(answer, completion, right):
    assert accuracy.is_right(answer, completion) is right


def test_first_word():
    assert accuracy.first_word("  'Paris', said he") == "paris"
    assert accuracy.first_word("?! 7 + 1") == "7"
    assert accuracy.first_word(" \n ") == ""


def test_test_questions_are_not_in_the_training_data():
    """Neither the fine-tuning splits nor the pretraining corpus hold a test question."""
    test = {norm(r["prompt"]) for r in read("task", "test")}
    assert test
    for split in ("train", "valid"):
        seen = {norm(r["prompt"]) for r in read("task", split)}
        assert not test & seen, f"test questions in task/{split}.jsonl: {sorted(test & seen)}"
    for split in ("train", "valid", "test"):
        for i, r in enumerate(read("corpus", split)):
            text = norm(r["text"])
            hits = [q for q in test if q in text]
            assert not hits, f"corpus/{split}.jsonl line {i + 1} holds test question {hits}"


def test_opposite_pairs_stay_in_one_split():
    """'thin' -> 'thick' is held out together with 'thick' -> 'thin'."""
    split_of = {r["prompt"]: s for s in ("train", "valid", "test") for r in read("task", s)}
    for prompt, split in split_of.items():
        if re.fullmatch(r"What is the opposite of \w+\?", prompt):
            answer = next(r["completion"] for r in read("task", split) if r["prompt"] == prompt)
            assert split_of[f"What is the opposite of {answer}?"] == split, prompt


def test_readme_example_is_held_out():
    assert "What is the opposite of thin?" in {r["prompt"] for r in read("task", "test")}


def test_every_test_answer_was_stated_in_pretraining():
    """Held-out facts are known, not guessed: each one is in the corpus it learned from."""
    by_question = {q: (value, statements) for fam in chosen().values()
                   for _, value, statements, q in fam}
    corpus = " ".join(r["text"] for r in read("corpus", "train"))
    for r in read("task", "test"):
        value, statements = by_question[r["prompt"]]
        assert value == r["completion"]
        assert any(s in corpus for s in statements), f"{r['prompt']} never stated"


def test_prompt_is_formatted_as_in_training(loaded):
    """The graded prompt is the --mask-prompt prefix of a training example."""
    _, tok = loaded
    rows = read("task", "test")
    ds = CompletionsDataset(rows, tok, "prompt", "completion", mask_prompt=True)
    for row in rows[:5]:
        tokens, offset = ds.process(row)
        assert accuracy.prompt_ids(tok, row["prompt"]) == list(tokens[:offset])


def test_base_model_does_not_answer(loaded):
    """Without adapters the demo model cannot answer held-out questions (<= 20%)."""
    model, tok = loaded
    rows = read("task", "test")
    right, graded = accuracy.score(model, tok, rows)
    assert len(graded) == len(rows)
    assert right <= 0.2 * len(rows), [(r["prompt"], a) for r, a, ok in graded if ok]


def test_command_on_base_model():
    proc = subprocess.run([sys.executable, "-m", "mesp_mlx.demo.accuracy", "--limit", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"held-out accuracy of the base model without adapters: "
                     r"\d/4 \(\d+%\)", proc.stdout), proc.stdout


def test_command_with_adapters(tmp_path):
    """Untrained LoRA adapters (B = 0) answer exactly as the base model."""
    model, _ = load(demo.model_path())
    model.freeze()
    config = {"num_layers": -1, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    linear_to_lora_layers(model, len(model.layers), config["lora_parameters"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        dict(config, fine_tune_type="lora")))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    results = accuracy.main(["--adapter-path", str(tmp_path), "--limit", "4"])
    assert results[str(tmp_path)] == results[None]
    assert results[None][1] == 4
