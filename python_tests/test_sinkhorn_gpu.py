"""The Sinkhorn ops on a GPU: every backend that runs on CUDA tensors against the float64 CPU op, with NaN-poisoned
allocations, bitwise determinism, and CUDA-graph capture (marked gpu: deselected without a CUDA device).

Backends (parameter ids, in the order bench/gpu_suite.sh runs them: the CUDA C++ and device-generic ones before the
Triton ones, selected with ``-k "not triton"`` / ``-k triton``): "cuda" (torch.ops.wkd.sinkhorn, the CUDA C++
kernels), "torch" (torch.ops.wkd.sinkhorn_torch, ATen ops), "triton-ieee" and "triton-tf32x3"
(torch.ops.wkd.sinkhorn_triton with that float32 tl.dot precision). Sizes: WKD-L's problem at 256x1000 (the
released ImageNet cost when present, else a random symmetric stand-in) and 256x100 (the single-launch kernels), and
a random non-square 129x1001x999 (odd sizes, every tile edge partial).

Tolerances (max |x - ref| / max |ref| against the float64 CPU op on the same float32 inputs): IEEE-exact float32
backends 1e-4 on the value and 5e-4 on the gradients, tf32x3 1e-3 / 3e-3 (docs/precision.md); the float32 CPU op
itself is at ~1e-6 / ~5e-5 on the ImageNet cost. A failure says the measured error and the tolerance
(tolerance.assert_within; the tolerances are sinkhorn_harness.TOL's "gpu_exact" and "gpu_tf32x3").
"""
import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import wkd_kernels as wk
from conftest import capture_cuda_graph
from sinkhorn_harness import TOL
from tolerance import assert_within

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import wkd_cost  # noqa: E402

pytestmark = pytest.mark.gpu

REG, ITERS, EPS, TEMPERATURE = 0.05, 10, 1e-8, 2.0
DTYPE = torch.float32
# The backends this installation has (a GPU without them generates no case for them): "cuda" needs the build with
# the CUDA C++ kernels, the Triton ones triton
_HAS = {"cuda": wk.HAS_CUDA_EXT, "torch": True, "triton": bool(wk.build_info().get("has_triton"))}
BACKENDS = tuple(b for b in ("cuda", "torch", "triton-ieee", "triton-tf32x3") if _HAS[b.split("-")[0]])
SIZES = ("256x1000", "256x100", "129x1001x999")


