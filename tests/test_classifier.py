"""Classifier backbones (timm, local weights only) and multi-scale + flip CAMs."""

import pytest
import timm
import torch

from wsss.cam import CamSpec, multiscale_cams
from wsss.classifier import CamClassifier, create_backbone
from wsss.errors import UserError


def test_local_weights_file_is_loaded(tmp_path):
    source = timm.create_model("test_byobnet", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("test_byobnet", 8, path).state_dict()
    fresh = create_backbone("test_byobnet", 8).state_dict()
    reference = source.state_dict()

    def key(k: str) -> str:
        return k.replace("stages_", "stages.")  # features_only renames the stage modules

    assert all(torch.equal(v, reference[key(k)]) for k, v in loaded.items())
    assert not all(torch.equal(v, reference[key(k)]) for k, v in fresh.items())


def test_backbone_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="classifier.weights"):
        create_backbone("test_byobnet", 8, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="classifier.model 'no_such_net'"):
        create_backbone("no_such_net", 8)


def test_cams_are_strided_relu_and_flip_symmetric():
    torch.manual_seed(0)
    model = CamClassifier(create_backbone("test_byobnet", 8), 3).eval()
    images = torch.randint(0, 256, (2, 40, 52, 3), dtype=torch.uint8)
    spec = CamSpec(scales=[1.0, 0.5], flip=True, store_stride=4)
    cams = multiscale_cams(model, images, spec)
    assert cams.shape == (2, 3, 10, 13) and (cams >= 0).all()
    mirrored = multiscale_cams(model, images.flip(2), spec)
    torch.testing.assert_close(mirrored, cams.flip(-1), atol=1e-4, rtol=1e-4)
    logits = model(torch.zeros(1, 3, 40, 52))
    assert logits.shape == (1, 3)
