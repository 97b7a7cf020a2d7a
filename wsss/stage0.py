"""Stage 0 of a search: ``prepare`` the expensive, threshold-independent artefacts once.

The classifier and the CAM store are cached under ``cache_root`` by a key derived from exactly
what produced them (the stage's spec and the dataset's content fingerprint), so a second search
with the same settings does no stage-0 work, and any change to data or settings rebuilds only what
it affects.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from wsss.cam import CamSpec, extract_cams, strided_size
from wsss.classifier import (
    CamClassifier,
    ClassifierSpec,
    create_backbone,
    load_classifier,
    mean_average_precision,
    normalise_images,
    save_classifier,
    train_classifier,
)
from wsss.data import DataSpec, SegDataset
from wsss.devices import resolve_device
from wsss.errors import UserError
from wsss.files import digest, write_json_atomic
from wsss.interop import ImportSpec, import_cams
from wsss.metrics import threshold_surface
from wsss.spec import Spec
from wsss.store import CamStore, FeatureStore

log = logging.getLogger("wsss")


class TrialSpec(Spec):
    """The ``trial`` config section: which train images a trial scores, its seed, and the
    frozen backbone whose features the trained refiners read (stored by stage 0)."""

    subset: int | None = Field(None, ge=1, description="trials use the first N train images")
    seed: int = 0
    backbone: str | None = Field(
        None, description="timm model for the frozen features; None = the trained classifier's "
                          "(required with imported CAMs)")
    backbone_weights: Path | None = Field(None, description="local weights file of `backbone`")
    output_stride: Literal[8, 16, 32] = 16
    levels: list[int] | None = Field(
        None, description="backbone feature levels used; None = all at the CAM stride or coarser")

    @model_validator(mode="after")
    def _weights_name_their_model(self) -> TrialSpec:
        if self.backbone_weights is not None and self.backbone is None:
            raise ValueError("backbone_weights is set but backbone is not: name the timm model "
                             "they belong to (without backbone, the features come from the "
                             "trained classifier)")
        return self


@dataclass(frozen=True, eq=False)
class PreparedRef:
    """The paths a `Prepared` is reopened from (`Prepared.open`): small, picklable, and the
    same on every node of a cluster that reads the same paths."""

    data: DataSpec
    cams: Path
    features: Path | None  # None for refiners that do not train on features
    classifier: Path | None  # None with imported CAMs
    subset: int | None

    def key(self) -> str:
        """A stable text of the whole reference (its cache key in a worker)."""
        return json.dumps({"data": self.data.model_dump(mode="json"), "cams": str(self.cams),
                           "features": str(self.features), "classifier": str(self.classifier),
                           "subset": self.subset}, sort_keys=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PreparedRef) and self.key() == other.key()

    def __hash__(self) -> int:  # a worker's cache of opened inputs is keyed by it
        return hash(self.key())


@dataclass
class Prepared:
    """What trials share: the datasets, the trained classifier, the train split's CAMs, the
    ids of the images a trial scores and, for trained refiners, their frozen features."""

    train: SegDataset
    val: SegDataset | None
    classifier_path: Path | None  # None with imported CAMs
    cams: CamStore
    features: FeatureStore | LiveFeatures | None  # only for refiners that train on features
    trial_ids: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def ref(self, data: DataSpec, subset: int | None) -> PreparedRef:
        """Where this lives on disk: what a worker on any node reopens it from."""
        features = self.features.path if isinstance(self.features, FeatureStore) else None
        return PreparedRef(data=data, cams=self.cams.path, features=features,
                           classifier=self.classifier_path, subset=subset)

    @classmethod
    def open(cls, ref: PreparedRef) -> Prepared:
        """Reopen what `prepare` built (read-only memory maps, no hashing, no training): how a
        search's trial workers, on any node that reads the same paths, get their inputs."""
        data = ref.data
        train = data.open("train", require_masks=False)
        val = data.open("val") if data.has_split("val") else None
        store = None if ref.features is None else FeatureStore(ref.features)
        ids = list(train.ids[:ref.subset]) if store is None else list(store.ids)
        return cls(train=train, val=val, classifier_path=ref.classifier, cams=CamStore(ref.cams),
                   features=store, trial_ids=ids)

    @property
    def cached(self) -> list[Path]:
        """The cached folders it was built from (classifier, CAM store, feature store): what
        a search refers to, so that garbage collection keeps them."""
        found = [self.cams.path]
        if self.classifier_path is not None:
            found.append(self.classifier_path.parent)
        if isinstance(self.features, FeatureStore):
            found.append(self.features.path)
        return found

    def whole_split(self, trial: TrialSpec, features: bool, device: str = "auto") -> Prepared:
        """The same inputs over every train image, their frozen features (``features``)
        computed on demand (`LiveFeatures`): what stage 2 and label export need, without a
        full-split store."""
        live = None
        if features:
            dev = resolve_device(device)
            backbone, _, levels = frozen_levels(trial, self.classifier_path, self.cams, dev)
            live = LiveFeatures(backbone, self.train, levels, dev)
        return replace(self, features=live, trial_ids=list(self.train.ids))


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
    for split in (train, val) if val is not None else (train,):
        split.check()  # a bad file fails now, not after the classifier has trained
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
    """Feature levels for a refiner's head: by default every level at the CAM grid's stride or
    coarser (IRN's boundary branch uses all stride-4..16 stages)."""
    reductions = backbone.feature_info.reduction()
    if levels is None:
        return [j for j, r in enumerate(reductions) if r >= stride]
    bad = [j for j in levels if not 0 <= j < len(reductions)]
    if bad or not levels:
        raise UserError(f"trial.levels {levels}: expected indices in 0..{len(reductions) - 1} "
                        f"(the backbone's levels have strides {reductions})")
    return sorted(set(levels))


