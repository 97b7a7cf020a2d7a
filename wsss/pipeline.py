"""Stage 0 of a search: ``prepare`` the expensive, threshold-independent artefacts once.

The classifier and the CAM store are cached under ``cache_root`` by a key derived from exactly
what produced them (the stage's spec and the dataset's content fingerprint), so a second search
with the same settings does no stage-0 work, and any change to data or settings rebuilds only what
it affects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from wsss.affinity import AffinitySpec, EdgeHead, affinity_labels, affinity_loss, downsample_regions
from wsss.cam import CamSpec, extract_cams, strided_size
from wsss.classifier import (
    CamClassifier,
    ClassifierSpec,
    create_backbone,
    load_classifier,
    mean_average_precision,
    normalise_images,
    resolve_device,
    save_classifier,
    train_classifier,
)
from wsss.data import DataSpec, SegDataset
from wsss.errors import UserError
from wsss.interop import ImportSpec, import_cams
from wsss.metrics import (
    confusion,
    region_metrics,
    threshold_surface,
    transition_counts,
)
from wsss.objectives import all_objectives
from wsss.pseudo_labels import pseudo_labels
from wsss.random_walk import propagate
from wsss.regions import check_pair, confident_regions, crf_regions
from wsss.store import CamStore, FeatureStore, write_json_atomic

log = logging.getLogger("wsss")


def digest(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts: the cache key of what they produce."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Prepared:
    """What trials share: the datasets, the trained classifier and the train split's CAMs."""

    train: SegDataset
    val: SegDataset | None
    classifier_path: Path | None  # None with imported CAMs
    cams: CamStore
    features: FeatureStore | LiveFeatures | None  # built only when trials will run
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, data: DataSpec, cams: Path, features: Path | None,
             classifier_path: Path | None = None) -> Prepared:
        """Reopen what `prepare` built (read-only memory maps, no hashing, no training): how a
        search's trial workers, on any node that reads the same paths, get their inputs."""
        return cls(train=data.open("train", require_masks=False), val=None,
                   classifier_path=classifier_path, cams=CamStore(cams),
                   features=None if features is None else FeatureStore(features))

    def with_live_features(self, affinity: AffinitySpec, device: str = "auto") -> Prepared:
        """The same inputs with every train image's frozen features computed on demand
        (`LiveFeatures`): what stage 2 and label export need, without a full-split store."""
        dev = resolve_device(device)
        backbone, _, levels = _frozen_levels(affinity, self.classifier_path, self.cams, dev)
        return replace(self, features=LiveFeatures(backbone, self.train, levels, dev))


def _bars_off(progress: bool) -> bool | None:
    """tqdm's ``disable``: off unless asked for, and off on a non-terminal (None), where every
    refresh would be appended to one ever-growing line of a log file."""
    return None if progress else True


def _not_built(what: str, path: Path, build: bool) -> None:
    """With ``build`` off, a stage-0 artefact that is not cached is an error, not a training."""
    if not build:
        raise UserError(f"stage 0 is not cached: no current {what} at {path}")


def _classifier(spec: ClassifierSpec, train: SegDataset, val: SegDataset | None, key: str,
                cache_root: Path, device: torch.device, progress: bool,
                build: bool = True) -> tuple[Path, dict]:
    folder = cache_root / f"classifier-{key}"
    path, stats_path = folder / "model.pt", folder / "stats.json"
    if path.is_file() and stats_path.is_file():
        log.debug("classifier: cached at %s", folder)
        return path, json.loads(stats_path.read_text())
    _not_built("classifier", folder, build)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)  # the initial weights too: the same config trains the same model
    model = CamClassifier(spec.backbone(), train.num_classes - 1)
    start = time.perf_counter()
    with tqdm(total=spec.epochs, desc="classifier", unit="epoch",
              disable=_bars_off(progress)) as bar:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
        train_classifier(model, train, spec, device, progress=on_epoch)
    stats = {"classifier_train_s": round(time.perf_counter() - start, 2),
             "classifier_map": None if val is None else mean_average_precision(model, val, device),
             "classifier_params": sum(p.numel() for p in model.parameters())}
    save_classifier(model, path, {"model": spec.model, "output_stride": spec.output_stride,
                                  "num_foreground": train.num_classes - 1,
                                  "class_names": list(train.class_names)})
    write_json_atomic(stats_path, stats)
    m = stats["classifier_map"]
    log.info("classifier: trained in %.1f s, val mAP %s", stats["classifier_train_s"],
             "n/a (no val split)" if m is None else f"{m:.2%}")
    return path, stats


