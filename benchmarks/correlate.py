"""Benchmark: `correlate` vs the straightforward scipy-per-resample bootstrap and RANSAC loop.

The reference is what `wsss.analysis.correlate` did before it was vectorised: one `spearmanr`
and one `kendalltau` call per bootstrap resample, then one `RANSACRegressor` fit per seed with
sklearn's default input checks. Both use the same resample indices and seeds (2,000 resamples,
200 RANSAC seeds), so every field must be identical. Inputs: a noisy line with a few outliers
and ties (values printed to 2 decimals, like the paper's tables), 32 and 200 rows. RANSAC is
timed apart as well: it is sklearn's own loop in both and bounds the ratio. Target: ratio >= 3x
on 32 rows.

    python benchmarks/correlate.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn.linear_model import RANSACRegressor
from timing import best_of

from wsss.analysis import Correlation, correlate, ransac_pearsons

N_BOOT, SEEDS, SEED = 2000, 200, 0


def make_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy increasing relation with ~10% outliers, rounded so that both variables tie."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(20.0, 80.0, n)
    y = 0.5 * x + rng.normal(0.0, 4.0, n)
    out = rng.random(n) < 0.1
    y[out] += rng.normal(0.0, 25.0, out.sum())
    return np.round(x, 2), np.round(y, 2)


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args)


def reference_ci(
    x: np.ndarray, y: np.ndarray, stat: Callable[..., Any], idx: np.ndarray
) -> tuple[float, float]:
    """Percentile 95% CI of ``stat`` by one scipy call per resample, undefined ones skipped."""
    vals = np.array([_quiet(stat, x[i], y[i]).statistic for i in idx], dtype=float)
    vals = vals[np.isfinite(vals)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def reference_ransac(x: np.ndarray, y: np.ndarray, seeds: int) -> tuple[list[float], list[int]]:
    """Pearson on the inliers of one default-checked ``RANSACRegressor`` fit per seed."""
    rs, counts = [], []
    for s in range(seeds):
        model = RANSACRegressor(random_state=s)
        try:
            _quiet(model.fit, x[:, None], y)
        except ValueError:
            continue
        mask = model.inlier_mask_
        xi, yi = x[mask], y[mask]
        if mask.sum() < 3 or np.all(xi == xi[0]) or np.all(yi == yi[0]):
            continue
        rs.append(float(_quiet(stats.pearsonr, xi, yi).statistic))
        counts.append(int(mask.sum()))
    return rs, counts


def reference_correlate(x: np.ndarray, y: np.ndarray) -> Correlation:
    """The previous `correlate` on finite, non-constant inputs."""
    pr, sr, kt = (_quiet(f, x, y) for f in (stats.pearsonr, stats.spearmanr, stats.kendalltau))
    idx = np.random.default_rng(SEED).integers(0, x.size, size=(N_BOOT, x.size))
    rs, counts = reference_ransac(x, y, SEEDS)
    lo, hi = np.percentile(rs, [5, 95])
    return Correlation(
        x="x", y="y", n=int(x.size),
        pearson=float(pr.statistic), pearson_p=float(pr.pvalue),
        spearman=float(sr.statistic), spearman_p=float(sr.pvalue),
        spearman_ci=reference_ci(x, y, stats.spearmanr, idx),
        kendall=float(kt.statistic), kendall_p=float(kt.pvalue),
        kendall_ci=reference_ci(x, y, stats.kendalltau, idx),
        ransac_pearson=float(np.median(rs)), ransac_range=(float(lo), float(hi)),
        ransac_inliers=float(np.median(counts)), n_seeds=len(rs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ratios, identical = {}, True
    for n in (32, 200):
        x, y = make_inputs(n)
        t_ours, ours = best_of(lambda: correlate(x, y, n_boot=N_BOOT, seed=SEED,
                                                 ransac_seeds=SEEDS), args.repeat)
        t_ransac, _ = best_of(lambda: ransac_pearsons(x, y, SEEDS, None), 1)
        t_ref, ref = best_of(lambda: reference_correlate(x, y), 1)
        t_ref_ransac, _ = best_of(lambda: reference_ransac(x, y, SEEDS), 1)
        identical &= ours == ref
        ratios[n] = t_ref / t_ours
        print(f"rows={n} resamples={N_BOOT} seeds={SEEDS}: ours {t_ours:.2f} s "
              f"(RANSAC {t_ransac:.2f} s, {t_ransac / SEEDS * 1e3:.1f} ms/seed), reference "
              f"{t_ref:.2f} s (RANSAC {t_ref_ransac:.2f} s), ratio {ratios[n]:.1f}, "
              f"identical={ours == ref}")
    print(f"correlate: ratio={ratios[32]:.1f} (ours vs scipy loop, 32 rows; "
          f"200 rows {ratios[200]:.1f}); identical={identical}")
    if not identical:
        raise SystemExit("results differ from the reference")


if __name__ == "__main__":
    main()