# ------------------------------------------------------------------------------------------------- problems
@functools.cache
def problem_cpu(size: str):
    """(a, b, cost) float32 on CPU: WKD-L's marginals (softmax(logits / 2), target class given zero mass) on the
    shared sharpened cost for "BxC"; random rows with one zero-mass entry and a uniform [0, 1) cost for "BxNxM"."""
    dims = [int(x) for x in size.split("x")]
    g = torch.Generator().manual_seed(0)
    if len(dims) == 2:
        B, C = dims
        y = torch.randint(0, C, (B,), generator=g)
        removed = F.one_hot(y, C).bool()
        s, t = torch.randn(B, C, generator=g), 3 * torch.randn(B, C, generator=g)
        a = torch.softmax((s / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
        b = torch.softmax((t / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
        cost = wkd_cost(C, dtype=DTYPE)[0]
    else:
        B, n, m = dims

        def rows(k):
            x = torch.randn(B, k, generator=g)
            x[torch.arange(B), torch.randint(0, k, (B,), generator=g)] = float("-inf")
            return torch.softmax(x, 1)
        a, b, cost = rows(n), rows(m), torch.rand(n, m, generator=g)
    return a.to(DTYPE), b.to(DTYPE), cost.to(DTYPE)


def grad_weights(B, device):
    """A fixed non-uniform grad_value (rows do not enter with equal weights)."""
    return torch.linspace(0.5, 1.5, B, dtype=DTYPE, device=device)


@functools.cache
def reference(size: str):
    """The float64 CPU op on the float32 inputs: (value, grad_a, grad_b)."""
    a, b, c = (t.double() for t in problem_cpu(size))
    out = torch.ops.wkd.sinkhorn(a, b, c, REG, ITERS, EPS, False, True)
    ga, gb = torch.ops.wkd.sinkhorn_backward(grad_weights(a.shape[0], "cpu").double(), a, b, c, *out[3:], REG,
                                             False, EPS)
    return out[0], ga, gb


def on_cuda(size: str):
    return tuple(t.cuda() for t in problem_cpu(size))


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """The torch backend's products in full float32 (not TF32), whatever an earlier test set."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------------------------------- poisoning
def op_shapes(B, n, m):
    """Shapes of the buffers the forward and backward allocate (outputs and temporaries)."""
    return [(B,), (B, n), (B, m), (ITERS, B, n), (ITERS, B, m), (n, m), (B, max(1, -(-n // 16))), (1,),
            (B, n), (B, m), (B, n), (B, m)]


def _free_cached_blocks():
    """Sizes (bytes) of the free blocks of the caching allocator's default pool of the current stream."""
    stream = torch.cuda.current_stream().cuda_stream
    sizes = []
    for seg in torch.cuda.memory_snapshot():
        if seg.get("stream", stream) != stream or tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            continue
        small = seg.get("segment_type") == "small"
        for blk in seg.get("blocks", []):
            # requests <= 1 MiB come from the small pool, larger ones from the large pool
            if blk.get("state") == "inactive" and (blk["size"] <= 2**20) == small:
                sizes.append(int(blk["size"]))
    return sorted(sizes, reverse=True)


def poison(B, n, m):
    """Fill the memory the next allocations get with NaN (bytes 0xFF): NaN-filled blocks of every buffer shape the
    op allocates are cached, then every free block of the default pool is taken (largest first), filled, freed. The
    cache is never emptied, so the op's torch.empty outputs come from NaN blocks: a kernel that leaves part of an
    output unwritten gives NaN there."""
    held = [torch.empty(s, dtype=DTYPE, device="cuda").fill_(float("nan")) for s in op_shapes(B, n, m)
            for _ in range(2)]
    del held
    held = [torch.empty(s, dtype=torch.uint8, device="cuda") for s in _free_cached_blocks()]
    for t in held:
        t.fill_(255)
    del held


def op_call(backend: str, a, b, cost):
    """Forward (with history) and backward through the backend's ops, the allocator poisoned before each:
    (value, u, v, grad_a, grad_b)."""
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    g = grad_weights(B, a.device)
    poison(B, n, m)
    if backend.startswith("triton"):
        p = backend.split("-", 1)[1]
        out = torch.ops.wkd.sinkhorn_triton(a, b, cost, REG, ITERS, EPS, False, True, p)
        poison(B, n, m)
        ga, gb = torch.ops.wkd.sinkhorn_triton_backward(g, a, b, cost, *out[3:], REG, False, p, EPS)
    else:
        fwd, bwd = ((torch.ops.wkd.sinkhorn_torch, torch.ops.wkd.sinkhorn_torch_backward) if backend == "torch"
                    else (torch.ops.wkd.sinkhorn, torch.ops.wkd.sinkhorn_backward))
        out = fwd(a, b, cost, REG, ITERS, EPS, False, True)
        poison(B, n, m)
        ga, gb = bwd(g, a, b, cost, *out[3:], REG, False, EPS)
    torch.cuda.synchronize()
    return out[0], out[1], out[2], ga, gb


def autograd_step(backend: str, a, b, cost):
    """One training-step-like forward+backward through wk.sinkhorn and autograd: step() -> (value, ga, gb)."""
    xa, xb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    g = grad_weights(a.shape[0], a.device)
    name, _, precision = backend.partition("-")

    def step():
        value = wk.sinkhorn(xa, xb, cost, REG, ITERS, eps=EPS, backend=name, precision=precision or None).value
        ga, gb = torch.autograd.grad(value, (xa, xb), grad_outputs=g)
        return value, ga, gb
    return step


def bitwise_diff(xs, ys, names):
    return [n for n, x, y in zip(names, xs, ys, strict=False) if not torch.equal(x, y)]


# ------------------------------------------------------------------------------------------------- tests
def test_poisoning_fills_fresh_buffers_with_nan():
    """The poisoning the other tests rely on: after poison(), fresh buffers of the op's output shapes are NaN."""
    B, n, m = 129, 1001, 999
    poison(B, n, m)
    probes = [torch.empty(s, dtype=DTYPE, device="cuda") for s in op_shapes(B, n, m)[:5]]
    not_nan = [tuple(p.shape) for p in probes if not bool(torch.isnan(p).all())]
    assert not not_nan, f"fresh buffers of shapes {not_nan} are not all NaN after poison()"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_gradients_match_float64_cpu_op(backend, size):
    """Value, grad_a, grad_b of a poisoned call within the backend's tolerance of the float64 CPU op."""
    value, _, _, ga, gb = op_call(backend, *on_cuda(size))
    tol = TOL[("gpu_tf32x3" if backend.endswith("tf32x3") else "gpu_exact", DTYPE)]
    tv, tg = tol.value_ref, tol.grad_ref
    want = reference(size)
    errors = []
    for what, got, ref, tol in (("value", value, want[0], tv), ("grad_a", ga, want[1], tg),
                                ("grad_b", gb, want[2], tg)):
        try:
            assert_within(got, ref, tol, f"{backend} {size} {what}")
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "; ".join(errors)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend, size):
    """Two poisoned calls give the same bits (value, u, v and both gradients)."""
    inputs = on_cuda(size)
    first, second = op_call(backend, *inputs), op_call(backend, *inputs)
    differ = bitwise_diff(first, second, ("value", "u", "v", "grad_a", "grad_b"))
    assert not differ, f"{backend} {size}: two calls on the same inputs differ in {differ}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_and_graph_replay_match_the_op(backend, size):
    """wk.sinkhorn + autograd gives the op's bits, and so does its CUDA-graph replay (the graph captures every
    launch: no host synchronisation, no allocation outside the graph's pool)."""
    inputs = on_cuda(size)
    value, _, _, ga, gb = op_call(backend, *inputs)
    step = autograd_step(backend, *inputs)
    eager = step()
    torch.cuda.synchronize()
    names = ("value", "grad_a", "grad_b")
    differ = bitwise_diff(eager, (value, ga, gb), names)
    assert not differ, f"{backend} {size}: wk.sinkhorn + autograd differs from the op call in {differ}"
    graph, captured, _ = capture_cuda_graph(step, warmup=1)
    for t in captured:
        t.fill_(math.nan)  # the replay must write every entry
    graph.replay()
    torch.cuda.synchronize()
    differ = bitwise_diff(captured, eager, names)
    assert not differ, f"{backend} {size}: the CUDA-graph replay differs from the eager call in {differ}"
