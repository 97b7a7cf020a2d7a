"""Importing IRN / PuzzleCAM CAM files and scoring label PNGs as their evaluate scripts do.

The CAM files are written exactly as the reference writers write them (IRN ``step/make_cam.py``:
keys a torch tensor of 0-based ids, ``cam`` a tensor, ``high_res`` numpy; PuzzleCAM
``inference_classification.py``: keys padded with background 0, ``cam`` a tensor, ``hr_cam``
numpy; neither CAM array has a background channel).
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tune.cli import main
from wsss.cam import strided_size
from wsss.data import SegDataset
from wsss.errors import DataError, UserError
from wsss.files import save_palette_png
from wsss.interop import evaluate_folder, import_cams
from wsss.store import CamStore
from wsss.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SegDataset:
    root = generate(tmp_path_factory.mktemp("syn"), n_train=6, n_val=2, size=32, classes=3, seed=0)
    return SegDataset(root, "train")


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Both writers divide each class by its max + 1e-5."""
    return x / (torch.amax(x, dim=(1, 2), keepdim=True) + 1e-5)


def reference_cams(data: SegDataset, i: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """(multi-hot label vector, strided CAMs, high-res CAMs) of image i, seeded by i."""
    g = torch.Generator().manual_seed(i)
    label = np.zeros(data.num_classes - 1, np.float32)
    label[data.labels(i) - 1] = 1
    k = len(data.labels(i))
    strided = normalised(torch.rand(k, *strided_size(data.size(i), 4), generator=g))
    high = normalised(torch.rand(k, *data.size(i), generator=g)).numpy()
    return label, strided, high


def write_irn(folder, data: SegDataset) -> None:
    folder.mkdir(exist_ok=True)
    for i, image_id in enumerate(data.ids):
        label, strided, high = reference_cams(data, i)
        valid_cat = torch.nonzero(torch.from_numpy(label))[:, 0]
        np.save(folder / f"{image_id}.npy", {"keys": valid_cat, "cam": strided, "high_res": high})


def write_puzzlecam(folder, data: SegDataset) -> None:
    folder.mkdir(exist_ok=True)
    for i, image_id in enumerate(data.ids):
        label, strided, high = reference_cams(data, i)
        keys = torch.nonzero(torch.from_numpy(label))[:, 0]
        keys = np.pad(keys + 1, (1, 0), mode="constant")
        np.save(folder / f"{image_id}.npy", {"keys": keys, "cam": strided, "hr_cam": high})


@pytest.mark.parametrize("fmt, writer", [("irn", write_irn), ("puzzlecam", write_puzzlecam)])
@pytest.mark.parametrize("resolution", ["high", "strided"])
def test_import_matches_the_written_cams(tmp_path, data, fmt, writer, resolution):
    writer(tmp_path / "cams", data)
    store = import_cams(fmt, tmp_path / "cams", data, tmp_path / "store", allow_pickle=True,
                        resolution=resolution)
    assert store.ids == data.ids
    assert store.manifest["source"] == fmt and store.manifest["resolution"] == resolution
    assert store.manifest["cam_dir"] == str((tmp_path / "cams").resolve())
    for i in range(len(data)):
        _, strided, high = reference_cams(data, i)
        expected = high if resolution == "high" else strided.numpy()
        assert store.keys(i).tolist() == data.labels(i).tolist()
        assert store.image_size(i) == data.size(i)
        np.testing.assert_allclose(store[i], expected, atol=1e-3)
        scores = store.scores(i)
        assert scores.shape == (len(data.labels(i)), *data.size(i))
        if resolution == "high":  # our normalisation: each class's peak is exactly 1
            np.testing.assert_allclose(scores, high / high.max(axis=(1, 2), keepdims=True),
                                       atol=1e-3)


def multi_label_image(data: SegDataset) -> int:
    return next(i for i in range(len(data)) if len(data.labels(i)) >= 2)


def test_keys_are_sorted_and_channels_follow(tmp_path, data):
    write_irn(tmp_path / "cams", data)
    i = multi_label_image(data)
    _, strided, high = reference_cams(data, i)
    zero_based = data.labels(i) - 1
    np.save(tmp_path / "cams" / f"{data.ids[i]}.npy",
            {"keys": torch.from_numpy(zero_based[::-1].copy()), "cam": strided.flip(0),
             "high_res": high[::-1].copy()})
    store = import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=True)
    assert store.keys(i).tolist() == data.labels(i).tolist()
    np.testing.assert_allclose(store[i], high, atol=1e-3)


def test_refuses_pickles_unless_allowed(tmp_path, data):
    write_irn(tmp_path / "cams", data)
    with pytest.raises(UserError, match="pickled.*runs code.*--allow-pickle"):
        import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=False)
    assert not (tmp_path / "store").exists()
    for i in range(len(data)):  # plain arrays, no pickle: the files are wrong, not unsafe
        np.save(tmp_path / "cams" / f"{data.ids[i]}.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"expected a dict saved with np.save .*found an array "
                                        r"of shape \(2, 8, 8\), dtype float32"):
        import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=False)


