"""The op schemas as Python sees them.

``SCHEMAS``: the schemas of csrc/ops.cpp, character for character (python_tests/test_torch_backend.py compares them
with that file and with the compiled library). The extension defines them; a build without it
(``WKD_NO_EXT=1``, or no compiler) defines them here, so that ``torch.ops.wkd.*`` exists either way.

``TORCH_SCHEMAS``: the ``wkd::<op>_torch`` ops of the ``torch`` backend (wkd_kernels/aten/), always defined here:
the base op's schema under the name ``<op>_torch`` (``<op>_torch_backward`` for a backward op).

``PYTHON_TRITON_SCHEMAS``: the Triton ops that exist in Python only (``wkd::sparse_sinkhorn_triton`` and its
backward), always defined here: the base op's schema under the name ``<op>_triton`` (``<op>_triton_backward``).
Their contract is the base op's, in csrc/ops.cpp; they are not declared there because a schema of csrc/ops.cpp is
registered by the compiled library, which would then have to be rebuilt for an op it has no kernel for.
"""
from __future__ import annotations

import torch

SCHEMAS = {
    "sinkhorn": "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)",  # noqa: E501
    "sinkhorn_backward": "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, Tensor y, float reg, bool log_domain=False, float? eps=None) -> (Tensor grad_a, Tensor grad_b)",  # noqa: E501
    "sinkhorn_gibbs": "sinkhorn_gibbs(Tensor a, Tensor b, Tensor K, Tensor KC, int num_iters, float eps=0.0, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)",  # noqa: E501
    "sinkhorn_gibbs_backward": "sinkhorn_gibbs_backward(Tensor grad_value, Tensor a, Tensor b, Tensor K, Tensor KC, Tensor hist_r, Tensor hist_s, Tensor y, float? eps=None) -> (Tensor grad_a, Tensor grad_b)",  # noqa: E501
    "sinkhorn_triton": "sinkhorn_triton(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, bool log_domain=False, bool keep_history=True, str precision=\"ieee\") -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)",  # noqa: E501
    "sinkhorn_triton_backward": "sinkhorn_triton_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, Tensor y, float reg, bool log_domain=False, str precision=\"ieee\", float? eps=None) -> (Tensor grad_a, Tensor grad_b)",  # noqa: E501
    "feature_stats": "feature_stats(Tensor x, int grid=1, bool full=False, bool unbiased=True) -> (Tensor mean, Tensor var)",  # noqa: E501
    "feature_stats_backward": "feature_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean, int grid, bool full, bool unbiased) -> Tensor",  # noqa: E501
    "sqrtm": "sqrtm(Tensor S, str method=\"newton_schulz\", int num_iters=20) -> Tensor",
    "sqrtm_backward": "sqrtm_backward(Tensor grad_Y, Tensor Y, str method=\"newton_schulz\", int num_iters=20) -> Tensor",  # noqa: E501
    "nuclear_norm": "nuclear_norm(Tensor M, int num_iters=20) -> (Tensor value, Tensor polar)",
    "bures_wasserstein": "bures_wasserstein(Tensor mu1, Tensor S1, Tensor mu2, Tensor S2, str method=\"newton_schulz\", int num_iters=20) -> (Tensor w2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar)",  # noqa: E501
    "bures_wasserstein_backward": "bures_wasserstein_backward(Tensor grad_w2, Tensor mu1, Tensor mu2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar, str method=\"newton_schulz\", int num_iters=20) -> (Tensor grad_mu1, Tensor grad_S1, Tensor grad_mu2, Tensor grad_S2)",  # noqa: E501
    "feature_stats_triton": "feature_stats_triton(Tensor x, int grid=1, bool full=False, bool unbiased=True) -> (Tensor mean, Tensor var)",  # noqa: E501
    "feature_stats_triton_backward": "feature_stats_triton_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean, int grid, bool full, bool unbiased) -> Tensor",  # noqa: E501
    "sqrtm_triton": "sqrtm_triton(Tensor S, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> Tensor",  # noqa: E501
    "sqrtm_triton_backward": "sqrtm_triton_backward(Tensor grad_Y, Tensor Y, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> Tensor",  # noqa: E501
    "nuclear_norm_triton": "nuclear_norm_triton(Tensor M, int num_iters=20, str precision=\"ieee\") -> (Tensor value, Tensor polar)",  # noqa: E501
    "bures_wasserstein_triton": "bures_wasserstein_triton(Tensor mu1, Tensor S1, Tensor mu2, Tensor S2, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> (Tensor w2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar)",  # noqa: E501
    "bures_wasserstein_triton_backward": "bures_wasserstein_triton_backward(Tensor grad_w2, Tensor mu1, Tensor mu2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> (Tensor grad_mu1, Tensor grad_S1, Tensor grad_mu2, Tensor grad_S2)",  # noqa: E501
    "sparse_sinkhorn": "sparse_sinkhorn(Tensor a, Tensor b, Tensor crow, Tensor col, Tensor cost, Tensor crow_t, Tensor col_t, Tensor cost_t, float reg, int num_iters, float eps=0.0, bool log_domain=False, bool keep_history=True, int? chunk_elements=None) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)",  # noqa: E501
    "sparse_sinkhorn_backward": "sparse_sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor crow, Tensor col, Tensor cost, Tensor crow_t, Tensor col_t, Tensor cost_t, Tensor hist_r, Tensor hist_s, Tensor y, float reg, bool log_domain=False, float? eps=None, int? chunk_elements=None) -> (Tensor grad_a, Tensor grad_b)",  # noqa: E501
}

