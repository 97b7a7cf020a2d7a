"""``crf``: a dense CRF of the CAMs, the pair's confident regions as unary evidence; no training.

The unary of a pixel is a distribution over background and the image's classes: its CAM scores
(background ``1 - max``) where it is neutral, and ``gt_prob`` on its label where it is confident,
so the CRF keeps confident pixels (mostly) and decides the neutral band by colour and position.
The pairwise terms and their defaults are PSA's ``crf_inference`` (Gaussian ``sxy`` 3, compat 3;
bilateral ``sxy`` 80, ``srgb`` 13, compat 10). The refined scores are the CRF's marginals of the
classes, thresholded with the pair like any refiner's. Needs the ``[crf]`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from wsss.refine.base import TrialImages, register_refiner
from wsss.regions import NEUTRAL, dense_crf, host
from wsss.spec import Spec


class CrfSpec(Spec):
    """The ``refine.crf`` config section."""

    iterations: int = Field(10, ge=1, description="mean-field iterations")
    gt_prob: float = Field(0.7, gt=0, lt=1, description="unary probability of a confident "
                                                        "pixel's label")
    gaussian_sxy: float = Field(3.0, gt=0)
    gaussian_compat: float = Field(3.0, ge=0)
    bilateral_sxy: float = Field(80.0, gt=0)
    bilateral_srgb: float = Field(13.0, gt=0)
    bilateral_compat: float = Field(10.0, ge=0)


def crf_unary(scores: np.ndarray, keys: np.ndarray, regions: np.ndarray,
              gt_prob: float) -> np.ndarray:
    """``[1 + K, H, W]`` probabilities (background first): CAM scores on neutral pixels, a
    ``gt_prob`` vote for the label of confident ones; normalised per pixel."""
    k = len(keys)
    probs = np.empty((k + 1, *scores.shape[1:]), np.float32)
    probs[0] = 1 - scores.max(0)
    probs[1:] = scores
    channel = np.zeros(256, np.int64)  # region label -> channel: 0 background, keys -> 1..K
    channel[np.asarray(keys, dtype=np.int64)] = np.arange(1, k + 1)
    ys, xs = np.nonzero(regions != NEUTRAL)
    probs[:, ys, xs] = (1 - gt_prob) / k
    probs[channel[regions[ys, xs]], ys, xs] = gt_prob
    probs = np.maximum(probs, 1e-5)
    return probs / probs.sum(0, keepdims=True)


@register_refiner("crf")
class CrfRefiner:
    epochs = 0

    def __init__(self, images: TrialImages, spec: CrfSpec) -> None:
        self.images, self.spec = images, spec
        self.dcrf = dense_crf("refine.method crf")  # fails at construction, before any work

    def train_epoch(self, epoch: int) -> float:
        raise RuntimeError("the crf refiner does not train")

    def refine(self, batch: Sequence[int]) -> list[torch.Tensor]:
        from pydensecrf.utils import unary_from_softmax

        images, spec, out = self.images, self.spec, []
        for k in batch:
            scores, keys = images.scores(k), images.keys(k)
            if len(keys) == 0:
                out.append(scores)
                continue
            probs = crf_unary(host(scores), keys, host(images.initial_and_truth(k)[0]),
                              spec.gt_prob)
            n, h, w = probs.shape
            crf = self.dcrf.DenseCRF2D(w, h, n)
            crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
            crf.addPairwiseGaussian(sxy=spec.gaussian_sxy, compat=spec.gaussian_compat)
            crf.addPairwiseBilateral(sxy=spec.bilateral_sxy, srgb=spec.bilateral_srgb,
                                     rgbim=np.ascontiguousarray(images.image(k), np.uint8),
                                     compat=spec.bilateral_compat)
            marginals = np.array(crf.inference(spec.iterations), np.float32).reshape(n, h, w)
            out.append(torch.from_numpy(marginals[1:]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
