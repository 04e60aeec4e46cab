"""Per-step memory records: MLX peak/active/cache, process footprint, headroom.

    mon = MemoryMonitor(log_path, budget_bytes)   # budget -> mx.set_memory_limit
    mon.start_window()                            # before each report window
    rec = mon.record(step, loss=...)              # dict, one JSON line if log_path
    print(mon.format(rec)); ...; print(mon.summary())
    why_not = mon.plot("mem.png"); mon.close()    # None when the PNG was written
headroom = budget - max(MLX peak, footprint peak): the stricter of what MLX's
limit governs and what the OS (jetsam on iOS) acts on.
Accounting: `mlx_peak` is everything MLX held in the window, the weights included;
with `weights_bytes` (the frozen weights resident in MLX; streamed: norms only) the
records also carry `mlx_peak_above_weights`; the summary puts the process peak next
to the footprint of an idle process that imported MLX (footprint.idle_footprint).
"""

import json
import time
from typing import Optional

import mlx.core as mx

from .footprint import idle_footprint, process_footprint, reset_footprint_peak

MB = 1e6
SERIES = ("mlx_peak", "mlx_peak_above_weights", "mlx_active", "mlx_cache", "footprint",
          "footprint_peak", "headroom")


class MemoryMonitor:
    def __init__(self, log_path: Optional[str] = None, budget_bytes: Optional[int] = None,
                 weights_bytes: Optional[int] = None, streamed_bytes: Optional[int] = None):
        """weights_bytes: frozen weights resident in MLX; streamed_bytes: frozen weights
        read from disk per step instead (--stream-weights), for the report."""
        self.budget = budget_bytes
        self.weights, self.streamed = weights_bytes, streamed_bytes
        self.records = []
        self._prev_limit = mx.set_memory_limit(int(budget_bytes)) if budget_bytes else None
        self._log = open(log_path, "a") if log_path else None
        self._fp_max = 0        # own running max where the OS peak cannot be reset
        self._os_reset = False
        self.start_window()

    def start_window(self):
        """Start a report window: reset MLX's peak and, where possible, the OS peak."""
        mx.reset_peak_memory()
        self._os_reset = reset_footprint_peak()
        self._fp_max = 0

    def record(self, step: int, **extra) -> dict:
        """Sample memory now (peaks cover the window); log and return a dict."""
        fp = process_footprint()
        cur = fp.current or 0
        self._fp_max = max(self._fp_max, cur)
        peak = fp.peak if (fp.peak is not None and self._os_reset) else self._fp_max
        rec = {"step": step, "time": time.time(), "mlx_peak": mx.get_peak_memory(),
               "mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
               "footprint": fp.current, "footprint_peak": peak if fp.current else None}
        if self.weights is not None:
            rec["mlx_peak_above_weights"] = rec["mlx_peak"] - self.weights
        if self.budget:
            rec["headroom"] = self.budget - max(rec["mlx_peak"], rec["footprint_peak"] or 0)
        rec.update(extra)
        self.records.append(rec)
        if self._log:
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()
        return rec

    @staticmethod
    def format(rec: dict) -> str:
        """'peak 123.4 MB, active ..., cache ..., footprint ... (peak ...)[, headroom ...]'"""
        def mb(k):
            return "n/a" if rec.get(k) is None else f"{rec[k] / MB:.1f} MB"
        above = (f" ({mb('mlx_peak_above_weights')} above the weights)"
                 if rec.get("mlx_peak_above_weights") is not None else "")
        text = (f"peak {mb('mlx_peak')}{above}, active {mb('mlx_active')}, cache "
                f"{mb('mlx_cache')}, footprint {mb('footprint')} (peak {mb('footprint_peak')})")
        return text + (f", headroom {mb('headroom')}" if "headroom" in rec else "")

    def summary(self) -> str:
        """Markdown table: max and mean (MB) of each series over all records."""
        rows = [f"| memory ({len(self.records)} records) | max MB | mean MB |",
                "|---|---:|---:|"]
        for k in SERIES:
            vals = [r[k] for r in self.records if r.get(k) is not None]
            if vals:
                rows.append(f"| {k} | {max(vals) / MB:.1f} | {sum(vals) / len(vals) / MB:.1f} |")
        if self.weights is not None:
            rows.append(f"| frozen weights resident in MLX | {self.weights / MB:.1f} | |")
        if self.streamed:
            rows.append(f"| frozen weights streamed from disk | {self.streamed / MB:.1f} | |")
        idle = idle_footprint()
        if idle:
            rows.append(f"| idle process with MLX imported (footprint) | {idle / MB:.1f} | |")
        if self.budget:
            rows.append(f"| budget | {self.budget / MB:.1f} | |")
        return "\n".join(rows)

    def plot(self, path: str) -> Optional[str]:
        """PNG of memory (MB) and loss over steps, with the budget line; None
        when written, else why not (matplotlib missing, no records)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return 'matplotlib is not installed: pip install "mesp-mlx[plot]"'
        if not self.records:
            return "no memory records"
        steps = [r["step"] for r in self.records]
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in ("mlx_peak", "mlx_active", "footprint_peak"):
            ys = [(r.get(k) or 0) / MB for r in self.records]
            ax.plot(steps, ys, label=k)
        if self.budget:
            ax.axhline(self.budget / MB, color="red", linestyle="--", label="budget")
        ax.set_xlabel("step")
        ax.set_ylabel("memory (MB)")
        lines, labels = ax.get_legend_handles_labels()
        loss = [(r["step"], r["loss"]) for r in self.records if r.get("loss") is not None]
        if loss:
            ax2 = ax.twinx()
            ax2.plot(*zip(*loss), color="black", alpha=0.6, linewidth=1, label="loss")
            ax2.set_ylabel("training loss")
            more = ax2.get_legend_handles_labels()
            lines, labels = lines + more[0], labels + more[1]
        ax.legend(lines, labels, loc="best", fontsize="small")
        ax.set_title("mesp_mlx training: memory per step"
                     + (f" (budget {self.budget / MB:.0f} MB)" if self.budget else ""))
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return None

    def close(self):
        """Restore MLX's previous memory limit and close the log."""
        if self._prev_limit is not None:
            mx.set_memory_limit(self._prev_limit)
            self._prev_limit = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
