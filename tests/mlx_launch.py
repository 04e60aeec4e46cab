"""Run `python -m mesp_mlx.lora` under `mlx.launch -n N --backend ring` on
loopback (127.0.0.1), as a user would, for the data-parallel tests."""

import contextlib
import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from mesp_mlx.lora import main

ROOT = Path(__file__).resolve().parents[1]
RANK_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
RANK_KILLED = re.compile(r"Node with rank (\d+) was killed")


def launcher():
    """The mlx.launch next to this Python (its venv), else on PATH, else None."""
    here = Path(sys.executable).parent / "mlx.launch"
    return str(here) if here.is_file() else shutil.which("mlx.launch")


def free_ports(n: int) -> int:
    """A base port p with p..p+n-1 free on 127.0.0.1 (the ring listens on one
    port per rank; other test runs on this machine may use the default 32323)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the ring backend")


def launch(args, cwd, n=2, prelude="", timeout=240):
    """(CompletedProcess, {rank: exit code}) of `mlx.launch -n n --backend ring
    -- python -m mesp_mlx.lora args`. prelude: Python run first in every rank
    (fault injection). mlx.launch itself exits 0 even when a rank fails, so the
    ranks' codes come from its "Node with rank r exited with code c" lines
    (none: every rank exited 0)."""
    argv = [str(a) for a in args]
    if prelude:
        code = (f"{prelude}\nimport runpy, sys\nsys.argv = ['mesp_mlx.lora'] + {argv!r}\n"
                "runpy.run_module('mesp_mlx.lora', run_name='__main__', alter_sys=True)")
        prog = [sys.executable, "-c", code]
    else:
        prog = [sys.executable, "-m", "mesp_mlx.lora", *argv]
    # MESP_MLX_BLAS=keep: a rank that re-ran itself with OpenBLAS (blas.py) would drop
    # the prelude that a fault-injection test runs before the CLI
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MESP_MLX_BLAS="keep",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")])))
    for k in ("MLX_HOSTFILE", "MLX_RANK", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE"):
        env.pop(k, None)
    cmd = [launcher(), "-n", str(n), "--backend", "ring", "--starting-port",
           str(free_ports(n)), "--", *prog]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    codes = {r: 0 for r in range(n)}
    codes.update({int(r): int(c) for r, c in RANK_EXIT.findall(proc.stderr)})
    codes.update({int(r): -15 for r in RANK_KILLED.findall(proc.stderr)})    # SIGTERM
    return proc, codes


TOL = 1e-5          # adapters of N ranks against one process: fp32 reassociation only


def one_process(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    assert rc == 0, err.getvalue()
    return out.getvalue()


def two_ranks(argv, cwd):
    proc, codes = launch(argv, cwd)
    assert codes == {0: 0, 1: 0}, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("distributed: 2 ranks (ring)"), proc.stdout[:500]
    return proc.stdout


def initial_adapters(model_dir, rank=4, scale=2.0, seed=3):
    import mlx_lm
    from mesp_mlx.train.adapters import adapter_weights
    from mesp_mlx.engine.lora_layers import apply_lora
    model, _ = mlx_lm.load(str(model_dir))
    mx.random.seed(seed)                      # as lora.run: seed, then apply_lora
    return adapter_weights(apply_lora(model, rank, scale))


def assert_same_adapters(got_dir, want_dir, init, update_tol=TOL, size_tol=TOL):
    """max |got - want| relative to the largest entry of the adapters (≤ size_tol)
    and to the largest change training made (the initial lora_a dominates the
    former, so the latter is the sharper test)."""
    got = mx.load(str(got_dir / "adapters.safetensors"))
    want = mx.load(str(want_dir / "adapters.safetensors"))
    assert got.keys() == want.keys()
    diff = max(mx.abs(got[k] - want[k]).max().item() for k in want)
    size = max(mx.abs(want[k]).max().item() for k in want)
    moved = max(mx.abs(want[k] - init[k]).max().item() for k in want)
    assert moved > 0
    print(f"max diff {diff:.3g}: {diff / size:.3g} of the adapters, "
          f"{diff / moved:.3g} of the update")
    assert diff <= size_tol * size and diff <= update_tol * moved, (diff, size, moved)
