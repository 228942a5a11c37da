"""Sinkhorn's log domain: the same mathematics as the scaling domain where K does not underflow, and finite, correct
values where it does (reg = 1e-3 with a cost in [0, 1]: vs the CPU op, the float64 reference and POT's
sinkhorn_log). The log domain over the whole shape grid: test_sinkhorn_values.py; its Triton kernels:
test_sinkhorn_triton_tiles.py and test_sinkhorn_triton_onchip.py.
"""
import pytest
import torch

import wkd_kernels as wk
from conftest import assert_close, rand_cost, simplex
from sinkhorn_harness import F32, F64, OUTPUTS, cpu_op, pot_batch, problem, run_op
from wkd_kernels.reference import sinkhorn_reference


# -------------------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_log_domain_small_reg(backend, shared):
    """reg=1e-3, cost in [0, 1]: K underflows in float32, the log domain does not (vs the CPU op and reference)."""
    a, b, cost = problem(4, 30, 20, F32, shared, zeros=2)
    out = run_op(backend, a, b, cost, 1e-3, 10, 0.0, True)
    assert torch.isfinite(out[0]).all()
    cpu = cpu_op(a, b, cost, 1e-3, 10, 0.0, True)
    assert_close(out[0], cpu[0], 1e-4, what=f"{backend} value vs CPU op")
    ref = sinkhorn_reference(a, b, cost, 1e-3, 10, log_domain=True)[0]
    assert_close(out[0], ref, 1e-3, what=f"{backend} value vs reference")  # float32 logs of size 1/reg: ~1e-4


def test_log_domain_matches_scaling_domain(backend):
    """Same mathematics: the two domains agree in float64 where K does not underflow."""
    a, b, cost = problem(2, 19, 26, F64, True, 2, seed=5)
    s = run_op(backend, a, b, cost, 0.2, 4, 0.0, False)
    lg = run_op(backend, a, b, cost, 0.2, 4, 0.0, True)
    assert_close(lg[0], s[0], 1e-12, what="value", mode="row")
    for name, x, y in zip(OUTPUTS[1:], lg[1:], s[1:], strict=False):
        assert_close(x.exp(), y, 1e-12, what=name, mode="row")


# ------------------------------------------------------------------------------------------------ the public API vs POT
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_log_domain_survives_small_reg():
    """reg=1e-3 with cost in [0, 1]: K underflows in float32 but the log domain matches POT's sinkhorn_log."""
    B, n = 3, 20
    a, b = simplex(B, n, F32), simplex(B, n, F32, seed=2)
    cost = rand_cost(n, n, dtype=F32)
    got = wk.sinkhorn(a, b, cost, 1e-3, 10, log_domain=True).value
    ref = pot_batch(a, b, cost, 1e-3, 10, log_domain=True)
    assert torch.isfinite(got).all()
    assert_close(got, ref, 1e-4)
