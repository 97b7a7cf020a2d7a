"""Interoperability with the reference pipelines: import their CAMs, score their label PNGs.

IRN (``step/make_cam.py``) and PuzzleCAM (``inference_classification.py``) save one pickled dict
per image. `import_cams` turns a folder of them into a `CamStore` of our layout, so every later
stage (surfaces, search) runs unchanged on CAMs made elsewhere. `evaluate_folder` scores a folder
of label PNGs exactly as their evaluate scripts do, so numbers compare across code bases.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from pydantic import Field

from wsss.data import IGNORE, SegDataset, missing_files
from wsss.errors import DataError, UserError
from wsss.files import Digest, open_image
from wsss.metrics import Protocol, confusion, iou_per_class, mean_iou
from wsss.spec import Spec
from wsss.store import CamStore

Format = Literal["irn", "puzzlecam"]
Resolution = Literal["high", "strided"]

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class _Layout:
    """Where a writer puts things: the image-size entry and how its ``keys`` are numbered."""

    high: str
    background_first: bool  # keys = [0, 1-based ids...] (PuzzleCAM); else 0-based ids (IRN)
    writer: str


_LAYOUTS: dict[str, _Layout] = {
    "irn": _Layout("high_res", background_first=False, writer="IRN step/make_cam.py"),
    "puzzlecam": _Layout("hr_cam", background_first=True,
                         writer="PuzzleCAM inference_classification.py"),
}


def _entry(fmt: str, resolution: str) -> str:
    return _LAYOUTS[fmt].high if resolution == "high" else "cam"


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _missing_files(folder: Path, data: SegDataset, ext: str, what: str) -> list[Path]:
    """One file per id of the split, checked with one listing (fast on network disks)."""
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} not found")
    missing = missing_files(folder, data.ids, ext)
    if missing:
        raise DataError(f"{what} {missing[0]} not found ({len(missing)} of the {len(data)} "
                        f"ids of {data.split_file} have no {ext} file in {folder})")
    return [folder / f"{image_id}{ext}" for image_id in data.ids]


def _as_array(value: Any) -> np.ndarray:
    """Both writers store some entries as torch tensors (pickled as such)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _refuse_pickles(path: Path, cam_dir: Path) -> None:
    """Without ``allow_pickle`` nothing is imported: say whether that is why (the files are
    pickles, as the references write them) or the files are not CAM dicts at all."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's refusal to unpickle
        raise UserError(f"the CAM files in {cam_dir} are pickled dicts, and loading them runs "
                        "code stored in them; pass --allow-pickle (allow_pickle=True) only if "
                        "they are your own files") from None
    except OSError as e:
        raise DataError(f"cannot read CAM file {path}: {e}") from None
    raise DataError(f"CAM file {path}: expected a dict saved with np.save (keys and CAMs), "
                    f"found an array of shape {loaded.shape}, dtype {loaded.dtype}")


def _parse(path: Path, raw: bytes, fmt: str, resolution: str) -> tuple[np.ndarray, np.ndarray]:
    """One file's bytes -> (sorted 1-based foreground ids, float32 CAMs ``[K, h, w]`` in that
    order). Checks the file on its own; `_check_against` compares it with the dataset."""
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=True)
    except Exception as e:  # noqa: BLE001 - unpickling can raise anything (missing module...)
        raise DataError(f"cannot read CAM file {path}: {type(e).__name__}: {e}") from None
    is_dict = (isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ()
               and isinstance(loaded.item(), dict))
    if not is_dict:
        found = (f"an array of shape {loaded.shape}, dtype {loaded.dtype}"
                 if isinstance(loaded, np.ndarray) else type(loaded).__name__)
        raise DataError(f"CAM file {path}: expected a dict saved with np.save, found {found}")
    d: dict = loaded.item()
    layout, entry = _LAYOUTS[fmt], _entry(fmt, resolution)
    if entry not in d:
        if "rw" in d:
            raise DataError(f"CAM file {path} holds random-walk output ('rw'), not CAMs: import "
                            f"the files {layout.writer} writes")
        others = [f for f, other in _LAYOUTS.items() if f != fmt and other.high in d]
        hint = f" (files of --format {others[0]}?)" if others else ""
        raise DataError(f"CAM file {path} has no {entry!r} entry; found {sorted(map(str, d))}"
                        f"{hint}")
    if "keys" not in d:
        raise DataError(f"CAM file {path} has no 'keys' entry; found {sorted(map(str, d))}")
    keys, cams = _as_array(d["keys"]), _as_array(d[entry])
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise DataError(f"CAM file {path}: 'keys' must be a 1-D array of class ids, "
                        f"got shape {keys.shape}, dtype {keys.dtype}")
    if cams.ndim != 3 or cams.dtype.kind not in "fiu":
        raise DataError(f"CAM file {path}: {entry!r} must be a numeric [classes, H, W] array, "
                        f"got shape {cams.shape}, dtype {cams.dtype}")
    if layout.background_first:
        if len(keys) != len(cams) + 1 or keys[0] != 0:
            raise DataError(f"CAM file {path}: keys {keys.tolist()} disagree with the "
                            f"{len(cams)} channels of {entry!r}; {layout.writer} writes "
                            "background 0 then one 1-based class id per channel")
        ids = keys[1:].astype(np.int64)
    else:
        if len(keys) != len(cams):
            raise DataError(f"CAM file {path}: keys {keys.tolist()} disagree with the "
                            f"{len(cams)} channels of {entry!r}; {layout.writer} writes one "
                            "0-based foreground class id per channel")
        ids = keys.astype(np.int64) + 1
    cams = cams.astype(np.float32, copy=False)
    if not np.isfinite(cams).all():
        raise DataError(f"CAM file {path}: {entry!r} has NaN or infinite values")
    if cams.size and cams.min() < 0:
        raise DataError(f"CAM file {path}: {entry!r} has negative values (min {cams.min():.4g});"
                        " CAMs are ReLU'd")
    if cams.size and cams.max() > _FLOAT16_MAX:
        raise DataError(f"CAM file {path}: {entry!r} has values up to {cams.max():.4g}, too "
                        "large for a float16 store")
    order = np.argsort(ids, kind="stable")
    return ids[order], cams[order]


def _check_against(path: Path, ids: np.ndarray, cams: np.ndarray, data: SegDataset, i: int,
                   resolution: str) -> tuple[int, int]:
    """The file must describe image i: its classes and (at high resolution) its size, which is
    returned for the store's index."""
    labels = data.labels(i)
    if not np.array_equal(ids, labels):
        source = data.cls_labels_path or f"the masks in {data.root / data.mask_dir}"
        raise DataError(f"CAM file {path} has CAMs of classes {ids.tolist()} but image "
                        f"{data.ids[i]} is labelled {labels.tolist()} by {source} "
                        "(1-based foreground ids)")
    size, grid = data.size(i), tuple(cams.shape[1:])
    if resolution == "high" and grid != size:
        raise DataError(f"CAM file {path}: high-resolution CAMs are {grid[0]}x{grid[1]} but image "
                        f"{data.image_path(i)} is {size[0]}x{size[1]}")
    if resolution == "strided" and not (1 <= grid[0] <= size[0] and 1 <= grid[1] <= size[1]):
        raise DataError(f"CAM file {path}: strided CAMs are {grid[0]}x{grid[1]}, expected at "
                        f"least 1x1 and at most the image size {size[0]}x{size[1]}")
    return size