def _cam_store(spec: CamSpec, train: SegDataset, classifier_path: Path, manifest: dict,
               path: Path, device: torch.device, progress: bool, build: bool = True) -> CamStore:
    if CamStore.is_current(path, manifest):
        log.debug("CAM store: current at %s", path)
        return CamStore(path)
    _not_built("CAM store", path, build)
    model, _ = load_classifier(classifier_path, device)
    sizes = [train.size(i) for i in range(len(train))]
    keys = [train.labels(i).tolist() for i in range(len(train))]
    shapes = [(len(k), *strided_size(s, spec.store_stride)) for k, s in zip(keys, sizes)]
    cams = tqdm(extract_cams(model, train, spec, device), total=len(train), desc="CAMs",
                unit="img", disable=_bars_off(progress))
    return CamStore.write(path, train.ids, shapes, cams, manifest,
                          meta={"keys": keys, "image_size": [list(s) for s in sizes]})


def _levels(backbone: torch.nn.Module, levels: list[int] | None, stride: int) -> list[int]:
    """Feature levels for the edge head: by default every level at the CAM grid's stride or
    coarser (IRN's boundary branch uses all stride-4..16 stages)."""
    reductions = backbone.feature_info.reduction()
    if levels is None:
        return [j for j, r in enumerate(reductions) if r >= stride]
    bad = [j for j in levels if not 0 <= j < len(reductions)]
    if bad or not levels:
        raise UserError(f"affinity.levels {levels}: expected indices in 0..{len(reductions) - 1} "
                        f"(the backbone's levels have strides {reductions})")
    return sorted(set(levels))


def _grid_stride(store: CamStore, j: int) -> int:
    """The stride of image j's CAM grid (4 for IRN's strided CAMs, 1 for high-resolution)."""
    return max(1, round(store.image_size(j)[0] / store.shapes[j][1]))


def _extract_features(model: torch.nn.Module, data: SegDataset, n: int, levels: list[int],
                      batch_size: int, device: torch.device):
    """Yield each of the first ``n`` images' chosen feature levels (float16 numpy arrays)."""
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        if len({data.size(i) for i in idx}) > 1:  # mixed sizes: one image at a time
            for i in idx:
                yield from _extract_features_batch(model, data, [i], levels, device)
        else:
            yield from _extract_features_batch(model, data, list(idx), levels, device)


@torch.no_grad()
def _extract_features_batch(model: torch.nn.Module, data: SegDataset, idx: list[int],
                            levels: list[int], device: torch.device):
    x = torch.from_numpy(np.stack([data.image(i) for i in idx])).to(device)
    feats = model(normalise_images(x))
    chosen = [feats[j].half().cpu().numpy() for j in levels]
    for b in range(len(idx)):
        yield [f[b] for f in chosen]


