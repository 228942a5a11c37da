"""The Triton Sinkhorn kernels (wkd_kernels/triton/sinkhorn/): the per-half-iteration kernels with small tiles
(DOT_CONFIG / ROWS_CONFIG monkeypatched) so that tiny sizes span many tiles, the shipped tiles on odd shapes, the
precision argument, the Triton ops' own checks and registration, CUDA routing and graph capture (gpu). Every
forward + backward comparison: sinkhorn_harness.check_sinkhorn, TOL["tiles"].
"""
import os

import pytest
import torch

import wkd_kernels as wk
from conftest import capture_cuda_graph
from sinkhorn_harness import F32, F64, OUTPUTS, TOL, check_sinkhorn, close, tproblem, triton_backend


@pytest.fixture
def small_blocks(monkeypatch):
    """The per-half-iteration kernels with 16-wide tiles, so that the small test sizes span several tiles in every
    dimension (with ragged edges)."""
    from wkd_kernels.triton import sinkhorn as sk

    monkeypatch.setattr(sk, "DOT_CONFIG", {key: (16, 16, 16, 4) for key in sk.DOT_CONFIG})
    monkeypatch.setattr(sk, "ROWS_CONFIG", {F32: (16, 16, 4), F64: (16, 16, 4)})
    # the per-half-iteration kernels (test_sinkhorn_triton_onchip.py tests the single-launch ones)
    monkeypatch.setattr(sk, "ONCHIP_MAX_C", 0)


def run_triton(a, b, cost, reg, T, eps, log_domain, dev, keep_history=True, precision="ieee"):
    """torch.ops.wkd.sinkhorn_triton on `dev` (the op, not the launcher: its checks and registration included)."""
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    return torch.ops.wkd.sinkhorn_triton(a, b, cost, reg, T, eps, log_domain, keep_history, precision)


def check_triton(a, b, cost, reg, T, eps, log_domain, family="tiles"):
    """check_sinkhorn on the Triton backend's registered ops (the per-half-iteration kernels under small_blocks)."""
    return check_sinkhorn(triton_backend(), a, b, cost, reg, T, eps, log_domain, family,
                          g=torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype))[0]


KINDS = [(True, False), (False, False), (True, True), (False, True)]  # (shared cost, log domain): 4 kernel families


KINDS = [(True, False), (False, False), (True, True), (False, True)]  # (shared cost, log domain): 4 kernel families
KIND_IDS = ["shared-scaling", "per_row-scaling", "shared-log", "per_row-log"]


# --------------------------------------------------------------------------------------------------- forward + backward
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_multi_tile(dev, small_blocks, dtype, shared, log_domain):
    """16-wide tiles: 3 x 2 output tiles and 3 x 2 k-steps with ragged edges (the tl.dot kernels also 2 row tiles),
    zero masses in a and b; eps = 0 in float64, 1e-8 in float32."""
    B = 2 if log_domain or not shared else 17
    a, b, cost = tproblem(B, 35, 20, dtype, shared, zeros_a=3, zeros_b=2, seed=1)
    check_triton(a, b, cost, 0.1, 2, 0.0 if dtype == F64 else 1e-8, log_domain)


