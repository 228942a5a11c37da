"""The single-launch Triton Sinkhorn kernels (n, m <= ONCHIP_MAX_C, shared cost;
wkd_kernels/triton/sinkhorn/onchip_kernels.py) against the float64 reference (autograd through it), the CPU op
(value and history), and their launch counts (sinkhorn_harness.check_sinkhorn, TOL["onchip"]). Their sm_80 / sm_90
compilation: python_tests/triton_compile_matrix.py (drive_sinkhorn_onchip).
"""
import sys

import pytest
import torch

from conftest import assert_close, simplex
from pairwise import as_params, pairwise
from sinkhorn_harness import F32, F64, TOL, check_sinkhorn, param_id, triton_backend
from wkd_kernels.reference import sinkhorn_reference

try:  # the tests take the `dev` fixture: deselected where the Triton kernels cannot run (conftest.py)
    from wkd_kernels.triton import sinkhorn as sk
except ImportError:  # pragma: no cover
    sk = None


def oc_problem(B, n, m, dtype, zeros_a=0, zeros_b=0, seed=0):
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(n, m, generator=g, dtype=F64).to(dtype)
    return a, b, cost


def oc_close(got, want, tol, what, floor=1e-300):
    """assert_close with a per-row scale max(max |want| of the row, floor) (logs: floor=1)."""
    assert_close(got, want, tol, 0.0, what, mode="row", floor=floor)


def oc_cpu_history(a, b, cost, reg, T, eps, log_domain):
    """(value, u, v, hist_r [T, B, n], hist_s [T, B, m], y [B, n]) of the CPU op, in the new layout whichever layout
    the op has (old: hist_r [T + 1, B, n] with y in the last slot)."""
    out = torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, True)
    if len(out) == 6:
        return tuple(out)
    value, u, v, hr, hs = out
    return value, u, v, hr[:T], hs, hr[T]


def oc_check(a, b, cost, reg, T, eps, log_domain, dev, precision="ieee", family="onchip"):
    """check_sinkhorn on the single-launch launchers themselves (sinkhorn_forward_onchip / _backward_onchip)."""
    def fwd(ad, bd, cd):
        return sk.sinkhorn_forward_onchip(ad, bd, cd, reg, T, eps, log_domain, True, precision)

    def bwd(g, ad, bd, cd, out):
        return sk.sinkhorn_backward_onchip(g, ad, bd, cd, *out[3:], reg, log_domain, precision)

    tb = triton_backend()
    assert tb.device == torch.device(dev).type
    return check_sinkhorn(tb, a, b, cost, reg, T, eps, log_domain, family, fwd, bwd,
                          g=torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype))


def _oc_big_tiles(monkeypatch, dev):
    """Under the interpreter, 64-wide tiles for C >= 81 (the default 16 / 32-wide ones run ~10x more interpreted ops;
    they are exercised by the smaller sizes, the rectangular test and test_default_config_c100)."""
    if dev == "cpu":
        monkeypatch.setattr(sk, "ONCHIP_CONFIG", {dt: {"scaling": (16, 64, 64, 4), "log": (8, 64, 64, 4)}
                                                  for dt in (F32, F64)})


@pytest.fixture
def oc_big_tiles(monkeypatch, dev):
    _oc_big_tiles(monkeypatch, dev)


# --------------------------------------------------------------------------------------------------- forward + backward
# (C, B, T): odd B; few iterations at the large sizes (the interpreter runs them on the CPU)
OC_SIZES = [(1, 5, 3), (3, 7, 4), (81, 7, 3), (91, 5, 3), (100, 7, 3), (256, 5, 2)]


# pairwise over size x dtype x domain x eps: every size in both dtypes, both domains and both eps
OC_CASES = as_params(pairwise({"size": OC_SIZES, "dtype": [F64, F32], "log_domain": [False, True],
                               "eps": [0.0, 1e-8]}), ["size", "dtype", "log_domain", "eps"],
                     lambda c: "-".join([f"C{c['size'][0]}"]
                                        + [param_id(c[k], k) for k in ("dtype", "log_domain", "eps")]))


