"""``irn``: IRN's class-boundary branch (the PuzzleCAM and paper implementation, the default).

An edge head turns the frozen multi-level features into a boundary map; the affinity of a pair
is ``1 - max(boundary)`` along the path between them (`wsss.random_walk.half_plane_affinity`), and
the walk starts from ``cams * (1 - boundary)``, as IRN's ``propagate_to_edge``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.random_walk import half_plane_affinity
from wsss.refine.affinity import AffinityRefiner, AffinityTraining
from wsss.refine.base import register_refiner


class IrnSpec(AffinityTraining):
    """The ``refine.irn`` config section."""

    hidden: int = Field(32, ge=1, description="channels per level in the edge head")
    steps: int = Field(256, ge=0, description="random-walk steps (IRN: 2**8)")

    @property
    def walk_steps(self) -> int:
        return self.steps


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


@register_refiner("irn")
class IrnRefiner(AffinityRefiner):
    """The edge head's boundary map, as probabilities ``[B, h, w]``, is what the walk reads."""

    spec: IrnSpec

    def build_head(self, channels: Sequence[int]) -> nn.Module:
        return EdgeHead(channels, self.spec.hidden)

    def _out(self, batch: Sequence[int]) -> torch.Tensor:
        return torch.sigmoid(super()._out(batch))

    def affinity(self, out: torch.Tensor, radius: int) -> torch.Tensor:
        return half_plane_affinity(out, radius)

    def start(self, cams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return cams * (1 - out.unsqueeze(1))
