"""The bad-input catalogue: what a user gets wrong, and what they are told. Each case runs the
CLI (`tune.cli.main`) and asserts the exit code, the one line shown, and that nothing was
trained before it (docs: README, "Bad input"). Stop signals are in `test_interrupts.py`, an
unreachable tracking server and a locked search folder in `test_search.py`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune.cli import main


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    from wsss.synthetic import generate

    root = tmp_path_factory.mktemp("bad") / "data"
    generate(root, n_train=24, n_val=8, size=32, classes=3, seed=0)
    return root


@pytest.fixture
def data(clean_data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(clean_data, copy)
    return copy


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _search(data: Path, tmp_path: Path, *sets: str) -> list[str]:
    return ["search", "--config", "ci", "--data", str(data), "--set", "name=bad",
            "--set", f"runtime.runs_root={tmp_path / 'runs'}",
            *[a for s in sets for a in ("--set", s)]]


def _fails(args: list[str], capsys, *expected: str) -> str:
    assert main(args) == 2
    output = capsys.readouterr().err.strip()
    assert "wsss-tune: error: " in output and "Traceback" not in output, output
    err = output[output.index("wsss-tune: error: "):]  # before it, at most library log lines
    assert err.count("\n") == 0 or err.startswith("wsss-tune: error: invalid config"), err
    for text in expected:
        assert text in err, err
    return err


def _nothing_trained(tmp_path: Path) -> None:
    assert not list((tmp_path / "runs").glob("stores/classifier-*/model.pt"))


def test_a_bad_val_image_or_mask_fails_before_the_classifier_trains_and_blocks_no_rerun(
        clean_data, data, tmp_path, capsys):
    val = _ids(data, "val")
    image = data / "JPEGImages" / f"{val[0]}.jpg"
    _truncate(image)
    _fails(_search(data, tmp_path), capsys, f"cannot read image {image}")
    _nothing_trained(tmp_path)
    assert not (tmp_path / "runs" / "bad" / "search.json").exists()
    shutil.copy(clean_data / "JPEGImages" / image.name, image)  # repaired: the rerun
    mask = data / "SegmentationClass" / f"{val[1]}.png"             # meets the next error
    labels = np.array(Image.open(mask))
    labels[0, 0] = 9
    Image.fromarray(labels).save(mask)
    _fails(_search(data, tmp_path), capsys, f"mask {mask} has label id 9; expected 0..3 or 255")
    _nothing_trained(tmp_path)


def test_a_truncated_train_image_fails_before_the_first_epoch(data, tmp_path, capsys):
    image = data / "JPEGImages" / f"{_ids(data, 'train')[5]}.jpg"
    _truncate(image)
    _fails(_search(data, tmp_path), capsys, f"cannot read image {image}")
    _nothing_trained(tmp_path)


@pytest.mark.parametrize("sets, expected", [
    (["segmentation.encoder=nope"], "segmentation.encoder 'nope'"),
    (["segmentation.encoder_weights=/no/such.pt"],
     "segmentation.encoder_weights: file /no/such.pt not found"),
    (["segmentation.encoder_weights={junk}"], "segmentation.encoder_weights {junk} does not fit"),
    (["classifier.weights={junk}"],
     "classifier.weights {junk}: not weights of classifier.model 'test_byobnet'"),
    (["trial.backbone=resnet18", "trial.backbone_weights={junk}"],
     "trial.backbone_weights {junk}: not weights of trial.backbone 'resnet18'"),
    (["trial.backbone_weights={junk}"], "backbone_weights is set but backbone is not"),
    (["classifier.model=nope"], "classifier.model 'nope'"),
    (["search.top_k=zero"], "[from --set search.top_k=zero]"),
    (["refine.method=bogus"], "not a registered refiner"),
])
def test_models_weights_and_values_fail_before_stage_0(data, tmp_path, capsys, sets, expected):
    junk = tmp_path / "junk.pt"
    junk.write_text("not weights")
    sets = [s.format(junk=junk) for s in sets]
    _fails(_search(data, tmp_path, *sets), capsys, expected.format(junk=junk))
    assert not (tmp_path / "runs" / "stores").exists()


def test_output_places_that_cannot_hold_outputs(data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    _fails(_search(data, tmp_path, f"runtime.runs_root={afile}"), capsys,
           f"runtime.runs_root {afile} exists and is not a folder")
    _fails(["export-labels", str(tmp_path), "--out", str(afile)], capsys,
           f"--out {afile} exists and is not a folder")
    _fails(["search", "--resume", str(tmp_path)], capsys,
           f"{tmp_path} is not a search folder (search.json not found)")
    _fails(["search", "--resume", str(tmp_path), "--set", "name=x"], capsys,
           "--resume continues a search with its saved config: drop --set")
    _fails(["trial", "--config", "ci", "--bg", "0.6", "--fg", "0.4"], capsys, "--bg", "--fg")


def test_debug_shows_the_traceback_the_one_line_hides(tmp_path):
    args = [sys.executable, "-m", "tune.cli", "search", "--resume", str(tmp_path)]
    quiet = subprocess.run(args, capture_output=True, text=True)
    loud = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1
    assert "Traceback" in loud.stderr and "is not a search folder" in loud.stderr