def test_current_store_is_reused_and_a_changed_file_rebuilds_it(tmp_path, data, monkeypatch):
    write_puzzlecam(tmp_path / "cams", data)
    args = ("puzzlecam", tmp_path / "cams", data, tmp_path / "store")
    import_cams(*args, allow_pickle=True)
    real_write = CamStore.write

    def no_write(*a, **k):
        raise AssertionError("store rewritten")

    monkeypatch.setattr(CamStore, "write", no_write)
    assert len(import_cams(*args, allow_pickle=True)) == len(data)

    _, strided, high = reference_cams(data, 0)
    keys = np.pad(data.labels(0), (1, 0))
    np.save(tmp_path / "cams" / f"{data.ids[0]}.npy",
            {"keys": keys, "cam": strided, "hr_cam": high / 2})
    monkeypatch.setattr(CamStore, "write", real_write)
    store = import_cams(*args, allow_pickle=True)
    np.testing.assert_allclose(store[0], high / 2, atol=1e-3)


def _irn_entry(data: SegDataset, i: int) -> dict:
    label, strided, high = reference_cams(data, i)
    return {"keys": torch.nonzero(torch.from_numpy(label))[:, 0], "cam": strided,
            "high_res": high}


def _with(**changes):
    return lambda d: {**d, **changes}


def _without(entry):
    return lambda d: {k: v for k, v in d.items() if k != entry}


