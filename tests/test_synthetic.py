"""The synthetic generator: layout, determinism, mask conventions, enough variety to learn from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import synthetic
from wsss.data import SegDataset
from wsss.errors import UserError
from wsss.files import voc_palette

N_TRAIN, N_VAL, SIZE, K = 12, 4, 48, 5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    assert synthetic.generate(out, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, classes=K) == out
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_shapes_list_has_at_least_ten_distinct_names() -> None:
    assert len(synthetic.SHAPES) >= 10
    assert len(set(synthetic.SHAPES)) == len(synthetic.SHAPES)


def test_layout_splits_and_class_list(root: Path) -> None:
    split_dir = root / "ImageSets" / "Segmentation"
    train = split_dir.joinpath("train.txt").read_text().split()
    val = split_dir.joinpath("val.txt").read_text().split()
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert not set(train) & set(val) and len(set(train + val)) == N_TRAIN + N_VAL
    assert train[0] == "syn_000000" and val[0] == f"syn_{N_TRAIN:06d}"
    assert root.joinpath("classes.txt").read_text().split() == ["background", *synthetic.SHAPES[:K]]
    for image_id in train + val:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "P", (SIZE, SIZE))
            assert mask.getpalette() == voc_palette()
    assert not list(root.rglob("*.tmp")), "atomic writes left temporary files behind"


def test_same_seed_is_byte_identical_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    again = synthetic.generate(tmp_path / "a", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, classes=K)
    other = synthetic.generate(
        tmp_path / "b", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, classes=K, seed=1
    )
    assert _files(again) == _files(root)
    files, other_files = _files(root), _files(other)
    assert files.keys() == other_files.keys()
    pictures = [name for name in files if name.endswith((".jpg", ".png"))]
    assert all(files[name] != other_files[name] for name in pictures)


def test_masks_have_ids_in_range_and_every_image_a_class(root: Path) -> None:
    for split in ("train", "val"):
        ds = SegDataset(root, split)
        for i in range(len(ds)):
            values = set(np.unique(ds.mask(i)).tolist())
            assert values <= set(range(K + 1)) | {255}
            assert len(ds.labels(i)) >= 1, f"{ds.ids[i]} has no foreground class"


def test_borders_are_255_between_different_labels(root: Path) -> None:
    ds = SegDataset(root, "train")
    masks = [ds.mask(i) for i in range(len(ds))]
    assert all((m == 255).any() for m in masks)
    between = total = 0
    for m in masks:
        padded = np.pad(m, 2, mode="edge")
        for y, x in zip(*np.nonzero(m == 255)):
            window = padded[y : y + 5, x : x + 5]
            total += 1
            between += len(np.unique(window[window != 255])) >= 2
    # Only the thinnest tips (a star's points) can be all border with a single label beside them.
    assert between / total > 0.95
    # The band is thin: a few percent of the pixels, not whole objects.
    assert 0.005 < np.mean([(m == 255).mean() for m in masks]) < 0.12


def test_border_band_marks_the_outer_rim_only() -> None:
    labels = np.zeros((8, 10), np.uint8)
    labels[2:6, 2:5] = 1
    labels[2:6, 5:8] = 2
    band = synthetic._border_band(labels, 1)
    expected = np.zeros_like(band)
    expected[2:6, 2:5] = True
    expected[3:5, 3:5] = False  # class 1 interior, up to the larger class 2: one side is marked
    expected[2:6, 5:8] = True
    expected[3:5, 6] = False  # class 2 interior: its column beside class 1 is a border
    assert (band == expected).all()
    assert not synthetic._border_band(np.ones((4, 4), np.uint8), 1).any(), "image edge is no border"


def test_variety_every_class_appears_and_objects_overlap(tmp_path: Path) -> None:
    out = synthetic.generate(tmp_path, n_train=60, n_val=0, size=32, classes=K, seed=3)
    ds = SegDataset(out, "train")
    labels = [set(ds.labels(i).tolist()) for i in range(len(ds))]
    assert set().union(*labels) == set(range(1, K + 1))
    assert any(len(present) >= 2 for present in labels)
    touching = 0
    for i in range(len(ds)):  # two different classes within 2 px: touching or occluding
        m = ds.mask(i)
        for c in ds.labels(i):
            near = np.zeros_like(m, bool)
            grown = np.pad(m == c, 2)
            for dy in range(5):
                for dx in range(5):
                    near |= grown[dy : dy + m.shape[0], dx : dx + m.shape[1]]
            touching += bool(((m != c) & (m != 0) & (m != 255) & near).any())
    assert touching > 0


def test_arguments_are_checked(tmp_path: Path) -> None:
    for bad in (0, len(synthetic.SHAPES) + 1):
        with pytest.raises(UserError, match="classes"):
            synthetic.generate(tmp_path, n_train=2, n_val=0, classes=bad)
    with pytest.raises(UserError, match="class_colour"):
        synthetic.generate(tmp_path, n_train=2, n_val=0, class_colour=1.5)
    synthetic.generate(tmp_path, n_train=2, n_val=0, size=32, classes=len(synthetic.SHAPES))