@pytest.mark.parametrize("shape", [(2, 70, 9, 2), (1, 1, 1, 2)], ids=["2x70x9", "1x1x1"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_odd_shapes_default_blocks(dev, shape, shared, log_domain):
    """The shipped block sizes: n > BLOCK_N with m tiny, and the degenerate 1 x 1 problem (float64, eps = 1e-8)."""
    B, n, m, T = shape
    a, b, cost = tproblem(B, n, m, F64, shared, zeros_a=5 if n > 1 else 0, seed=2)
    check_triton(a, b, cost, 0.1, T, 1e-8, log_domain)


@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_wkdl_like_float32(dev, shared, log_domain):
    """WKD-L's setting in small: float32, reg 0.05, eps 1e-8, the target class removed (one zero per row of a),
    a square cost; the shipped block sizes."""
    B, n = 3, 29
    a, b, cost = tproblem(B, n, n, F32, shared, zeros_a=1, seed=7)
    check_triton(a, b, cost, 0.05, 4, 1e-8, log_domain)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_log_domain_small_reg_small_blocks(dev, small_blocks, dtype, shared):
    """reg=1e-2 with cost in [0, 1]: K = exp(-cost/reg) reaches e^-100 (below float32's normal range), the log
    domain still matches (the online max shift sees a large dynamic range across tiles). float32 vs float64:
    L = -cost/reg is rounded to float32 (|L| <= 100, abs error 4e-6), which moves the plan by a few 1e-6; the CPU op
    rounds identically and is matched to 1e-5."""
    a, b, cost = tproblem(2, 23, 18, dtype, shared, zeros_a=2, zeros_b=1, seed=3)
    out = check_triton(a, b, cost, 1e-2, 3, 1e-8, True, family="small_reg")
    assert torch.isfinite(out[0]).all()


def test_triton_log_domain_matches_scaling_domain_small_blocks(dev, small_blocks):
    """Same mathematics: the two domains agree in float64 where K does not underflow."""
    a, b, cost = tproblem(2, 19, 26, F64, True, 2, 2, seed=5)
    s = run_triton(a, b, cost, 0.2, 4, 0.0, False, dev)
    lg = run_triton(a, b, cost, 0.2, 4, 0.0, True, dev)
    close(lg[0], s[0], 1e-12, "value")
    close(lg[1].exp(), s[1], 1e-12, "u")
    close(lg[2].exp(), s[2], 1e-12, "v")
    close(lg[3].exp(), s[3], 1e-12, "hist_r")
    close(lg[4].exp(), s[4], 1e-12, "hist_s")
    close(lg[5].exp(), s[5], 1e-12, "y")


# ------------------------------------------------------------------------------------------ history, strides, precision
@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, True)], ids=["shared-scaling", "per_row-log"])
def test_triton_keep_history_false_small_blocks(dev, small_blocks, shared, log_domain):
    B, n, m, T = 2, 20, 17, 3
    a, b, cost = tproblem(B, n, m, F64, shared, 1, 1, seed=11)
    full = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=True)
    light = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=False)
    assert light[3].shape == (0, B, n) and light[4].shape == (0, B, m) and light[5].shape == (0, n)
    assert full[3].shape == (T, B, n) and full[4].shape == (T, B, m) and full[5].shape == (B, n)
    for name, x, y in zip(("value", "u", "v"), light[:3], full[:3], strict=False):
        close(x, y, 1e-14, name)
    cpu = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, T, 1e-8, log_domain, False)
    for name, x, y in zip(OUTPUTS, light, cpu, strict=False):
        close(x, y, TOL[("tiles", F64)].outputs_cpu, name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_non_contiguous_inputs_small_blocks(dev, small_blocks, shared):
    B, n, m, T = 2, 18, 21, 2
    a, b, cost = tproblem(B, n, m, F32, shared, 1, 1, seed=13)
    a_nc = a.t().contiguous().t()
    b_nc = b.new_empty(m, B).t().copy_(b)
    cost_nc = cost.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous() and not cost_nc.is_contiguous()
    want = run_triton(a, b, cost, 0.1, T, 0.0, False, dev)
    got = run_triton(a_nc, b_nc, cost_nc, 0.1, T, 0.0, False, dev)
    for name, x, y in zip(OUTPUTS, got, want, strict=False):
        close(x, y, 1e-6, name)
    g2 = torch.linspace(0.5, 1.5, 2 * B, dtype=F32).to(dev)
    bwd = torch.ops.wkd.sinkhorn_triton_backward
    ga, gb = bwd(g2[::2], a_nc.to(dev), b_nc.to(dev), cost_nc.to(dev), *got[3:], 0.1, False)
    ga0, gb0 = bwd(g2[::2].contiguous(), a.to(dev), b.to(dev), cost.to(dev), *want[3:], 0.1, False)
    close(ga, ga0, 1e-6, "grad_a")
    close(gb, gb0, 1e-6, "grad_b")


def test_fp32_dot_precision_argument(dev, small_blocks):
    """`precision` selects the float32 tl.dot input precision per call (no global state); float64 ignores it."""
    a, b, cost = tproblem(3, 20, 20, F32, True, 1, 0, seed=17)
    ieee = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev)
    for p in ("tf32x3", "tf32"):
        out = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev, precision=p)
        close(out[0], ieee[0], 1e-5 if p == "tf32x3" else 1e-2, f"value ({p})")
        op = torch.ops.wkd.sinkhorn_triton(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 0.0, False, True, p)
        for name, x, y in zip(OUTPUTS, op, out, strict=False):
            close(x, y, 0.0, f"{name} (op, {p})")
    a64, b64, c64 = a.double(), b.double(), cost.double()
    d_ieee = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev)
    d_tf32 = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev, precision="tf32")
    for name, x, y in zip(OUTPUTS, d_tf32, d_ieee, strict=False):
        close(x, y, 0.0, f"{name} (float64 ignores precision)")


