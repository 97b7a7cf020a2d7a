"""The training augmentation shared by the classifier and DeepLabv3+ (torchvision transforms v2)."""

import torch

from wsss.augment import IMAGENET_MEAN, augment
from wsss.data import IGNORE

PAD = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)


def _coded(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose pixels spell their row and column, and a label map of the columns."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([rows, cols, torch.zeros_like(rows)], -1).to(torch.uint8)
    return image, cols.to(torch.uint8)


def test_image_and_mask_are_flipped_and_cropped_together_padding_255():
    image, mask = _coded(20, 60)  # shorter than the crop: padded; wider: cropped
    flips = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out, out_mask = augment(image, mask, crop_size=32, hflip=True, generator=g)
        assert out.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert out.dtype == out_mask.dtype == torch.uint8
        padded = out_mask == IGNORE
        assert padded.all(1).sum() == 12 and (padded.any(1) == padded.all(1)).all()  # whole rows
        assert (out[padded] == PAD).all() and (out[~padded][:, 2] == 0).all()
        assert torch.equal(out_mask[~padded], out[~padded][:, 1])  # a label stays on its pixel
        kept = out[~padded.all(1)]
        assert torch.equal(kept[:, :, 0], torch.arange(20)[:, None].expand(20, 32).byte())
        steps = kept[0, 1:, 1].int() - kept[0, :-1, 1].int()
        assert (steps == steps[0]).all() and steps[0] in (1, -1)
        flips.add(int(steps[0]))
    assert flips == {1, -1}


def test_draws_are_reproducible_for_a_seed_and_leave_the_global_state_alone():
    image, mask = _coded(40, 40)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        before = torch.get_rng_state()
        outs = [augment(image, mask, crop_size=24, hflip=True, generator=g) for _ in range(6)]
        assert torch.equal(torch.get_rng_state(), before)
        runs.append((outs, torch.rand(4, generator=g)))  # the generator advanced alike
    (a, ga), (b, gb) = runs
    assert torch.equal(ga, gb)
    assert all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    assert len({tuple(out_mask[0, :3].tolist()) for _, out_mask in a}) > 1  # crops vary

    def global_draws():
        torch.manual_seed(3)
        return [augment(image, crop_size=24, hflip=True, scale_range=(0.5, 1.5))[0]
                for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(global_draws(), global_draws()))


def test_rescale_resizes_by_the_drawn_factor_and_no_mask_stays_none():
    image, _ = _coded(40, 60)
    out, out_mask = augment(image, crop_size=None, hflip=False, scale_range=(0.5, 0.5))
    assert out.shape == (20, 30, 3) and out.dtype == torch.uint8 and out_mask is None
    same, _ = augment(image, crop_size=None, hflip=False)
    assert torch.equal(same, image)
