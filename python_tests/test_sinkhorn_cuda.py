"""The hand-written CUDA C++ Sinkhorn kernels (csrc/cuda/sinkhorn.cu), the CUDA kernels of torch.ops.wkd.sinkhorn
and torch.ops.wkd.sinkhorn_backward.

Those ops on CUDA tensors against the float64 reference (autograd through it for the gradient) and the CPU op; both
CUDA backends through wk.sinkhorn; opcheck, torch.compile, CUDA-graph capture, no host synchronisation, the real
ImageNet cost at B=256.

Every GPU test is marked `gpu` and skips without CUDA (conftest.py). Without a GPU, the same kernel source can be
checked on the CPU: test_kernels_under_host_emulation (opt-in, WKD_TEST_CUDA_EMULATION=1, a few minutes) compiles
csrc/cuda/sinkhorn.cu as host C++ against csrc/cuda/cuda_emu.cuh (a cooperative-fiber emulation of blocks, barriers
and warp shuffles) and compares the emulated kernels with the CPU op, for both tile configurations: the programs
are in python_tests/cuda_emulation/.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wkd_kernels as wk
from conftest import capture_cuda_graph, load_cost_matrix, rand_cost, simplex
from wkd_kernels.reference import sinkhorn_reference

F64, F32 = torch.float64, torch.float32
REPO = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")
# Relative tolerance (max abs error / max abs reference) per dtype: values and potentials, and gradients.
TOL = {F32: 1e-5, F64: 1e-10}
GRAD_TOL = {F32: 1e-4, F64: 1e-9}


def rel(x, y, scale=None):
    """max |x - y| / max |y| over the entries where y is finite (x must be finite exactly there)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    fin = torch.isfinite(y)
    assert torch.equal(fin, torch.isfinite(x)), "non-finite entries differ"
    if not fin.any():
        return 0.0
    if scale is None:
        scale = y[fin].abs().max().item()
    return ((x[fin] - y[fin]).abs().max() / max(scale, 1e-300)).item()


def need_native():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not wk.HAS_CUDA_EXT:
        pytest.skip(f"package built without the CUDA C++ kernels: {wk.build_info()}")


@pytest.fixture
def cuda_backend():
    """Route torch.ops.wkd.sinkhorn on CUDA tensors to the CUDA C++ kernels for the test, then restore."""
    need_native()
    before = wk.ops._cuda_backend
    wk.set_cuda_backend("cuda")
    yield
    wk.ops._cuda_backend = before


def problem(B, n, m, dtype, shared, zeros=0, device="cuda", seed=0):
    a = simplex(B, n, dtype, zeros=min(zeros, n - 1), seed=seed + 1)
    b = simplex(B, m, dtype, zeros=min(zeros, m - 1), seed=seed + 2)
    cost = rand_cost(n, m, dtype=dtype, seed=seed + 3) if shared else rand_cost(B, n, m, dtype=dtype, seed=seed + 3)
    return a.to(device), b.to(device), cost.to(device)


def native(a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True):
    """torch.ops.wkd.sinkhorn on CUDA tensors: the CUDA C++ kernels (need_native() checked they were built)."""
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, keep)


def native_backward(g, a, b, cost, out, reg, log_domain=False):
    """torch.ops.wkd.sinkhorn_backward on CUDA tensors from a forward's outputs `out` (its hist_r, hist_s, y)."""
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log_domain)


def cpu_op(a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True):
    return torch.ops.wkd.sinkhorn(a.cpu(), b.cpu(), cost.cpu(), reg, T, eps, log_domain, keep)