@pytest.mark.parametrize("size,dtype,log_domain,eps", OC_CASES)
def test_onchip_forward_backward(dev, monkeypatch, size, dtype, log_domain, eps):
    C, B, T = size
    if C >= 81:
        _oc_big_tiles(monkeypatch, dev)
    # zero mass: one entry of a per row (WKD-L's target class) from C = 3 on, and one of b from C = 81 on
    a, b, cost = oc_problem(B, C, C, dtype, zeros_a=1 if C >= 3 else 0, zeros_b=1 if C >= 81 else 0, seed=C)
    oc_check(a, b, cost, 0.1, T, eps, log_domain, dev)


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_onchip_rectangular_multi_program(dev, dtype, log_domain):
    """n != m, m not a multiple of BLOCK_N, B spanning several programs with a ragged last one, several zeros."""
    a, b, cost = oc_problem(19, 45, 23, dtype, zeros_a=3, zeros_b=2, seed=5)
    oc_check(a, b, cost, 0.07, 4, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", sk.ONCHIP_CONFIG_CANDIDATES if sk is not None else [],
                         ids=lambda c: "x".join(map(str, c)))
def test_onchip_config_candidates(dev, monkeypatch, config, dtype):
    """Every scaling-domain configuration the GPU sweep may pick (tl.dot for BLOCK_B >= 16, broadcast products below)
    gives the reference results: rectangular, ragged tiles and a ragged last program, zero-mass entries."""
    monkeypatch.setitem(sk.ONCHIP_CONFIG, dtype, {**sk.ONCHIP_CONFIG[dtype], "scaling": config})
    a, b, cost = oc_problem(19, 45, 23, dtype, zeros_a=3, zeros_b=2, seed=6)
    oc_check(a, b, cost, 0.07, 3, 1e-8, False, dev)


@pytest.mark.parametrize("dtype,log_domain", [(F32, False), (F64, True)], ids=["f32-scaling", "f64-log"])
def test_onchip_default_config_c100(dev, dtype, log_domain):
    """The default ONCHIP_CONFIG tiles at C = 100 (ragged last tiles in both dimensions)."""
    a, b, cost = oc_problem(5, 100, 100, dtype, zeros_a=1, zeros_b=1, seed=11)
    oc_check(a, b, cost, 0.1, 2, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_onchip_log_domain_small_reg(dev, oc_big_tiles, dtype):
    """reg small enough that K underflows in float32: the log domain still matches the float64 log reference."""
    a, b, cost = oc_problem(5, 91, 91, dtype, zeros_a=1, seed=9)
    reg, T = 0.004, 3
    value, lu, lv, *_ = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), reg, T, 0.0, True, True,
                                                   "ieee")
    value_ref, lu_ref, lv_ref = sinkhorn_reference(a, b, cost, reg, T, 0.0, True)
    tol = TOL[("onchip", dtype)]
    oc_close(value, value_ref, tol.value_ref * (10 if dtype == F32 else 1), "value vs log reference")
    # log u, log v: absolute errors; |log u| ~ C / reg here, so the float32 bound scales with it
    s = 1.0 if dtype == F64 else 300.0
    oc_close(lu, lu_ref, tol.value_ref * s, "log u vs log reference", floor=1.0)
    oc_close(lv, lv_ref, tol.value_ref * s, "log v vs log reference", floor=1.0)
    c = oc_cpu_history(a, b, cost, reg, T, 0.0, True)
    oc_close(value, c[0], tol.value_cpu * (10 if dtype == F32 else 1), "value vs CPU op")


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_onchip_keep_history_false(dev, oc_big_tiles, log_domain):
    a, b, cost = oc_problem(7, 100, 100, F64, zeros_a=1, seed=3)
    on = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, True, "ieee")
    off = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, False, "ieee")
    assert [tuple(t.shape) for t in off[3:]] == [(0, 7, 100), (0, 7, 100), (0, 100)]
    for name, x, y in zip(("value", "u", "v"), off[:3], on[:3], strict=False):
        assert torch.equal(x, y), name  # same code path, same rounding


