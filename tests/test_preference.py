"""Preference tuning (DPO, ORPO): gradients equal autodiff of the objective written
out against the mlx-lm model (several families, 4-bit base, masked prompts, uneven
pair lengths, B > 1, mebp and mesp); signed token weights in the engine; the data
forms and their errors; the CLI end to end on the demo preference set.

Tolerance (fp32): per tensor max|got − ref| ≤ 1e-5·max|ref|, cosine ≥ 0.99999.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import write_jsonl
from mlx.utils import tree_flatten
from helpers import cli, make, randomize_norms

import mesp_mlx
import mesp_mlx.demo
from mesp_mlx.errors import ConfigError, DataError
from mesp_mlx.models.configs import TINY, build_model, tiny_config
from mesp_mlx.train import data, preference_data
from mesp_mlx.train.config import TrainConfig, load_yaml

V = 256


# ---------------------------------------------------------------- the reference

def pairs(B=2, T_c=9, T_r=6, seed=1):
    """(chosen, rejected): random ids; row b's prompt (mask 0) is its first 1 + b % 2
    positions, and odd rows end with 2 padding positions (mask 0)."""
    def side(T, key):
        k1, k2 = mx.random.split(key)
        x = mx.random.randint(0, V, (B, T), key=k1)
        y = mx.random.randint(0, V, (B, T), key=k2)
        m = mx.zeros((B, T))
        for b in range(B):
            m[b, 1 + b % 2:T - 2 * (b % 2)] = 1
        return x, y, m
    kc, kr = mx.random.split(mx.random.key(seed))
    return side(T_c, kc), side(T_r, kr)


def logp(model, side):
    x, y, m = side
    ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y)
    return -(ce * m).sum(axis=1)


def written_out(objective, model, base, chosen, rejected, beta):
    """(loss, grads): the objective as a formula of the mlx-lm model's log-probs,
    the reference being `base`, the same model without adapters."""
    n_c, n_r = chosen[2].sum(axis=1), rejected[2].sum(axis=1)
    ref_c, ref_r = logp(base, chosen), logp(base, rejected)

    def loss_fn(model):
        lc, lr = logp(model, chosen), logp(model, rejected)
        if objective == "dpo":
            z = beta * ((lc - ref_c) - (lr - ref_r))
            return -nn.log_sigmoid(z).mean()
        ac, ar = lc / n_c, lr / n_r
        odds = (ac - mx.log1p(-mx.exp(ac))) - (ar - mx.log1p(-mx.exp(ar)))
        return -ac.mean() - beta * nn.log_sigmoid(odds).mean()
    return nn.value_and_grad(model, loss_fn)(model)


def model_and_base(family="qwen2", quantize=None, cfg=None):
    model = make(cfg or {}, family=family, quantize=quantize)
    base = build_model(tiny_config(family, **(cfg or {})), quantize=quantize, seed=0)
    randomize_norms(base)
    return model, base


def assert_exact(got, ref, rtol=1e-5):
    """Per tensor: max err ≤ rtol · its max + 1e-6 · the model's max, cosine ≥ 0.99999."""
    g, r = dict(tree_flatten(got)), dict(tree_flatten(ref))
    assert g.keys() == r.keys() and r
    G = max(mx.abs(v.astype(mx.float32)).max().item() for v in r.values())
    for k in r:
        a, b = g[k].astype(mx.float32), r[k].astype(mx.float32)
        scale, err = mx.abs(b).max().item(), mx.abs(a - b).max().item()
        cos = (mx.sum(a * b) / (mx.linalg.norm(a.reshape(-1)) *
                                mx.linalg.norm(b.reshape(-1)))).item()
        msg = f"{k}: max err {err:.3g}, scale {scale:.3g}, cos {cos:.7f}"
        assert scale > 0 and err <= rtol * scale + 1e-6 * G and cos >= 0.99999, msg


