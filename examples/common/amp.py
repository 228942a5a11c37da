"""Mixed precision helpers: autocast context and the fp16 grad scaler."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "make_grad_scaler", "AMP_MODES"]

AMP_MODES = ("none", "bf16", "fp16")


def _check(amp: str, fn: str) -> None:
    if amp not in AMP_MODES:
        raise ValueError(f"{fn}: `amp` must be one of {AMP_MODES}, got {amp!r}")


def autocast(device: torch.device, amp: str):
    """``torch.autocast(device.type, dtype)`` for amp 'bf16' / 'fp16', a ``nullcontext`` for 'none'."""
    _check(amp, "autocast")
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    _check(amp, "make_grad_scaler")
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "fp16"))
