"""The VOC-layout reader: what it returns, and that every data problem names the file at fault."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import synthetic
from wsss.data import VOC_CLASSES, SegDataset
from wsss.errors import DataError
from wsss.files import save_palette_png, voc_palette

K = 5


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src")
    return synthetic.generate(out, n_train=12, n_val=3, size=40, classes=K)


@pytest.fixture
def root(source: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(source, tmp_path / "data"))


def _voc_style_copy(root: Path) -> list[str]:
    """Rename the train images to VOC-style ids (2007_000000, ...) and return them."""
    ds = SegDataset(root, "train")
    new_ids = [f"2007_{i:06d}" for i in range(len(ds))]
    images, masks = root / "JPEGImages", root / "SegmentationClass"
    for old, new in zip(ds.ids, new_ids):
        (images / f"{old}.jpg").rename(images / f"{new}.jpg")
        (masks / f"{old}.png").rename(masks / f"{new}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(new_ids) + "\n")
    return new_ids


def test_voc_palette_is_the_standard_colour_map() -> None:
    palette = voc_palette()
    assert len(palette) == 768
    assert palette[0:3] == [0, 0, 0] and palette[3:6] == [128, 0, 0]
    assert palette[15 * 3 : 16 * 3] == [192, 128, 128]  # person
    assert palette[255 * 3 :] == [224, 224, 192]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def test_save_palette_png_round_trips(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 255], [20, 3, 0]], np.uint8)
    save_palette_png(tmp_path / "m.png", labels)
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
        assert (np.asarray(image) == labels).all()
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_reads_synthetic_split(root: Path) -> None:
    ds = SegDataset(root, "train")
    assert len(ds) == 12 and ds.ids[0] == "syn_000000"
    assert ds.num_classes == K + 1 and ds.class_names[0] == "background"
    image, mask = ds.image(0), ds.mask(0)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    assert mask.shape == (40, 40) and mask.dtype == np.uint8 and ds.size(0) == (40, 40)
    matrix = ds.label_matrix()
    assert matrix.shape == (12, K) and matrix.dtype == np.float32
    for i in range(len(ds)):
        present = np.unique(ds.mask(i))
        expected = present[(present > 0) & (present < 255)]
        assert ds.labels(i).dtype == np.int64 and ds.labels(i).tolist() == expected.tolist()
        assert np.flatnonzero(matrix[i]).tolist() == (expected - 1).tolist()
    assert SegDataset(root, "val").ids[0] == "syn_000012"


def test_class_names_default_to_voc_without_classes_txt(root: Path) -> None:
    (root / "classes.txt").unlink()
    assert SegDataset(root, "train").class_names == VOC_CLASSES
    custom = SegDataset(root, "train", class_names=["bg", *"abcde"])
    assert custom.num_classes == 6


def test_missing_image_names_the_file_and_the_count(root: Path) -> None:
    gone = root / "JPEGImages" / "syn_000003.jpg"
    gone.unlink()
    (root / "SegmentationClass" / "syn_000005.png").unlink()
    with pytest.raises(DataError) as error:
        SegDataset(root, "train")
    assert str(gone) in str(error.value) and "2 files missing" in str(error.value)


def test_missing_and_empty_split_file(root: Path) -> None:
    with pytest.raises(DataError, match="train_aug.txt"):
        SegDataset(root, "train_aug")
    empty = root / "ImageSets" / "Segmentation" / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as error:
        SegDataset(root, "empty")
    assert str(empty) in str(error.value)


def test_mask_size_mismatch(root: Path) -> None:
    path = root / "SegmentationClass" / "syn_000001.png"
    save_palette_png(path, np.zeros((40, 30), np.uint8))
    ds = SegDataset(root, "train")
    with pytest.raises(DataError) as error:
        ds.mask(1)
    assert str(path) in str(error.value) and "40x30" in str(error.value)
    assert str(root / "JPEGImages" / "syn_000001.jpg") in str(error.value)


def test_out_of_range_label_id(root: Path) -> None:
    path = root / "SegmentationClass" / "syn_000002.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[5, 5] = 37
    save_palette_png(path, labels)
    ds = SegDataset(root, "train")
    with pytest.raises(DataError) as error:
        ds.labels(2)
    assert str(path) in str(error.value) and "label id 37; expected 0..5 or 255" in str(error.value)


def test_corrupt_jpeg(root: Path) -> None:
    path = root / "JPEGImages" / "syn_000004.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    ds = SegDataset(root, "train")
    with pytest.raises(DataError) as error:
        ds.image(4)
    assert f"cannot read image {path}" in str(error.value)
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot read image"):
        ds.image(4)


def test_grayscale_jpeg_is_converted(root: Path) -> None:
    path = root / "JPEGImages" / "syn_000000.jpg"
    Image.open(path).convert("L").save(path, quality=90)
    image = SegDataset(root, "train").image(0)
    assert image.shape == (40, 40, 3) and (image[..., 0] == image[..., 2]).all()


def test_rgb_mask_is_rejected(root: Path) -> None:
    path = root / "SegmentationClass" / "syn_000006.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError) as error:
        SegDataset(root, "train").mask(6)
    assert str(path) in str(error.value) and "palette or grayscale PNG" in str(error.value)


def _irn_key(image_id: str) -> np.int32:
    return np.int32(int(image_id.replace("_", "")))


@pytest.mark.parametrize("key", [_irn_key, str], ids=["int", "str"])
def test_cls_labels_npy_matches_masks(root: Path, key: Callable[[str], object]) -> None:
    ids = _voc_style_copy(root)
    from_masks = SegDataset(root, "train")
    table = {key(i): from_masks.label_matrix()[n] for n, i in enumerate(ids)}
    np.save(root / "cls_labels.npy", table)
    for mask in (root / "SegmentationClass").iterdir():
        mask.unlink()
    ds = SegDataset(root, "train", cls_labels=root / "cls_labels.npy", require_masks=False)
    assert [ds.labels(i).tolist() for i in range(len(ds))] == [
        from_masks.labels(i).tolist() for i in range(len(ds))
    ]
    assert (ds.label_matrix() == from_masks.label_matrix()).all()


def test_irn_integer_key_encoding(root: Path) -> None:
    """IRN's keys are np.loadtxt(..., dtype=np.int32) of the ids: 2007_000032 -> 2007000032."""
    ids = _voc_style_copy(root)
    table = {_irn_key(i): np.zeros(K, np.float32) for i in ids}
    table[np.int32(2007_000003)][[0, 4]] = 1.0
    np.save(root / "cls_labels.npy", table)
    ds = SegDataset(root, "train", cls_labels=root / "cls_labels.npy")
    assert ds.labels(3).tolist() == [1, 5]