CASES = {      # family, quantize, (B, T_chosen, T_rejected)
    "qwen2": ("qwen2", None, (2, 9, 6)),
    "llama-rejected-longer": ("llama", None, (3, 5, 11)),
    "gemma2-softcap": ("gemma2", None, (2, 8, 7)),
    "gemma3_text": ("gemma3_text", None, (2, 7, 9)),
    "granite-logit-scale": ("granite", None, (2, 6, 8)),
    "qwen2-4bit": ("qwen2", dict(group_size=32, bits=4), (2, 10, 7)),
}


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_the_written_out_objective(case, objective):
    family, quantize, (B, T_c, T_r) = CASES[case]
    model, base = model_and_base(family, quantize)
    chosen, rejected = pairs(B, T_c, T_r)
    loss_ref, g_ref = written_out(objective, model, base, chosen, rejected, 0.3)
    for method in ("mebp", "mesp"):
        loss, g = mesp_mlx.preference_value_and_grad(model, chosen, rejected, objective,
                                                     beta=0.3, method=method)
        assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item()), method
        assert_exact(g, g_ref)


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_dpo_mesp(family):
    model, base = model_and_base(family)
    chosen, rejected = pairs(2, 8, 7)
    _, g_ref = written_out("dpo", model, base, chosen, rejected, 0.3)
    _, g = mesp_mlx.preference_value_and_grad(model, chosen, rejected, "dpo", beta=0.3)
    assert_exact(g, g_ref)


def test_autodiff_method_and_a_given_reference():
    model, base = model_and_base()
    chosen, rejected = pairs(3, 8, 8)
    ref = (logp(base, chosen), logp(base, rejected))
    _, g_ref = written_out("dpo", model, base, chosen, rejected, 0.1)
    for method in ("autodiff", "mesp"):
        _, g = mesp_mlx.preference_value_and_grad(model, chosen, rejected, "dpo",
                                                  method=method, reference=ref)
        assert_exact(g, g_ref)


def test_dropout_masks_are_the_same_in_both_passes_of_a_side():
    model = make({}, dropout=0.3)
    chosen, rejected = pairs(2, 9, 6)
    res = {}
    for method in ("autodiff", "mesp", "mebp"):
        mx.random.seed(4)
        res[method] = mesp_mlx.preference_value_and_grad(model, chosen, rejected, "orpo",
                                                         method=method)
    for method in ("mesp", "mebp"):
        assert_exact(res[method][1], res["autodiff"][1])


def test_accumulated_halves_equal_the_whole_batch():
    """Pair-weighted accumulation is exact: (2·g(pairs 0-1) + 2·g(pairs 2-3)) / 4 =
    g(pairs 0-3), though each half pads to its own length."""
    model, _ = model_and_base()
    chosen, rejected = pairs(4, 10, 7)

    def rows(side, lo, hi):                   # the half, cut after its last target
        x, y, m = (a[lo:hi] for a in side)
        keep = max(i for i in range(x.shape[1]) if m[:, i].max().item() > 0) + 1
        return x[:, :keep], y[:, :keep], m[:, :keep]
    _, g_all = mesp_mlx.preference_value_and_grad(model, chosen, rejected, "dpo")
    halves = [mesp_mlx.preference_value_and_grad(model, rows(chosen, lo, lo + 2),
                                                 rows(rejected, lo, lo + 2), "dpo")[1]
              for lo in (0, 2)]
    from mesp_mlx.train.loop import Accumulator
    acc = Accumulator(2)
    for g in halves:
        acc.add(g, 2)
    mean = {k: v / acc.n for k, v in tree_flatten(acc.grads)}
    assert_exact(mean, dict(tree_flatten(g_all)))


