"""Sinkhorn's input checks: every backend rejects bad shapes, dtypes, devices, scalars and (on CPU, or with
check_values=True) values before any kernel, with the same messages naming the argument, through the public wrapper
and through each backend's raw op; backend= and precision= arguments; NumPy and tensor scalars.
"""
import math
import re

import numpy as np
import pytest
import torch

import wkd_kernels as wk
from conftest import available_backends, rel_error, simplex
from sinkhorn_harness import F64, good


# ------------------------------------------------------------------------------------------ bad tensors (every backend)
BAD = [
    ("`a` must be 2-D", lambda a, b, c: (a[0], b, c, 0.1, 3)),
    ("`b` must be 2-D", lambda a, b, c: (a, b[None], c, 0.1, 3)),
    ("`cost` must be [n, m] (shared", lambda a, b, c: (a, b, c[0], 0.1, 3)),
    ("batch mismatch", lambda a, b, c: (a, b[:1], c, 0.1, 3)),
    ("`cost` must be", lambda a, b, c: (a, b, c.T.contiguous(), 0.1, 3)),
    ("`cost` must be", lambda a, b, c: (a, b, c.expand(3, 4, 3).contiguous(), 0.1, 3)),
    ("`reg` must be", lambda a, b, c: (a, b, c, 0.0, 3)),
    ("`reg` must be", lambda a, b, c: (a, b, c, -1.0, 3)),
    ("`num_iters` must be", lambda a, b, c: (a, b, c, 0.1, 0)),
    ("`b` has dtype", lambda a, b, c: (a, b.float(), c, 0.1, 3)),
    ("`cost` has dtype", lambda a, b, c: (a, b, c.float(), 0.1, 3)),
    ("`a` must be", lambda a, b, c: (a.long(), b.long(), c.long(), 0.1, 3)),
    ("`cost` is on", lambda a, b, c: (a, b, c.to("meta"), 0.1, 3)),
]


def _set(t, index, value):
    """A copy of `t` with one entry set (a bad value for the value checks)."""
    t = t.clone()
    t[index] = value
    return t


BAD_VALUES = [
    ("`a` contains non-finite", lambda a, b, c: (_set(a, (0, 1), math.nan), b, c, 0.1, 3)),
    ("`b` contains non-finite", lambda a, b, c: (a, _set(b, (1, 0), math.inf), c, 0.1, 3)),
    ("`cost` contains non-finite", lambda a, b, c: (a, b, _set(c, (0, 0), math.inf), 0.1, 3)),
    ("`cost` must be non-negative", lambda a, b, c: (a, b, c - 0.5, 0.1, 3)),
    ("`a` must be non-negative", lambda a, b, c: (a - 0.3, b, c, 0.1, 3)),
    ("every row of `a`", lambda a, b, c: (a * 0, b, c, 0.1, 3)),
    ("`b` contains non-finite", lambda a, b, c: (a.float(), _set(b.float(), (0, 2), -math.inf), c.float(), 0.1, 3)),
    ("`cost` must be non-negative",
     lambda a, b, c: (a.float(), b.float(), _set(c.float(), (2, 1), -1e-30), 0.1, 3)),
]


@pytest.mark.parametrize("msg,make", BAD + BAD_VALUES)
def test_bad_input_python_wrapper(backend, msg, make):
    """Every backend rejects bad input before any kernel with the same message (value checks: always on CPU for
    the C++ kernels, on request -- check_values=True -- for the GPU kernels)."""
    args = make(*backend.to(*good()))
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
        wk.sinkhorn(*args, backend=backend.name, check_values=True)


# value checks: CPU op only (the GPU ops do not read values; see test_bad_input_python_wrapper)
@pytest.mark.parametrize("backend,msg,make", [
    pytest.param(be, msg, make, id=f"{be}-{msg}")
    for be in available_backends() for msg, make in (BAD if be != "cpu" else BAD + BAD_VALUES)
    if "`cost` is on" not in msg], indirect=["backend"])
