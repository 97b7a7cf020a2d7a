"""Refined CAMs -> pseudo-labels (docs/definitions.md) and their export as VOC palette PNGs.

The refined CAMs are scored exactly like the initial ones (upsampled to the image, each class
divided by its own maximum) and thresholded with the **same** (BG, FG) pair, so neutral pixels stay
neutral (255): DeepLabv3+ ignores them, as the paper does. IRN instead divides by the global maximum
and uses one background threshold; that is not ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wsss.files import save_palette_png
from wsss.regions import cam_scores, confident_regions


def pseudo_labels(refined: np.ndarray, keys: np.ndarray, image_size: tuple[int, int],
                  bg: float, fg: float) -> np.ndarray:
    """uint8 ``[H, W]`` labels from refined strided CAMs ``[K, h, w]`` of classes ``keys``."""
    return confident_regions(cam_scores(refined, image_size), keys, bg, fg)


def export_labels(items: Iterable[tuple[str, np.ndarray]], out_dir: Path) -> int:
    """Write ``<id>.png`` palette PNGs (255 = ignore), readable by PuzzleCAM/IRN segmentation
    training; each file atomically. Returns how many were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for image_id, labels in items:
        save_palette_png(out_dir / f"{image_id}.png", labels)
        n += 1
    return n
