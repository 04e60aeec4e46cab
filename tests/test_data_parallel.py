"""2 ranks (`mlx.launch -n 2 --backend ring`, loopback) train exactly like one
process with the same global batch: mesp with and without gradient
accumulation (and resume), MeZO; the indivisible batch; rank 0 alone writes."""

import re

import pytest
from conftest import sentence, write_jsonl
from mlx_launch import (assert_same_adapters, initial_adapters, launch, launcher, one_process,
                        two_ranks)

from mesp_mlx.train import data
from mesp_mlx.parallel import data_parallel
from mesp_mlx.parallel.group import World

pytestmark = pytest.mark.skipif(launcher() is None, reason="mlx.launch not found")


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Prompt/completion pairs of about the same length whose completions (the
    targets under --mask-prompt) differ: the ranks' target counts differ, so a
    mean of per-rank means would not match one process."""
    d = tmp_path_factory.mktemp("uneven_data")
    for split, n, off in (("train", 16, 0), ("valid", 6, 100), ("test", 6, 200)):
        recs = []
        for i in range(n):
            k = (i * 3) % 8
            recs.append({"prompt": sentence(off + i, 2 + k),
                         "completion": sentence(off + i + 50, 10 - k)})
        write_jsonl(d / f"{split}.jsonl", recs)
    return d


def args(model_dir, data_dir, adapter_dir, *extra):
    return ["--model", model_dir, "--data", data_dir, "--adapter-path", adapter_dir,
            "--train", "--mask-prompt", "--batch-size", 4, "--max-seq-length", 128,
            "--rank", 4, "--scale", 2.0, "--optimizer", "sgd", "--learning-rate", 0.05,
            "--steps-per-report", 1, "--steps-per-eval", 2, "--val-batches", 2,
            "--seed", 3, *extra]


def numbers(text, what):
    return [float(v) for v in re.findall(what + r" ([\d.]+)", text)]


def test_the_data_gives_the_ranks_different_target_counts(tiny_model_dir, uneven_data):
    import mlx_lm
    _, tok = mlx_lm.load(str(tiny_model_dir))
    ds = data.load_splits(str(uneven_data), tok, 128, mask_prompt=True)["train"]
    it = data.iterate_batches(ds, 4, seed=3)
    counts = [[int(b.mask[:2].sum().item()), int(b.mask[2:].sum().item())]
              for b in (next(it) for _ in range(4))]
    assert any(a != b for a, b in counts), counts


def test_mesp_two_ranks_equal_one_process(tiny_model_dir, uneven_data, tmp_path):
    extra = ("--method", "mesp", "--iters", 4, "--steps-per-save", 2, "--test",
             "--test-batches", -1)
    ref = one_process(args(tiny_model_dir, uneven_data, tmp_path / "one", *extra))
    out = two_ranks(args(tiny_model_dir, uneven_data, tmp_path / "two", *extra,
                         "--memory-log", tmp_path / "mem.jsonl"), tmp_path)
    for what in ("train loss", "val loss", "Test loss"):
        a, b = numbers(out, what), numbers(ref, what)
        assert len(a) == len(b) > 0, what            # printed once: by rank 0 alone
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1.5e-3, (what, a, b)
    assert_same_adapters(tmp_path / "two", tmp_path / "one", initial_adapters(tiny_model_dir))
    assert "max over 2 ranks: peak" in out and "sequences per rank" in out
    # rank 0 alone writes: the memory log (opened for appending) has one line per step
    assert len((tmp_path / "mem.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())


def test_accumulation_and_resume_two_ranks_equal_one_process(tiny_model_dir, uneven_data,
                                                             tmp_path):
    common = ("--method", "mesp", "--grad-accumulation-steps", 2)
    one_process(args(tiny_model_dir, uneven_data, tmp_path / "one", *common, "--iters", 5))
    two_ranks(args(tiny_model_dir, uneven_data, tmp_path / "two", *common, "--iters", 3,
                   "--steps-per-save", 3), tmp_path)       # stops mid-accumulation
    assert '"accum_targets": 0' not in (tmp_path / "two" / "state.json").read_text()
    two_ranks(args(tiny_model_dir, uneven_data, tmp_path / "two", *common, "--iters", 5,
                   "--resume-adapter-file", tmp_path / "two"), tmp_path)
    assert_same_adapters(tmp_path / "two", tmp_path / "one", initial_adapters(tiny_model_dir))


def test_mezo_two_ranks_equal_one_process(tiny_model_dir, uneven_data, tmp_path):
    extra = ("--method", "mezo", "--iters", 4, "--learning-rate", 1e-3, "--dropout", 0.1)
    ref = one_process(args(tiny_model_dir, uneven_data, tmp_path / "one", *extra))
    out = two_ranks(args(tiny_model_dir, uneven_data, tmp_path / "two", *extra), tmp_path)
    assert "3 scalars (L+, L-, targets) exchanged per step" in out
    a, b = numbers(out, "train loss"), numbers(ref, "train loss")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1.5e-3
    # p = (L+ - L-)/(2 eps) knows the fp32 losses to an ulp: even one process's p
    # is only good to ~ulp(L)/(2 eps |p|) ≈ 1e-5 at eps 1e-2 (measured: a split
    # batch moves p by 3e-6 to 1.5e-5), hence 1e-4 of the update here
    assert_same_adapters(tmp_path / "two", tmp_path / "one", initial_adapters(tiny_model_dir),
                         update_tol=1e-4)


def test_indivisible_global_batch_is_a_clear_error(tiny_model_dir, uneven_data, tmp_path):
    proc, codes = launch(args(tiny_model_dir, uneven_data, tmp_path / "ad", "--iters", 2,
                              "--batch-size", 3), tmp_path)
    assert all(c != 0 for c in codes.values()), (codes, proc.stderr[-2000:])
    assert "--batch-size 3 does not split over 2 ranks" in proc.stderr
    assert "use a multiple of 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ad").exists()


def test_check_batch_size_and_rank_options_in_process():
    from mesp_mlx.errors import ConfigError
    from mesp_mlx.train.config import TrainConfig

    data_parallel.check_batch_size(World(), 3)                     # one process: any B
    cfg = TrainConfig(adapter_path="ad", memory_log="m.jsonl")
    assert data_parallel.rank_options(World(), cfg) is cfg

    class Two(World):                    # rank 1 of 2, no group needed for these
        size, rank = 2, 1
    with pytest.raises(ConfigError, match="does not split over 2 ranks"):
        data_parallel.check_batch_size(Two(), 5)
    mine = data_parallel.rank_options(Two(), cfg)
    assert mine.adapter_path is None and mine.memory_log is None and cfg.adapter_path == "ad"
