"""wk.embedding_cost and its three paths (every coupling allowed, the cost from embeddings): "dense" and "implicit"
equal to the dense op, "dense_bf16" (K and K∘c stored as bfloat16) within its measured error bounds, the path chosen
by size or named, the stored memory, bad `path`. The rest of wk.sparse_sinkhorn: test_sparse_sinkhorn.py."""
import pytest
import torch
import torch.nn.functional as F

import wkd_kernels as wk
from test_sparse_sinkhorn import _close, _grads

D = torch.float64


@pytest.mark.parametrize("kind", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("log_domain", [False, True])
def test_embedding_cost_dense_and_implicit_paths_equal_dense_op(kind, log_domain):
    g = torch.Generator().manual_seed(14)
    e = torch.randn(11, 3, generator=g, dtype=D)
    a = torch.softmax(torch.randn(3, 11, generator=g, dtype=D), 1)
    b = torch.softmax(torch.randn(3, 11, generator=g, dtype=D), 1)
    x = F.normalize(e, dim=1) if kind == "cosine" else e
    cost = (1 - x @ x.t()).clamp_min(0) if kind == "cosine" else (torch.cdist(x, x) ** 2)
    reg = 0.3 if kind == "cosine" else 3.0
    w = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    ref = _grads(lambda p, q: wk.sinkhorn(p, q, cost, reg, 6, backend="torch").value, a, b, w)
    paths = {"dense": wk.embedding_cost(e, reg, kind),
             "implicit": wk.embedding_cost(e, reg, kind, max_kernel_bytes=0, tile_rows=4)}
    for path, K in paths.items():
        res = wk.sparse_sinkhorn(a, b, K, reg, 6, log_domain=log_domain)
        assert res.path == path
        got = _grads(lambda p, q, K=K: wk.sparse_sinkhorn(p, q, K, reg, 6, log_domain=log_domain).value, a, b, w)
        for r, x_ in zip(ref, got, strict=True):
            _close(x_, r, rtol=1e-9, atol=1e-12)
    assert wk.sparse_sinkhorn(a, b, wk.knn_kernel(e, 3), reg, 2).path == "sparse"


def test_embedding_cost_path_by_size_explicit_and_stored_memory():
    e = torch.randn(10, 4, generator=torch.Generator().manual_seed(3), dtype=D)
    dense_bytes, bf16_bytes = 3 * 10 * 10 * 8, 2 * 10 * 10 * 2  # cost, K, K∘c in float64; K, K∘c in bfloat16
    for limit, path in [(dense_bytes, "dense"), (dense_bytes - 1, "dense_bf16"), (bf16_bytes, "dense_bf16"),
                        (bf16_bytes - 1, "implicit"), (0, "implicit")]:
        K = wk.embedding_cost(e, 0.2, max_kernel_bytes=limit)
        assert K.path == path
        assert K.stored_bytes == {"dense": dense_bytes, "dense_bf16": bf16_bytes, "implicit": 0}[path]
    K = wk.embedding_cost(e, 0.2, max_kernel_bytes=bf16_bytes)
    assert K._K.dtype == K._KC.dtype == torch.bfloat16 and K._K.shape == (10, 10) and not hasattr(K, "_C")
    assert K.dtype == D  # the scalings stay in the compute dtype
    for path in ("dense", "dense_bf16", "implicit"):  # an explicit path is honoured whatever max_kernel_bytes says
        assert wk.embedding_cost(e, 0.2, max_kernel_bytes=0, path=path).path == path
    a = torch.softmax(torch.randn(2, 10, dtype=D), 1)
    assert wk.sparse_sinkhorn(a, a.flip(1), K, 0.2, 3).path == "dense_bf16"
    for bad in ("bf16", "DENSE", 3):
        with pytest.raises(ValueError, match="`path` must be None, 'dense', 'dense_bf16' or 'implicit'"):
            wk.embedding_cost(e, 0.2, path=bad)


# The bfloat16 path's error, measured against the float64 dense path (cosine, B = 8, 50 scaling-domain iterations,
# C in {300, 1000, 2000}, d in {32, 64}, reg in {0.05, 0.1, 0.2}, 42 cases over 3 seeds, float32 and float64
# compute alike): value relative error at most 1.32e-3 (each stored entry is rounded by a relative 2^-9 = 1.95e-3 at
# most); gradients' norm-relative error at most 5.96e-3 (exact) and 2.73e-4 (envelope). The bounds below are the
# documented ones (those maxima rounded up); the cases are measured ones (the worst value error among them:
# C = 300, d = 32, reg = 0.05).
BF16_VALUE_RTOL, BF16_EXACT_GRAD_RTOL, BF16_ENVELOPE_GRAD_RTOL = 1.4e-3, 6e-3, 2.8e-4


@pytest.mark.parametrize("d, reg", [(32, 0.05), (64, 0.2)])
def test_embedding_cost_bf16_path_value_and_gradients_within_measured_bounds(d, reg):
    C, B = 300, 8
    g = torch.Generator().manual_seed(C + d)
    e = torch.randn(C, d, generator=g, dtype=D)
    a = torch.softmax(torch.randn(B, C, generator=g, dtype=D) * 2, 1)
    b = torch.softmax(torch.randn(B, C, generator=g, dtype=D) * 2, 1)
    w = torch.randn(B, generator=g, dtype=D)
    f32 = torch.float32
    for grad, grad_rtol in (("exact", BF16_EXACT_GRAD_RTOL), ("envelope", BF16_ENVELOPE_GRAD_RTOL)):
        def run(K, dtype, grad=grad):
            return _grads(lambda p, q: wk.sparse_sinkhorn(p, q, K, reg, 50, grad=grad, log_domain=False).value,
                          a.to(dtype), b.to(dtype), w.to(dtype))
        ref = run(wk.embedding_cost(e, reg, path="dense"), D)
        low = run(wk.embedding_cost(e.to(f32), reg, path="dense_bf16"), f32)
        err = ((low[0].double() - ref[0]).abs() / ref[0].abs()).max()
        assert 1e-6 < err <= BF16_VALUE_RTOL  # not float32-exact, within the measured bound
        for x, r in zip(low[1:], ref[1:], strict=True):
            assert (x.double() - r).norm() / r.norm() <= grad_rtol


def test_embedding_cost_bf16_path_log_domain_recomputes_the_cost():
    """The log domain of "dense_bf16" reads no bfloat16 entry: the same per-tile cost as "implicit", and as exact as
    the dense path (a log of the rounded K would be off by up to 2^-9 per entry, -inf where K underflows)."""
    g = torch.Generator().manual_seed(15)
    e = torch.randn(40, 8, generator=g, dtype=D)
    a = torch.softmax(torch.randn(3, 40, generator=g, dtype=D) * 2, 1)
    b = torch.softmax(torch.randn(3, 40, generator=g, dtype=D) * 2, 1)
    w = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    reg = 0.005  # c / reg up to ~400: K = 0 in bfloat16 (and float32) for most pairs
    costs = {path: wk.embedding_cost(e, reg, path=path, tile_rows=16) for path in ("dense", "dense_bf16", "implicit")}
    assert float((costs["dense_bf16"]._K == 0).double().mean()) > 0.5  # its stored K does underflow
    got = {path: _grads(lambda p, q, K=K: wk.sparse_sinkhorn(p, q, K, reg, 10, log_domain=True).value, a, b, w)
           for path, K in costs.items()}
    for x, r in zip(got["dense_bf16"], got["implicit"], strict=True):
        torch.testing.assert_close(x, r, rtol=0, atol=0)
    for x, r in zip(got["dense_bf16"], got["dense"], strict=True):
        _close(x, r, rtol=1e-9, atol=1e-12)
