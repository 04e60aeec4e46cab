"""Rebuild the bundled demo model (`python -m mesp_mlx.demo.build`, 5-10 min on 2 CPU cores).

1. Byte-level BPE (`tokenizers`, at most VOCAB tokens, eos `<|endoftext|>`)
   trained on the corpus' train split; a one-line Question/Answer chat template.
2. A small Qwen2 (CONFIG: D 128, 4 layers, 4 heads / 2 kv heads, F 384, tied
   embeddings) pretrained from scratch, all parameters, AdamW, on the corpus
   packed into SEQ-token windows; fixed seeds, fixed step count. The log shows
   the share of facts it recalls (0.99 at the end).
3. config.json + model.safetensors (fp32) + tokenizer files into model/.
The weights depend on the BLAS in use (run with OpenBLAS, as the command lines do).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..blas import ensure_fast
from . import data_path
from .make_data import DATA_DIR, chosen

MODEL_DIR = Path(__file__).parent / "model"
SEED = 0
VOCAB = 1024
EOS = "<|endoftext|>"
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                 "{{ 'Answer: ' + m['content'] + '" + EOS + "' }}"
                 "{% elif m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\n' }}"
                 "{% else %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}")
CONFIG = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=4,
              intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=1024,
              rope_theta=10000.0, rope_traditional=False, rope_scaling=None,
              tie_word_embeddings=True)
SEQ, BATCH, STEPS, LR, WARMUP = 128, 8, 1000, 3e-3, 30


def read_texts(split):
    with open(Path(data_path("corpus")) / f"{split}.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(texts, out_dir):
    """Byte-level BPE saved as tokenizer.json + tokenizer_config.json (HF fast)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's normalizer and pre-tokenizer (digits split one by one): transformers 5
    # loads a model_type "qwen2" tokenizer as Qwen2Tokenizer, which imposes them.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand (not save_pretrained) so transformers 4.x and 5.x both read it.
    config = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=EOS, pad_token=EOS,
                  bos_token=None, add_bos_token=False, clean_up_tokenization_spaces=False,
                  model_max_length=CONFIG["max_position_embeddings"],
                  chat_template=CHAT_TEMPLATE)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(dict(eos_token=EOS, pad_token=EOS), indent=2) + "\n")
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


def pack(tokenizer, texts):
    """All documents as one token stream, each followed by eos; [N, SEQ + 1] windows."""
    ids = [t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_token_id]]
    n = (len(ids) - 1) // SEQ
    return np.array([ids[i * SEQ: i * SEQ + SEQ + 1] for i in range(n)], dtype=np.int32)


def loss_fn(model, batch):
    x, y = batch[:, :-1], batch[:, 1:]
    return nn.losses.cross_entropy(model(x), y).mean()


def evaluate(model, windows):
    return sum(loss_fn(model, mx.array(windows[i:i + 64])).item() * len(windows[i:i + 64])
               for i in range(0, len(windows), 64)) / len(windows)


def recall(model, tokenizer) -> float:
    """Share of the corpus' facts whose value the model predicts (teacher-forced)
    after the prefix of the fact's first statement ("The capital of Peru is")."""
    right = total = 0
    for fam in chosen().values():
        for _, value, statements, _ in fam:
            s = statements[0]
            cut = s.rfind(value)
            prefix, full = tokenizer.encode(s[:cut].rstrip()), tokenizer.encode(s[:cut] + value)
            logits = model(mx.array([full[:-1]]))[0, len(prefix) - 1:]   # [value tokens, V]
            right += mx.argmax(logits, axis=-1).tolist() == full[len(prefix):]
            total += 1
    return right / total


def pretrain(tokenizer, steps=STEPS, log_every=50):
    """Full-parameter AdamW pretraining from a fixed seed; returns the model."""
    from mlx_lm.models import qwen2

    mx.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(dict(CONFIG, vocab_size=len(tokenizer))))
    train, valid = pack(tokenizer, read_texts("train")), pack(tokenizer, read_texts("valid"))
    warmup = min(WARMUP, steps // 2)
    sched = optim.join_schedules([optim.linear_schedule(0.0, LR, warmup),
                                  optim.cosine_decay(LR, steps - warmup, LR * 0.05)], [warmup])
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)
    state = [model.state, opt.state]

    def step(batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, batch)
        opt.update(model, optim.clip_grad_norm(grads, 1.0)[0])
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    print(f"{train.shape[0]} train windows of {SEQ} tokens, vocab {len(tokenizer)}, "
          f"uniform loss {math.log(len(tokenizer)):.3f}")
    t0 = time.time()
    for it in range(1, steps + 1):
        loss = step(mx.array(train[rng.integers(0, len(train), BATCH)]))
        mx.eval(state, loss)
        if it % log_every == 0 or it == steps:
            print(f"step {it:5d}  train {loss.item():.3f}  valid {evaluate(model, valid):.3f}"
                  f"  facts recalled {recall(model, tokenizer):.2f}"
                  f"  {time.time() - t0:.0f}s", flush=True)
    return model


def save(model, tokenizer, out_dir):
    out_dir = Path(out_dir)
    config = dict(CONFIG, vocab_size=len(tokenizer))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(out_dir / "model.safetensors"),
                        dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default=str(MODEL_DIR))
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not (DATA_DIR / "corpus" / "train.jsonl").exists():
        from .make_data import generate
        generate()
    tokenizer = train_tokenizer(read_texts("train"), args.out)
    model = pretrain(tokenizer, args.steps)
    save(model, tokenizer, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    ensure_fast("mesp_mlx.demo.build", sys.argv[1:])
    main()
