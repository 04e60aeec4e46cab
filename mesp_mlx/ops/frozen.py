"""A frozen weight matrix W0: (d_out, d_in), dense or MLX-quantized.

Letters: T tokens (any leading dims), d_in, d_out.
  forward  y = x W0ᵀ         x: (..., d_in)  -> (..., d_out)
  backward dx = g W0         g: (..., d_out) -> (..., d_in)
W0 never receives a gradient. For a quantized W0 the weight is never dequantized
in full: on Metal both products are one `mx.quantized_matmul` on the packed weight
(transpose=True / False); on the CPU backend, where that kernel is ~10-100x slower
than a dense matmul, dequantized row tiles and a dense matmul (dequant_matmul.py).
`quantized_path()` says which one runs; `set_quantized_path` forces one (benchmarks).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .dequant_matmul import dequant_rows, gW_tiles, xWt_tiles
from .matmul import mm

PATHS = ("auto", "quantized_matmul", "dequant_tiles")
_PATH = ["auto"]


def set_quantized_path(path: str = "auto"):
    """Force the quantized products' kernel ("auto": by device, see quantized_path)."""
    if path not in PATHS:
        raise ValueError(f"quantized path must be one of {', '.join(PATHS)}, got {path!r}")
    _PATH[0] = path


def quantized_path() -> str:
    """The kernel quantized products use now: "quantized_matmul" on Metal,
    "dequant_tiles" on the CPU backend (unless set_quantized_path forced one)."""
    if _PATH[0] != "auto":
        return _PATH[0]
    return "dequant_tiles" if mx.default_device() == mx.cpu else "quantized_matmul"


@dataclass(frozen=True)
class FrozenWeight:
    w: mx.array  # (d_out, d_in) dense, or packed (d_out, d_in * bits / 32)
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    group_size: int = 64
    bits: int = 4
    mode: str = "affine"
    out_dtype: Optional[mx.Dtype] = None   # dense products rounded to it (dequantized_like)

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def shape(self):
        """(d_out, d_in) of the unpacked matrix."""
        d_out, packed = self.w.shape
        return (d_out, packed * 32 // self.bits) if self.quantized else (d_out, packed)

    def _qmm(self, x, transpose):
        if quantized_path() == "dequant_tiles":
            f = xWt_tiles if transpose else gW_tiles
            return f(x, self.w, self.scales, self.biases, self.group_size, self.bits,
                     self.mode)
        return mx.quantized_matmul(
            x, self.w, self.scales, self.biases, transpose=transpose,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
        )

    def xWt(self, x: mx.array) -> mx.array:
        """x W0ᵀ: (..., d_in) -> (..., d_out)."""
        if self.quantized:
            return self._qmm(x, True)
        return x @ self.w.T if self.out_dtype is None else mm(x, self.w.T, self.out_dtype)

    def gW(self, g: mx.array) -> mx.array:
        """g W0: (..., d_out) -> (..., d_in)."""
        if self.quantized:
            return self._qmm(g, False)
        return g @ self.w if self.out_dtype is None else mm(g, self.w, self.out_dtype)

    def rows(self, v0: int, v1: int) -> "FrozenWeight":
        """Output rows [v0, v1) as a FrozenWeight (a vocabulary slice of a head)."""
        q = self.quantized
        return FrozenWeight(self.w[v0:v1], self.scales[v0:v1] if q else None,
                            self.biases[v0:v1] if q and self.biases is not None else None,
                            self.group_size, self.bits, self.mode)

    def dequantized_like(self, dtype) -> "FrozenWeight":
        """This (quantized) W0 dense in fp32 whose products give the values of the
        dequantized tiles' for `dtype` operands: rounded to `dtype` once."""
        d_out = self.w.shape[0]
        W = dequant_rows(self.w, self.scales, self.biases, 0, d_out, self.group_size,
                         self.bits, self.mode)
        return FrozenWeight(W, out_dtype=dtype)

    def take(self, ids: mx.array) -> mx.array:
        """Dense rows W0[ids]: (..., d_in), dequantizing only those rows."""
        if not self.quantized:
            return self.w[ids]
        return mx.dequantize(self.w[ids], self.scales[ids],
                             None if self.biases is None else self.biases[ids],
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    def dense(self) -> mx.array:
        """W0 as a dense (d_out, d_in) array (references and tests only)."""
        if not self.quantized:
            return self.w
        return mx.dequantize(self.w, self.scales, self.biases,
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    @staticmethod
    def of(module) -> "FrozenWeight":
        """View of an nn.Linear / nn.QuantizedLinear / (Quantized)Embedding weight."""
        if "scales" in module:
            return FrozenWeight(module.weight, module.scales, module.get("biases"),
                                module.group_size, module.bits,
                                getattr(module, "mode", "affine"))
        return FrozenWeight(module.weight)
