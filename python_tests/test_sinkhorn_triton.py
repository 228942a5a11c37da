"""Triton Sinkhorn kernels (wkd_kernels/triton/sinkhorn.py, torch.ops.wkd.sinkhorn_triton / _backward) against the
float64 reference and the CPU op.

They run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (small shapes: the interpreter is slow):
    TRITON_INTERPRET=1 python -m pytest python_tests/test_sinkhorn_triton.py -q
Outputs (value, u, v and the whole history hist_r, hist_s, y) must match the CPU op torch.ops.wkd.sinkhorn, the
value and scalings must match wkd_kernels.reference.sinkhorn_reference (float64), and the backward must match both
torch.ops.wkd.sinkhorn_backward and torch.autograd.grad through the reference.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import wkd_kernels  # noqa: F401,E402  (registers torch.ops.wkd.*)
from conftest import capture_cuda_graph, simplex, triton_device  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402
from wkd_kernels.triton import sinkhorn as sk  # noqa: E402

F64, F32 = torch.float64, torch.float32
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")
# vs the CPU op (same recurrences, same dtype) and vs the float64 reference (float32 inputs: float32 rounding).
TOL_CPU = {F32: 1e-5, F64: 1e-10}
TOL_REF = {F32: 1e-5, F64: 1e-10}
TOL_REF_GRAD = {F32: 1e-4, F64: 1e-10}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def dev():
    return triton_device()


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles, so that the small test sizes span several tiles in every dimension (with ragged edges)."""
    monkeypatch.setattr(sk, "DOT_CONFIG", {F32: (16, 16, 16, 4), F64: (16, 16, 16, 4)})
    monkeypatch.setattr(sk, "ROWS_CONFIG", {F32: (16, 16, 4), F64: (16, 16, 4)})


def problem(B, n, m, dtype, shared, zeros_a=0, zeros_b=0, seed=0):
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=g, dtype=F64).to(dtype)
    return a, b, cost


