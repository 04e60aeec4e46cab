"""The process group: backend detection, one-process no-ops, and faults under
`mlx.launch -n 2 --backend ring` (a failing rank and a hanging rank stop every
rank with a message; the last saved adapters stay intact)."""

import mlx.core as mx
import pytest
from conftest import sentence, write_jsonl
from mlx_launch import launch, launcher

from mesp_mlx.parallel import group as distributed
from mesp_mlx.errors import ConfigError
from mesp_mlx.parallel.group import World

needs_launch = pytest.mark.skipif(launcher() is None, reason="mlx.launch not found")

# rank 1's engine fails (or hangs) on its 2nd backward, i.e. at iteration 2
INJECT = """
import os, time
if os.environ.get("MLX_RANK") == "1":
    from mesp_mlx import engine
    _real, _calls = engine.value_and_grad, []
    def _faulty(*a, **k):
        _calls.append(1)
        if len(_calls) == 2:
            {action}
        return _real(*a, **k)
    engine.value_and_grad = _faulty
"""


def test_backend_is_read_off_the_launchers_environment():
    assert distributed.detect_backend({}) is None
    assert distributed.detect_backend({"MLX_HOSTFILE": "/tmp/h", "MLX_RANK": "0"}) == "ring"
    assert distributed.detect_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert distributed.detect_backend({"MLX_JACCL_COORDINATOR": "10.0.0.1:3232",
                                       "MLX_HOSTFILE": "x"}) == "jaccl"


def test_one_process_world_is_a_no_op():
    w = distributed.init(environ={})
    assert (w.size, w.rank, w.is_main, w.group) == (1, 0, True, None)
    assert distributed.sum_scalars(w, [1.5, 2], "x") == [1.5, 2.0]
    distributed.check_same(w, "x", ["a"], [1.0])
    with pytest.raises(ValueError, match="boom"):      # no holding without peers
        distributed.local(w, lambda: (_ for _ in ()).throw(ValueError("boom")), lambda: 0)
    with pytest.raises(ConfigError, match="--dist-timeout must be > 0"):
        distributed.init(timeout=0, environ={})
    assert distributed.where() == ""


def test_describe_names_world_backend_and_timeout():
    class Two(World):
        size = 2
    assert Two(backend="ring", timeout=30).describe().startswith(
        "distributed: 2 ranks (ring); each collective times out after 30 s")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_data")
    for split, n in (("train", 8), ("valid", 2)):
        write_jsonl(d / f"{split}.jsonl", [{"text": sentence(i, 6)} for i in range(n)])
    return d


def _args(model_dir, data_dir, ad, *extra):
    return ["--model", model_dir, "--data", data_dir, "--adapter-path", ad, "--train",
            "--iters", 4, "--batch-size", 2, "--max-seq-length", 64, "--rank", 2,
            "--steps-per-save", 1, "--steps-per-report", 1, "--val-batches", 0, *extra]


def _assert_iteration_1_adapters_intact(ad):
    import json
    meta = mx.load(str(ad / "adapters.safetensors"), return_metadata=True)[1]
    assert meta["step"] == "1"
    assert json.loads((ad / "state.json").read_text())["step"] == 1
    assert not [p for p in ad.iterdir() if ".tmp" in p.name]


@needs_launch
def test_a_failing_rank_stops_every_rank(tiny_model_dir, small_data, tmp_path):
    prelude = INJECT.format(action='raise RuntimeError("injected fault on rank 1")')
    proc, codes = launch(_args(tiny_model_dir, small_data, tmp_path / "ad"), tmp_path,
                         prelude=prelude)
    assert all(c != 0 for c in codes.values()), (codes, proc.stderr[-3000:])
    assert "injected fault on rank 1" in proc.stderr              # rank 1's own error
    assert "error (rank 0 of 2): rank 1 failed during iteration 2" in proc.stderr
    assert "Iter 2: train loss" not in proc.stdout                # no update after it
    _assert_iteration_1_adapters_intact(tmp_path / "ad")


@needs_launch
def test_a_hanging_rank_times_out(tiny_model_dir, small_data, tmp_path):
    prelude = INJECT.format(action="time.sleep(600)")
    proc, codes = launch(_args(tiny_model_dir, small_data, tmp_path / "ad",
                               "--dist-timeout", 5), tmp_path, prelude=prelude, timeout=180)
    assert all(c != 0 for c in codes.values()), (codes, proc.stderr[-3000:])
    assert ("error (rank 0 of 2): no reply from the other ranks within 5 s during "
            "iteration 2") in proc.stderr
    _assert_iteration_1_adapters_intact(tmp_path / "ad")