def test_onchip_k_buffer_matches_on_the_fly(dev, oc_big_tiles, monkeypatch):
    """ONCHIP_K_BUFFER (K built once by the element-wise kernel) gives the on-the-fly results."""
    a, b, cost = oc_problem(7, 81, 81, F64, zeros_a=1, seed=4)
    want = oc_check(a, b, cost, 0.1, 3, 0.0, False, dev)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F64, True)
    got = oc_check(a, b, cost, 0.1, 3, 0.0, False, dev)
    for x, y in zip(want[0] + want[1], got[0] + got[1], strict=False):
        oc_close(x, y, 1e-14, "K buffer vs on the fly")


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_onchip_fp32_precisions(dev, oc_big_tiles, precision):
    """The tensor-core precisions run (under the interpreter they compute like ieee); on a GPU tf32 has ~1e-3."""
    a, b, cost = oc_problem(5, 100, 100, F32, zeros_a=1, seed=6)
    family = "tf32_gpu" if precision == "tf32" and dev == "cuda" else "tensor_core_interp"
    oc_check(a, b, cost, 0.1, 3, 0.0, False, dev, precision=precision, family=family)


def test_onchip_empty_batch(dev):
    a, b, cost = oc_problem(1, 10, 10, F64)
    out = sk.sinkhorn_forward_onchip(a[:0].to(dev), b[:0].to(dev), cost.to(dev), 0.1, 3, 0.0, False, True, "ieee")
    assert [tuple(t.shape) for t in out] == [(0,), (0, 10), (0, 10), (3, 0, 10), (3, 0, 10), (0, 10)]
    ga, gb = sk.sinkhorn_backward_onchip(out[0], a[:0].to(dev), b[:0].to(dev), cost.to(dev), *out[3:], 0.1, False,
                                         "ieee")
    assert ga.shape == (0, 10) and gb.shape == (0, 10)


def test_onchip_fits():
    assert sk.onchip_fits(1, 1, F32) and sk.onchip_fits(100, 100, F64) and sk.onchip_fits(256, 256, F32)
    assert sk.onchip_fits(81, 91, F32)
    assert not sk.onchip_fits(257, 100, F32) and not sk.onchip_fits(100, 257, F32)
    assert not sk.onchip_fits(1000, 1000, F32) and not sk.onchip_fits(100, 100, torch.float16)
    for dt in (F32, F64):  # the configuration table's constraints
        for log_domain in (False, True):
            bb, bn, bk, warps = sk._onchip_config(dt, log_domain)
            assert all(x & (x - 1) == 0 for x in (bb, bn, bk, warps))
            if not log_domain:
                assert min(bb, bn, bk) >= 16  # tl.dot


# --------------------------------------------------------------------------------------------------------- launch count
def _oc_count_launches(monkeypatch):
    """Count kernel launches: every Triton launch goes through JITFunction.run (compiled) or
    InterpretedFunction.run (TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    counter = {"n": 0, "names": []}
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            counter["n"] += 1
            counter["names"].append(getattr(self, "__name__", "?"))
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return counter


@pytest.mark.parametrize("log_domain,kbuf", [(False, False), (False, True), (True, False)],
                         ids=["scaling", "scaling-k_buffer", "log"])
@pytest.mark.parametrize("C", [3, 100, 256])
def test_onchip_launch_count(dev, oc_big_tiles, monkeypatch, C, log_domain, kbuf):
    a, b, cost = oc_problem(5, C, C, F32, zeros_a=1, seed=C)
    ad, bd, cd = a.to(dev), b.to(dev), cost.to(dev)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F32, kbuf)
    T = 4 if C < 256 else 2
    counter = _oc_count_launches(monkeypatch)
    out = sk.sinkhorn_forward_onchip(ad, bd, cd, 0.1, T, 0.0, log_domain, True, "ieee")
    n_fwd = counter["n"]
    sk.sinkhorn_backward_onchip(torch.ones(5, dtype=F32, device=dev), ad, bd, cd, *out[3:], 0.1, log_domain, "ieee")
    n_all = counter["n"]
    sys.stderr.write(f"\nlaunches C={C} {'log' if log_domain else 'scaling'} kbuf={kbuf}: forward {n_fwd}, "
                     f"forward + backward {n_all} ({', '.join(counter['names'])})\n")
    want = 4 if (kbuf and not log_domain) else 2
    assert n_all == want <= 4, counter["names"]
    assert n_fwd == want // 2
