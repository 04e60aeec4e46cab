"""--save-best and --early-stop-patience: the pick, the stop, atomic files,
and a stopped-and-resumed run deciding exactly as an uninterrupted one."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import lora_model, train_cfg

from mesp_mlx.train import early_stop as best, loop as trainer
from mesp_mlx.errors import ConfigError

# lr 5e-2 makes the tiny model's validation loss go up and down (measured: 6.25,
# 4.84, 6.55, 5.06), so patience 2 stops the run early
RUN = dict(learning_rate=5e-2, steps_per_eval=1, steps_per_save=1, iters=12,
           save_best=True, early_stop_patience=2, seed=3)


def quiet(*_):
    pass


def test_tracker_counts_and_stops():
    t = best.Tracker(save_best=True, patience=2)
    assert [t.update(i, v) for i, v in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2], 1)] == \
        [True, True, False, True, False, False]
    assert t.stop and t.best == 1.0 and t.best_step == 4
    u = best.Tracker(patience=2)
    u.restore(t.meta())
    assert (u.best, u.best_step, u.since_best, u.stop) == (1.0, 4, 2, True)


def _run(model_dir, splits, path, **kw):
    return trainer.train(lora_model(model_dir), splits["train"], splits["valid"],
                         train_cfg(adapter_path=str(path), **{**RUN, **kw}), log=quiet)


def test_best_file_and_early_stop_survive_a_resume(tiny_model_dir, loaded, tmp_path):
    full = _run(tiny_model_dir, loaded, tmp_path / "full")
    assert full.stopped_early and full.step < RUN["iters"], full.val_losses
    b_step, b_loss = full.best
    counted = [v for i, v in full.val_losses if i > 0]
    assert b_loss == min(counted) and full.step - b_step >= 2
    got = mx.load(str(tmp_path / "full" / best.BEST))
    want = mx.load(str(tmp_path / "full" / f"{b_step:07d}_adapters.safetensors"))
    assert got.keys() == want.keys()
    assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)
    # interrupted, resumed: the same pick, the same stop (the counter is restored)
    cut = full.step - 1               # after the best, inside the patience window
    part = _run(tiny_model_dir, loaded, tmp_path / "part", iters=cut)
    assert not part.stopped_early
    resumed = _run(tiny_model_dir, loaded, tmp_path / "part",
                   resume_adapter_file=str(tmp_path / "part"))
    assert resumed.step == full.step and resumed.stopped_early and resumed.best == full.best
    np.testing.assert_array_equal(part.step_losses + resumed.step_losses, full.step_losses)
    again = mx.load(str(tmp_path / "part" / best.BEST))
    assert all(np.array_equal(np.array(again[k]), np.array(got[k])) for k in got)
    # resuming a run that already stopped does nothing more
    after = _run(tiny_model_dir, loaded, tmp_path / "part",
                 resume_adapter_file=str(tmp_path / "part"))
    assert after.stopped_early and after.step == full.step and not after.step_losses


def test_best_needs_validation_data(tiny_model_dir, loaded, tmp_path):
    with pytest.raises(ConfigError, match="need validation data"):
        trainer.train(lora_model(tiny_model_dir), loaded["train"], None,
                      train_cfg(save_best=True, adapter_path=str(tmp_path)), log=quiet)


def test_best_file_is_written_atomically(tiny_model_dir, monkeypatch, tmp_path):
    model = lora_model(tiny_model_dir)
    best.save(model, tmp_path, 1, 2.0)
    before = (tmp_path / best.BEST).read_bytes()

    def boom(path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        best.save(model, tmp_path, 2, 1.0)
    assert (tmp_path / best.BEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [best.BEST]
