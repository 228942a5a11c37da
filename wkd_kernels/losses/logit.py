"""WKD-L: Wasserstein distance between the student's and the teacher's non-target class distributions.

The published WKD-L (per batch; teacher tensors carry no gradient):

    L_t  = - mean_b( softmax(t)[b, y_b] * log_softmax(s)[b, y_b] )              (temperature 1)
    s', t' = s, t with column y_b removed per row;  c'_b = cost with row and column y_b removed
    p = softmax(s'/tau),  q = softmax(t'/tau)   (float32);   c'_b <- relu(c'_b) + 1e-8
    K_b = exp(-c'_b/reg);  u = 1/(C-1);  repeat num_iters: v = q/(K_b^T u + 1e-8); u = p/(K_b v + 1e-8)
    WD_b = sum_ij u_i K_b,ij v_j c'_b,ij;      loss = L_t + weight * mean_b WD_b

Here nothing per sample is gathered: p and q are softmaxes over all C classes with the target logit masked to
-inf (so p_y = q_y = 0 and the other entries equal the (C-1)-class softmaxes exactly), and
``wkd_kernels.sinkhorn`` runs on the one shared C x C cost relu(c) + 1e-8 with eps = 1e-8. A zero-mass class
drops out of every Sinkhorn iteration (u_y = v_y = 0 from the start), so the iterates on the other classes are
those of the (C-1)-class problem and WD_b equals the published number (docs/design.md section 3). The gradient is the
exact gradient of the fixed-iteration computation (what autograd through the published loop gives), computed by
the op without storing any B x C x C tensor.

One documented difference: the published code starts from u = 1/(C-1) on every non-target class, the op from
1/|supp p| on the classes where p > 0. They differ only when a student probability underflows to exactly 0 in
float32 (non-target logit gaps above ~87 * tau), where the published first half-iteration still counts that
class.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import settings
from ..ops.checks import as_bool, as_log_domain, auto_log_domain
from ..ops.common import resolve_backend
from ..ops.sinkhorn import GibbsKernel, gibbs_kernel, sinkhorn
from ..ops.checks import (check_int, check_logit_values, check_logits, check_number, check_target, check_target_values,
                      compute_dtype, target_index, loss_values_check_wanted)

__all__ = ["WKDLogitLoss", "wkd_logit_loss", "prepare_wkd_cost", "target_term"]

COST_FLOOR = 1e-8  # c <- relu(c) + 1e-8, as published
SINKHORN_EPS = 1e-8  # added to the Sinkhorn denominators, as published


def prepare_wkd_cost(cost: Tensor, num_classes: Optional[int] = None, fn: str = "prepare_wkd_cost",
                     check_values: bool = True) -> Tensor:
    """relu(cost) + 1e-8 (the published preprocessing) after checking that cost is a [C, C] float matrix.

    Args:
        cost: [C, C] class-to-class cost (e.g. ``sharpen(cka_distance(...), kappa)``), unitless; row i is the
            student's class i, column j the teacher's class j. Half precision is promoted to float32.
        num_classes: expected C (the number of logits), or None to accept any square size.
        check_values: reject non-finite entries (reads the values; cheap on CPU, synchronises on CUDA).

    Returns:
        [C, C] float32 (float64 for float64 input) tensor, detached, on the device of ``cost``.
    """
    if not isinstance(cost, Tensor):
        raise TypeError(f"{fn}: `cost` must be a torch.Tensor [C, C], got {type(cost).__name__}")
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"{fn}: `cost` must be a square [C, C] matrix, got shape {list(cost.shape)}")
    if num_classes is not None and cost.shape[0] != num_classes:
        raise ValueError(f"{fn}: `cost` is {list(cost.shape)} but the logits have C = {num_classes} classes; "
                         f"it must be [{num_classes}, {num_classes}]")
    if cost.shape[0] < 2:
        raise ValueError(f"{fn}: WKD-L needs at least 2 classes (one is removed), `cost` has shape "
                         f"{list(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"{fn}: `cost` must be floating point, got {cost.dtype}")
    if as_bool(check_values, "check_values", fn) and not bool(torch.isfinite(cost).all()):
        raise ValueError(f"{fn}: `cost` contains non-finite values (inf or nan)")
    c = cost.detach()
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    return F.relu(c) + COST_FLOOR


def target_term(log_p_student: Tensor, p_teacher: Tensor, y: Tensor) -> Tensor:
    """L_t = -mean_b( p_teacher[b, y_b] * log_p_student[b, y_b] ) (NKD's and WKD-L's target term); scalar."""
    idx = y.unsqueeze(1)
    return -(p_teacher.gather(1, idx).detach() * log_p_student.gather(1, idx)).mean()


def _wkd_logit_loss(s: Tensor, t: Tensor, target: Tensor, cost: Tensor, temperature: float, weight: float,
                    reg: float, num_iters: int, grad: str, log_domain: bool, check_values: Optional[bool],
                    fn: str, backend: Optional[str] = None, precision: Optional[str] = None,
                    kernel: Optional[GibbsKernel] = None) -> Tensor:
    """Core of WKD-L on checked arguments; ``cost`` is already relu(cost) + 1e-8; ``kernel``: its Gibbs kernel in the
    compute dtype, or None."""
    B, C = s.shape
    if loss_values_check_wanted(s, check_values, fn):
        check_logit_values(s, t, fn)
        check_target_values(target, C, fn)
    dt = compute_dtype(s)
    s = s.to(dt)
    t = t.detach().to(dt)
    y = target_index(target)
    if cost.dtype != dt:
        cost = cost.to(dt)

    loss_t = target_term(F.log_softmax(s, dim=1), F.softmax(t, dim=1), y)

    removed = F.one_hot(y, C).bool()
    p = F.softmax((s / temperature).masked_fill(removed, float("-inf")), dim=1)
    q = F.softmax((t / temperature).masked_fill(removed, float("-inf")), dim=1)
    if loss_values_check_wanted(s, check_values, fn):  # name the user's arguments, not the op's internal `a` / `b`
        for name, d in (("student_logits", p), ("teacher_logits", q)):
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"{fn}: softmax(`{name}` / `temperature`) is not finite: `{name}` / `temperature` "
                                 f"(temperature = {temperature}) overflows {dt}")
    with torch.autocast(device_type=s.device.type, enabled=False):
        wd = sinkhorn(p, q, cost, reg, num_iters, eps=SINKHORN_EPS, grad=grad, log_domain=log_domain,
                      backend=backend, precision=precision, check_values=False, kernel=kernel).value
    return loss_t + weight * wd.mean()


def _check_common(student_logits, teacher_logits, target, temperature, weight, reg, num_iters, grad, fn):
    B, C = check_logits(student_logits, teacher_logits, fn, min_classes=2)
    check_target(target, B, C, student_logits.device, fn)
    temperature = check_number(temperature, "temperature", fn, positive=True)
    weight = check_number(weight, "weight", fn, nonneg=True)
    reg = check_number(reg, "reg", fn, positive=True)
    num_iters = check_int(num_iters, "num_iters", fn)
    if grad not in ("exact", "envelope"):
        raise ValueError(f"{fn}: `grad` must be 'exact' or 'envelope', got {grad!r}")
    return B, C, temperature, weight, reg, num_iters


def wkd_logit_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, cost: Tensor,
                   temperature: float, weight: float, reg: float = 0.05, num_iters: int = 10, *,
                   grad: str = "exact", log_domain: Union[bool, str] = False, backend: Optional[str] = None,
                   precision: Optional[str] = None, check_values: Optional[bool] = None) -> Tensor:
    """WKD-L loss, functional form (see :class:`WKDLogitLoss`; this one preprocesses ``cost`` on every call).

    Args:
        student_logits: [B, C] float32/float64/float16/bfloat16 logits (differentiable).
        teacher_logits: [B, C] logits, same device; treated as constants (detached).
        target: [B] integer class indices in [0, C), or [B, C] label rows (their argmax is used, as published).
        cost: [C, C] class cost, unitless (e.g. ``interrelations.sharpen(d, kappa)``), same device; the loss
            applies relu(cost) + 1e-8. Row i: student class i; column j: teacher class j.
        temperature: tau > 0 of the non-target softmaxes (the target term uses temperature 1).
        weight: gamma >= 0, the factor of the Wasserstein term (see ``cosine_weight`` for the schedule).
        reg: entropic regularisation lambda > 0 in cost units (published default 0.05).
        num_iters: Sinkhorn iterations >= 1 (published default 10).
        grad: ``"exact"`` (default, what autograd through the published loop gives) or ``"envelope"``.
        log_domain: log-domain Sinkhorn, for reg small enough that exp(-cost/reg) underflows; ``"auto"``: the log
            domain exactly when max(cost) / reg > -log(tiny) of the compute dtype (float32: 87.3, float64: 708.4),
            see ``wkd_kernels.sinkhorn`` (it reads max(cost): a synchronisation per call on CUDA; the module
            decides once per cost). On CPU an underflowing K in the scaling domain raises a clear error.
        backend, precision: the Sinkhorn kernels (``"auto"``, ``"cpu"``, ``"triton"``, ``"cuda"``) and the float32
            product precision of the Triton ones (``"ieee"``, ``"tf32x3"``, ``"tf32"``), see
            ``wkd_kernels.sinkhorn``; None: the settings (``wkd_kernels.settings``).
        check_values: check logits are finite and targets in range (always on CPU unless False; on CUDA only
            when True or the ``check_values`` setting says so, as it synchronises). Skipped under torch.compile.

    Returns:
        Scalar loss L_t + weight * mean_b WD_b, float32 (float64 for float64 logits).
    """
    fn = "wkd_logit_loss"
    B, C, temperature, weight, reg, num_iters = _check_common(student_logits, teacher_logits, target, temperature,
                                                              weight, reg, num_iters, grad, fn)
    log_domain = as_log_domain(log_domain, fn)
    if not isinstance(cost, Tensor):
        raise TypeError(f"{fn}: `cost` must be a torch.Tensor [C, C], got {type(cost).__name__}")
    if cost.device != student_logits.device:
        raise ValueError(f"{fn}: `cost` is on {cost.device} but the logits are on {student_logits.device}")
    cost = prepare_wkd_cost(cost, C, fn, check_values=loss_values_check_wanted(cost, check_values, fn))
    return _wkd_logit_loss(student_logits, teacher_logits, target, cost, temperature, weight, reg, num_iters, grad,
                           log_domain, check_values, fn, backend, precision)


class WKDLogitLoss(nn.Module):
    """WKD-L: target term + weight * entropic Wasserstein distance between non-target class distributions.

    Equals the published WKD-L (module docstring) but runs ``wkd_kernels.sinkhorn`` on one shared C x C cost,
    with the target class given zero mass, instead of gathering a (C-1) x (C-1) matrix per sample.

    Args:
        cost: [C, C] class cost, unitless (e.g. ``sharpen(cka_distance(feats), kappa)`` or a released matrix
            sharpened); stored once as the non-persistent buffer ``cost`` = relu(cost) + 1e-8 (float32, or
            float64 when given float64), so ``.to(device)`` moves it and checkpoints do not carry it. Its Gibbs
            kernel K = exp(-cost / reg) and K∘cost is computed once and kept in ``gibbs_cache`` for the ``cpu`` and
            ``torch`` backends in the scaling domain with the exact gradient (see :meth:`gibbs_kernel_for`).
        temperature: tau > 0 of the non-target softmaxes.
        weight: gamma >= 0 of the Wasserstein term; a plain attribute, update it per epoch with ``cosine_weight``.
        reg: entropic regularisation lambda > 0 (default 0.05, as published).
        num_iters: Sinkhorn iterations (default 10, as published).
        grad, backend, precision, check_values: as in :func:`wkd_logit_loss` (None: the settings at call time).
        log_domain: ``"auto"`` (default): the log domain exactly when K = exp(-cost / reg) would have an entry
            below the normal range of the compute dtype, max(cost) / reg > -log(tiny) (float32: 87.3, float64:
            708.4; max(cost) is read once, here), the faster scaling domain otherwise (always, with the published
            reg = 0.05 and a cost in [0, 1]); or ``True`` / ``False`` to force one.

    Shapes:
        forward(student_logits [B, C], teacher_logits [B, C], target [B] or [B, C]) -> scalar loss.
    """

    def __init__(self, cost: Tensor, temperature: float, weight: float, reg: float = 0.05, num_iters: int = 10, *,
                 grad: str = "exact", log_domain: Union[bool, str] = "auto", backend: Optional[str] = None,
                 precision: Optional[str] = None, check_values: Optional[bool] = None):
        super().__init__()
        fn = "WKDLogitLoss"
        self.register_buffer("cost", prepare_wkd_cost(cost, None, fn, check_values=True), persistent=False)
        # (key, GibbsKernel): K = exp(-cost / reg) and K∘cost, built on first use and rebuilt when the key changes
        # (see gibbs_kernel_for); a plain attribute, so not in state_dict and not moved by .to()
        self.gibbs_cache = None
        self._cost_max = float(self.cost.max())  # for log_domain="auto" (the cost is fixed)
        self.temperature = check_number(temperature, "temperature", fn, positive=True)
        self.weight = weight  # checked by the setter
        self.reg = check_number(reg, "reg", fn, positive=True)
        self.num_iters = check_int(num_iters, "num_iters", fn)
        if grad not in ("exact", "envelope"):
            raise ValueError(f"{fn}: `grad` must be 'exact' or 'envelope', got {grad!r}")
        self.grad, self.log_domain, self.check_values = grad, as_log_domain(log_domain, fn), check_values
        self.backend = backend
        self.precision = None if precision is None else settings.resolve_precision(precision, "sinkhorn", fn)

    @property
    def weight(self) -> float:
        """gamma >= 0, the factor of the Wasserstein term (set it per epoch, e.g. with ``cosine_weight``)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_number(value, "weight", "WKDLogitLoss", nonneg=True)

    @property
    def num_classes(self) -> int:
        return self.cost.shape[0]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, temperature={self.temperature}, weight={self.weight}, "
                f"reg={self.reg}, num_iters={self.num_iters}, grad={self.grad!r}, log_domain={self.log_domain!r}")

    def gibbs_kernel_for(self, dtype: torch.dtype) -> GibbsKernel:
        """K = exp(-cost / reg) and K∘cost of the ``cost`` buffer in ``dtype``, computed once and kept in
        ``self.gibbs_cache`` under the key (cost's storage, device, in-place version ``cost._version``, dtype, reg):
        ``.to(device / dtype)`` (a new buffer), an in-place change of ``cost`` or a new ``reg`` builds it again.
        The K range check runs when it is built (on CPU, or where the ``check_values`` argument / setting asks)."""
        cost = self.cost
        key = (cost.data_ptr(), cost.device, cost._version, dtype, self.reg)
        if self.gibbs_cache is None or self.gibbs_cache[0] != key:
            self.gibbs_cache = None  # the old kernel's memory goes first
            c = cost if cost.dtype == dtype else cost.to(dtype)
            self.gibbs_cache = (key, gibbs_kernel(c, self.reg, check_values=self.check_values))
        return self.gibbs_cache[1]

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        fn = "WKDLogitLoss"
        B, C, temperature, weight, reg, num_iters = _check_common(
            student_logits, teacher_logits, target, self.temperature, self.weight, self.reg, self.num_iters,
            self.grad, fn)
        if C != self.num_classes:
            raise ValueError(f"{fn}: the logits have C = {C} classes but `cost` is "
                             f"[{self.num_classes}, {self.num_classes}]")
        if self.cost.device != student_logits.device:
            raise ValueError(f"{fn}: `cost` is on {self.cost.device} but the logits are on "
                             f"{student_logits.device}; move the loss with .to(device)")
        log_domain = self.log_domain
        if log_domain == "auto":
            log_domain = auto_log_domain(self._cost_max, reg, compute_dtype(student_logits))
        kernel = None  # the Gibbs kernel cache: where sinkhorn uses it (the scaling domain, exact gradient, the
        # cpu and torch backends), and not while torch.compile traces (the graph computes K itself)
        if not log_domain and self.grad == "exact" and not torch.compiler.is_compiling():
            precision = settings.resolve_precision(self.precision, "sinkhorn", fn)
            kind = resolve_backend(self.backend, student_logits, fn, has_cuda_cpp=True, precision=precision)
            if kind in ("cpu", "torch"):
                kernel = self.gibbs_kernel_for(compute_dtype(student_logits))
        return _wkd_logit_loss(student_logits, teacher_logits, target, self.cost, temperature, weight, reg,
                               num_iters, self.grad, log_domain, self.check_values, fn, self.backend, self.precision,
                               kernel)