# Odd sizes, one-element rows, tile edges (16/32/64), unaligned rows (no 16-byte loads) and aligned ones. With a
# shared cost, shapes with n, m <= 256 take the single-launch kernels; (64, 129, 257) takes the per-half-iteration
# kernels' 16 x 32 tiles on an H100/H200, SIZES_BIG their 32 x 64 tiles.
SHAPES = [(1, 1, 1), (3, 7, 5), (5, 33, 65), (4, 40, 36), (17, 70, 37), (2, 13, 64), (33, 64, 128), (64, 129, 257)]
SIZES_BIG = [(129, 1001, 999), (256, 1000, 1000)]


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SHAPES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_forward_matches_reference_and_cpu(B, n, m, dtype, shared, log_domain, eps):
    need_native()
    T, reg = 6, 0.1
    for zeros in (0, 2):
        a, b, cost = problem(B, n, m, dtype, shared, zeros)
        out = native(a, b, cost, reg, T, eps, log_domain)
        ref_value, ref_u, ref_v = sinkhorn_reference(a, b, cost, reg, T, eps=eps, log_domain=log_domain)
        assert out[0].dtype == dtype and out[0].is_cuda
        assert rel(out[0], ref_value) <= TOL[dtype]
        # log-domain potentials can be ~0 (n = m = 1 with eps): relative to max(1, |ref|) there
        for x, y in ((out[1], ref_u), (out[2], ref_v)):
            fin = torch.isfinite(y)
            scale = max(1.0, y[fin].abs().max().item()) if log_domain and fin.any() else None
            assert rel(x, y, scale) <= 2 * TOL[dtype]
        cpu = cpu_op(a, b, cost, reg, T, eps, log_domain)
        assert len(out) == len(cpu) == len(OUTPUTS)
        for name, x, y in zip(OUTPUTS, out, cpu):
            assert x.shape == y.shape, name
            assert rel(x, y) <= TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_forward_big_tiles_match_cpu(B, n, m, dtype):
    """Sizes that take the 32 x 64 tiles, odd and even; float32 against the float64 CPU op (accuracy target)."""
    need_native()
    for zeros in (0, 1):
        a, b, cost = problem(B, n, m, dtype, True, zeros)
        out = native(a, b, cost, 0.05, 10, 1e-8)
        cpu = cpu_op(a, b, cost, 0.05, 10, 1e-8)
        for name, x, y in zip(OUTPUTS, out, cpu):
            assert rel(x, y) <= TOL[dtype], name
        cpu64 = cpu_op(a.double(), b.double(), cost.double(), 0.05, 10, 1e-8)
        assert rel(out[0], cpu64[0]) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
def test_history_layout_and_no_history(shared, log_domain):
    need_native()
    B, n, m, T = 3, 6, 5, 4
    a, b, cost = problem(B, n, m, F64, shared)
    value, u, v, hr, hs, y = native(a, b, cost, 0.3, T, 0.0, log_domain, True)
    assert hr.shape == (T, B, n) and hs.shape == (T, B, m) and y.shape == (B, n)
    if not log_domain:
        assert torch.allclose(u, a / hr[T - 1]) and torch.allclose(v, b / hs[T - 1])
        assert torch.allclose(value, (u * y).sum(1))
    value0, u0, v0, hr0, hs0, y0 = native(a, b, cost, 0.3, T, 0.0, log_domain, False)
    assert hr0.shape == (0, B, n) and hs0.shape == (0, B, m) and y0.shape == (0, n)
    assert torch.equal(value0, value) and torch.equal(u0, u) and torch.equal(v0, v)


@pytest.mark.gpu
def test_log_domain_small_reg():
    """reg=1e-3, cost in [0, 1]: K underflows in float32, the log domain does not (compared with the CPU op)."""
    need_native()
    for shared in (True, False):
        a, b, cost = problem(4, 30, 20, F32, shared, zeros=2)
        out = native(a, b, cost, 1e-3, 10, 0.0, True)
        assert torch.isfinite(out[0]).all()
        cpu = cpu_op(a, b, cost, 1e-3, 10, 0.0, True)
        assert rel(out[0], cpu[0]) <= 1e-4
        ref = sinkhorn_reference(a, b, cost, 1e-3, 10, log_domain=True)[0]
        assert rel(out[0], ref) <= 1e-3  # float32 logs of size 1/reg: the inputs' rounding alone is ~1e-4


