"""``wsss-tune gc``: remove what no search of a runs root refers to.

Stage-0 stores are shared by every search of a runs root and are never removed by a search:
changing data or settings leaves the old ones behind. A search records the stores it uses in its
``search.json`` (after stage 0); the stores no search records are garbage. So are the older
checkpoints of a finished search's trials (those its ``stage1.csv`` / ``stage2.csv`` do not
name), store folders half-written by a killed stage 0, and temporary files of writes killed
before their rename. Searches that are not finished keep every checkpoint (a resume needs them).

A collection holds the runs root's stores lock exclusively: it refuses to start while a search
or another command uses the runs root, and commands started meanwhile wait for it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tune import locking
from tune.config import STORES_LOCK
from tune.folder import LOCK_FILE, STATE_FILE
from wsss.errors import UserError
from wsss.store import orphans, remove_store


@dataclass(frozen=True)
class Garbage:
    path: Path
    size: int  # bytes
    why: str


@dataclass
class Collection:
    """What a collection found: the garbage, and why anything else was kept."""

    garbage: list[Garbage]
    searches: list[Path]  # the search folders of the runs root
    kept_stores: list[str]  # store folder names some search refers to (all when unknown)
    unknown: list[Path]  # searches that do not say which stores they use


def size_of(path: Path) -> int:
    """Bytes of a file or a folder's files (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _checkpoints(folder: Path, stage: str, table: str, column: str) -> list[Path]:
    """A finished stage's checkpoints that its table does not name (older checkpoints a kill
    kept from Tune's clean-up). Named by their last three parts, so a moved runs root still
    matches."""
    if not (folder / table).is_file() or not (folder / stage).is_dir():
        return []
    named = pd.read_csv(folder / table).get(column, pd.Series(dtype=object)).dropna()
    keep = {Path(p).parts[-3:] for p in named}
    return [c for c in sorted((folder / stage).glob("*/checkpoint_*"))
            if c.is_dir() and c.relative_to(folder).parts[-3:] not in keep]


def _temporary_files(folder: Path) -> list[Path]:
    """Files of atomic writes killed before their rename (`wsss.files.atomic_write_bytes`)."""
    return sorted(p for p in folder.glob(".*.tmp") if p.is_file())


def survey(runs_root: Path) -> Collection:
    """Find the garbage of ``runs_root`` (nothing is removed)."""
    searches = sorted(d for d in runs_root.iterdir() if (d / STATE_FILE).is_file())
    garbage, used, unknown = [], set(), []
    for folder in searches:
        state = json.loads((folder / STATE_FILE).read_text())
        if "stores" in state:
            used.update(state["stores"])
        elif (folder / "stage1").exists():  # past stage 0 without saying which stores
            unknown.append(folder)
        if (folder / "selection.json").is_file():  # finished: its tables name what it uses
            garbage += [Garbage(c, size_of(c), "an older checkpoint of a finished trial")
                        for c in (_checkpoints(folder, "stage1", "stage1.csv", "checkpoint")
                                  + _checkpoints(folder, "stage2", "stage2.csv",
                                                 "stage2_checkpoint"))]
        garbage += [Garbage(f, size_of(f), "a write killed before its rename")
                    for f in _temporary_files(folder)]
    stores = runs_root / "stores"
    garbage += [Garbage(d, size_of(d), "left by a stage 0 that was killed")
                for d in orphans(stores)]  # none when there is no stores folder
    candidates = sorted(d for d in (stores.iterdir() if stores.is_dir() else ())
                        if d.is_dir() and not d.name.startswith("."))
    if unknown:
        kept = [d.name for d in candidates]
    else:
        kept = [d.name for d in candidates if d.name in used]
        garbage += [Garbage(d, size_of(d), "no search refers to it")
                    for d in candidates if d.name not in used]
    return Collection(garbage, searches, kept, unknown)


def collect(runs_root: Path, dry_run: bool = False) -> Collection:
    """Survey ``runs_root`` and, unless ``dry_run``, remove its garbage, holding its stores
    lock exclusively (a running search or command makes this a `UserError` naming it)."""
    if not runs_root.is_dir():
        raise UserError(f"{runs_root} is not a runs root (not a folder)")
    try:
        with locking.held(runs_root / STORES_LOCK, f"runs root {runs_root}"):
            _refuse_running(runs_root)  # also a search that holds only its folder's lock
            found = survey(runs_root)
            if not dry_run:
                for g in found.garbage:
                    _remove(g.path)
            return found
    except locking.Busy:
        _refuse_running(runs_root)
        raise UserError(f"runs root {runs_root} is in use by a running wsss-tune command "
                        f"(trial, surface, export-labels, or a search starting): run gc when "
                        f"it has ended") from None


def _refuse_running(runs_root: Path) -> None:
    """A `UserError` naming the searches running in ``runs_root``, if any."""
    running = [f"{d} ({who})" for d in sorted(runs_root.iterdir())
               if (who := locking.holder(d / LOCK_FILE))]
    if running:
        raise UserError(f"runs root {runs_root} is in use by the search in "
                        f"{', '.join(running)}: run gc when it has ended")


def _remove(path: Path) -> None:
    if path.parent.name == "stores" and not path.name.startswith("."):
        remove_store(path)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
