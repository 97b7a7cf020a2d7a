"""AffinityNet (IRN's class-boundary branch) on cached frozen features, and its affinity labels.

IRN's scheme: from confident regions on the feature grid, a pixel pair within ``label_radius`` is
a background positive (both background), a foreground positive (both the same class), a negative
(different labels), or ignored (either end neutral, or outside the image). The edge head turns
frozen multi-level features into a boundary map; the affinity of a pair is ``1 - max(boundary)``
along the path between them (shared with the random walk, `wsss.random_walk`), trained with IRN's
balanced loss: ``(bg_pos / 2 + fg_pos / 2 + neg) / 2`` of per-class-mean log losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.random_walk import half_plane_affinity, half_plane_offsets
from wsss.regions import NEUTRAL
from wsss.spec import Spec


class AffinitySpec(Spec):
    """The ``affinity`` config section: the edge head, its training and the random walk."""

    backbone: str | None = Field(
        None, description="timm model for the frozen features; None = the trained classifier's "
                          "(required with imported CAMs)")
    backbone_weights: Path | None = Field(None, description="local weights file of `backbone`")
    output_stride: Literal[8, 16, 32] = 16
    levels: list[int] | None = Field(
        None, description="backbone feature levels used; None = all at the CAM stride or coarser")
    hidden: int = Field(32, ge=1, description="channels per level in the edge head")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_radius: int = Field(10, ge=1, description="IRN trains pairs within radius 10")
    walk_radius: int = Field(5, ge=1, description="IRN walks with radius 5")
    beta: float = Field(10.0, gt=0)
    steps: int = Field(256, ge=0, description="random-walk steps (IRN: 2**8)")
    subset: int | None = Field(None, ge=1, description="trials use the first N train images")
    crf: bool = Field(False, description="dense CRF on the regions AffinityNet learns from "
                                         "(IRN/PuzzleCAM); needs the [crf] extra")
    seed: int = 0


def downsample_regions(regions: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """Image-resolution region labels -> the feature grid, by nearest sampling at cell centres.

    IRN rescales its label maps with nearest interpolation; sampling the centre pixel of each
    ``stride x stride`` cell does the same without an image library.
    """
    h, w = grid
    ys = np.minimum(np.arange(h) * stride + stride // 2, regions.shape[0] - 1)
    xs = np.minimum(np.arange(w) * stride + stride // 2, regions.shape[1] - 1)
    return regions[np.ix_(ys, xs)]


def affinity_labels(regions: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean ``[n_offsets, h, w]`` masks (bg positive, fg positive, negative) per half-plane
    offset of `half_plane_offsets(radius)`: entry ``[k, y, x]`` is the pair ``(y, x)`` ->
    ``(y, x) + offset_k``. Pairs touching a neutral pixel or leaving the map are in none."""
    h, w = regions.shape
    padded = np.pad(regions, radius, constant_values=NEUTRAL)
    src = regions[None]
    dst = np.stack([padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
                    for dy, dx in half_plane_offsets(radius)])
    valid = (src != NEUTRAL) & (dst != NEUTRAL)
    same = src == dst
    return valid & same & (src == 0), valid & same & (src != 0), valid & ~same


class EdgeHead(nn.Module):
    """IRN's boundary branch: per level 1x1 conv + GroupNorm + ReLU, upsample, fuse, 1 logit."""

    def __init__(self, in_channels: Sequence[int], hidden: int = 32):
        super().__init__()
        groups = 4 if hidden % 4 == 0 else 1
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.GroupNorm(groups, hidden),
                          nn.ReLU(inplace=True))
            for c in in_channels)
        self.fuse = nn.Conv2d(hidden * len(in_channels), 1, 1, bias=True)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Boundary logits ``[B, h, w]`` on the ``size`` grid (the CAM grid)."""
        maps = []
        for branch, f in zip(self.branches, features, strict=True):
            m = branch(f)
            if tuple(m.shape[-2:]) != tuple(size):
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return self.fuse(torch.cat(maps, 1))[:, 0]


def affinity_loss(edge: torch.Tensor, labels: Sequence[torch.Tensor], radius: int,
                  eps: float = 1e-5) -> torch.Tensor:
    """IRN's balanced affinity loss for boundary maps ``edge`` ``[B, h, w]`` in [0, 1].

    ``labels`` are the stacked ``[B, n_offsets, h, w]`` float masks from `affinity_labels`.
    """
    aff = half_plane_affinity(edge, radius)
    bg_pos, fg_pos, neg = labels
    pos_loss = -torch.log(aff + eps)
    neg_loss = -torch.log(1 + eps - aff)
    bg = (bg_pos * pos_loss).sum() / (bg_pos.sum() + eps)
    fg = (fg_pos * pos_loss).sum() / (fg_pos.sum() + eps)
    ng = (neg * neg_loss).sum() / (neg.sum() + eps)
    return (bg / 2 + fg / 2 + ng) / 2
