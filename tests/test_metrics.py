"""Hand-computed values for every metric of docs/definitions.md, plus property tests."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsss.errors import UserError
from wsss.metrics import (
    COUNTS,
    Transitions,
    confusion,
    iou_per_class,
    mean_iou,
    region_metrics,
    self_pqs,
    tecm,
    tecm_aggregate,
    threshold_surface,
    transition_counts,
)
from wsss.regions import NEUTRAL, cam_scores, confident_regions, max_and_argmax

# One 2x3 image, classes 1 and 2 present, C = 3 (background + 2).
S1 = [[0.9, 0.2, 0.05], [0.5, 0.3, 0.0]]
S2 = [[0.1, 0.6, 0.05], [0.5, 0.1, 0.0]]
SCORES = np.array([S1, S2], dtype=np.float32)
KEYS = np.array([1, 2])
GT = np.array([[1, 2, 0], [2, 255, 0]], dtype=np.uint8)


def test_confusion_and_protocols():
    pred = np.array([[0, 1], [NEUTRAL, 2]], dtype=np.uint8)
    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    conf = confusion(pred, gt, 3)
    assert conf.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    np.testing.assert_allclose(iou_per_class(conf), [1.0, 0.5, np.nan])
    assert mean_iou(conf) == pytest.approx(0.75)  # empty class 2 left out
    assert mean_iou(conf, "puzzlecam") == pytest.approx(0.5)  # neutral a miss, mean over all 3
    np.testing.assert_allclose(iou_per_class(conf, "irn"), [0.5, 0.5, np.nan])  # neutral -> bg
    assert mean_iou(conf, "irn") == pytest.approx(0.5)


def test_all_ignore_mask_gives_nan_miou_but_counts_npr():
    conf = confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8), 3)
    assert conf.sum() == 0
    m = region_metrics(conf, n_pixels=4, n_neutral=1)
    assert m["npr"] == 0.25 and np.isnan(m["miou_nn"]) and np.isnan(m["pqs"])


def test_max_and_argmax_ties_go_to_lowest_class_whatever_the_key_order():
    scores = np.array([[[0.5, 0.2]], [[0.5, 0.7]]], dtype=np.float16)
    m, cls = max_and_argmax(scores, np.array([7, 3]))
    assert cls.tolist() == [[3, 3]] and m.dtype == np.float32
    np.testing.assert_array_equal(m, np.float16([[0.5, 0.7]]).astype(np.float32))
    m, cls = max_and_argmax(np.zeros((0, 2, 2)), np.array([], dtype=np.int64))
    assert (m == 0).all() and (cls == 0).all()


def test_regions_hand_computed():
    assert confident_regions(SCORES, KEYS, 0.1, 0.5).tolist() == [[1, 2, 0], [1, 255, 0]]
    # BG = FG = 0.3: the pixel exactly at 0.3 is background (background wins), nothing neutral
    assert confident_regions(SCORES, KEYS, 0.3, 0.3).tolist() == [[1, 2, 0], [1, 0, 0]]


def test_float16_scores_exactly_at_threshold():
    s = np.array([[[0.25, 0.5, 0.3]]], dtype=np.float16)  # 0.3 is 0.30004883 in float16
    k = np.array([1])
    assert confident_regions(s, k, 0.25, 0.5).tolist() == [[0, 1, 255]]
    assert confident_regions(s, k, 0.2, 0.3).tolist() == [[255, 1, 1]]  # f16(0.3) >= f32(0.3)
    assert confident_regions(s, k, 0.3, 0.6).tolist() == [[0, 255, 255]]  # f16(0.3) > f32(0.3)
    surf = threshold_surface([s], [k], [np.zeros((1, 3), np.uint8)], [(0.25, 0.5), (0.3, 0.6)], 2)
    assert surf["npr"].tolist() == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize("bg,fg", [(0.5, 0.4), (-0.1, 0.2), (0.1, 1.5), (float("nan"), 0.5)])
def test_bad_pairs_name_the_field(bg, fg):
    with pytest.raises(UserError, match=r"pairs\[0\]\.(bg|fg)"):
        threshold_surface([SCORES], [KEYS], [GT], [(bg, fg)], 3)


def test_surface_hand_computed():
    surf = threshold_surface([SCORES], [KEYS], [GT], [(0.1, 0.5), (0.3, 0.3), (0.0, 1.0)], 3)
    a, b, c = (surf.iloc[i] for i in range(3))
    # (0.1, 0.5): one neutral pixel (a GT-ignore one) of 6; conf rows [2,0,0] [0,1,0] [0,1,1]
    assert (a.bg, a.fg) == pytest.approx((0.1, 0.5))
    assert a.npr == pytest.approx(1 / 6) and a.miou_nn == pytest.approx(2 / 3)
    assert a.pqs == pytest.approx(2 / 3 * 5 / 6) and a.miou == pytest.approx(2 / 3)
    assert a.degenerate == 0
    # BG = FG: no neutral pixel, degenerate
    assert b.npr == 0 and b.degenerate == 1 and b.pqs == pytest.approx(2 / 3)
    # (0, 1): only the m = 0 pixel is confident; classes 1, 2 absent from prediction and
    # non-neutral truth are left out of miou_nn; the standard mIoU counts neutral as a miss.
    assert c.npr == pytest.approx(5 / 6) and c.miou_nn == pytest.approx(1.0)
    assert c.pqs == pytest.approx(1 / 6) and c.miou == pytest.approx((0.5 + 0 + 0) / 3)


def test_all_neutral_pqs_is_zero():
    s = np.full((1, 2, 2), 0.5, np.float32)
    surf = threshold_surface([s], [np.array([1])], [np.ones((2, 2), np.uint8)], [(0.1, 0.9)], 2)
    assert surf.npr[0] == 1.0 and surf.pqs[0] == 0.0


def test_tecm_hand_computed_and_edge_rules():
    assert tecm(0.2, 0.1, 30, 10) == pytest.approx((1 + 0.1 / (0.2 + 1e-6)) * 0.5)
    assert tecm(0.0, 0.3, 5, 1) == 1.0  # no neutral pixels: the paper's value, degenerate
    assert tecm(0.2, 0.2, 0, 0) == 0.0  # nothing resolved: balance 0
    assert tecm(0.1, 0.5, 1, 1) == 0.0  # NPR grew a lot: reduction clipped at 0
    assert tecm(0.5, 0.0, 5, 5) == pytest.approx(2.0, abs=1e-5)
    out = tecm(np.array([0.0, 0.2]), np.array([0.0, 0.1]), np.array([0, 3]), np.array([0, 1]))
    np.testing.assert_allclose(out, [1.0, (1 + 0.1 / (0.2 + 1e-6)) * 0.5])


def test_transition_counts_and_aggregations():
    initial = np.array([[255, 255, 0], [1, 255, 255]], np.uint8)
    refined = np.array([[0, 2, 0], [1, 255, 1]], np.uint8)
    counts = transition_counts(initial, refined)
    assert dict(zip(COUNTS, counts.tolist())) == {
        "n_pixels": 6, "neutral_initial": 4, "neutral_refined": 1, "n_to_b": 1, "n_to_f": 2}
    on_torch = transition_counts(torch.from_numpy(initial), torch.from_numpy(refined))
    assert isinstance(on_torch, torch.Tensor) and on_torch.tolist() == counts.tolist()
    a, b, c = [10, 4, 2, 1, 1], [10, 2, 2, 0, 0], [10, 0, 0, 0, 0]  # TECM 1.5, 0, excluded
    t = lambda *rows: Transitions(np.array(rows), np.zeros((2, 3), np.int64))  # noqa: E731
    value, degenerate = tecm_aggregate(t(a, b, c))
    assert value == pytest.approx((1 + 0.2 / (0.4 + 1e-6)) / 2) and not degenerate
    value, degenerate = tecm_aggregate(t(a, b, c), "pooled")
    assert value == pytest.approx(1 + (0.2 - 4 / 30) / (0.2 + 1e-6)) and not degenerate
    assert tecm_aggregate(t(c, c)) == (1.0, True)
    assert tecm_aggregate(t(c), "pooled") == (1.0, True)


def test_self_pqs_is_pqs_with_the_initial_regions_as_ground_truth():
    rng = np.random.default_rng(0)
    initial = [rng.choice(np.array([0, 1, 2, 255], np.uint8), (8, 9)) for _ in range(3)]
    refined = [rng.choice(np.array([0, 1, 2, 255], np.uint8), (8, 9)) for _ in range(3)]
    counts = Transitions.of(zip(initial, refined), 3)
    conf = sum(confusion(r, i, 3) for i, r in zip(initial, refined))
    np.testing.assert_array_equal(counts.agreement, conf)
    # region_metrics' PQS with the initial regions as GT, but NPR over all pixels of the images
    expected = region_metrics(conf, 3 * 72, sum(int((r == 255).sum()) for r in refined))["pqs"]
    assert self_pqs(counts) == pytest.approx(expected) and 0 < expected < 1
    same = Transitions.of(zip(initial, initial), 3)  # refinement changed nothing
    assert self_pqs(same) == pytest.approx(1 - sum(int((i == 255).sum()) for i in initial) / 216)
    neutral = np.full((2, 2), 255, np.uint8)
    assert self_pqs(Transitions.of([(neutral, neutral)], 3)) == 0.0


# ---- property tests -------------------------------------------------------------------------

LEVELS = np.float16([0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.5, 0.7, 1.0])  # thresholds too


@st.composite
def datasets(draw):
    c = draw(st.integers(2, 5))
    images = []
    for _ in range(draw(st.integers(1, 4))):
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        keys = np.array(sorted(draw(st.sets(st.integers(1, c - 1), max_size=c - 1))), np.int64)
        keys = draw(st.permutations(list(keys))) if keys.size else keys
        idx = draw(st.lists(st.integers(0, len(LEVELS) - 1), min_size=len(keys) * h * w,
                            max_size=len(keys) * h * w))
        scores = LEVELS[np.array(idx, dtype=np.int64)].reshape(len(keys), h, w)
        gt = np.array(draw(st.lists(st.sampled_from(list(range(c)) + [255]), min_size=h * w,
                                    max_size=h * w)), np.uint8).reshape(h, w)
        images.append((scores, np.array(keys, np.int64), gt))
    grid = [float(v) for v in LEVELS] + [0.15, 0.35]
    pairs = draw(st.lists(st.tuples(st.sampled_from(grid), st.sampled_from(grid)), min_size=1,
                          max_size=8))
    return c, images, [(min(p), max(p)) for p in pairs]


def naive_surface(c, images, pairs):
    rows = []
    for bg, fg in pairs:
        conf = np.zeros((c, c + 1), np.int64)
        n_pix = n_neu = 0
        for scores, keys, gt in images:
            reg = confident_regions(scores, keys, bg, fg)
            conf += confusion(reg, gt, c)
            n_pix += reg.size
            n_neu += int((reg == NEUTRAL).sum())
        rows.append({"bg": bg, "fg": fg, **region_metrics(conf, n_pix, n_neu)})
    return pd.DataFrame(rows)


@settings(max_examples=150, deadline=None)
@given(datasets())
def test_surface_equals_naive_per_pair(data):
    c, images, pairs = data
    fast = threshold_surface(*zip(*images), pairs=pairs, num_classes=c)
    slow = naive_surface(c, images, pairs)
    fast["bg"] = fast["bg"].astype(np.float32)
    fast["fg"] = fast["fg"].astype(np.float32)
    slow["bg"] = slow["bg"].astype(np.float32)
    slow["fg"] = slow["fg"].astype(np.float32)
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    ok = fast["miou_nn"].notna()  # all-neutral: PQS 0 while mIoU_nn is undefined
    assert (fast.loc[ok, "pqs"] <= fast.loc[ok, "miou_nn"] + 1e-12).all()


@given(st.floats(0, 1), st.floats(0, 1), st.integers(0, 10**6), st.integers(0, 10**6))
def test_tecm_in_range(npr_i, npr_r, b, f):
    assert 0.0 <= tecm(npr_i, npr_r, b, f) <= 2.0


def test_objective_registry():
    from wsss.objectives import OBJECTIVES, all_objectives, check_objective, register

    agree = np.array([[6, 0, 2], [2, 4, 2]])  # [C, C + 1], C = 2, pooled over both images
    t = Transitions(np.array([[10, 4, 2, 1, 1], [10, 2, 2, 0, 0]]), agree)
    values = all_objectives(t)
    assert set(values) >= {"tecm", "tecm_pooled", "spqs"}
    assert values["spqs"] == pytest.approx((6 / 8 + 4 / 6) / 2 * (1 - 4 / 20))
    assert values["tecm"] == tecm_aggregate(t)[0]
    assert values["tecm_pooled"] == tecm_aggregate(t, "pooled")[0]
    assert check_objective("tecm") == "tecm"
    with pytest.raises(UserError, match="search.objective 'pqs'"):
        check_objective("pqs")
    with pytest.raises(ValueError, match="already registered"):
        register("tecm", lambda counts: 0.0)
    assert len(OBJECTIVES) >= 2


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1),
       st.sampled_from([(0.1, 0.5), (0.3, 0.3), (0.0, 1.0), (0.25, 0.45)]))
def test_torch_inputs_give_what_numpy_inputs_give(k, h, w, seed, pair):
    """The trial computes regions, scores, pseudo-label counts and confusions in torch on its
    device; the same functions on numpy (the surface, the report, the tests) must agree."""
    rng = np.random.default_rng(seed)
    scores = rng.random((k, h, w)).astype(np.float16)
    keys = np.sort(rng.choice(np.arange(1, 6), k, replace=False))
    regions = confident_regions(scores, keys, *pair)
    on_torch = confident_regions(torch.from_numpy(scores), keys, *pair)
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.uint8
    np.testing.assert_array_equal(on_torch.numpy(), regions)
    gt = rng.choice(np.array([0, 1, 2, 3, 4, 5, 255], np.uint8), (h, w))
    np.testing.assert_array_equal(confusion(torch.from_numpy(regions), torch.from_numpy(gt), 6,
                                            validate=False).numpy(), confusion(regions, gt, 6))
    cams = rng.random((k, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(cam_scores(torch.from_numpy(cams), (h, w)).numpy(),
                                  cam_scores(cams, (h, w)))


def test_byte_bound_cache_stops_growing_at_its_budget():
    from wsss.refine.base import ByteBoundCache

    cache = ByteBoundCache(budget=100)
    cache.put("a", torch.zeros(20, dtype=torch.float32))  # 80 bytes: kept
    cache.put("b", (torch.zeros(8, dtype=torch.uint8), None, torch.zeros(4)))  # 24 more: over
    cache.put("c", [torch.zeros(20, dtype=torch.uint8)])  # 20 more: fits
    assert cache.get("a") is not None and cache.get("b") is None and cache.get("c") is not None
    assert cache.used == 100
