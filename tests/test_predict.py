"""``wsss-tune predict``: the selected pair's DeepLabv3+ from its stage-2 checkpoint on a folder
of images, scored against the val ground truth exactly as stage 2 scored it; and every bad
input as one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tune.cli import main
from tune.folder import saved_config
from wsss.data import SegDataset
from wsss.errors import UserError
from wsss.files import voc_palette
from wsss.metrics import confusion, mean_iou
from wsss.segmentation import SegmentationSpec, build_model, load_segmentation, save_segmentation


@pytest.fixture(scope="module")
def val_images(finished_search, tmp_path_factory) -> tuple[Path, SegDataset]:
    """The search's val split and a folder holding its images (as a user would pass them)."""
    val = saved_config(finished_search).data.open("val")
    folder = tmp_path_factory.mktemp("val-images")
    for i in range(len(val)):
        shutil.copy(val.image_path(i), folder / val.image_path(i).name)
    return folder, val


def _val_miou(out: Path, val: SegDataset) -> float:
    """mIoU of the PNGs in ``out`` against ``val``, as stage 2 computes ``val_miou``: one
    confusion matrix pooled over the split (`evaluate_segmentation`)."""
    conf = np.zeros((val.num_classes, val.num_classes + 1), np.int64)
    for i in range(len(val)):
        with Image.open(out / f"{val.ids[i]}.png") as png:
            assert png.mode == "P" and png.getpalette() == voc_palette()
            pred = np.asarray(png)
        conf += confusion(pred, val.mask(i), val.num_classes)
    return mean_iou(conf)