# The ops with a torch-backend twin (the Triton ones have their own; the backward ops are twinned too).
_TWINNED = ("sinkhorn", "sinkhorn_backward", "sinkhorn_gibbs", "sinkhorn_gibbs_backward", "feature_stats",
            "feature_stats_backward", "sqrtm", "sqrtm_backward", "nuclear_norm", "bures_wasserstein",
            "bures_wasserstein_backward", "sparse_sinkhorn", "sparse_sinkhorn_backward")


def torch_twin(name: str) -> str:
    """``sinkhorn`` -> ``sinkhorn_torch``, ``sinkhorn_backward`` -> ``sinkhorn_torch_backward`` (the Triton naming)."""
    return name[:-len("_backward")] + "_torch_backward" if name.endswith("_backward") else name + "_torch"


TORCH_SCHEMAS = {torch_twin(name): SCHEMAS[name].replace(name + "(", torch_twin(name) + "(", 1) for name in _TWINNED}

# The base ops whose Triton op is defined in Python only (the others' Triton schemas are in csrc/ops.cpp).
_PYTHON_TRITON = ("sparse_sinkhorn", "sparse_sinkhorn_backward")


def triton_twin(name: str) -> str:
    """``sparse_sinkhorn`` -> ``sparse_sinkhorn_triton``, ``sparse_sinkhorn_backward`` ->
    ``sparse_sinkhorn_triton_backward``."""
    return name[:-len("_backward")] + "_triton_backward" if name.endswith("_backward") else name + "_triton"


PYTHON_TRITON_SCHEMAS = {triton_twin(name): SCHEMAS[name].replace(name + "(", triton_twin(name) + "(", 1)
                         for name in _PYTHON_TRITON}

_LIB = None


def define(with_base: bool) -> None:
    """Define the ``_torch`` ops and the Python-only Triton ops, and the base ops too when ``with_base`` (no compiled
    extension). Idempotent."""
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("wkd", "FRAGMENT")
    for schema in ({**SCHEMAS, **TORCH_SCHEMAS, **PYTHON_TRITON_SCHEMAS} if with_base
                   else {**TORCH_SCHEMAS, **PYTHON_TRITON_SCHEMAS}).values():
        _LIB.define(schema)
