"""What the Triton kernels share: the supported Triton versions (one clear error when the installed one cannot compile
them), the accumulator dtype and the ``tl.dot`` precision rule.

Supported: Triton >= 3.5 (the release paired with torch 2.9; torch 2.11 ships 3.6). Older releases lack what the
kernels use, as the compile matrix showed: Triton 3.2, 3.3 and 3.4 cannot compile a float64 ``tl.dot`` ("Unsupported
lhs dtype fp64": the shared-cost Sinkhorn products, the covariance and matrix-root kernels), and 3.2 has no
``tl.gather`` (the Jacobi eigensolver of ``sqrtm(method="eigh")``). CI compiles every kernel variant the launchers
produce, for sm_80 and sm_90, under each version in ``TESTED_TRITON`` (python_tests/triton_compile_matrix.py).
"""
from __future__ import annotations

import functools
import re

import torch
import triton
import triton.language as tl

__all__ = ["MIN_TRITON", "TESTED_TRITON", "triton_version", "supported", "support_message", "require_supported",
           "explain_compile_errors", "acc_dtype", "dot_precision"]

MIN_TRITON = (3, 5)
TESTED_TRITON = ("3.5.1", "3.6.0", "3.8.0")


def triton_version() -> tuple:
    """The installed Triton as a tuple of ints, e.g. (3, 6, 0) (pre-release suffixes dropped)."""
    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])


def supported() -> bool:
    return triton_version()[:2] >= MIN_TRITON


def support_message() -> str:
    lo = ".".join(map(str, MIN_TRITON))
    return (f"the installed Triton is {triton.__version__}; wkd_kernels' Triton kernels support Triton >= {lo} "
            f"(CI compiles every kernel variant under {', '.join(TESTED_TRITON)})")


def require_supported(what: str) -> None:
    """Raise one clear RuntimeError before any compilation when the installed Triton is older than supported."""
    if not supported():
        raise RuntimeError(f"{what}: {support_message()}. Install a supported release (pip install "
                           f"'triton>={'.'.join(map(str, MIN_TRITON))}', or a torch that ships one), or use the "
                           "CUDA C++ backend where the op has one (wk.set_cuda_backend('cuda')).")


def _compile_error_types() -> tuple:
    types = []
    try:
        from triton.compiler.errors import CompilationError

        types.append(CompilationError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from triton.runtime.errors import PTXASError

        types.append(PTXASError)
    except ImportError:  # pragma: no cover - older Triton
        pass
    return tuple(types)


_COMPILE_ERRORS = _compile_error_types()


def explain_compile_errors(what: str):
    """Decorator of a launcher: an unsupported Triton raises one clear error before compiling, and a Triton
    compilation failure is re-raised as a RuntimeError naming the op, the installed and the supported versions (the
    original error chained as its cause), never a raw CompilationError."""

    def wrap(fn):
        @functools.wraps(fn)
        def launcher(*args, **kwargs):
            require_supported(what)
            try:
                return fn(*args, **kwargs)
            except _COMPILE_ERRORS as exc:
                first = str(exc).strip().splitlines()
                cause = exc.__cause__ or exc.__context__
                reason = str(cause).strip() if cause is not None else (first[-1] if first else type(exc).__name__)
                raise RuntimeError(f"{what}: a Triton kernel failed to compile ({type(exc).__name__}: {reason}); "
                                   f"{support_message()}. Please report it with the output of "
                                   "`python -c \"import wkd_kernels; print(wkd_kernels.build_info())\"`.") from exc

        return launcher

    return wrap


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype of a kernel on ``dtype`` data: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(precision: str, dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: the caller's ``precision`` for float32 operands, "ieee" for float64 (fp64 products
    have no reduced mode)."""
    return "ieee" if dtype == torch.float64 else precision
