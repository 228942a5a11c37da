"""Wide ResNets for CIFAR, as in the CRD ("RepDistiller") zoo (``wrn_40_2``, ``wrn_40_1``, ``wrn_16_2``, ``wrn_16_1``).

WRN-d-k: 3x3 stem conv with 16 channels, three ``NetworkBlock`` stages of (d - 4) / 6 pre-activation blocks with
16k, 32k, 64k channels (strides 1, 2, 2), final BN-ReLU, global average pooling, ``fc``. Module names match CRD's.

Stage features: the raw outputs of block1 [N, 16k, 32, 32], block2 [N, 32k, 16, 16] and block3 [N, 64k, 8, 8],
as CRD / mdistiller return them in ``feats`` (the published WKD-F and FitNet code distil these maps). The head
pools the activated map relu(bn1(block3)), so for WRNs ``pooled == relu(bn1(stage3)).mean((2, 3))``, not the plain
mean of stage3.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .staged import StagedNet

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet", "WRN_CONFIGS", "wrn"]


class WideBasicBlock(nn.Module):
    """Pre-activation block (CRD's ``BasicBlock`` of wrn.py). [N, Cin, H, W] -> [N, Cout, H/s, W/s]."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # identity shortcut takes the raw input; the projection shortcut takes the activated input (as CRD)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """``nb_layers`` WideBasicBlocks; the first one changes channels / stride. Held as ``self.layer`` (CRD names)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """CRD WRN-depth-widen_factor for 32 x 32 inputs; see the module docstring for the stage features."""

    classifier_name = "fc"

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.stage_channels = (ch[1], ch[2], ch[3])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        x = self.conv1(x)
        f1 = self.block1(x)
        f2 = self.block2(f1)
        f3 = self.block3(f2)  # raw, as CRD's / mdistiller's feats[-1]; the final BN-ReLU belongs to the head
        return [f1, f2, f3], F.adaptive_avg_pool2d(self.relu(self.bn1(f3)), 1).flatten(1)


# name -> (depth, widen_factor), as in CRD's models/wrn.py
WRN_CONFIGS = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


def wrn(name: str, num_classes: int) -> WideResNet:
    """Build one of :data:`WRN_CONFIGS` by name."""
    depth, k = WRN_CONFIGS[name]
    return WideResNet(depth, num_classes=num_classes, widen_factor=k)
