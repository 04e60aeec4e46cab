"""A safetensors reader that reads byte ranges: whole tensors, row ranges, row sets.

Format: 8 bytes little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data,
which starts at 8 + n), then the raw little-endian tensor bytes, row-major.
`mx.load` is lazy but reads a whole tensor when evaluated; streaming needs a
vocabulary tile of the head or the batch's embedding rows, so we read ranges
ourselves, each the faster of the ways `python -m bench.probes.safetensors_read`
compares: a row range (head tile, block tensor) with one `os.preadv` into a numpy
buffer (rather than through np.memmap), a row set (embedding lookup) as one gather
from an `np.memmap` held for that read only (rather than a pread per row). Either way the bytes
are copied into an ordinary MLX array: on Metal an mmap-backed array would be
wired on first GPU use, and no file pages stay mapped after the read.
A file that is truncated, or changes while it is open, raises WeightsFileError.
"""

import json
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
from ..errors import WeightsFileError

# safetensors dtype -> (numpy dtype of the raw bytes, MLX dtype viewed from it)
_DTYPES = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16),
           "BF16": (np.uint16, mx.bfloat16), "F64": (np.float64, mx.float64),
           "U32": (np.uint32, mx.uint32), "I32": (np.int32, mx.int32),
           "U16": (np.uint16, mx.uint16), "I16": (np.int16, mx.int16),
           "U8": (np.uint8, mx.uint8), "I8": (np.int8, mx.int8),
           "I64": (np.int64, mx.int64), "U64": (np.uint64, mx.uint64),
           "BOOL": (np.bool_, mx.bool_)}


class SafetensorsFile:
    """One open .safetensors file; `entries[name] = (dtype, shape, begin, end)` with
    absolute byte offsets. Every read checks that the file is still the one opened."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise WeightsFileError(f"cannot open weights file {self.path}: "
                                   f"{e.strerror}") from None
        st = os.fstat(self._fd)
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        self.entries = self._header(st.st_size)
        self.bytes_read = 0

    def _header(self, size):
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._truncated(f"{size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise self._truncated(f"header of {n} bytes but the file has {size}")
        try:
            meta = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{self.path} is not a safetensors file ({e})") from None
        entries = {}
        for name, e in meta.items():
            if name == "__metadata__":
                continue
            if e["dtype"] not in _DTYPES:
                raise WeightsFileError(f"{self.path}: tensor {name} has dtype "
                                       f"{e['dtype']}, which the reader does not know")
            b0, b1 = e["data_offsets"]
            entries[name] = (e["dtype"], tuple(e["shape"]), 8 + n + b0, 8 + n + b1)
        end = max((e[3] for e in entries.values()), default=8 + n)
        if end > size:
            raise self._truncated(f"its tensors need {end} bytes but it has {size}")
        return entries

    def _truncated(self, why):
        return WeightsFileError(f"weights file {self.path} is truncated ({why}): "
                                "copy or convert the model again")

    def check(self):
        """Raise WeightsFileError if the file was replaced, resized or rewritten."""
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns, st.st_ino) != self._stamp:
            raise WeightsFileError(
                f"weights file {self.path} changed while training (it was "
                f"{'removed' if st is None else 'rewritten, replaced or resized'}); "
                "streamed weights must stay as they were when the model was loaded")

    def _map(self, name) -> np.ndarray:
        """The tensor as a read-only np.memmap (unmapped when the last view goes)."""
        self.check()                   # a shrunken file would SIGBUS inside the copy
        dt, shape, b0, b1 = self.entries[name]
        try:
            return np.memmap(self.path, _DTYPES[dt][0], "r", offset=b0, shape=shape)
        except (ValueError, OSError) as e:
            raise self._truncated(f"tensor {name} ends at byte {b1}: {e}") from None

    def shape(self, name):
        return self.entries[name][1]

    def read(self, name, r0=None, r1=None) -> mx.array:
        """The tensor, or its rows [r0, r1) along the first axis: one pread."""
        self.check()                   # one stat: a rewrite of the same size shows too
        dt, shape, b0, _ = self.entries[name]
        npdt = _DTYPES[dt][0]
        r0, r1 = (0, shape[0]) if r0 is None else (r0, r1)
        out = np.empty((r1 - r0, *shape[1:]) if shape else (), npdt)
        row = out[0].nbytes if out.ndim and len(out) else 0
        if out.nbytes:
            n = os.preadv(self._fd, [out.reshape(-1).view(np.uint8)], b0 + r0 * row)
            if n != out.nbytes:
                self.check()
                raise self._truncated(f"read {n} of {out.nbytes} bytes of {name}")
        return self._copy(out, name)

    def read_rows(self, name, ids: np.ndarray) -> mx.array:
        """Rows `ids` (int array) along the first axis: one gather from the map."""
        return self._copy(self._map(name)[ids], name)

    def _copy(self, part: np.ndarray, name) -> mx.array:
        """An ordinary MLX array (a copy) of the mapped bytes (bf16 travels as uint16)."""
        x = mx.array(np.ascontiguousarray(part))
        self.bytes_read += part.nbytes
        want = _DTYPES[self.entries[name][0]][1]
        return x.view(want) if x.dtype != want else x

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class WeightFiles:
    """The safetensors files of a model directory (one file, or an index of shards):
    tensor name -> its file."""

    def __init__(self, model_dir):
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            names = sorted(p.name for p in d.glob("*.safetensors")
                           if not p.name.startswith("adapters"))
        if not names:
            raise WeightsFileError(f"no .safetensors weights in {d}")
        self.files = [SafetensorsFile(d / n) for n in names]
        self.where = {k: f for f in self.files for k in f.entries}

    def __contains__(self, name):
        return name in self.where

    def file(self, name) -> SafetensorsFile:
        return self.where[name]

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)

    def total_bytes(self, names=None) -> int:
        names = self.where if names is None else names
        return sum(self.where[k].entries[k][3] - self.where[k].entries[k][2] for k in names)

    def close(self):
        for f in self.files:
            f.close()
