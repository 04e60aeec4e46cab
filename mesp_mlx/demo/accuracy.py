"""How many demo questions a model answers right (`python -m mesp_mlx.demo.accuracy`).

    python -m mesp_mlx.demo.accuracy --adapter-path adapters   # fine-tuned vs base model
    python -m mesp_mlx.demo.accuracy                           # base model only
Graded as `mlx_lm generate --prompt QUESTION` shows it: the question in the
tokenizer's chat template (as the training data is tokenized), greedy decoding of
a few tokens; right when the answer's first word is the completion's first word.
"""

import argparse
import json
import string
from pathlib import Path

from mlx_lm import generate, load

from . import data_path, model_path

MAX_TOKENS = 5
LABELS = {"test": "held-out", "valid": "validation", "train": "train"}


def first_word(text: str) -> str:
    """The first whitespace-separated word, punctuation stripped, case folded."""
    for word in text.split():
        word = word.strip(string.punctuation)
        if word:
            return word.casefold()
    return ""


def is_right(answer: str, completion: str) -> bool:
    """Right when the answer's first word is the completion's first word."""
    return first_word(answer) != "" and first_word(answer) == first_word(completion)


def prompt_ids(tokenizer, question: str) -> list:
    """The token ids `mlx_lm generate --prompt question` feeds the model."""
    if tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(question)


def answer(model, tokenizer, question: str, max_tokens: int = MAX_TOKENS) -> str:
    """Greedy answer (mlx-lm's default sampler) to one question."""
    return generate(model, tokenizer, prompt_ids(tokenizer, question), max_tokens=max_tokens)


def read_split(split: str = "test") -> list:
    """[{"prompt", "completion"}] of the demo task's split."""
    with open(Path(data_path("task")) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def score(model, tokenizer, rows, max_tokens: int = MAX_TOKENS):
    """(number right, [(row, answer, right)]) over prompt/completion rows."""
    graded = []
    for row in rows:
        text = answer(model, tokenizer, row["prompt"], max_tokens)
        graded.append((row, text, is_right(text, row["completion"])))
    return sum(r for _, _, r in graded), graded


def evaluate(adapter_path=None, split: str = "test", model_dir=None,
             max_tokens: int = MAX_TOKENS, limit=None):
    """(right, total, graded) of the demo model (plus adapters) on a task split."""
    model, tokenizer = load(model_dir or model_path(), adapter_path=adapter_path)
    rows = read_split(split)[:limit]
    right, graded = score(model, tokenizer, rows, max_tokens)
    return right, len(rows), graded


def _fraction(right: int, total: int) -> str:
    return f"{right}/{total} ({100 * right / max(total, 1):.0f}%)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter-path", default=None,
                   help="adapters to grade (mlx-lm format); without: the base model")
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--split", default="test", choices=sorted(LABELS),
                   help="task split to ask (default: test, the held-out questions)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--limit", type=int, default=None, help="ask only the first N questions")
    p.add_argument("--verbose", action="store_true", help="print every question and answer")
    args = p.parse_args(argv)
    label = f"{LABELS[args.split]} accuracy"
    runs = [args.adapter_path] if args.adapter_path else []
    results = {}
    for adapters in runs + [None]:
        right, total, graded = evaluate(adapters, args.split, args.model, args.max_tokens,
                                        args.limit)
        results[adapters] = (right, total)
        if args.verbose:
            name = adapters or "base model"
            for row, text, ok in graded:
                print(f"[{name}] {'right' if ok else 'WRONG'}  {row['prompt']!r} -> "
                      f"{text.strip()!r} (expected {row['completion']!r})")
    base = _fraction(*results[None])
    if args.adapter_path:
        print(f"{label}: {_fraction(*results[args.adapter_path])} "
              f"[base model without adapters: {base}]")
    else:
        print(f"{label} of the base model without adapters: {base}")
    return results


if __name__ == "__main__":
    # no blas.ensure_fast: the BLAS of `mlx_lm generate`, so the same greedy answers
    main()
