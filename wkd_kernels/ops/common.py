"""What every op module shares: the backend choice, the first-order-only guard of the backward formulas, half
upcasting and the Newton-Schulz step bound of the Gaussian ops (docs/design.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _build, settings
from .checks import HALF, as_int


def resolve_backend(backend: Optional[str], t: Tensor, op: str, *, has_cuda_cpp: bool,
                    precision: str = "ieee") -> str:
    """The kernels that serve ``op`` for tensors like ``t``: ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    ``backend`` is the caller's argument (None: :func:`wkd_kernels.settings.current`); ``"auto"`` follows
    :func:`wkd_kernels.settings.auto_backend` (the C++ kernels on CPU tensors when built, else ``"torch"``; ``"torch"``
    on other devices until a fused backend is measured there). ``"torch"`` runs on tensors of every device type
    (float64 where the device has it). ``has_cuda_cpp``: the op has CUDA C++ kernels; ``precision``: the Triton
    product precision (the CUDA C++ kernels compute in IEEE only).
    """
    if backend is None:
        backend = settings.current().backend
    if backend not in settings.BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {settings.BACKENDS}, got {backend!r}")
    dev = t.device.type
    if backend == "auto":
        backend = settings.auto_backend(dev, _build.HAS_C_EXT)
        if backend == "cuda" and not (has_cuda_cpp and _build.HAS_CUDA_EXT and precision == "ieee"):
            backend = "triton"
    if backend == "torch":
        check_dtype_on_device(t, op)
        return "torch"
    if backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors; these are on {t.device}")
        if not _build.HAS_C_EXT:
            raise RuntimeError(f"{op}: backend='cpu': this installation has no compiled extension (build info: "
                               f"{_build.build_info()}); use backend='torch' or 'auto'")
        return "cpu"
    if backend == "triton":
        if dev == "cpu" and not settings.TRITON_INTERPRET:
            raise ValueError(f"{op}: backend='triton' runs on CUDA tensors (on CPU tensors only under "
                             "TRITON_INTERPRET=1, set before triton is imported); these are CPU tensors")
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"{op}: backend='triton' runs on CUDA tensors; these are on {t.device} "
                             "(backend='torch' runs on every device type)")
        _require_triton(op)
        return "triton"
    # backend == "cuda"
    if dev != "cuda":
        where = "these are CPU tensors" if dev == "cpu" else f"these are on {t.device}"
        raise ValueError(f"{op}: backend='cuda' (the CUDA C++ kernels) needs CUDA tensors; {where}")
    if not has_cuda_cpp:
        raise ValueError(f"{op}: there is no CUDA C++ kernel for this op; use backend='triton', 'torch' or 'auto'")
    if not _build.HAS_CUDA_EXT:
        raise RuntimeError(f"{op}: backend='cuda': this build has no CUDA C++ kernels (build info: "
                           f"{_build.build_info()}); rebuild with a CUDA toolkit or use backend='triton' or 'torch'")
    if precision != "ieee":
        raise ValueError(f"{op}: backend='cuda' computes float32 products in IEEE float32 only; "
                         f"precision={precision!r} needs backend='triton'")
    return "cuda"


def check_dtype_on_device(t: Tensor, op: str) -> None:
    """A clear error (naming the op, dtype and device) for a dtype the device cannot compute in: float64 on MPS (and
    on an XPU without float64 support)."""
    if t.dtype != torch.float64:
        return
    dev = t.device
    missing = dev.type == "mps"
    if dev.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        missing = not getattr(torch.xpu.get_device_properties(dev), "has_fp64", True)
    if missing:
        raise TypeError(f"{op}: dtype torch.float64 is not supported on device {dev} (it has no float64 arithmetic); "
                        "use float32 tensors")


def _require_triton(op: str) -> None:
    if not _build.HAS_TRITON:
        raise RuntimeError(f"{op}: the Triton kernels need the `triton` package (pip install 'triton>=3.5'); "
                           "it is not importable here")


def upcast(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (the ops compute half inputs in float32); other dtypes unchanged."""
    return t.float() if t.dtype in HALF else t


# ----------------------------------------------------------------------------------------------------------
# Double backward: not supported by any op; differentiating a gradient raises this clear error
# ----------------------------------------------------------------------------------------------------------
class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``x`` whose backward raises: attached to the gradients an op's backward returns under
    ``create_graph=True`` (anchored on a tensor that requires grad, so that the result does)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, anchor, op):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.op}: double backward (differentiating a gradient computed with create_graph=True) "
                           "is not supported; the first-order gradient is exact")


