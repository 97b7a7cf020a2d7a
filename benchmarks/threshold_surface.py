"""Benchmark: one-pass `threshold_surface` vs the reference evaluate scripts' per-pair loop.

1,000 images of 64x64 with 1-3 present classes (VOC's 21 classes), the paper's 32-pair grid.
The reference does what PuzzleCAM's ``evaluate.py`` does for every threshold: rebuild the label
map, then loop over classes summing P, T and TP. Both must give identical numbers.
Target (issue #3): ratio >= 50x.

    python benchmarks/threshold_surface.py [--images 1000] [--size 64] [--repeat 3]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import best_of

from tune.space import grid_pairs
from wsss.metrics import threshold_surface
from wsss.regions import NEUTRAL, confident_regions

NUM_CLASSES = 21


def make_inputs(n: int, size: int, seed: int = 0):
    """Smooth CAM-like float16 scores and a ground truth that mostly agrees with them."""
    rng = np.random.default_rng(seed)
    scores, keys, gts = [], [], []
    for _ in range(n):
        k = rng.integers(1, 4)
        ids = np.sort(rng.choice(np.arange(1, NUM_CLASSES), size=k, replace=False))
        low = rng.random((k, size // 8, size // 8))
        s = np.kron(low, np.ones((8, 8)))
        s /= s.max(axis=(1, 2), keepdims=True)
        s = s.astype(np.float16).astype(np.float32)
        gt = np.where(s.max(0) > 0.5, ids[s.argmax(0)], 0).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.03] = NEUTRAL
        scores.append(s)
        keys.append(ids)
        gts.append(gt)
    return scores, keys, gts


def reference_surface(scores, keys, gts, pairs, num_classes):
    """The reference evaluate scripts' method: per pair, per image, per class."""
    rows = []
    for bg, fg in pairs:
        tp = np.zeros(num_classes, np.int64)
        p = np.zeros(num_classes, np.int64)
        t = np.zeros(num_classes, np.int64)
        neutral = total = 0
        for s, k, gt in zip(scores, keys, gts):
            pred = confident_regions(s, k, bg, fg)
            neutral += int((pred == NEUTRAL).sum())
            total += pred.size
            cal = (gt < 255) & (pred != NEUTRAL)
            mask = (pred == gt) & cal
            for c in range(num_classes):
                p[c] += np.sum((pred == c) & cal)
                t[c] += np.sum((gt == c) & cal)
                tp[c] += np.sum((gt == c) & mask)
        union = t + p - tp
        miou_nn = float(np.mean(tp[union > 0] / union[union > 0]))
        npr = neutral / total
        rows.append((bg, fg, npr, miou_nn, miou_nn * (1 - npr)))
    return np.array(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    scores, keys, gts = make_inputs(args.images, args.size)
    pairs = grid_pairs("paper")
    t_ours, ours = best_of(lambda: threshold_surface(scores, keys, gts, pairs, NUM_CLASSES),
                           args.repeat)
    t_ref, ref = best_of(lambda: reference_surface(scores, keys, gts, pairs, NUM_CLASSES), 1)
    got = ours[["bg", "fg", "npr", "miou_nn", "pqs"]].to_numpy()
    diff = float(np.abs(got - ref).max())
    print(f"images={args.images} size={args.size} pairs={len(pairs)}: ours {t_ours:.3f} s, "
          f"reference {t_ref:.2f} s, max |difference| {diff:.1e}")
    print(f"threshold_surface: ratio={t_ref / t_ours:.1f} (ours vs per-pair per-class loop); "
          f"identical={diff == 0.0}")
    if diff != 0.0:
        raise SystemExit("results differ from the reference")


if __name__ == "__main__":
    main()
