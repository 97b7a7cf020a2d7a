"""``wsss-tune predict``: a finished search's DeepLabv3+ (the selected pair's, or another trained
pair's) on a folder of images, written as VOC palette PNGs: the model a search is run for.

The model comes from the pair's stage-2 checkpoint (`stage2.csv`, ``stage2_checkpoint``), and
images are read and normalised exactly as stage 2 read them to train and score it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tune.folder import load_state
from tune.space import Pair
from wsss.data import read_rgb
from wsss.devices import resolve_device
from wsss.errors import UserError
from wsss.files import output_folder, save_palette_png
from wsss.segmentation import load_segmentation, predict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(images: Path) -> list[Path]:
    """The images (jpg, jpeg, png; any case) of the folder ``images``, sorted; none, a missing
    folder or two images with one stem (both would write ``<stem>.png``) are `UserError`s."""
    if not images.is_dir():
        raise UserError(f"--images {images} is not a folder")
    files = sorted(p for p in images.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"--images {images} holds no image (.jpg, .jpeg, .png)")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise UserError(f"--images {images}: {stems[p.stem].name} and {p.name} would both "
                            f"be predicted into {p.stem}.png")
        stems[p.stem] = p
    return files


def selected_pair(folder: Path) -> Pair:
    """The pair ``selection.json`` of the search ``folder`` names."""
    path = folder / "selection.json"
    if not path.is_file():
        raise UserError(f"{folder} has no selection.json: its search did not finish (resume it: "
                        f"wsss-tune search --resume {folder}), or give --pair BG,FG")
    return Pair.of(json.loads(path.read_text()))


def stage2_checkpoint(folder: Path, pair: Pair) -> Path:
    """The stage-2 checkpoint folder of ``pair`` in the search ``folder``. A checkpoint missing
    at its recorded path is looked for by its last three parts (``stage2/<trial>/<checkpoint>``)
    under ``folder``: a moved search folder still finds its models."""
    table_path = folder / "stage2.csv"
    if not table_path.is_file():
        raise UserError(f"{folder} has no stage2.csv: stage 2 (DeepLabv3+) was not run or did "
                        f"not finish, so there is no model to predict with")
    table = pd.read_csv(table_path)
    match = pair.rows_in(table)
    if match.empty:
        trained = ", ".join(Pair(r.bg, r.fg).label for r in table.itertuples())
        raise UserError(f"pair {pair.label} has no DeepLabv3+ in {table_path}; stage 2 trained "
                        f"{trained or 'none'}")
    row = match.iloc[0]
    if int(row.get("stage2_failed", 0)):
        raise UserError(f"the DeepLabv3+ training of pair {pair.label} failed ({table_path}): "
                        "there is no trained model to predict with")
    recorded = row.get("stage2_checkpoint")
    if pd.isna(recorded) or not str(recorded):
        raise UserError(f"pair {pair.label} has no stage-2 checkpoint in {table_path}")
    path = Path(str(recorded))
    moved = folder.joinpath(*path.parts[-3:])
    if not path.exists() and moved.exists():
        return moved
    if not path.exists():
        raise UserError(f"the stage-2 checkpoint of pair {pair.label} ({path}, named in "
                        f"{table_path}) is gone")
    return path


def predict_folder(folder: Path, images: Path, out: Path,
                   pair: Pair | None = None, device: str = "auto") -> tuple[int, Pair]:
    """Predict every image of ``images`` with the DeepLabv3+ stage 2 trained on ``pair``
    (default: the selected one) of the search ``folder``; write ``<stem>.png`` VOC palette PNGs
    atomically into ``out``. Every input is checked before the model is loaded; an image that
    cannot be decoded stops the run naming it. Returns (count, pair)."""
    load_state(folder)  # a clear error when it is not a search folder
    pair = pair if pair is not None else selected_pair(folder)
    checkpoint = stage2_checkpoint(folder, pair)
    files = image_files(images)
    if out.resolve() == images.resolve():
        raise UserError(f"--out {out} is the --images folder: its PNG images would be "
                        "overwritten; give another folder")
    output_folder(out, "--out")
    device = resolve_device(device)
    model, _ = load_segmentation(checkpoint, device)
    for path in files:
        save_palette_png(out / f"{path.stem}.png", predict(model, read_rgb(path), device))
    return len(files), pair