def import_cams(fmt: Format, cam_dir: str | Path, data: SegDataset, out: str | Path, *,
                allow_pickle: bool, resolution: Resolution = "high") -> CamStore:
    """Fill a CAM store at ``out`` from IRN or PuzzleCAM ``<id>.npy`` files, one per image of
    ``data``; reuse the store when its manifest (file contents, dataset, options) is unchanged.

    ``resolution="high"`` imports ``high_res`` / ``hr_cam`` (image size: what the references'
    evaluate scripts threshold); ``"strided"`` imports ``cam`` (stride 4: a ~16x smaller store,
    upsampled to image size when scored). Keys become 1-based ids, sorted, channels reordered.

    Each pass holds one file at a time. The first only hashes the files: an unchanged import
    returns the existing store without unpickling anything. Otherwise the second reads and
    validates every file (so a bad file fails before anything is written) and records the
    shapes the store needs up front; the third streams them in. The later passes check each
    file's hash is unchanged.
    """
    _check_choice("format", fmt, get_args(Format))
    _check_choice("resolution", resolution, get_args(Resolution))
    cam_dir = Path(cam_dir).resolve()
    paths = _missing_files(cam_dir, data, ".npy", "CAM file")
    if not allow_pickle:
        _refuse_pickles(paths[0], cam_dir)
    digests = [Digest().bytes(path.read_bytes()).hex() for path in paths]
    files = Digest().bytes("\n".join(f"{i} {h}" for i, h in zip(data.ids, digests)).encode()).hex()
    manifest = {"kind": "cams", "source": fmt, "resolution": resolution, "cam_dir": str(cam_dir),
                "files": files, "dataset": data.fingerprint(), "split": data.split,
                "n_images": len(data), "num_classes": data.num_classes, "dtype": "float16"}
    if CamStore.is_current(out, manifest):
        return CamStore(out)

    def parsed() -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
        for path, digest in zip(paths, digests):
            raw = path.read_bytes()
            if Digest().bytes(raw).hex() != digest:
                raise DataError(f"CAM file {path} changed during the import; run it again")
            yield path, *_parse(path, raw, fmt, resolution)

    shapes, keys, sizes = [], [], []
    for i, (path, ids, cams) in enumerate(parsed()):
        sizes.append(list(_check_against(path, ids, cams, data, i, resolution)))
        shapes.append(tuple(cams.shape))
        keys.append(ids.tolist())
    arrays = (cams for _, _, cams in parsed())
    return CamStore.write(out, data.ids, shapes, arrays, manifest,
                          meta={"keys": keys, "image_size": sizes})


