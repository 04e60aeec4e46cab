"""Where the block-input checkpoints live between the forward and the backward.

The schedule keeps one checkpoint per LoRA block, L × B × T × D × itemsize bytes:
at long T the largest thing it holds (Qwen2.5-0.5B fp32, T 8192: 704 MB).
  "memory": MLX arrays, as they come out of the forward.
  "disk":   one temporary file in a directory of the user's choice; each block
            input is written with pwrite at its own offset during the forward and
            read back with preadv into a fresh buffer in the backward, so memory
            stops growing with L. The file is sized up front (writes into a
            pre-sized file are much faster, and a full disk shows before the
            forward). Plain reads and writes, not a memory map: a map makes the
            whole file resident in the process, which is what the disk store is
            for avoiding (`python -m bench.probes.checkpoint_io` compares them).
            The file is removed on success, on
            error and on Ctrl-C (the schedule closes the store in a `finally`).
"""

import os
import shutil
import tempfile

import mlx.core as mx
import numpy as np
from ..errors import CheckpointSpaceError

KINDS = ("memory", "disk")


class MemoryCheckpoints:
    kind = "memory"

    def __init__(self):
        self._x = {}

    def put(self, i, x):
        self._x[i] = x

    def pop(self, i):
        return self._x.pop(i)

    def close(self):
        self._x.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DiskCheckpoints:
    """Checkpoints in one temporary file under `directory` (removed by close())."""
    kind = "disk"

    def __init__(self, directory, need_bytes: int = 0):
        directory = os.fspath(directory or tempfile.gettempdir())
        if not os.path.isdir(directory):
            raise CheckpointSpaceError(f"checkpoint directory {directory} does not exist "
                                       "(create it, or pick another with "
                                       "--offload-checkpoints DIR)")
        free = shutil.disk_usage(directory).free
        if need_bytes > free:
            raise CheckpointSpaceError(
                f"checkpoints need {need_bytes / 1e6:.0f} MB but {directory} has "
                f"{free / 1e6:.0f} MB free: free space or pick another directory "
                "(--offload-checkpoints DIR)")
        self.directory = directory
        fd, self.path = tempfile.mkstemp(prefix="mesp-checkpoints-", suffix=".bin",
                                         dir=directory)
        self._fd, self._end, self._where = fd, 0, {}
        self.bytes_written = 0
        if need_bytes:
            self._reserve(need_bytes)

    def _reserve(self, n):
        """Size the file up front: writes into a pre-sized file are much faster
        (bench.probes.checkpoint_io), and a full disk shows before the forward."""
        try:
            if hasattr(os, "posix_fallocate"):     # Linux; macOS has no fallocate
                os.posix_fallocate(self._fd, 0, n)
            else:
                os.ftruncate(self._fd, n)
        except OSError as e:
            self.close()
            raise CheckpointSpaceError(f"cannot reserve {n / 1e6:.0f} MB for checkpoints "
                                       f"in {self.directory}: {e.strerror}; free space or "
                                       "pick another directory (--offload-checkpoints DIR)"
                                       ) from e

    def put(self, i, x):
        mx.eval(x)
        raw = x.view(_BITS[x.dtype.size]) if x.dtype.size in _BITS else x
        buf = memoryview(mx.contiguous(raw))
        try:
            n = os.pwrite(self._fd, buf, self._end)
        except OSError as e:
            raise CheckpointSpaceError(f"cannot write checkpoints to {self.path}: "
                                       f"{e.strerror}; free space or pick another "
                                       "directory (--offload-checkpoints DIR)") from e
        if n != buf.nbytes:
            raise CheckpointSpaceError(f"short write to {self.path} ({n} of "
                                       f"{buf.nbytes} bytes): is the disk full?")
        self._where[i] = (self._end, x.shape, x.dtype)
        self._end += n
        self.bytes_written += n

    def pop(self, i):
        off, shape, dtype = self._where.pop(i)
        bits = _BITS.get(dtype.size)
        out = np.empty(int(np.prod(shape)), _NP[bits if bits is not None else dtype])
        n = os.preadv(self._fd, [out], off)
        if n != out.nbytes:
            raise CheckpointSpaceError(f"checkpoint file {self.path} was truncated "
                                       f"(read {n} of {out.nbytes} bytes)")
        x = mx.array(out).reshape(shape)
        return x.view(dtype) if bits is not None else x

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_BITS = {2: mx.uint16, 4: mx.uint32}          # numpy has no bfloat16: move raw bits
_NP = {mx.uint16: np.uint16, mx.uint32: np.uint32, mx.float16: np.float16}


def open_checkpoints(kind: str, directory=None, need_bytes: int = 0):
    """The store for EngineOptions.checkpoints ("memory" or "disk")."""
    if kind == "memory":
        return MemoryCheckpoints()
    if kind == "disk":
        return DiskCheckpoints(directory, need_bytes)
    raise ValueError(f"checkpoints must be one of {', '.join(KINDS)}, got {kind!r}")
