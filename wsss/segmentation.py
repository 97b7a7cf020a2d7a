"""Stage 2 of the search: DeepLabv3+ trained on a pair's pseudo-labels, scored by val mIoU.

The model is segmentation-models-pytorch's DeepLabv3+ on a timm encoder (``tu-<name>``), always
built with ``encoder_weights=None`` so nothing is downloaded; a local timm weights file may then be
loaded into the encoder. Pseudo-labels mark unsure pixels 255 (docs/definitions.md): they, like
GT-ignore pixels, carry no loss, so a pair is judged only by the pixels it commits to.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from pydantic import Field

from wsss.augment import augment
from wsss.classifier import normalise_images
from wsss.data import IGNORE, SegDataset
from wsss.devices import resolve_device
from wsss.errors import UserError, first_line
from wsss.files import atomic_write_bytes
from wsss.metrics import confusion, mean_iou
from wsss.spec import Spec

Labels = Callable[[int], np.ndarray] | Sequence[np.ndarray]
OnEpoch = Callable[[int, dict[str, float], dict[str, Any]], None]


class SegmentationSpec(Spec):
    """The ``segmentation`` config section: DeepLabv3+ architecture and training."""

    encoder: str = Field("test_resnet", description="any timm model, used as smp 'tu-<encoder>'")
    encoder_weights: Path | None = Field(None, description="local timm weights file; never "
                                                           "downloaded")
    encoder_output_stride: Literal[8, 16] = 8
    decoder_channels: int = Field(128, ge=8, description="ASPP width; 256 (smp) measured no "
                                                         "better on 64x64 data, 30% slower")
    decoder_atrous_rates: tuple[int, int, int] = Field(
        (12, 24, 36), description="ASPP dilations (DeepLabv3+ at output stride 8); on 8x8 maps "
                                  "(2, 4, 6) measured no better")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=2, description="BatchNorm after ASPP pooling needs >= 2")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    crop_size: int | None = Field(None, ge=16, description="random crop; None = whole images")
    hflip: bool = True
    seed: int = 0


class AnySizeDeepLabV3Plus(smp.DeepLabV3Plus):
    """smp's DeepLabv3+ for any input size: smp rejects sizes that are not a multiple of the
    encoder's stride, so inputs are padded (edge pixels repeated) and the logits cropped back.

    ``arch`` keeps the constructor arguments, so a checkpoint can rebuild the model alone.
    """

    def __init__(self, **arch: Any) -> None:
        super().__init__(encoder_weights=None, **arch)
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        stride = self.encoder.output_stride
        pad_h, pad_w = -h % stride, -w % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return super().forward(x)[..., :h, :w]


def _create(arch: dict[str, Any]) -> AnySizeDeepLabV3Plus:
    try:
        return AnySizeDeepLabV3Plus(**arch)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        # timm's "Unknown model", an unsupported output_stride or feature layout
        name = arch["encoder_name"].removeprefix("tu-")
        raise UserError(f"segmentation.encoder {name!r}: cannot build a DeepLabv3+ encoder with "
                        f"output stride {arch['encoder_output_stride']}: {e}") from None


def _load_encoder_weights(model: AnySizeDeepLabV3Plus, spec: SegmentationSpec) -> None:
    """Load a timm state dict into the encoder.

    timm loads the file into a twin feature extractor as it loads pretrained weights (feature
    modules renamed, classifier dropped) and the twin's tensors are copied. timm only logs keys
    that do not match, so the file is first checked against the headless model: a file for
    another architecture must fail, not leave the encoder silently random.
    """
    path = spec.encoder_weights
    if path is None:
        return
    if not Path(path).is_file():
        raise UserError(f"segmentation.encoder_weights: file {path} not found")
    features = model.encoder.model
    try:
        state = timm.models.load_state_dict(str(path))
        headless = timm.create_model(spec.encoder, num_classes=0)
        missing = headless.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise ValueError(f"{len(missing)} of its tensors are missing, e.g. {missing[0]!r}")
        twin = timm.create_model(spec.encoder, features_only=True,
                                 output_stride=spec.encoder_output_stride,
                                 out_indices=features.feature_info.out_indices, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)})
        features.load_state_dict(twin.state_dict())
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"segmentation.encoder_weights {path} does not fit encoder "
                        f"{spec.encoder!r}: {e}") from None


def build_model(spec: SegmentationSpec, num_classes: int) -> AnySizeDeepLabV3Plus:
    """DeepLabv3+ with ``num_classes`` outputs, initialised from ``spec.seed`` so two builds with
    one seed are identical; the caller's CPU random state is left as it was."""
    arch = {"encoder_name": f"tu-{spec.encoder}", "classes": num_classes,
            "encoder_output_stride": spec.encoder_output_stride,
            "decoder_channels": spec.decoder_channels,
            "decoder_atrous_rates": tuple(spec.decoder_atrous_rates)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _create(arch)
        _load_encoder_weights(model, spec)  # builds timm twins: random init draws too
    return model


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the pixels that are not 255; 0 (with zero gradient, not NaN)
    when a batch has none, e.g. an all-neutral pseudo-label map."""
    total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def _sample(data: SegDataset, label: Callable[[int], np.ndarray], i: int, spec: SegmentationSpec,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i and its label map, flipped and cropped together."""
    image = torch.from_numpy(data.image(i))
    target = np.asarray(label(i))
    if target.shape != image.shape[:2]:
        raise ValueError(f"label map of image {data.ids[i]} is {target.shape}, the image "
                         f"{tuple(image.shape[:2])}")
    if ((target >= data.num_classes) & (target != IGNORE)).any():
        raise ValueError(f"label map of image {data.ids[i]} has ids outside "
                         f"0..{data.num_classes - 1} and {IGNORE}")
    target = torch.from_numpy(target.astype(np.uint8))
    return augment(image, target, crop_size=spec.crop_size, hflip=spec.hflip, generator=g)


def _size_batches(sizes: Sequence[tuple[int, int]], batch_size: int,
                  g: torch.Generator | None = None) -> list[list[int]]:
    """Batches of same-size images, shuffled when ``g`` is given. A trailing batch of one joins
    the batch before it: BatchNorm after ASPP's global pooling fails on a single sample."""
    order = range(len(sizes)) if g is None else torch.randperm(len(sizes), generator=g).tolist()
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in order:
        buckets.setdefault(sizes[i], []).append(i)
    batches: list[list[int]] = []
    for members in buckets.values():
        chunks = [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [chunks[-2] + chunks[-1]]
        batches += chunks
    if g is None:
        return batches
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def train_segmentation(model: AnySizeDeepLabV3Plus, data: SegDataset, labels: Labels,
                       spec: SegmentationSpec, device: torch.device | str, *,
                       val: SegDataset | None = None,
                       on_epoch: OnEpoch | None = None,
                       resume: dict[str, Any] | None = None) -> dict[str, float]:
    """Train on ``labels`` (image i's uint8 label map at image size; 255 ignored) with
    cross-entropy, AdamW and a one-cycle schedule; deterministic for a seed on CPU.

    After each epoch ``on_epoch(epochs_done, metrics, state)`` gets ``seg_loss`` (mean per
    labelled pixel), with ``val`` also ``val_miou``, and the training state (weights, optimiser,
    schedule, random streams; ``arch``, from which `load_segmentation` rebuilds the model);
    passing that state back as ``resume`` continues after that epoch exactly as if never stopped
    (on CPU). Returns the last epoch's metrics; the model is left in eval mode. Without
    ``crop_size`` only same-size images share a batch.
    """
    device = resolve_device(device)
    label = labels if callable(labels) else labels.__getitem__
    if not callable(labels) and len(labels) != len(data):
        raise ValueError(f"{len(labels)} label maps for {len(data)} images")
    crop = spec.crop_size
    sizes = [(crop, crop) if crop else data.size(i) for i in range(len(data))]
    if lone := sum(n == 1 for n in Counter(sizes).values()):
        warnings.warn(f"{lone} images share their size with no other image and are skipped "
                      "(BatchNorm needs two); set segmentation.crop_size to train on them",
                      stacklevel=2)
    torch.manual_seed(spec.seed)  # dropout in the decoder
    g = torch.Generator().manual_seed(spec.seed)  # order, flips, crops
    steps = len([b for b in _size_batches(sizes, spec.batch_size) if len(b) > 1])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, pct_start=0.15,
                                                total_steps=max(1, spec.epochs * steps))
    metrics: dict[str, float] = {}
    first = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        g.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        first = int(resume["epoch"]) + 1
    for epoch in range(first, spec.epochs + 1):
        model.train()
        loss_sum, pixels = 0.0, 0
        for batch in _size_batches(sizes, spec.batch_size, g):
            if len(batch) == 1:
                continue
            images, targets = zip(*(_sample(data, label, i, spec, g) for i in batch))
            x = normalise_images(torch.stack(images).to(device))
            y = torch.stack(targets).to(device)
            loss = segmentation_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = int((y != IGNORE).sum())
            loss_sum, pixels = loss_sum + loss.item() * n, pixels + n
        metrics = {"seg_loss": loss_sum / max(pixels, 1)}
        if val is not None:
            metrics["val_miou"] = evaluate_segmentation(model, val, device)
        if on_epoch is not None:
            on_epoch(epoch, metrics, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": g.get_state(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch, "arch": model.arch})
    model.eval()
    return metrics


@torch.no_grad()
def evaluate_segmentation(model: AnySizeDeepLabV3Plus, data: SegDataset,
                          device: torch.device | str, batch_size: int = 32) -> float:
    """Standard mIoU of the predictions against ``data``'s ground truth: one confusion matrix
    pooled over the split, classes with an empty union left out (docs/definitions.md)."""
    device = resolve_device(device)
    model.to(device).eval()
    conf = np.zeros((data.num_classes, data.num_classes + 1), np.int64)
    for batch in _size_batches([data.size(i) for i in range(len(data))], batch_size):
        x = torch.stack([torch.from_numpy(data.image(i)) for i in batch]).to(device)
        pred = model(normalise_images(x)).argmax(1).byte().cpu().numpy()
        for i, p in zip(batch, pred):
            conf += confusion(p, data.mask(i), data.num_classes)
    return mean_iou(conf)


@torch.no_grad()
def predict(model: AnySizeDeepLabV3Plus, image: np.ndarray,
            device: torch.device | str) -> np.ndarray:
    """uint8 label map of one uint8 ``HxWx3`` image, at the image's size."""
    device = resolve_device(device)
    model.to(device).eval()
    x = normalise_images(torch.from_numpy(np.ascontiguousarray(image))[None].to(device))
    return model(x)[0].argmax(0).byte().cpu().numpy()


def save_segmentation(model: AnySizeDeepLabV3Plus, path: Path, meta: dict) -> None:
    """Atomically save weights, the architecture (so loading needs no spec) and ``meta``."""
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "arch": model.arch, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_segmentation(path: Path, device: torch.device | str,
                      ) -> tuple[AnySizeDeepLabV3Plus, dict]:
    """Rebuild a DeepLabv3+ in eval mode from what ``path`` holds (nothing is downloaded):

    - a model `save_segmentation` wrote: its ``meta`` comes back with it;
    - a training state `train_segmentation` gave ``on_epoch``, saved with `torch.save`, such as
      a stage-2 checkpoint (``trial.pt``): ``meta`` is its ``epoch`` and, when the state holds
      them, its ``metrics``;
    - a folder holding one ``.pt`` file of either kind (a stage-2 checkpoint folder).

    Files are read with torch's weights-only loader: no code stored in them runs. Anything else
    is a `UserError` naming the file.
    """
    device = resolve_device(device)
    file = _model_file(Path(path))
    try:
        ckpt = torch.load(file, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{file} is not a DeepLabv3+ model file nor a stage-2 checkpoint: "
                        f"cannot read it ({first_line(e)})") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "arch" in ckpt:  # save_segmentation
        weights, arch, meta = ckpt["state_dict"], ckpt["arch"], ckpt.get("meta", {})
    elif isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt:  # a training state
        weights, arch = ckpt["model"], ckpt.get("arch")
        meta = {k: ckpt[k] for k in ("epoch", "metrics") if k in ckpt}
        if arch is None:
            raise UserError(f"{file}: this training state does not record its architecture "
                            "(an earlier wsss-tune wrote it): train the pair again")
    else:
        keys = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{file} is not a DeepLabv3+ model file nor a stage-2 checkpoint (it "
                        f"holds {keys})")
    try:
        model = _create(arch)
        model.load_state_dict(weights)
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file}: its weights do not fit its DeepLabv3+ {arch}: "
                        f"{first_line(e)}") from None
    return model.to(device).eval(), meta


def _model_file(path: Path) -> Path:
    """``path``, or the one ``.pt`` file of the folder ``path``."""
    if path.is_dir():
        files = sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise UserError(f"{path} is a folder holding {len(files)} .pt files; expected one "
                            "model file or stage-2 checkpoint (trial.pt)")
        return files[0]
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    return path


