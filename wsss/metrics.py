"""Exact metrics of docs/definitions.md: confusion, mIoU (three protocols), NPR, PQS, TECM,
surfaces.

Every value is a fraction (TECM in [0, 2]). mIoU always comes from one confusion matrix pooled over
the evaluated images. Confusion matrices here are ``[C, C + 1]``: rows are ground-truth classes
(GT 255 excluded), columns predicted classes plus a last *neutral* column (prediction 255), so the
same counts serve the non-neutral mIoU, the standard mIoU and both reference evaluate protocols.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from wsss.regions import NEUTRAL, Array, as_tensor, check_pair, host, like, max_and_argmax

Protocol = Literal["standard", "puzzlecam", "irn"]
Aggregation = Literal["image_mean", "pooled"]

_CHUNK = 1 << 22  # pixels per bincount in the one-pass surface: bounds memory on VOC-size sets


def _gt_index(gt: np.ndarray, num_classes: int) -> np.ndarray:
    """GT ids as int64 with 255 mapped to ``num_classes``; any other out-of-range id is a bug."""
    g = gt.astype(np.int64, copy=True)
    g[g == NEUTRAL] = num_classes
    if g.size and (g.min() < 0 or g.max() > num_classes):
        bad = int(gt[(g < 0) | (g > num_classes)][0])
        raise ValueError(f"ground-truth id {bad} outside 0..{num_classes - 1} (and 255)")
    return g


def confusion(pred: Array, gt: Array, num_classes: int, *, validate: bool = True) -> Array:
    """``[C, C + 1]`` int64 counts of (GT class, predicted class or neutral); GT 255 ignored.
    numpy in, numpy out; tensors in, a tensor on their device out (counted there).
    ``validate=False`` skips the range check (a host sync on a GPU) for ids the caller made."""
    p, g = as_tensor(pred), as_tensor(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ "
                         f"in shape")
    c, n = num_classes, num_classes + 1
    p, g = p.reshape(-1).long(), g.reshape(-1).long()
    valid = g != NEUTRAL
    p = torch.where(p == NEUTRAL, c, p)
    if validate:
        if bool(((p < 0) | (p > c)).logical_and(valid).any()):
            raise ValueError(f"predicted id outside 0..{c - 1} (and 255)")
        if bool((g >= c).logical_and(valid).any()):
            raise ValueError(f"ground-truth id outside 0..{c - 1} (and 255)")
    codes = torch.where(valid, g * n + p, c * n)  # ignored pixels go to one extra bin
    # index_add_, not bincount: CUDA's bincount sizes its output from the input's max (a sync)
    counts = torch.zeros(c * n + 1, dtype=torch.int64, device=codes.device)
    counts.index_add_(0, codes, torch.ones_like(codes))
    return like(counts[:c * n].reshape(c, n), gt)


def iou_per_class(conf: np.ndarray, protocol: Protocol = "standard") -> np.ndarray:
    """Per-class IoU from a ``[C, C + 1]`` confusion matrix.

    - ``standard``: a neutral prediction is a miss; a class with an empty union is NaN.
    - ``puzzlecam``: as PuzzleCAM's ``evaluate.py``: neutral is a miss, empty union gives 0
      (``TP / (T + P - TP + 1e-10)``).
    - ``irn``: as IRN's ``step/eval_sem_seg.py``: neutral predictions become background; empty
      union is NaN.
    """
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    if protocol == "irn":
        conf = conf.copy()
        conf[:, 0] += conf[:, c]
        conf[:, c] = 0
    tp = np.diag(conf[:, :c])
    gt_total = conf.sum(axis=1)
    pred_total = conf[:, :c].sum(axis=0)
    union = gt_total + pred_total - tp
    if protocol == "puzzlecam":
        return tp / (union + 1e-10)
    if protocol not in ("standard", "irn"):
        raise ValueError(f"unknown protocol {protocol!r}; expected standard, puzzlecam or irn")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(conf: np.ndarray, protocol: Protocol = "standard") -> float:
    """mIoU: the mean over classes (PuzzleCAM: all classes; otherwise non-empty unions only)."""
    iou = iou_per_class(conf, protocol)
    if protocol == "puzzlecam":
        return float(iou.mean())
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def region_metrics(conf: np.ndarray, n_pixels: int, n_neutral: int) -> dict[str, float]:
    """NPR, non-neutral mIoU, PQS, standard mIoU and ``degenerate`` for one labelling.

    ``n_pixels`` counts **all** pixels (GT-ignore ones too): NPR's denominator
    (docs/definitions.md).
    ``miou_nn`` uses only pixels that are neither neutral nor GT 255.
    """
    c = conf.shape[0]
    npr = n_neutral / n_pixels if n_pixels else 0.0
    nn = np.zeros_like(conf)
    nn[:, :c] = conf[:, :c]
    miou_nn = mean_iou(nn)
    return {
        "npr": float(npr),
        "miou_nn": miou_nn,
        # nothing confident: PQS is 0, not NaN (an all-neutral labelling trains nothing)
        "pqs": 0.0 if n_pixels and n_neutral == n_pixels else float(miou_nn * (1.0 - npr)),
        "miou": mean_iou(conf),
        "degenerate": float(n_neutral == 0),
    }


def _pair_table(pairs: Sequence[tuple[float, float]]) -> tuple[list[tuple[float, float]],
                                                               np.ndarray, np.ndarray]:
    """Validated pairs, their float32 threshold positions ``[P, 2]`` in ``t``, and ``t``: the
    sorted unique float32 thresholds (comparisons happen in float32, docs/definitions.md)."""
    checked = [check_pair(bg, fg, where=f"pairs[{i}]") for i, (bg, fg) in enumerate(pairs)]
    if not checked:
        raise ValueError("threshold_surface needs at least one (bg, fg) pair")
    as32 = np.asarray(checked, dtype=np.float32)
    t = np.unique(as32)
    return checked, np.searchsorted(t, as32), t


def threshold_surface(
    scores: Iterable[np.ndarray],
    keys: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    pairs: Sequence[tuple[float, float]],
    num_classes: int,
) -> pd.DataFrame:
    """Initial-region metrics of every (BG, FG) pair in **one pass** over the pixels.

    Each pixel's max score is coded against the sorted unique thresholds ``t`` as
    ``#{t < m} + #{t <= m}`` (one binary search over ``t`` interleaved with each threshold's
    float32 successor): even codes fall strictly between thresholds, odd code ``2k + 1``
    means ``m == t[k]``. Then ``m <= t[k]`` iff code ``<= 2k + 1`` and ``m >= t[k]`` iff code
    ``>= 2k + 1``, so one histogram over (code, argmax class, GT class) and its cumulative sum give
    every pair's confusion matrix and neutral count without revisiting a pixel.

    ``scores[i]``: image i's normalised CAMs ``[K_i, H, W]`` at image resolution; ``keys[i]``: their
    1-based class ids; ``gts[i]``: ``[H, W]`` ground truth (255 ignored). Returns one row per pair
    (in the given order) with ``bg, fg, npr, miou_nn, pqs, miou, degenerate``.
    """
    checked, positions, t = _pair_table(pairs)
    # #{edges <= m} = #{t <= m} + #{t < m}: no float32 lies between t and its successor
    edges = np.stack([t, np.nextafter(t, np.float32(np.inf))], axis=1).ravel()
    c, g = num_classes, num_classes + 1
    n_codes = 2 * t.size + 1
    hist = np.zeros(n_codes * c * g, dtype=np.int64)
    pending: list[np.ndarray] = []
    n_pending = 0
    for s, k, gt in zip(scores, keys, gts, strict=True):  # iterables: streams a split
        m, cls = max_and_argmax(s, k)
        if m.shape != gt.shape:
            raise ValueError(f"scores {m.shape} and ground truth {gt.shape} differ in shape")
        code = np.searchsorted(edges, m, side="right")
        pending.append(((code * c + cls) * g + _gt_index(gt, c)).ravel())
        n_pending += m.size
        if n_pending >= _CHUNK:
            hist += np.bincount(np.concatenate(pending), minlength=hist.size)
            pending, n_pending = [], 0
    if pending:
        hist += np.bincount(np.concatenate(pending), minlength=hist.size)

    cum = hist.reshape(n_codes, c, g).cumsum(axis=0)  # cum[j]: pixels with code <= j
    total = cum[-1]
    n_pixels = int(total.sum())
    rows = []
    for (bg, fg), (a, b) in zip(checked, positions.tolist()):
        background = cum[2 * a + 1]  # code <= 2a + 1  <=>  m <= BG
        fg_from = max(2 * b + 1, 2 * a + 2)  # m >= FG, and not already background
        foreground = total - cum[fg_from - 1]
        neutral = total - background - foreground
        conf = np.zeros((c, c + 1), dtype=np.int64)
        conf[:, 0] = background[:, :c].sum(axis=0)
        conf[:, :c] += foreground[:, :c].T
        conf[:, c] = neutral[:, :c].sum(axis=0)
        rows.append({"bg": bg, "fg": fg,
                     **region_metrics(conf, n_pixels, int(neutral.sum()))})
    return pd.DataFrame(rows)


COUNTS = ("n_pixels", "neutral_initial", "neutral_refined", "n_to_b", "n_to_f")
"""The per-image counts the weakly supervised objectives need, in `transition_counts` order."""


def transition_counts(initial: Array, refined: Array) -> Array:
    """One image's `COUNTS` (int64 ``[5]``) from its initial regions and refined pseudo-labels:
    pixels, neutral before and after, neutral turned background, neutral turned foreground."""
    i, r = as_tensor(initial), as_tensor(refined)
    was_neutral = i == NEUTRAL
    labelled = r != NEUTRAL
    out = torch.stack([
        torch.tensor(i.numel(), device=i.device), was_neutral.sum(), (~labelled).sum(),
        (was_neutral & (r == 0)).sum(), (was_neutral & labelled & (r != 0)).sum()])
    return like(out.long(), initial)


@dataclass(frozen=True)
class Transitions:
    """A trial's transition counts: `COUNTS` per image (rows) and, pooled over the images, the
    ``[C, C + 1]`` confusion of the pseudo-labels against the initial regions (``agreement``,
    rows the initial label; neutral initial pixels are ignored)."""

    per_image: np.ndarray
    agreement: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        """One of `COUNTS` for every image (float64, for ratios)."""
        return self.per_image[:, COUNTS.index(name)].astype(np.float64)

    @classmethod
    def of(cls, pairs: Iterable[tuple[Array, Array]], num_classes: int) -> Transitions:
        """From (initial regions, pseudo-labels) of each image, numpy or tensors."""
        rows, agreement = [], np.zeros((num_classes, num_classes + 1), np.int64)
        for initial, refined in pairs:
            rows.append(host(transition_counts(initial, refined)))
            agreement += host(confusion(refined, initial, num_classes))
        return cls(np.array(rows, np.int64).reshape(-1, len(COUNTS)), agreement)


def self_pqs(t: Transitions) -> float:
    """PQS of the pseudo-labels with the initial confident regions standing in for the ground
    truth: the mIoU of pseudo-labels against initial regions on pixels confident in both, times
    the pseudo-labels' confident share ``1 - NPR``. It keeps PQS's trade-off (accuracy against
    data kept) without labels."""
    pixels, neutral = t["n_pixels"].sum(), t["neutral_refined"].sum()
    if not pixels or neutral == pixels:
        return 0.0
    both = np.zeros_like(t.agreement)
    both[:, :-1] = t.agreement[:, :-1]
    miou = mean_iou(both)
    return 0.0 if miou != miou else float(miou * (1.0 - neutral / pixels))


def tecm(npr_i, npr_r, n_to_b, n_to_f, eps: float = 1e-6):
    """TECM, the paper's Eq. 4, elementwise over numpy arrays (or scalars).

    ``clip(1 + (NPR_i - NPR_r) / (NPR_i + eps), 0, 2) * (1 - |NtoB - NtoF| / (NtoB + NtoF))``.
    Edge rules (docs/definitions.md): ``NPR_i == 0`` gives 1 (the paper's stated value for a pair
    without neutral pixels); ``NtoB + NtoF == 0`` with neutral pixels gives balance 0 (nothing
    resolved).
    ``n_to_b`` / ``n_to_f`` may be counts or fractions: only their ratio matters.
    """
    npr_i, npr_r, b, f = (np.asarray(x, dtype=np.float64) for x in (npr_i, npr_r, n_to_b, n_to_f))
    reduction = np.clip(1.0 + (npr_i - npr_r) / (npr_i + eps), 0.0, 2.0)
    resolved = b + f
    safe = np.where(resolved > 0, resolved, 1.0)
    balance = np.where(resolved > 0, 1.0 - np.abs(b - f) / safe, 0.0)
    out = np.where(npr_i == 0, 1.0, reduction * balance)
    return float(out) if out.ndim == 0 else out


def tecm_aggregate(t: Transitions, how: Aggregation = "image_mean") -> tuple[float, bool]:
    """TECM over a set of images from their transition counts; returns (value, degenerate).

    ``image_mean`` (default): TECM per image, averaged over the images that have neutral pixels.
    ``pooled``: counts summed over the images first, then Eq. 4 once. Either way a set without
    any neutral pixel is degenerate and scores 1.
    """
    arr = {k: t[k] for k in COUNTS}
    if how == "pooled":
        arr = {k: v.sum(keepdims=True) for k, v in arr.items()}
    elif how != "image_mean":
        raise ValueError(f"unknown TECM aggregation {how!r}; expected image_mean or pooled")
    has_neutral = arr["neutral_initial"] > 0
    if not has_neutral.any():
        return 1.0, True
    n = arr["n_pixels"][has_neutral]
    values = tecm(arr["neutral_initial"][has_neutral] / n, arr["neutral_refined"][has_neutral] / n,
                  arr["n_to_b"][has_neutral], arr["n_to_f"][has_neutral])
    return float(np.mean(values)), False
