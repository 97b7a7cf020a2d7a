"""Benchmark: one AffinityNet trial on cached features vs recomputing the frozen backbone.

IRN detaches its backbone, so its features are the same in every epoch of every trial; IRN still
recomputes them for each batch. Ours reads them from the memory-mapped feature store that
``prepare`` wrote once. Both sides run the same `wsss.trial.Trial` with the ``irn`` refiner (same
head, loss, walk and metrics) on `configs/demo.yaml`; the reference only replaces where its
features come from. Run for the demo's
tiny backbone and for a mid-size one (``resnet18d``, random weights from a local file: the timing
does not depend on them). Target (issue #4): ratio >= 3x with the mid-size backbone.

    python benchmarks/trial.py [--config demo] [--bg 0.25 --fg 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from tune.config import load_config
from wsss.classifier import normalise_images
from wsss.stage0 import frozen_levels, prepare
from wsss.trial import Trial, run_trial


def recomputing(trial: Trial, backbone: torch.nn.Module, levels: list[int]) -> Trial:
    """The reference: the frozen backbone runs again for every batch of every epoch."""
    images = trial.images

    @torch.no_grad()
    def features(batch: list[int]) -> list[torch.Tensor]:
        x = np.stack([images.image(k) for k in batch])
        feats = backbone(normalise_images(torch.from_numpy(x).to(images.device)))
        return [feats[j].float() for j in levels]

    images.features = features  # the refiner reads its features through this one object
    return trial


def timed_trial(trial: Trial):
    start = time.perf_counter()
    metrics = list(run_trial(trial))[-1]
    return time.perf_counter() - start, metrics


def compare(cfg, spec, label: str, bg: float, fg: float) -> float:
    cache = cfg.runtime.runs_root / "stores"
    start = time.perf_counter()
    prepared = prepare(cfg.data, cfg.classifier, cfg.cam, cache, trial=spec, features=True,
                       device="cpu", progress=False)
    t_prepare = time.perf_counter() - start
    # the product's frozen backbone and levels, so the reference recomputes the same features
    backbone, _, levels = frozen_levels(spec, prepared.classifier_path, prepared.cams,
                                         torch.device("cpu"))
    ours_t, ours = timed_trial(Trial(prepared, spec, cfg.refine, bg, fg))
    ref = recomputing(Trial(prepared, spec, cfg.refine, bg, fg), backbone.eval(), levels)
    ref_t, theirs = timed_trial(ref)
    diff = max(abs(ours[k] - theirs[k]) for k in ("tecm", "pqs_pseudo", "npr_pseudo"))
    n = len(prepared.features)
    print(f"{label}: {n} images x {cfg.refine.epochs} epochs: cached {ours_t:.1f} s, recomputed "
          f"{ref_t:.1f} s (prepare incl. feature store {t_prepare:.1f} s); metrics differ by "
          f"{diff:.1e} (float16 cache)")
    ratio = ref_t / ours_t
    print(f"trial[{label}]: ratio={ratio:.2f} (ours cached features vs recomputed backbone)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--bg", type=float, default=0.25)
    ap.add_argument("--fg", type=float, default=0.5)
    ap.add_argument("--mid-size", default="resnet18d")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    compare(cfg, cfg.trial, cfg.classifier.model, args.bg, args.fg)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.mid_size}.pth"
        torch.save(timm.create_model(args.mid_size, pretrained=False).state_dict(), weights)
        mid = cfg.trial.model_copy(update={"backbone": args.mid_size, "output_stride": 8,
                                           "backbone_weights": weights})
        compare(cfg, mid, args.mid_size, args.bg, args.fg)


if __name__ == "__main__":
    main()
