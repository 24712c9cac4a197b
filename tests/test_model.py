"""The IAGN model: jigsaw properties, exits, exact activation maps, attention boxes, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from iagn.errors import IagnError
from iagn.models.attention import (
    attention_drop,
    box_iou,
    boxes_from_maps,
    crop_and_resize,
    expand_boxes,
    peak_points,
)
from iagn.models.backbones import build_resnet
from iagn.models.iagn import IAGN, ModelConfig
from iagn.models.jigsaw import jigsaw
from iagn.models.student import Student, StudentConfig
from iagn.train.config import distill_config


def _patches(x: torch.Tensor, n: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, -1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_jigsaw_preserves_the_multiset_of_patches(n):
    x = torch.randn(5, 3, 32, 48)
    shuffled = jigsaw(x, n, torch.Generator().manual_seed(0))
    assert shuffled.shape == x.shape
    for before, after in zip(_patches(x, n), _patches(shuffled, n), strict=True):
        key = lambda rows: sorted(tuple(r.tolist()) for r in rows)  # noqa: E731
        assert key(before) == key(after)


def test_jigsaw_with_n_1_is_the_identity():
    x = torch.randn(2, 3, 17, 23)
    assert torch.equal(jigsaw(x, 1), x)


def test_jigsaw_permutation_differs_per_sample():
    # Identical images, so any difference comes from the permutation.
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(6, 1, 1, 1)
    shuffled = jigsaw(x, 4, torch.Generator().manual_seed(1))
    distinct = {tuple(s.flatten().tolist()) for s in shuffled}
    assert len(distinct) == 6


def test_jigsaw_handles_sizes_not_divisible_by_n():
    x = torch.randn(2, 3, 30, 35)
    out = jigsaw(x, 8, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Centre crop to 24 x 32, then zero padding back: the border rows are zero.
    assert torch.all(out[..., :3, :] == 0) and torch.all(out[..., -3:, :] == 0)
    with pytest.raises(ValueError, match="too small for a 8x8 jigsaw"):
        jigsaw(torch.randn(1, 3, 6, 6), 8)


def test_jigsaw_is_vectorized_and_runs_on_the_tensor_device():
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert jigsaw(x, 4).dtype == torch.float64


@pytest.fixture(scope="module")
def model() -> IAGN:
    torch.manual_seed(0)
    return IAGN(ModelConfig(backbone="resnet18", num_classes=5, stage_channels=32)).eval()


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (72, 120)])
def test_forward_works_for_any_input_size(model, size):
    out = model(torch.randn(2, 3, *size))
    assert out.fused_logits.shape == (2, 5)
    assert all(logits.shape == (2, 5) for logits in out.full_stage_logits)
    assert out.combined_logits().shape == (2, 5)


def test_exits_stop_samples_at_their_tap(model):
    x = torch.randn(7, 3, 64, 64)
    with torch.no_grad():
        out = model(x, exits=(2, 1, 1))
        full = model(x)
    assert [e.shape[0] for e in out.exit_logits] == [2, 1, 1]
    assert out.fused_logits.shape[0] == 3
    # A sample leaving at tap 1 gets the same head-1 logits as in a full pass.
    assert torch.allclose(out.exit_logits[0], full.full_stage_logits[0][:2], atol=1e-5)
    assert torch.allclose(out.fused_logits, full.fused_logits[4:], atol=1e-5)


def test_activation_map_is_exact_for_the_fused_head(model):
    """Max-pooling each stage's map contribution reproduces the logit pieces."""
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        classes = torch.tensor([0, 3, 4])
        cam = model.class_activation_map(out, classes)
    assert cam.shape == (3, *out.stage_maps[0].shape[-2:])
    assert cam.min() >= 0 and cam.max() <= 1
    assert torch.allclose(cam.flatten(1).max(1).values, torch.ones(3))


def test_boxes_from_maps_and_peaks():
    cam = torch.zeros(2, 8, 8)
    cam[0, 2:4, 5:7] = 1.0
    boxes = boxes_from_maps(cam, (64, 64), threshold=0.5)
    assert boxes[0].tolist() == pytest.approx([36, 12, 60, 36], abs=4)
    assert boxes[1].tolist() == [0, 0, 64, 64]  # flat map -> whole image
    x, y = peak_points(cam, (64, 64))[0].tolist()
    assert 36 <= x <= 60 and 12 <= y <= 36


def test_attention_crop_zooms_into_the_box():
    images = torch.zeros(1, 1, 40, 40)
    images[..., 10:20, 20:30] = 1.0
    crop = crop_and_resize(images, torch.tensor([[20.0, 10.0, 30.0, 20.0]]))
    assert crop.shape == images.shape
    assert crop[..., 4:36, 4:36].mean() > 0.95
    grown = expand_boxes(torch.tensor([[20.0, 10.0, 30.0, 20.0]]), (40, 40), 0.5)
    assert grown.tolist() == [[15.0, 5.0, 35.0, 25.0]]
    random_margin = expand_boxes(
        torch.tensor([[20.0, 10.0, 30.0, 20.0]] * 4),
        (40, 40),
        (0.0, 1.0),
        torch.Generator().manual_seed(0),
    )
    assert len({tuple(r) for r in random_margin.tolist()}) == 4


def test_attention_drop_erases_the_peak_region():
    images = torch.ones(1, 3, 16, 16)
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = 1.0
    dropped = attention_drop(images, cam, 0.5)
    assert dropped[0, :, 0, 0].sum() == 0 and dropped[0, :, 15, 15].sum() == 3


def test_box_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    assert box_iou(a, b).tolist() == pytest.approx([1.0, 1 / 3])


def test_local_weights_file_is_loaded(tmp_path: Path):
    reference = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    loaded = build_resnet("resnet18", str(path))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    model = IAGN(ModelConfig(backbone="resnet18", num_classes=3, weights=str(path)))
    assert torch.equal(model.stem[0].weight, reference.conv1.weight)


def test_bad_weights_and_backbone_are_explained(tmp_path: Path):
    with pytest.raises(IagnError, match=r"unknown backbone 'resnet9'.*resnet18"):
        build_resnet("resnet9")
    with pytest.raises(IagnError, match="does not exist"):
        build_resnet("resnet18", str(tmp_path / "missing.pt"))
    wrong = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(IagnError, match="does not fit resnet18"):
        build_resnet("resnet18", str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(IagnError, match="not a loadable torch state dict"):
        build_resnet("resnet18", str(garbage))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_student_gives_logits_and_its_own_map(backbone):
    student = Student(StudentConfig(backbone=backbone, num_classes=4)).eval()
    with torch.no_grad():
        logits, cam = student.forward_with_map(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert cam.shape[0] == 2 and cam.max() <= 1 and cam.min() >= 0


def test_student_can_start_from_the_teacher_trunk(model):
    student = Student(StudentConfig(backbone="resnet18", num_classes=5))
    student.copy_teacher_trunk(model, "resnet18")
    teacher_trunk = torch.nn.Sequential(*model.stem, *model.layers)
    x = torch.randn(2, 3, 64, 64)
    student.eval()
    assert torch.equal(student.features(x), teacher_trunk(x))
    with pytest.raises(IagnError, match="student_init must be auto, teacher or weights"):
        distill_config({"distill": {"student_init": "scratch"}})
    other = Student(StudentConfig(backbone="mobilenet_v3_small", num_classes=5))
    with pytest.raises(IagnError, match="student of the teacher's architecture"):
        other.copy_teacher_trunk(model, "resnet18")
