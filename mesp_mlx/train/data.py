"""JSONL data in mlx-lm's formats -> token batches with exact loss masks.

Formats (one JSON object per line): {"text"}, {"prompt", "completion"} and
chat {"messages": [{"role", "content"}, ...]}; tokenized by mlx-lm's dataset
classes (chat template for the last two). Unlike mlx-lm 0.32:
batches are bucketed by token count, no padding position is ever a target,
and the validation subset is fixed. With packing (`pack` = the row length),
training rows hold several whole examples each (best-fit decreasing), with
segment ids for the engine (packing.py): each example is trained as if alone.
"""

import bisect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
import numpy as np

from .. import demo
from ..engine.batch import Batch
from ..errors import DataError
from . import hf_data
from .records import EXPECTED, check_record, rename_keys

SPLITS = ("train", "valid", "test")
class TruncationWarning(UserWarning):
    """Some sequences were longer than max_seq_length and were cut."""


@dataclass
class Dataset:
    """Tokenized examples: tokens[i] (a list of ids) whose targets start at offsets[i]."""
    name: str
    tokens: List[List[int]]
    offsets: List[int]

    def __len__(self):
        return len(self.tokens)


# ---------------------------------------------------------------- reading

def read_jsonl(path, rename: Optional[dict] = None) -> tuple:
    """(records, format, line numbers); DataError names file:line on bad input.
    rename: record keys to rename first (feature_renames)."""
    records, lines, fmt = [], [], None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                f"at byte {e.start + 1} of the line); save the file as "
                                "UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column "
                                f"{e.colno}); expected {EXPECTED}") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply; expected "
                                f"{EXPECTED}") from None
            rec = rename_keys(rec, rename)
            fmt = check_record(rec, f"{path}:{n}", fmt)
            records.append(rec)
            lines.append(n)
    if not records:
        raise DataError(f"{path} is empty; expected {EXPECTED}")
    return records, fmt, lines


# ---------------------------------------------------------------- tokenizing

def tokenize(records, fmt, tokenizer, mask_prompt=False, name="data",
             lines=None, vocab_size: Optional[int] = None) -> Dataset:
    """Token ids (+ prompt offset when mask_prompt) for each record; with
    vocab_size, every id must be below it (DataError with file:line)."""
    from mlx_lm.tuner import datasets as mld

    if fmt == "preference":
        raise DataError(f"{name}: preference records (chosen/rejected) are pairs: "
                        "train_mode dpo or orpo reads them (train/preference_data.py)")
    if mask_prompt and fmt == "text":
        raise DataError(f"{name}: --mask-prompt needs prompt/completion or chat "
                        "data; this file has plain 'text' records")
    if fmt == "text":
        proc = mld.TextDataset(records, tokenizer)
    elif fmt == "chat":
        proc = mld.ChatDataset(records, tokenizer, mask_prompt=mask_prompt)
    else:
        proc = mld.CompletionsDataset(records, tokenizer, "prompt", "completion",
                                      mask_prompt)
    tokens, offsets = [], []
    for i, rec in enumerate(records):
        where = f"{name}:{lines[i] if lines else i + 1}"
        try:
            toks, off = proc.process(rec)
        except Exception as e:  # tokenizer/template errors carry no location
            hint = (" (prompt/completion and chat data need a tokenizer with a chat "
                    "template: use an -Instruct model or 'text' records)"
                    if "chat_template" in str(e) or "chat template" in str(e) else "")
            raise DataError(f"{where}: could not tokenize: {e}{hint}") from None
        _check_ids(toks, vocab_size, where)
        tokens.append(list(toks))
        offsets.append(int(off))
    return Dataset(name, tokens, offsets)


def _check_ids(toks, vocab_size, where):
    if vocab_size is None or not len(toks):
        return
    hi, lo = max(toks), min(toks)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary "
                        f"(size {vocab_size}, ids 0..{vocab_size - 1}): the tokenizer does "
                        "not match the model")


