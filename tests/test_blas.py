"""On Linux the command lines run with OpenBLAS when it is installed (re-running
themselves with it preloaded), and otherwise say how to install it."""

import os
import subprocess
import sys

import pytest

from mesp_mlx import blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _run(**env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "MESP_MLX_BLAS", blas._RERUN)}
    full.update(env)
    p = subprocess.run([sys.executable, "-m", "mesp_mlx.blas"], capture_output=True,
                       text=True, env=full, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


@linux
def test_a_command_runs_with_openblas_when_installed():
    out = _run()
    if blas.installed_openblas():
        assert "BLAS: optimised" in out and "note:" not in out
    else:
        assert "MLX's reference BLAS" in out and blas.INSTALL in out


@linux
def test_keep_leaves_the_process_alone():
    out = _run(MESP_MLX_BLAS="keep")
    assert "MLX's reference BLAS" in out and "note:" not in out


@linux
@pytest.mark.skipif(blas.installed_openblas() is None, reason="OpenBLAS not installed")
def test_detection_follows_the_preload():
    assert "BLAS: optimised" in _run(LD_PRELOAD=blas.installed_openblas(),
                                     MESP_MLX_BLAS="keep")
