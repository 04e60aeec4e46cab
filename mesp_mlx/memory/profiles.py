"""Device memory budgets and `resolve_budget`.

Every budget is an approximation for planning, not a guarantee: the real
limit depends on the OS version, other apps and the entitlements. On the
device, check `os_proc_available_memory()` (iOS) or
`mx.device_info()["max_recommended_working_set_size"]` (Metal, Macs).
"""

from dataclasses import dataclass
from typing import Optional

from ..units import parse_size
from .footprint import device_facts

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    ram_bytes: int
    budget_bytes: int
    source: str     # where the budget comes from, one line


def _p(name, ram_gib, frac, source):
    return DeviceProfile(name, ram_gib * GiB, int(ram_gib * frac * GiB), source)


_HALF_IOS = ("iOS per-app jetsam limit with the com.apple.developer.kernel."
             "increased-memory-limit entitlement is reported at roughly 1/2-2/3 of RAM; "
             "iPhones keep more for the system, so we plan with the low end, 1/2")
_IPAD = ("iPadOS per-app limit with the increased-memory-limit entitlement is reported "
         "at roughly 1/2-2/3 of RAM; iPads run one foreground app, so we use 5/8")
_METAL = ("Metal recommendedMaxWorkingSetSize on Apple-silicon Macs with <= 16 GB is "
          "about 2/3 of RAM (~3/4 on larger Macs); MLX's default limit derives from it")

DEVICE_PROFILES = {p.name: p for p in (
    _p("iphone-6gb", 6, 1 / 2, _HALF_IOS + " (iPhone 14/15)"),
    _p("iphone-8gb", 8, 1 / 2, _HALF_IOS + " (iPhone 15 Pro/16)"),
    _p("ipad-8gb", 8, 5 / 8, _IPAD + " (iPad Air/Pro M1-M2 8 GB)"),
    _p("ipad-16gb", 16, 5 / 8, _IPAD + " (iPad Pro 16 GB)"),
    _p("macbook-air-8gb", 8, 2 / 3, _METAL),
    _p("macbook-air-16gb", 16, 2 / 3, _METAL),
)}

def auto_budget() -> int:
    """The Metal recommended working set of this machine (Metal only)."""

    ws = device_facts().get("max_recommended_working_set_size")
    if not ws:
        raise ValueError("device profile 'auto' needs Metal (max_recommended_working_set_size "
                         "is not reported on this backend); pass --memory-budget instead")
    return int(ws)


def resolve_budget(memory_budget: Optional[str] = None,
                   device_profile: Optional[str] = None) -> Optional[int]:
    """Budget in bytes: memory_budget wins over device_profile; None if neither."""
    if memory_budget is not None:
        return parse_size(memory_budget)
    if device_profile is None:
        return None
    if device_profile == "auto":
        return auto_budget()
    if device_profile not in DEVICE_PROFILES:
        raise ValueError(f"unknown device profile {device_profile!r}; choose from "
                         f"{', '.join(DEVICE_PROFILES)} or auto")
    return DEVICE_PROFILES[device_profile].budget_bytes


def profiles_table() -> str:
    """Markdown table of the bundled profiles."""
    rows = ["| profile | RAM | budget | source |", "|---|---|---|---|"]
    for p in DEVICE_PROFILES.values():
        rows.append(f"| {p.name} | {p.ram_bytes / GiB:.0f} GiB | "
                    f"{p.budget_bytes / GiB:.2f} GiB | {p.source} |")
    return "\n".join(rows)