def test_bad_input_raw_op(backend, msg, make):
    """Each backend's op checks on its own (direct torch.ops calls: the C++ CPU and CUDA kernels, the registered
    Triton op), with the same messages; the GPU ops read no values (those checks are the wrapper's, on request)."""
    args = make(*backend.to(*good()))
    op = torch.ops.wkd.sinkhorn_triton if backend.name == "triton" else torch.ops.wkd.sinkhorn
    if backend.name == "torch":
        op = torch.ops.wkd.sinkhorn_torch
    with pytest.raises((ValueError, TypeError, RuntimeError), match=re.escape(msg)):
        op(*args, 0.0, False, True)


# bad values the division by 0 of the scaling iterations does not reveal when eps > 0, and K's range
BAD_WITH_EPS = [
    ("every row of `b`", lambda a, b, c: (a, _set(b, (1, slice(None)), 0.0), c, 0.1, 3)),
    ("every row of `a`", lambda a, b, c: (_set(a, (0, slice(None)), 0.0), b, c, 0.1, 3)),
    ("K = exp(-cost / reg) underflows", lambda a, b, c: (a, b, _set(c, (1, slice(None)), 10.0), 0.01, 3)),
]


@pytest.mark.parametrize("msg,make", BAD_VALUES + BAD_WITH_EPS)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("with_kernel", [False, True], ids=["cost", "gibbs_kernel"])
def test_bad_values_with_eps_and_cached_kernel(msg, make, eps, with_kernel):
    """The CPU backends (the C++ kernel and the torch backend, whose scaling-domain checks are read once with the
    result) reject every bad value with and without eps and with a cached Gibbs kernel, naming the problem."""
    backends = (["cpu"] if wk.HAS_C_EXT else []) + ["torch"]
    for name in backends:
        a, b, c, reg, T = make(*good())
        with pytest.raises(ValueError, match=re.escape(msg)):
            kernel = wk.gibbs_kernel(c, reg) if with_kernel else None
            wk.sinkhorn(a, b, c, reg, T, eps=eps, backend=name, kernel=kernel)
        with pytest.raises(ValueError, match=re.escape(msg)):  # the same with a gradient (the history is kept)
            kernel = wk.gibbs_kernel(c, reg) if with_kernel else None
            wk.sinkhorn(a.requires_grad_(), b, c, reg, T, eps=eps, backend=name, kernel=kernel)


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_folded_value_checks_per_host_read_and_one_read_agree(eps):
    """The scaling-domain checks read after the ATen loop: the CPU form (scalars read one by one) and the form for
    other devices (one read) give the same verdict on every bad value and on a valid problem."""
    from wkd_kernels.ops.sinkhorn import _scaling_values_ok, _scaling_values_ok_one_read
    for msg, make in BAD_VALUES + BAD_WITH_EPS + [("valid", lambda a, b, c: (a, b, c, 0.1, 3))]:
        a, b, c, reg, T = make(*good())
        value = torch.ops.wkd.sinkhorn_torch(a, b, c, reg, T, eps, False, False)[0]
        for cost in (c, None):
            per_read = _scaling_values_ok(a, b, cost, reg, eps, value)
            one_read = _scaling_values_ok_one_read(a, b, cost, reg, eps, value)
            assert per_read == one_read, (msg, eps, cost is None)
            if msg == "valid":
                assert per_read, "a valid problem flagged"
            elif cost is not None:
                assert not per_read, f"{msg} not flagged with eps={eps}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_check_has_no_false_alarm_on_huge_finite_costs(backend, dtype):
    """The one-pass value check flags a row whose sum overflows; the exact check then lets it through."""
    a, b, c = good()
    c = c.to(dtype)
    c[1] = torch.finfo(dtype).max / 2  # finite, non-negative, but the row sum is inf
    a, b, c = backend.to(a.to(dtype), b.to(dtype), c)
    out = wk.sinkhorn(a, b, c, 1e300 if dtype == torch.float64 else 1e38, 2, log_domain=True,
                      backend=backend.name, check_values=True)  # must not raise
    assert torch.isfinite(out.log_u).all() and torch.isfinite(out.log_v).all()


