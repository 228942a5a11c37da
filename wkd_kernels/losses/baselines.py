"""Baseline distillation losses for comparison runs: KD, DKD, NKD (logits) and FitNet (features).

Each equals the published formulation (mdistiller's KD/DKD/FitNet, the NKD authors' code), written to be
numerically safe: log-probabilities come from log_softmax / logsumexp (never log(softmax)), classes are removed
by masking to -inf rather than by subtracting 1000. Half-precision logits are computed in float32, float64 stays
float64; teacher inputs are detached. All logit losses return a scalar averaged over the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.checks import (check_logit_values, check_logits, check_number, check_target, check_target_values,
                      compute_dtype, target_index, loss_values_check_wanted)
from .logit import target_term
from .projectors import make_projector

__all__ = ["kd_loss", "KDLoss", "dkd_loss", "DKDLoss", "nkd_loss", "NKDLoss", "fitnet_loss", "FitNetLoss"]


def _prep(student_logits, teacher_logits, fn, check_values, target=None, min_classes=1, tau=None):
    B, C = check_logits(student_logits, teacher_logits, fn, min_classes=min_classes)
    if target is not None:
        check_target(target, B, C, student_logits.device, fn)
    dt = compute_dtype(student_logits)
    if loss_values_check_wanted(student_logits, check_values, fn):
        check_logit_values(student_logits, teacher_logits, fn)
        if target is not None:
            check_target_values(target, C, fn)
        if tau is not None:  # logits / temperature beyond the dtype's range: NaN losses otherwise
            for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
                if not bool(torch.isfinite(t.detach().to(dt) / tau).all()):
                    raise ValueError(f"{fn}: `{name}` / `temperature` (temperature = {tau}) overflows {dt}")
    return student_logits.to(dt), teacher_logits.detach().to(dt)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_j p_j (log p_j - log q_j) per row, with 0 log 0 = 0 (entries where p = 0 contribute nothing)."""
    p = log_p.exp()
    term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return term.sum(1)


