"""Training augmentation shared by the classifier and DeepLabv3+, IRN-like, on transforms v2.

An optional random rescale (the classifier's ``scale_range``), a random horizontal flip, then a
random crop to ``crop_size`` after padding what is smaller. An image and its label map go through
together as ``tv_tensors.Image`` and ``tv_tensors.Mask``, so one flip and one crop apply to both.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from wsss.data import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Padding: images get the mean colour (~0 after normalisation: "no signal"), label maps 255.
_FILL = {tv_tensors.Image: tuple(round(255 * m) for m in IMAGENET_MEAN), tv_tensors.Mask: IGNORE}


class RandomRescale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``: v2's ScaleJitter and RandomResize
    aim at fixed pixel sizes, not at a factor of each image's own size."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = float(torch.empty(()).uniform_(*self.scale_range))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.resize(inpt, params["size"])  # bilinear images, nearest masks


@lru_cache(maxsize=8)
def _pipeline(crop_size: int | None, hflip: bool,
              scale_range: tuple[float, float]) -> v2.Compose:
    steps: list[v2.Transform] = []
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomRescale(scale_range))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if crop_size is not None:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=_FILL))
    return v2.Compose(steps or [v2.Identity()])


def augment(image: torch.Tensor, mask: torch.Tensor | None = None, *, crop_size: int | None,
            hflip: bool, scale_range: tuple[float, float] = (1.0, 1.0),
            generator: torch.Generator | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A uint8 ``HxWx3`` image and optionally its uint8 ``HxW`` label map, transformed together,
    in the same layouts (``mask`` None stays None). The draws come from ``generator``, which
    advances as if drawn from directly, or else from torch's global random state."""
    pipeline = _pipeline(crop_size, hflip, tuple(scale_range))
    inputs = [tv_tensors.Image(image.permute(2, 0, 1))]
    if mask is not None:
        inputs.append(tv_tensors.Mask(mask))
    if generator is None:
        outputs = pipeline(inputs)
    else:
        with torch.random.fork_rng(devices=[]):  # v2 draws from the global state only
            torch.set_rng_state(generator.get_state())
            outputs = pipeline(inputs)
            generator.set_state(torch.get_rng_state())
    image, *rest = (out.as_subclass(torch.Tensor) for out in outputs)
    return image.permute(1, 2, 0), (rest[0] if rest else None)