def _error(capsys, *argv: str) -> str:
    """Run the CLI, expecting exit 2 and one line on stderr; that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("wsss-tune: error: ")
    return err


@pytest.mark.slow
def test_predict_reproduces_the_val_miou_of_the_selected_pair(finished_search, val_images,
                                                              tmp_path, capsys):
    images, val = val_images
    selection = json.loads((finished_search / "selection.json").read_text())
    bg, fg = selection["pair"]["bg"], selection["pair"]["fg"]
    out = tmp_path / "labels" / "nested"  # created with its parents
    assert main(["predict", str(finished_search), "--images", str(images), "--out",
                 str(out), "--device", "cpu"]) == 0
    assert (f"wrote {len(val)} label PNGs predicted by the DeepLabv3+ of (BG, FG) = "
            f"({bg:g}, {fg:g}) to {out}") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in val.ids)
    assert abs(_val_miou(out, val) - selection["metrics"]["val_miou"]) < 1e-6

    # any pair stage 2 trained, by --pair: its own val mIoU of stage2.csv
    stage2 = pd.read_csv(finished_search / "stage2.csv")
    other = stage2[(stage2.bg != bg) | (stage2.fg != fg)].iloc[0]
    out2 = tmp_path / "other"
    assert main(["predict", str(finished_search), "--images", str(images), "--out", str(out2),
                 "--pair", f"{other.bg},{other.fg}"]) == 0
    assert abs(_val_miou(out2, val) - other.val_miou) < 1e-6


@pytest.mark.slow
def test_a_stage2_checkpoint_loads_with_its_architecture_and_epoch(finished_search, tmp_path):
    stage2 = pd.read_csv(finished_search / "stage2.csv")
    row = stage2.iloc[0]
    folder = Path(row.stage2_checkpoint)
    model, meta = load_segmentation(folder, "cpu")  # the checkpoint folder ...
    assert not model.training and meta["epoch"] == 2
    assert meta["metrics"]["val_miou"] == pytest.approx(row.val_miou, abs=1e-12)
    state = torch.load(folder / "trial.pt", weights_only=True)
    spec = saved_config(finished_search).segmentation
    assert state["arch"] == build_model(spec, model.arch["classes"]).arch
    again, _ = load_segmentation(folder / "trial.pt", "cpu")  # ... or its file
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    # a moved search folder still finds its checkpoints (by their last three parts)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("search.json", "selection.json"):
        shutil.copy(finished_search / name, moved / name)
    rel = Path(*folder.parts[-3:])
    shutil.copytree(folder, moved / rel)
    stage2["stage2_checkpoint"] = [str(Path("/no/such/runs/ci", *Path(p).parts[-3:]))
                                   for p in stage2.stage2_checkpoint]
    stage2.to_csv(moved / "stage2.csv", index=False)
    image = tmp_path / "images"
    image.mkdir()
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(image / "grey.png")
    assert main(["predict", str(moved), "--images", str(image), "--out", str(tmp_path / "o"),
                 "--pair", f"{row.bg},{row.fg}"]) == 0
    with Image.open(tmp_path / "o" / "grey.png") as png:
        assert png.size == (56, 40) and png.mode == "P"


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(finished_search, val_images, tmp_path, capsys):
    images, _ = val_images
    run, out = str(finished_search), str(tmp_path / "out")

    # not a search / no selection / stage 2 not run / the pair was never trained
    assert "is not a search folder (search.json not found)" in _error(
        capsys, "predict", str(tmp_path), "--images", str(images), "--out", out)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(finished_search / "search.json", partial / "search.json")
    assert f"{partial} has no selection.json" in _error(
        capsys, "predict", str(partial), "--images", str(images), "--out", out)
    shutil.copy(finished_search / "selection.json", partial / "selection.json")
    assert f"{partial} has no stage2.csv: stage 2 (DeepLabv3+) was not run" in _error(
        capsys, "predict", str(partial), "--images", str(images), "--out", out)
    stage2 = pd.read_csv(finished_search / "stage2.csv")
    trained = ", ".join(f"{r.bg:g},{r.fg:g}" for r in stage2.itertuples())
    never = (f"pair 0.3,0.3 has no DeepLabv3+ in {finished_search / 'stage2.csv'}; stage 2 "
             f"trained {trained}")
    assert never in _error(capsys, "predict", run, "--images", str(images), "--out", out,
                           "--pair", "0.3,0.3")
    failed = stage2.assign(stage2_failed=1)
    failed.to_csv(partial / "stage2.csv", index=False)
    pair = f"{stage2.bg[0]:g},{stage2.fg[0]:g}"
    assert f"the DeepLabv3+ training of pair {pair} failed" in _error(
        capsys, "predict", str(partial), "--images", str(images), "--out", out, "--pair", pair)
    stage2.assign(stage2_checkpoint="/no/such/checkpoint").to_csv(partial / "stage2.csv",
                                                                  index=False)
    assert f"the stage-2 checkpoint of pair {pair} (/no/such/checkpoint, named in" in _error(
        capsys, "predict", str(partial), "--images", str(images), "--out", out, "--pair", pair)

    # --images missing or empty, an image that cannot be read, --out a file or --images itself
    assert f"--images {tmp_path / 'nowhere'} is not a folder" in _error(
        capsys, "predict", run, "--images", str(tmp_path / "nowhere"), "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    assert f"--images {empty} holds no image" in _error(
        capsys, "predict", run, "--images", str(empty), "--out", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "a.jpg")
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    assert f"cannot read image {bad / 'b.jpg'}" in _error(
        capsys, "predict", run, "--images", str(bad), "--out", out)
    assert (tmp_path / "out" / "a.png").is_file()  # the images before it are done
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "b.png")
    (bad / "b.jpg").unlink()
    (bad / "a.png").write_bytes((bad / "b.png").read_bytes())
    assert "a.jpg and a.png would both be predicted into a.png" in _error(
        capsys, "predict", run, "--images", str(bad), "--out", out)
    (bad / "a.png").unlink()
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert f"--out {taken} exists and is not a folder" in _error(
        capsys, "predict", run, "--images", str(bad), "--out", str(taken))
    assert "is the --images folder" in _error(
        capsys, "predict", run, "--images", str(bad), "--out", str(bad))


@pytest.mark.slow
def test_a_file_that_is_no_model_is_a_user_error_naming_it(finished_search, tmp_path):
    stage1 = pd.read_csv(finished_search / "stage1.csv").dropna(subset=["checkpoint"])
    trial = Path(stage1.checkpoint.iloc[0]) / "trial.pt"  # a stage-1 (refiner) checkpoint
    with pytest.raises(UserError, match=re.escape(
            f"{trial} is not a DeepLabv3+ model file nor a stage-2 checkpoint")):
        load_segmentation(trial, "cpu")


def test_load_segmentation_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=re.escape(
            f"{garbage} is not a DeepLabv3+ model file nor a stage-2 checkpoint: cannot read")):
        load_segmentation(garbage, "cpu")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match=re.escape(
            f"{other} is not a DeepLabv3+ model file nor a stage-2 checkpoint (it holds "
            "weights)")):
        load_segmentation(other, "cpu")
    with pytest.raises(UserError, match=re.escape(f"model file {tmp_path / 'none.pt'} not found")):
        load_segmentation(tmp_path / "none.pt", "cpu")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path} is a folder holding 2 .pt files")):
        load_segmentation(tmp_path, "cpu")
    model = build_model(SegmentationSpec(decoder_channels=16), 3)
    old = tmp_path / "old" / "trial.pt"  # a training state from before states held ``arch``
    old.parent.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 1}, old)
    with pytest.raises(UserError, match=re.escape(
            f"{old}: this training state does not record its architecture")):
        load_segmentation(old.parent, "cpu")
    torch.save({"model": model.state_dict(), "epoch": 1,
                "arch": {**model.arch, "classes": 5}}, old)
    with pytest.raises(UserError, match=re.escape(f"{old}: its weights do not fit its DeepLabv3+")):
        load_segmentation(old, "cpu")
    saved = tmp_path / "old" / "seg.pt"
    save_segmentation(model, saved, {"bg": 0.2})
    assert load_segmentation(saved, "cpu")[1] == {"bg": 0.2}
