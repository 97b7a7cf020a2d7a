"""Stage 2: DeepLabv3+ on pseudo-labels (smp + timm encoder, local weights only)."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data import IGNORE, SegDataset
from wsss.errors import UserError
from wsss.metrics import confusion, mean_iou
from wsss.segmentation import (
    SegmentationSpec,
    _size_batches,
    build_model,
    evaluate_segmentation,
    load_segmentation,
    predict,
    save_segmentation,
    segmentation_loss,
    train_segmentation,
)
from wsss.synthetic import generate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[SegDataset, SegDataset, list[np.ndarray]]:
    root = generate(tmp_path_factory.mktemp("seg"), n_train=48, n_val=16, size=64, classes=3,
                    seed=0)
    train, val = SegDataset(root, "train"), SegDataset(root, "val")
    return train, val, [train.mask(i) for i in range(len(train))]


def test_training_on_ground_truth_beats_untrained_and_all_background(splits):
    train, val, masks = splits
    spec = SegmentationSpec(epochs=12)
    model = build_model(spec, train.num_classes)
    untrained = evaluate_segmentation(model, val, CPU)
    conf = sum(confusion(np.zeros_like(m), m, val.num_classes)
               for m in (val.mask(i) for i in range(len(val))))
    background = mean_iou(conf)
    seen: list[tuple[int, dict]] = []
    last = train_segmentation(model, train, masks, spec, CPU, val=val,
                              on_epoch=lambda e, m, _: seen.append((e, m)))
    assert [e for e, _ in seen] == list(range(1, 13)) and seen[-1][1] == last
    assert set(last) == {"seg_loss", "val_miou"}
    assert seen[-1][1]["seg_loss"] < seen[0][1]["seg_loss"]
    assert last["val_miou"] == evaluate_segmentation(model, val, CPU)
    assert last["val_miou"] > max(untrained, background) + 0.25, (untrained, background, last)


def test_same_seed_same_run_with_flips_and_crops(splits):
    train, val, masks = splits
    spec = SegmentationSpec(epochs=2, crop_size=48, hflip=True, seed=3)
    runs = []
    for _ in range(2):
        model = build_model(spec, train.num_classes)
        metrics = train_segmentation(model, train, lambda i: masks[i], spec, CPU, val=val)
        runs.append((metrics, model.state_dict()))
    (m1, s1), (m2, s2) = runs
    assert m1 == m2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = build_model(spec.model_copy(update={"seed": 4}), train.num_classes).state_dict()
    assert not all(torch.equal(s1[k], other[k]) for k in s1 if k.endswith("weight"))


def test_resumed_training_equals_an_uninterrupted_run(splits):
    """Stage 2 checkpoints after every epoch: a search killed mid-training resumes there."""
    import copy

    train, _, masks = splits
    spec = SegmentationSpec(epochs=3, crop_size=48, hflip=True, seed=5)
    states = {}

    def keep(epoch, metrics, state):
        states[epoch] = (metrics, copy.deepcopy(state))

    straight = build_model(spec, train.num_classes)
    train_segmentation(straight, train, masks, spec, CPU, on_epoch=keep)
    torch.manual_seed(123)  # the process's random state differs after a restart
    resumed = build_model(spec, train.num_classes)
    seen = []
    last = train_segmentation(resumed, train, masks, spec, CPU, resume=states[1][1],
                              on_epoch=lambda e, m, _: seen.append(e))
    assert seen == [2, 3] and last == states[3][0]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_ignores_255_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE, dtype=torch.uint8)
    kept = [(0, 1, 2, 3), (1, 5, 5, 0), (1, 7, 0, 2)]  # (image, row, col, class)
    for b, r, c, k in kept:
        target[b, r, c] = k
    loss = segmentation_loss(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    by_hand = torch.stack([-F.log_softmax(logits[b, :, r, c], 0)[k] for b, r, c, k in kept]).mean()
    (grad_by_hand,) = torch.autograd.grad(by_hand, logits)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(grad, grad_by_hand)

    empty = segmentation_loss(logits, torch.full_like(target, IGNORE))
    (grad,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and not grad.any()


def test_all_neutral_labels_give_zero_loss_and_gradient(splits):
    train, _, masks = splits
    spec = SegmentationSpec(epochs=1)
    model = build_model(spec, train.num_classes)
    neutral = [np.full_like(m, IGNORE) for m in masks]
    assert train_segmentation(model, train, neutral, spec, CPU) == {"seg_loss": 0.0}
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_bad_label_maps_are_rejected(splits):
    train, _, masks = splits
    spec = SegmentationSpec(epochs=1)
    model = build_model(spec, train.num_classes)
    with pytest.raises(ValueError, match=r"label map of image syn_\d+ is \(10, 64\)"):
        train_segmentation(model, train, lambda i: masks[i][:10], spec, CPU)
    with pytest.raises(ValueError, match="ids outside"):
        train_segmentation(model, train, lambda i: masks[i] + 9, spec, CPU)
    with pytest.raises(ValueError, match="3 label maps for 48 images"):
        train_segmentation(model, train, masks[:3], spec, CPU)


def test_local_encoder_weights_are_loaded(tmp_path):
    torch.manual_seed(123)  # not the spec's seed, so a fresh encoder differs from the file
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "encoder.pth"
    torch.save(source.state_dict(), path)
    reference = source.state_dict()
    loaded = build_model(SegmentationSpec(encoder_weights=path), 3).encoder.model.state_dict()
    fresh = build_model(SegmentationSpec(), 3).encoder.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.items())
    assert not all(torch.equal(v, reference[k]) for k, v in fresh.items())


def test_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="segmentation.encoder_weights: file .*missing.pth"):
        build_model(SegmentationSpec(encoder_weights=tmp_path / "missing.pth"), 3)
    wrong = tmp_path / "byobnet.pth"
    torch.save(timm.create_model("test_byobnet").state_dict(), wrong)
    with pytest.raises(UserError, match="segmentation.encoder_weights .*byobnet.pth .* missing"):
        build_model(SegmentationSpec(encoder_weights=wrong), 3)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="segmentation.encoder_weights .*garbage.pth"):
        build_model(SegmentationSpec(encoder_weights=garbage), 3)
    with pytest.raises(UserError, match="segmentation.encoder 'no_such_net'"):
        build_model(SegmentationSpec(encoder="no_such_net"), 3)


@pytest.mark.parametrize("stride", [8, 16])
def test_predict_returns_the_image_size(stride):
    model = build_model(SegmentationSpec(encoder_output_stride=stride), 4)
    image = np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    labels = predict(model, image, CPU)
    assert labels.shape == (50, 37) and labels.dtype == np.uint8 and labels.max() < 4


def test_save_load_round_trip_predicts_identically(splits, tmp_path):
    train, val, masks = splits
    spec = SegmentationSpec(epochs=1, encoder_output_stride=16, decoder_channels=64)
    model = build_model(spec, train.num_classes)
    train_segmentation(model, train, masks, spec, CPU)
    path = tmp_path / "seg.pt"
    save_segmentation(model, path, {"bg": 0.3, "fg": 0.5})
    loaded, meta = load_segmentation(path, "cpu")
    assert meta == {"bg": 0.3, "fg": 0.5} and not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["seg.pt"]  # no temporary left behind
    for i in range(3):
        np.testing.assert_array_equal(predict(loaded, val.image(i), CPU),
                                      predict(model, val.image(i), CPU))
    assert evaluate_segmentation(loaded, val, CPU) == evaluate_segmentation(model, val, CPU)


def test_batches_hold_one_size_and_never_a_lone_image_unless_unavoidable():
    sizes = [(64, 64)] * 5 + [(32, 48)] * 3 + [(50, 50)]
    batches = _size_batches(sizes, 2, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    assert sorted(len(b) for b in batches) == [1, 2, 3, 3]  # only (50, 50) is alone


class _MixedSizes(SegDataset):
    """The first 20 images cropped to 48x40 and one to 40x40: three sizes, one of them alone."""

    def _crop(self, i: int) -> tuple[int, int] | None:
        return (48, 40) if i < 20 else (40, 40) if i == 20 else None

    def image(self, i: int) -> np.ndarray:
        full, crop = super().image(i), self._crop(i)
        return full if crop is None else full[: crop[0], : crop[1]]

    def mask(self, i: int) -> np.ndarray:  # read directly: SegDataset.mask checks size(i)
        full, crop = np.asarray(Image.open(self.mask_path(i))), self._crop(i)
        return full if crop is None else full[: crop[0], : crop[1]]

    def size(self, i: int) -> tuple[int, int]:
        return self._crop(i) or super().size(i)


def test_mixed_sizes_train_in_same_size_batches(splits):
    train, _, _ = splits
    mixed = _MixedSizes(train.root, "train")
    spec = SegmentationSpec(epochs=1)
    model = build_model(spec, mixed.num_classes)
    with pytest.warns(UserWarning, match="1 images share their size with no other"):
        metrics = train_segmentation(model, mixed, mixed.mask, spec, CPU, val=mixed)
    assert metrics["seg_loss"] > 0 and 0 <= metrics["val_miou"] <= 1
