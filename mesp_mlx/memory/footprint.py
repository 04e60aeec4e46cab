"""Process footprint and device facts.

macOS/iOS: `phys_footprint` — the number memory pressure and jetsam act on —
from libproc's `proc_pid_rusage` (struct rusage_info_v2; the lifetime maximum
needs rusage_info_v4). Linux: VmRSS / VmHWM from /proc/self/status, and the
peak is reset per window by writing "5" to /proc/self/clear_refs.
Anything unavailable is None, never an exception.
"""

import ctypes
import ctypes.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx


@dataclass
class Footprint:
    current: Optional[int]   # bytes now (phys_footprint / VmRSS)
    peak: Optional[int]      # bytes, max since last reset_peak() (or process start)
    source: str              # where the numbers come from


# --- macOS: libproc ---------------------------------------------------------
_RUSAGE_INFO_V2, _RUSAGE_INFO_V4 = 2, 4
_V2_FIELDS = ("user_time system_time pkg_idle_wkups interrupt_wkups pageins "
              "wired_size resident_size phys_footprint proc_start_abstime "
              "proc_exit_abstime child_user_time child_system_time "
              "child_pkg_idle_wkups child_interrupt_wkups child_pageins "
              "child_elapsed_abstime diskio_bytesread diskio_byteswritten").split()
_V3_FIELDS = ("cpu_time_qos_default cpu_time_qos_maintenance cpu_time_qos_background "
              "cpu_time_qos_utility cpu_time_qos_legacy cpu_time_qos_user_initiated "
              "cpu_time_qos_user_interactive billed_system_time "
              "serviced_system_time").split()
_V4_FIELDS = ("logical_writes lifetime_max_phys_footprint instructions cycles "
              "billed_energy serviced_energy interval_max_phys_footprint "
              "runnable_time").split()


def _struct(name, fields):
    # uint8_t ri_uuid[16] followed by uint64_t fields, no padding (xnu sys/resource.h)
    return type(name, (ctypes.Structure,), {"_fields_": [("ri_uuid", ctypes.c_uint8 * 16)]
                + [("ri_" + f, ctypes.c_uint64) for f in fields]})


RusageInfoV2 = _struct("RusageInfoV2", _V2_FIELDS)                             # 160 bytes
RusageInfoV4 = _struct("RusageInfoV4", _V2_FIELDS + _V3_FIELDS + _V4_FIELDS)   # 296 bytes
_libproc = None


def _rusage(struct, flavor):
    """proc_pid_rusage(getpid(), flavor, &info) or None on any failure."""
    global _libproc
    try:
        if _libproc is None:
            _libproc = ctypes.CDLL(ctypes.util.find_library("proc") or "/usr/lib/libproc.dylib")
            _libproc.proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            _libproc.proc_pid_rusage.restype = ctypes.c_int
        buf = ctypes.create_string_buffer(512)   # oversized: newer kernels never overrun it
        if _libproc.proc_pid_rusage(os.getpid(), flavor, buf) != 0:
            return None
        return struct.from_buffer_copy(buf.raw[:ctypes.sizeof(struct)])
    except (OSError, AttributeError, ValueError):
        return None


def _darwin() -> Footprint:
    v4 = _rusage(RusageInfoV4, _RUSAGE_INFO_V4)
    if v4 is not None:
        return Footprint(v4.ri_phys_footprint, v4.ri_lifetime_max_phys_footprint,
                         "phys_footprint (libproc rusage_info_v4)")
    v2 = _rusage(RusageInfoV2, _RUSAGE_INFO_V2)
    cur = v2.ri_phys_footprint if v2 is not None else None
    return Footprint(cur, None, "phys_footprint (libproc rusage_info_v2)")


# --- Linux: /proc -----------------------------------------------------------
def _linux() -> Footprint:
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return Footprint(None, None, "unavailable")
    kb = {k: int(v) * 1024 for k, v in re.findall(r"^Vm(RSS|HWM):\s+(\d+)\s*kB", text, re.M)}
    return Footprint(kb.get("RSS"), kb.get("HWM"), "VmRSS/VmHWM (/proc/self/status)")


def process_footprint() -> Footprint:
    """This process's memory footprint now and its peak (bytes)."""
    if sys.platform == "darwin":
        return _darwin()
    if sys.platform.startswith("linux"):
        return _linux()
    return Footprint(None, None, "unavailable")


_RUNTIME = []


def runtime_bytes() -> int:
    """This process's footprint outside MLX's buffers (interpreter, MLX, mlx-lm,
    tokenizer libraries): footprint now − MLX active − MLX cache, measured on the
    first call and then fixed, so estimates in one process are comparable.
    0 where unavailable."""
    if not _RUNTIME:
        cur = process_footprint().current
        mlx = mx.get_active_memory() + mx.get_cache_memory()
        _RUNTIME.append(max(cur - mlx, 0) if cur else 0)
    return _RUNTIME[0]


def reset_footprint_peak() -> bool:
    """Reset the OS peak (Linux VmHWM) so it covers one window; False if not possible."""
    if not sys.platform.startswith("linux"):
        return False   # macOS lifetime max cannot be reset; the monitor keeps its own max
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_facts() -> dict:
    """mx.device_info() with the memory keys always present (None when unknown)."""
    try:
        dev = mx.gpu if mx.metal.is_available() else mx.cpu
        info = dict(mx.device_info(dev))
    except (TypeError, RuntimeError, AttributeError):
        info = dict(mx.device_info())
    for key in ("memory_size", "max_recommended_working_set_size",
                "architecture", "device_name"):
        info.setdefault(key, None)
    return info


_IDLE = []
_IDLE_SCRIPT = """
import importlib.util, sys
import mlx.core as mx
mx.eval(mx.zeros(1) + 1)
spec = importlib.util.spec_from_file_location("footprint", sys.argv[1])
fp = importlib.util.module_from_spec(spec); spec.loader.exec_module(fp)
print(fp.process_footprint().current or 0)
"""


def idle_footprint() -> Optional[int]:
    """Footprint (bytes) of an idle Python process that imported MLX and ran one op:
    the floor under any whole-process figure here (measured once, in a subprocess;
    None if that fails)."""
    if not _IDLE:
        import subprocess
        try:
            out = subprocess.run([sys.executable, "-c", _IDLE_SCRIPT, __file__],
                                 capture_output=True, text=True, timeout=120)
            _IDLE.append(int(out.stdout.strip().splitlines()[-1]) or None)
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            _IDLE.append(None)
    return _IDLE[0]
