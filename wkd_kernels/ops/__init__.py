"""The ops of wkd-kernels, one module per op (docs/design.md section 1): each holds that op's fake kernels, Triton
registration, autograd and public wrapper. ``checks`` is the one argument validator, ``common`` what the op modules
share (backend choice, first-order-only guard). The schemas are in csrc/ops.cpp."""
from .bures_wasserstein import bures_wasserstein
from .feature_stats import feature_stats
from .gaussian_wasserstein import GaussianW2Terms, gaussian_wasserstein, gaussian_wasserstein_terms
from .nuclear_norm import nuclear_norm
from .sinkhorn import GibbsKernel, SinkhornResult, gibbs_kernel, sinkhorn
from .sqrtm import sqrtm

__all__ = ["SinkhornResult", "sinkhorn", "GibbsKernel", "gibbs_kernel",
           "feature_stats", "sqrtm", "nuclear_norm", "bures_wasserstein",
           "gaussian_wasserstein", "gaussian_wasserstein_terms", "GaussianW2Terms"]
