"""The CUDA C++ Sinkhorn kernels (csrc/cuda/sinkhorn.cu, csrc/cuda/sinkhorn/): on a GPU (marked gpu, deselected
without one) the big tile configuration, determinism, streams, CUDA graphs, no host synchronisation and the real
ImageNet cost at B=256; without a GPU, their source compiled as host C++ against csrc/cuda/cuda_emu.cuh and run by
the host emulation (opt-in: WKD_TEST_CUDA_EMULATION=1, a few minutes; the programs are in
python_tests/cuda_emulation/) against the CPU op.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wkd_kernels as wk
from conftest import REPO, assert_close, capture_cuda_graph, load_cost_matrix, rand_cost
from sinkhorn_harness import F32, F64, OUTPUTS, TOL, check_grads, cpu_op, problem


# ------------------------------------------------------------------------------------------------------------- on a GPU
SIZES_BIG = [(129, 1001, 999), (256, 1000, 1000)]


def need_native():
    from conftest import make_backend

    return make_backend("cuda")


def native(a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True):
    """torch.ops.wkd.sinkhorn on CUDA tensors: the CUDA C++ kernels (need_native() checked they were built)."""
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, keep)


def native_backward(g, a, b, cost, out, reg, log_domain=False):
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log_domain)


def cproblem(B, n, m, dtype, shared, zeros=0, seed=0):
    return tuple(t.cuda() for t in problem(B, n, m, dtype, shared, zeros, seed))


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_forward_big_tiles_match_cpu(B, n, m, dtype):
    """Sizes that take the 32 x 64 tiles, odd and even; float32 against the float64 CPU op (accuracy target)."""
    need_native()
    for zeros in (0, 1):
        a, b, cost = cproblem(B, n, m, dtype, True, zeros)
        out = native(a, b, cost, 0.05, 10, 1e-8)
        cpu = cpu_op(a, b, cost, 0.05, 10, 1e-8)
        for name, x, y in zip(OUTPUTS, out, cpu, strict=False):
            assert_close(x, y, TOL[("op", dtype)].outputs_cpu, what=name)
        cpu64 = cpu_op(a.double(), b.double(), cost.double(), 0.05, 10, 1e-8)
        assert_close(out[0], cpu64[0], TOL[("op", dtype)].value_cpu, what="value vs float64")


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_backward_big_tiles_match_cpu(B, n, m, dtype):
    need_native()
    a, b, cost = cproblem(B, n, m, dtype, True, zeros=1)
    out = native(a, b, cost, 0.05, 10, 1e-8)
    g = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype).cuda()
    got = native_backward(g, a, b, cost, out, 0.05)
    c64 = [t.double().cpu() for t in (a, b, cost)]
    o64 = cpu_op(*c64, 0.05, 10, 1e-8)
    want = torch.ops.wkd.sinkhorn_backward(g.double().cpu(), *c64, *o64[3:], 0.05, False)
    check_grads(got, want, TOL[("op", dtype)].grad_cpu)


@pytest.mark.gpu
def test_deterministic():
    """The per-row value is reduced in a fixed order (no float atomics): bitwise repeatable."""
    need_native()
    a, b, cost = cproblem(256, 1000, 1000, F32, True, zeros=1)
    first = native(a, b, cost, 0.05, 10, 1e-8)
    second = native(a, b, cost, 0.05, 10, 1e-8)
    for x, y in zip(first, second, strict=False):
        assert torch.equal(x, y)
    g = torch.randn(256, device="cuda")
    ga1 = native_backward(g, a, b, cost, first, 0.05)
    ga2 = native_backward(g, a, b, cost, first, 0.05)
    assert torch.equal(ga1[0], ga2[0]) and torch.equal(ga1[1], ga2[1])


@pytest.mark.gpu
def test_noncontiguous_inputs_and_side_stream():
    need_native()
    a, b, cost = cproblem(8, 24, 20, F64, True, zeros=1)
    a_nc = a.t().contiguous().t()  # same values, column-major strides
    cost_nc = cost.t().contiguous().t()
    want = native(a, b, cost, 0.1, 5)
    got = native(a_nc, b, cost_nc, 0.1, 5)
    for x, y in zip(got, want, strict=False):
        assert torch.equal(x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got_s = native(a, b, cost, 0.1, 5)
    torch.cuda.current_stream().wait_stream(s)
    for x, y in zip(got_s, want, strict=False):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_bad_input_raises_same_messages():
    need_native()
    a, b, cost = cproblem(2, 4, 3, F64, True)
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


@pytest.mark.gpu
def test_no_host_synchronisation():
    need_native()
    a, b, cost = cproblem(16, 100, 100, F32, True, zeros=1)
    a.requires_grad_()
    per_row = rand_cost(16, 100, 100, dtype=F32).cuda()
    cases = ((cost, False), (cost, True), (per_row, False))

    def run():
        for c, log_domain in cases:
            res = wk.sinkhorn(a, b, c, 0.05, 10, eps=1e-8, log_domain=log_domain, check_values=False,
                              backend="cuda")
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
    a, b, cost = cproblem(B, n, m, F32, shared, zeros=1)
    g = torch.ones(B, device="cuda")

    def step(a, b):
        out = native(a, b, cost, reg, T, eps, log_domain)
        ga, gb = native_backward(g, a, b, cost, out, reg, log_domain)
        return out[0], ga, gb

    sa, sb = a.clone(), b.clone()
    graph, outs, _ = capture_cuda_graph(lambda: step(sa, sb), warmup=2)
    a2, b2, _ = cproblem(B, n, m, F32, shared, zeros=2, seed=10)
    sa.copy_(a2)
    sb.copy_(b2)
    graph.replay()
    torch.cuda.synchronize()
    want = step(a2, b2)
    for x, y in zip(outs, want, strict=False):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_graph_capture_through_autograd():
    """wkd_kernels.sinkhorn + torch.autograd.grad captured in a CUDA graph (the training-step pattern)."""
    need_native()
    B, n = 64, 200
    a, b, cost = cproblem(B, n, n, F32, True, zeros=1)
    logits = torch.randn(B, n, device="cuda", requires_grad=True)

    def step():
        value = wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8, backend="cuda").value.sum()
        return torch.autograd.grad(value, logits)[0]

    graph, grad, _ = capture_cuda_graph(step, warmup=3)
    with torch.no_grad():
        logits.copy_(torch.randn(B, n, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(grad, step(), rtol=1e-6, atol=1e-9)


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
    assert_close(out[0], cpu64[0], 1e-5)  # float32 against float64: the accuracy target
    if not log_domain:  # (the CPU log domain runs row by row: slow at this size, compared in float64 only)
        assert_close(out[0], cpu_op(a, b, cost, reg, T, eps, log_domain)[0], 1e-5)
    gv = torch.ones(B)
    got = native_backward(gv.cuda(), a.cuda(), b.cuda(), cost.cuda(), out, reg, log_domain)
    want = torch.ops.wkd.sinkhorn_backward(gv.double(), a.double(), b.double(), cost.double(), *cpu64[3:], reg,
                                           log_domain)
    check_grads(got, want, 1e-4)


# --------------------------------------------------------------- host emulation of the CUDA C++ source (no GPU; opt-in)
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"


def run_emulation_check(script, marker, tmp_path, sms):
    """Run python_tests/cuda_emulation/<script> in a subprocess (a fault in the emulator does not take pytest down)
    with WKD_EMU_SMS = sms emulated multiprocessors; it must exit 0 and print `marker`. The build goes to
    WKD_EMU_BUILD_DIR when set (reused between runs), else under tmp_path."""
    bdir = os.environ.get("WKD_EMU_BUILD_DIR", str(tmp_path / "build"))
    env = dict(os.environ, WKD_EMU_SMS=str(sms))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(EMULATION / script), bdir], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert marker in proc.stdout


@pytest.mark.slow
@pytest.mark.cuda_emulation  # opt-in: WKD_TEST_CUDA_EMULATION=1 (deselected otherwise; conftest.OPT_IN)
@pytest.mark.parametrize("sms", [1, 1000], ids=["tiles32x64", "tiles16x32"])
def test_kernels_under_host_emulation(tmp_path, sms):
    """The CUDA kernel source, run on CPU tensors by the fiber emulator, against the CPU op and the reference.

    python_tests/cuda_emulation/check_emulated_kernels.py builds emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu with
    WKD_CUDA_EMULATE: the library wkd_cuda_emu, loadable next to wkd_kernels._C) and compares its ops with
    torch.ops.wkd.*. WKD_EMU_SMS sets the emulated multiprocessor count: 1 makes every product take the 32 x 64
    tiles, 1000 the 16 x 32 tiles. Runs in a subprocess (a fault in the emulator does not take pytest down). Set
    WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    run_emulation_check("check_emulated_kernels.py", "EMULATION OK", tmp_path, sms=sms)


