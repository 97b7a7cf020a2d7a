"""Search spaces over (BG, FG): the fixed grids of docs/search.md, Optuna TPE and random sampling.

Grid values are rounded to 4 decimals so that 0.05 + 0.25 is the 0.3 a user types, not
0.30000000000000004: the pair identifies a trial in MLflow, CSVs and selection files.
Optuna and random spaces are define-by-run (``fg`` is drawn from ``[bg + min_gap, fg_max]``), so
every sampled pair is valid and no trial is wasted on ``BG > FG``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from wsss.spec import Spec

PAPER_GAPS = (0.0, 0.10, 0.25, 0.40)
EXTENDED_GAPS = (0.0, 0.05, 0.10, 0.15, 0.25, 0.40)
Space = Literal["paper", "extended", "pairs", "optuna", "random"]


class Pair(NamedTuple):
    """One (BG, FG) threshold pair: the shape a pair has from the space to the report."""

    bg: float
    fg: float

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Pair:
        """The pair of a trial's config: grid and stage-2 trials hold it under ``pair``,
        sampled ones (Optuna names its parameters itself) at the top level."""
        inner = config.get("pair", config)
        if isinstance(inner, (list, tuple)):  # grid configs of searches begun before this type
            return cls(float(inner[0]), float(inner[1]))
        return cls(float(inner["bg"]), float(inner["fg"]))

    @property
    def label(self) -> str:
        """``bg,fg`` as printed everywhere (``%g``): how a user names a searched pair."""
        return f"{self.bg:g},{self.fg:g}"

    def rows_in(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of a stage table (``bg``, ``fg`` columns) holding this pair, compared as
        printed: a pair read back from a CSV or typed by a user is the same pair."""
        same = [Pair(bg, fg).label == self.label for bg, fg in zip(table.bg, table.fg)]
        return table[pd.Series(same, index=table.index, dtype=bool)]


def _grid(bg_max: float, gaps: tuple[float, ...], fg_max: float) -> list[Pair]:
    bgs = np.round(np.arange(0.05, bg_max + 1e-9, 0.05), 4)
    return [Pair(float(bg), round(float(bg) + gap, 4)) for bg in bgs for gap in gaps
            if round(float(bg) + gap, 4) <= fg_max]


def grid_pairs(space: str, pairs: list[tuple[float, float]] | None = None) -> list[Pair]:
    """Pairs of a named grid: ``paper`` (32 pairs, 8 with BG = FG), ``extended``, or ``pairs``."""
    if space == "paper":
        return _grid(0.40, PAPER_GAPS, 1.0)
    if space == "extended":
        return _grid(0.65, EXTENDED_GAPS, 0.95)
    if space == "pairs":
        return [Pair(float(bg), float(fg)) for bg, fg in pairs or []]
    raise ValueError(f"unknown grid space {space!r}")


class SamplerBounds(Spec):
    """Bounds of the sampled spaces (``optuna``, ``random``): the defaults in docs/search.md."""

    bg_min: float = Field(0.0, ge=0, le=1)
    bg_max: float = Field(0.7, ge=0, le=1)
    min_gap: float = Field(0.05, ge=0, le=1)
    fg_max: float = Field(0.95, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> SamplerBounds:
        if self.bg_min > self.bg_max:
            raise ValueError("bg_min must not exceed bg_max")
        if self.bg_max + self.min_gap > self.fg_max + 1e-12:
            raise ValueError("bg_max + min_gap must not exceed fg_max")
        return self


class DefineByRun:
    """Optuna define-by-run space: ``bg`` first, then ``fg >= bg + min_gap`` (gap inclusive).
    Ray's OptunaSearch takes the suggested values from the trial, so nothing is returned. A
    class, not a closure: Tune pickles the search algorithm (and this space) into every
    experiment snapshot, and a resumed search unpickles it."""

    def __init__(self, bounds: SamplerBounds) -> None:
        self.bounds = bounds

    def __call__(self, trial: Any) -> None:
        b = self.bounds
        bg = trial.suggest_float("bg", b.bg_min, b.bg_max)
        trial.suggest_float("fg", min(bg + b.min_gap, b.fg_max), b.fg_max)