BAD_FILES = {
    "not a dict": (lambda d: np.zeros(3), "expected a dict saved with np.save"),
    "random walk": (lambda d: {"keys": np.pad(d["keys"].numpy() + 1, (1, 0)),
                               "rw": d["high_res"]}, "random-walk output"),
    "puzzlecam file": (lambda d: {"keys": d["keys"], "cam": d["cam"], "hr_cam": d["high_res"]},
                       "no 'high_res' entry.*--format puzzlecam"),
    "no keys": (_without("keys"), "no 'keys' entry"),
    "keys vs channels": (lambda d: {**d, "high_res": d["high_res"][:0]},
                         r"keys \[.*\] disagree with the 0 channels"),
    "float keys": (lambda d: {**d, "keys": d["keys"].float()}, "1-D array of class ids"),
    "keys vs labels": (lambda d: {**d, "keys": d["keys"] + 1},
                       r"CAMs of classes \[.*\] but image .* is labelled \[.*\]"),
    "size": (lambda d: {**d, "high_res": d["high_res"][:, :-1]}, "31x32 but image"),
    "nan": (lambda d: {**d, "high_res": np.where(d["high_res"] > 0.5, np.nan, d["high_res"])},
            "NaN"),
    "negative": (lambda d: {**d, "high_res": d["high_res"] - 0.5}, "negative values"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_named(tmp_path, data, case):
    corrupt, message = BAD_FILES[case]
    write_irn(tmp_path / "cams", data)
    path = tmp_path / "cams" / f"{data.ids[2]}.npy"
    np.save(path, corrupt(_irn_entry(data, 2)), allow_pickle=True)
    with pytest.raises(DataError, match=message) as e:
        import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=True)
    assert str(path.resolve()) in str(e.value)
    assert not (tmp_path / "store").exists()


def test_missing_and_garbage_files_are_named(tmp_path, data):
    write_irn(tmp_path / "cams", data)
    (tmp_path / "cams" / f"{data.ids[1]}.npy").unlink()
    (tmp_path / "cams" / f"{data.ids[4]}.npy").unlink()
    with pytest.raises(DataError, match=rf"{data.ids[1]}\.npy not found \(2 of the 6 ids"):
        import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=True)
    write_irn(tmp_path / "cams", data)
    (tmp_path / "cams" / f"{data.ids[3]}.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=rf"cannot read CAM file .*{data.ids[3]}\.npy"):
        import_cams("irn", tmp_path / "cams", data, tmp_path / "store", allow_pickle=True)


# --- evaluate: a hand-made 2-image dataset, classes background, a, b, c (c never occurs) ---
GT = [np.array([[0, 0, 1, 1],
                [0, 255, 1, 1]]),
      np.array([[2, 2, 0, 0],
                [2, 2, 0, 0]])]
PRED = [np.array([[0, 1, 1, 255],
                  [0, 2, 1, 1]]),  # the 2 lies on GT 255: ignored
        np.array([[2, 0, 0, 0],
                  [2, 2, 255, 0]])]
# pooled counts (GT row, prediction): background 5 hits, 1 -> a, 1 -> neutral; a: 3 hits,
# 1 neutral; b: 3 hits, 1 -> background. PuzzleCAM: neutral is a miss, c scores 0 in the mean.
PUZZLECAM_IOU = {"background": 5 / 8, "a": 3 / 5, "b": 3 / 4, "c": 0.0}
# IRN: neutral becomes background (background TP 6, predicted 8); c has no union: left out.
IRN_IOU = {"background": 6 / 9, "a": 3 / 5, "b": 3 / 4, "c": None}


@pytest.fixture()
def tiny(tmp_path):
    root = tmp_path / "tiny"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "pred"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("background\na\nb\nc\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("img0\nimg1\n")
    for i, (gt, pred) in enumerate(zip(GT, PRED)):
        Image.new("RGB", (4, 2)).save(root / "JPEGImages" / f"img{i}.jpg")
        save_palette_png(root / "SegmentationClass" / f"img{i}.png", gt)
    save_palette_png(root / "pred" / "img0.png", PRED[0])  # palette PNG
    Image.fromarray(PRED[1].astype(np.uint8)).save(root / "pred" / "img1.png")  # grayscale
    return root


@pytest.mark.parametrize("protocol, expected", [("puzzlecam", PUZZLECAM_IOU), ("irn", IRN_IOU)])
def test_evaluate_matches_hand_computed_iou(tiny, protocol, expected):
    result = evaluate_folder(tiny / "pred", SegDataset(tiny, "val"), protocol)
    assert result["protocol"] == protocol and result["n_images"] == 2
    assert result["iou"] == pytest.approx(expected)
    values = [v for v in expected.values() if v is not None]
    assert result["miou"] == pytest.approx(sum(values) / len(values))


def test_evaluate_matches_the_reference_formulas_on_random_predictions(tmp_path, data):
    """PuzzleCAM: per-class P, T, TP over GT < 255, IoU = TP / (T + P - TP + 1e-10), mean of all;
    IRN: 255 -> 0, IoU = diag / (row + column - diag) with NaN for 0 / 0, nanmean."""
    rng = np.random.default_rng(0)
    c = data.num_classes
    p, t, tp = np.zeros(c), np.zeros(c), np.zeros(c)
    conf = np.zeros((c, c))
    for i, image_id in enumerate(data.ids):
        gt = data.mask(i)
        pred = rng.choice([0, 1, 2, 255], size=gt.shape, p=[0.4, 0.3, 0.2, 0.1])  # 3 never
        save_palette_png(tmp_path / f"{image_id}.png", pred)
        valid = gt < 255
        for k in range(c):
            p[k] += ((pred == k) & valid).sum()
            t[k] += ((gt == k) & valid).sum()
            tp[k] += ((gt == k) & (pred == k) & valid).sum()
        irn_pred = np.where(pred == 255, 0, pred)
        np.add.at(conf, (gt[valid], irn_pred[valid]), 1)
    puzzlecam = tp / (t + p - tp + 1e-10)
    with np.errstate(invalid="ignore"):
        irn = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    got = evaluate_folder(tmp_path, data, "puzzlecam")
    assert list(got["iou"].values()) == pytest.approx(puzzlecam.tolist(), rel=1e-12)
    assert got["miou"] == pytest.approx(puzzlecam.mean(), rel=1e-12)
    got = evaluate_folder(tmp_path, data, "irn")
    assert [np.nan if v is None else v for v in got["iou"].values()] == pytest.approx(
        irn.tolist(), rel=1e-12, nan_ok=True)
    assert got["miou"] == pytest.approx(np.nanmean(irn), rel=1e-12)


@pytest.mark.parametrize("bad, message", [
    (None, r"prediction .*img1\.png not found \(1 of the 2 ids"),
    (np.zeros((2, 3)), r"img1\.png is 2x3 but mask .*img1\.png is 2x4"),
    (np.full((2, 4), 7), r"img1\.png has class id 7; expected 0\.\.3 or 255"),
])
def test_evaluate_errors_name_the_file(tiny, bad, message):
    path = tiny / "pred" / "img1.png"
    path.unlink()
    if bad is not None:
        save_palette_png(path, bad)
    with pytest.raises(DataError, match=message):
        evaluate_folder(tiny / "pred", SegDataset(tiny, "val"))


def test_cli_evaluate(tiny, capsys):
    base = ["evaluate", "--pred", str(tiny / "pred"), "--data", str(tiny), "--split", "val"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "puzzlecam protocol" in out and "62.50%" in out
    name, value = out.splitlines()[-1].split()
    assert name == "mIoU" and float(value.rstrip("%")) == pytest.approx(49.375, abs=0.01)
    assert main([*base, "--protocol", "irn", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iou"]["c"] is None and math.isclose(result["miou"], (6 / 9 + 0.6 + 0.75) / 3)
    assert main([*base[:-2], "--split", "nope"]) == 2
    assert "nope.txt not found" in capsys.readouterr().err


def test_cli_import_cams(tmp_path, data, capsys):
    write_puzzlecam(tmp_path / "cams", data)
    base = ["import-cams", "--format", "puzzlecam", "--dir", str(tmp_path / "cams"),
            "--data", str(data.root)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-pickle" in err
    assert main([*base, "--allow-pickle", "--resolution", "strided"]) == 0
    out = capsys.readouterr().out
    store = tmp_path / "cams" / "wsss-cam-store"
    assert str(store) in out and "6 images" in out and "4 classes" in out
    assert CamStore(store).manifest["resolution"] == "strided"