@pytest.mark.slow
@pytest.mark.cuda_emulation  # opt-in: WKD_TEST_CUDA_EMULATION=1 (deselected otherwise; conftest.OPT_IN)
def test_single_launch_kernels_under_host_emulation(tmp_path):
    """The CUDA C++ single-launch kernels (shared cost, C <= 256), emulated, against the CPU op and the float64
    reference.

    python_tests/cuda_emulation/check_small_c_kernels.py: C in {1, 3, 81, 91, 100, 256} and n != m, odd B, zero-mass
    entries, both domains, float32/float64, eps 0 and 1e-8, history on/off, forward and backward; 1 launch per
    direction (2 with the kernel matrix off chip), bitwise today's kernels in the scaling domain. (Every entry of the
    tile table of today's kernels: test_tuning_ops_under_host_emulation.) Set WKD_EMU_BUILD_DIR to reuse the build
    between runs.
    """
    run_emulation_check("check_small_c_kernels.py", "SMALL-C EMULATION OK", tmp_path, sms=8)


@pytest.mark.slow
@pytest.mark.cuda_emulation  # opt-in: WKD_TEST_CUDA_EMULATION=1 (deselected otherwise; conftest.OPT_IN)
def test_tuning_ops_under_host_emulation(tmp_path):
    """The tuning ops (wkd_tuning::sinkhorn / sinkhorn_backward with explicit `tile` and `rows_per_block`; emulated:
    wkd_cuda_emu_tuning::*) against the product op's automatic choice and the CPU op.

    python_tests/cuda_emulation/check_tuning_ops.py: every tile table entry at n = m = 300 and (single-launch kernels
    off) 100 x 81, bitwise the automatic choice except the value (to rounding), the products' launch shapes those of
    the entry; rows_per_block in {1, 2, 3, 4, 8, 16} at 81 x 81 and 100 x 81, both domains, float32 / float64, every
    output bitwise, the launch the one small_plan reports; rows_per_block lowered by the shared-memory plan (M off
    chip, M on chip); the automatic rows per CTA at 132 SMs (one wave, the smallest such R); ValueError for
    out-of-range choices. WKD_EMU_SMS=8.
    Set WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    run_emulation_check("check_tuning_ops.py", "TUNING EMULATION OK", tmp_path, sms=8)
