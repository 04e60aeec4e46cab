"""Shared fixtures: a tiny Qwen2 model directory that `mlx_lm.load` reads
(config.json + model.safetensors + a BPE tokenizer with a chat template) and
tiny jsonl data directories in mlx-lm's three formats."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang "
         "one two three four five six seven eight nine ten red green blue").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                 "<|im_start|>assistant\n{% endif %}")


def sentence(i: int, n: int = 8) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sentence(i, 12) for i in range(200)] +
                            ["user assistant system\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return len(tok.get_vocab()), fast.eos_token_id


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory with a 2-block fp32 Qwen2 model (D 32) and its tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mesp_mlx.models.configs import build_model, tiny_config

    path = tmp_path_factory.mktemp("tiny_model")
    vocab, eos = _tokenizer(path)
    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, eos_token_id=eos)
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    model = build_model(cfg, seed=1)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def make_model_dir(path, family: str, quantize=None, **overrides):
    """A loadable model directory of any tiny family (mesp_mlx.models.configs.TINY): config.json,
    model.safetensors (random fp32 weights; quantized like mlx-lm with e.g.
    quantize={"group_size": 32, "bits": 4}) and a BPE tokenizer with a chat template."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mesp_mlx.models.configs import build_model, tiny_config

    path.mkdir(parents=True, exist_ok=True)
    vocab, eos = _tokenizer(path)
    cfg = tiny_config(family, vocab_size=vocab, eos_token_id=eos, **overrides)
    if "text_config" in cfg:                       # gemma3 wrapper: vocab on both levels
        cfg["vocab_size"] = vocab
    model = build_model(cfg, seed=1, quantize=quantize)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    if quantize:
        cfg["quantization"] = dict(quantize)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory):
    """family -> a cached model directory of that tiny family (make_model_dir)."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_model_dir(tmp_path_factory.mktemp(f"model_{family}"), family)
        return made[family]
    return get


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """train/valid/test.jsonl with {"text"} records of 6-16 words."""
    d = tmp_path_factory.mktemp("text_data")
    for split, n, off in (("train", 24, 0), ("valid", 8, 100), ("test", 8, 200)):
        write_jsonl(d / f"{split}.jsonl",
                    [{"text": sentence(off + i, 6 + (i * 5) % 11)} for i in range(n)])
    return d


@pytest.fixture(scope="session")
def completion_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("completion_data")
    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        write_jsonl(d / f"{split}.jsonl", [{"prompt": sentence(i, 5),
                                            "completion": sentence(i + 50, 3)}
                                           for i in range(n)])
    return d


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_data")
    for split, n in (("train", 8), ("valid", 4)):
        write_jsonl(d / f"{split}.jsonl", [{"messages": [
            {"role": "user", "content": sentence(i, 4)},
            {"role": "assistant", "content": sentence(i + 9, 3)}]} for i in range(n)])
    return d


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, text_data):
    """The tiny model's tokenized text splits."""
    import mlx_lm

    from mesp_mlx.train import data
    _, tok = mlx_lm.load(str(tiny_model_dir))
    splits = data.load_splits(str(text_data), tok, 128)
    return splits