def test_split_scalar_keeps_float64():
    pytest.importorskip("triton")
    from wkd_kernels.triton import sinkhorn as sk

    for x in (0.1, 1e-8, 1e-2, 3.0, -18.420680743952367, 1e-300, 1e300, 0.0):
        hi, lo = sk._split(x)
        assert hi + lo == x
        assert hi == float(torch.tensor(hi, dtype=F32)) or lo == 0.0


# ------------------------------------------------------------------------------ the Triton ops' checks and registration
def test_bad_arguments(dev):
    """The Triton ops check their arguments before any kernel (ops.py; the launchers do not check), with the
    messages of the C++ ops."""
    a, b, cost = tproblem(2, 5, 4, F32, True, seed=1)
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
def test_triton_op_autograd_matches_backward_launcher(dev, small_blocks, shared, log_domain):
    """The gradient through autograd of torch.ops.wkd.sinkhorn_triton (the per-half-iteration kernels) equals the
    Triton backward op's. (opcheck of both ops, same two kinds, with and without history:
    test_sinkhorn_compile_opcheck.py::test_opcheck[triton]; the registration does not depend on the kernel family.)"""
    a, b, cost = tproblem(3, 9, 7, F64, shared, 1, 1, seed=23)
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    eps = 1e-8 if log_domain else 0.0
    out = torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 3, eps, log_domain, True)
    gv = torch.linspace(0.5, 1.5, 3, dtype=F64).to(dev)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = torch.ops.wkd.sinkhorn_triton(a1, b1, cost, 0.1, 3, eps, log_domain, True)[0]
    ga, gb = torch.autograd.grad((value * gv).sum(), (a1, b1))
    ga0, gb0 = torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *out[3:], 0.1, log_domain, "ieee", eps)
    close(ga, ga0, 0.0, "grad_a through autograd")
    close(gb, gb0, 0.0, "grad_b through autograd")


# ----------------------------------------------------------------------------------------------------------- CUDA (gpu)
@pytest.mark.gpu
def test_cuda_routing_opcheck_compile_and_graph_capture(monkeypatch):
    """On CUDA: torch.ops.wkd.sinkhorn_triton runs these kernels, passes opcheck, works under
    torch.compile(fullgraph=True) with autograd; wk.sinkhorn with the Triton backend selected routes to it; the
    forward + backward replay from a captured CUDA graph."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiled Triton kernels only (TRITON_INTERPRET=1 is set)")
    from wkd_kernels.triton import sinkhorn as sk

    a, b, cost = (t.cuda() for t in tproblem(4, 50, 45, F32, True, 1, 1, seed=19))
    args = (a, b, cost, 0.1, 5, 1e-8, False, True)
    want = sk.sinkhorn_forward(*args, "ieee")  # the launcher itself
    got = torch.ops.wkd.sinkhorn_triton(*args)
    for name, x, y in zip(OUTPUTS, got, want, strict=False):
        close(x, y, 0.0, f"{name} (op)")
    res = wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8, backend="triton")
    close(res.value, want[0], 0.0, "wk.sinkhorn with the Triton backend")
    with wk.settings.override(backend="triton"):
        close(wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8).value, want[0], 0.0, "wk.sinkhorn, Triton by the setting")
    # "auto" with a precision other than ieee takes Triton on CUDA tensors
    tf32 = torch.ops.wkd.sinkhorn_triton(*args, "tf32")
    close(wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8, backend="auto", precision="tf32").value, tf32[0], 0.0,
          "wk.sinkhorn auto + tf32")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, args)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, (a, b, cost, 0.05, 3, 0.0, True, True))
    gv = torch.linspace(0.5, 1.5, 4, device="cuda")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton_backward.default, (gv, a, b, cost, *want[3:], 0.1, False))

    def loss(a, b):
        return (torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 5, 1e-8, False, True)[0] * gv).sum()

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(torch.compile(loss, fullgraph=True)(a1, b1), (a1, b1))
    ga0, gb0 = torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *want[3:], 0.1, False, "ieee", 1e-8)
    close(ga, ga0, 1e-6, "compiled grad_a")
    close(gb, gb0, 1e-6, "compiled grad_b")

    def step():
        out = sk.sinkhorn_forward(*args, "ieee")
        return out + torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *out[3:], 0.1, False)

    graph, captured, eager = capture_cuda_graph(step)  # the warm-up compiles the kernels outside the capture
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager, strict=False):
        close(x, y, 0.0, "graph replay")