def test_cls_labels_missing_id_and_wrong_length(root: Path) -> None:
    ids = _voc_style_copy(root)
    path = root / "cls_labels.npy"
    np.save(path, {i: np.ones(K) for i in ids[1:]})
    with pytest.raises(DataError) as error:
        SegDataset(root, "train", cls_labels=path)
    assert str(path) in str(error.value) and ids[0] in str(error.value)
    np.save(path, {i: np.ones(20) for i in ids})
    with pytest.raises(DataError) as error:
        SegDataset(root, "train", cls_labels=path)
    assert str(path) in str(error.value) and "expected 5" in str(error.value)


def test_grayscale_mask_folder_with_custom_split_file(root: Path) -> None:
    palette = SegDataset(root, "train")
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    for i, image_id in enumerate(palette.ids):
        Image.fromarray(palette.mask(i)).save(aug / f"{image_id}.png")  # mode "L"
    (root / "lists").mkdir()
    (root / "lists" / "train_aug.txt").write_text("\n".join(palette.ids) + "\n\n")
    ds = SegDataset(
        root, "train_aug", mask_dir="SegmentationClassAug", split_file="lists/train_aug.txt"
    )
    assert Image.open(aug / f"{ds.ids[0]}.png").mode == "L"
    assert ds.ids == palette.ids
    for i in range(len(ds)):
        assert (ds.mask(i) == palette.mask(i)).all()
        assert ds.labels(i).tolist() == palette.labels(i).tolist()
    assert ds.fingerprint() != palette.fingerprint()  # another mask folder is other data


def test_masks_needed_when_labels_come_from_them(root: Path) -> None:
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(DataError, match="SegmentationClass"):
        SegDataset(root, "train", require_masks=False)


def test_fingerprint_changes_with_one_mask_pixel(root: Path) -> None:
    before = SegDataset(root, "train").fingerprint()
    assert SegDataset(root, "train").fingerprint() == before
    assert SegDataset(root, "val").fingerprint() != before
    path = root / "SegmentationClass" / "syn_000007.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[0, 0] = 1 if labels[0, 0] != 1 else 2
    save_palette_png(path, labels)
    assert SegDataset(root, "train").fingerprint() != before


def test_atomic_writes_respect_the_umask(tmp_path):
    """Outputs are for sharing (a lab's runs folder): written like any file, 0666 minus the
    umask, not mkstemp's private 0600."""
    import os

    from wsss.files import UMASK, atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert (tmp_path / "a.json").read_bytes() == b"{}" and len(os.listdir(tmp_path)) == 1
