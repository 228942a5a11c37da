"""MobileNetV1 for ImageNet as used by the KD literature (the ``MobileNetV1`` of the CRD / ReviewKD / mdistiller
ImageNet code).

``self.model`` is a Sequential of 14 blocks (indices match those repositories' checkpoints): conv-bn-relu 3 -> 32
stride 2, then depthwise-separable blocks 64, 128(s2), 128, 256(s2), 256, 512(s2), 512 x 5, 1024(s2), 1024;
global average pooling, ``fc``. At 224 x 224 input the stages are
    stage1 = model[0:4]   [N, 128, 56, 56]
    stage2 = model[4:6]   [N, 256, 28, 28]
    stage3 = model[6:12]  [N, 512, 14, 14]
    stage4 = model[12:14] [N, 1024, 7, 7]   ("last"), pooled [N, 1024].
Stage outputs are taken after their final ReLU (mdistiller returns the pre-ReLU map and applies the ReLU after).
"""
from __future__ import annotations

from typing import List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .staged import StagedNet

__all__ = ["MobileNetV1", "mobilenet_v1"]

# (out channels, stride) of the depthwise-separable blocks
_DW_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
_STAGE_ENDS = (4, 6, 12, 14)  # exclusive end index in self.model of each stage


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


class MobileNetV1(StagedNet):
    """KD-literature MobileNetV1 (about 4.23M parameters with 1000 classes); shapes in the module docstring."""

    classifier_name = "fc"

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks = [_conv_bn(3, 32, 2)]
        inp = 32
        for oup, stride in _DW_CFG:
            blocks.append(_conv_dw(inp, oup, stride))
            inp = oup
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = tuple(_DW_CFG[end - 2][0] for end in _STAGE_ENDS)  # (128, 256, 512, 1024)

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        stages, start = [], 0
        for end in _STAGE_ENDS:
            x = self.model[start:end](x)
            stages.append(x)
            start = end
        return stages, F.adaptive_avg_pool2d(x, 1).flatten(1)


def mobilenet_v1(num_classes: int) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes)
