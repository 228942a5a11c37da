"""CIFAR ResNets of the CRD ("RepDistiller") zoo, as copied by mdistiller and the WKD code.

3x3 stem conv (stride 1), three stages of BasicBlocks (strides 1, 2, 2), global average pooling, ``fc``.
``resnet{8,14,20,32,44,56,110}`` use filters (16, 16, 32, 64); ``resnet8x4`` / ``resnet32x4`` use (32, 64, 128, 256),
so their last stage is 256 x 8 x 8 at 32 x 32 input. Module names match CRD's, so CRD/mdistiller teacher
checkpoints load as they are.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .staged import StagedNet

__all__ = ["BasicBlock", "CifarResNet", "CIFAR_RESNET_CONFIGS", "cifar_resnet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x).
    [N, Cin, H, W] -> [N, C, H/s, W/s]."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(StagedNet):
    """CRD CIFAR ResNet. ``depth`` = 6n + 2 (n blocks per stage); ``num_filters`` = (stem, stage1, stage2, stage3).

    Stages: layer1 [N, f1, 32, 32], layer2 [N, f2, 16, 16], layer3 [N, f3, 8, 8] (for 32 x 32 input);
    pooled [N, f3].
    """

    classifier_name = "fc"

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 for BasicBlock, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        self.stage_channels = tuple(int(c) * BasicBlock.expansion for c in num_filters[1:])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3], self.avgpool(f3).flatten(1)


# name -> (depth, num_filters), as in CRD's models/resnet.py
CIFAR_RESNET_CONFIGS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def cifar_resnet(name: str, num_classes: int) -> CifarResNet:
    """Build one of :data:`CIFAR_RESNET_CONFIGS` by name."""
    depth, filters = CIFAR_RESNET_CONFIGS[name]
    return CifarResNet(depth, filters, num_classes=num_classes)
