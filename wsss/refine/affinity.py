"""Refiners that learn pairwise affinities from the confident regions, then random-walk the CAMs.

The labels are IRN's and PSA's scheme: from confident regions on the CAM grid, a pixel pair within
``label_radius`` is a background positive (both background), a foreground positive (both the same
class), a negative (different labels), or ignored (either end neutral, or outside the image).
Both methods train with the same balanced loss, ``(bg_pos / 2 + fg_pos / 2 + neg) / 2`` of
per-class-mean log losses (PSA writes it ``bg/4 + fg/4 + neg/2``), and walk with
`wsss.random_walk.walk`; they differ only in how a head turns frozen features into the half-plane
affinities (`AffinityRefiner.affinity`) and where the walk starts (`AffinityRefiner.start`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.random_walk import half_plane_offsets, walk
from wsss.refine.base import TrialImages
from wsss.regions import NEUTRAL, Array, as_tensor, crf_regions, host, like
from wsss.spec import Spec


class AffinityTraining(Spec):
    """What the trained affinity refiners (``irn``, ``psa``) share: their training on the
    affinity labels of the pair's confident regions, and the random walk on what they learn."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_radius: int = Field(10, ge=1, description="pairs within this radius are trained")
    walk_radius: int = Field(5, ge=1, description="the walk links pixels within this radius")
    beta: float = Field(10.0, gt=0, description="affinities are raised to beta before the walk")
    crf: bool = Field(False, description="dense CRF on the regions the affinities learn from "
                                         "(IRN/PuzzleCAM); needs the [crf] extra")

    @property
    @abstractmethod
    def walk_steps(self) -> int:
        """Random-walk steps (each method says how it counts them)."""


