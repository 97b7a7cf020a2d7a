"""Progress lines for a running search, printed by the driver from Ray Tune callbacks.

Ray's own console reporter prints wide tables of every trial; a researcher watching a search
wants one line per finished stage-1 trial (with the best pair so far) and one per DeepLabv3+
epoch in stage 2; `pct` formats the fractions they show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

Write = Callable[[str], None]


def pct(value: float | None) -> str:
    """A fraction as a percentage for people; n/a when undefined (None or NaN)."""
    return "n/a" if value is None or value != value else f"{value:.2%}"


def say(line: str) -> None:
    """Print one progress line now (the driver may be piped into a log file)."""
    print(line, flush=True)


class Stage1Progress(Callback):
    """One line per ended trial: its pair, epochs trained, objective, and the best so far.
    Counts come from Tune's trial list, not from state kept here: a resumed search restores
    this callback as it was when the search began."""

    def __init__(self, total: int, epochs: int, objective: str, write: Write = say) -> None:
        self.total, self.epochs, self.objective, self.write = total, epochs, objective, write
        self.start = time.perf_counter()

    def _finished(self, result: dict) -> bool:
        return (int(result.get("training_iteration", 0)) >= self.epochs
                and not result.get("degenerate") and self.objective in result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if "bg" not in result:
            return
        ended = [t for t in trials if t is trial or t.status in ("TERMINATED", "ERROR")]
        bg, fg, epochs = result["bg"], result["fg"], int(result["training_iteration"])
        if result.get("degenerate"):
            what = "degenerate (no neutral pixel): never promoted"
        else:
            what = (f"{self.objective} {result[self.objective]:.4f}  " + (
                f"{epochs} epoch{'s' * (epochs != 1)}" if self._finished(result) else
                f"stopped early after {epochs}"))
        scored = [(t.last_result[self.objective], t.last_result["bg"], t.last_result["fg"])
                  for t in ended if self._finished(t.last_result or {})]
        best = "" if not scored else "   best ({1:.2f}, {2:.2f}) {0:.4f}".format(*max(scored))
        self.write(f"  [{len(ended):>3}/{self.total}] {time.perf_counter() - self.start:6.0f} s  "
                   f"({bg:.2f}, {fg:.2f})  {what}{best}")


class Stage2Progress(Callback):
    """One line per DeepLabv3+ epoch of each candidate."""

    def __init__(self, epochs: int, write: Write = say) -> None:
        self.epochs, self.write = epochs, write
        self.start = time.perf_counter()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if "bg" not in result:
            return
        val = result.get("val_miou")
        score = "" if val is None or val != val else f"  val mIoU {val:.2%}"
        self.write(f"  {time.perf_counter() - self.start:6.0f} s  ({result['bg']:.2f}, "
                   f"{result['fg']:.2f})  epoch {int(result['training_iteration']):>2}/"
                   f"{self.epochs}  loss {result['seg_loss']:.4f}{score}")
