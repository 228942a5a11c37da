"""Feature projectors mapping a student feature map to the teacher's channels (WKD-F and FitNet).

As in the published WKD code (ConvReg / ConvRegBottleNeck for equal spatial sizes):
  * ``"conv1x1"``:    Conv2d(Cs -> Ct, 1x1) -> BatchNorm2d(Ct) -> ReLU
  * ``"bottleneck"``: Conv2d(Cs -> h, 1x1) -> Conv2d(h -> h, 3x3, padding 1) -> Conv2d(h -> Ct, 1x1)
                      -> BatchNorm2d(Ct) -> ReLU   (h = 256; no normalisation between the convolutions)
  * ``None``:         identity (Cs must equal Ct)
Spatial size is preserved; student and teacher maps must have the same H x W.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["make_projector", "PROJECTORS"]

PROJECTORS = ("conv1x1", "bottleneck", None)


def _channels(value, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {value!r}")
    return value


def make_projector(kind: Optional[str], student_channels: int, teacher_channels: int, hidden_channels: int = 256,
                   fn: str = "make_projector") -> nn.Module:
    """Build a projector [N, student_channels, H, W] -> [N, teacher_channels, H, W] (see the module docstring).

    Args:
        kind: ``"conv1x1"``, ``"bottleneck"`` or ``None``.
        student_channels, teacher_channels: channel counts Cs, Ct.
        hidden_channels: bottleneck width h (default 256, as published).
        fn: name used in error messages.
    """
    cs = _channels(student_channels, "student_channels", fn)
    ct = _channels(teacher_channels, "teacher_channels", fn)
    if kind == "conv1x1":
        return nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1), nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
    if kind == "bottleneck":
        h = _channels(hidden_channels, "hidden_channels", fn)
        return nn.Sequential(nn.Conv2d(cs, h, kernel_size=1), nn.Conv2d(h, h, kernel_size=3, padding=1),
                             nn.Conv2d(h, ct, kernel_size=1), nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
    if kind is None:
        if cs != ct:
            raise ValueError(f"{fn}: `projector=None` needs student_channels == teacher_channels, got {cs} and {ct}")
        return nn.Identity()
    raise ValueError(f"{fn}: `projector` must be one of {PROJECTORS}, got {kind!r}")
