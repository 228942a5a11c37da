"""wkd-kernels: fused kernels for Wasserstein-distance knowledge distillation (WKD).

Public API:
    sinkhorn(a, b, cost, reg, num_iters, *, eps=0.0, grad="exact", log_domain=False | True | "auto",
             backend=None, precision=None, check_values=None) -> SinkhornResult
    feature_stats(x, grid=1, covariance="diag", unbiased=True, *, backend=None) -> (mean, var | cov)
    sqrtm(S, method="newton_schulz", num_iters=None, *, backend=None, precision=None), nuclear_norm(M, ...)
    bures_wasserstein(mu1, S1, mu2, S2, method=..., num_iters=..., *, backend=None, precision=None) -> squared W2
    gaussian_wasserstein(f_s, f_t, covariance="full", grid=1, eps=1e-5, ...) -> squared W2 per sample (and cell)
    sparse_sinkhorn(a, b, cost_csr, reg, num_iters, *, eps=0.0, grad="exact", log_domain="auto", divergence=False)
        -> SparseSinkhornResult; knn_kernel(embeddings, k, cost="cosine") -> sparse CSR cost; csr_from_dense,
        sparse_cost, embedding_cost(embeddings, reg) (every coupling; K stored or recomputed per tile)
    settings: the defaults of backend / precision / check_values (settings.override(...), settings.set_defaults)
    build_info(), HAS_C_EXT, HAS_CUDA_EXT, HAS_TRITON
    the losses (WKDLogitLoss, WKDFeatureLoss, VocabOTLoss, KD/DKD/NKD/FitNet, cosine_weight, make_projector) and
    the category interrelations (cka_distance, sharpen, ...), also as wkd_kernels.losses / .interrelations
The ops themselves are torch.ops.wkd.* (schemas in csrc/ops.cpp).
"""
from ._build import HAS_C_EXT, HAS_CUDA_EXT, HAS_TRITON, build_info
from . import settings
from .ops import (GaussianW2Terms, GibbsKernel, SinkhornResult, bures_wasserstein, feature_stats, gaussian_wasserstein,
                  gaussian_wasserstein_terms, gibbs_kernel, nuclear_norm, sinkhorn, sqrtm)
from .ops.sparse_costs import csr_from_dense, knn_kernel
from .ops.sparse_sinkhorn import SparseSinkhornResult, embedding_cost, sparse_cost, sparse_sinkhorn
from . import interrelations, losses  # noqa: E402
from .interrelations import centroid_cosine_distance, cka_distance, classifier_cosine_distance, sharpen
from .losses import (DKDLoss, FitNetLoss, KDLoss, NKDLoss, WKDFeatureLoss, WKDFeatureLossOutput, WKDLogitLoss,
                     cosine_weight, dkd_loss, fitnet_loss, kd_loss, make_projector, nkd_loss, wkd_feature_loss,
                     wkd_logit_loss, VocabOTLoss)

__version__ = "0.1.0"

__all__ = [
    "HAS_C_EXT", "HAS_CUDA_EXT", "HAS_TRITON", "build_info",
    "settings", "SinkhornResult", "sinkhorn", "GibbsKernel", "gibbs_kernel",
    "feature_stats", "sqrtm", "nuclear_norm", "bures_wasserstein", "gaussian_wasserstein",
    "gaussian_wasserstein_terms", "GaussianW2Terms",
    "interrelations", "losses", "cka_distance", "classifier_cosine_distance", "centroid_cosine_distance", "sharpen",
    "WKDLogitLoss", "wkd_logit_loss", "WKDFeatureLoss", "WKDFeatureLossOutput", "wkd_feature_loss",
    "KDLoss", "kd_loss", "DKDLoss", "dkd_loss", "NKDLoss", "nkd_loss", "FitNetLoss", "fitnet_loss", "cosine_weight",
    "make_projector",
    "sparse_sinkhorn", "SparseSinkhornResult", "sparse_cost", "knn_kernel", "csr_from_dense",
    "embedding_cost",
    "VocabOTLoss",
]
