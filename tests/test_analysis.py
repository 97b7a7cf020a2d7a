"""wsss.analysis against scipy and hand-made tables; the paper tables typed in configs/paper."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from wsss import analysis
from wsss.analysis import correlate, finished_pairs, pick_quality

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
FAST = {"n_boot": 200, "ransac_seeds": 20}  # enough for the properties tested, quick on 2 cores

X = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0])
Y = np.array([2.1, 1.9, 3.5, 3.5, 6.0, 5.2, 7.7, 7.1, 9.4, 8.8, 12.5, 10.9])  # a tie in y


def _noisy_line(n: int = 40, outliers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = np.linspace(0.0, 1.0, n)
    y = 2.0 * x + rng.normal(0.0, 0.05, n)
    y[:outliers] += 3.0  # planted at low x: they pull a plain fit far off the line
    return x, y


def test_point_statistics_equal_scipy():
    c = correlate(X, Y, x_name="a", y_name="b", **FAST)
    pr, sr, kt = stats.pearsonr(X, Y), stats.spearmanr(X, Y), stats.kendalltau(X, Y)
    assert (c.x, c.y, c.n) == ("a", "b", 12)
    assert (c.pearson, c.pearson_p) == pytest.approx((pr.statistic, pr.pvalue), rel=1e-12)
    assert (c.spearman, c.spearman_p) == pytest.approx((sr.statistic, sr.pvalue), rel=1e-12)
    assert (c.kendall, c.kendall_p) == pytest.approx((kt.statistic, kt.pvalue), rel=1e-12)


def test_nan_pairs_are_dropped_before_everything():
    xn = np.append(X, [np.nan, 3.0])
    yn = np.append(Y, [1.0, np.nan])
    assert correlate(xn, yn, **FAST) == correlate(X, Y, **FAST)


def test_bootstrap_interval_contains_estimate_and_follows_seed():
    x, y = _noisy_line()
    a = correlate(x, y, seed=3, **FAST)
    assert a.spearman_ci[0] <= a.spearman <= a.spearman_ci[1]
    assert a.kendall_ci[0] <= a.kendall <= a.kendall_ci[1]
    assert a.spearman_ci[0] > 0.8  # clearly correlated
    assert correlate(x, y, seed=3, **FAST) == a
    b = correlate(x, y, seed=4, **FAST)
    assert (b.spearman_ci, b.kendall_ci) != (a.spearman_ci, a.kendall_ci)
    assert b.pearson == a.pearson  # the seed only moves the bootstrap


TIES = (np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0]),  # ~2% of resamples are constant in x
        np.array([0.5, 0.2, 0.5, 0.9, 0.9, 0.1]))


@pytest.mark.parametrize("block_bytes", [analysis._KENDALL_BLOCK_BYTES, 1])  # 1: a column a block
@pytest.mark.parametrize(("x", "y", "undefined"), [(*TIES, True), (X, Y, False)])
def test_vectorised_bootstrap_equals_scipy_per_resample(x, y, undefined, block_bytes, monkeypatch):
    monkeypatch.setattr(analysis, "_KENDALL_BLOCK_BYTES", block_bytes)
    idx = np.random.default_rng(0).integers(0, x.size, size=(500, x.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on each constant resample
        sr = np.array([stats.spearmanr(x[i], y[i]).statistic for i in idx])
        kt = np.array([stats.kendalltau(x[i], y[i]).statistic for i in idx])
    assert np.isnan(kt).any() == undefined  # constant resamples: NaN, as scipy gives
    np.testing.assert_allclose(analysis._bootstrap_spearman(x, y, idx), sr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(analysis._bootstrap_kendall(x, y, idx), kt, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("error")  # no scipy/numpy warning may leak
@pytest.mark.parametrize(("x", "y", "n"), [
    ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], 4),  # constant y
    ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0], 4),  # constant x
    ([1.0, 2.0], [3.0, 4.0], 2),  # n < 3
    ([1.0, 2.0, np.nan], [3.0, np.nan, 4.0], 1),  # n < 3 after dropping NaN
    ([], [], 0),
])
def test_undefined_cases_give_nan(x, y, n):
    c = correlate(x, y, **FAST)
    assert c.n == n and c.n_seeds == 0
    values = [c.pearson, c.pearson_p, c.spearman, c.spearman_p, *c.spearman_ci, c.kendall,
              c.kendall_p, *c.kendall_ci, c.ransac_pearson, *c.ransac_range, c.ransac_inliers]
    assert all(math.isnan(v) for v in values)
    d = c.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["pearson"] is None and d["spearman_ci"] == [None, None] and d["n"] == n


def test_as_dict_is_json_with_lists():
    d = correlate(X, Y, **FAST).as_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert isinstance(d["ransac_range"], list) and len(d["kendall_ci"]) == 2


def test_ransac_is_deterministic_and_resists_outliers():
    x, y = _noisy_line(outliers=4)
    a = correlate(x, y, n_boot=50, ransac_seeds=30)
    assert a == correlate(x, y, n_boot=50, ransac_seeds=30)
    assert a.n_seeds == 30
    assert a.ransac_pearson > a.pearson + 0.2
    assert a.ransac_range[0] <= a.ransac_pearson <= a.ransac_range[1]
    assert a.ransac_inliers <= 36  # the planted outliers are out


def test_ransac_needs_enough_points():
    x = np.arange(7.0)
    c = correlate(x, x ** 2, **FAST)
    assert c.n == 7 and c.n_seeds == 0 and math.isnan(c.ransac_pearson)
    assert correlate(np.arange(8.0), np.arange(8.0) ** 2, **FAST).n_seeds > 0


def test_ransac_skips_when_mad_is_zero_unless_a_threshold_is_given():
    x = np.arange(9.0)
    y = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0])  # MAD of y = 0
    c = correlate(x, y, **FAST)
    assert not math.isnan(c.pearson)
    assert c.n_seeds == 0 and math.isnan(c.ransac_pearson)
    t = correlate(x, y, residual_threshold=1.0, **FAST)
    assert t.n_seeds > 0 and t.ransac_range[0] <= t.ransac_pearson <= t.ransac_range[1]


def test_finished_pairs():
    t = pd.DataFrame({
        "bg": [0.1, 0.1, 0.2, 0.2, 0.3],
        "fg": [0.1, 0.2, 0.3, 0.4, 0.5],
        "degenerate": [1, 0, 0, 0, 0],
        "failed": [0, 0, 1, 0, 0],
        "training_iteration": [3, 3, 3, 2, 3],
    })
    assert finished_pairs(t)["fg"].tolist() == [0.2, 0.4, 0.5]
    assert finished_pairs(t, epochs=3)["fg"].tolist() == [0.2, 0.5]
    assert len(finished_pairs(t[["bg", "fg"]], epochs=3)) == 5  # a filter needs its column


# Score ties (0.9) break to bg ascending; truth ties (0.75) break to fg ascending; the rows with an
# unknown score or truth do not count (the 0.875 truth would otherwise be the best).
PICKS = pd.DataFrame({
    "bg": [0.1, 0.05, 0.2, 0.2, 0.3, 0.3],
    "fg": [0.2, 0.3, 0.3, 0.25, 0.4, 0.5],
    "tecm": [0.9, 0.9, 0.8, 0.7, np.nan, 0.95],
    "val_miou": [0.25, 0.5, 0.75, 0.75, 0.875, np.nan],
})


def test_pick_quality_ties_regret_recall():
    q = pick_quality(PICKS, "tecm", ks=(1, 2, 3, 4, 10))
    assert q == {
        "score": "tecm", "truth": "val_miou", "n": 4,
        "pick": {"bg": 0.05, "fg": 0.3, "tecm": 0.9, "val_miou": 0.5},
        "best": {"bg": 0.2, "fg": 0.25, "val_miou": 0.75},
        "regret": 0.25,
        "recall": {"1": False, "2": False, "3": False, "4": True, "10": True},
    }


def test_pick_quality_best_pick_and_empty():
    q = pick_quality(PICKS, "val_miou", truth="tecm")
    assert q["pick"] == {"bg": 0.2, "fg": 0.25, "val_miou": 0.75, "tecm": 0.7}
    assert q["best"] == {"bg": 0.05, "fg": 0.3, "tecm": 0.9}
    assert q["regret"] == pytest.approx(0.2)
    assert q["recall"] == {"1": False, "3": True, "5": True}
    perfect = pick_quality(PICKS, "val_miou", truth="val_miou")
    assert perfect["regret"] == 0.0 and perfect["recall"]["1"]
    assert pick_quality(PICKS.assign(val_miou=np.nan), "tecm") is None
    assert pick_quality(PICKS, "tecm", truth="absent") is None


# ---- the paper's tables (configs/paper), typed from the paper; percent as printed -------------

def _table(i: int) -> pd.DataFrame:
    return pd.read_csv(PAPER / f"table{i}.csv")


def _cell(t: pd.DataFrame, bg: float, fg: float, col: str) -> float:
    row = t[np.isclose(t["bg"], bg) & np.isclose(t["fg"], fg)]
    assert len(row) == 1, (bg, fg)
    return float(row[col].iloc[0])


def _grid(offsets: tuple[float, ...]) -> list[tuple[float, float]]:
    return [(round(0.05 * i, 2), round(0.05 * i + o, 2)) for i in range(1, 9) for o in offsets]


@pytest.mark.parametrize(("i", "rows", "columns", "offsets"), [
    (1, 32, ["bg", "fg", "npr_pseudo", "val_miou", "pqs_pseudo", "degenerate"],
     (0.0, 0.10, 0.25, 0.40)),
    (2, 24, ["bg", "fg", "pqs_initial", "pqs_pseudo", "pqs_avg", "npr_initial", "npr_pseudo",
             "balance_ratio", "tecm"], (0.10, 0.25, 0.40)),
    (3, 32, ["bg", "fg", "pqs_pseudo", "pqs_initial", "miou_pseudo", "miou_initial", "pqs_diff",
             "miou_diff", "degenerate"], (0.0, 0.10, 0.25, 0.40)),
])
def test_paper_table_shape_columns_grid(i, rows, columns, offsets):
    t = _table(i)
    assert t.shape == (rows, len(columns))
    assert list(t.columns) == columns
    assert not t.isna().any().any()
    assert list(zip(t["bg"].round(2), t["fg"].round(2))) == _grid(offsets)
    if "degenerate" in t.columns:
        assert t["degenerate"].tolist() == np.isclose(t["bg"], t["fg"]).astype(int).tolist()


@pytest.mark.parametrize(("i", "bg", "fg", "col", "value"), [
    (1, 0.2, 0.3, "val_miou", 56.06),
    (1, 0.05, 0.45, "npr_pseudo", 73.18),
    (1, 0.1, 0.1, "val_miou", 50.40),
    (1, 0.4, 0.4, "pqs_pseudo", 49.74),
    (2, 0.4, 0.8, "tecm", 68.25),
    (2, 0.4, 0.8, "balance_ratio", 0.38),
    (2, 0.35, 0.6, "tecm", 61.94),
    (2, 0.05, 0.15, "pqs_avg", 43.955),
    (2, 0.05, 0.45, "npr_initial", 66.19),
    (2, 0.25, 0.65, "pqs_avg", 32.7),
    (3, 0.3, 0.7, "miou_diff", 19.58),
    (3, 0.35, 0.35, "miou_diff", -20.00),
    (3, 0.05, 0.45, "miou_initial", 51.21),
    (3, 0.4, 0.8, "pqs_initial", 5.63),
    (3, 0.15, 0.55, "pqs_diff", 13.58),
])
def test_paper_cells(i, bg, fg, col, value):
    assert _cell(_table(i), bg, fg, col) == value


def test_paper_tables_are_self_consistent():
    """Relations the paper's own definitions imply; a typo in any of these columns breaks one.
    The printed tables satisfy all of them (no known exception)."""
    t1, t2, t3 = _table(1), _table(2), _table(3)
    np.testing.assert_allclose(t2["pqs_avg"], (t2["pqs_initial"] + t2["pqs_pseudo"]) / 2,
                               rtol=0, atol=0.01)
    np.testing.assert_allclose(t3["pqs_diff"], t3["pqs_pseudo"] - t3["pqs_initial"],
                               rtol=0, atol=0.011)
    np.testing.assert_allclose(t3["miou_diff"], t3["miou_pseudo"] - t3["miou_initial"],
                               rtol=0, atol=0.011)
    pairs = ["bg", "fg"]
    m13 = t1.merge(t3, on=pairs, suffixes=("_1", "_3"))
    assert len(m13) == 32
    assert (m13["pqs_pseudo_1"] == m13["pqs_pseudo_3"]).all()
    assert (m13["val_miou"] == m13["miou_pseudo"]).all()
    m23 = t2.merge(t3, on=pairs, suffixes=("_2", "_3"))
    assert len(m23) == 24
    assert (m23["pqs_initial_2"] == m23["pqs_initial_3"]).all()
    assert (m23["pqs_pseudo_2"] == m23["pqs_pseudo_3"]).all()
    m21 = t2.merge(t1, on=pairs, suffixes=("_2", "_1"))
    assert len(m21) == 24
    assert (m21["npr_pseudo_2"] == m21["npr_pseudo_1"]).all()
    assert (t1.loc[t1["degenerate"] == 1, "npr_pseudo"] == 0).all()
    assert t2["balance_ratio"].between(0, 1).all()
    assert t2[["npr_initial", "npr_pseudo"]].stack().between(0, 100).all()
