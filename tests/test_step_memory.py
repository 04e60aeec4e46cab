"""The memory a run promises holds at every step, not only the first: nothing of one
step (gradients, accumulated sums, MeZO directions, evaluation tensors) stays alive
into the next. Each path of the CLI runs several steps with --memory-log; every
step's MLX peak is held to the peak of the same phase in the first cycle."""

import json

import pytest
from conftest import make_model_dir, sentence, write_jsonl
from helpers import base, cli

# allocator noise: a few small buffers (seen up to 12 KB between MeZO steps, which
# keep nothing); the LoRA gradients of this model are 35 KB in bf16 and 70 KB in fp32,
# so a step that kept them exceeds it (test_the_test_can_fail)
NOISE = 16 << 10


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("q4_steps"), "qwen2",
                          quantize={"group_size": 32, "bits": 4}, hidden_size=128,
                          intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2)


@pytest.fixture(scope="module")
def even_data(tmp_path_factory):
    """One example repeated, so every step does the same work on the same shapes."""
    d = tmp_path_factory.mktemp("even_data")
    for split, n in (("train", 24), ("valid", 4)):
        write_jsonl(d / f"{split}.jsonl", [{"text": sentence(3, 10)}] * n)
    return d


def _peaks(tmp_path, model_dir, data_dir, *extra):
    log = tmp_path / "mem.jsonl"
    rc, out, err = cli(*base(model_dir, data_dir, tmp_path / "ad", "--train", "--iters", 6,
                             "--memory-log", log, "--steps-per-report", 1, *extra))
    assert rc == 0, err
    return [json.loads(x)["mlx_peak"] for x in log.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("name,extra,cycle", [
    ("paper setting", ("--stream-weights", "--lora-dtype", "bfloat16", "--optimizer", "sgd",
                       "--batch-size", 1), 1),
    ("adam, resident", ("--optimizer", "adam"), 1),
    ("accumulation", ("--grad-accumulation-steps", 2), 2),
    ("mezo", ("--method", "mezo", "--optimizer", "sgd"), 1),
    ("validation and saves every step", ("--steps-per-eval", 1, "--steps-per-save", 1), 1),
])
def test_no_later_step_peaks_above_the_first(q4_model, even_data, tmp_path, name, extra,
                                             cycle):
    peaks = _peaks(tmp_path, q4_model, even_data, "--activation-plan", "minimal", *extra)
    assert len(peaks) == 6
    first = peaks[:cycle]
    for i, p in enumerate(peaks[cycle:], start=cycle):
        assert p <= first[i % cycle] + NOISE, (name, i + 1, peaks)


def test_the_test_can_fail(q4_model, even_data, tmp_path, monkeypatch):
    """Keeping the last gradients alive across steps (what the loop must not do) is
    caught: the later steps then peak above the first by more than NOISE."""
    from mesp_mlx.train import loop

    kept = []
    real = loop.Accumulator.apply

    def apply_and_keep(self, optimizer, model):
        kept[:] = [self.grads]
        real(self, optimizer, model)

    monkeypatch.setattr(loop.Accumulator, "apply", apply_and_keep)
    peaks = _peaks(tmp_path, q4_model, even_data, "--activation-plan", "minimal",
                   "--optimizer", "sgd")
    assert max(peaks[1:]) > peaks[0] + NOISE, peaks
