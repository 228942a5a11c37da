"""Load the compiled extension, define the op schemas it did not, and describe what was built."""
import importlib.util
import os
import warnings

import torch

HAS_C_EXT = False
HAS_CUDA_EXT = False
LOAD_ERROR = None
# False for an installation built without the extension (WKD_NO_EXT=1, or no C++ compiler at install time): every op
# then runs on the `torch` backend (wkd_kernels/aten/), and no warning is given.
C_EXT_BUILT = importlib.util.find_spec(f"{__package__}._C") is not None

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.wkd.*)

    HAS_C_EXT = True
except ImportError as exc:  # pragma: no cover - exercised only on broken installs and builds without it
    LOAD_ERROR = exc
    # The CMake build produces a plain library: WKD_KERNELS_LIBRARY=/path/to/libwkd_kernels.so
    lib = os.environ.get("WKD_KERNELS_LIBRARY")
    if lib:
        torch.ops.load_library(lib)
        HAS_C_EXT = True
        LOAD_ERROR = None

if not HAS_C_EXT and not C_EXT_BUILT:
    LOAD_ERROR = ("the compiled extension was not built (WKD_NO_EXT=1, or no C++ compiler at install time): every op "
                  "runs on the `torch` backend")

if HAS_C_EXT:
    # The CUDA C++ kernels register the CUDA implementation of wkd::sinkhorn (read before wkd_kernels.ops.sinkhorn
    # registers the Triton fallback on that key for builds without them).
    HAS_CUDA_EXT = torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn", "CUDA")
elif C_EXT_BUILT or os.environ.get("WKD_KERNELS_LIBRARY"):  # pragma: no cover
    warnings.warn(
        f"wkd_kernels: the compiled extension failed to load ({LOAD_ERROR}). It was built for a specific "
        f"torch/CUDA; this is torch {torch.__version__} (CUDA {torch.version.cuda}). Rebuild with "
        "`pip install --no-build-isolation -e .`.",
        stacklevel=1,  # raised while wkd_kernels is imported: the warning is about the package, not a call site
    )

from . import _schemas  # noqa: E402

_schemas.define(with_base=not HAS_C_EXT)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def backends() -> list:
    """The backends this installation has: "torch" always; "cpu" with the compiled extension; "triton" with the
    triton package; "cuda" with the CUDA C++ kernels (see wkd_kernels.settings for which one "auto" picks)."""
    return ["torch"] + (["cpu"] if HAS_C_EXT else []) + (["triton"] if HAS_TRITON else []) + \
        (["cuda"] if HAS_CUDA_EXT else [])


def build_info() -> dict:
    """What this installation can run: the backends, compiled CPU ops, CUDA C++ kernels, Triton, torch/CUDA
    versions, and why the extension is absent when it is."""
    return {
        "backends": backends(),
        "has_c_ext": HAS_C_EXT,
        "has_cuda_ext": HAS_CUDA_EXT,
        "has_triton": HAS_TRITON,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "c_ext_built": C_EXT_BUILT,
        "load_error": None if LOAD_ERROR is None else str(LOAD_ERROR),
    }
