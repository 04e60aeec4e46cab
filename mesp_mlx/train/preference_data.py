"""Preference pairs: records -> tokenized chosen/rejected sides -> pair batches.

Record forms (records.pair_turns), as mlx-lm-lora and TRL write them:
  {"prompt": str, "chosen": str, "rejected": str}              (+ optional "system")
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  {"chosen": [messages], "rejected": [messages]}   the prompt: every turn but the last
a side may also be {"messages": [...]} (mlx-lm-lora's ORPO form). Each side is the
prompt turns + its completion through the chat template, the prompt always masked
(its targets start where the prompt with the generation prompt ends, as mlx-lm's
--mask-prompt). Sides longer than --max-seq-length are cut (a warning); a side
left with no completion target is an error naming its file and line. A batch holds
B pairs: the chosen rows and the rejected rows, each right-padded as for SFT.
"""

import warnings
from dataclasses import dataclass, field
from typing import List

from ..engine.batch import Batch
from ..errors import DataError
from .data import Dataset, TruncationWarning, make_batch
from .records import pair_turns

MODES = ("dpo", "orpo")       # the --train-mode values that read preference records
SIDES = ("chosen", "rejected")


@dataclass
class PairDataset:
    """Tokenized pairs: chosen.tokens[i] and rejected.tokens[i] are pair i's sides.
    ref_cache: pair index -> the reference model's (L_c, L_r), filled by training."""
    name: str
    chosen: Dataset
    rejected: Dataset
    ref_cache: dict = field(default_factory=dict, repr=False)

    def __len__(self):
        return len(self.chosen)

    @property
    def tokens(self) -> List[List[int]]:
        """Every side's tokens (for the longest row and position checks)."""
        return self.chosen.tokens + self.rejected.tokens

    def plan(self, batch_size: int):
        """(maker, groups) for data.iterate_batches / fixed_batches: pairs of similar
        length together (by the longer side)."""
        size = [max(len(c), len(r)) for c, r in zip(self.chosen.tokens,
                                                    self.rejected.tokens)]
        order = sorted(range(len(self)), key=lambda i: (size[i], i))
        return make_pair_batch, [order[i:i + batch_size]
                                 for i in range(0, len(order), batch_size)]


@dataclass
class PairBatch:
    """B pairs: the chosen and rejected rows (each a Batch), their pair indices."""
    chosen: Batch
    rejected: Batch
    idx: tuple
    ref_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_pairs(self) -> int:
        return len(self.idx)

    @property
    def n_tokens(self) -> int:
        return self.chosen.n_tokens + self.rejected.n_tokens

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets


def make_pair_batch(ds: PairDataset, idx) -> PairBatch:
    return PairBatch(make_batch(ds.chosen, idx), make_batch(ds.rejected, idx),
                     tuple(int(i) for i in idx), ds.ref_cache)


def check_mode(raw: dict, train_mode: str) -> None:
    """Every split read (data.read_splits) has the records the mode trains on."""
    for split, (_, fmt, _, name) in raw.items():
        if train_mode in MODES and fmt != "preference":
            raise DataError(f"{name}: {fmt} records, but --train-mode {train_mode} trains "
                            'on preference pairs: {"prompt": ..., "chosen": ..., '
                            '"rejected": ...}')
        if train_mode not in MODES and fmt == "preference":
            raise DataError(f"{name}: preference records (chosen/rejected): train on "
                            "them with --train-mode dpo or orpo")


def tokenize_splits(raw: dict, tokenizer, max_seq_length: int, vocab_size=None) -> dict:
    """read_splits' preference records -> {split: PairDataset or None}."""
    out = {}
    for split in ("train", "valid", "test"):
        if split not in raw:
            out[split] = None
            continue
        records, _, lines, name = raw[split]
        out[split] = tokenize_pairs(records, tokenizer, max_seq_length, name, lines,
                                    vocab_size)
    return out


def tokenize_pairs(records, tokenizer, max_seq_length: int, name="data", lines=None,
                   vocab_size=None) -> PairDataset:
    sides = {s: Dataset(f"{name} ({s})", [], []) for s in SIDES}
    cut = 0
    for i, rec in enumerate(records):
        where = f"{name}:{lines[i] if lines else i + 1}"
        prompt, *completions = pair_turns(rec)
        for side, completion in zip(SIDES, completions):
            toks, off = _encode(tokenizer, prompt, completion, where)
            _check_ids(toks, vocab_size, where)
            cut += len(toks) > max_seq_length
            toks, off = toks[:max_seq_length], max(off, 1)      # token 0 is no target
            if off >= len(toks):
                raise DataError(f"{where}: the {side} completion is empty after "
                                f"truncation to --max-seq-length {max_seq_length} (the "
                                f"prompt takes {off} tokens): raise --max-seq-length or "
                                "shorten the prompt")
            sides[side].tokens.append(toks)
            sides[side].offsets.append(off)
    if cut:
        warnings.warn(f"{name}: {cut} sides of {len(records)} pairs are longer than "
                      f"--max-seq-length {max_seq_length} and were truncated",
                      TruncationWarning, stacklevel=2)
    return PairDataset(name, sides["chosen"], sides["rejected"])


def _encode(tokenizer, prompt, completion, where):
    """(tokens, offset of the first completion token) through the chat template."""
    try:
        toks = tokenizer.apply_chat_template(prompt + completion, return_dict=False)
        gen = completion[0]["role"] == "assistant"
        off = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=gen,
                                                return_dict=False))
    except Exception as e:  # tokenizer/template errors carry no location
        raise DataError(f"{where}: could not tokenize: {e} (preference data needs a "
                        "tokenizer with a chat template)") from None
    return list(toks), off


def _check_ids(toks, vocab_size, where):
    if vocab_size is not None and toks and not 0 <= min(toks) <= max(toks) < vocab_size:
        raise DataError(f"{where}: a token id is outside the model's vocabulary (size "
                        f"{vocab_size}): the tokenizer does not match the model")
