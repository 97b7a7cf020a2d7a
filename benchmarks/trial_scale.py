"""Benchmark: a stage-1 trial epoch at VOC-like scale, per phase, against the per-image host loop.

The paper's premise is that a trial is cheap next to a DeepLabv3+ training. This measures one
``irn`` trial on synthetic VOC-like data (``--count`` train images of ``--size`` pixels,
``--classes`` classes) with a frozen timm backbone (``--backbone``, random weights from a local
file: timings do not depend on them) and IRN's radii and steps (label radius 10, walk radius 5,
256 steps, batch 8), on the CPU and, where present, on CUDA. Per epoch it prints the time of each
phase (features, affinity labels, head forward + backward, walk, pseudo-labels + metrics), images
per second, and the process's CPU time next to the wall time; then a DeepLabv3+ epoch
(``--seg-encoder``) on the same images for scale.

The reference is the loop the trial replaced, measured in the same run on the same inputs and
weights: affinity labels rebuilt in numpy for every image of every batch, and evaluation one
image at a time on the host (edge map copied to the CPU, `propagate` per image, numpy
pseudo-labels, confusion matrices and transition counts). Targets (issue #10): on CUDA an epoch
of 400 images at 320x320 with resnet50d in <= 4 s with CPU time below wall time; on 2 CPU cores
the same epoch at least 2x faster than the reference.

    python benchmarks/trial_scale.py [--count N --size 320 --classes 12 --device auto]

``--count`` defaults to 400 images on CUDA and 24 on a CPU (2 cores: about two minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import timm
import torch

import wsss.refine.affinity as affinity_module
from wsss.cam import CamSpec
from wsss.classifier import ClassifierSpec
from wsss.data import DataSpec, SyntheticSpec
from wsss.devices import resolve_device
from wsss.metrics import Transitions, confusion, region_metrics
from wsss.objectives import all_objectives
from wsss.pseudo_labels import pseudo_labels
from wsss.random_walk import propagate
from wsss.refine import RefineSpec
from wsss.refine.affinity import affinity_labels, affinity_loss
from wsss.refine.irn import IrnSpec
from wsss.regions import host
from wsss.segmentation import SegmentationSpec, build_model, train_segmentation
from wsss.stage0 import TrialSpec, prepare
from wsss.trial import Trial

REPO = Path(__file__).resolve().parents[1]
PHASES = ("features", "labels", "head", "walk", "pseudo+metrics")


class Phases:
    """Wall time per phase, CUDA-synchronised at each boundary so the times add up."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[phase] += time.perf_counter() - start


@contextlib.contextmanager
def patched(owner: object, name: str, wrapper) -> Iterator[None]:
    """``owner.name`` replaced by ``wrapper(original)`` for the duration."""
    original, own = getattr(owner, name), name in vars(owner)
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # uncovers the class's method again


def ours_epoch(trial: Trial, phases: Phases) -> dict[str, float]:
    """One epoch of the product's trial, its phases timed by wrapping what it calls: features,
    labels and walk directly; the head is the rest of training (forward, loss, backward, step)
    plus its forward in evaluation; pseudo-labels + metrics the rest of evaluation."""
    stage = {"now": "train"}
    split = defaultdict(float)  # (stage, phase) -> seconds

    def timing(phase):
        def wrap(fn):
            def timed(*a, **k):
                phases.sync()
                start = time.perf_counter()
                out = fn(*a, **k)
                phases.sync()
                split[stage["now"], phase] += time.perf_counter() - start
                return out
            return timed
        return wrap

    def staged(name):
        def wrap(fn):
            def run_stage(*a, **k):
                stage["now"] = name
                return timing("total")(fn)(*a, **k)
            return run_stage
        return wrap

    with contextlib.ExitStack() as stack:
        for owner, name, wrapper in [
                (trial.images, "features", timing("features")),
                (affinity_module, "affinity_labels", timing("labels")),
                (affinity_module, "walk", timing("walk")),
                (trial.refiner.head, "forward", timing("head")),
                (trial.refiner, "train_epoch", staged("train")),
                (trial, "evaluate", staged("eval"))]:
            stack.enter_context(patched(owner, name, wrapper))
        metrics = trial.step()
    s = phases.seconds
    s["features"] = split["train", "features"] + split["eval", "features"]
    s["labels"] = split["train", "labels"]
    s["walk"] = split["eval", "walk"]
    s["head"] = (split["train", "total"] - split["train", "features"] - s["labels"]
                 + split["eval", "head"])
    s["pseudo+metrics"] = (split["eval", "total"] - split["eval", "features"]
                           - split["eval", "head"] - s["walk"])
    return metrics


