"""Feature projectors mapping a student feature map to the teacher's channels (WKD-F and FitNet).

As in the published WKD / mdistiller code (ConvReg, ConvRegBottleNeck):
  * ``"conv1x1"``:        Conv2d(Cs -> Ct, 1x1) -> BatchNorm2d(Ct) -> ReLU
  * ``"conv1x1_linear"``: Conv2d(Cs -> Ct, 1x1) -> BatchNorm2d(Ct)   (no ReLU: for signed teacher features, e.g.
                          FPN / RoIAlign outputs in detection, which a non-negative output could never match)
  * ``"bottleneck"``:     Conv2d(Cs -> h, 1x1) -> Conv2d(h -> h, 3x3, padding 1) -> Conv2d(h -> Ct, 1x1)
                          -> BatchNorm2d(Ct) -> ReLU   (h = 256; no normalisation between the convolutions)
  * ``"convreg"``:        the published ConvReg, which also changes the spatial size from the student's
                          Hs x Ws to the teacher's Ht x Wt (``student_size`` / ``teacher_size`` are required):
                            Hs == 2 Ht:  Conv2d(Cs -> Ct, 3x3, stride 2, padding 1)
                            2 Hs == Ht:  ConvTranspose2d(Cs -> Ct, 4x4, stride 2, padding 1)
                            Hs >= Ht:    Conv2d(Cs -> Ct, (1 + Hs - Ht) x (1 + Ws - Wt)), no padding (a "valid"
                                         conv; 1x1 for equal sizes, i.e. ``"conv1x1"``)
                          then BatchNorm2d(Ct) -> ReLU. A student map smaller than the teacher's by another factor
                          is an error, as in the published code.
  * ``None``:             identity (Cs must equal Ct)
  * an ``nn.Module``:     used as is (e.g. ``make_projector("convreg", ...)`` built with the sizes, handed to a loss
                          whose constructor takes a projector kind: ``WKDFeatureLoss(..., projector=module)``).
Every kind but ``"convreg"`` preserves the spatial size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn

__all__ = ["make_projector", "PROJECTORS", "ConvReg"]

PROJECTORS = ("conv1x1", "conv1x1_linear", "bottleneck", "convreg", None)


def _channels(value, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {value!r}")
    return value


def _size(value, name: str, fn: str) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: `{name}` must be (H, W) or an int, got {value!r}") from None
    return _channels(h, f"{name}[0]", fn), _channels(w, f"{name}[1]", fn)


class ConvReg(nn.Sequential):
    """The published WKD-F / FitNet projector (mdistiller's ``ConvReg``): conv (see the module docstring for the
    three spatial cases), BatchNorm2d, ReLU. [N, Cs, Hs, Ws] -> [N, Ct, Ht, Wt]."""

    def __init__(self, student_channels: int, teacher_channels: int, student_size: Sequence[int],
                 teacher_size: Sequence[int], fn: str = "ConvReg"):
        cs = _channels(student_channels, "student_channels", fn)
        ct = _channels(teacher_channels, "teacher_channels", fn)
        (hs, ws), (ht, wt) = _size(student_size, "student_size", fn), _size(teacher_size, "teacher_size", fn)
        if hs == 2 * ht and ws == 2 * wt:
            conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"{fn}: the student map {hs} x {ws} is smaller than the teacher's {ht} x {wt} by a "
                             f"factor other than 2 (the published ConvReg handles 2x larger, 2x smaller, or larger)")
        super().__init__(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
        self.student_size, self.teacher_size = (hs, ws), (ht, wt)


def make_projector(kind: Union[str, None, nn.Module], student_channels: int, teacher_channels: int,
                   hidden_channels: int = 256, fn: str = "make_projector", *,
                   student_size: Optional[Sequence[int]] = None,
                   teacher_size: Optional[Sequence[int]] = None) -> nn.Module:
    """Build a projector [N, student_channels, Hs, Ws] -> [N, teacher_channels, Ht, Wt] (module docstring).

    Args:
        kind: ``"conv1x1"``, ``"conv1x1_linear"``, ``"bottleneck"``, ``"convreg"``, ``None``, or a module (returned
            unchanged).
        student_channels, teacher_channels: channel counts Cs, Ct.
        hidden_channels: bottleneck width h (default 256, as published).
        fn: name used in error messages.
        student_size, teacher_size: (H, W) of the student / teacher maps; required by ``"convreg"`` (the other kinds
            keep the size and ignore them).
    """
    if isinstance(kind, nn.Module):
        return kind
    cs = _channels(student_channels, "student_channels", fn)
    ct = _channels(teacher_channels, "teacher_channels", fn)
    if kind == "conv1x1":
        return nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1), nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
    if kind == "conv1x1_linear":
        return nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1), nn.BatchNorm2d(ct))
    if kind == "bottleneck":
        h = _channels(hidden_channels, "hidden_channels", fn)
        return nn.Sequential(nn.Conv2d(cs, h, kernel_size=1), nn.Conv2d(h, h, kernel_size=3, padding=1),
                             nn.Conv2d(h, ct, kernel_size=1), nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
    if kind == "convreg":
        if student_size is None or teacher_size is None:
            raise ValueError(f"{fn}: `projector='convreg'` needs `student_size` and `teacher_size` (H, W)")
        return ConvReg(cs, ct, student_size, teacher_size, fn=fn)
    if kind is None:
        if cs != ct:
            raise ValueError(f"{fn}: `projector=None` needs student_channels == teacher_channels, got {cs} and {ct}")
        return nn.Identity()
    raise ValueError(f"{fn}: `projector` must be one of {PROJECTORS} or an nn.Module, got {kind!r}")