def truncate(ds: Dataset, max_seq_length: int) -> Dataset:
    """Cut sequences to max_seq_length tokens; one warning per dataset; drop
    examples left without a target (too short, or prompt fills the window)."""
    lengths = [len(t) for t in ds.tokens]
    cut = sum(n > max_seq_length for n in lengths)
    if cut:
        warnings.warn(f"{ds.name}: {cut} of {len(ds)} sequences are longer than "
                      f"--max-seq-length {max_seq_length} (longest {max(lengths)} "
                      f"tokens) and were truncated", TruncationWarning, stacklevel=2)
    keep = [i for i, t in enumerate(ds.tokens)
            if min(len(t), max_seq_length) >= 2
            and ds.offsets[i] < min(len(t), max_seq_length)]
    if not keep:
        raise DataError(f"{ds.name}: no example has a token to train on after "
                        f"truncation to {max_seq_length} tokens")
    if len(keep) < len(ds):
        warnings.warn(f"{ds.name}: skipped {len(ds) - len(keep)} examples with no "
                      "target token left (shorter than 2 tokens, or the prompt fills "
                      "--max-seq-length)", TruncationWarning, stacklevel=2)
    return Dataset(ds.name, [ds.tokens[i][:max_seq_length] for i in keep],
                   [ds.offsets[i] for i in keep])


# ---------------------------------------------------------------- loading

def load_splits(data: str, tokenizer, max_seq_length: int, mask_prompt=False,
                need=("train",), vocab_size: Optional[int] = None) -> dict:
    """{split: Dataset or None} from a directory, 'demo' or a HF dataset id.
    Splits in `need` must exist; others are loaded when present."""
    return tokenize_splits(read_splits(data, need), tokenizer, max_seq_length,
                           mask_prompt, vocab_size)


def read_splits(data: str, need=("train",), rename: Optional[dict] = None) -> dict:
    """The records of each split present ({split: (records, fmt, lines, name)}),
    checked line by line; no tokenizer needed, so it can run before the model loads.
    rename: record keys to rename first (feature_renames)."""
    return _raw_splits(data, need, rename)


def tokenize_splits(raw: dict, tokenizer, max_seq_length: int, mask_prompt=False,
                    vocab_size: Optional[int] = None) -> dict:
    """read_splits' records -> {split: truncated Dataset or None}."""
    out = {}
    for split in SPLITS:
        if split not in raw:
            out[split] = None
            continue
        records, fmt, lines, name = raw[split]
        ds = tokenize(records, fmt, tokenizer, mask_prompt, name, lines, vocab_size)
        out[split] = truncate(ds, max_seq_length)
    return out


def _raw_splits(data: str, need, rename=None) -> dict:
    if data == "demo" or data.startswith("demo:"):
        try:
            data = demo.data_path(data.partition(":")[2] or "task")
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"demo data unavailable: {e}") from None
    path = Path(data).expanduser()
    if path.is_dir():
        out = {}
        for split in SPLITS:
            f = path / f"{split}.jsonl"
            if f.is_file():
                out[split] = (*read_jsonl(f, rename), str(f))
            elif split in need:
                raise DataError(f"{f} not found: --{'train' if split != 'test' else 'test'}"
                                f" needs {split}.jsonl in {path}")
        return out
    if path.exists() or data.startswith((".", "/", "~")) or data.count("/") > 1:
        raise DataError(f"data directory {data} not found (expected a directory with "
                        "train.jsonl, valid.jsonl, test.jsonl, or a dataset id)")
    return hf_data.from_id(data, need, rename)


def longest_row(ds: Dataset, max_seq_length: int, pack: bool = False) -> int:
    """T of the longest training row: the longest example's targets, or with
    packing, rows of up to max_seq_length positions."""
    if pack:
        return max(1, min(max_seq_length, sum(len(t) - 1 for t in ds.tokens)))
    return max(1, min(max_seq_length, max((len(t) - 1 for t in ds.tokens), default=1)))


# ---------------------------------------------------------------- batching

