"""A fast BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel links a reference BLAS; its matmuls run an order of magnitude
faster with OpenBLAS preloaded in its place (`python -m bench.pareto` runs that way).
The command lines (`python -m mesp_mlx.lora`, `python -m mesp_mlx.memory`) call
`ensure_fast` first: when OpenBLAS is installed but not loaded, the command runs
itself again once with it preloaded; when it is not installed, one note says how to
install it. MESP_MLX_BLAS=keep leaves the process as it is. macOS (Accelerate) and
Metal need nothing. Library code never does this: only the command lines re-run.
"""

import os
import sys
from typing import Optional

OPENBLAS = ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
            "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
            "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
INSTALL = "sudo apt-get install libopenblas0-pthread"
_RERUN = "_MESP_MLX_BLAS_RERUN"


def fast_blas_loaded() -> bool:
    """True when an optimised BLAS (OpenBLAS, MKL, BLIS) is mapped into this process
    as a system library (numpy's private, symbol-suffixed OpenBLAS serves only numpy)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1].lower() for line in f if "/" in line}
    except OSError:
        return False
    return any(name in p for p in paths if "numpy.libs" not in p and "scipy_openblas" not in p
               for name in ("openblas", "libmkl", "libblis"))


def installed_openblas() -> Optional[str]:
    return next((p for p in OPENBLAS if os.path.exists(p)), None)


def ensure_fast(module: str, argv: list) -> None:
    """Re-run `python -m module argv` with OpenBLAS preloaded, or note how to get it."""
    if not sys.platform.startswith("linux") or os.environ.get("MESP_MLX_BLAS") == "keep":
        return
    if fast_blas_loaded():
        return
    lib = installed_openblas()
    if lib is not None and os.environ.get(_RERUN) != "1":
        preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
        env = dict(os.environ, LD_PRELOAD=preload, **{_RERUN: "1"})
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
    if lib is None:
        print(f"note: MLX's CPU backend here uses a slow reference BLAS; `{INSTALL}` makes "
              "its matmuls about ten times faster, and this command then uses it by "
              "itself (MESP_MLX_BLAS=keep silences this note)", file=sys.stderr)


if __name__ == "__main__":          # python -m mesp_mlx.blas: which BLAS a command gets
    ensure_fast("mesp_mlx.blas", sys.argv[1:])
    import mlx.core as mx

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
    print("BLAS: " + ("optimised (OpenBLAS, MKL or BLIS)" if fast_blas_loaded() else
                      "MLX's reference BLAS"))
