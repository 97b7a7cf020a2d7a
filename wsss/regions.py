"""(BG, FG) -> confident regions, exactly as docs/definitions.md says.

A pixel is background if its max class score ``m <= BG``, its argmax class if ``m >= FG`` (the
paper's "meets or exceeds"), neutral (255) otherwise; background wins when both hold (BG = FG).
Comparisons are made in float32 so that float16-stored scores exactly at a threshold land on the
documented side whichever code path (one-pass surface or per-pair map) evaluates them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


def dense_crf(where: str):
    """The optional ``pydensecrf`` module, or a `UserError` naming the config key ``where``."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise UserError(f"{where} needs the optional dense CRF package: "
                        "pip install 'wsss-tune[crf]' (pydensecrf2)") from None
    return dcrf


def crf_regions(image: np.ndarray, scores: np.ndarray, keys: np.ndarray, bg: float, fg: float, *,
                iterations: int = 10, gt_prob: float = 0.7, where: str = "crf") -> np.ndarray:
    """Confident regions cleaned by a dense CRF, as IRN/PuzzleCAM do before AffinityNet.

    Two label maps are smoothed on the image: "class where ``m >= FG``, else 0" and "class where
    ``m > BG``, else 0". A pixel is foreground where the first says so, background where both
    say 0, neutral otherwise (IRN's ``cam_to_ir_label``, with our tie rules). Needs the optional
    ``pydensecrf2`` package (``pip install 'wsss-tune[crf]'``); ``where`` is the config key that
    asked for it, named in the error when the package is missing.
    """
    dcrf = dense_crf(where)
    from pydensecrf.utils import unary_from_labels
    bg, fg = check_pair(bg, fg)
    m, cls = max_and_argmax(scores, keys)
    h, w = m.shape
    rgb = np.ascontiguousarray(image, dtype=np.uint8)

    def smooth(labels: np.ndarray) -> np.ndarray:
        ids, compact = np.unique(labels, return_inverse=True)
        if len(ids) == 1:
            return labels
        crf = dcrf.DenseCRF2D(w, h, len(ids))
        crf.setUnaryEnergy(unary_from_labels(compact.reshape(h, w), len(ids), gt_prob=gt_prob,
                                             zero_unsure=False))
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=rgb, compat=10)
        q = np.array(crf.inference(iterations)).reshape(len(ids), h, w)
        return ids[q.argmax(axis=0)]

    fg_map = smooth(np.where(m >= np.float32(fg), cls, 0))
    not_bg = smooth(np.where(m > np.float32(bg), cls, 0))
    out = np.where(fg_map > 0, fg_map, NEUTRAL).astype(np.uint8)
    out[(fg_map == 0) & (not_bg == 0)] = 0
    return out


def cam_scores(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stored CAMs ``[K, h, w]`` -> float32 scores ``[K, H, W]`` in [0, 1] at image size.

    Bilinear upsampling (``align_corners=False``) then division by each class's own maximum; a
    class whose CAM is all zero stays zero.
    """
    t = torch.from_numpy(np.asarray(cam, dtype=np.float32))
    if t.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    up = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
    peak = up.amax(dim=(1, 2), keepdim=True)
    up = torch.where(peak > 0, up / torch.where(peak > 0, peak, torch.ones_like(peak)), up)
    return up.numpy()
