"""Checkpoints on disk: same gradients as in memory, and the file never outlives a step."""

import errno
import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mesp_mlx
from mesp_mlx.engine import checkpoints, backprop as schedule
from mesp_mlx.engine.checkpoints import CheckpointSpaceError, DiskCheckpoints
from mesp_mlx.engine.plan import EngineOptions
from helpers import batch, make


def _disk(tmp_path, **kw):
    return EngineOptions(checkpoints="disk", checkpoint_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3", "lfm2", "gemma4_text"])
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_disk_checkpoints_identical_gradients(tmp_path, family, method):
    model = make({}, family=family)
    x, y, mask = batch(13)
    st_mem, st_disk = {}, {}
    loss_m, g_m = mesp_mlx.value_and_grad(model, x, y, mask, method=method, stats=st_mem)
    loss_d, g_d = mesp_mlx.value_and_grad(model, x, y, mask, method=method,
                                          options=_disk(tmp_path), stats=st_disk)
    assert loss_d.item() == loss_m.item()
    for (k, a), (_, b) in zip(tree_flatten(g_m), tree_flatten(g_d)):
        assert mx.array_equal(a, b).item(), k          # same ops, same order: bit-equal
    assert st_disk["checkpoints"] == "disk" and st_mem["checkpoints"] == "memory"
    assert st_disk["checkpoint_bytes"] == st_mem["checkpoint_bytes"] > 0
    assert os.listdir(tmp_path) == []                   # removed on success


def test_disk_checkpoints_bf16_roundtrip(tmp_path):
    store = DiskCheckpoints(tmp_path)
    try:
        for i, dt in enumerate((mx.bfloat16, mx.float16, mx.float32)):
            a = mx.random.normal((2, 5, 7)).astype(dt)
            store.put(i, a)
            b = store.pop(i)
            assert b.dtype == dt and mx.array_equal(a, b).item()
    finally:
        store.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_file_removed_on_error_and_ctrl_c(tmp_path, monkeypatch, exc):
    model = make({})
    x, y, mask = batch(9)
    seen = []

    def fail(*a, **k):
        seen.append(os.listdir(tmp_path))               # the file exists mid-step
        raise exc
    monkeypatch.setattr(schedule, "block_backward", fail)
    with pytest.raises(type(exc)):
        mesp_mlx.value_and_grad(model, x, y, mask, options=_disk(tmp_path))
    assert len(seen[0]) == 1 and seen[0][0].startswith("mesp-checkpoints-")
    assert os.listdir(tmp_path) == []


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    model = make({})
    x, y, mask = batch(9)

    def enospc(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoints.os, "pwrite", enospc)
    with pytest.raises(CheckpointSpaceError, match="No space left.*offload-checkpoints"):
        mesp_mlx.value_and_grad(model, x, y, mask, options=_disk(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    class Usage:
        free = 10
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda d: Usage)
    with pytest.raises(CheckpointSpaceError, match="need .* MB but .* free"):
        mesp_mlx.value_and_grad(model, x, y, mask, options=_disk(tmp_path))
    with pytest.raises(CheckpointSpaceError, match="does not exist"):
        mesp_mlx.value_and_grad(model, x, y, mask,
                                options=_disk(tmp_path / "missing"))
    with pytest.raises(ValueError, match="memory, disk"):
        mesp_mlx.value_and_grad(model, x, y, mask, options=EngineOptions(checkpoints="ssd"))


def test_truncated_file_is_a_clear_error(tmp_path):
    store = DiskCheckpoints(tmp_path)
    try:
        store.put(0, mx.ones((4, 8)))
        os.truncate(store.path, 16)
        with pytest.raises(CheckpointSpaceError, match="truncated"):
            store.pop(0)
    finally:
        store.close()
