"""The activation plan of a run: how much memory the step may spend, and on what.

    options, line = plan_options(model, method, B, T, est, base, budget=None)

The minimal schedule (every block recomputed) has the smallest peak; every byte
above it that the step may use buys speed (engine/plan.py: wider token chunks, then
blocks that keep their forward tensors, then attention probabilities). What it may
use:
  - with a budget (--memory-budget, --device-profile): the budget, less the
    pre-flight estimate of the minimal step (weights, LoRA, gradients, optimizer
    state, checkpoints, runtime), less SAFETY of the budget;
  - without one: this device's memory (Metal's recommended working set, or the
    physical memory on the CPU backend), less the same estimate, less MARGIN of it;
  - `minimal=True` (--activation-plan minimal, or streamed weights without a budget):
    nothing, and narrower token chunks: the smallest peak.
Only method mesp plans; the other methods run as they are.
"""

import os
from dataclasses import replace
from typing import Optional, Tuple

import mlx.core as mx

from ..engine.plan import EngineOptions, describe_plan, planned
from ..engine.walk import model_spec
from ..units import MB
from .footprint import device_facts

SAFETY = 0.10      # of an explicit budget, for what the pre-flight estimate misses
MINIMAL_CHUNK = 2 << 20   # the minimal plan's widest per-chunk tensor (half the default)
MARGIN = 0.25      # of this device's memory, for the OS and other processes


def device_memory() -> Tuple[Optional[int], str]:
    """(bytes the process may plan with, where that figure comes from)."""
    facts = device_facts()
    ws = facts.get("max_recommended_working_set_size")
    if ws:
        return int(ws), "Metal's recommended working set"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        size = facts.get("memory_size")
        return (int(size), "device memory") if size else (None, "unknown")


def spare_bytes(est_total: int, budget: Optional[int]) -> Tuple[int, str]:
    """(bytes the plan may spend above the minimal step, how they were found)."""
    if budget:
        spare = int(budget * (1 - SAFETY) - est_total)
        return max(0, spare), (f"budget {budget / MB:.0f} MB − estimate {est_total / MB:.0f}"
                               f" MB − {SAFETY:.0%} margin")
    mem, source = device_memory()
    if not mem:
        return 0, "this device's memory is unknown: minimal schedule"
    spare = int(mem * (1 - MARGIN) - est_total)
    return max(0, spare), (f"{source} {mem / MB:.0f} MB − estimate {est_total / MB:.0f} MB"
                           f" − {MARGIN:.0%} margin")


def plan_options(model, method: str, B: int, T: int, est_total: int,
                 base: Optional[EngineOptions] = None, budget: Optional[int] = None,
                 minimal: bool = False, why_minimal: str = "") -> Tuple[EngineOptions,
                                                                      Optional[str]]:
    """(EngineOptions for training, one log line stating the plan, or None).
    minimal: the smallest peak, every block recomputed, the MLP in token chunks of at
    most MINIMAL_CHUNK bytes, and no allocator cache kept during the step (the
    process footprint then stays near the MLX peak); why_minimal: the reason, for
    the log line."""

    opts = base or EngineOptions()
    if method != "mesp":
        return opts, None
    spec = model_spec(model, "mesp", T, opts)
    if minimal:
        opts = replace(opts, activation_budget=0, clear_cache="always",
                       token_chunk_bytes=min(opts.token_chunk_bytes, MINIMAL_CHUNK))
        return opts, f"{describe_plan([], len(spec.blocks))} at T={T}{why_minimal}"
    spare, why = spare_bytes(est_total, budget)
    opts = replace(opts, activation_budget=spare)
    itemsize = spec.embed_ids(mx.zeros((1, 1), mx.int32)).dtype.size
    plan, _, rows = planned(spec, opts, B, T, itemsize)
    return opts, (f"{describe_plan(plan, len(spec.blocks), rows)} at T={T}: "
                  f"{why} = {spare / MB:.0f} MB to spend")
