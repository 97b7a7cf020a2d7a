"""CAM extraction (multi-scale + flip, as IRN's ``make_cam``) and CAM -> score normalisation.

Stored CAMs are raw ReLU'd activations of the present classes on a strided grid
(``ceil(H / store_stride) x ceil(W / store_stride)``), summed over scales and flips; scores are
made from them on demand (docs/definitions.md): upsampled bilinearly to the image size, then each
class divided by its own maximum. Normalising after upsampling keeps every class's peak at
exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from wsss.classifier import CamClassifier, normalise_images
from wsss.data import SegDataset
from wsss.spec import Spec


class CamSpec(Spec):
    """The ``cam`` config section."""

    scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0], min_length=1)
    flip: bool = True
    store_stride: int = Field(4, ge=1, description="CAMs are stored at ceil(size / stride)")
    batch_size: int = Field(16, ge=1)

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every scale must be > 0")
        return v


def strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The CAM grid of an image: ``ceil(size / stride)`` (IRN's ``get_strided_size``)."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


@torch.no_grad()
def multiscale_cams(model: CamClassifier, images: torch.Tensor, spec: CamSpec) -> torch.Tensor:
    """Raw CAMs ``[B, num_foreground, h, w]`` for a batch of same-size uint8 images.

    Each scale's ReLU'd CAM (plus its flipped twin, flipped back) is resized to the strided grid
    and summed, exactly as IRN sums its ``strided_cam`` over scales.
    """
    x = normalise_images(images)
    out_size = strided_size(tuple(x.shape[-2:]), spec.store_stride)
    total = None
    for scale in spec.scales:
        xs = x if scale == 1.0 else F.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False,
            recompute_scale_factor=False)
        cam = model.cam(xs)
        if spec.flip:
            cam = cam + model.cam(xs.flip(-1)).flip(-1)
        cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)
        total = cam if total is None else total + cam
    return total


def extract_cams(model: CamClassifier, data: SegDataset, spec: CamSpec,
                 device: torch.device) -> Iterator[np.ndarray]:
    """Yield each image's CAMs of its present classes, float16 ``[K, h, w]``, in dataset order.

    Consecutive images of the same size are batched (all of them, for a synthetic dataset).
    """
    model.eval()
    i = 0
    while i < len(data):
        size = data.size(i)
        j = i
        while j < len(data) and j - i < spec.batch_size and data.size(j) == size:
            j += 1
        images = torch.from_numpy(np.stack([data.image(k) for k in range(i, j)])).to(device)
        cams = multiscale_cams(model, images, spec).float().cpu().numpy()
        for k in range(i, j):
            present = data.labels(k) - 1
            yield cams[k - i][present].astype(np.float16)
        i = j