def _feature_store(model: torch.nn.Module, train: SegDataset, n: int, levels: list[int],
                   manifest: dict, path: Path, device: torch.device, batch_size: int,
                   progress: bool, build: bool = True) -> FeatureStore:
    if FeatureStore.is_current(path, manifest):
        log.debug("feature store: current at %s", path)
        return FeatureStore(path)
    _not_built("feature store", path, build)
    sizes = [train.size(i) for i in range(n)]
    with torch.no_grad():  # level shapes per distinct image size, from one dummy forward each
        shape_of = {}
        for size in set(sizes):
            feats = model(torch.zeros(1, 3, *size, device=device))
            shape_of[size] = [tuple(feats[j].shape[1:]) for j in levels]
    items = tqdm(_extract_features(model, train, n, levels, batch_size, device), total=n,
                 desc="features", unit="img", disable=_bars_off(progress))
    return FeatureStore.write_levels(path, train.ids[:n], [shape_of[s] for s in sizes], items,
                                     manifest)


def _frozen_backbone(affinity: AffinitySpec, classifier_path: Path | None,
                     device: torch.device) -> tuple[torch.nn.Module, Any]:
    """AffinityNet's frozen backbone and its cache key: a timm model from a local weights file
    when configured (needed with imported CAMs), else the trained classifier's backbone."""
    if affinity.backbone is not None:
        if affinity.backbone_weights is None:
            raise UserError("affinity.backbone_weights is required with affinity.backbone: the "
                            "frozen features must come from trained weights (a local file)")
        backbone = create_backbone(affinity.backbone, affinity.output_stride,
                                   affinity.backbone_weights)
        weights = affinity.backbone_weights
        key = [affinity.backbone, affinity.output_stride, weights.stat().st_size,
               weights.stat().st_mtime_ns]
        return backbone.to(device).eval(), key
    if classifier_path is None:
        raise UserError("with import_cams set, affinity.backbone (a timm model name) and "
                        "affinity.backbone_weights (a local file) must be set: there is no "
                        "trained classifier to take features from")
    model, _ = load_classifier(classifier_path, device)
    # keyed by the classifier's content key (its cache folder), not its path: the same
    # classifier reached through another runs root or a moved folder reuses its features
    return model.backbone, classifier_path.parent.name


def _frozen_levels(affinity: AffinitySpec, classifier_path: Path | None, store: CamStore,
                   device: torch.device) -> tuple[torch.nn.Module, Any, list[int]]:
    """The frozen backbone, its cache key and the feature levels the edge head reads."""
    backbone, key = _frozen_backbone(affinity, classifier_path, device)
    return backbone, key, _levels(backbone, affinity.levels, _grid_stride(store, 0))


class LiveFeatures:
    """`FeatureStore`'s reading interface (``ids``, ``manifest["channels"]``, ``features``)
    over the frozen backbone itself, one image per call. Stage 2 needs every train image's
    features once per candidate; stored, a full VOC split would take hundreds of GB at stride 4.
    Features are rounded to float16 like the store's, so an edge head sees the same inputs."""

    def __init__(self, backbone: torch.nn.Module, data: SegDataset, levels: list[int],
                 device: torch.device) -> None:
        self.backbone, self.data, self.levels, self.device = backbone, data, levels, device
        self.ids: list[str] = list(data.ids)
        self.manifest = {"channels": [backbone.feature_info.channels()[j] for j in levels]}

    def __len__(self) -> int:
        return len(self.ids)

    def features(self, i: int) -> list[np.ndarray]:
        return next(_extract_features_batch(self.backbone, self.data, [i], self.levels,
                                            self.device))


