"""Benchmark: one AffinityNet trial on cached features vs recomputing the frozen backbone.

IRN detaches its backbone, so its features are the same in every epoch of every trial; IRN still
recomputes them for each batch. Ours reads them from the memory-mapped feature store that
``prepare`` wrote once. Both sides run the same `AffinityTrial` (same head, loss, walk and metrics)
on `configs/demo.yaml`; the reference only overrides where features come from. Run for the demo's
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
from wsss.pipeline import AffinityTrial, Prepared, _frozen_levels, prepare, run_trial


class RecomputingTrial(AffinityTrial):
    """The reference: the frozen backbone runs again for every batch of every epoch."""

    def __init__(self, *args, backbone: torch.nn.Module, levels: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone, self.levels = backbone.eval(), levels

    @torch.no_grad()
    def _features(self, batch: list[int]) -> list[torch.Tensor]:
        train = self.prepared.train
        images = np.stack([train.image(self.train_index[k]) for k in batch])
        feats = self.backbone(normalise_images(torch.from_numpy(images).to(self.device)))
        return [feats[j].float() for j in self.levels]


def timed_trial(trial: AffinityTrial, prepared: Prepared, spec, bg: float, fg: float):
    start = time.perf_counter()
    metrics = list(run_trial(bg, fg, prepared, spec, trial=trial))[-1]
    return time.perf_counter() - start, metrics


def compare(cfg, affinity, label: str, bg: float, fg: float) -> float:
    cache = cfg.runtime.runs_root / "stores"
    start = time.perf_counter()
    prepared = prepare(cfg.data, cfg.classifier, cfg.cam, cache, affinity=affinity,
                       device="cpu", progress=False)
    t_prepare = time.perf_counter() - start
    # the product's frozen backbone and levels, so the reference recomputes the same features
    backbone, _, levels = _frozen_levels(affinity, prepared.classifier_path, prepared.cams,
                                         torch.device("cpu"))
    ours_t, ours = timed_trial(AffinityTrial(prepared, affinity, bg, fg), prepared, affinity, bg,
                               fg)
    ref = RecomputingTrial(prepared, affinity, bg, fg, backbone=backbone, levels=levels)
    ref_t, theirs = timed_trial(ref, prepared, affinity, bg, fg)
    diff = max(abs(ours[k] - theirs[k]) for k in ("tecm", "pqs_pseudo", "npr_pseudo"))
    n = len(prepared.features)
    print(f"{label}: {n} images x {affinity.epochs} epochs: cached {ours_t:.1f} s, recomputed "
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
    compare(cfg, cfg.affinity, cfg.classifier.model, args.bg, args.fg)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.mid_size}.pth"
        torch.save(timm.create_model(args.mid_size, pretrained=False).state_dict(), weights)
        mid = cfg.affinity.model_copy(update={"backbone": args.mid_size, "output_stride": 8,
                                              "backbone_weights": weights})
        compare(cfg, mid, args.mid_size, args.bg, args.fg)


if __name__ == "__main__":
    main()
