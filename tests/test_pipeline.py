"""End to end on configs/ci.yaml: data -> classifier -> CAM store -> surface (slow, run in CI)."""

import os

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tune.space import grid_pairs
from wsss.metrics import threshold_surface
from wsss.stage0 import initial_surface, prepare

pytestmark = pytest.mark.slow


def test_cams_are_informative(ci_prepared):
    """Classifier mAP and the best pair's PQS clearly beat a random-CAM baseline."""
    p = ci_prepared
    labels = p.val.label_matrix()
    rng = np.random.default_rng(0)
    random_map = average_precision_score(labels, rng.random(labels.shape), average="macro")
    assert p.stats["classifier_map"] > random_map + 0.3, (p.stats, random_map)

    pairs = grid_pairs("paper")
    ours = initial_surface(p, pairs, progress=False)
    store, train = p.cams, p.train
    random = threshold_surface(
        (rng.random((len(store.keys(i)), *store.image_size(i)), dtype=np.float32)
         for i in range(len(store))),
        (store.keys(i) for i in range(len(store))),
        (train.mask(train.ids.index(store.ids[i])) for i in range(len(store))),
        pairs, train.num_classes)
    best = ours[ours.degenerate == 0].pqs.max()
    best_random = random[random.degenerate == 0].pqs.max()
    assert best > best_random + 0.10, (best, best_random)
    assert ours.pqs.between(0, 1).all() and ours.npr.between(0, 1).all()
    assert (ours.degenerate == (ours.bg == ours.fg)).all()


def test_store_covers_the_train_split(ci_prepared):
    p = ci_prepared
    assert p.cams.ids == p.train.ids
    for i in (0, len(p.train) - 1):
        assert p.cams.keys(i).tolist() == p.train.labels(i).tolist()
        s = p.cams.scores(i)
        assert s.shape[1:] == p.train.size(i)
        peaks = s.reshape(len(s), -1).max(axis=1)
        assert np.all(np.isclose(peaks, 1.0) | (peaks == 0))  # a dead (all-zero) CAM stays 0
    peaks = np.concatenate([np.asarray(p.cams[i], np.float32).reshape(len(p.cams.keys(i)), -1)
                            .max(axis=1) for i in range(len(p.cams))])
    assert np.mean(peaks > 0) > 0.95  # but nearly every present class activates


def test_second_prepare_reuses_everything(ci_config, ci_prepared):
    c = ci_config
    before = {f: os.stat(f).st_mtime_ns for f in (ci_prepared.classifier_path,
                                                  ci_prepared.cams.path / "data.npy",
                                                  ci_prepared.features.path / "data.npy")}
    again = prepare(c.data, c.classifier, c.cam, c.runtime.runs_root / "stores",
                    trial=c.trial, features=True, device=c.runtime.device, progress=False)
    assert again.cams.path == ci_prepared.cams.path
    assert again.features.path == ci_prepared.features.path
    assert {f: os.stat(f).st_mtime_ns for f in before} == before
    assert again.stats == ci_prepared.stats
    # a changed CAM setting rebuilds the store but reuses the classifier
    cam = c.cam.model_copy(update={"scales": [1.0]})
    other = prepare(c.data, c.classifier, cam, c.runtime.runs_root / "stores",
                    device=c.runtime.device, progress=False)
    assert other.cams.path != ci_prepared.cams.path
    assert other.classifier_path == ci_prepared.classifier_path
    assert os.stat(other.classifier_path).st_mtime_ns == before[ci_prepared.classifier_path]


def test_classifier_training_is_reproducible(ci_config, ci_prepared, tmp_path):
    """The same config trains the same classifier (initial weights included), so stage 0 and
    every number derived from it can be reproduced from a fresh cache."""
    c = ci_config
    again = prepare(c.data, c.classifier, c.cam, tmp_path / "stores", device=c.runtime.device,
                    progress=False)
    assert again.stats["classifier_map"] == ci_prepared.stats["classifier_map"]
    np.testing.assert_array_equal(np.asarray(again.cams[0]), np.asarray(ci_prepared.cams[0]))
