"""One reader for VOC-layout datasets: the generated synthetic data and a real VOC2012 tree.

Layout: `JPEGImages/<id>.jpg`, `<mask_dir>/<id>.png` (VOC palette PNGs in `SegmentationClass`, or
grayscale PNGs of class ids in `SegmentationClassAug`), split lists of ids, and optionally a
`classes.txt` (background first). Every data problem is a `DataError` naming the file at fault, so a
bad dataset stops the pipeline at once with a message the user can act on, not deep inside a trial.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field

from wsss.errors import DataError
from wsss.files import Digest, atomic_write_bytes, open_image
from wsss.spec import Spec

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

IGNORE = 255
# IRN stores `cls_labels.npy` keys as ints: "2007_000032" -> 2007000032 (np.loadtxt parses the
# underscore as a digit separator); ids of that form are looked up under both spellings.
_INT_ENCODABLE = re.compile(r"\d+(_\d+)*")
SYNTHETIC_MARKER = ".wsss-synthetic.json"  # parameters a generated root was made with


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _split_id(line: str) -> str:
    """An id from a split-file line; DeepLab-style lists ("/JPEGImages/x.jpg /Seg.../x.png") give
    their first path's stem."""
    token = line.split()[0]
    if "/" in token or token.endswith(".jpg"):
        return Path(token).stem
    return token


def read_rgb(path: Path) -> np.ndarray:
    """An image as every stage reads it: uint8 HxWx3 RGB; grayscale/CMYK JPEGs (they exist in
    VOC) and other modes are converted. A missing or unreadable file is a `DataError`."""
    image = open_image(path, "image")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def missing_files(directory: Path, ids: Sequence[str], ext: str) -> list[Path]:
    """The paths ``directory/<id><ext>`` that do not exist, from one listing of the folder (fast
    on network disks; a missing folder lacks them all)."""
    present = set(os.listdir(directory)) if directory.is_dir() else set()
    return [directory / f"{i}{ext}" for i in ids if f"{i}{ext}" not in present]