@pytest.mark.gpu
def test_deterministic():
    """The per-row value is reduced in a fixed order (no float atomics): bitwise repeatable."""
    need_native()
    a, b, cost = problem(256, 1000, 1000, F32, True, zeros=1)
    first = native(a, b, cost, 0.05, 10, 1e-8)
    second = native(a, b, cost, 0.05, 10, 1e-8)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    g = torch.randn(256, device="cuda")
    ga1 = native_backward(g, a, b, cost, first, 0.05)
    ga2 = native_backward(g, a, b, cost, first, 0.05)
    assert torch.equal(ga1[0], ga2[0]) and torch.equal(ga1[1], ga2[1])


@pytest.mark.gpu
def test_noncontiguous_inputs_and_side_stream():
    need_native()
    a, b, cost = problem(8, 24, 20, F64, True, zeros=1)
    a_nc = a.t().contiguous().t()  # same values, column-major strides
    cost_nc = cost.t().contiguous().t()
    want = native(a, b, cost, 0.1, 5)
    got = native(a_nc, b, cost_nc, 0.1, 5)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got_s = native(a, b, cost, 0.1, 5)
    torch.cuda.current_stream().wait_stream(s)
    for x, y in zip(got_s, want):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_bad_input_raises_same_messages():
    need_native()
    a, b, cost = problem(2, 4, 3, F64, True)
    with pytest.raises(ValueError, match="`cost` must be"):
        native(a, b, cost.t().contiguous(), 0.1, 3)
    with pytest.raises(ValueError, match="`reg` must be"):
        native(a, b, cost, 0.0, 3)
    with pytest.raises(TypeError, match="`cost` has dtype"):
        native(a, b, cost.float(), 0.1, 3)
    with pytest.raises(ValueError, match="`hist_r` must be"):
        out = native(a, b, cost, 0.1, 3, keep=False)
        native_backward(torch.ones(2, dtype=F64, device="cuda"), a, b, cost, out, 0.1)
    out = native(a, b, cost, 0.1, 3)
    with pytest.raises(ValueError, match="`y` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64, device="cuda"), a, b, cost, out[3], out[4],
                                        out[5][:1], 0.1, False)


# ------------------------------------------------------------------------------------------ backward
def ref_grads(a, b, cost, reg, T, eps, g):
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    value = sinkhorn_reference(a64, b64, cost.double(), reg, T, eps=eps)[0]
    return torch.autograd.grad((value * g.double()).sum(), (a64, b64))


def check_grads(got, ref, tol):
    scale = max(r.abs().max().item() for r in ref)  # one scale: some entries cancel to rounding noise
    for x, y in zip(got, ref):
        assert rel(x, y, scale) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SHAPES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_backward_matches_autograd_reference_and_cpu(B, n, m, dtype, shared, log_domain, eps):
    need_native()
    T, reg = 5, 0.1
    for zeros in (0, 2):
        a, b, cost = problem(B, n, m, dtype, shared, zeros)
        out = native(a, b, cost, reg, T, eps, log_domain)
        g = torch.randn(B, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype).cuda()
        got = native_backward(g, a, b, cost, out, reg, log_domain)
        assert got[0].shape == a.shape and got[1].shape == b.shape and got[0].is_cuda
        check_grads(got, ref_grads(a, b, cost, reg, T, eps, g), GRAD_TOL[dtype])
        cpu = torch.ops.wkd.sinkhorn_backward(g.cpu(), a.cpu(), b.cpu(), cost.cpu(), *(t.cpu() for t in out[3:]),
                                              reg, log_domain)
        check_grads(got, cpu, GRAD_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 10])