def first_order_only(grads, anchors, op: str):
    """Mark the gradients returned by an op's backward as not differentiable again (no cost without create_graph).

    Under ``create_graph=True`` (grad mode on inside the backward) every returned gradient gets a node whose backward
    raises, so a second differentiation is a clear error instead of a silently missing second-order term. The anchor
    is the first of ``anchors`` that requires grad, else a fresh leaf (e.g. when the op's only differentiable inputs
    are not among the tensors its backward sees)."""
    if not torch.is_grad_enabled():
        return grads
    anchor = next((t for t in anchors if isinstance(t, Tensor) and t.requires_grad), None)
    if anchor is None:
        anchor = torch.zeros((), requires_grad=True)
    return tuple(_FirstOrderOnly.apply(g, anchor, op) if isinstance(g, Tensor) else g for g in grads)


# ----------------------------------------------------------------------------------------------------------
# Forward-mode AD: not supported by any op; a tangent reaching an op raises this clear error
# ----------------------------------------------------------------------------------------------------------
class _NoForwardAD(torch.autograd.Function):
    """Identity (a view) in reverse mode; its forward-mode rule raises. The ops' autograd formulas are reverse-mode
    only, and without this a forward-mode tangent would silently come out as zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, op):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, x_tangent, _):
        raise RuntimeError(f"{ctx.op}: forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad) "
                           "is not supported; use reverse mode (torch.autograd.grad or .backward())")


def reverse_mode_only(op: str, *tensors):
    """``tensors`` for an op whose autograd is reverse mode through ``torch.library.register_autograd``.

    Inside a ``torch.func`` transform (grad, jacrev, vmap, jvp, ...) this raises a clear error: PyTorch runs such ops
    through an autograd function the transforms cannot use. Inside ``torch.autograd.forward_ad`` each floating tensor
    passes through :class:`_NoForwardAD`, so that a tangent reaching the op raises an error naming it (instead of a
    silent zero tangent). Elsewhere the tensors come back unchanged, at no cost."""
    if not torch.compiler.is_compiling() and _functorch_transform_active():
        raise RuntimeError(f"{op}: torch.func transforms (grad, jacrev, vmap, jvp, jacfwd, hessian) are not "
                           "supported: the op's gradient is registered with torch.library, which they cannot run "
                           "through; use torch.autograd.grad (reverse mode). forward-mode AD is not supported "
                           "either")
    if torch.autograd.forward_ad._current_level < 0:
        return tensors
    return tuple(_NoForwardAD.apply(t, op) if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in tensors)


def _functorch_transform_active() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


# ----------------------------------------------------------------------------------------------------------
# Newton-Schulz step bound of the Gaussian ops (sqrtm, nuclear_norm, bures_wasserstein, gaussian_wasserstein)
# ----------------------------------------------------------------------------------------------------------
_AUTO_ITERS = {torch.float32: 45, torch.float64: 100}


def default_num_iters(dtype: torch.dtype) -> int:
    """Bound on the Newton-Schulz steps when ``num_iters=None`` (the default): 45 in float32, 100 in float64 --
    enough for every singular value / eigenvalue above eps (|M|_F or tr S) to converge (they grow by 1.5 per
    step, then converge quadratically). Each matrix stops as soon as it has converged -- roots (and the backward's
    Lyapunov solve): once the residual |I - Z Y|_F^2 (|B^2 - I|_F^2) <= n eps, which sees every eigenvalue; polar
    iteration: after log(1/eps)/log(1.5) steps (float32 40, float64 89; a small singular value cannot be told from 0
    earlier) once a step raises the value by at most min(p, q) eps of it -- so the bound is only reached by matrices
    that need it (rank-deficient roots stop at the |Z| safeguard instead)."""
    return _AUTO_ITERS.get(dtype, 45)


def resolve_iters(num_iters, dtype: torch.dtype, op: str) -> int:
    """``num_iters`` as an int >= 1; None -> :func:`default_num_iters` of ``dtype``."""
    if num_iters is None:
        return default_num_iters(dtype)
    try:
        n = as_int(num_iters, "num_iters", op)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1 or None, got {num_iters!r}")
    return n


def nan_unless_psd_trace(S: Tensor, out: Tensor) -> Tensor:
    """Without value checks (CUDA): NaN for a matrix whose trace is negative, or zero while S != 0 (never PSD),
    instead of the huge finite numbers of a root divided by a clamped trace. Device-side, no synchronisation."""
    tr = S.diagonal(0, -2, -1).sum(-1)
    bad = (tr < 0) | ((tr <= 0) & (S.flatten(1).abs().amax(1) > 0))
    shape = [-1] + [1] * (out.dim() - 1)
    return torch.where(bad.view(shape), torch.full_like(out, float("nan")), out)