class SegDataset:
    """A split of a VOC-layout dataset: ids, images, masks, image-level labels, a fingerprint.

    File existence is checked once in the constructor; contents are validated when read.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        mask_dir: str = "SegmentationClass",
        split_file: str | Path | None = None,
        cls_labels: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        require_masks: bool = True,
    ) -> None:
        """`cls_labels` is IRN's `cls_labels.npy`: a pickled dict (id -> one 0/1 value per
        foreground class) read with `allow_pickle=True`, which runs code from the file: pass only
        your own file. Without it, image-level labels come from the masks."""
        self.root = Path(root)
        self.split = split
        self.mask_dir = mask_dir
        if split_file is None:
            self.split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        else:
            split_file = Path(split_file)
            self.split_file = split_file if split_file.is_absolute() else self.root / split_file
        self.ids = self._read_ids()
        self.class_names = self._read_class_names(class_names)
        self.num_classes = len(self.class_names)
        self.cls_labels_path = None if cls_labels is None else Path(cls_labels)
        self.has_masks = self._check_files(require_masks or cls_labels is None)
        self._labels: list[np.ndarray | None] = [None] * len(self.ids)
        self._sizes: dict[int, tuple[int, int]] = {}  # headers read once: sizes drive batching
        self._fingerprint: str | None = None  # hashing reads every file: once per object
        if self.cls_labels_path is not None:
            self._labels = list(self._read_cls_labels(self.cls_labels_path))

    def _read_ids(self) -> list[str]:
        if not self.split_file.is_file():
            raise DataError(f"split file {self.split_file} not found; expected one image id a line")
        ids = [_split_id(line) for line in _read_lines(self.split_file)]
        if not ids:
            raise DataError(f"split file {self.split_file} lists no image ids")
        seen: set[str] = set()
        for image_id in ids:
            if image_id in seen:
                raise DataError(f"split file {self.split_file} lists image id {image_id} twice")
            seen.add(image_id)
        return ids

    def _read_class_names(self, class_names: Sequence[str] | None) -> tuple[str, ...]:
        if class_names is not None:
            names, source = tuple(class_names), "class_names"
        elif (self.root / "classes.txt").is_file():
            source = str(self.root / "classes.txt")
            names = tuple(_read_lines(self.root / "classes.txt"))
        else:
            return VOC_CLASSES
        if len(names) < 2:
            raise DataError(f"{source}: expected 'background' then at least one class name")
        return names

    def _check_files(self, need_masks: bool) -> bool:
        """Whether every image has its mask (ground truth); a missing image, or a missing mask
        when ``need_masks``, is an error. Each folder is listed once rather than every file
        stat'ed: fast on network disks."""
        missing = {folder: missing_files(self.root / folder, self.ids, ext)
                   for folder, ext in (("JPEGImages", ".jpg"), (self.mask_dir, ".png"))}
        lost = missing["JPEGImages"] + (missing[self.mask_dir] if need_masks else [])
        if lost:
            raise DataError(
                f"{lost[0]} not found ({len(lost)} files missing for the "
                f"{len(self.ids)} ids of {self.split_file})"
            )
        return not missing[self.mask_dir]

    def _read_cls_labels(self, path: Path) -> list[np.ndarray]:
        try:
            table = np.load(path, allow_pickle=True).item()
        except FileNotFoundError:
            raise DataError(f"cls_labels file {path} not found") from None
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"cannot read cls_labels file {path}: {e}") from None
        if not isinstance(table, dict):
            raise DataError(f"cls_labels file {path}: expected a dict saved with np.save")
        by_key = {
            (int(k) if isinstance(k, (int, np.integer)) else str(k)): v for k, v in table.items()
        }
        n_fg = self.num_classes - 1
        out = []
        for image_id in self.ids:
            vector = by_key.get(image_id)
            if vector is None and _INT_ENCODABLE.fullmatch(image_id):
                vector = by_key.get(int(image_id.replace("_", "")))
            if vector is None:
                raise DataError(f"cls_labels file {path} has no entry for image id {image_id}")
            vector = np.asarray(vector).reshape(-1)
            if vector.size != n_fg:
                raise DataError(
                    f"cls_labels file {path}: image id {image_id} has {vector.size} values; "
                    f"expected {n_fg} (one per foreground class)"
                )
            out.append(np.flatnonzero(vector > 0.5).astype(np.int64) + 1)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def check(self) -> None:
        """Decode every image, and every mask the split has, now: a truncated JPEG or a bad mask
        then fails before any training rather than in its middle (or, in the val split, after
        it). The first bad file in id order is reported. Threads: PIL decodes without the GIL."""
        def read(i: int) -> None:
            self.image(i)
            if self.has_masks:
                self.mask(i)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(read, range(len(self))):
                pass

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[i]}.jpg"

    def mask_path(self, i: int) -> Path:
        return self.root / self.mask_dir / f"{self.ids[i]}.png"

    def image(self, i: int) -> np.ndarray:
        """uint8 HxWx3 RGB (`read_rgb`)."""
        return read_rgb(self.image_path(i))

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) from the image header only (read once)."""
        if i in self._sizes:
            return self._sizes[i]
        path = self.image_path(i)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except FileNotFoundError:
            raise DataError(f"image {path} not found") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        self._sizes[i] = height, width
        return height, width

    def mask(self, i: int) -> np.ndarray:
        """uint8 HxW class ids, 255 = ignore. Palette PNGs give their indices, grayscale PNGs
        their values, so `SegmentationClass` and `SegmentationClassAug` read alike."""
        path = self.mask_path(i)
        labels = np.asarray(open_image(path, "mask"))
        if labels.ndim != 2:
            raise DataError(
                f"mask {path} has shape {labels.shape} (a coloured image?); "
                "expected a palette or grayscale PNG of class ids"
            )
        valid = (labels < self.num_classes) | (labels == IGNORE)
        if not valid.all():
            bad = int(labels[~valid].min())
            raise DataError(
                f"mask {path} has label id {bad}; expected 0..{self.num_classes - 1} or {IGNORE}"
            )
        height, width = self.size(i)
        if labels.shape != (height, width):
            raise DataError(
                f"mask {path} is {labels.shape[0]}x{labels.shape[1]} "
                f"but image {self.image_path(i)} is {height}x{width}"
            )
        return labels.astype(np.uint8)

    def labels(self, i: int) -> np.ndarray:
        """Sorted int64 1-based foreground ids present; cached, as the classifier needs every
        image's labels every epoch."""
        cached = self._labels[i]
        if cached is None:
            present = np.unique(self.mask(i))
            cached = present[(present != 0) & (present != IGNORE)].astype(np.int64)
            self._labels[i] = cached
        return cached

    def label_matrix(self) -> np.ndarray:
        """float32 [N, num_classes - 1] multi-hot; column j is class j + 1."""
        matrix = np.zeros((len(self), self.num_classes - 1), np.float32)
        for i in range(len(self)):
            matrix[i, self.labels(i) - 1] = 1.0
        return matrix

    def fingerprint(self) -> str:
        """A hex digest of everything that defines this split's data (ids, class names, mask
        folder, image/mask/cls_labels bytes), so caches keyed on it go stale when a file changes.
        Computed once per object (a new `SegDataset` hashes the files again)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = Digest()
        for name in self.class_names:
            h.text(name)
        h.text(self.mask_dir)
        if self.cls_labels_path is not None:
            h.file(self.cls_labels_path)
        for i in range(len(self)):
            h.text(self.ids[i]).file(self.image_path(i)).file(self.mask_path(i))
        self._fingerprint = h.hex()
        return self._fingerprint


class SyntheticSpec(Spec):
    """Parameters of the embedded synthetic dataset (`wsss.synthetic.generate`)."""

    n_train: int = Field(800, ge=1)
    n_val: int = Field(200, ge=1)
    size: int = Field(64, ge=16)
    classes: int = Field(5, ge=1)
    class_colour: float = Field(0.9, ge=0, le=1, description="share of objects in class hue")
    max_objects: int = Field(3, ge=1, description="objects per image: 1 to this")
    scale: float = Field(1.0, ge=0.2, le=2.0, description="object size factor")
    part_colour: float = Field(0.0, ge=0, le=1, description="share of objects whose class hue "
                                                          "shows on a small part only")
    context: float = Field(0.0, ge=0, le=1, description="share of objects with a class-specific "
                                                      "background halo")
    seed: int = 0


class DataSpec(Spec):
    """The ``data`` config section: where a VOC-layout dataset lives and how to read it.

    With ``synthetic`` set, the dataset is generated into ``root`` on first use; a marker file
    records the parameters, so a root generated with other parameters (or holding a real dataset)
    is an error instead of being silently mixed or overwritten.
    """

    root: Path
    synthetic: SyntheticSpec | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_split_file: Path | None = None
    val_split_file: Path | None = None
    mask_dir: str = "SegmentationClass"
    cls_labels: Path | None = None
    class_names: list[str] | None = None
    eval_subset: int | None = Field(None, ge=1, description="score only the first N train images")

    def ensure(self) -> None:
        """Generate the synthetic dataset when configured and not yet there."""
        if self.synthetic is None:
            if not self.root.is_dir():
                raise DataError(f"data.root {self.root} is not a folder; expected a VOC-layout "
                                "dataset (JPEGImages/, a mask folder, ImageSets/Segmentation/)")
            return
        from wsss.synthetic import generate  # the generator is only needed here

        marker = self.root / SYNTHETIC_MARKER
        wanted = self.synthetic.model_dump()
        if marker.is_file():
            # read through the spec: a marker written before a parameter existed has its default
            found = SyntheticSpec.model_validate(json.loads(marker.read_text())).model_dump()
            if found != wanted:
                raise DataError(f"data.root {self.root} was generated with {found}, not the "
                                f"configured data.synthetic {wanted}: choose another data.root "
                                "or delete the folder")
            return
        if (self.root / "ImageSets").exists():
            raise DataError(f"data.root {self.root} already holds a dataset that wsss-tune did "
                            "not generate; remove data.synthetic or choose another data.root")
        generate(self.root, **wanted)
        atomic_write_bytes(marker, json.dumps(wanted, sort_keys=True).encode())

    def has_split(self, which: str) -> bool:
        return self._split_path(which).is_file()

    def _split_path(self, which: str) -> Path:
        split, file = self._split(which)
        if file is None:
            return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        return file if file.is_absolute() else self.root / file

    def _split(self, which: str) -> tuple[str, Path | None]:
        if which == "train":
            return self.train_split, self.train_split_file
        if which == "val":
            return self.val_split, self.val_split_file
        raise ValueError(f"unknown split role {which!r}")

    def open(self, which: str, *, require_masks: bool = True) -> SegDataset:
        """The ``train`` or ``val`` split as a `SegDataset`. Without ``require_masks`` (and
        with ``cls_labels`` for the image-level labels) masks may be absent: ``has_masks``."""
        split, file = self._split(which)
        return SegDataset(self.root, split, mask_dir=self.mask_dir, split_file=file,
                          cls_labels=self.cls_labels, class_names=self.class_names,
                          require_masks=require_masks)