def grid_stride(store: CamStore, j: int) -> int:
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


def _frozen_backbone(trial: TrialSpec, classifier_path: Path | None,
                     device: torch.device) -> tuple[torch.nn.Module, Any]:
    """AffinityNet's frozen backbone and its cache key: a timm model from a local weights file
    when configured (needed with imported CAMs), else the trained classifier's backbone."""
    if trial.backbone is not None:
        if trial.backbone_weights is None:
            raise UserError("trial.backbone_weights is required with trial.backbone: the "
                            "frozen features must come from trained weights (a local file)")
        backbone = create_backbone(trial.backbone, trial.output_stride, trial.backbone_weights,
                                   keys=("trial.backbone", "trial.backbone_weights"))
        weights = trial.backbone_weights
        key = [trial.backbone, trial.output_stride, weights.stat().st_size,
               weights.stat().st_mtime_ns]
        return backbone.to(device).eval(), key
    if classifier_path is None:
        raise UserError("with import_cams set, trial.backbone (a timm model name) and "
                        "trial.backbone_weights (a local file) must be set: there is no "
                        "trained classifier to take features from")
    model, _ = load_classifier(classifier_path, device)
    # keyed by the classifier's content key (its cache folder), not its path: the same
    # classifier reached through another runs root or a moved folder reuses its features
    return model.backbone, classifier_path.parent.name


def frozen_levels(trial: TrialSpec, classifier_path: Path | None, store: CamStore,
                   device: torch.device) -> tuple[torch.nn.Module, Any, list[int]]:
    """The frozen backbone, its cache key and the feature levels a refiner's head reads."""
    backbone, key = _frozen_backbone(trial, classifier_path, device)
    return backbone, key, _levels(backbone, trial.levels, grid_stride(store, 0))


class LiveFeatures:
    """`FeatureStore`'s reading interface (``ids``, ``manifest["channels"]``, ``features``,
    ``features_batch``) over the frozen backbone itself. Stage 2 needs every train image's
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
        return self.features_batch([i])[0]

    def features_batch(self, idx: Sequence[int]) -> list[list[np.ndarray]]:
        """The images' levels from one backbone forward per image size among them."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in idx:
            by_size.setdefault(self.data.size(i), []).append(i)
        found = {}
        for group in by_size.values():
            found.update(zip(group, _extract_features_batch(self.backbone, self.data, group,
                                                            self.levels, self.device)))
        return [found[i] for i in idx]


def prepare(data: DataSpec, classifier: ClassifierSpec, cam: CamSpec, cache_root: Path, *,
            trial: TrialSpec | None = None, features: bool = False,
            imported: ImportSpec | None = None, device: str = "auto", progress: bool = True,
            build: bool = True) -> Prepared:
    """Datasets, classifier and CAM store, each reused from ``cache_root`` when still valid;
    the trial images are the first ``trial.subset`` train images (all without ``trial``) and,
    with ``features``, a feature store holds their frozen features (trained refiners).
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
    subset = None if trial is None else trial.subset
    n = len(train) if subset is None else min(subset, len(train))
    if trial is None or not features:
        return Prepared(train=train, val=val, classifier_path=clf_path, cams=store,
                        features=None, trial_ids=list(train.ids[:n]), stats=stats)
    backbone, backbone_key, levels = frozen_levels(trial, clf_path, store, dev)
    channels = [backbone.feature_info.channels()[j] for j in levels]
    f_manifest = {"kind": "features", "backbone": backbone_key, "dataset": fingerprint,
                  "split": "train", "n_images": n, "levels": levels, "channels": channels,
                  "dtype": "float16"}
    stored = _feature_store(backbone, train, n, levels, f_manifest,
                            cache_root / f"features-{digest(f_manifest)}", dev, cam.batch_size,
                            progress, build)
    return Prepared(train=train, val=val, classifier_path=clf_path, cams=store, features=stored,
                    trial_ids=list(stored.ids), stats=stats)


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