def prepare(data: DataSpec, classifier: ClassifierSpec, cam: CamSpec, cache_root: Path, *,
            affinity: AffinitySpec | None = None, imported: ImportSpec | None = None,
            device: str = "auto", progress: bool = True, build: bool = True) -> Prepared:
    """Datasets, classifier and CAM store, each reused from ``cache_root`` when still valid;
    with ``affinity`` given, a feature store of the images trials use (``affinity.subset``).
    ``build=False`` only reopens what is cached (a `UserError` says what is not, and nothing is
    generated, trained or extracted): how a report reads a finished search's stores."""
    if build:
        data.ensure()
    elif not data.root.is_dir():
        raise UserError(f"data.root {data.root} is not a folder")
    train = data.open("train", require_masks=False)  # TECM needs no ground truth
    val = data.open("val") if data.has_split("val") else None
    dev = resolve_device(device)
    fingerprint = train.fingerprint()
    if imported is None:
        clf_key = digest(classifier.model_dump(mode="json"), fingerprint)
        clf_path, stats = _classifier(classifier, train, val, clf_key, cache_root, dev, progress,
                                      build)
        manifest = {"kind": "cams", "classifier": clf_key, "cam": cam.model_dump(mode="json"),
                    "dataset": fingerprint, "split": "train", "n_images": len(train),
                    "num_classes": train.num_classes, "dtype": "float16"}
        store_path = cache_root / f"cams-{digest(manifest)}"
        store = _cam_store(cam, train, clf_path, manifest, store_path, dev, progress, build)
    else:
        clf_path, stats = None, {"classifier_map": None, "cams": f"imported {imported.format}"}
        key = digest(imported.model_dump(mode="json"), fingerprint)
        if not (cache_root / f"cams-{key}").is_dir():
            _not_built("imported CAM store", cache_root / f"cams-{key}", build)
        store = import_cams(imported.format, imported.dir, train, cache_root / f"cams-{key}",
                            allow_pickle=imported.allow_pickle, resolution=imported.resolution)
    if affinity is None:
        return Prepared(train=train, val=val, classifier_path=clf_path, cams=store,
                        features=None, stats=stats)
    backbone, backbone_key, levels = _frozen_levels(affinity, clf_path, store, dev)
    n = len(train) if affinity.subset is None else min(affinity.subset, len(train))
    channels = [backbone.feature_info.channels()[j] for j in levels]
    f_manifest = {"kind": "features", "backbone": backbone_key, "dataset": fingerprint,
                  "split": "train", "n_images": n, "levels": levels, "channels": channels,
                  "dtype": "float16"}
    features = _feature_store(backbone, train, n, levels, f_manifest,
                              cache_root / f"features-{digest(f_manifest)}", dev,
                              cam.batch_size, progress, build)
    return Prepared(train=train, val=val, classifier_path=clf_path, cams=store,
                    features=features, stats=stats)


