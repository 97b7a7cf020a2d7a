"""(BG, FG) -> confident regions, exactly as DESIGN §4.

A pixel is background if its max class score ``m <= BG``, its argmax class if ``m >= FG`` (the
paper's "meets or exceeds"), neutral (255) otherwise; background wins when both hold (BG = FG).
Comparisons are made in float32 so that float16-stored scores exactly at a threshold land on the
documented side whichever code path (one-pass surface or per-pair map) evaluates them.
"""

from __future__ import annotations

import math

import numpy as np

from wsss.errors import UserError

NEUTRAL = 255
"""Label of neutral pixels (and of ignored ground-truth pixels): VOC's ignore index."""


def check_pair(bg: float, fg: float, *, where: str = "") -> tuple[float, float]:
    """Validate a threshold pair; the error names the fields: ``where`` is their config path
    (``surface.pairs[3]`` -> ``surface.pairs[3].bg``) or ``--`` for the CLI flags."""
    prefix = where if where in ("", "--") else f"{where}."
    for name, value in (("bg", bg), ("fg", fg)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise UserError(f"{prefix}{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{prefix}{name} must be in [0, 1], got {value}")
    if bg > fg:
        raise UserError(f"{prefix}bg ({bg}) must not exceed {prefix}fg ({fg})")
    return float(bg), float(fg)


def max_and_argmax(scores: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max score (float32) and its class id; ties go to the lowest class id.

    ``scores`` is ``[K, H, W]`` (any float dtype) for the class ids ``keys`` (1-based); an image
    with no present class (K = 0) scores 0 everywhere, so it is all background.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if scores.ndim != 3 or scores.shape[0] != keys.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match keys {keys.shape}")
    if keys.size == 0:
        shape = scores.shape[1:]
        return np.zeros(shape, np.float32), np.zeros(shape, np.int64)
    if keys.size == 1:
        return scores[0].astype(np.float32), np.full(scores.shape[1:], keys[0], np.int64)
    order = np.argsort(keys, kind="stable")
    s = scores[order].astype(np.float32, copy=False)
    idx = s.argmax(axis=0)  # first maximum = lowest class id, since keys are now ascending
    return s.max(axis=0), keys[order][idx]


def confident_regions(scores: np.ndarray, keys: np.ndarray, bg: float, fg: float) -> np.ndarray:
    """uint8 label map: 0 background, class id where confident foreground, 255 neutral."""
    bg, fg = check_pair(bg, fg)
    m, cls = max_and_argmax(scores, keys)
    out = np.full(m.shape, NEUTRAL, dtype=np.uint8)
    fg_mask = m >= np.float32(fg)
    out[fg_mask] = cls[fg_mask]
    out[m <= np.float32(bg)] = 0
    return out