def test_refusals():
    model, _ = model_and_base()
    chosen, rejected = pairs()
    with pytest.raises(ValueError, match="mezo"):
        mesp_mlx.preference_value_and_grad(model, chosen, rejected, method="mezo")
    with pytest.raises(ValueError, match="unknown preference objective 'kto'"):
        mesp_mlx.preference_value_and_grad(model, chosen, rejected, "kto")
    with pytest.raises(ValueError, match="orpo uses no reference"):
        mesp_mlx.preference_value_and_grad(model, chosen, rejected, "orpo",
                                           reference=(mx.zeros(2), mx.zeros(2)))
    x, y, m = rejected
    with pytest.raises(ValueError, match="rejected row 1 has no completion target"):
        mesp_mlx.preference_value_and_grad(model, chosen, (x, y, m * mx.array([[1], [0]])))
    with pytest.raises(ValueError, match="same pairs"):
        mesp_mlx.preference_value_and_grad(model, chosen, (x[:1], y[:1], m[:1]))


# ---------------------------------------------------------------- token weights

def test_signed_token_weights_equal_autodiff():
    """value_and_grad(weights=w): Σ w·CE, any sign, nothing normalised; as an array
    or as a function of the per-token CE."""
    model = make({})
    (x, y, m), _ = pairs(2, 9, 6)
    w = mx.random.normal(x.shape, key=mx.random.key(3)) * m

    def ref(model):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y)
        return (ce * w).sum()
    loss_ref, g_ref = nn.value_and_grad(model, ref)(model)
    for method in ("autodiff", "mebp", "mesp"):
        for given in (w, lambda ce: w * mx.ones_like(ce)):
            loss, g = mesp_mlx.value_and_grad(model, x, y, method=method, weights=given)
            assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
            assert_exact(g, g_ref)
    with pytest.raises(ValueError, match="mask or weights"):
        mesp_mlx.value_and_grad(model, x, y, m, weights=w)


# ---------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    import mlx_lm
    return mlx_lm.load(str(tiny_model_dir))[1]


def test_record_forms_mask_the_shared_prompt(tok):
    msgs = [{"role": "user", "content": "the cat sat"}]
    forms = [
        {"prompt": "the cat sat", "chosen": "on a mat", "rejected": "the dog ran"},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "on a mat"}],
         "rejected": {"messages": [{"role": "assistant", "content": "the dog ran"}]}},
        {"chosen": msgs + [{"role": "assistant", "content": "on a mat"}],
         "rejected": msgs + [{"role": "assistant", "content": "the dog ran"}]},
    ]
    got = [preference_data.tokenize_pairs([f], tok, 64) for f in forms]
    for ds in got:
        c, r = ds.chosen, ds.rejected
        assert c.offsets == r.offsets == got[0].chosen.offsets
        assert c.tokens == got[0].chosen.tokens and r.tokens == got[0].rejected.tokens
        off = c.offsets[0]
        assert c.tokens[0][:off] == r.tokens[0][:off]          # the prompt, masked
        assert tok.decode(c.tokens[0][off:]).startswith("on a mat")
    b = preference_data.make_pair_batch(got[0], [0])
    assert b.chosen.mask[0, :off - 1].sum().item() == 0
    assert b.chosen.mask[0, off - 1].item() == 1


@pytest.mark.parametrize("record,match", [
    ({"prompt": "a", "chosen": "b"}, r"train.jsonl:2: a preference record needs both "
                                     r"'chosen' and 'rejected'; this one has no 'rejected'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     r"train.jsonl:2: 'chosen' and 'rejected' do not share the prompt turns \(turn 1"),
    ({"chosen": "b", "rejected": "c"}, r"train.jsonl:2: .*needs a 'prompt'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, r"train.jsonl:2: 'chosen' must be"),
])
def test_bad_records_name_file_and_line(tmp_path, record, match):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    write_jsonl(tmp_path / "train.jsonl", [good, record])
    with pytest.raises(DataError, match=match):
        data.read_splits(str(tmp_path))


def test_empty_completion_after_truncation_names_file_and_line(tmp_path, tok):
    long = " ".join(["the cat sat on a mat"] * 8)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                           {"prompt": long, "chosen": "b", "rejected": "c"}])
    raw = data.read_splits(str(tmp_path))
    with pytest.raises(DataError, match=r"train.jsonl:2: the chosen completion is empty "
                                        r"after truncation to --max-seq-length 40"):
        preference_data.tokenize_splits(raw, tok, 40)


def test_modes_and_records_must_match(tmp_path, completion_data):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="--train-mode dpo or orpo"):
        preference_data.check_mode(data.read_splits(str(tmp_path)), "sft")
    with pytest.raises(DataError, match="--train-mode orpo trains on preference pairs"):
        preference_data.check_mode(data.read_splits(str(completion_data)), "orpo")