def initial_surface(prepared: Prepared, pairs: Sequence[tuple[float, float]],
                    subset: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Initial-region metrics of every pair over the train split (or its first ``subset``)."""
    train, store = prepared.train, prepared.cams
    if not train.has_masks:
        raise UserError(f"the surface scores initial regions against ground truth, and the "
                        f"train split has no masks in {train.root / train.mask_dir}")
    n = len(train) if subset is None else min(subset, len(train))
    idx = [store.position(train.ids[i]) for i in range(n)]
    scores = (store.scores(j)
              for j in tqdm(idx, desc="surface", unit="img", disable=_bars_off(progress)))
    return threshold_surface(scores, (store.keys(j) for j in idx),
                             (train.mask(i) for i in range(n)), pairs, train.num_classes)



EVAL_CACHE_BYTES = 256 * 2**20  # a VOC trial subset of 1000 images needs ~375 MB


class AffinityTrial:
    """One (BG, FG) trial: AffinityNet's edge head trained on the cached features of the trial
    images, random-walk refinement, pseudo-labels with the same pair, and every metric.

    State (head, optimiser, epoch) round-trips through `state_dict`, so a search can checkpoint
    after any epoch and resume. Deterministic for a seed on CPU.
    """

    def __init__(self, prepared: Prepared, spec: AffinitySpec, bg: float, fg: float, *,
                 device: str | torch.device = "cpu"):
        self.bg, self.fg = check_pair(bg, fg)
        self.prepared, self.spec = prepared, spec
        self.device = resolve_device(device)
        feats = prepared.features
        self.index = [prepared.cams.position(i) for i in feats.ids]  # trial image -> CAM store
        position = {image_id: i for i, image_id in enumerate(prepared.train.ids)}
        self.train_index = [position[i] for i in feats.ids]  # O(n), not ids.index per image
        torch.manual_seed(spec.seed)
        channels = feats.manifest["channels"]
        self.head = EdgeHead(channels, spec.hidden).to(self.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=spec.lr,
                                           weight_decay=spec.weight_decay)
        self.epoch = 0
        self._label_cache: dict[int, np.ndarray] = {}
        self._eval_cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._eval_bytes = 0
        self._conf_initial: np.ndarray | None = None

    # ---- data -------------------------------------------------------------------------------
    def _grid(self, k: int) -> tuple[int, int]:
        return tuple(self.prepared.cams.shapes[self.index[k]][1:])

    def _batches(self, order: np.ndarray) -> list[list[int]]:
        """Batches of trial images that share a grid size (all of them on synthetic data)."""
        by_grid: dict[tuple[int, int], list[int]] = {}
        for k in order.tolist():
            by_grid.setdefault(self._grid(k), []).append(k)
        bs = self.spec.batch_size
        return [g[i:i + bs] for g in by_grid.values() for i in range(0, len(g), bs)]

    def _features(self, batch: list[int]) -> list[torch.Tensor]:
        levels = [self.prepared.features.features(k) for k in batch]
        return [torch.from_numpy(np.stack([lv[j] for lv in levels])).float().to(self.device)
                for j in range(len(levels[0]))]

    def _initial_and_truth(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image k's initial regions and ground truth (None without masks) at image size. Both
        are the same every epoch, so they are kept (up to `EVAL_CACHE_BYTES` per trial; beyond
        it recomputed): decoding masks and thresholding CAMs took ~20% of a demo epoch."""
        if k in self._eval_cache:
            return self._eval_cache[k]
        train = self.prepared.train
        found = self._initial(k), train.mask(self.train_index[k]) if train.has_masks else None
        size = sum(a.nbytes for a in found if a is not None)
        if self._eval_bytes + size <= EVAL_CACHE_BYTES:
            self._eval_cache[k] = found
            self._eval_bytes += size
        return found

    def _initial(self, k: int) -> np.ndarray:
        store, j = self.prepared.cams, self.index[k]
        return confident_regions(store.scores(j), store.keys(j), self.bg, self.fg)

    def _label_regions(self, k: int) -> np.ndarray:
        """The regions AffinityNet learns from, on the CAM grid: computed once per trial (they
        do not change between epochs), CRF-cleaned when ``affinity.crf`` is on."""
        if k not in self._label_cache:
            store, j = self.prepared.cams, self.index[k]
            if self.spec.crf:
                image = self.prepared.train.image(self.train_index[k])
                regions = crf_regions(image, store.scores(j), store.keys(j), self.bg, self.fg)
            else:
                regions = self._initial_and_truth(k)[0]  # kept for evaluation too
            self._label_cache[k] = downsample_regions(regions, self._grid(k),
                                                      _grid_stride(store, j))
        return self._label_cache[k]

    # ---- training ---------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """One pass over the trial images; returns the mean affinity loss."""
        self.head.train()
        rng = np.random.default_rng([self.spec.seed, self.epoch])
        batches = self._batches(rng.permutation(len(self.index)))
        total = 0.0
        for b in rng.permutation(len(batches)).tolist():
            batch = batches[b]
            grid = self._grid(batch[0])
            masks = [affinity_labels(self._label_regions(k), self.spec.label_radius)
                     for k in batch]
            labels = [torch.from_numpy(np.stack([m[t] for m in masks])).float().to(self.device)
                      for t in range(3)]
            edge = torch.sigmoid(self.head(self._features(batch), grid))
            loss = affinity_loss(edge, labels, self.spec.label_radius)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(batch)
        self.epoch += 1
        return total / len(self.index)

    # ---- refinement and metrics -------------------------------------------------------------
    @torch.no_grad()
    def _refined(self, only: Sequence[int] | None = None):
        """Yield (trial image, pseudo-labels at image resolution) for every trial image, or for
        the trial images ``only`` (a report's few samples need not refine the whole subset)."""
        self.head.eval()
        store = self.prepared.cams
        chosen = np.arange(len(self.index)) if only is None else np.asarray(only, dtype=np.int64)
        for batch in self._batches(chosen):
            grid = self._grid(batch[0])
            edges = torch.sigmoid(self.head(self._features(batch), grid)).cpu()
            for k, edge in zip(batch, edges):
                j = self.index[k]
                keys = store.keys(j)
                cams = torch.from_numpy(np.asarray(store[j], dtype=np.float32))
                refined = cams if len(keys) == 0 else propagate(
                    cams, edge, radius=self.spec.walk_radius, beta=self.spec.beta,
                    steps=self.spec.steps)
                pseudo = pseudo_labels(refined.numpy(), keys, store.image_size(j), self.bg,
                                       self.fg)
                yield k, pseudo

    def evaluate(self) -> dict[str, float]:
        """The trial's metrics (names as in docs/definitions.md) over its images, pooled where
        pooled; those that need ground truth only where the train split has masks."""
        c = self.prepared.train.num_classes
        first = self._conf_initial is None  # the initial regions' confusion never changes
        conf_i = np.zeros((c, c + 1), np.int64)
        conf_p = np.zeros_like(conf_i)
        counts = []
        for k, pseudo in self._refined():
            initial, gt = self._initial_and_truth(k)
            if gt is not None:
                if first:
                    conf_i += confusion(initial, gt, c)
                conf_p += confusion(pseudo, gt, c)
            counts.append(transition_counts(initial, pseudo, c))
        if first:
            self._conf_initial = conf_i
        conf_i = self._conf_initial
        pixels = sum(x["n_pixels"] for x in counts)
        degenerate = not any(x["neutral_initial"] for x in counts)
        initial = region_metrics(conf_i, pixels, sum(x["neutral_initial"] for x in counts))
        pseudo = region_metrics(conf_p, pixels, sum(x["neutral_refined"] for x in counts))
        unsupervised = {
            **all_objectives(counts), "degenerate": float(degenerate),
            "npr_initial": initial["npr"], "npr_pseudo": pseudo["npr"],
            "n_to_b": sum(x["n_to_b"] for x in counts) / pixels,
            "n_to_f": sum(x["n_to_f"] for x in counts) / pixels}
        if not self.prepared.train.has_masks:
            return unsupervised
        return {
            **unsupervised,
            "miou_nn_initial": initial["miou_nn"], "miou_nn_pseudo": pseudo["miou_nn"],
            "pqs_initial": initial["pqs"], "pqs_pseudo": pseudo["pqs"],
            "pqs_avg": (initial["pqs"] + pseudo["pqs"]) / 2, "miou_pseudo": pseudo["miou"],
        }

    def pseudo_labels(self, only: Sequence[int] | None = None):
        """Yield (image id, uint8 pseudo-label map) for every trial image (or those ``only``)."""
        ids = self.prepared.features.ids
        for k, pseudo in self._refined(only):
            yield ids[k], pseudo

    def initial_and_truth(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Trial image k's initial regions and ground truth (None without masks), image size."""
        return self._initial_and_truth(k)

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])


def run_trial(bg: float, fg: float, prepared: Prepared, spec: AffinitySpec, *,
              device: str | torch.device = "cpu", trial: AffinityTrial | None = None):
    """Yield the metrics after each AffinityNet epoch (what a Ray trainable reports for early
    stopping): ``{"epoch", "affinity_loss", "tecm", ...}``. Pass ``trial`` to resume one."""
    trial = trial or AffinityTrial(prepared, spec, bg, fg, device=device)
    while trial.epoch < spec.epochs:
        loss = trial.train_epoch()
        yield {"epoch": trial.epoch, "affinity_loss": loss, **trial.evaluate()}
