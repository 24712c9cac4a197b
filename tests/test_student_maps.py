"""The student's map resolution (`output_stride`) and attention transfer towards the
teacher's attention (iagn/train/losses.py)."""

from __future__ import annotations

import pytest
import torch

from iagn.errors import IagnError
from iagn.models.iagn import IAGN, ModelConfig
from iagn.models.student import Student, StudentConfig
from iagn.train.config import distill_config
from iagn.train.losses import attention_transfer_loss


@pytest.fixture(scope="module")
def teacher() -> IAGN:
    torch.manual_seed(0)
    return IAGN(ModelConfig(num_classes=5, stage_channels=16)).eval()


@pytest.mark.parametrize("stride", [32, 16, 8])
@torch.no_grad()
def test_output_stride_sets_the_map_and_keeps_the_teacher_trunk(teacher, stride):
    student = Student(StudentConfig(num_classes=5, output_stride=stride)).eval()
    student.copy_teacher_trunk(teacher, "resnet18")  # same weight shapes at every stride
    trunk = [*teacher.stem, *teacher.layers]
    for mine, theirs in zip(student.features, trunk, strict=True):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    x = torch.randn(2, 3, 64, 64)
    logits, cam = student.forward_with_map(x)
    assert logits.shape == (2, 5)
    assert cam.shape == (2, 64 // stride, 64 // stride)
    if stride == 8:  # the teacher's tap-1 grid: the maps can be compared cell for cell
        assert cam.shape[-2:] == teacher(x).stage_maps[0].shape[-2:]


@pytest.mark.parametrize(("layers", "stride"), [(3, 16), (3, 8), (2, 8)])
@torch.no_grad()
def test_a_shorter_student_ends_inside_the_teacher_trunk(teacher, layers, stride):
    student = Student(StudentConfig(num_classes=5, output_stride=stride, layers=layers)).eval()
    student.copy_teacher_trunk(teacher, "resnet18")
    assert len(student.features) == len(teacher.stem) + layers - 1  # stem, layer2 [, layer3]
    assert student.classifier.in_features == {3: 256, 2: 128}[layers]
    x = torch.randn(2, 3, 64, 64)
    logits, shares = student.forward_with_attribution(x)
    assert shares.shape == (2, 64 // stride, 64 // stride)
    # The trunk is the teacher's up to the same layer: the same features.
    teacher_features = teacher.stem(x)
    for layer in teacher.layers[: layers - 1]:
        teacher_features = layer(teacher_features)
    if stride == {3: 16, 2: 8}[layers]:  # no downsampling undone
        torch.testing.assert_close(student.features(x), teacher_features)
    bias = student.classifier.bias[logits.argmax(1)]
    torch.testing.assert_close(shares.sum(dim=(1, 2)) + bias, logits.max(1).values)


def test_output_stride_is_checked_and_old_students_load_at_32():
    config = StudentConfig.from_dict({"backbone": "resnet18", "num_classes": 3})
    assert config.output_stride == 32  # checkpoints written before the option
    assert config.layers == 4
    with pytest.raises(IagnError, match="output stride 16 or less, not 32"):
        Student(StudentConfig(layers=3))
    with pytest.raises(IagnError, match="output stride 8 or less, not 16"):
        Student(StudentConfig(layers=2, output_stride=16))
    with pytest.raises(IagnError, match="layers must be 4, or 3 or 2 for resnet18"):
        Student(StudentConfig(backbone="mobilenet_v3_small", layers=3))
    with pytest.raises(IagnError, match="resnet18 only"):
        Student(StudentConfig(backbone="mobilenet_v3_small", output_stride=16))
    with pytest.raises(IagnError, match="output_stride must be one of 32, 16, 8"):
        Student(StudentConfig(output_stride=4))
    with pytest.raises(IagnError, match="student_output_stride must be one of"):
        distill_config({"distill": {"student_output_stride": 64}})
    with pytest.raises(IagnError, match="attention_weight must be >= 0"):
        distill_config({"distill": {"attention_weight": -1.0}})


def test_forward_gives_the_shares_when_asked():
    """Training asks `forward` (what DistributedDataParallel wraps) for the shares."""
    torch.manual_seed(0)
    student = Student(StudentConfig(num_classes=4, output_stride=16)).eval()
    x, classes = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    with torch.no_grad():
        logits, shares = student(x, attribution_of=classes)
        expected = student.forward_with_attribution(x, classes)
        torch.testing.assert_close(logits, student(x))
    torch.testing.assert_close(shares, expected[1])


def test_attention_transfer_is_zero_only_for_proportional_maps():
    torch.manual_seed(0)
    teacher_map = torch.rand(3, 8, 8)
    assert float(attention_transfer_loss(teacher_map, teacher_map)) == pytest.approx(0, abs=1e-6)
    # Scale does not matter (each map is L2-normalized) ...
    assert float(attention_transfer_loss(5 * teacher_map, teacher_map)) == pytest.approx(
        0, abs=1e-6
    )
    # ... nor a finer grid that pools to the same map: a 4 x 4 student against 8 x 8.
    pooled = torch.nn.functional.avg_pool2d(teacher_map.unsqueeze(1), 2)[:, 0]
    assert float(attention_transfer_loss(pooled, teacher_map)) == pytest.approx(0, abs=1e-6)
    other = torch.rand(3, 4, 4)
    assert float(attention_transfer_loss(other, teacher_map)) > 0.01
    opposite = attention_transfer_loss(-teacher_map, teacher_map)
    assert float(opposite) == pytest.approx(4.0, abs=1e-5)  # the largest distance
    assert float(attention_transfer_loss(torch.zeros(0, 2, 2), torch.zeros(0, 8, 8))) == 0


def test_attention_transfer_moves_the_student_map_not_the_teacher():
    torch.manual_seed(0)
    student_map = torch.rand(2, 4, 4, requires_grad=True)
    teacher_map = torch.rand(2, 8, 8, requires_grad=True)
    loss = attention_transfer_loss(student_map, teacher_map)
    loss.backward()
    assert student_map.grad is not None and float(student_map.grad.abs().sum()) > 0
    assert teacher_map.grad is None
    # A step against the gradient brings the maps closer.
    with torch.no_grad():
        stepped = student_map - 0.1 * student_map.grad
    assert float(attention_transfer_loss(stepped, teacher_map)) < float(loss.detach())


def test_attention_transfer_trains_the_student_through_its_shares(teacher):
    torch.manual_seed(0)
    student = Student(StudentConfig(num_classes=5, output_stride=16))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = teacher(x)
        classes = output.fused_logits.argmax(1)
        attention = teacher.class_activation_map(output, classes)
    _, shares = student(x, attribution_of=classes)
    attention_transfer_loss(shares, attention).backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    assert student.features[0].weight.grad.abs().sum() > 0