# ------------------------------------------------------------------------------------------ bad scalars, cost gradients
def test_bad_scalar_arguments(backend):
    a, b, c = backend.to(*good())
    with pytest.raises(ValueError, match="`eps` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, eps=-1.0, backend=backend.name)
    with pytest.raises(ValueError, match="`grad` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, grad="autodiff", backend=backend.name)
    with pytest.raises(ValueError, match="`num_iters` must be"):
        wk.sinkhorn(a, b, c, 0.1, 2.5, backend=backend.name)


def test_cost_gradient_is_refused(backend):
    a, b, c = backend.to(*good())
    with pytest.raises(NotImplementedError, match="`cost`"):
        wk.sinkhorn(a, b, c.requires_grad_(), 0.1, 3, backend=backend.name)


def test_raw_op_with_cost_requiring_grad_raises():
    a, b = simplex(2, 4, F64, 0, 1), simplex(2, 4, F64, 0, 2)
    cost = torch.rand(4, 4, dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="`cost`"):
        torch.ops.wkd.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3, 0.0, False, True)  # was cost.grad = None


def test_numpy_and_tensor_scalars_accepted():
    """NumPy and 0-d tensor scalars are accepted for reg, num_iters and eps; strings, non-integral num_iters and
    log_domain values other than True / False / 'auto' are errors naming the argument. (The losses:
    test_losses_wkdl.py; gaussian_wasserstein: test_gaussian_wasserstein.py.)"""
    a, b = simplex(2, 4, F64, 0, 1), simplex(2, 4, F64, 0, 2)
    cost = torch.rand(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    want = wk.sinkhorn(a, b, cost, 0.1, 3, eps=1e-8).value
    for reg, it, eps in ((np.float32(0.1), np.int64(3), np.float64(1e-8)), (torch.tensor(0.1), torch.tensor(3),
                                                                            torch.tensor(1e-8))):
        got = wk.sinkhorn(a, b, cost, reg, it, eps=eps).value
        assert rel_error(got, want) < 1e-6  # np.float32(0.1) != 0.1 exactly
    with pytest.raises(ValueError, match="`reg` must be a real number"):
        wk.sinkhorn(a, b, cost, "0.1", 3)
    with pytest.raises(ValueError, match="`num_iters` must be an integer"):
        wk.sinkhorn(a, b, cost, 0.1, 3.0)
    with pytest.raises(TypeError, match="`log_domain` must be True, False or 'auto'"):
        wk.sinkhorn(a, b, cost, 0.1, 3, log_domain="no")  # was accepted (and ran the log domain)


# ---------------------------------------------------------------------------------------- backend / precision arguments
def test_backend_argument_errors():
    """backend= is checked and impossible combinations are clear errors (CPU tensors here)."""
    a, b, c = good()
    with pytest.raises(ValueError, match=r"backend='cuda'.*needs CUDA tensors"):
        wk.sinkhorn(a, b, c, 0.1, 3, backend="cuda")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        wk.sinkhorn(a, b, c, 0.1, 3, backend="gpu")
    # "auto" on CPU tensors is the C++ CPU kernel, whatever the precision
    assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="auto").value, wk.sinkhorn(a, b, c, 0.1, 3).value)
    with wk.settings.override(backend="cuda"):  # the setting is the default of backend=
        with pytest.raises(ValueError, match=r"backend='cuda'"):
            wk.sinkhorn(a, b, c, 0.1, 3)
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu").value, wk.sinkhorn(a, b, c, 0.1, 3,
                                                                                          backend="auto").value)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_cpu_accepts_and_ignores_precision(precision):
    """The C++ CPU kernel computes in IEEE: every valid precision is accepted and gives the same numbers."""
    a, b, c = good()
    a.requires_grad_()
    want = wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu")
    got = wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu", precision=precision)
    assert torch.equal(got.value, want.value) and torch.equal(got.log_u, want.log_u)
    assert torch.equal(torch.autograd.grad(got.value.sum(), a)[0], torch.autograd.grad(want.value.sum(), a)[0])
    with wk.settings.override(sinkhorn_precision=precision):
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3).value, want.value)


def test_bad_precision_names_the_argument():
    a, b, c = good()
    for bad in ("fp32", "TF32", "highest", ""):
        with pytest.raises(ValueError, match=r"wkd\.sinkhorn: `precision` must be one of"):
            wk.sinkhorn(a, b, c, 0.1, 3, precision=bad)