def test_backward_number_of_iterations(T):
    need_native()
    for shared, log_domain in ((True, False), (False, False), (True, True)):
        a, b, cost = problem(5, 20, 17, F64, shared, zeros=1)
        out = native(a, b, cost, 0.1, T, 1e-8, log_domain)
        g = torch.ones(5, dtype=F64, device="cuda")
        got = native_backward(g, a, b, cost, out, 0.1, log_domain)
        check_grads(got, ref_grads(a, b, cost, 0.1, T, 1e-8, g), GRAD_TOL[F64])


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_backward_big_tiles_match_cpu(B, n, m, dtype):
    need_native()
    a, b, cost = problem(B, n, m, dtype, True, zeros=1)
    out = native(a, b, cost, 0.05, 10, 1e-8)
    g = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype).cuda()
    got = native_backward(g, a, b, cost, out, 0.05)
    c64 = [t.double().cpu() for t in (a, b, cost)]
    o64 = cpu_op(*c64, 0.05, 10, 1e-8)
    want = torch.ops.wkd.sinkhorn_backward(g.double().cpu(), *c64, *o64[3:], 0.05, False)
    check_grads(got, want, GRAD_TOL[dtype])


# ------------------------------------------------------------------------------------------ both backends, wrapper
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
def test_both_backends_through_wkd_sinkhorn(backend, shared, log_domain):
    if backend == "cuda":
        need_native()
    else:
        pytest.importorskip("wkd_kernels.triton.sinkhorn")
    before = wk.ops._cuda_backend
    try:
        wk.set_cuda_backend(backend)
        for dtype in (F64, F32):
            a, b, cost = problem(6, 50, 40, dtype, shared, zeros=2)
            a.requires_grad_()
            b.requires_grad_()
            res = wk.sinkhorn(a, b, cost, 0.05, 10, eps=1e-8, log_domain=log_domain)
            w = torch.linspace(0.5, 1.5, 6, dtype=dtype, device="cuda")
            ga, gb = torch.autograd.grad((res.value * w).sum(), (a, b))
            ac, bc = a.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
            want = wk.sinkhorn(ac, bc, cost.cpu(), 0.05, 10, eps=1e-8, log_domain=log_domain)
            wa, wb = torch.autograd.grad((want.value * w.cpu()).sum(), (ac, bc))
            assert rel(res.value, want.value) <= TOL[dtype]
            assert rel(res.log_u, want.log_u) <= 2 * TOL[dtype]
            assert rel(res.log_v, want.log_v) <= 2 * TOL[dtype]
            check_grads((ga, gb), (wa, wb), GRAD_TOL[dtype])
    finally:
        wk.ops._cuda_backend = before


@pytest.mark.gpu
def test_half_inputs_through_cuda_backend(cuda_backend):
    a, b, cost = problem(3, 16, 16, F64, True)
    for dt in (torch.float16, torch.bfloat16):
        res = wk.sinkhorn(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)
        assert res.value.dtype == F32
        ref = sinkhorn_reference(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)[0]
        assert rel(res.value, ref) <= 1e-5


# ------------------------------------------------------------------------------------------ opcheck, compile, graphs
def _cuda_samples():
    out = []
    for B, n, m in ((3, 5, 4), (4, 33, 20)):
        a, b = simplex(B, n, zeros=1).cuda(), simplex(B, m, seed=2).cuda()
        for cost in (rand_cost(n, m).cuda(), rand_cost(B, n, m).cuda()):
            for log_domain in (False, True):
                for keep in (True, False):
                    for dtype in (F32, F64):
                        out.append((a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), cost.to(dtype),
                                    0.1, 4, 1e-8 if log_domain else 0.0, log_domain, keep))
    return out


@pytest.mark.gpu
def test_opcheck_wkd_sinkhorn_cuda(cuda_backend):
    for args in _cuda_samples():
        torch.library.opcheck(torch.ops.wkd.sinkhorn.default, args)


