"""Learning-rate schedules from mlx-lm's `lr_schedule` mapping (or the CLI).

    lr_schedule: {name: cosine_decay, arguments: [1e-5, 1000, 1e-7],
                  warmup: 100, warmup_init: 1e-7}
    --lr-schedule cosine_decay --warmup 100        (arguments from the run)

`name` is any `mlx.optimizers.schedulers` function, `arguments` its positional
arguments. Like mlx-lm, a schedule counts optimizer updates (one per
--grad-accumulation-steps iterations) and is restored with the optimizer's step
on resume. Unlike mlx-lm, which joins the warmup at `warmup + 1` (the peak rate
is used twice and the decay starts one update late, ml-explore/mlx#2617), update
k ≤ W runs at warmup_init + (k-1)(peak - warmup_init)/W and update W+1 is the
schedule's step 0.
"""

import math
from typing import Callable, Optional, Union

from ..errors import ConfigError
KEYS = ("name", "arguments", "warmup", "warmup_init")
# schedules the CLI can build from --learning-rate and --iters alone
DEFAULT_ARGUMENTS = {
    "cosine_decay": lambda lr, n: [lr, n, 0.0],         # init, decay_steps, end
    "linear_schedule": lambda lr, n: [lr, 0.0, n],      # init, end, steps
}


def _error(msg):
    return ConfigError(msg)


def _number(v) -> bool:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return False
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(spec: Optional[dict], warmup: Optional[int] = None,
          warmup_init: Optional[float] = None) -> None:
    """ConfigError naming the key on a malformed lr_schedule / --warmup."""
    import mlx.optimizers as optim

    if warmup is not None and warmup < 0:
        raise _error(f"--warmup must be >= 0, got {warmup}")
    if warmup_init is not None and not _number(warmup_init):
        raise _error(f"--warmup-init must be a finite number, got {warmup_init!r}")
    if spec is None:
        return
    extra = sorted(str(k) for k in spec if k not in KEYS)
    if extra:
        raise _error(f"lr_schedule: unknown key(s) {', '.join(extra)}; known: "
                     f"{', '.join(KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not callable(getattr(optim.schedulers, name, None)) \
            or name.startswith("_") or name == "join_schedules":
        known = [n for n in dir(optim.schedulers) if not n.startswith("_")
                 and n not in ("join_schedules", "Callable", "List", "mx")
                 and callable(getattr(optim.schedulers, n))]
        raise _error(f"lr_schedule.name must be one of {', '.join(known)}, got {name!r}")
    args = spec.get("arguments")
    if args is None and name not in DEFAULT_ARGUMENTS:
        raise _error(f"lr_schedule {name} needs `arguments` (its positional "
                     f"arguments, e.g. [1e-5, 0.9] for exponential_decay); only "
                     f"{', '.join(DEFAULT_ARGUMENTS)} take them from --learning-rate "
                     "and --iters")
    if args is not None and (not isinstance(args, list) or not args
                             or not all(_number(a) for a in args)):
        raise _error(f"lr_schedule.arguments must be a non-empty list of numbers, "
                     f"got {args!r}")
    w = spec.get("warmup", 0)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise _error(f"lr_schedule.warmup must be an integer >= 0, got {w!r}")
    if "warmup_init" in spec and not _number(spec["warmup_init"]):
        raise _error(f"lr_schedule.warmup_init must be a number, got "
                     f"{spec['warmup_init']!r}")


def _num(v):
    return v if isinstance(v, (int, float)) else float(v)     # YAML 1.1: "1e-5" is a str


def build(spec: Optional[dict], learning_rate: float, updates: int,
          warmup: Optional[int] = None,
          warmup_init: Optional[float] = None) -> Union[float, Callable]:
    """The optimizer's learning_rate: a float, or a schedule of the update count.

    updates: the run's optimizer updates (iters // grad_accumulation_steps), used
    for the default arguments; warmup / warmup_init (CLI) override the mapping's.
    """
    import mlx.optimizers as optim

    check(spec, warmup, warmup_init)
    spec = dict(spec or {})
    W = warmup if warmup is not None else int(spec.get("warmup", 0))
    w0 = float(warmup_init if warmup_init is not None else spec.get("warmup_init", 0.0))
    if not spec.get("name"):
        if not W:
            return learning_rate
        main, peak = (lambda step: learning_rate), learning_rate   # warmup to constant
    else:
        args = spec.get("arguments")
        args = [_num(a) for a in args] if args is not None else \
            DEFAULT_ARGUMENTS[spec["name"]](learning_rate, max(updates - W, 1))
        try:
            main = getattr(optim.schedulers, spec["name"])(*args)
        except (TypeError, ValueError) as e:
            raise _error(f"lr_schedule {spec['name']}{tuple(args)}: {e}") from None
        peak = float(args[0])
    if not W:
        return main
    ramp = optim.schedulers.linear_schedule(w0, peak, W)
    return optim.schedulers.join_schedules([ramp, main], [W])

