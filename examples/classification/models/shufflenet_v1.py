"""ShuffleNetV1 for CIFAR, as in the CRD ("RepDistiller") zoo (``ShuffleV1``: groups 3, out channels 240/480/960).

1x1 stem conv 3 -> 24 (stride 1), three stages of 4, 8, 4 bottlenecks; the first bottleneck of each stage has
stride 2 and concatenates its 3x3-average-pooled input. At 32 x 32 input: stage1 [N, 240, 16, 16],
stage2 [N, 480, 8, 8], stage3 [N, 960, 4, 4]; pooled [N, 960]; classifier ``linear``. Module names match CRD's.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .staged import StagedNet

__all__ = ["ShuffleBlock", "ShuffleBottleneck", "ShuffleNetV1", "shufflenet_v1"]


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g * c, H, W] -> the same shape with the g groups interleaved."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; add (stride 1) or concat the pooled input (stride 2).

    [N, in_planes, H, W] -> [N, out_planes (+ in_planes when stride 2), H/s, W/s].
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the stem output is not grouped (CRD)
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(StagedNet):
    """CRD ShuffleNetV1 for CIFAR; see the module docstring for shapes."""

    classifier_name = "linear"

    def __init__(self, out_planes: Sequence[int] = (240, 480, 960), num_blocks: Sequence[int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.stage_channels = tuple(int(c) for c in out_planes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 block concatenates its input
            layers.append(ShuffleBottleneck(self.in_planes, out_planes - cat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3], F.adaptive_avg_pool2d(f3, 1).flatten(1)


def shufflenet_v1(num_classes: int) -> ShuffleNetV1:
    """CRD ``ShuffleV1``: out_planes (240, 480, 960), num_blocks (4, 8, 4), groups 3."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes)
