"""Memory-mapped stores shared by every trial: many float16 arrays of different shapes in one file.

A store is a folder: ``data.npy`` (one flat float16 array), ``index.json`` (per item: id, shape,
offset and free-form metadata) and ``manifest.json`` (what produced it: config hash, dataset
fingerprint, ...). It is written into a temporary sibling folder and renamed into place, so a
reader never sees a half-written store, and reopened read-only (``np.load(mmap_mode="r")``) by
any process without copying: Ray trials share the page cache instead of the object store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsss.errors import UserError
from wsss.files import write_json_atomic
from wsss.regions import cam_scores

STORE_VERSION = 1
log = logging.getLogger("wsss")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: keep its folder
    return True


def orphans(folder: Path) -> list[Path]:
    """The half-written (``.<name>.tmp-<pid>``) and replaced (``.<name>.old-<pid>``) store
    folders whose writer is dead: what a stage 0 killed mid-write leaves behind. Writers run on
    the search driver's machine, so the pid check is local."""
    found = []
    for d in sorted(folder.glob(".*-*")):
        kind, _, pid = d.name.rpartition("-")
        ours = kind.endswith((".tmp", ".old")) and pid.isdigit()
        if ours and d.is_dir() and not _alive(int(pid)):
            found.append(d)
    return found


def _aside(path: Path) -> Path:
    """Where a store goes while it is deleted: a name `orphans` recognises once we are dead."""
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def remove_store(path: Path) -> None:
    """Delete a store; renamed aside first, so that a removal killed midway leaves no damaged
    store under the name a search would open (`orphans` finds the rest)."""
    moved = _aside(path)
    os.replace(path, moved)
    shutil.rmtree(moved)


def remove_orphans(folder: Path) -> list[Path]:
    """Remove `orphans` (the next store written beside them cleans up after a killed one)."""
    removed = orphans(folder)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


class RaggedStore:
    """Read-only view of a store: ``store[i]`` is item i's float16 array (a memmap view)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
            index = json.loads((self.path / "index.json").read_text())
            self._data = np.load(self.path / "data.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"store {self.path} is missing or damaged ({e}); delete the folder "
                            "to rebuild it") from None
        self.ids: list[str] = index["ids"]
        self.shapes: list[tuple[int, ...]] = [tuple(s) for s in index["shapes"]]
        self.offsets: list[int] = index["offsets"]
        self.meta: dict[str, list[Any]] = index["meta"]
        self._pos = {k: i for i, k in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        n = int(np.prod(self.shapes[i]))
        return self._data[self.offsets[i]:self.offsets[i] + n].reshape(self.shapes[i])

    def position(self, image_id: str) -> int:
        return self._pos[image_id]

    @staticmethod
    def is_current(path: str | Path, manifest: dict[str, Any]) -> bool:
        """True when a complete store exists at ``path`` with exactly this manifest."""
        try:
            found = json.loads((Path(path) / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        return found == {**manifest, "version": STORE_VERSION}

    @classmethod
    def write(cls, path: str | Path, ids: Sequence[str], shapes: Sequence[tuple[int, ...]],
              arrays: Iterable[np.ndarray], manifest: dict[str, Any],
              meta: dict[str, list[Any]] | None = None) -> RaggedStore:
        """Fill a new store from ``arrays`` (in ``ids`` order, each of its declared shape)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for orphan in remove_orphans(path.parent):
            log.info("removed %s, left by a store writer that died", orphan)
        sizes = [int(np.prod(s)) for s in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        data = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.float16,
                                         shape=(max(offsets[-1], 1),))
        count = 0
        for i, arr in enumerate(arrays):
            if tuple(arr.shape) != tuple(shapes[i]):
                raise ValueError(f"item {ids[i]}: shape {arr.shape}, declared {shapes[i]}")
            data[offsets[i]:offsets[i + 1]] = np.asarray(arr, dtype=np.float16).ravel()
            count += 1
        if count != len(ids):
            raise ValueError(f"store got {count} arrays for {len(ids)} ids")
        data.flush()
        del data
        index = {"ids": list(ids), "shapes": [list(s) for s in shapes], "offsets": offsets[:-1],
                 "meta": meta or {}}
        write_json_atomic(tmp / "index.json", index)
        write_json_atomic(tmp / "manifest.json", {**manifest, "version": STORE_VERSION})
        old = _aside(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return cls(path)


class CamStore(RaggedStore):
    """CAMs of one split: per image its present class ids (1-based) and its image size."""

    def keys(self, i: int) -> np.ndarray:
        return np.asarray(self.meta["keys"][i], dtype=np.int64)

    def image_size(self, i: int) -> tuple[int, int]:
        h, w = self.meta["image_size"][i]
        return int(h), int(w)

    def scores(self, i: int) -> np.ndarray:
        """Normalised float32 scores ``[K, H, W]`` at image resolution (docs/definitions.md)."""
        return cam_scores(self[i], self.image_size(i))


class FeatureStore(RaggedStore):
    """Frozen-backbone features of a set of images: all levels of an image in one flat item.

    AffinityNet's backbone is frozen (IRN detaches it), so the features are computed once in
    ``prepare`` and every trial trains only the small edge head on them.
    """

    def features(self, i: int) -> list[np.ndarray]:
        """Image i's feature levels, each float16 ``[C_l, h_l, w_l]`` (memmap views)."""
        flat = self[i]
        out, start = [], 0
        for shape in self.meta["level_shapes"][i]:
            n = int(np.prod(shape))
            out.append(flat[start:start + n].reshape(shape))
            start += n
        return out

    def features_batch(self, idx: Sequence[int]) -> list[list[np.ndarray]]:
        """`features` of several images (what `LiveFeatures` computes in one forward)."""
        return [self.features(i) for i in idx]

    @classmethod
    def write_levels(cls, path: str | Path, ids: Sequence[str],
                     level_shapes: Sequence[Sequence[tuple[int, ...]]],
                     items: Iterable[Sequence[np.ndarray]],
                     manifest: dict[str, Any]) -> FeatureStore:
        """Fill a store from per-image lists of level arrays (in ``ids`` order)."""
        flat = (np.concatenate([np.asarray(a, np.float16).ravel() for a in levels])
                for levels in items)
        sizes = [(sum(int(np.prod(s)) for s in shapes),) for shapes in level_shapes]
        return cls.write(path, ids, sizes, flat, manifest,
                         meta={"level_shapes": [[list(s) for s in shapes]
                                                for shapes in level_shapes]})
