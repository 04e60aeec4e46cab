"""The bundled demo model and data: they load, parse, are reproducible, and train."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import mesp_mlx
from mesp_mlx import demo
from mesp_mlx.demo import make_data
from mesp_mlx.engine.step import masked_ce

SPLITS = ("train", "valid", "test")
KEYS = {"corpus": {"text"}, "task": {"prompt", "completion"}}


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    return load(demo.model_path())


def read(name, split):
    with open(Path(demo.data_path(name)) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def encode(tok, row):
    """(tokens, offset): chat-templated question + answer, offset = prompt length."""
    msgs = [{"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]}]
    full = tok.apply_chat_template(msgs, return_dict=False)
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False)
    assert full[:len(prompt)] == prompt, "prompt tokens must prefix the full sequence"
    return full, len(prompt)


def task_batch(tok, rows):
    """inputs, targets, mask [B, T]; mask keeps completion targets only."""
    enc = [encode(tok, r) for r in rows]
    T = max(len(f) for f, _ in enc) - 1
    x, y, m = (np.zeros((len(enc), T), np.int32) for _ in range(3))
    for i, (f, off) in enumerate(enc):
        x[i, :len(f) - 1], y[i, :len(f) - 1], m[i, off - 1:len(f) - 1] = f[:-1], f[1:], 1
    return mx.array(x), mx.array(y), mx.array(m)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_data_files_parse(name):
    for split in SPLITS:
        rows = read(name, split)
        assert rows, f"{name}/{split}.jsonl is empty"
        for i, r in enumerate(rows):
            assert set(r) == KEYS[name], f"{name}/{split}.jsonl line {i + 1}: keys {set(r)}"
            assert all(isinstance(v, str) and v for v in r.values()), f"line {i + 1}: {r}"


def test_task_splits_are_disjoint():
    prompts = {s: {r["prompt"] for r in read("task", s)} for s in SPLITS}
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["valid"] & prompts["test"]


def test_make_data_is_deterministic(tmp_path):
    make_data.generate(tmp_path)
    for name in KEYS:
        for split in SPLITS:
            new = (tmp_path / name / f"{split}.jsonl").read_bytes()
            old = (Path(demo.data_path(name)) / f"{split}.jsonl").read_bytes()
            assert new == old, f"{name}/{split}.jsonl differs from a fresh generation"


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown demo dataset"):
        demo.data_path("nope")


def test_model_loads_as_qwen2(loaded):
    model, tok = loaded
    config = json.loads((Path(demo.model_path()) / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    assert config["vocab_size"] == len(tok._tokenizer) == model.model.embed_tokens.weight.shape[0]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id in tok.eos_token_ids


def test_tokenizer_round_trips(loaded):
    from tokenizers import Tokenizer

    _, tok = loaded
    raw = Tokenizer.from_file(str(Path(demo.model_path()) / "tokenizer.json"))
    for text in [read("corpus", "test")[0]["text"], "Question: What is 3 plus 4?\nAnswer: 7",
                 "unseen wörds, digits 12345 and émojis 🙂"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # transformers may rebuild a qwen2 tokenizer's pre-tokenizer: same ids as trained
        assert ids == raw.encode(text).ids, f"mlx_lm.load tokenizes {text!r} differently"
    # corpus words are whole tokens: far fewer tokens than bytes (digits are one each)
    texts = [r["text"] for r in read("corpus", "valid")]
    n_tok = sum(len(tok.encode(t)) for t in texts)
    assert n_tok < sum(len(t.encode()) for t in texts) / 3


def test_pretrained_corpus_loss_well_below_uniform(loaded):
    model, tok = loaded
    ids = [t for r in read("corpus", "valid")[:40] for t in tok.encode(r["text"]) + [tok.eos_token_id]]
    n = (len(ids) - 1) // 128                   # windows of the pretraining length
    x = mx.array(ids[:n * 128]).reshape(n, 128)
    y = mx.array(ids[1:n * 128 + 1]).reshape(n, 128)
    loss = masked_ce(model(x), y, mx.ones(x.shape)).item()
    uniform = math.log(len(tok._tokenizer))
    assert loss < 0.3 * uniform, f"corpus loss {loss:.3f} vs uniform {uniform:.3f}"


def test_lora_steps_reduce_task_loss(loaded):
    from mlx_lm import load

    model, tok = load(demo.model_path())        # fresh copy: LoRA edits in place
    mx.random.seed(0)
    mesp_mlx.apply_lora(model, rank=8)
    x, y, m = task_batch(tok, read("task", "train")[:16])
    opt = optim.Adam(learning_rate=1e-3)
    losses = []
    for _ in range(8):
        loss, grads = mesp_mlx.value_and_grad(model, x, y, m, method="autodiff")
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], f"LoRA losses did not drop: {losses}"
