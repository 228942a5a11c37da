"""Load the compiled extension and describe what was built."""
import os
import warnings

import torch

HAS_C_EXT = False
HAS_CUDA_EXT = False
LOAD_ERROR = None

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.wkd.*)

    HAS_C_EXT = True
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = exc
    # The CMake build produces a plain library: WKD_KERNELS_LIBRARY=/path/to/libwkd_kernels.so
    lib = os.environ.get("WKD_KERNELS_LIBRARY")
    if lib:
        torch.ops.load_library(lib)
        HAS_C_EXT = True
        LOAD_ERROR = None

if HAS_C_EXT:
    # The CUDA C++ kernels register on the CUDA key of wkd::sinkhorn (read before wkd_kernels.ops registers the
    # Triton kernels there in a build without them).
    HAS_CUDA_EXT = torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn", "CUDA")
else:  # pragma: no cover
    warnings.warn(
        f"wkd_kernels: the compiled extension failed to load ({LOAD_ERROR}). It was built for a specific "
        f"torch/CUDA; this is torch {torch.__version__} (CUDA {torch.version.cuda}). Rebuild with "
        "`pip install --no-build-isolation -e .`."
    )

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def build_info() -> dict:
    """What this installation can run: compiled CPU ops, CUDA C++ kernels, Triton, torch/CUDA versions."""
    return {
        "has_c_ext": HAS_C_EXT,
        "has_cuda_ext": HAS_CUDA_EXT,
        "has_triton": HAS_TRITON,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "load_error": None if LOAD_ERROR is None else str(LOAD_ERROR),
    }