def test_config_modes_beta_and_mlx_lm_key(tmp_path):
    base = dict(model="m", data="d", train=True)
    with pytest.raises(ConfigError, match="--train-mode dpo needs an exact gradient"):
        TrainConfig(**base, train_mode="dpo", method="mezo").validate()
    with pytest.raises(ConfigError, match="--train-mode must be one of sft, dpo, orpo.*"
                                          "mlx-lm-lora"):
        TrainConfig(**base, train_mode="grpo").validate()
    with pytest.raises(ConfigError, match="--beta must be a finite number > 0"):
        TrainConfig(**base, train_mode="orpo", beta=0.0).validate()
    with pytest.raises(ConfigError, match="--pack does not apply"):
        TrainConfig(**base, train_mode="dpo", pack=True).validate()
    for mode, want in (("normal", "sft"), ("dpo", "dpo")):
        (tmp_path / "c.yaml").write_text(f"training_mode: {mode}\n")
        assert load_yaml(tmp_path / "c.yaml")["train_mode"] == want


# ---------------------------------------------------------------- the CLI

def _demo_dir():
    from mesp_mlx.demo import make_preference
    return str(make_preference.DATA_DIR)


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_cli_trains_saves_and_tests_the_demo_pairs(tmp_path, mode):
    out = tmp_path / "ad"
    rc, text, err = cli("--model", "demo", "--data", _demo_dir(), "--train", "--test",
                        "--train-mode", mode, "--iters", 3, "--batch-size", 4,
                        "--val-batches", 2, "--test-batches", 2, "--steps-per-eval", 3,
                        "--steps-per-report", 1, "--learning-rate", 1e-4, "--save-best",
                        "--adapter-path", out)
    assert rc == 0, err
    assert "Iter 3: train loss" in text and "reward acc" in text and "margin" in text
    assert "val reward acc" in text and "test reward acc" in text and "Test loss" in text
    if mode == "dpo":
        assert "Iter 1: val loss 0.693, val reward acc 0.000, val margin 0.000" in text
    for name in ("adapters.safetensors", "adapters_best.safetensors"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["train_mode"] == mode and cfg["lora_parameters"]["rank"] == 8
    import mlx_lm                                   # mlx-lm's own loader reads them
    mlx_lm.load(mesp_mlx.demo.model_path(), adapter_path=str(out))


def test_cli_resume_and_accumulation_replay_the_uninterrupted_run(tmp_path):
    common = ["--model", "demo", "--data", _demo_dir(), "--train", "--train-mode", "dpo",
              "--batch-size", "2", "--grad-accumulation-steps", "2", "--val-batches", "0",
              "--steps-per-report", "1", "--learning-rate", "1e-3", "--seed", "5"]
    rc, whole, err = cli(*common, "--iters", 4, "--adapter-path", tmp_path / "a")
    assert rc == 0, err
    rc, _, err = cli(*common, "--iters", 3, "--steps-per-save", 3,
                     "--adapter-path", tmp_path / "b")
    assert rc == 0, err
    rc, rest, err = cli(*common, "--iters", 4, "--adapter-path", tmp_path / "b",
                        "--resume-adapter-file", tmp_path / "b")
    assert rc == 0, err
    line = lambda t: [s for s in t.splitlines() if s.startswith("Iter 4: train loss")][0]
    assert line(rest).split(", lr")[0] == line(whole).split(", lr")[0]
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-6


def test_cli_refuses_mezo_and_sft_data(tmp_path, completion_data):
    rc, _, err = cli("--model", "demo", "--data", _demo_dir(), "--train", "--train-mode",
                     "dpo", "--method", "mezo")
    assert rc == 1 and "needs an exact gradient" in err
    rc, _, err = cli("--model", "demo", "--data", completion_data, "--train",
                     "--train-mode", "orpo", "--adapter-path", tmp_path / "x")
    assert rc == 1 and "train.jsonl: completions records" in err


def test_two_ranks_equal_one_process(tmp_path):
    """mlx.launch -n 2: each rank its pairs, gradients all-summed pair-weighted; the
    losses, reward figures and adapters equal one process's (DPO, accumulation)."""
    import re
    from mlx_launch import launcher
    from mlx_launch import assert_same_adapters, initial_adapters, one_process, two_ranks
    if launcher() is None:
        pytest.skip("mlx.launch not found")

    def argv(d):
        return ["--model", "demo", "--data", _demo_dir(), "--train", "--test",
                "--train-mode", "dpo", "--iters", 4, "--batch-size", 4,
                "--grad-accumulation-steps", 2, "--val-batches", 2, "--test-batches", 2,
                "--steps-per-eval", 2, "--steps-per-report", 1, "--optimizer", "sgd",
                "--learning-rate", 0.05, "--adapter-path", tmp_path / d]
    ref, out = one_process(argv("one")), two_ranks(argv("two"), tmp_path)
    for what in ("train loss", "val loss", "val reward acc", "val margin", "Test loss",
                 "test margin"):
        a, b = ([float(v) for v in re.findall(what + r" (-?\d+\.\d+)", t)]
                for t in (out, ref))
        assert len(a) == len(b) > 0, what
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1.5e-3, (what, a, b)
    # DPO's pair weights σ(−βΔ) come from the summed log-probabilities of each rank,
    # so the fp32 reassociation of the rank sums reaches the weights too (1.5e-4 of the
    # update measured over 4 steps)
    assert_same_adapters(tmp_path / "two", tmp_path / "one",
                         initial_adapters(mesp_mlx.demo.model_path(), 8, 20.0, 0),
                         update_tol=3e-4, size_tol=1e-4)


def test_demo_pairs_are_reproducible(tmp_path):
    from mesp_mlx.demo import make_preference
    make_preference.generate(tmp_path)
    for split in ("train", "valid", "test"):
        got = (tmp_path / f"{split}.jsonl").read_bytes()
        assert got == (make_preference.DATA_DIR / f"{split}.jsonl").read_bytes(), split
    held_out = {json.loads(line)["prompt"] for line in (tmp_path / "test.jsonl").open()}
    train = {json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").open()}
    assert held_out and not held_out & train


def test_first_sides_gradients_parked_on_disk(tmp_path):
    from mesp_mlx.engine.preference import preference_step
    model, _ = model_and_base()
    chosen, rejected = pairs(2, 9, 6)
    want = preference_step(model, chosen, rejected, "dpo").grads
    opts = mesp_mlx.EngineOptions(checkpoints="disk", checkpoint_dir=str(tmp_path))
    for kw in (dict(park_grads="disk", options=mesp_mlx.EngineOptions(
            checkpoint_dir=str(tmp_path))), dict(options=opts)):
        assert_exact(preference_step(model, chosen, rejected, "dpo", **kw).grads, want)
    assert list(tmp_path.iterdir()) == []               # the temporary files are gone


def test_docs_commands_run(tmp_path, monkeypatch):
    """docs/preference.md's Python block and its command (3 iterations, one
    validation and test batch) run as written."""
    import re
    import shlex
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "preference.md").read_text()
    code = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert len(code) == 1
    exec(code[0], {})
    line = next(l for l in text.splitlines() if l.startswith("python -m mesp_mlx.lora"))
    argv = shlex.split(line)[3:]
    for flag, value in (("--iters", 3), ("--val-batches", 1), ("--test-batches", 1),
                        ("--adapter-path", tmp_path / "ad")):
        argv[argv.index(flag) + 1] = str(value)
    monkeypatch.chdir(root)
    rc, out, err = cli(*argv)
    assert rc == 0, err
    assert "val reward acc" in out and "test reward acc" in out
