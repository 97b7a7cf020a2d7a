"""Search spaces over (BG, FG): the fixed grids of DESIGN §5.

Grid values are rounded to 4 decimals so that 0.05 + 0.25 is the 0.3 a user types, not
0.30000000000000004: the pair identifies a trial in MLflow, CSVs and selection files.
"""

from __future__ import annotations

import numpy as np

PAPER_GAPS = (0.0, 0.10, 0.25, 0.40)
EXTENDED_GAPS = (0.0, 0.05, 0.10, 0.15, 0.25, 0.40)


def _grid(bg_max: float, gaps: tuple[float, ...], fg_max: float) -> list[tuple[float, float]]:
    bgs = np.round(np.arange(0.05, bg_max + 1e-9, 0.05), 4)
    return [(float(bg), round(float(bg) + gap, 4)) for bg in bgs for gap in gaps
            if round(float(bg) + gap, 4) <= fg_max]


def grid_pairs(space: str,
               pairs: list[tuple[float, float]] | None = None) -> list[tuple[float, float]]:
    """Pairs of a named grid: ``paper`` (32 pairs, 8 with BG = FG), ``extended``, or ``pairs``."""
    if space == "paper":
        return _grid(0.40, PAPER_GAPS, 1.0)
    if space == "extended":
        return _grid(0.65, EXTENDED_GAPS, 0.95)
    if space == "pairs":
        return [(float(bg), float(fg)) for bg, fg in pairs or []]
    raise ValueError(f"unknown grid space {space!r}")
