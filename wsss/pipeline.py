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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from wsss.cam import CamSpec, extract_cams, strided_size
from wsss.classifier import (
    CamClassifier,
    ClassifierSpec,
    load_classifier,
    mean_average_precision,
    resolve_device,
    save_classifier,
    train_classifier,
)
from wsss.data import DataSpec, SegDataset
from wsss.metrics import threshold_surface
from wsss.store import CamStore, write_json_atomic

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
    classifier_path: Path
    cams: CamStore
    stats: dict[str, Any] = field(default_factory=dict)


def _classifier(spec: ClassifierSpec, train: SegDataset, val: SegDataset | None, key: str,
                cache_root: Path, device: torch.device, progress: bool) -> tuple[Path, dict]:
    folder = cache_root / f"classifier-{key}"
    path, stats_path = folder / "model.pt", folder / "stats.json"
    if path.is_file() and stats_path.is_file():
        log.info("classifier: cached at %s", folder)
        return path, json.loads(stats_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    model = CamClassifier(spec.backbone(), train.num_classes - 1)
    start = time.perf_counter()
    with tqdm(total=spec.epochs, desc="classifier", unit="epoch", disable=not progress) as bar:
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
    log.info("classifier: trained in %.1f s, val mAP %s", stats["classifier_train_s"],
             stats["classifier_map"])
    return path, stats


def _cam_store(spec: CamSpec, train: SegDataset, classifier_path: Path, manifest: dict,
               path: Path, device: torch.device, progress: bool) -> CamStore:
    if CamStore.is_current(path, manifest):
        log.info("CAM store: current at %s", path)
        return CamStore(path)
    model, _ = load_classifier(classifier_path, device)
    sizes = [train.size(i) for i in range(len(train))]
    keys = [train.labels(i).tolist() for i in range(len(train))]
    shapes = [(len(k), *strided_size(s, spec.store_stride)) for k, s in zip(keys, sizes)]
    cams = tqdm(extract_cams(model, train, spec, device), total=len(train), desc="CAMs",
                unit="img", disable=not progress)
    return CamStore.write(path, train.ids, shapes, cams, manifest,
                          meta={"keys": keys, "image_size": [list(s) for s in sizes]})


def prepare(data: DataSpec, classifier: ClassifierSpec, cam: CamSpec, cache_root: Path, *,
            device: str = "auto", progress: bool = True) -> Prepared:
    """Datasets, classifier and CAM store, each reused from ``cache_root`` when still valid."""
    data.ensure()
    train = data.open("train")
    val = data.open("val") if data.has_split("val") else None
    dev = resolve_device(device)
    fingerprint = train.fingerprint()
    clf_key = digest(classifier.model_dump(mode="json"), fingerprint)
    clf_path, stats = _classifier(classifier, train, val, clf_key, cache_root, dev, progress)
    manifest = {"kind": "cams", "classifier": clf_key, "cam": cam.model_dump(mode="json"),
                "dataset": fingerprint, "split": "train", "n_images": len(train),
                "num_classes": train.num_classes, "dtype": "float16"}
    store_path = cache_root / f"cams-{digest(manifest)}"
    store = _cam_store(cam, train, clf_path, manifest, store_path, dev, progress)
    return Prepared(train=train, val=val, classifier_path=clf_path, cams=store, stats=stats)


def initial_surface(prepared: Prepared, pairs: Sequence[tuple[float, float]],
                    subset: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Initial-region metrics of every pair over the train split (or its first ``subset``)."""
    train, store = prepared.train, prepared.cams
    n = len(train) if subset is None else min(subset, len(train))
    idx = [store.position(train.ids[i]) for i in range(n)]
    scores = (store.scores(j) for j in tqdm(idx, desc="surface", unit="img", disable=not progress))
    return threshold_surface(scores, (store.keys(j) for j in idx),
                             (train.mask(i) for i in range(n)), pairs, train.num_classes)