def _fraction(value: float) -> float | None:
    """NaN (a class with an empty union under ``irn``) becomes None: left out, and valid JSON."""
    return None if np.isnan(value) else float(value)


def evaluate_folder(pred_dir: str | Path, data: SegDataset,
                    protocol: Protocol = "puzzlecam") -> dict[str, Any]:
    """Score ``<id>.png`` label maps (palette or grayscale; 255 = neutral) against the split's
    masks from one pooled confusion matrix, as PuzzleCAM's ``evaluate.py`` (png mode) or IRN's
    ``step/eval_sem_seg.py`` do. Returns fractions: ``{"protocol", "iou": {class: IoU or None},
    "miou", "n_images"}``."""
    _check_choice("protocol", protocol, get_args(Protocol))
    paths = _missing_files(Path(pred_dir), data, ".png", "prediction")
    c = data.num_classes
    conf = np.zeros((c, c + 1), dtype=np.int64)
    for i, path in enumerate(paths):
        pred = np.asarray(open_image(path, "prediction"))
        if pred.ndim != 2:
            raise DataError(f"prediction {path} has shape {pred.shape} (a coloured image?); "
                            "expected a palette or grayscale PNG of class ids")
        gt = data.mask(i)
        if pred.shape != gt.shape:
            raise DataError(f"prediction {path} is {pred.shape[0]}x{pred.shape[1]} but mask "
                            f"{data.mask_path(i)} is {gt.shape[0]}x{gt.shape[1]}")
        bad = (pred >= c) & (pred != IGNORE)
        if bad.any():
            raise DataError(f"prediction {path} has class id {int(pred[bad].min())}; expected "
                            f"0..{c - 1} or {IGNORE} (neutral)")
        conf += confusion(pred, gt, c)
    iou = iou_per_class(conf, protocol)
    return {"protocol": protocol,
            "iou": {name: _fraction(v) for name, v in zip(data.class_names, iou)},
            "miou": _fraction(mean_iou(conf, protocol)),
            "n_images": len(data)}


class ImportSpec(Spec):
    """The ``import_cams`` config section: run a whole search on CAMs from IRN or PuzzleCAM
    instead of training our classifier (AffinityNet's frozen features then come from
    ``affinity.backbone``)."""

    format: Format
    dir: Path
    resolution: Resolution = "strided"
    allow_pickle: bool = Field(False, description="the files are pickles: only your own files")

