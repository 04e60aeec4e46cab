"""Sizes: one memory unit everywhere. MB = 10⁶ bytes and GB = 10⁹ bytes, as printed
by the CLI, the monitor and the benchmarks; sizes typed by users may also use the
binary units (MiB = 2²⁰, GiB = 2³⁰)."""

import re

MB = 10**6
GB = 10**9

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_FORMS = "a size like 6GB, 512MB, 1.5GiB or a plain byte count (GB = 10^9, GiB = 2^30)"


def parse_size(text) -> int:
    """'6GB' -> 6_000_000_000, '1.5GiB' -> 1610612736, 123 -> 123."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}: expected {_FORMS}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return value