# ---------------------------------------------------------------------------------------------------- KD
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, *,
            check_values: Optional[bool] = None) -> Tensor:
    """Hinton KD: tau^2 * mean_b KL(softmax(t_b / tau) || softmax(s_b / tau)).

    Args:
        student_logits, teacher_logits: [B, C] logits (teacher detached).
        temperature: tau > 0.
        check_values: as in ``wkd_logit_loss`` (finite logits; CPU always, CUDA on request).

    Returns:
        Scalar, float32 (float64 for float64 logits).
    """
    fn = "kd_loss"
    tau = check_number(temperature, "temperature", fn, positive=True)
    s, t = _prep(student_logits, teacher_logits, fn, check_values, tau=tau)
    return _kl_rows(F.log_softmax(t / tau, 1), F.log_softmax(s / tau, 1)).mean() * (tau * tau)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature)(student_logits [B, C], teacher_logits [B, C])``."""

    def __init__(self, temperature: float = 4.0, *, check_values: Optional[bool] = None):
        super().__init__()
        self.temperature = check_number(temperature, "temperature", "KDLoss", positive=True)
        self.check_values = check_values

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, check_values=self.check_values)


# ---------------------------------------------------------------------------------------------------- DKD
def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, *, check_values: Optional[bool] = None) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, each scaled by tau^2 and averaged over the batch.

    TCKD = KL(b^T || b^S) between the binary (target, non-target) distributions at temperature tau;
    NCKD = KL(p^T || p^S) between the softmaxes over the non-target classes only. (DKD's warm-up factor
    min(epoch / warmup, 1) is left to the caller.) Defaults (alpha 1, beta 8, temperature 4) are mdistiller's
    (``mdistiller/engine/cfg.py``), its CIFAR-100 setting. Its ImageNet configs keep alpha = 1 and set
    temperature 1 with beta 0.5 for ResNet34 -> ResNet18 (``configs/imagenet/r34_r18/dkd.yaml``) and beta 2.0
    for ResNet50 -> MobileNetV1 (``configs/imagenet/r50_mv1/dkd.yaml``), warm-up 1 epoch.

    Args:
        student_logits, teacher_logits: [B, C] logits, C >= 2 (teacher detached).
        target: [B] class indices in [0, C), or [B, C] label rows (argmax).
        alpha, beta: weights >= 0 of TCKD and NCKD. temperature: tau > 0.

    Returns:
        Scalar, float32 (float64 for float64 logits).
    """
    fn = "dkd_loss"
    alpha = check_number(alpha, "alpha", fn, nonneg=True)
    beta = check_number(beta, "beta", fn, nonneg=True)
    tau = check_number(temperature, "temperature", fn, positive=True)
    s, t = _prep(student_logits, teacher_logits, fn, check_values, target, min_classes=2, tau=tau)
    y = target_index(target)
    C = s.shape[1]
    removed = F.one_hot(y, C).bool()
    s, t = s / tau, t / tau
    ninf = float("-inf")
    s_rest, t_rest = s.masked_fill(removed, ninf), t.masked_fill(removed, ninf)
    lse_s, lse_t = torch.logsumexp(s, 1), torch.logsumexp(t, 1)
    # binary log-probabilities [B, 2]: (target, everything else)
    bin_s = torch.stack([s.gather(1, y[:, None]).squeeze(1) - lse_s, torch.logsumexp(s_rest, 1) - lse_s], 1)
    bin_t = torch.stack([t.gather(1, y[:, None]).squeeze(1) - lse_t, torch.logsumexp(t_rest, 1) - lse_t], 1)
    tckd = _kl_rows(bin_t, bin_s).mean()
    nckd = _kl_rows(F.log_softmax(t_rest, 1), F.log_softmax(s_rest, 1)).mean()
    return (alpha * tckd + beta * nckd) * (tau * tau)


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss`:
    ``DKDLoss(alpha, beta, temperature)(student [B, C], teacher [B, C], target)``."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *,
                 check_values: Optional[bool] = None):
        super().__init__()
        fn = "DKDLoss"
        self.alpha = check_number(alpha, "alpha", fn, nonneg=True)
        self.beta = check_number(beta, "beta", fn, nonneg=True)
        self.temperature = check_number(temperature, "temperature", fn, positive=True)
        self.check_values = check_values

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta, self.temperature,
                        check_values=self.check_values)


# ---------------------------------------------------------------------------------------------------- NKD
def nkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 1.0,
             gamma: float = 1.5, *, check_values: Optional[bool] = None) -> Tensor:
    """Normalized KD (Yang et al. 2023): L_t - gamma * tau^2 * mean_b sum_{j != y_b} q_j log p_j.

    L_t = -mean_b softmax(t)[b, y_b] * log_softmax(s)[b, y_b] (temperature 1, the same target term as WKD-L);
    p, q = softmax over the non-target classes of s / tau and t / tau. Defaults: the authors' temp=1, gamma=1.5.

    Args:
        student_logits, teacher_logits: [B, C] logits, C >= 2 (teacher detached).
        target: [B] class indices in [0, C), or [B, C] label rows (argmax).
        temperature: tau > 0. gamma: weight >= 0 of the non-target term.

    Returns:
        Scalar, float32 (float64 for float64 logits).
    """
    fn = "nkd_loss"
    tau = check_number(temperature, "temperature", fn, positive=True)
    gamma = check_number(gamma, "gamma", fn, nonneg=True)
    s, t = _prep(student_logits, teacher_logits, fn, check_values, target, min_classes=2, tau=tau)
    y = target_index(target)
    loss_t = target_term(F.log_softmax(s, 1), F.softmax(t, 1), y)
    removed = F.one_hot(y, s.shape[1]).bool()
    log_p = F.log_softmax((s / tau).masked_fill(removed, float("-inf")), 1)
    q = F.softmax((t / tau).masked_fill(removed, float("-inf")), 1)
    cross = torch.where(removed, torch.zeros_like(q), q * log_p).sum(1).mean()
    return loss_t - gamma * (tau * tau) * cross


class NKDLoss(nn.Module):
    """Module form of :func:`nkd_loss`: ``NKDLoss(temperature, gamma)(student [B, C], teacher [B, C], target)``."""

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5, *, check_values: Optional[bool] = None):
        super().__init__()
        fn = "NKDLoss"
        self.temperature = check_number(temperature, "temperature", fn, positive=True)
        self.gamma = check_number(gamma, "gamma", fn, nonneg=True)
        self.check_values = check_values

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return nkd_loss(student_logits, teacher_logits, target, self.temperature, self.gamma,
                        check_values=self.check_values)


# ---------------------------------------------------------------------------------------------------- FitNet
def fitnet_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNet hint loss: mean squared error between (projected) student and teacher features.

    Args:
        student_features: [N, C, H, W] (or any shape) student features, already projected to the teacher's
            channels (see :class:`FitNetLoss` for the projector).
        teacher_features: same shape, detached.

    Returns:
        Scalar mean over all elements of (f_s - f_t)^2, float32 for half inputs (float64 for float64).
    """
    fn = "fitnet_loss"
    for name, t in (("student_features", student_features), ("teacher_features", teacher_features)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: `{name}` must be floating point, got {t.dtype}")
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"{fn}: `student_features` {list(student_features.shape)} and `teacher_features` "
                         f"{list(teacher_features.shape)} must have the same shape (project the student first)")
    if student_features.device != teacher_features.device:
        raise ValueError(f"{fn}: `teacher_features` is on {teacher_features.device} but `student_features` is on "
                         f"{student_features.device}")
    if student_features.numel() == 0:
        raise ValueError(f"{fn}: empty features (shape {list(student_features.shape)})")
    dt = compute_dtype(student_features)
    return F.mse_loss(student_features.to(dt), teacher_features.detach().to(dt))


class FitNetLoss(nn.Module):
    """FitNet: MSE between projector(student feature map) and the teacher feature map.

    Args:
        student_channels, teacher_channels: channel counts of the two [N, C, H, W] feature maps (same H, W).
        projector: ``"conv1x1"`` (1x1 conv + BN + ReLU, default), ``"bottleneck"`` (1x1 -> 3x3 -> 1x1 conv with
            ``hidden_channels`` then BN + ReLU) or ``None`` (identity; channel counts must match). The same
            projectors as WKD-F (see ``make_projector``); their parameters belong to this module, so add
            ``loss.parameters()`` to the optimiser.
        hidden_channels: width of the bottleneck (default 256, as published).

    Shapes:
        forward(f_s [N, Cs, H, W], f_t [N, Ct, H, W]) -> scalar.
    """

    def __init__(self, student_channels: int, teacher_channels: int, projector: Optional[str] = "conv1x1",
                 hidden_channels: int = 256):
        super().__init__()
        self.projector = make_projector(projector, student_channels, teacher_channels, hidden_channels,
                                        fn="FitNetLoss")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        fn = "FitNetLoss"
        for name, t, c in (("student_features", student_features, self.student_channels),
                           ("teacher_features", teacher_features, self.teacher_channels)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: `{name}` must be a torch.Tensor [N, C, H, W], got {type(t).__name__}")
            if t.dim() != 4 or t.shape[1] != c:
                raise ValueError(f"{fn}: `{name}` must be [N, {c}, H, W], got shape {list(t.shape)}")
        if student_features.shape[0] != teacher_features.shape[0] or \
                student_features.shape[2:] != teacher_features.shape[2:]:
            raise ValueError(f"{fn}: `student_features` {list(student_features.shape)} and `teacher_features` "
                             f"{list(teacher_features.shape)} must share N, H and W")
        return fitnet_loss(self.projector(student_features), teacher_features)
