"""What a refiner sees of a trial (`TrialImages`), what it must do (`Refiner`), and the registry.

A refiner turns a trial's confident regions and CAMs into refined class scores, optionally
training for some epochs first; the generic trial (`wsss.trial.Trial`) scores every refiner the
same way. Adding a method is one module that defines a spec and a class and calls
`register_refiner`, as timm registers models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from wsss.regions import check_pair, confident_regions
from wsss.stage0 import Prepared, grid_stride

EVAL_CACHE_BYTES = 256 * 2**20  # a VOC trial subset of 1000 images needs ~375 MB


class TrialImages:
    """A trial's images (``prepared.trial_ids``) and what a refiner may read of each, by
    position k: CAMs on their grid, confident regions of the pair, frozen features, the image."""

    def __init__(self, prepared: Prepared, bg: float, fg: float, device: torch.device,
                 seed: int = 0) -> None:
        self.bg, self.fg = check_pair(bg, fg)
        self.prepared, self.device, self.seed = prepared, device, seed
        self.ids: list[str] = list(prepared.trial_ids)
        self.index = [prepared.cams.position(i) for i in self.ids]  # trial image -> CAM store
        position = {image_id: i for i, image_id in enumerate(prepared.train.ids)}
        self.train_index = [position[i] for i in self.ids]  # O(n), not ids.index per image
        self._eval_cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._eval_bytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def channels(self) -> list[int]:
        """Channels of each frozen feature level (stage 0 stored them for trainable refiners)."""
        return list(self.prepared.features.manifest["channels"])

    def grid(self, k: int) -> tuple[int, int]:
        """Image k's CAM grid (h, w)."""
        return tuple(self.prepared.cams.shapes[self.index[k]][1:])

    def grid_stride(self, k: int) -> int:
        return grid_stride(self.prepared.cams, self.index[k])

    def keys(self, k: int) -> np.ndarray:
        return self.prepared.cams.keys(self.index[k])

    def image_size(self, k: int) -> tuple[int, int]:
        return self.prepared.cams.image_size(self.index[k])

    def cams(self, k: int) -> np.ndarray:
        """Image k's stored CAMs ``[K, h, w]`` as float32."""
        return np.asarray(self.prepared.cams[self.index[k]], dtype=np.float32)

    def scores(self, k: int) -> np.ndarray:
        """Image k's CAM scores ``[K, H, W]`` at image size (docs/definitions.md)."""
        return self.prepared.cams.scores(self.index[k])

    def image(self, k: int) -> np.ndarray:
        return self.prepared.train.image(self.train_index[k])

    def batches(self, order: Sequence[int], batch_size: int) -> list[list[int]]:
        """Batches of trial images that share a grid size (all of them on synthetic data)."""
        by_grid: dict[tuple[int, int], list[int]] = {}
        for k in order:
            by_grid.setdefault(self.grid(int(k)), []).append(int(k))
        return [g[i:i + batch_size] for g in by_grid.values()
                for i in range(0, len(g), batch_size)]

    def features(self, batch: Sequence[int]) -> list[torch.Tensor]:
        """The batch's frozen feature levels, each ``[B, C, h, w]`` float32 on the device."""
        levels = [self.prepared.features.features(k) for k in batch]
        return [torch.from_numpy(np.stack([lv[j] for lv in levels])).float().to(self.device)
                for j in range(len(levels[0]))]

    def initial(self, k: int) -> np.ndarray:
        """Image k's confident regions of the trial's pair, at image size."""
        return confident_regions(self.scores(k), self.keys(k), self.bg, self.fg)

    def initial_and_truth(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image k's initial regions and ground truth (None without masks) at image size. Both
        are the same every epoch, so they are kept (up to `EVAL_CACHE_BYTES` per trial; beyond
        it recomputed): decoding masks and thresholding CAMs took ~20% of a demo epoch."""
        if k in self._eval_cache:
            return self._eval_cache[k]
        train = self.prepared.train
        found = self.initial(k), train.mask(self.train_index[k]) if train.has_masks else None
        size = sum(a.nbytes for a in found if a is not None)
        if self._eval_bytes + size <= EVAL_CACHE_BYTES:
            self._eval_cache[k] = found
            self._eval_bytes += size
        return found


class Refiner(Protocol):
    """A refinement method bound to one trial's images."""

    epochs: int  # training epochs; 0 = the method does not train

    def train_epoch(self, epoch: int) -> float:
        """One training pass (epoch counts from 0); returns the mean loss."""

    def refine(self, batch: Sequence[int]) -> list[torch.Tensor]:
        """Refined class scores ``[K, h, w]`` (any resolution) for each trial image of
        ``batch``, in the order of ``keys(k)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


REFINERS: dict[str, Callable[[TrialImages, Any], Refiner]] = {}


def register_refiner(name: str) -> Callable:
    """Class decorator: make a refiner available as ``refine.method: <name>``."""
    def add(cls: Callable[[TrialImages, Any], Refiner]) -> Callable:
        if name in REFINERS:
            raise ValueError(f"refiner {name!r} is already registered")
        REFINERS[name] = cls
        cls.name = name  # its config section: refine.<name>
        return cls
    return add