@pytest.mark.gpu
def test_opcheck_native_ops():
    """The CUDA C++ kernels are the CUDA kernels of wkd::sinkhorn / wkd::sinkhorn_backward themselves."""
    need_native()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn_backward", "CUDA")
    for shared in (True, False):
        for log_domain in (False, True):
            a, b, cost = problem(3, 9, 7, F64, shared, zeros=1)
            eps = 1e-8 if log_domain else 0.0
            args = (a, b, cost, 0.1, 4, eps, log_domain, True)
            torch.library.opcheck(torch.ops.wkd.sinkhorn.default, args)
            out = native(*args)
            g = torch.ones(3, dtype=F64, device="cuda")
            torch.library.opcheck(torch.ops.wkd.sinkhorn_backward.default,
                                  (g, a, b, cost, *out[3:], 0.1, log_domain))


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_with_backward(cuda_backend, compile_backend):
    torch._dynamo.reset()
    a, b, cost = problem(8, 40, 40, F32, True, zeros=1)

    def loss(logits, b):
        return wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8).value.mean()

    x = torch.randn(8, 40, device="cuda", requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)
    l1 = compiled(x, b)
    (g1,) = torch.autograd.grad(l1, x)
    l2 = loss(x, b)
    (g2,) = torch.autograd.grad(l2, x)
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
def test_no_host_synchronisation(cuda_backend):
    a, b, cost = problem(16, 100, 100, F32, True, zeros=1)
    a.requires_grad_()
    per_row = rand_cost(16, 100, 100, dtype=F32).cuda()
    cases = ((cost, False), (cost, True), (per_row, False))

    def run():
        for c, log_domain in cases:
            res = wk.sinkhorn(a, b, c, 0.05, 10, eps=1e-8, log_domain=log_domain, check_values=False)
            (ga,) = torch.autograd.grad(res.value.sum(), a)
        return ga

    run()  # warm-up: first-call allocations and initialisation happen outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ga = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(ga).all()


