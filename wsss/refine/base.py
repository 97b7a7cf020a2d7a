"""What a refiner sees of a trial (`TrialImages`), what it must do (`Refiner`), and the registry.

A refiner turns a trial's confident regions and CAMs into refined class scores, optionally
training for some epochs first; the generic trial (`wsss.trial.Trial`) scores every refiner the
same way. Adding a method is one module that defines a spec and a class and calls
`register_refiner`, as timm registers models.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from wsss.regions import cam_scores, check_pair, confident_regions
from wsss.stage0 import Prepared, grid_stride

EVAL_CACHE_BYTES = 256 * 2**20  # a VOC trial subset of 1000 images needs ~375 MB


class TrialImages:
    """A trial's images (``prepared.trial_ids``) and what a refiner may read of each, by
    position k: CAMs on their grid, confident regions of the pair, frozen features, the image.

    Everything per pixel lives on the trial's device (CAM scores, regions, ground truth), so a
    GPU trial's loop never waits on the host; what does not change between epochs (initial
    regions, ground truth, and on a GPU the frozen features while they fit) is kept there,
    bounded in bytes.
    """

    def __init__(self, prepared: Prepared, bg: float, fg: float, device: torch.device,
                 seed: int = 0) -> None:
        self.bg, self.fg = check_pair(bg, fg)
        self.prepared, self.device, self.seed = prepared, device, seed
        self.ids: list[str] = list(prepared.trial_ids)
        self.index = [prepared.cams.position(i) for i in self.ids]  # trial image -> CAM store
        position = {image_id: i for i, image_id in enumerate(prepared.train.ids)}
        self.train_index = [position[i] for i in self.ids]  # O(n), not ids.index per image
        self._eval = ByteBoundCache(EVAL_CACHE_BYTES)
        on_gpu = device.type == "cuda"
        self._features = ByteBoundCache(feature_budget(device) if on_gpu else 0)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def resident_features(self) -> list[int]:
        """Trial images whose frozen features are kept on the device."""
        return list(self._features.items)

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

    def cams(self, k: int) -> torch.Tensor:
        """Image k's stored CAMs ``[K, h, w]``, float32 on the device."""
        return torch.from_numpy(np.asarray(self.prepared.cams[self.index[k]], np.float32)).to(
            self.device)

    def scores(self, k: int) -> torch.Tensor:
        """Image k's CAM scores ``[K, H, W]`` at image size (docs/definitions.md), on the
        device: upsampled there from the stored grid."""
        return cam_scores(self.cams(k), self.image_size(k))

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
        """The batch's frozen feature levels, each ``[B, C, h, w]`` float32 on the device. On a
        GPU each image's (float16) levels are kept there while they fit; the rest are copied
        from pinned memory. Missing ones are read (or computed) in one call for the batch."""
        found = {k: self._features.get(k) for k in batch}
        missing = [k for k in batch if found[k] is None]
        if missing:
            for k, arrays in zip(missing, self.prepared.features.features_batch(missing)):
                found[k] = self._to_device(arrays)
                self._features.put(k, found[k])
        levels = [found[k] for k in batch]
        return [torch.stack([lv[j] for lv in levels]).float() for j in range(len(levels[0]))]

    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)).pin_memory()
                    .to(self.device, non_blocking=True) for a in arrays]
        with warnings.catch_warnings():  # read-only memory maps: nothing writes to them (the
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return [torch.from_numpy(np.asarray(a)) for a in arrays]  # batch is a stacked copy

    def initial(self, k: int) -> torch.Tensor:
        """Image k's confident regions of the trial's pair, uint8 at image size, on the device."""
        return confident_regions(self.scores(k), self.keys(k), self.bg, self.fg)

    def initial_and_truth(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image k's initial regions and ground truth (None without masks) at image size, on the
        device. Both are the same every epoch, so they are kept (up to `EVAL_CACHE_BYTES` per
        trial; beyond it recomputed): decoding masks and thresholding CAMs took ~20% of a demo
        epoch."""
        found = self._eval.get(k)
        if found is None:
            train = self.prepared.train
            gt = (torch.from_numpy(train.mask(self.train_index[k])).to(self.device)
                  if train.has_masks else None)
            found = self.initial(k), gt
            self._eval.put(k, found)
        return found


def feature_budget(device: torch.device) -> int:
    """Bytes of a GPU a trial may fill with frozen features: a quarter of what is free when the
    trial starts, so concurrent trials sharing the GPU (``gpus_per_trial`` < 1) still fit."""
    free, _ = torch.cuda.mem_get_info(device)
    return free // 4


class ByteBoundCache:
    """A dict of tensors (or tuples / lists of them) that stops growing at ``budget`` bytes:
    what does not fit is recomputed when asked for again."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.items = budget, 0, {}

    def get(self, key: Any) -> Any:
        return self.items.get(key)

    def put(self, key: Any, value: Any) -> None:
        parts = value if isinstance(value, (tuple, list)) else (value,)
        size = sum(p.numel() * p.element_size() for p in parts if p is not None)
        if self.used + size <= self.budget:
            self.items[key] = value
            self.used += size


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
