"""Argument checks shared by the losses: shapes, dtypes and devices always (host-side, free); tensor values
(non-finite logits, targets out of range) on CPU always and on CUDA only when asked, since reading them
synchronises with the device (docs/design.md section 2). Value checks are skipped while torch.compile traces."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..ops import _values_check_requested, as_int, as_real


def values_check_wanted(t: Tensor, check_values: Optional[bool]) -> bool:
    """True when the value checks should run for tensors on t's device."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return check_values is None or bool(check_values)
    return _values_check_requested(check_values)


def check_number(value, name: str, fn: str, *, positive: bool = False, nonneg: bool = False) -> float:
    """A finite Python number (optionally > 0 or >= 0), returned as float. While torch.compile traces, the value
    may be symbolic (dynamo makes a float that changes between calls, e.g. a scheduled loss weight, a SymFloat)
    and is returned unchecked: it was checked when the eager code (or the module's setter) last saw it."""
    if torch.compiler.is_compiling():
        return value
    try:  # Python, NumPy and 0-d tensor scalars
        value = as_real(value, name, fn)
    except ValueError:
        raise ValueError(f"{fn}: `{name}` must be a finite real number (Python/NumPy scalar or 0-d tensor), got "
                         f"{type(value).__name__} {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{fn}: `{name}` must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{fn}: `{name}` must be > 0, got {value!r}")
    if nonneg and not value >= 0:
        raise ValueError(f"{fn}: `{name}` must be >= 0, got {value!r}")
    return float(value)


def check_int(value, name: str, fn: str, minimum: int = 1) -> int:
    try:  # Python, NumPy and 0-d integer tensor scalars
        v = as_int(value, name, fn)
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise ValueError(f"{fn}: `{name}` must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    return v


def check_logits(student: Tensor, teacher: Tensor, fn: str, min_classes: int = 1) -> tuple[int, int]:
    """student/teacher logits: floating [B, C] tensors of one shape on one device. Returns (B, C)."""
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor [B, C], got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: `{name}` must be 2-D [B, C], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: `{name}` must be floating point, got {t.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"{fn}: `student_logits` {list(student.shape)} and `teacher_logits` "
                         f"{list(teacher.shape)} must have the same shape [B, C]")
    if student.device != teacher.device:
        raise ValueError(f"{fn}: `teacher_logits` is on {teacher.device} but `student_logits` is on {student.device}")
    B, C = student.shape
    if B == 0:
        raise ValueError(f"{fn}: empty batch (`student_logits` has shape {list(student.shape)})")
    if C < min_classes:
        raise ValueError(f"{fn}: needs at least {min_classes} classes, `student_logits` has shape {list(student.shape)}")
    return B, C


def check_logit_values(student: Tensor, teacher: Tensor, fn: str) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: `{name}` contains non-finite values (inf or nan)")


def check_target(target: Tensor, B: int, C: int, device: torch.device, fn: str) -> None:
    """target: integer class indices [B], or [B, C] scores/one-hot rows (their argmax is used, as published)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: `target` must be a torch.Tensor of class indices [B], got {type(target).__name__}")
    if target.dim() == 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"{fn}: `target` [B] must hold integer class indices, got {target.dtype} "
                            "(pass [B, C] rows for soft/one-hot labels)")
        if target.shape[0] != B:
            raise ValueError(f"{fn}: `target` has {target.shape[0]} entries but the batch has {B} rows")
    elif target.dim() == 2:
        if list(target.shape) != [B, C]:
            raise ValueError(f"{fn}: 2-D `target` must be [B, C] = {[B, C]} (soft/one-hot labels), "
                             f"got {list(target.shape)}")
    else:
        raise ValueError(f"{fn}: `target` must be [B] class indices or [B, C] label rows, got shape "
                         f"{list(target.shape)}")
    if target.device != device:
        raise ValueError(f"{fn}: `target` is on {target.device} but the logits are on {device}")


def check_target_values(target: Tensor, C: int, fn: str) -> None:
    if target.dim() == 1 and target.numel() > 0:
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"{fn}: `target` holds class indices in [{lo}, {hi}], outside [0, {C - 1}]")
    elif target.dim() == 2 and target.is_floating_point() and not bool(torch.isfinite(target).all()):
        raise ValueError(f"{fn}: `target` contains non-finite values (inf or nan)")


def target_index(target: Tensor) -> Tensor:
    """[B] int64 class indices (argmax of [B, C] rows, as the published code does)."""
    if target.dim() == 2:
        return target.argmax(1)
    return target.long()


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