def close(got, want, tol, what="", floor=1e-300):
    """Same shape and dtype, same non-finite entries (-inf of the log domain), and max |got - want| over the finite
    entries <= tol * max(max |want| of the same last-dim row, floor). Logs use floor=1 (an absolute error in a log is
    a relative error of its exponential); gradients a small floor (some are 0 up to rounding)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    x, y = got.detach().double().cpu(), want.detach().double().cpu()
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    assert torch.equal(fx, fy), f"{what}: non-finite entries differ"
    assert torch.equal(x[~fx], y[~fy]), f"{what}: non-finite values differ"
    if x.numel() == 0:
        return
    x0, y0 = torch.where(fx, x, 0.0), torch.where(fy, y, 0.0)
    scale = y0.abs().amax(dim=-1, keepdim=True).clamp_min(floor)
    err = ((x0 - y0).abs() / scale).max().item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def run_triton(a, b, cost, reg, T, eps, log_domain, dev, keep_history=True, precision="ieee"):
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    return sk.sinkhorn_forward(a, b, cost, reg, T, eps, log_domain, keep_history, precision)


def ref_value_and_grads(a, b, cost, reg, T, eps, log_domain, g):
    """Value, scalings (logs for the log domain) and the exact gradient from autograd through the float64
    reference. The gradient always goes through the scaling-domain loop, whose derivative at zero-mass entries
    is the one the kernels compute (the log-domain reference masks log(0) and so reports 0 there); in float64
    K = exp(-cost/reg) does not underflow at the tested sizes of cost/reg."""
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    value, u, v = sinkhorn_reference(a64, b64, cost.double(), reg, T, eps, False)
    ga, gb = torch.autograd.grad((value * g.double()).sum(), (a64, b64))
    u, v = u.detach(), v.detach()
    if log_domain:
        u, v = u.log(), v.log()
    return value.detach(), u, v, ga, gb


def check_all(a, b, cost, reg, T, eps, log_domain, dev, ref_tol=None, grad_tol=None):
    """Forward and backward of the Triton kernels vs the CPU op (all outputs) and vs the float64 reference."""
    dt = a.dtype
    B = a.shape[0]
    out = run_triton(a, b, cost, reg, T, eps, log_domain, dev)
    cpu = torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, True)
    lf = 1.0 if log_domain else 1e-300  # floor for the scalings and history (logs in the log domain)
    assert len(out) == len(cpu) == len(OUTPUTS)
    for name, x, y in zip(OUTPUTS, out, cpu):
        assert x.device.type == torch.device(dev).type
        close(x, y, TOL_CPU[dt], f"{name} vs CPU op", floor=1e-300 if name == "value" else lf)
    g = torch.linspace(0.5, 1.5, B, dtype=dt)
    value, u, v, ga_ref, gb_ref = ref_value_and_grads(a, b, cost, reg, T, eps, log_domain, g)
    # Gradient errors are measured against the scale of the whole gradient: some entries are 0 up to rounding
    # (e.g. grad_b of a 1 x 1 problem, where the value does not depend on b).
    gfl = max(ga_ref.abs().max().item(), gb_ref.abs().max().item())
    ga, gb = sk.sinkhorn_backward(g.to(dev), a.to(dev), b.to(dev), cost.to(dev), *out[3:], reg, log_domain)
    ga_cpu, gb_cpu = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *cpu[3:], reg, log_domain)
    close(ga, ga_cpu, TOL_CPU[dt], "grad_a vs CPU op", floor=gfl)
    close(gb, gb_cpu, TOL_CPU[dt], "grad_b vs CPU op", floor=gfl)

    rt = ref_tol or TOL_REF[dt]
    close(out[0].double(), value, rt, "value vs reference")
    close(out[1].double(), u, rt * 10, "u vs reference", floor=lf)
    close(out[2].double(), v, rt * 10, "v vs reference", floor=lf)
    gt = grad_tol or TOL_REF_GRAD[dt]
    close(ga.double(), ga_ref, gt, "grad_a vs reference", floor=gfl)
    close(gb.double(), gb_ref, gt, "grad_b vs reference", floor=gfl)
    return out


# ------------------------------------------------------------------------------------------------ forward + backward
KINDS = [(True, False), (False, False), (True, True), (False, True)]  # (shared cost, log domain): 4 kernel families
KIND_IDS = ["shared-scaling", "per_row-scaling", "shared-log", "per_row-log"]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_multi_tile(dev, small_blocks, dtype, shared, log_domain):
    """16-wide tiles: 3 x 2 output tiles and 3 x 2 k-steps with ragged edges (the tl.dot kernels also 2 row tiles),
    zero masses in a and b; eps = 0 in float64, 1e-8 in float32."""
    B = 2 if log_domain or not shared else 17
    a, b, cost = problem(B, 35, 20, dtype, shared, zeros_a=3, zeros_b=2, seed=1)
    check_all(a, b, cost, 0.1, 2, 0.0 if dtype == F64 else 1e-8, log_domain, dev)


@pytest.mark.parametrize("shape", [(2, 70, 9, 2), (1, 1, 1, 2)], ids=["2x70x9", "1x1x1"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_odd_shapes_default_blocks(dev, shape, shared, log_domain):
    """The shipped block sizes: n > BLOCK_N with m tiny, and the degenerate 1 x 1 problem (float64, eps = 1e-8)."""
    B, n, m, T = shape
    a, b, cost = problem(B, n, m, F64, shared, zeros_a=5 if n > 1 else 0, seed=2)
    check_all(a, b, cost, 0.1, T, 1e-8, log_domain, dev)


@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_wkdl_like_float32(dev, shared, log_domain):
    """WKD-L's setting in small: float32, reg 0.05, eps 1e-8, the target class removed (one zero per row of a),
    a square cost; the shipped block sizes."""
    B, n = 3, 29
    a, b, cost = problem(B, n, n, F32, shared, zeros_a=1, seed=7)
    check_all(a, b, cost, 0.05, 4, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_log_domain_small_reg(dev, small_blocks, dtype, shared):
    """reg=1e-2 with cost in [0, 1]: K = exp(-cost/reg) reaches e^-100 (below float32's normal range), the log
    domain still matches (the online max shift sees a large dynamic range across tiles). float32 vs float64:
    L = -cost/reg is rounded to float32 (|L| <= 100, abs error 4e-6), which moves the plan by a few 1e-6; the CPU op
    rounds identically and is matched to 1e-5."""
    a, b, cost = problem(2, 23, 18, dtype, shared, zeros_a=2, zeros_b=1, seed=3)
    out = check_all(a, b, cost, 1e-2, 3, 1e-8, True, dev,
                    ref_tol=1e-4 if dtype == F32 else None, grad_tol=1e-3 if dtype == F32 else None)
    assert torch.isfinite(out[0]).all()


def test_log_domain_matches_scaling_domain(dev, small_blocks):
    """Same mathematics: the two domains agree in float64 where K does not underflow."""
    a, b, cost = problem(2, 19, 26, F64, True, 2, 2, seed=5)
    s = run_triton(a, b, cost, 0.2, 4, 0.0, False, dev)
    lg = run_triton(a, b, cost, 0.2, 4, 0.0, True, dev)
    close(lg[0], s[0], 1e-12, "value")
    close(lg[1].exp(), s[1], 1e-12, "u")
    close(lg[2].exp(), s[2], 1e-12, "v")
    close(lg[3].exp(), s[3], 1e-12, "hist_r")
    close(lg[4].exp(), s[4], 1e-12, "hist_s")
    close(lg[5].exp(), s[5], 1e-12, "y")


@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, True)], ids=["shared-scaling", "per_row-log"])
def test_keep_history_false(dev, small_blocks, shared, log_domain):
    B, n, m, T = 2, 20, 17, 3
    a, b, cost = problem(B, n, m, F64, shared, 1, 1, seed=11)
    full = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=True)
    light = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=False)
    assert light[3].shape == (0, B, n) and light[4].shape == (0, B, m) and light[5].shape == (0, n)
    assert full[3].shape == (T, B, n) and full[4].shape == (T, B, m) and full[5].shape == (B, n)
    for name, x, y in zip(("value", "u", "v"), light[:3], full[:3]):
        close(x, y, 1e-14, name)
    cpu = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, T, 1e-8, log_domain, False)
    for name, x, y in zip(OUTPUTS, light, cpu):
        close(x, y, TOL_CPU[F64], name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_non_contiguous_inputs(dev, small_blocks, shared):
    B, n, m, T = 2, 18, 21, 2
    a, b, cost = problem(B, n, m, F32, shared, 1, 1, seed=13)
    a_nc = a.t().contiguous().t()
    b_nc = b.new_empty(m, B).t().copy_(b)
    cost_nc = cost.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous() and not cost_nc.is_contiguous()
    want = run_triton(a, b, cost, 0.1, T, 0.0, False, dev)
    got = run_triton(a_nc, b_nc, cost_nc, 0.1, T, 0.0, False, dev)
    for name, x, y in zip(OUTPUTS, got, want):
        close(x, y, 1e-6, name)
    g2 = torch.linspace(0.5, 1.5, 2 * B, dtype=F32).to(dev)
    ga, gb = sk.sinkhorn_backward(g2[::2], a_nc.to(dev), b_nc.to(dev), cost_nc.to(dev), *got[3:], 0.1, False)
    ga0, gb0 = sk.sinkhorn_backward(g2[::2].contiguous(), a.to(dev), b.to(dev), cost.to(dev), *want[3:], 0.1, False)
    close(ga, ga0, 1e-6, "grad_a")
    close(gb, gb0, 1e-6, "grad_b")


def test_fp32_dot_precision_argument(dev, small_blocks):
    """`precision` selects the float32 tl.dot input precision per call (no global state); float64 ignores it."""
    a, b, cost = problem(3, 20, 20, F32, True, 1, 0, seed=17)
    ieee = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev)
    for p in ("tf32x3", "tf32"):
        out = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev, precision=p)
        close(out[0], ieee[0], 1e-5 if p == "tf32x3" else 1e-2, f"value ({p})")
        op = torch.ops.wkd.sinkhorn_triton(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 0.0, False, True, p)
        for name, x, y in zip(OUTPUTS, op, out):
            close(x, y, 0.0, f"{name} (op, {p})")
    a64, b64, c64 = a.double(), b.double(), cost.double()
    d_ieee = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev)
    d_tf32 = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev, precision="tf32")
    for name, x, y in zip(OUTPUTS, d_tf32, d_ieee):
        close(x, y, 0.0, f"{name} (float64 ignores precision)")


def test_bad_arguments(dev):
    """The Triton ops check their arguments before any kernel (ops.py; the launchers do not check), with the
    messages of the C++ ops."""
    a, b, cost = problem(2, 5, 4, F32, True, seed=1)
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    fwd, bwd = torch.ops.wkd.sinkhorn_triton, torch.ops.wkd.sinkhorn_triton_backward
    with pytest.raises(ValueError, match="wkd.sinkhorn_triton: `cost` must be"):
        fwd(a, b, cost.t(), 0.1, 3)
    with pytest.raises(TypeError, match="dtype"):
        fwd(a, b.double(), cost, 0.1, 3)
    with pytest.raises(ValueError, match="num_iters"):
        fwd(a, b, cost, 0.1, 0)
    with pytest.raises(ValueError, match="reg"):
        fwd(a, b, cost, 0.0, 3)
    with pytest.raises(ValueError, match="eps"):
        fwd(a, b, cost, 0.1, 3, eps=-1.0)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        fwd(a, b, cost, 0.1, 3, precision="fp16")
    value, u, v, hr, hs, y = fwd(a, b, cost, 0.1, 3, keep_history=False)
    g = torch.ones_like(value)
    with pytest.raises(ValueError, match="keep_history"):
        bwd(g, a, b, cost, hr, hs, y, 0.1)
    value, u, v, hr, hs, y = fwd(a, b, cost, 0.1, 3)
    with pytest.raises(ValueError, match="wkd.sinkhorn_triton_backward: `hist_s` must be"):
        bwd(g, a, b, cost, hr, hs[:2], y, 0.1)
    with pytest.raises(ValueError, match="`y` must be"):
        bwd(g, a, b, cost, hr, hs, y[:1], 0.1)
    with pytest.raises(ValueError, match="grad_value"):
        bwd(g[:1], a, b, cost, hr, hs, y, 0.1)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        bwd(g, a, b, cost, hr, hs, y, 0.1, False, "TF32")


@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, True)], ids=["shared-scaling", "per_row-log"])
def test_triton_ops_opcheck_and_autograd(dev, small_blocks, shared, log_domain):
    """torch.ops.wkd.sinkhorn_triton and its backward op: schema, fake kernel, autograd registration (opcheck), and
    the gradient through autograd equal to the Triton backward launcher's."""
    a, b, cost = problem(3, 9, 7, F64, shared, 1, 1, seed=23)
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    eps = 1e-8 if log_domain else 0.0
    for keep in (True, False):
        torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default,
                              (a.clone().requires_grad_(), b.clone().requires_grad_(), cost, 0.1, 3, eps, log_domain,
                               keep, "ieee"))
    out = torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 3, eps, log_domain, True)
    gv = torch.linspace(0.5, 1.5, 3, dtype=F64).to(dev)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton_backward.default,
                          (gv, a, b, cost, *out[3:], 0.1, log_domain, "ieee"))
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = torch.ops.wkd.sinkhorn_triton(a1, b1, cost, 0.1, 3, eps, log_domain, True)[0]
    ga, gb = torch.autograd.grad((value * gv).sum(), (a1, b1))
    ga0, gb0 = sk.sinkhorn_backward(gv, a, b, cost, *out[3:], 0.1, log_domain)
    close(ga, ga0, 0.0, "grad_a through autograd")
    close(gb, gb0, 0.0, "grad_b through autograd")


