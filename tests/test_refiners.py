"""The refiners (`wsss.refine`): their pieces on hand-made arrays, a trial each on the CI data,
and `wsss-tune trial` / `search` with each (slow ones run in CI)."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_trial

from tune.cli import main
from tune.config import load_config
from wsss.errors import UserError
from wsss.random_walk import half_plane_offsets
from wsss.refine import REFINERS, RefineSpec
from wsss.refine.crf import crf_unary
from wsss.refine.psa import feature_affinity
from wsss.regions import host
from wsss.trial import run_trial


def _needs_crf(method: str) -> None:
    if method == "crf":
        pytest.importorskip("pydensecrf.densecrf", reason="needs the [crf] extra (pydensecrf2)")


def test_registry_and_config_sections():
    assert {"irn", "psa", "crf"} <= set(REFINERS)
    spec = RefineSpec(method="crf")
    assert spec.epochs == 0 and spec.reports == 1 and not spec.needs_features
    psa = RefineSpec(method="psa", psa={"logt": 3, "epochs": 2})
    assert psa.section.walk_steps == 8 and psa.reports == 2 and psa.needs_features
    with pytest.raises(UserError, match=r"refine\.method: .*'crf', 'irn', 'psa'"):
        load_config("ci", ["refine.method=dcrf"])
    with pytest.raises(UserError, match=r"refine\.psa\.logt"):
        load_config("ci", ["refine.psa.logt=-1"])
    with pytest.raises(UserError, match="'affinity' section was split.*'trial'.*'refine.irn'"):
        load_config("ci", ["affinity.epochs=2"])


def test_feature_affinity_is_psa_distance_and_zero_off_the_map():
    x = torch.rand(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    aff = feature_affinity(x, 3)
    offsets = half_plane_offsets(3)
    assert aff.shape == (2, len(offsets), 6, 7)
    for k, (dy, dx) in enumerate(offsets):
        for y, xx in [(0, 0), (2, 3), (5, 6), (4, 0)]:
            ny, nx = y + dy, xx + dx
            inside = 0 <= ny < 6 and 0 <= nx < 7
            want = (torch.exp(-(x[:, :, y, xx] - x[:, :, ny, nx]).abs().mean(1)) if inside
                    else torch.zeros(2))
            torch.testing.assert_close(aff[:, k, y, xx], want)


def test_crf_unary_votes_for_confident_labels_and_keeps_cams_elsewhere():
    scores = np.array([[[0.9, 0.5], [0.1, 0.0]], [[0.0, 0.2], [0.6, 0.1]]], np.float32)
    keys = np.array([3, 7])
    regions = np.array([[3, 255], [255, 0]], np.uint8)
    p = crf_unary(scores, keys, regions, gt_prob=0.8)
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-6)
    assert p[1, 0, 0] == pytest.approx(0.8) and p[0, 1, 1] == pytest.approx(0.8)
    neutral = np.array([1 - 0.5, 0.5, 0.2]) / 1.2  # background 1 - max, then the CAM scores
    np.testing.assert_allclose(p[:, 0, 1], neutral, atol=1e-6)


@pytest.mark.slow
def test_psa_trial_learns_affinities(ci_config, ci_prepared):
    """PSA's embedding head trains on the affinity labels (the loss falls) and its walk changes
    the labels; every metric stays in range."""
    untrained = make_trial(ci_config, ci_prepared, 0.15, 0.4, "psa", epochs=3).evaluate()
    history = list(run_trial(make_trial(ci_config, ci_prepared, 0.15, 0.4, "psa", epochs=3)))
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["affinity_loss"] < history[0]["affinity_loss"]
    last = history[-1]
    assert last["pqs_pseudo"] != untrained["pqs_pseudo"]
    assert last["npr_pseudo"] < last["npr_initial"]
    assert 0 < last["pqs_pseudo"] < 1 and 0 <= last["tecm"] <= 2


@pytest.mark.slow
def test_crf_trial_reports_once_and_keeps_confident_pixels(ci_config, ci_prepared):
    _needs_crf("crf")
    trial = make_trial(ci_config, ci_prepared, 0.15, 0.4, "crf")
    (m,) = run_trial(trial)
    assert m["epoch"] == 1 and "affinity_loss" not in m and trial.reports == 1
    assert m["npr_pseudo"] < m["npr_initial"] and 0 < m["pqs_pseudo"] < 1
    labels = dict(trial.pseudo_labels(only=range(10)))
    kept = [np.mean(labels[trial.images.ids[k]][(r := host(trial.images.initial(k))) != 255]
                    == r[r != 255]) for k in range(10)]
    assert np.mean(kept) > 0.9  # confident pixels mostly keep their label


@pytest.mark.slow
@pytest.mark.parametrize("method", ["psa", "crf"])
def test_trial_command_with_each_refiner(method, ci_config, ci_prepared, tmp_path, capsys):
    _needs_crf(method)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "stores").symlink_to(ci_config.runtime.runs_root / "stores")
    assert main(["trial", "--config", "ci", "--bg", "0.2", "--fg", "0.45",
                 "--set", f"refine.method={method}", "--set", "refine.psa.epochs=2",
                 "--set", "trial.subset=40", "--set", f"data.root={ci_config.data.root}",
                 "--set", f"runtime.runs_root={runs}"]) == 0
    out = capsys.readouterr().out
    assert f"refiner {method}, on 40 train images" in out and "pqs_pseudo" in out
    assert ("epoch 2:" in out) == (method == "psa") and ("refined:" in out) == (method == "crf")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["psa", "crf"])
def test_search_with_each_refiner(method, ci_config, ci_prepared, tmp_path, capsys):
    """Both stages run with the refiner: a crf search makes one report per trial and says it
    stops nothing early; stage 2 refines the whole train split with it."""
    _needs_crf(method)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "stores").symlink_to(ci_config.runtime.runs_root / "stores")
    assert main(["search", "--config", "ci", "--space", "pairs",
                 "--set", "search.pairs=[[0.15, 0.4], [0.25, 0.5], [0.3, 0.3]]",
                 "--set", f"refine.method={method}", "--set", "refine.psa.epochs=2",
                 "--set", "trial.subset=40", "--set", "search.top_k=1",
                 "--set", "segmentation.epochs=1", "--set", "runtime.progress=true",
                 "--set", f"name={method}", "--set", f"data.root={ci_config.data.root}",
                 "--set", f"runtime.runs_root={runs}"]) == 0
    printed = capsys.readouterr().out
    assert f"refiner {method}" in printed
    t = pd.read_csv(runs / method / "stage1.csv")
    assert len(t) == 3 and t.training_iteration.max() == (2 if method == "psa" else 1)
    if method == "crf":
        assert "crf does not train: one report per trial" in printed
    s2 = pd.read_csv(runs / method / "stage2.csv")
    assert len(s2) == 1 and 0 < s2.val_miou.iloc[0] < 1


def test_a_missing_crf_package_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """Without the [crf] extra, a crf trial or search stops with one line naming the key,
    before stage 0 generates, trains or writes anything."""
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.chdir(tmp_path)
    for command in (["trial", "--bg", "0.2", "--fg", "0.45"], ["search"]):
        assert main([*command, "--config", "ci", "--set", "refine.method=crf"]) == 2
        assert "refine.method crf needs the optional dense CRF package" in capsys.readouterr().err
    assert main(["trial", "--bg", "0.2", "--fg", "0.45", "--config", "ci",
                 "--set", "refine.irn.crf=true"]) == 2
    assert "refine.irn.crf needs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
