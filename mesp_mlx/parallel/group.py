"""The process group of a data-parallel run: MLX's own engine, no transport here.

    world = init(timeout=600)        # under `mlx.launch -n 2 --backend ring -- ...`
    out = all_sum(world, buf, "iteration 3")        # fault flags ride along
    sums = sum_scalars(world, [loss_sum, n], "validation")

The backend is the one `mlx.launch` (or `mpirun`) set up, read off the
environment it exports; no such variable means one process (World() with
size 1, every helper a no-op). Faults, so that no rank waits forever:
  - a Python error on one rank inside `local()` is held and announced at the
    next collective, through one flag per rank appended to its buffer; every
    rank then raises (the failing one its own error);
  - a rank that dies closes its sockets: the others' collective raises and
    becomes a DistributedError;
  - a rank that hangs: each collective has a watchdog that ends this process
    with exit status 1 after `timeout` seconds (os._exit: the main thread is
    blocked inside MLX). Saves are atomic, so the last adapters stay intact.
"""

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional

import mlx.core as mx

from ..errors import ConfigError
from ..errors import DistributedError

DEFAULT_TIMEOUT = 600.0      # seconds a rank waits in one collective
# (backend, environment variables that its launcher exports), checked in order
BACKEND_ENV = (("jaccl", ("MLX_JACCL_COORDINATOR",)),
               ("nccl", ("NCCL_PORT",)),
               ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MLX_MPI_LIBNAME")),
               ("ring", ("MLX_HOSTFILE",)))


@dataclass
class World:
    group: object = None                    # mx.distributed.Group; None: one process
    backend: Optional[str] = None           # "ring", "mpi", "jaccl", "nccl"
    timeout: float = DEFAULT_TIMEOUT
    error: Optional[BaseException] = None   # this rank's failure, not yet announced

    @property
    def size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"distributed: {self.size} ranks ({self.backend}); each collective "
                f"times out after {self.timeout:.0f} s (--dist-timeout)")


_joined: Optional[World] = None             # the World of this process, once init'ed


def detect_backend(environ=None) -> Optional[str]:
    env = os.environ if environ is None else environ
    return next((name for name, keys in BACKEND_ENV if any(k in env for k in keys)), None)


def init(timeout: float = DEFAULT_TIMEOUT, environ=None) -> World:
    """Join the group that the launcher set up (World() when there is none)."""
    global _joined
    if not timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {timeout}")
    name = detect_backend(environ)
    if name is None:
        return World(timeout=timeout)
    world = World(backend=name, timeout=timeout)
    with watchdog(world, f"joining the {name} group", force=True):
        try:
            group = mx.distributed.init(strict=True, backend=name)
        except RuntimeError as e:
            raise DistributedError(f"could not join the {name} group set up by the "
                                   f"launcher: {e}") from None
    world.group = group if group.size() > 1 else None
    _joined = world
    return world


def where() -> str:
    """' (rank r of n)' in a data-parallel run, else '': for error messages."""
    w = _joined
    return f" (rank {w.rank} of {w.size})" if w is not None and w.size > 1 else ""


def local(world: World, fn: Callable, fallback: Callable):
    """fn(); in a multi-rank run an exception is held in world.error (announced
    at the next collective) and fallback() stands in for fn's result."""
    if world.size == 1:
        return fn()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - re-raised on this rank at the next collective
        world.error = e
        return fallback()


@contextmanager
def watchdog(world: World, what: str, force: bool = False):
    """End this process (exit 1, a message) if the block outlasts world.timeout."""
    if world.size == 1 and not force:
        yield
        return
    t = threading.Timer(world.timeout, _expire, (world, what))
    t.daemon = True
    t.start()
    try:
        yield
    finally:
        t.cancel()


def _expire(world: World, what: str):
    sys.stderr.write(f"error{where() or ''}: no reply from the other ranks within "
                     f"{world.timeout:.0f} s during {what}: a rank failed or hangs. "
                     "Stopping; the last saved adapters are intact (--dist-timeout "
                     "sets the limit)\n")
    sys.stderr.flush()
    os._exit(1)


def all_sum(world: World, buf: mx.array, what: str, stream=None) -> mx.array:
    """Σ over ranks of a 1-D buffer, with one fault flag per rank appended and
    checked; returns the summed buffer without the flags."""
    flags = mx.zeros((world.size,), buf.dtype)
    if world.error is not None:
        flags = flags.at[world.rank].add(1)
    with watchdog(world, what):
        try:
            out = mx.distributed.all_sum(mx.concatenate([buf, flags]), group=world.group,
                                         stream=stream)
            mx.eval(out)
        except RuntimeError as e:
            raise DistributedError(f"{what}: lost the connection to another rank ({e}); "
                                   "it failed or was stopped (see its message); the "
                                   "last saved adapters are intact") from None
    _check_flags(world, [i for i, f in enumerate(out[-world.size:].tolist()) if f > 0], what)
    return out[:-world.size]


def gather_rows(world: World, values: List[float], what: str) -> List[List[float]]:
    """Every rank's `values` (float64, exact: no arithmetic on the wire), in rank order."""
    row = mx.array([float(v) for v in values], mx.float64)
    n = len(values)
    flag = mx.array([1.0 if world.error is not None else 0.0], mx.float64)
    with watchdog(world, what):
        try:
            out = mx.distributed.all_gather(mx.concatenate([row, flag]), group=world.group,
                                            stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:
            raise DistributedError(f"{what}: lost the connection to another rank ({e}); "
                                   "it failed or was stopped (see its message)") from None
    rows = out.reshape(world.size, n + 1).tolist()
    _check_flags(world, [i for i, r in enumerate(rows) if r[n] > 0], what)
    return [r[:n] for r in rows]


def sum_scalars(world: World, values: List[float], what: str) -> List[float]:
    """Σ over ranks of a few floats, added in float64 in rank order (the same on
    every rank, and exact for counts)."""
    if world.size == 1:
        return [float(v) for v in values]
    rows = gather_rows(world, values, what)
    return [sum(r[j] for r in rows) for j in range(len(values))]


def max_scalars(world: World, values: List[float], what: str) -> List[float]:
    if world.size == 1:
        return [float(v) for v in values]
    rows = gather_rows(world, values, what)
    return [max(r[j] for r in rows) for j in range(len(values))]


def check_same(world: World, what: str, names: List[str], values: List[float]):
    """DistributedError unless every rank has rank 0's `values` (e.g. the data
    or the adapters each Mac loaded)."""
    if world.size == 1:
        return
    rows = gather_rows(world, values, what)
    for r, row in enumerate(rows[1:], 1):
        bad = [f"{k}: rank 0 {a!r}, rank {r} {b!r}"
               for k, a, b in zip(names, rows[0], row) if a != b]
        if bad:
            raise DistributedError(f"{what}: the ranks disagree ({'; '.join(bad)}); "
                                   "give every rank the same model, data, options and "
                                   "resume file")


def _check_flags(world: World, failed: List[int], what: str):
    if not failed:
        return
    if world.error is not None:
        err, world.error = world.error, None
        raise err
    names = ", ".join(str(r) for r in failed)
    raise DistributedError(f"rank {names} failed during {what} (its message is above); "
                           "every rank stops; the last saved adapters are intact")
