"""The fit planner: the largest --max-seq-length, --batch-size or --rank that
fits a budget, from the analytic estimate (others held at their flags).

    python -m mesp_mlx.memory --model Qwen2.5-3B --device-profile iphone-8gb \\
        --find max-seq-length [--measure]

The estimate grows with each of the three, so a doubling search then a binary
search finds the largest fitting value in ~2·log2(limit) estimates. The answer
keeps SPARE (1%) of the budget free, as the "what would fit" advice does, so
re-running with it answers "fits". --measure builds the model at the answer
(random weights) and runs one step to confirm.
"""

from dataclasses import replace
from typing import Callable, Optional

from .estimate import SPARE, Arch, estimate

TARGETS = ("max-seq-length", "batch-size", "rank")
MAX_BATCH = 1 << 16


def limit(target: str, cfg: dict, arch: Arch) -> int:
    """Search ceiling: the model's positions, 65536 rows, or the model width."""
    if target == "max-seq-length":
        text = cfg.get("text_config", cfg)
        return int(text.get("max_position_embeddings") or
                   cfg.get("max_position_embeddings") or 1 << 20)
    return MAX_BATCH if target == "batch-size" else arch.D


def largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest v in [1, hi] with fits(v) (fits monotone: true then false); 0 if none."""
    if not fits(1):
        return 0
    lo, step = 1, 1
    while lo < hi:                                   # doubling: fits(lo) holds
        nxt = min(lo + step, hi)
        if not fits(nxt):
            hi = nxt - 1
            break
        lo, step = nxt, step * 2
    while lo < hi:                                   # binary: fits(lo), hi unknown
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def find(target: str, arch: Arch, rank: int, method: str, T: int, B: int,
         optimizer: str, budget: int, ceiling: int,
         fused_sdpa: Optional[bool] = None) -> int:
    """The largest value of `target` that fits, 0 if not even 1 does."""
    if target not in TARGETS:
        raise ValueError(f"--find must be one of {', '.join(TARGETS)}, got {target!r}")

    def total(v: int) -> int:
        a, t, b = arch, T, B
        if target == "rank":                  # LoRA bytes are linear in r
            a = replace(arch, lora_bytes=arch.lora_bytes * v // rank)
        elif target == "max-seq-length":
            t = v
        else:
            b = v
        return estimate(a, method, t, b, optimizer, fused_sdpa).total_bytes

    return largest(lambda v: total(v) <= budget * (1 - SPARE), ceiling)


def flag_name(target: str) -> str:
    return {"max-seq-length": "max_seq_length", "batch-size": "batch_size",
            "rank": "rank"}[target]
