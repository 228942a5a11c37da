"""make_projector: the published spatial-size-changing ConvReg, conv1x1_linear, module pass-through, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wkd_kernels.losses import FitNetLoss, WKDFeatureLoss, make_projector
from wkd_kernels.losses.projectors import PROJECTORS, ConvReg


@pytest.mark.parametrize("hs,ht,conv_type,kernel,stride", [
    (8, 4, nn.Conv2d, (3, 3), (2, 2)),           # student 2x the teacher: stride-2 conv
    (4, 8, nn.ConvTranspose2d, (4, 4), (2, 2)),  # student half the teacher: transposed conv
    (7, 4, nn.Conv2d, (4, 4), (1, 1)),           # larger by another amount: valid conv, kernel = difference + 1
    (6, 6, nn.Conv2d, (1, 1), (1, 1)),           # equal: 1x1
])
def test_convreg_changes_the_spatial_size_like_the_published_code(hs, ht, conv_type, kernel, stride):
    torch.manual_seed(0)
    p = make_projector("convreg", 5, 7, student_size=(hs, hs), teacher_size=ht)
    assert isinstance(p, ConvReg) and [type(m) for m in p] == [conv_type, nn.BatchNorm2d, nn.ReLU]
    conv = p[0]
    assert conv.kernel_size == kernel and conv.stride == stride
    assert (conv.in_channels, conv.out_channels) == (5, 7)
    if conv_type is nn.Conv2d and stride == (1, 1):
        assert conv.padding == (0, 0)
    else:
        assert conv.padding == (1, 1)
    y = p(torch.randn(3, 5, hs, hs))
    assert y.shape == (3, 7, ht, ht) and bool((y >= 0).all())


def test_convreg_rectangular_valid_conv_and_unsupported_sizes():
    p = make_projector("convreg", 2, 3, student_size=(9, 7), teacher_size=(4, 4))
    assert p[0].kernel_size == (6, 4)
    assert p(torch.randn(2, 2, 9, 7)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="smaller than the teacher"):
        make_projector("convreg", 2, 3, student_size=3, teacher_size=8)
    with pytest.raises(ValueError, match="student_size"):
        make_projector("convreg", 2, 3)


def test_conv1x1_linear_has_no_relu_and_outputs_signed_values():
    torch.manual_seed(0)
    p = make_projector("conv1x1_linear", 4, 6)
    assert [type(m) for m in p] == [nn.Conv2d, nn.BatchNorm2d] and p[0].kernel_size == (1, 1)
    with torch.no_grad():
        y = p(torch.randn(8, 4, 5, 5))
    assert float(y.min()) < 0 < float(y.max())
    crit = WKDFeatureLoss(4, 6, grid=1, projector="conv1x1_linear")  # the loss builds it by name
    assert [type(m) for m in crit.projector] == [nn.Conv2d, nn.BatchNorm2d]
    assert "conv1x1_linear" in PROJECTORS and "convreg" in PROJECTORS


def test_a_module_is_used_as_is():
    m = make_projector("convreg", 3, 4, student_size=4, teacher_size=8)
    assert make_projector(m, 3, 4) is m
    crit = FitNetLoss(4, 4, projector=None)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 8, 8)
    loss = crit(m(f_s), f_t)  # project to the teacher's size first, then the loss on equal shapes
    loss.backward()
    assert torch.isfinite(loss) and m[0].weight.grad is not None
    with pytest.raises(ValueError, match="projector"):
        make_projector("conv3x3", 3, 4)


def test_wkd_feature_loss_with_the_size_changing_projector():
    """WKDFeatureLoss(projector="convreg") compares maps of different spatial size (the projector resizes the student
    map); the sizes are checked after the projector."""
    torch.manual_seed(0)
    loss = WKDFeatureLoss(8, 16, projector="convreg", student_size=(8, 8), teacher_size=(4, 4))
    out = loss(torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in loss.projector.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="after the projector"):
        loss(torch.randn(2, 8, 6, 6), torch.randn(2, 16, 4, 4))
