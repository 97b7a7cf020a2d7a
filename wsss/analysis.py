"""Statistics that validate a proxy (TECM, PQS, ...) against a target, and how good a pick is.

The paper reports one RANSAC-filtered Pearson per claim; RANSAC is random, so a single number hides
how much it depends on the seed. Here every correlation also carries rank statistics with bootstrap
CIs and the RANSAC Pearson as a median and 5-95% range over many seeds, so a claim can be checked
for whether it reproduces rather than only whether one seed reaches it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from numpy.typing import ArrayLike
from scipy import stats
from sklearn.linear_model import RANSACRegressor

NAN = float("nan")
_NAN_PAIR = (NAN, NAN)


@dataclass(frozen=True)
class Correlation:
    """Correlation of ``y`` on ``x`` over ``n`` pairs; NaN wherever a statistic is undefined."""

    x: str
    y: str
    n: int
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    spearman_ci: tuple[float, float]  # bootstrap 95% (percentile)
    kendall: float  # tau-b
    kendall_p: float
    kendall_ci: tuple[float, float]  # bootstrap 95% (percentile)
    ransac_pearson: float  # median over seeds of Pearson on the RANSAC inliers
    ransac_range: tuple[float, float]  # 5% and 95% percentiles over seeds
    ransac_inliers: float  # median inlier count over seeds
    n_seeds: int  # seeds that gave a value

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: tuples as 2-lists, NaN as None (JSON has no NaN)."""
        def clean(v: Any) -> Any:
            if isinstance(v, tuple):
                return [clean(e) for e in v]
            if isinstance(v, float) and math.isnan(v):
                return None
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` with scipy/numpy/sklearn warnings silenced: undefined cases become NaN here."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args)


def _constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def _percentile_ci(vals: np.ndarray) -> tuple[float, float]:
    """Percentile 95% CI over the resamples where the statistic is defined: a constant resample
    is skipped rather than counted as zero."""
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return _NAN_PAIR
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def _bootstrap_spearman(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``spearmanr(x[i], y[i]).statistic`` for every row ``i`` of ``idx``, NaN where a resample
    is constant, in one pass. Mid-ranks are multiples of 1/2, so every sum below is exact and
    the result is scipy's bit for bit (it divides the same way as ``np.corrcoef``)."""
    rx = stats.rankdata(x[idx], axis=1)
    ry = stats.rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    inv = 1.0 / (idx.shape[1] - 1)
    sxx = np.einsum("ij,ij->i", rx, rx) * inv
    syy = np.einsum("ij,ij->i", ry, ry) * inv
    sxy = np.einsum("ij,ij->i", rx, ry) * inv
    ok = (sxx > 0) & (syy > 0)
    with np.errstate(all="ignore"):
        r = np.clip(sxy / np.sqrt(syy) / np.sqrt(sxx), -1.0, 1.0)
    return np.where(ok, r, NAN)


_KENDALL_BLOCK_BYTES = 256 * 2**20
"""Bound on the temporaries of one block in ``_bootstrap_kendall``."""


def _bootstrap_kendall(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``kendalltau(x[i], y[i]).statistic`` (tau-b) for every row ``i`` of ``idx``, NaN where a
    resample is constant, without a loop over resamples.

    A resample is the original pairs taken with multiplicities ``c``, so over its ordered pairs
    of positions the sum of ``sign(dx) * sign(dy)`` (twice concordant - discordant) is
    ``c @ P @ c`` with ``P`` that sign product over the original pairs, and the count of pairs
    tied in x is ``c @ [dx == 0] @ c`` (the ``n`` pairs of a position with itself included).
    These are integers, exact in float64, so tau-b comes out as scipy's. The ``n x n`` matrices
    are built a block of columns at a time to keep memory bounded for large ``n``.
    """
    n_boot, n = idx.shape
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(float)
    block = max(1, _KENDALL_BLOCK_BYTES // (8 * 3 * max(n, n_boot)))
    sums = np.zeros((3, n_boot))  # sign products, x ties, y ties; per resample
    for j in range(0, n, block):
        sx = np.sign(x[:, None] - x[None, j:j + block])
        sy = np.sign(y[:, None] - y[None, j:j + block])
        m = np.stack([sx * sy, sx == 0, sy == 0])  # (3, n, block)
        sums += ((counts @ m) * counts[:, j:j + block]).sum(axis=2)
    tot = n * (n - 1) // 2
    con_minus_dis = sums[0] / 2
    x_free, y_free = tot - (sums[1] - n) / 2, tot - (sums[2] - n) / 2  # pairs untied in x, y
    ok = (x_free > 0) & (y_free > 0)
    with np.errstate(all="ignore"):
        tau = np.clip(con_minus_dis / np.sqrt(x_free) / np.sqrt(y_free), -1.0, 1.0)
    return np.where(ok, tau, NAN)


GROUND_TRUTH_PROXIES = ("pqs_avg", "pqs_pseudo", "miou_pseudo")
"""Rankings that need ground truth: validation of the objectives, never an objective."""

# Below this, "outliers" are a matter of which two or three points a line happens to hit
RANSAC_MIN_POINTS = 8


def ransac_pearsons(
    x: np.ndarray, y: np.ndarray, seeds: int, residual_threshold: float | None
) -> tuple[list[float], list[int]]:
    """Pearson on the inliers of ``RANSACRegressor(random_state=s)`` (y on x), as the paper did,
    for each seed that yields one; a seed whose consensus set is invalid is skipped.

    The inputs are finite float64 and the parameters fixed here, so sklearn's finiteness and
    parameter checks (a large share of its per-trial cost on small data) are switched off; they
    do not change the result.
    """
    if x.size < RANSAC_MIN_POINTS:
        return [], []
    if residual_threshold is None and np.median(np.abs(y - np.median(y))) == 0:
        return [], []  # sklearn's default threshold (MAD of y) would accept exact fits only
    xs = np.ascontiguousarray(x[:, None])
    rs, counts = [], []
    with (sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
          warnings.catch_warnings(), np.errstate(all="ignore")):
        warnings.simplefilter("ignore")
        for s in range(seeds):
            model = RANSACRegressor(random_state=s, residual_threshold=residual_threshold)
            try:
                model.fit(xs, y)
            except ValueError:
                continue
            mask = model.inlier_mask_
            xi, yi = x[mask], y[mask]
            if mask.sum() < 3 or _constant(xi) or _constant(yi):
                continue
            rs.append(float(stats.pearsonr(xi, yi).statistic))
            counts.append(int(mask.sum()))
    return rs, counts


def correlate(
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_name: str = "x",
    y_name: str = "y",
    n_boot: int = 2000,
    seed: int = 0,
    ransac_seeds: int = 200,
    residual_threshold: float | None = None,
) -> Correlation:
    """Every statistic of ``y`` against ``x`` over the pairs where both are finite.

    Fewer than 3 pairs or a constant variable leave every statistic NaN (``n`` still counts the
    pairs): a sweep with few finished trials must still produce a report, not an exception.
    """
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if n < 3 or _constant(xa) or _constant(ya):
        return Correlation(x_name, y_name, n, NAN, NAN, NAN, NAN, _NAN_PAIR, NAN, NAN, _NAN_PAIR,
                           NAN, _NAN_PAIR, NAN, 0)
    pr = _quiet(stats.pearsonr, xa, ya)
    sr = _quiet(stats.spearmanr, xa, ya)
    kt = _quiet(stats.kendalltau, xa, ya)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rs, counts = ransac_pearsons(xa, ya, ransac_seeds, residual_threshold)
    if rs:
        r_med = float(np.median(rs))
        lo, hi = np.percentile(rs, [5, 95])
        r_range, inliers = (float(lo), float(hi)), float(np.median(counts))
    else:
        r_med, r_range, inliers = NAN, _NAN_PAIR, NAN
    return Correlation(
        x=x_name, y=y_name, n=n,
        pearson=float(pr.statistic), pearson_p=float(pr.pvalue),
        spearman=float(sr.statistic), spearman_p=float(sr.pvalue),
        spearman_ci=_percentile_ci(_bootstrap_spearman(xa, ya, idx)),
        kendall=float(kt.statistic), kendall_p=float(kt.pvalue),
        kendall_ci=_percentile_ci(_bootstrap_kendall(xa, ya, idx)),
        ransac_pearson=r_med, ransac_range=r_range, ransac_inliers=inliers, n_seeds=len(rs),
    )


def finished_pairs(table: pd.DataFrame, epochs: int | None = None) -> pd.DataFrame:
    """The rows that count for statistics: not degenerate, not failed and, when ``epochs`` is
    given, trained to the end (an early-stopped trial's proxy is from another point of training).
    A filter applies only where its column exists."""
    keep = pd.Series(True, index=table.index)
    for col in ("degenerate", "failed"):
        if col in table.columns:
            keep &= table[col] == 0
    if epochs is not None and "training_iteration" in table.columns:
        keep &= table["training_iteration"] >= epochs
    return table.loc[keep]


def _ranked(rows: pd.DataFrame, col: str) -> pd.DataFrame:
    """Best first by ``col``; ties by bg then fg ascending: the search's tie rule
    (docs/search.md)."""
    return rows.sort_values([col, "bg", "fg"], ascending=[False, True, True], kind="mergesort")


def pick_quality(
    table: pd.DataFrame, score: str, truth: str = "val_miou", ks: Sequence[int] = (1, 3, 5)
) -> dict[str, Any] | None:
    """How well picking by ``score`` does against ``truth``: the pick, the best pair, the regret
    (best truth - pick truth, in ``truth``'s units) and recall@k (the best pair among the k
    highest-scoring). None when no row has both values."""
    if score not in table.columns or truth not in table.columns:
        return None
    rows = table.dropna(subset=[score, truth]).reset_index(drop=True)
    if rows.empty:
        return None
    by_score, by_truth = _ranked(rows, score), _ranked(rows, truth)
    pick, best = by_score.iloc[0], by_truth.iloc[0]
    order = list(by_score.index)
    return {
        "score": score,
        "truth": truth,
        "n": len(rows),
        "pick": {"bg": float(pick["bg"]), "fg": float(pick["fg"]),
                 score: float(pick[score]), truth: float(pick[truth])},
        "best": {"bg": float(best["bg"]), "fg": float(best["fg"]), truth: float(best[truth])},
        "regret": float(best[truth] - pick[truth]),
        "recall": {str(k): by_truth.index[0] in order[:k] for k in ks},
    }
