"""--save-best and --early-stop-patience, judged by validation loss.

Only the validations on the --steps-per-eval grid count: not the one before
training, and not an extra one at a final --iters off the grid. So a run that
is stopped and resumed makes the same decisions as one that was not; the
tracker's state is saved with the optimizer state and restored on resume.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .adapters import write_weights
BEST = "adapters_best.safetensors"


@dataclass
class Tracker:
    save_best: bool = False
    patience: int = 0                   # 0: never stop early
    best: Optional[float] = None        # lowest counted validation loss
    best_step: Optional[int] = None
    since_best: int = 0                 # counted validations since the best

    @classmethod
    def of(cls, cfg) -> "Tracker":
        return cls(cfg.save_best, cfg.early_stop_patience)

    @property
    def active(self) -> bool:
        return self.save_best or self.patience > 0

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def update(self, it: int, loss: float) -> bool:
        """Count a validation; True when it is a new best."""
        if self.best is None or loss < self.best:
            self.best, self.best_step, self.since_best = loss, it, 0
            return True
        self.since_best += 1
        return False

    def meta(self) -> dict:
        return {"best_val_loss": self.best, "best_step": self.best_step,
                "since_best": self.since_best} if self.active else {}

    def restore(self, info: Optional[dict]) -> None:
        """From a resumed run's state.json (absent keys: a fresh start)."""
        if info and info.get("best_val_loss") is not None:
            self.best = float(info["best_val_loss"])
            self.best_step = info.get("best_step")
            self.since_best = int(info.get("since_best", 0))

    def describe_stop(self) -> str:
        return (f"no new lowest validation loss in {self.since_best} validations "
                f"(best {self.best:.3f} at iteration {self.best_step})")


def save(model, adapter_dir, it: int, loss: float) -> Path:
    """adapters_best.safetensors (written atomically), step and loss in its metadata."""
    d = Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    return write_weights(model, d / BEST, {"step": it, "val_loss": repr(loss)})
