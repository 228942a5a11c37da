"""wkd-kernels: fused kernels for Wasserstein-distance knowledge distillation (WKD).

Public API:
    sinkhorn(a, b, cost, reg, num_iters, *, eps=0.0, grad="exact", log_domain=False) -> SinkhornResult
    set_cuda_backend("triton" | "cuda" | "auto"), get_cuda_backend()
    build_info(), HAS_C_EXT, HAS_CUDA_EXT, HAS_TRITON
The ops themselves are torch.ops.wkd.* (schemas in csrc/ops.cpp).
"""
from ._build import HAS_C_EXT, HAS_CUDA_EXT, HAS_TRITON, build_info
from .ops import SinkhornResult, get_cuda_backend, set_cuda_backend, sinkhorn

__version__ = "0.1.0"

__all__ = [
    "HAS_C_EXT", "HAS_CUDA_EXT", "HAS_TRITON", "build_info",
    "SinkhornResult", "sinkhorn", "set_cuda_backend", "get_cuda_backend",
]
