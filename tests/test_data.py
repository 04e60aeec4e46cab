"""Data: formats, file:line errors, truncation warning, masks, bucketing, determinism."""

import numpy as np
import pytest
from conftest import sentence, write_jsonl

from mesp_mlx.train import data
from mesp_mlx.train.data import DataError, Dataset, TruncationWarning


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def test_three_formats_load(tokenizer, text_data, completion_data, chat_data):
    for d in (text_data, completion_data, chat_data):
        splits = data.load_splits(str(d), tokenizer, 512)
        assert len(splits["train"]) > 0 and splits["valid"] is not None
        assert all(t[-1] == tokenizer.eos_token_id for t in splits["train"].tokens) \
            or d != text_data


@pytest.mark.parametrize("line,expect", [
    ('{"text": "ok"}\n{"text": "fine"}\n{"txt": "typo"}\n', ":3: unrecognised record"),
    ('{"text": "ok"}\n{broken json\n', ":2: not valid JSON"),
    ('{"text": "ok"}\n["a list"]\n', ":2: got a JSON list"),
    ('{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n', ":2: a 'completions' record"),
    ('{"text": 5}\n', ":1: 'text' must be a string"),
    ('{"messages": [{"role": "user"}]}\n', ":1: 'messages' must be"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, expect):
    (tmp_path / "train.jsonl").write_text(line)
    with pytest.raises(DataError) as e:
        data.read_jsonl(tmp_path / "train.jsonl")
    assert f"{tmp_path / 'train.jsonl'}{expect}" in str(e.value)
    assert "expected" in str(e.value) or "must" in str(e.value)


def test_missing_files_and_dirs(tokenizer, tmp_path, text_data):
    with pytest.raises(DataError, match="data directory .* not found"):
        data.load_splits(str(tmp_path / "nope"), tokenizer, 64)
    write_jsonl(tmp_path / "d" / "valid.jsonl", [{"text": "a b"}])
    with pytest.raises(DataError, match="train.jsonl not found"):
        data.load_splits(str(tmp_path / "d"), tokenizer, 64)
    with pytest.raises(DataError, match="test.jsonl not found"):
        data.load_splits(str(tmp_path / "d"), tokenizer, 64, need=("test",))


def test_hf_dataset_id_without_datasets_is_clear(tokenizer, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)       # as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        data.load_splits("someone/some-dataset", tokenizer, 64)


def test_mask_prompt_on_text_is_an_error(tokenizer, text_data):
    with pytest.raises(DataError, match="--mask-prompt needs"):
        data.load_splits(str(text_data), tokenizer, 64, mask_prompt=True)


def test_truncation_warns_once_with_count(tokenizer, tmp_path):
    recs = [{"text": sentence(i, 2)} for i in range(5)] + \
           [{"text": sentence(i, 30)} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", recs)
    with pytest.warns(TruncationWarning) as w:
        splits = data.load_splits(str(tmp_path), tokenizer, 40)
    msgs = [str(x.message) for x in w if x.category is TruncationWarning]
    assert len(msgs) == 1 and "3 of 8 sequences" in msgs[0] and "40" in msgs[0]
    assert max(len(t) for t in splits["train"].tokens) == 40


def test_mask_never_targets_padding_and_respects_prompt():
    ds = Dataset("x", [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]], [0, 0, 2])
    b = data.make_batch(ds, [0, 1, 2])
    mask = np.array(b.mask)
    assert b.inputs.shape == (3, 4) and b.targets.shape == (3, 4)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    assert b.n_targets == 8 and b.n_tokens == 4 + 2 + 3
    np.testing.assert_array_equal(np.array(b.targets)[0], [2, 3, 4, 5])


def test_mask_prompt_targets_only_completion(tokenizer, completion_data):
    full = data.load_splits(str(completion_data), tokenizer, 512)["train"]
    masked = data.load_splits(str(completion_data), tokenizer, 512,
                              mask_prompt=True)["train"]
    assert full.tokens == masked.tokens
    assert all(o == 0 for o in full.offsets)
    assert all(0 < o < len(t) for o, t in zip(masked.offsets, masked.tokens))
    b = data.make_batch(masked, [0])
    assert b.n_targets == len(masked.tokens[0]) - masked.offsets[0]


def test_bucketing_groups_by_token_count():
    lens = [9, 2, 7, 3, 8, 1, 6, 4]
    ds = Dataset("x", [[1] * n for n in lens], [0] * len(lens))
    buckets = data.bucket(ds, 3)
    assert [sorted(lens[i] for i in b) for b in buckets] == [[1, 2, 3], [4, 6, 7], [8, 9]]


def test_batch_order_is_a_function_of_seed_and_step(tokenizer, text_data):
    ds = data.load_splits(str(text_data), tokenizer, 512)["train"]
    it = data.iterate_batches(ds, 4, seed=3)
    seq = [np.array(next(it).inputs) for _ in range(15)]     # > 2 epochs of 6 batches
    resumed = data.iterate_batches(ds, 4, seed=3, start=9)
    for k in range(9, 15):
        np.testing.assert_array_equal(np.array(next(resumed).inputs), seq[k])
    other = data.iterate_batches(ds, 4, seed=4)
    assert any(not np.array_equal(np.array(next(other).inputs), s) for s in seq[:6])


def test_fixed_batches_are_fixed(tokenizer, text_data):
    ds = data.load_splits(str(text_data), tokenizer, 512)["train"]
    a = data.fixed_batches(ds, 4, 3)
    b = data.fixed_batches(ds, 4, 3)
    assert len(a) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.array(x.inputs), np.array(y.inputs))
    assert len(data.fixed_batches(ds, 4, -1)) == 6


def test_demo_data_resolves(tokenizer):
    pytest.importorskip("mesp_mlx.demo")
    from mesp_mlx import demo
    try:
        path = demo.data_path("task")
    except FileNotFoundError:
        pytest.skip("demo data not generated in this tree")
    splits = data.load_splits("demo", tokenizer, 256)
    assert len(splits["train"]) == len(data.read_jsonl(f"{path}/train.jsonl")[0])


# ---------------------------------------------------------------- malformed data

def test_non_utf8_byte_names_file_and_line(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not valid UTF-8 \(byte 0xe9"):
        data.read_jsonl(f)


@pytest.mark.parametrize("msg,expect", [
    ({"role": "robot", "content": "beep"}, r":1: message 2 has role 'robot'; roles are system"),
    ({"role": 3, "content": "x"}, r":1: message 2 has role 3"),
    ({"role": "assistant", "content": {"a": 1}}, r":1: message 2's content must be a string"),
])
def test_chat_roles_and_contents_are_checked(tmp_path, msg, expect):
    f = write_jsonl(tmp_path / "train.jsonl",
                    [{"messages": [{"role": "user", "content": "hi"}, msg]}])
    with pytest.raises(DataError, match=str(f) + expect):
        data.read_jsonl(f)


def test_ids_beyond_the_model_vocabulary_name_file_and_line(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": sentence(3)}])
    ds = data.load_splits(str(tmp_path), tokenizer, 64)["train"]
    hi = max(ds.tokens[1])
    assert max(ds.tokens[0]) < hi                   # line 1 fits, line 2 does not
    with pytest.raises(DataError, match=rf"train.jsonl:2: token id {hi} is outside the "
                                        rf"model's vocabulary \(size {hi}"):
        data.load_splits(str(tmp_path), tokenizer, 64, vocab_size=hi)
    assert data.load_splits(str(tmp_path), tokenizer, 64, vocab_size=hi + 1)["train"]


def test_read_splits_needs_no_tokenizer(text_data, tmp_path):
    raw = data.read_splits(str(text_data), need=("train", "test"))
    assert set(raw) == {"train", "valid", "test"} and raw["train"][1] == "text"
    with pytest.raises(DataError, match="not found"):
        data.read_splits(str(tmp_path / "missing"))


def test_packing_fills_rows_with_whole_examples():
    """Best-fit decreasing into rows of 8 positions; every example's inputs, targets
    and mask exactly as unpacked (make_batch), never a target of the next example,
    the padded tail one more segment with mask 0."""
    lens = [9, 2, 7, 3, 8, 2, 6, 4, 5]          # tokens (positions = n − 1)
    toks = [[100 * i + t for t in range(n)] for i, n in enumerate(lens)]
    ds = Dataset("x", toks, [0, 0, 3, 0, 0, 0, 2, 0, 0])
    rows = data.pack_rows(ds, 8)
    assert sorted(sum(rows, [])) == list(range(len(lens)))       # each example once
    assert all(sum(lens[i] - 1 for i in r) <= 8 for r in rows)
    assert len(rows) == 5                                        # 37 positions, ⌈37/8⌉
    b = data.make_packed_batch(ds, rows)
    seg, x, y, m = (np.array(a) for a in (b.segments, b.inputs, b.targets, b.mask))
    assert b.n_tokens == sum(n - 1 for n in lens) and b.n_targets == int(m.sum())
    for r, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            one = data.make_batch(ds, [i])
            n = lens[i] - 1
            np.testing.assert_array_equal(x[r, t:t + n], np.array(one.inputs)[0])
            np.testing.assert_array_equal(y[r, t:t + n], np.array(one.targets)[0])
            np.testing.assert_array_equal(m[r, t:t + n], np.array(one.mask)[0])
            assert (seg[r, t:t + n] == s).all() and y[r, t + n - 1] // 100 == i
            t += n
        assert (seg[r, t:] == len(row)).all() and not m[r, t:].any()
    assert (np.diff(seg, axis=1) >= 0).all()
    with pytest.raises(DataError, match="does not fit"):
        data.pack_rows(ds, 7)


def test_packed_batches_are_deterministic_and_cover_the_data():
    lens = [3, 5, 2, 9, 4, 6, 2, 7, 3, 3]
    ds = Dataset("x", [[1] * n for n in lens], [0] * len(lens))
    a = [next(data.iterate_batches(ds, 2, seed=1, start=k, pack=10)) for k in range(3)]
    it = data.iterate_batches(ds, 2, seed=1, pack=10)
    for got in a:
        want = next(it)
        assert np.array_equal(np.array(got.segments), np.array(want.segments))
        assert got.inputs.shape[1] <= 10
    fixed = data.fixed_batches(ds, 2, -1, pack=10)
    assert sum(b.n_tokens for b in fixed) == sum(n - 1 for n in lens)
    assert all(b.segments is None for b in data.fixed_batches(ds, 2, -1))
