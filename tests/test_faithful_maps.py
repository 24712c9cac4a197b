"""The attention maps are faithful: each position's share, summed, is the head's logit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iagn.models.iagn import IAGN, ModelConfig
from iagn.models.student import Student, StudentConfig


def teacher(pooling: str) -> IAGN:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=5, stage_channels=16, pooling=pooling)
    return IAGN(config).eval()


def fused_logit_from_map(model: IAGN, images: torch.Tensor, classes: torch.Tensor):
    output = model(images)
    shares = model.attribution_map(output, classes)
    rebuilt = shares.sum(dim=(1, 2)) + model.fused_head.bias[classes]
    return output.fused_logits.gather(1, classes[:, None])[:, 0], rebuilt, shares


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("size", [64, 72])  # 72 px: tap grids 9, 5, 3 do not divide evenly
@torch.no_grad()
def test_teacher_map_sums_to_the_fused_logit(pooling, size):
    model = teacher(pooling)
    images = torch.randn(3, 3, size, size)
    classes = torch.tensor([0, 3, 4])
    logit, rebuilt, shares = fused_logit_from_map(model, images, classes)
    assert shares.shape[-2:] == model(images).stage_maps[0].shape[-2:]
    torch.testing.assert_close(rebuilt, logit, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_old_upsampled_cam_of_a_max_pooled_head_is_not_faithful():
    """The check above can fail: the map used before (head weights at every position,
    bilinear upsampling) does not add up to a max-pooled head's logit."""
    model = teacher("max")
    images = torch.randn(3, 3, 64, 64)
    classes = torch.tensor([0, 3, 4])
    output = model(images)
    channels = model.config.stage_channels
    weights = model.fused_head.weight[classes]
    size = output.stage_maps[0].shape[-2:]
    old = 0
    for stage, features in enumerate(output.stage_maps):
        w = weights[:, stage * channels : (stage + 1) * channels]
        cam = torch.einsum("bc,bchw->bhw", w, features).unsqueeze(1)
        old = old + F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    logit = output.fused_logits.gather(1, classes[:, None])[:, 0]
    rebuilt = old.sum(dim=(1, 2)) + model.fused_head.bias[classes]
    assert not torch.allclose(rebuilt, logit, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_shares_sit_where_the_features_are():
    """A max-pooled head's share lands on the position each channel's maximum came from:
    features that are zero except at one position put the whole logit there."""
    from iagn.models.iagn import position_shares

    features = torch.zeros(1, 4, 5, 5)
    features[0, :, 2, 3] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.ones(1, 4)
    for pooling in ("max", "avg"):
        shares = position_shares(features, weights, pooling)
        assert shares[0].argmax() == 2 * 5 + 3
        expected = 10.0 if pooling == "max" else 10.0 / 25
        assert float(shares.sum()) == pytest.approx(expected)


@pytest.mark.parametrize("stride", [32, 16, 8])
@torch.no_grad()
def test_student_map_sums_to_its_logit(stride):
    torch.manual_seed(0)
    student = Student(StudentConfig(num_classes=4, output_stride=stride)).eval()
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([1, 2])
    logits, shares = student.forward_with_attribution(images, classes)
    assert shares.shape[-2:] == (64 // stride, 64 // stride)
    rebuilt = shares.sum(dim=(1, 2)) + student.classifier.bias[classes]
    torch.testing.assert_close(rebuilt, logits.gather(1, classes[:, None])[:, 0])