@pytest.mark.gpu
@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, False), (True, True)])
def test_cuda_graph_capture_forward_backward(shared, log_domain):
    """Forward + backward of the native ops captured in one CUDA graph, replayed on new inputs."""
    need_native()
    B, n, m, T, reg, eps = 32, 100, 90, 10, 0.05, 1e-8
    a, b, cost = problem(B, n, m, F32, shared, zeros=1)
    g = torch.ones(B, device="cuda")

    def step(a, b):
        out = native(a, b, cost, reg, T, eps, log_domain)
        ga, gb = native_backward(g, a, b, cost, out, reg, log_domain)
        return out[0], ga, gb

    sa, sb = a.clone(), b.clone()
    graph, outs, _ = capture_cuda_graph(lambda: step(sa, sb), warmup=2)
    a2, b2, _ = problem(B, n, m, F32, shared, zeros=2, seed=10)
    sa.copy_(a2)
    sb.copy_(b2)
    graph.replay()
    torch.cuda.synchronize()
    want = step(a2, b2)
    for x, y in zip(outs, want):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_graph_capture_through_autograd(cuda_backend):
    """wkd_kernels.sinkhorn + torch.autograd.grad captured in a CUDA graph (the training-step pattern)."""
    B, n = 64, 200
    a, b, cost = problem(B, n, n, F32, True, zeros=1)
    logits = torch.randn(B, n, device="cuda", requires_grad=True)

    def step():
        value = wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8).value.sum()
        return torch.autograd.grad(value, logits)[0]

    graph, grad, _ = capture_cuda_graph(step, warmup=3)
    with torch.no_grad():
        logits.copy_(torch.randn(B, n, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(grad, step(), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ real data, WKD-L size
@pytest.mark.gpu
@pytest.mark.parametrize("log_domain", [False, True])
def test_real_imagenet_cost_b256(log_domain):
    """WKD-L on ImageNet: B=256, C=1000, sharpened CKA cost, target class removed by zero mass, vs the CPU op."""
    need_native()
    d = load_cost_matrix("imagenet_resnet34_cka_distance.pth")
    cost = (torch.relu(1 - torch.exp(-d)) + 1e-8).float()
    B, C = 256, cost.shape[0]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (B,), generator=g)
    mask = torch.ones(B, C).scatter_(1, y[:, None], 0.0)
    a = torch.softmax(torch.randn(B, C, generator=g) / 2, 1) * mask
    b = torch.softmax(torch.randn(B, C, generator=g) * 3 / 2, 1) * mask
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    reg, T, eps = 0.05, 10, 1e-8
    out = native(a.cuda(), b.cuda(), cost.cuda(), reg, T, eps, log_domain)
    assert torch.isfinite(out[0]).all()
    cpu64 = cpu_op(a.double(), b.double(), cost.double(), reg, T, eps, log_domain)
    assert rel(out[0], cpu64[0]) <= 1e-5  # float32 against float64: the accuracy target
    if not log_domain:  # (the CPU log domain runs row by row: slow at this size, compared in float64 only)
        assert rel(out[0], cpu_op(a, b, cost, reg, T, eps, log_domain)[0]) <= 1e-5
    gv = torch.ones(B)
    got = native_backward(gv.cuda(), a.cuda(), b.cuda(), cost.cuda(), out, reg, log_domain)
    want = torch.ops.wkd.sinkhorn_backward(gv.double(), a.double(), b.double(), cost.double(), *cpu64[3:], reg,
                                           log_domain)
    check_grads(got, want, 1e-4)


# ------------------------------------------------------------------------------------------ host emulation (no GPU)
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WKD_TEST_CUDA_EMULATION", "0") != "1",
                    reason="opt-in (WKD_TEST_CUDA_EMULATION=1): builds csrc/cuda/sinkhorn.cu as host C++, minutes")
@pytest.mark.parametrize("sms", [1, 1000], ids=["tiles32x64", "tiles16x32"])
def test_kernels_under_host_emulation(tmp_path, sms):
    """The CUDA kernel source, run on CPU tensors by the fiber emulator, against the CPU op and the reference.

    python_tests/cuda_emulation/check_emulated_kernels.py builds emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu with
    WKD_CUDA_EMULATE: the library wkd_cuda_emu, loadable next to wkd_kernels._C) and compares its ops with
    torch.ops.wkd.*. WKD_EMU_SMS sets the emulated multiprocessor count: 1 makes every product take the 32 x 64
    tiles, 1000 the 16 x 32 tiles. Runs in a subprocess (a fault in the emulator does not take pytest down). Set
    WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    bdir = os.environ.get("WKD_EMU_BUILD_DIR", str(tmp_path / "build"))
    env = dict(os.environ, WKD_EMU_SMS=str(sms))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(EMULATION / "check_emulated_kernels.py"), bdir], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "EMULATION OK" in proc.stdout


# ---------------------------------------------- host emulation of the single-launch kernels (issue 13 item 1)
# Self-contained (its own imports), so that it can move with the emulation test above.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WKD_TEST_CUDA_EMULATION", "0") != "1",
                    reason="opt-in (WKD_TEST_CUDA_EMULATION=1): builds csrc/cuda/sinkhorn.cu as host C++, minutes")
def test_single_launch_kernels_under_host_emulation(tmp_path):
    """The single-launch kernels (shared cost, C <= 256), emulated, against the CPU op and the float64 reference.

    python_tests/cuda_emulation/check_small_c_kernels.py: C in {1, 3, 81, 91, 100, 256} and n != m, odd B, zero-mass
    entries, both domains, float32/float64, eps 0 and 1e-8, history on/off, forward and backward; 1 launch per
    direction (2 with the kernel matrix off chip), bitwise today's kernels in the scaling domain, and every entry of
    the tile table of today's kernels. Set WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    bdir = os.environ.get("WKD_EMU_BUILD_DIR", str(tmp_path / "build"))
    env = dict(os.environ, WKD_EMU_SMS="8")
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(here / "cuda_emulation" / "check_small_c_kernels.py"), bdir],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "SMALL-C EMULATION OK" in proc.stdout
