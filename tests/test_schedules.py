"""lr_schedule / --lr-schedule / --warmup: mlx-lm's mapping, without its
warmup off-by-one, restored on resume."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from mesp_mlx.train import lr_schedules as schedules
from mesp_mlx.errors import ConfigError
from mesp_mlx.train.config import resolve
from mesp_mlx.lora import build_parser


def lrs(lr, n):
    """The learning rate each of n optimizer updates uses."""
    opt, params, out = optim.SGD(learning_rate=lr), {"w": mx.zeros((1,))}, []
    for _ in range(n):       # the state holds the rate the last update used
        params = opt.apply_gradients({"w": mx.zeros((1,))}, params)
        out.append(opt.learning_rate.item() if isinstance(opt.learning_rate, mx.array)
                   else opt.learning_rate)
    return np.array(out)


SPEC = {"name": "cosine_decay", "warmup": 4, "warmup_init": 1e-7,
        "arguments": [1e-3, 10, 1e-6]}


def test_warmup_reaches_the_peak_once_then_decays():
    got = lrs(schedules.build(SPEC, 1.0, 100), 8)
    W, w0, peak = 4, 1e-7, 1e-3
    want_ramp = [w0 + k * (peak - w0) / W for k in range(W)]    # updates 1..W
    np.testing.assert_allclose(got[:W], want_ramp, rtol=1e-5)
    assert got[W] == pytest.approx(peak, rel=1e-6)               # update W+1: peak
    assert got[W + 1] < peak                                     # then it decays


def test_differs_from_mlx_lm_by_exactly_its_off_by_one():
    from mlx_lm.tuner.utils import build_schedule
    ours, theirs = lrs(schedules.build(SPEC, 1.0, 100), 12), lrs(build_schedule(SPEC), 13)
    assert theirs[4] == theirs[5] == pytest.approx(1e-3)         # mlx-lm: peak twice
    np.testing.assert_allclose(ours[:4], theirs[:4], rtol=1e-6)
    np.testing.assert_allclose(ours[4:], theirs[5:], rtol=1e-6)


def test_cli_lr_schedule_and_warmup():
    args = build_parser().parse_args(["--model", "m", "--data", "d", "--train",
                                      "--lr-schedule", "cosine_decay", "--warmup", "3",
                                      "--learning-rate", "1e-3", "--iters", "23",
                                      "--grad-accumulation-steps", "2"])
    cfg = resolve(vars(args)).validate()
    assert cfg.lr_schedule == {"name": "cosine_decay"} and cfg.warmup == 3
    from mesp_mlx.train.loop import _lr_schedule
    got = lrs(_lr_schedule(cfg), 12)        # 23 // 2 = 11 updates: 3 warmup, 8 decay
    assert got[0] == 0.0 and got[3] == pytest.approx(1e-3)
    assert got[11] == pytest.approx(0.0, abs=1e-9) and got[10] > 0


def test_warmup_alone_ramps_to_the_constant_rate():
    got = lrs(schedules.build(None, 2e-3, 50, warmup=2), 4)
    np.testing.assert_allclose(got, [0.0, 1e-3, 2e-3, 2e-3], rtol=1e-6)


@pytest.mark.parametrize("spec,match", [
    ({"name": "nope"}, "lr_schedule.name must be one of"),
    ({"name": "exponential_decay"}, "needs `arguments`"),
    ({"name": "cosine_decay", "steps": 3}, "unknown key"),
    ({"name": "cosine_decay", "arguments": ["x"]}, "list of numbers"),
    ({"name": "cosine_decay", "warmup": -1}, "warmup must be an integer >= 0"),
])
def test_bad_schedules_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        schedules.check(spec)


def test_mezo_refuses_a_schedule():
    with pytest.raises(ConfigError, match="mezo uses a constant"):
        resolve({"model": "m", "data": "d", "train": True, "method": "mezo",
                 "warmup": 3}).validate()