def reference_epoch(trial: Trial, phases: Phases) -> dict[str, float]:
    """The replaced loop on the same refiner state: numpy labels per image, per-image host
    evaluation."""
    images, refiner, spec = trial.images, trial.refiner, trial.refiner.spec
    device = images.device
    refiner.head.train()
    rng = np.random.default_rng([images.seed, trial.epoch])
    batches = images.batches(rng.permutation(len(images)), spec.batch_size)
    for b in rng.permutation(len(batches)).tolist():
        batch = batches[b]
        with phases.timed("features"):
            feats = images.features(batch)
        with phases.timed("labels"):
            masks = [affinity_labels(host(refiner.label_regions(k)), spec.label_radius)
                     for k in batch]
            labels = [torch.from_numpy(np.stack([m[t] for m in masks])).float().to(device)
                      for t in range(3)]
        with phases.timed("head"):
            edge = torch.sigmoid(refiner.head(feats, images.grid(batch[0])))
            loss = affinity_loss(refiner.affinity(edge, spec.label_radius), labels)
            refiner.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            refiner.optimizer.step()
    trial.epoch += 1
    refiner.head.eval()
    c = images.prepared.train.num_classes
    pairs, conf_p = [], np.zeros((c, c + 1), np.int64)
    for batch in images.batches(range(len(images)), spec.batch_size):
        with phases.timed("features"):
            feats = images.features(batch)
        with phases.timed("head"), torch.no_grad():
            edges = torch.sigmoid(refiner.head(feats, images.grid(batch[0]))).cpu()
        for k, edge in zip(batch, edges):
            keys = images.keys(k)
            with phases.timed("walk"):
                cams = host(images.cams(k))
                refined = cams if len(keys) == 0 else propagate(
                    torch.from_numpy(cams), edge, radius=spec.walk_radius, beta=spec.beta,
                    steps=spec.steps).numpy()
            with phases.timed("pseudo+metrics"):
                pseudo = pseudo_labels(refined, keys, images.image_size(k), images.bg, images.fg)
                initial, gt = (None if t is None else host(t)
                               for t in images.initial_and_truth(k))
                pairs.append((initial, pseudo))
                conf_p += confusion(pseudo, gt, c)
    with phases.timed("pseudo+metrics"):
        t = Transitions.of(pairs, c)
    pixels = int(t["n_pixels"].sum())
    return {**all_objectives(t),
            "pqs_pseudo": region_metrics(conf_p, pixels, int(t["neutral_refined"].sum()))["pqs"]}


def run(name: str, trial: Trial, epoch_fn, epochs: int) -> list[float]:
    """Epoch walls of ``trial`` under ``epoch_fn``, printed with the phases and CPU time."""
    walls, last = [], {}
    for epoch in range(1, epochs + 1):
        phases = Phases(trial.images.device)
        cpu, start = time.process_time(), time.perf_counter()
        last = epoch_fn(trial, phases)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        walls.append(wall)
        split = ", ".join(f"{p} {phases.seconds[p]:.2f}" for p in PHASES)
        print(f"  {name} epoch {epoch}: {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"({len(trial.images) / wall:.1f} img/s): {split}", flush=True)
    print(f"  {name}: TECM {last['tecm']:.4f}, PQS pseudo {last['pqs_pseudo']:.4f}")
    return walls


def segmentation_epoch(prepared, trial: Trial, encoder: str, device: torch.device) -> float:
    """One DeepLabv3+ epoch on the trial's images and pseudo-labels, for scale."""
    labels = dict(trial.pseudo_labels())
    ids = prepared.train.ids
    spec = SegmentationSpec(encoder=encoder, encoder_output_stride=16, epochs=1, batch_size=8,
                            decoder_channels=256)
    model = build_model(spec, prepared.train.num_classes)
    start = time.perf_counter()
    train_segmentation(model, prepared.train, lambda i: labels[ids[i]], spec, device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=None,
                    help="train images (default: 400 on CUDA, 24 on a CPU)")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--backbone", default="resnet50d")
    ap.add_argument("--seg-encoder", default="resnet50d")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--bg", type=float, default=0.25)
    ap.add_argument("--fg", type=float, default=0.5)
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "bench-trial-scale")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.count = args.count or (400 if device.type == "cuda" else 24)
    name = f"{args.size}px-{args.count}-{args.classes}c"
    data = DataSpec(root=args.root / name, synthetic=SyntheticSpec(
        n_train=args.count, n_val=8, size=args.size, classes=args.classes, max_objects=4))
    weights = args.root / f"{args.backbone}-random.pth"  # one file: the feature store stays cached
    if not weights.is_file():
        args.root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(timm.create_model(args.backbone, pretrained=False).state_dict(), weights)
    spec = TrialSpec(backbone=args.backbone, backbone_weights=weights, output_stride=16)
    start = time.perf_counter()
    prepared = prepare(data, ClassifierSpec(model="test_byobnet", output_stride=8, epochs=2),
                       CamSpec(scales=[1.0], flip=False), args.root / "stores", trial=spec,
                       features=True, device=str(device), progress=False)
    print(f"{name}: stage 0 {time.perf_counter() - start:.1f} s (cached after the first run); "
          f"{args.backbone} frozen features, levels {prepared.features.manifest['levels']}, "
          f"CAM grid {prepared.cams.shapes[0][1:]}; {device}, {torch.get_num_threads()} "
          f"threads")
    refine = RefineSpec(irn=IrnSpec(label_radius=10, walk_radius=5, steps=256, batch_size=8,
                                    epochs=args.epochs))

    def fresh() -> Trial:
        return Trial(prepared, spec, refine, args.bg, args.fg, device=device)

    ours = run("ours", fresh(), ours_epoch, args.epochs)
    reference = run("reference", fresh(), reference_epoch, args.epochs)
    seg = segmentation_epoch(prepared, fresh(), args.seg_encoder, device)
    print(f"  DeepLabv3+ ({args.seg_encoder}, output stride 16) epoch on the same images: "
          f"{seg:.2f} s")
    ratio = np.mean(reference) / np.mean(ours)
    print(f"trial_scale[{device.type}]: ratio={ratio:.2f} (reference per-image host loop / "
          f"ours, mean epoch {np.mean(ours):.2f} s vs {np.mean(reference):.2f} s)")


if __name__ == "__main__":
    main()