def bucket(ds: Dataset, batch_size: int) -> List[List[int]]:
    """Example indices grouped into batches of similar token count (last may be short)."""
    order = sorted(range(len(ds)), key=lambda i: (len(ds.tokens[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(ds: Dataset, idx) -> Batch:
    """Right-padded batch; mask[b, j] = 1 iff target j+1 is real and trained."""
    seqs = [ds.tokens[i] for i in idx]
    T = max(len(s) for s in seqs) - 1
    arr = np.zeros((len(seqs), T + 1), np.int32)
    mask = np.zeros((len(seqs), T), np.float32)
    for b, (s, i) in enumerate(zip(seqs, idx)):
        arr[b, :len(s)] = s
        mask[b, max(ds.offsets[i] - 1, 0):len(s) - 1] = 1.0
    n_tokens = sum(len(s) - 1 for s in seqs)
    return Batch(mx.array(arr[:, :-1]), mx.array(arr[:, 1:]), mx.array(mask),
                 n_tokens, int(mask.sum()))


def pack_rows(ds: Dataset, length: int) -> List[List[int]]:
    """Example indices grouped into rows of at most `length` input positions
    (an example of n tokens takes n − 1), whole examples only: best-fit
    decreasing, so each example goes to the fullest row it still fits in."""
    order = sorted(range(len(ds)), key=lambda i: (-len(ds.tokens[i]), i))
    rows, free = [], []                  # free: sorted (room left, row) of open rows
    for i in order:
        n = len(ds.tokens[i]) - 1
        if n > length:
            raise DataError(f"{ds.name}: an example of {n + 1} tokens does not fit a "
                            f"packed row of {length} positions (truncate first)")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = length, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def make_packed_batch(ds: Dataset, rows) -> Batch:
    """Rows of whole examples laid end to end, each example's inputs, targets and
    mask exactly as make_batch's (no target crosses into the next example);
    segments[b, t] = the example's place in its row, the padded tail one more
    segment with mask 0."""
    fill = [sum(len(ds.tokens[i]) - 1 for i in r) for r in rows]
    T = max(fill)
    x, y = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.float32)
    seg = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        t = 0
        for s, i in enumerate(r):
            toks, n = ds.tokens[i], len(ds.tokens[i]) - 1
            x[b, t:t + n], y[b, t:t + n] = toks[:-1], toks[1:]
            mask[b, t + max(ds.offsets[i] - 1, 0):t + n] = 1.0
            seg[b, t:t + n] = s
            t += n
        seg[b, t:] = len(r)
    return Batch(mx.array(x), mx.array(y), mx.array(mask), sum(fill), int(mask.sum()),
                 mx.array(seg))


def _plan(ds: Dataset, batch_size: int, pack: int):
    """Batches as (maker, groups): buckets of examples, or of packed rows (rows of
    similar fill together, so a batch's T is its fullest row); a dataset with a
    plan of its own (preference pairs) batches itself."""
    if hasattr(ds, "plan"):
        return ds.plan(batch_size)
    if not pack:
        return make_batch, bucket(ds, batch_size)
    rows = pack_rows(ds, pack)
    rows.sort(key=lambda r: (sum(len(ds.tokens[i]) - 1 for i in r), r[0]))
    return make_packed_batch, [rows[i:i + batch_size] for i in range(0, len(rows),
                                                                     batch_size)]


def iterate_batches(ds: Dataset, batch_size: int, seed: int = 0,
                    start: int = 0, pack: int = 0) -> Iterator[Batch]:
    """Endless training batches from iteration `start` on. Epoch e visits the
    buckets in a permutation drawn from (seed, e), so iteration k's batch is a
    pure function of (seed, k): resuming at k replays the same data.
    pack: rows of this many positions holding whole examples (0: one per row);
    batch_size then counts rows."""
    make, buckets = _plan(ds, batch_size, pack)
    k = start
    while True:
        epoch, pos = divmod(k, len(buckets))
        perm = np.random.default_rng([seed, epoch]).permutation(len(buckets))
        yield make(ds, buckets[perm[pos]])
        k += 1


def fixed_batches(ds: Dataset, batch_size: int, num_batches: int,
                  pack: int = 0) -> List[Batch]:
    """The same evaluation subset every time: num_batches buckets (-1: all)
    chosen by a fixed permutation, so successive losses are comparable.
    pack: as iterate_batches (the trainer evaluates unpacked batches: the model's
    own forward, which evaluation runs, knows no segments)."""
    make, buckets = _plan(ds, batch_size, pack)
    perm = np.random.default_rng(0).permutation(len(buckets))
    n = len(buckets) if num_batches == -1 else min(num_batches, len(buckets))
    return [make(ds, buckets[j]) for j in sorted(perm[:n])]
