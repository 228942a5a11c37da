"""The one argument validator of the package: used by the public wrappers, the fake kernels and the losses.

Two kinds of checks (docs/design.md section 2):

* argument checks (shapes, dtypes, devices, scalars): free, run on every call before any kernel, also while
  ``torch.compile`` traces (they read only metadata). The C++ kernels repeat them in ``csrc/*_common.h`` with the
  same messages, because ``torch.ops.wkd.*`` can be called directly; the Triton launchers never check.
* value checks (non-finite entries, negative masses, empty rows, PSD-ness, underflow of K): they read the data, a
  synchronisation on a GPU. Always on CPU tensors (in C++), on CUDA tensors only when requested
  (:func:`values_check_requested`: the ``check_values`` argument, else the setting, see
  :mod:`wkd_kernels.settings`), and never while compiling.

Every message names the op and the argument. Scalars may be Python, NumPy or 0-d tensor scalars.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import settings

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float64)
METHODS = ("newton_schulz", "eigh")


def values_check_requested(check_values: Optional[bool], backend: str,
                           device: Optional[torch.device] = None, op: str = "wkd") -> bool:
    """Whether Python runs the value checks before a ``backend`` kernel ("cpu", "torch", "triton" or "cuda"): never
    for "cpu" (the C++ CPU kernels always check, in C++) and never while ``torch.compile`` traces; for "torch" on CPU
    tensors (``device``) unless ``check_values`` is False (no synchronisation there, as the C++ kernels); for the
    GPU kernels when ``check_values`` (None: the setting, see :mod:`wkd_kernels.settings`) asks for them. A
    ``check_values`` that is neither None nor a bool is a TypeError on every backend (a string such as "no" would
    otherwise read as true)."""
    if check_values is not None:
        check_values = as_bool(check_values, "check_values", op)
    if backend == "cpu" or torch.compiler.is_compiling():
        return False
    if check_values is None:
        if backend == "torch" and device is not None and torch.device(device).type == "cpu":
            return True
        return settings.current().check_values
    return check_values


# ----------------------------------------------------------------------------------------------------------
# Scalar arguments: Python, NumPy and 0-d tensor scalars are accepted and converted; anything else is named
# ----------------------------------------------------------------------------------------------------------
def as_real(value, name: str, op: str) -> float:
    """``value`` as a Python float: int, float, NumPy scalars and 0-d real tensors are accepted (not bool)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{op}: `{name}` must be a real number (a Python/NumPy scalar or a 0-d tensor), got a "
                            f"tensor of shape {list(value.shape)} and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: `{name}` must be a real number (a Python/NumPy scalar or a 0-d tensor), got "
                        f"{type(value).__name__} {value!r}")
    return float(value)


def as_int(value, name: str, op: str) -> int:
    """``value`` as a Python int: int, NumPy integers and 0-d integer tensors (not bool, not floats)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{op}: `{name}` must be an integer (a Python/NumPy integer or a 0-d integer tensor), "
                             f"got a tensor of shape {list(value.shape)} and dtype {value.dtype}")
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{op}: `{name}` must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: `{name}` must be an integer, got {type(value).__name__} {value!r}") from None


def as_log_domain(value, op: str):
    """``log_domain`` as True, False or "auto" (the Sinkhorn wrapper and the WKD-L losses accept the same values)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    try:
        return as_bool(value, "log_domain", op)
    except TypeError:
        raise TypeError(f"{op}: `log_domain` must be True, False or 'auto', got {value!r}") from None