def downsample_regions(regions: Array, grid: tuple[int, int], stride: int) -> Array:
    """Image-resolution region labels -> the feature grid, by nearest sampling at cell centres.

    IRN rescales its label maps with nearest interpolation; sampling the centre pixel of each
    ``stride x stride`` cell does the same without an image library.
    """
    r = as_tensor(regions)
    h, w = grid
    ys = torch.clamp(torch.arange(h, device=r.device) * stride + stride // 2, max=r.shape[0] - 1)
    xs = torch.clamp(torch.arange(w, device=r.device) * stride + stride // 2, max=r.shape[1] - 1)
    return like(r[ys][:, xs], regions)


def affinity_labels(regions: Array, radius: int) -> tuple[Array, Array, Array]:
    """Boolean masks (bg positive, fg positive, negative) ``[..., n_offsets, h, w]`` per
    half-plane offset of `half_plane_offsets(radius)` for region maps ``[..., h, w]``: entry
    ``[k, y, x]`` is the pair ``(y, x)`` -> ``(y, x) + offset_k``. Pairs touching a neutral
    pixel or leaving the map are in none. Built where the regions are (on a GPU: there)."""
    r = as_tensor(regions)
    h, w = r.shape[-2:]
    flat = r.reshape(-1, 1, h, w)
    padded = F.pad(flat.float(), (radius,) * 4, value=NEUTRAL).to(r.dtype)[:, 0]
    src = flat
    dst = torch.stack([padded[:, radius + dy:radius + dy + h, radius + dx:radius + dx + w]
                       for dy, dx in half_plane_offsets(radius)], 1)
    valid = (src != NEUTRAL) & (dst != NEUTRAL)
    same = src == dst
    masks = (valid & same & (src == 0), valid & same & (src != 0), valid & ~same)
    shape = (*r.shape[:-2], dst.shape[1], h, w)
    return tuple(like(m.reshape(shape), regions) for m in masks)


def affinity_loss(aff: torch.Tensor, labels: Sequence[torch.Tensor],
                  eps: float = 1e-5) -> torch.Tensor:
    """The balanced affinity loss of half-plane affinities ``aff`` ``[B, n_offsets, h, w]`` in
    [0, 1], for the stacked ``[B, n_offsets, h, w]`` float masks from `affinity_labels`."""
    bg_pos, fg_pos, neg = labels
    pos_loss = -torch.log(aff + eps)
    neg_loss = -torch.log(1 + eps - aff)
    bg = (bg_pos * pos_loss).sum() / (bg_pos.sum() + eps)
    fg = (fg_pos * pos_loss).sum() / (fg_pos.sum() + eps)
    ng = (neg * neg_loss).sum() / (neg.sum() + eps)
    return (bg / 2 + fg / 2 + ng) / 2


class AffinityRefiner(ABC):
    """Training and walking shared by the affinity refiners; a subclass builds the head
    (`build_head`), reads affinities off its output (`affinity`) and says where the walk starts
    (`start`). Deterministic for a seed on CPU."""

    def __init__(self, images: TrialImages, spec: AffinityTraining) -> None:
        self.images, self.spec = images, spec
        self.epochs = spec.epochs
        torch.manual_seed(images.seed)
        self.head = self.build_head(images.channels).to(images.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=spec.lr,
                                           weight_decay=spec.weight_decay)
        self._label_cache: dict[int, torch.Tensor] = {}  # grid-sized uint8 maps: small

    @abstractmethod
    def build_head(self, channels: Sequence[int]) -> nn.Module:
        """The trainable head over the frozen feature levels (``channels`` each)."""

    @abstractmethod
    def affinity(self, out: torch.Tensor, radius: int) -> torch.Tensor:
        """Half-plane affinities ``[B, n_half, h, w]`` in [0, 1] from the head's output."""

    @abstractmethod
    def start(self, cams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The walk's starting scores ``[B, K, h, w]`` for the batch's CAMs."""

    def label_regions(self, k: int) -> torch.Tensor:
        """The regions the affinities learn from, on the CAM grid and the device: computed once
        per trial (they do not change between epochs), CRF-cleaned when the section's ``crf`` is
        on. The affinity labels are rebuilt from them per batch on the device, which costs less
        than caching them (``n_offsets`` x 3 masks per image, 447 at IRN's radius 10)."""
        if k not in self._label_cache:
            images = self.images
            if self.spec.crf:
                regions = torch.from_numpy(crf_regions(
                    images.image(k), host(images.scores(k)), images.keys(k), images.bg,
                    images.fg, where=f"refine.{self.name}.crf")).to(images.device)
            else:
                regions = images.initial_and_truth(k)[0]  # kept for evaluation too
            self._label_cache[k] = downsample_regions(regions, images.grid(k),
                                                      images.grid_stride(k))
        return self._label_cache[k]

    def _out(self, batch: Sequence[int]) -> torch.Tensor:
        return self.head(self.images.features(batch), self.images.grid(batch[0]))

    def train_epoch(self, epoch: int) -> float:
        self.head.train()
        images, spec = self.images, self.spec
        rng = np.random.default_rng([images.seed, epoch])
        batches = images.batches(rng.permutation(len(images)), spec.batch_size)
        total = torch.zeros((), device=images.device)  # summed there: no host sync per batch
        for b in rng.permutation(len(batches)).tolist():
            batch = batches[b]
            regions = torch.stack([self.label_regions(k) for k in batch])
            labels = [m.float() for m in affinity_labels(regions, spec.label_radius)]
            loss = affinity_loss(self.affinity(self._out(batch), spec.label_radius), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(batch)
        return float(total) / len(images)

    @torch.no_grad()
    def refine(self, batch: Sequence[int]) -> list[torch.Tensor]:
        """One head forward for the batch, then one walk per group of images with the same
        number of classes (padding fewer classes with zero channels would walk them too)."""
        self.head.eval()
        images, spec = self.images, self.spec
        cams = [images.cams(k) for k in batch]
        out = self._out(batch)
        half = self.affinity(out, spec.walk_radius)
        refined: list[torch.Tensor] = list(cams)  # images without a class stay as they are
        by_count: dict[int, list[int]] = {}
        for b, c in enumerate(cams):
            if len(c):
                by_count.setdefault(len(c), []).append(b)
        for group in by_count.values():
            idx = torch.tensor(group, device=images.device)
            walked = walk(self.start(torch.stack([cams[b] for b in group]), out[idx]),
                          half[idx], radius=spec.walk_radius, beta=spec.beta,
                          steps=spec.walk_steps)
            for b, r in zip(group, walked):
                refined[b] = r
        return refined

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
