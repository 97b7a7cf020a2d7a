"""Multi-label image classifier on any timm backbone, the source of our CAMs.

As in IRN/PSA: backbone features -> global average pooling -> a bias-free 1x1 conv classifier,
trained with multi-label BCE. The same 1x1 conv applied before pooling gives the CAMs, so a CAM is
exactly the evidence the classifier used. Backbones come from ``timm.create_model`` with
``pretrained=False`` unless the user gives a local weights file (nothing is ever downloaded), and
with a small ``output_stride`` so that CAMs of small images are not 2x2 maps.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from sklearn.metrics import average_precision_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsss.augment import IMAGENET_MEAN, IMAGENET_STD, augment
from wsss.data import SegDataset
from wsss.errors import UserError
from wsss.files import atomic_write_bytes
from wsss.spec import Spec


def create_backbone(model: str, output_stride: int, weights: Path | None = None, *,
                    keys: tuple[str, str] = ("classifier.model", "classifier.weights")
                    ) -> nn.Module:
    """A timm feature extractor (all levels); weights only from a local file. ``keys`` are the
    caller's config keys of the model and the weights, named in errors."""
    kwargs: dict = {"features_only": True, "output_stride": output_stride}
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"{keys[1]}: file {weights} not found")
    try:
        built = timm.create_model(model, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model" / unsupported output_stride
        raise UserError(f"{keys[0]} {model!r}: {e}") from None
    except (TypeError, AssertionError) as e:
        raise UserError(f"{keys[0]} {model!r} does not support output_stride="
                        f"{output_stride} as a feature extractor: {e}") from None
    if weights is None:
        return built
    try:  # the model is known now: whatever fails here is the file's fault
        return timm.create_model(model, **kwargs, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(weights)})
    except Exception as e:  # torch.load and timm raise many kinds for a file of other weights
        raise UserError(f"{keys[1]} {weights}: not weights of {keys[0]} {model!r} "
                        f"({type(e).__name__}: {str(e)[:200]})") from None


class CamClassifier(nn.Module):
    """Backbone + GAP + bias-free 1x1 classifier; ``cam`` applies the classifier before pooling."""

    def __init__(self, backbone: nn.Module, num_foreground: int):
        super().__init__()
        self.backbone = backbone
        channels = backbone.feature_info.channels()[-1]
        self.classifier = nn.Conv2d(channels, num_foreground, kernel_size=1, bias=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All feature levels (AffinityNet reuses them, frozen)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(x)[-1].mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU'd class activation maps ``[B, num_foreground, h, w]`` at the output stride."""
        return F.relu(self.classifier(self.backbone(x)[-1]))


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` with ImageNet statistics."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClassifierSpec(Spec):
    """The ``classifier`` config section: backbone and training hyper-parameters."""

    model: str = "test_byobnet"
    output_stride: Literal[8, 16, 32] = 8
    weights: Path | None = Field(None, description="local timm weights file; never downloaded")
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    crop_size: int | None = Field(None, ge=16, description="random crop; None = whole images")
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected 0 < min <= max")
        return v

    def backbone(self) -> nn.Module:
        return create_backbone(self.model, self.output_stride, self.weights)


class _ClassificationSet(Dataset):
    """Images and multi-hot labels with IRN-like augmentation (rescale, flip, pad + crop)."""

    def __init__(self, data: SegDataset, spec: ClassifierSpec | None, labels: np.ndarray):
        self.data, self.spec, self.labels = data, spec, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(self.data.image(i))
        if self.spec is not None:  # global random state: train_classifier's seed (per worker)
            img, _ = augment(img, crop_size=self.spec.crop_size, hflip=self.spec.hflip,
                             scale_range=self.spec.scale_range)
        return img, torch.from_numpy(self.labels[i])


def _loader(data: SegDataset, spec: ClassifierSpec, labels: np.ndarray, train: bool) -> DataLoader:
    if spec.crop_size is None and len({data.size(i) for i in range(len(data))}) > 1:
        raise UserError("images differ in size: set classifier.crop_size to train in batches")
    g = torch.Generator().manual_seed(spec.seed)
    return DataLoader(_ClassificationSet(data, spec if train else None, labels),
                      batch_size=spec.batch_size, shuffle=train, generator=g,
                      num_workers=spec.num_workers, drop_last=False)


def train_classifier(model: CamClassifier, train: SegDataset, spec: ClassifierSpec,
                     device: torch.device,
                     progress: Callable[[int, float], None] | None = None) -> CamClassifier:
    """Train with multi-label BCE, AdamW and a cosine schedule; deterministic for a seed on CPU."""
    torch.manual_seed(spec.seed)
    model.to(device).train()
    loader = _loader(train, spec, train.label_matrix(), train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, pct_start=0.15,
                                                total_steps=spec.epochs * len(loader))
    for epoch in range(spec.epochs):
        total = 0.0
        for images, targets in loader:
            logits = model(normalise_images(images.to(device)))
            loss = F.binary_cross_entropy_with_logits(logits, targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(images)
        if progress is not None:
            progress(epoch, total / len(train))
    return model.eval()


@torch.no_grad()
def mean_average_precision(model: CamClassifier, data: SegDataset, device: torch.device,
                           batch_size: int = 64) -> float:
    """Macro mAP over the classes present in ``data`` (sklearn's average precision)."""
    model.eval()
    labels = data.label_matrix()
    same_size = len({data.size(i) for i in range(len(data))}) == 1
    spec = ClassifierSpec(batch_size=batch_size if same_size else 1)
    scores = [torch.sigmoid(model(normalise_images(x.to(device)))).cpu()
              for x, _ in _loader(data, spec, labels, train=False)]
    probs = torch.cat(scores).numpy()
    present = labels.sum(axis=0) > 0
    return float(average_precision_score(labels[:, present], probs[:, present], average="macro"))


def save_classifier(model: CamClassifier, path: Path, meta: dict) -> None:
    """Atomically save weights plus what is needed to rebuild the model."""
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_classifier(path: Path, device: torch.device) -> tuple[CamClassifier, dict]:
    """Rebuild a saved classifier (no download: the backbone is created without weights)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    meta = ckpt["meta"]
    model = CamClassifier(create_backbone(meta["model"], meta["output_stride"]),
                          meta["num_foreground"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), meta