def as_bool(value, name: str, op: str) -> bool:
    """``value`` as a bool: True/False (also NumPy bools and 0-d bool tensors); strings, numbers etc. are rejected."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{op}: `{name}` must be True or False, got {type(value).__name__} {value!r}")


def check_precision(precision, family: str, op: str) -> None:
    """``precision`` of a Triton op: one of the family's modes ("sinkhorn": ieee/tf32x3/tf32, "gaussian":
    ieee/tf32x3)."""
    choices = settings.SINKHORN_PRECISIONS if family == "sinkhorn" else settings.GAUSSIAN_PRECISIONS
    if precision not in choices:
        raise ValueError(f"{op}: `precision` must be one of {choices}, got {precision!r}")


def as_choice(value, choices, name: str, op: str) -> str:
    """``value`` if it is one of ``choices`` (strings), else a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: `{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Sinkhorn (the contract: the schema comment in csrc/ops.cpp)
# ----------------------------------------------------------------------------------------------------------
def check_sinkhorn_args(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, eps: float,
                        op: str = "wkd.sinkhorn", allow_half: bool = False) -> bool:
    """Validate shapes, dtypes, devices and scalars; return True when ``cost`` is shared ([n, m])."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or not isinstance(cost, Tensor):
        raise TypeError(f"{op}: `a`, `b` and `cost` must be tensors")
    if a.dim() != 2:
        raise ValueError(f"{op}: `a` must be 2-D [B, n], got shape {list(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"{op}: `b` must be 2-D [B, m], got shape {list(b.shape)}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"{op}: `cost` must be [n, m] (shared by the batch) or [B, n, m], got shape "
                         f"{list(cost.shape)}")
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    if b.shape[0] != B:
        raise ValueError(f"{op}: batch mismatch: `a` has {B} rows but `b` has {b.shape[0]}")
    if n == 0 or m == 0:
        raise ValueError(f"{op}: `a` and `b` need at least one column, got n={n}, m={m}")
    shared = cost.dim() == 2
    want = [n, m] if shared else [B, n, m]
    if list(cost.shape) != want:
        raise ValueError(f"{op}: `cost` must be {want} to match `a` [B, n] and `b` [B, m], got {list(cost.shape)}")
    ok = (torch.float32, torch.float64) + (HALF if allow_half else ())
    if a.dtype not in ok:
        raise TypeError(f"{op}: `a` must be one of {[str(d) for d in ok]}, got {a.dtype}")
    for name, t in (("b", b), ("cost", cost)):
        if t.dtype != a.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `a` has {a.dtype}; all inputs must share "
                            "one dtype")
        if t.device != a.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `a` is on {a.device}")
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (reg > 0) or reg == float("inf"):
        raise ValueError(f"{op}: `reg` must be a finite number > 0, got {reg!r}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1, got {num_iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0) or eps == float("inf"):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps!r}")
    return shared


def _sinkhorn_values_look_valid(a: Tensor, b: Tensor, cost: Tensor) -> bool:
    """Two reductions over ``a`` and ``b``, one over ``cost``, one host read in all: every entry finite and >= 0 (a NaN
    fails both bounds) and every row of ``a`` and ``b`` with an entry > 0 (a row sum > 0). False also for empty
    inputs (the exact checks handle them)."""
    if min(a.numel(), b.numel(), cost.numel()) == 0:
        return False
    ok = None
    for t, rows in ((a, True), (b, True), (cost, False)):
        if rows:
            row_max = t.amax(1)
            t_ok = (t.amin() >= 0) & (row_max.amax() <= torch.finfo(t.dtype).max) & (row_max > 0).all()
        else:
            lo, hi = torch.aminmax(t)
            t_ok = (lo >= 0) & (hi <= torch.finfo(t.dtype).max)
        ok = t_ok if ok is None else ok & t_ok
    return bool(ok)


def check_sinkhorn_values(a: Tensor, b: Tensor, cost: Tensor, op: str = "wkd.sinkhorn") -> None:
    """Value checks (non-finite, negative, empty rows). They read the data: on a GPU they synchronise (once when the
    inputs are valid; the exact checks that name the argument and the problem run only when they are not)."""
    if _sinkhorn_values_look_valid(a, b, cost):
        return
    for name, t in (("a", a), ("b", b), ("cost", cost)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: `{name}` contains non-finite values (inf or nan)")
    for name, t in (("a", a), ("b", b)):
        if bool((t < 0).any()):
            raise ValueError(f"{op}: `{name}` must be non-negative (a probability vector per row)")
        if bool((t.sum(1) <= 0).any()):
            raise ValueError(f"{op}: every row of `{name}` needs positive mass (a row sums to 0)")
    if bool((cost < 0).any()):
        raise ValueError(f"{op}: `cost` must be non-negative")


# exp(x) underflows to 0 (below the smallest subnormal) for x < -UNDERFLOW[dtype]
_UNDERFLOW = {torch.float32: 103.0, torch.float64: 745.0}


def kernel_underflows(cost: Tensor, reg: float) -> bool:
    """True when K = exp(-cost / reg) has a row or a column that is entirely 0 in the dtype of ``cost`` (reads
    the values: a synchronisation on a GPU). The scaling iterations then divide by 0. exp(-c / reg) decreases with
    c, so a row (column) of K is 0 exactly when its entry at the row's (column's) smallest cost is: K itself is
    never formed."""
    live_rows = torch.exp(cost.amin(-1) / -reg) > 0
    live_cols = torch.exp(cost.amin(-2) / -reg) > 0
    return not bool(live_rows.all() & live_cols.all())


def check_sinkhorn_kernel_range(cost: Tensor, reg: float, log_domain: bool, op: str = "wkd.sinkhorn") -> None:
    """The CUDA counterpart of the CPU op's check (run with check_values=True): K must not underflow on a whole
    row or column in the scaling domain, -cost/reg must not overflow on one in the log domain."""
    if cost.dtype == torch.float32 and float(torch.tensor(reg, dtype=torch.float32)) == 0.0:
        raise ValueError(f"{op}: `reg` = {reg} underflows to 0 in float32 (cost / reg is computed in the dtype of the "
                         "inputs); use a larger `reg` or float64")
    if not log_domain:
        if kernel_underflows(cost, reg):
            raise ValueError(f"{op}: K = exp(-cost / reg) underflows to 0 in {cost.dtype} on a whole row or column of "
                             f"`cost` with `reg` = {reg} (it underflows where cost / reg > "
                             f"{_UNDERFLOW[cost.dtype]:.0f}): the scaling iterations would divide by 0. Use "
                             "log_domain=True, or a larger `reg`")
    else:
        # -c / reg decreases with c: a row (column) is all -inf exactly when its smallest cost gives -inf
        fin_rows, fin_cols = torch.isfinite(cost.amin(-1) / -reg), torch.isfinite(cost.amin(-2) / -reg)
        if not bool(fin_rows.all() & fin_cols.all()):
            raise ValueError(f"{op}: -cost / reg overflows to -inf in {cost.dtype} on a whole row or column of `cost` "
                             f"with `reg` = {reg} (even with log_domain=True): use a larger `reg` or rescale `cost`")


def auto_log_domain(cost_max: float, reg: float, dtype: torch.dtype) -> bool:
    """The rule of ``log_domain="auto"`` (the losses, whose cost is a fixed buffer): the log domain exactly when
    some entry of K = exp(-cost / reg) would leave the normal range of the compute dtype, i.e. when
    max(cost) / reg > -log(tiny) (float32: 87.3; float64: 708.4); the faster scaling domain otherwise."""
    return cost_max / reg > -math.log(torch.finfo(dtype).tiny)


def check_sinkhorn_backward_args(grad_value: Tensor, a: Tensor, b: Tensor, cost: Tensor, hist_r: Tensor,
                                 hist_s: Tensor, y: Tensor, reg: float, op: str = "wkd.sinkhorn_backward") -> bool:
    """The forward's checks plus the shapes of the history (keep_history=True); returns ``shared``."""
    shared = check_sinkhorn_args(a, b, cost, reg, 1, 0.0, op=op)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    if not isinstance(grad_value, Tensor) or list(grad_value.shape) != [B]:
        raise ValueError(f"{op}: `grad_value` must be [B] = [{B}], got "
                         f"{list(grad_value.shape) if isinstance(grad_value, Tensor) else type(grad_value).__name__}")
    if hist_r.dim() != 3 or hist_r.shape[0] < 1 or list(hist_r.shape[1:]) != [B, n]:
        raise ValueError(f"{op}: `hist_r` must be [num_iters, B, n] = [T, {B}, {n}] with T >= 1 (run the forward "
                         f"with keep_history=True), got {list(hist_r.shape)}")
    T = hist_r.shape[0]
    for name, t, want in (("hist_s", hist_s, [T, B, m]), ("y", y, [B, n])):
        if list(t.shape) != want:
            raise ValueError(f"{op}: `{name}` must be {want}, got {list(t.shape)}")
    for name, t in (("grad_value", grad_value), ("hist_r", hist_r), ("hist_s", hist_s), ("y", y)):
        if t.dtype != a.dtype:
            raise TypeError(f"{op}: all tensors must share the dtype of `a` ({a.dtype}), `{name}` is {t.dtype}")
        if t.device != a.device:
            raise ValueError(f"{op}: all tensors must be on the device of `a` ({a.device}), `{name}` is on "
                             f"{t.device}")
    return shared


# ----------------------------------------------------------------------------------------------------------
# Gaussian ops of WKD-F
# ----------------------------------------------------------------------------------------------------------
def cell_bounds(size: int, grid: int) -> List[Tuple[int, int]]:
    """Adaptive-pooling cells along one axis: (floor(i size / grid), ceil((i + 1) size / grid)) for i < grid."""
    return [((i * size) // grid, ((i + 1) * size + grid - 1) // grid) for i in range(grid)]


def cell_sizes(H: int, W: int, grid: int) -> List[int]:
    return [(h1 - h0) * (w1 - w0) for h0, h1 in cell_bounds(H, grid) for w0, w1 in cell_bounds(W, grid)]


def is_int(v) -> bool:
    """Python and NumPy integers (not bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_feature_stats_args(x: Tensor, grid: int, unbiased: bool, op: str = "wkd.feature_stats") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: `x` must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: `x` must be 4-D [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype not in FLOATS + HALF:
        raise TypeError(f"{op}: `x` must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: `x` needs at least one channel and one spatial position, got shape {list(x.shape)}")
    if not is_int(grid) or grid < 1:
        raise ValueError(f"{op}: `grid` must be an integer >= 1, got {grid!r}")
    unbiased = as_bool(unbiased, "unbiased", op)  # a string such as "no" would otherwise read as true
    H, W = x.shape[2], x.shape[3]
    if grid > H or grid > W:
        raise ValueError(f"{op}: `grid` ({grid}) must not exceed the spatial size H x W = {H} x {W} of `x`")
    if unbiased:
        m_min = min(cell_sizes(H, W, grid))
        if m_min < 2:
            raise ValueError(f"{op}: `unbiased` statistics need at least 2 positions per cell, but `grid`={grid} on a "
                             f"{H} x {W} map gives a cell of {m_min} position; use a smaller grid or unbiased=False")


def check_square_batch(S: Tensor, name: str, op: str) -> None:
    if not isinstance(S, Tensor):
        raise TypeError(f"{op}: `{name}` must be a tensor, got {type(S).__name__}")
    if S.dim() != 3:
        raise ValueError(f"{op}: `{name}` must be 3-D [B, n, n] (a batch of square matrices), got shape "
                         f"{list(S.shape)}")
    if S.shape[1] != S.shape[2]:
        raise ValueError(f"{op}: `{name}` must hold square matrices [B, n, n], got shape {list(S.shape)}")
    if S.shape[1] < 1:
        raise ValueError(f"{op}: `{name}` must hold matrices of size n >= 1, got shape {list(S.shape)}")
    if S.dtype not in FLOATS:
        raise TypeError(f"{op}: `{name}` must be float32 or float64, got {S.dtype} (the Python wrappers compute "
                        "float16/bfloat16 in float32)")


def check_method(method: str, op: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{op}: `method` must be 'newton_schulz' or 'eigh', got {method!r}")


def check_num_iters(num_iters: int, op: str) -> None:
    if not is_int(num_iters) or num_iters < 1:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1, got {num_iters!r}")


def check_same(t: Tensor, ref: Tensor, name: str, ref_name: str, op: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; all inputs must share "
                        "one dtype")
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")


def check_bures_args(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, op: str = "wkd.bures_wasserstein") -> None:
    for name, t in (("mu1", mu1), ("mu2", mu2), ("S2", S2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}` must be a tensor, got {type(t).__name__}")
    check_square_batch(S1, "S1", op)
    B, n = S1.shape[0], S1.shape[1]
    if list(S2.shape) != [B, n, n]:
        raise ValueError(f"{op}: `S2` must be [B, n, n] = {[B, n, n]} like `S1`, got {list(S2.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2)):
        if list(t.shape) != [B, n]:
            raise ValueError(f"{op}: `{name}` must be [B, n] = {[B, n]} to match `S1`, got {list(t.shape)}")
    check_same(S2, S1, "S2", "S1", op)
    check_same(mu1, S1, "mu1", "S1", op)
    check_same(mu2, S1, "mu2", "S1", op)


def check_nuclear_norm_args(M: Tensor, num_iters: int, op: str = "wkd.nuclear_norm") -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{op}: `M` must be a tensor, got {type(M).__name__}")
    if M.dim() != 3:
        raise ValueError(f"{op}: `M` must be 3-D [B, p, q], got shape {list(M.shape)}")
    if M.shape[1] < 1 or M.shape[2] < 1:
        raise ValueError(f"{op}: `M` must hold matrices with p, q >= 1, got shape {list(M.shape)}")
    if M.dtype not in FLOATS:
        raise TypeError(f"{op}: `M` must be float32 or float64, got {M.dtype} (the Python wrappers compute "
                        "float16/bfloat16 in float32)")
    check_num_iters(num_iters, op)


# Value checks: they read the data (a device-to-host sync on GPU). The CPU kernels always run them (in C++); on CUDA


def check_finite_values(t: Tensor, name: str, op: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: `{name}` contains non-finite values (inf or nan)")


def check_symmetric_values(S: Tensor, name: str, op: str) -> None:
    if S.numel() == 0:
        return
    scale = S.abs().amax((-1, -2))
    asym = (S - S.mT).abs().amax((-1, -2))
    if not bool((asym <= scale * 1e-4).all()):
        raise ValueError(f"{op}: `{name}` must be symmetric (|S - S^T| <= 1e-4 max|S| per matrix); the largest "
                         f"asymmetry is {float(asym.max())}")


def check_psd_values(S: Tensor, name: str, op: str) -> None:
    """The CUDA counterpart (check_values=True) of the CPU kernels' test (csrc/gaussian_common.h, check_psd):
    reject S with an eigenvalue below -tau |S|_F, tau = max(sqrt(eps), 100 n eps); rounding-level ones pass."""
    if S.numel() == 0:
        return
    n = S.shape[-1]
    eps = torch.finfo(S.dtype).eps
    tau = max(math.sqrt(eps), 100.0 * n * eps)
    Sd = ((S + S.mT) * 0.5).double()
    fro = Sd.flatten(1).norm(dim=1)[:, None, None]
    eye = torch.eye(n, dtype=torch.float64, device=S.device)
    info = torch.linalg.cholesky_ex(Sd + eye * (fro * tau + torch.finfo(torch.float64).tiny)).info
    bad = info != 0
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        lmin = float(torch.linalg.eigvalsh(Sd[b]).min())
        raise ValueError(f"{op}: `{name}` must be positive semi-definite, but matrix {b} of the batch has the "
                         f"eigenvalue {lmin:.6g} (|S|_F = {float(fro[b]):.6g}); negative eigenvalues below "
                         f"-{tau:.3g} |S|_F are rejected (rounding-level ones are clamped to 0)")




def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def check_sqrtm_args(S, method, num_iters, op="wkd.sqrtm"):
    check_square_batch(S, "S", op)
    check_method(method, op)
    check_num_iters(num_iters, op)


def check_sqrtm_backward_args(grad_Y, Y, method, num_iters, op="wkd.sqrtm_backward"):
    check_square_batch(Y, "Y", op)
    check_method(method, op)
    check_num_iters(num_iters, op)
    if list(grad_Y.shape) != list(Y.shape):
        raise ValueError(f"{op}: `grad_Y` must have the shape of `Y` {list(Y.shape)}, got {list(grad_Y.shape)}")
    check_same(grad_Y, Y, "grad_Y", "Y", op)


def check_bures_all(mu1, S1, mu2, S2, method, num_iters, op="wkd.bures_wasserstein"):
    check_bures_args(mu1, S1, mu2, S2, op)
    check_method(method, op)
    check_num_iters(num_iters, op)


def check_bures_backward_args(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters,
                              op="wkd.bures_wasserstein_backward"):
    check_square_batch(sqrt_S1, "sqrt_S1", op)
    check_method(method, op)
    check_num_iters(num_iters, op)
    B, n = sqrt_S1.shape[0], sqrt_S1.shape[1]
    for name, t, shape in (("sqrt_S2", sqrt_S2, [B, n, n]), ("polar", polar, [B, n, n]), ("mu1", mu1, [B, n]),
                           ("mu2", mu2, [B, n]), ("grad_w2", grad_w2, [B])):
        if list(t.shape) != shape:
            raise ValueError(f"{op}: `{name}` must be {shape}, got {list(t.shape)}")
        check_same(t, sqrt_S1, name, "sqrt_S1", op)


def check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased,
                                      op="wkd.feature_stats_backward"):
    check_feature_stats_args(x, grid, unbiased, op)
    N, C, P = x.shape[0], x.shape[1], grid * grid
    want = [N, P, C]
    for name, t, shape in (("grad_mean", grad_mean, want), ("mean", mean, want),
                           ("grad_var", grad_var, want + [C] if full else want)):
        if list(t.shape) != shape:
            raise ValueError(f"{op}: `{name}` must be {shape}, got {list(t.shape)}")
        if t.dtype != stats_dtype(x.dtype):
            raise TypeError(f"{op}: `{name}` must be {stats_dtype(x.dtype)} (the statistics dtype of `x`), got "
                            f"{t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: all tensors must be on the device of `x` ({x.device}), got {t.device}")


# ----------------------------------------------------------------------------------------------------------
# Losses (no C++ kernel of their own: on CPU tensors their value checks run in Python, here)
# ----------------------------------------------------------------------------------------------------------
def loss_values_check_wanted(t: Tensor, check_values: Optional[bool], fn: str = "wkd") -> bool:
    """Whether a loss runs its value checks for tensors on ``t``'s device: on CPU unless ``check_values`` is False,
    on CUDA when ``check_values`` (None: the setting) asks; never while ``torch.compile`` traces. A
    ``check_values`` that is neither None nor a bool is a TypeError."""
    if check_values is not None:
        check_values = as_bool(check_values, "check_values", fn)
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return check_values is None or bool(check_values)
    if check_values is None:
        return settings.current().check_values
    return bool(check_values)


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
        raise ValueError(f"{fn}: needs at least {min_classes} classes, "
                         f"`student_logits` has shape {list(student.shape)}")
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
