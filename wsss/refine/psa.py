"""``psa``: Ahn & Kwak's original AffinityNet (CVPR 2018), on the cached frozen features.

An embedding head maps the features to one vector per CAM-grid pixel; the affinity of a pair is
``exp(-mean_c |f_i - f_j|)`` (PSA's mean absolute difference over channels), trained on the same
affinity labels and loss as ``irn``. PSA's walk raises the affinities to ``beta`` (8) and squares
the transition matrix ``logt`` (8) times, i.e. ``2**logt`` steps, starting from the CAMs as they
are (IRN's ``1 - boundary`` factor has no counterpart here).

Deviations from the reference code, each because our trial runs on the CAM grid (stride 4) where
PSA's network runs at stride 8: the head's widths are configurable and default smaller than PSA's
(64/128/256 per level, 448 fused), as the pairwise differences of a 448-channel map at stride 4
need tens of GB on VOC; and every in-image pair is used, where PSA's cropped index grid leaves out
pairs whose source lies within ``radius`` of the right, left or bottom border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss.random_walk import half_plane_offsets
from wsss.refine.affinity import AffinityRefiner, AffinityTraining
from wsss.refine.base import register_refiner


class PsaSpec(AffinityTraining):
    """The ``refine.psa`` config section (defaults: PSA's radius 5, beta 8, logt 8)."""

    label_radius: int = Field(5, ge=1, description="PSA trains pairs within radius 5")
    walk_radius: int = Field(5, ge=1, description="PSA walks with radius 5")
    beta: float = Field(8.0, gt=0)
    logt: int = Field(8, ge=0, description="the walk takes 2**logt steps")
    hidden: int = Field(32, ge=1, description="channels per feature level")
    dim: int = Field(64, ge=1, description="channels of the fused embedding")

    @property
    def walk_steps(self) -> int:
        return 2 ** self.logt


class EmbeddingHead(nn.Module):
    """PSA's affinity branch: per level 1x1 conv + ELU, upsample, concatenate, 1x1 conv + ELU."""

    def __init__(self, in_channels: Sequence[int], hidden: int, dim: int):
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv2d(c, hidden, 1, bias=False) for c in in_channels)
        self.fuse = nn.Conv2d(hidden * len(in_channels), dim, 1, bias=False)
        for conv in self.levels:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)  # PSA's initialisation

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Embeddings ``[B, dim, h, w]`` on the ``size`` grid (the CAM grid)."""
        maps = []
        for conv, f in zip(self.levels, features, strict=True):
            m = F.elu(conv(f))
            if tuple(m.shape[-2:]) != tuple(size):
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return F.elu(self.fuse(torch.cat(maps, 1)))


def feature_affinity(x: torch.Tensor, radius: int) -> torch.Tensor:
    """``[B, n_half, h, w]``: ``exp(-mean_c |x[p] - x[p + d]|)`` for each half-plane offset
    ``d`` of `half_plane_offsets(radius)`; 0 where ``p + d`` leaves the map."""
    r = radius - 1
    b, _, h, w = x.shape
    padded = F.pad(x, (r, r, 0, r))
    ys = torch.arange(h, device=x.device).view(h, 1)
    xs = torch.arange(w, device=x.device).view(1, w)
    maps = []
    for dy, dx in half_plane_offsets(radius):
        neighbour = padded[:, :, dy:dy + h, r + dx:r + dx + w]
        inside = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        maps.append(torch.exp(-(neighbour - x).abs().mean(1)) * inside)
    return torch.stack(maps, 1) if maps else x.new_zeros(b, 0, h, w)


@register_refiner("psa")
class PsaRefiner(AffinityRefiner):
    spec: PsaSpec

    def build_head(self, channels: Sequence[int]) -> nn.Module:
        return EmbeddingHead(channels, self.spec.hidden, self.spec.dim)

    def affinity(self, out: torch.Tensor, radius: int) -> torch.Tensor:
        return feature_affinity(out, radius)

    def start(self, cams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return cams
