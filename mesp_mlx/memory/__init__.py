"""Unified-memory monitor: per-step records, device budgets, pre-flight estimate.

`python -m mesp_mlx.memory --model Qwen2.5-3B --max-seq-length 512 --method mesp
--device-profile iphone-8gb` answers "will it fit?" without downloading weights.
"""

from .estimate import Estimate, MemoryBudgetError, estimate, preflight
from .footprint import Footprint, device_facts, process_footprint, runtime_bytes
from .monitor import MemoryMonitor
from .profiles import DEVICE_PROFILES, DeviceProfile, parse_size, resolve_budget

__all__ = ["MemoryMonitor", "resolve_budget", "preflight", "MemoryBudgetError",
           "DEVICE_PROFILES", "DeviceProfile", "process_footprint", "Footprint",
           "device_facts", "estimate", "Estimate", "parse_size", "runtime_bytes"]