def test_split_scalar_keeps_float64():
    for x in (0.1, 1e-8, 1e-2, 3.0, -18.420680743952367, 1e-300, 1e300, 0.0):
        hi, lo = sk._split(x)
        assert hi + lo == x
        assert hi == float(torch.tensor(hi, dtype=F32)) or lo == 0.0


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_cuda_routing_opcheck_compile_and_graph_capture(monkeypatch):
    """On CUDA: torch.ops.wkd.sinkhorn_triton runs these kernels, passes opcheck, works under
    torch.compile(fullgraph=True) with autograd; wk.sinkhorn with the Triton backend selected routes to it; the
    forward + backward replay from a captured CUDA graph."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiled Triton kernels only (TRITON_INTERPRET=1 is set)")
    import wkd_kernels as wk
    from wkd_kernels import ops

    a, b, cost = (t.cuda() for t in problem(4, 50, 45, F32, True, 1, 1, seed=19))
    args = (a, b, cost, 0.1, 5, 1e-8, False, True)
    want = sk.sinkhorn_forward(*args)
    got = torch.ops.wkd.sinkhorn_triton(*args)
    for name, x, y in zip(OUTPUTS, got, want):
        close(x, y, 0.0, f"{name} (op)")
    monkeypatch.setattr(ops, "_cuda_backend", "triton")
    res = wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8)
    close(res.value, want[0], 0.0, "wk.sinkhorn with the Triton backend")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, args)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, (a, b, cost, 0.05, 3, 0.0, True, True))
    gv = torch.linspace(0.5, 1.5, 4, device="cuda")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton_backward.default, (gv, a, b, cost, *want[3:], 0.1, False))

    def loss(a, b):
        return (torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 5, 1e-8, False, True)[0] * gv).sum()

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(torch.compile(loss, fullgraph=True)(a1, b1), (a1, b1))
    ga0, gb0 = sk.sinkhorn_backward(gv, a, b, cost, *want[3:], 0.1, False)
    close(ga, ga0, 1e-6, "compiled grad_a")
    close(gb, gb0, 1e-6, "compiled grad_b")

    def step():
        out = sk.sinkhorn_forward(*args)
        return out + sk.sinkhorn_backward(gv, a, b, cost, *out[3:], 0.1, False)

    graph, captured, eager = capture_cuda_graph(step)  # the warm-up compiles the kernels outside the capture
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager):
        close(x, y, 0.0, "graph replay")
