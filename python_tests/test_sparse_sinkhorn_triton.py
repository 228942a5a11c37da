"""The Triton kernel of wk.sparse_sinkhorn (wkd::sparse_sinkhorn_triton, scaling domain only): values, log-scalings,
history and both gradients against the ATen twin wkd::sparse_sinkhorn_torch and the float64 dense references; the
kernel's row / column block edges, strided masses, int32 / int64 indices; opcheck; the errors. The tests of the
kernel itself take the `dev` fixture (conftest.py): CUDA, or CPU tensors under TRITON_INTERPRET=1 (small sizes)."""
import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import _schemas
from test_sparse_sinkhorn import _close, _dense_reference, _gauge_reference, _grads, _problem

D = torch.float64
FWD = torch.ops.wkd.sparse_sinkhorn_triton.default
BWD = torch.ops.wkd.sparse_sinkhorn_triton_backward.default
TORCH_FWD = torch.ops.wkd.sparse_sinkhorn_torch.default
TORCH_BWD = torch.ops.wkd.sparse_sinkhorn_torch_backward.default


def _on(dev, *ts):
    return tuple(t.to(dev) for t in ts)


def _op_args(dev, dtype=D, B=5, C=9, seed=24, keep=True, eps=0.0, T=3, int32=False):
    a, b, cost, mask = _problem(B=B, C=C, seed=seed, dtype=dtype)
    K = wk.sparse_cost(wk.csr_from_dense(cost, mask), 0.3)
    arrays = [t.to(torch.int32) if int32 and not t.is_floating_point() else t for t in K.arrays]
    return (*_on(dev, a.t().contiguous(), b.t().contiguous(), *arrays), 0.3, T, eps, False, keep)


def test_schemas_and_registration():
    """The Triton ops have the base ops' schemas renamed (defined in Python: _schemas.PYTHON_TRITON_SCHEMAS), a
    kernel for every device type, a fake kernel and the autograd formula."""
    for base in ("sparse_sinkhorn", "sparse_sinkhorn_backward"):
        name = _schemas.triton_twin(base)
        got = str(getattr(torch.ops.wkd, name).default._schema)
        want = str(getattr(torch.ops.wkd, base).default._schema)
        assert got.replace(name + "(", base + "(", 1) == want, name
        for key in ("CompositeExplicitAutograd", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wkd::{name}", key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sparse_sinkhorn_triton", "Autograd")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_values_log_scalings_and_exact_gradients(dev, dtype, eps):
    """Through the public function (backend="triton", zero masses in a and b): value and both exact gradients
    against the float64 dense reference (eps > 0: the gauge-corrected one) and the torch backend, log-scalings
    against the torch backend; the op's own autograd (whole history) gives the same gradients."""
    a, b, cost, mask = _problem(B=5, C=9, seed=22, density=0.4)
    w = torch.tensor([0.3, -1.2, 0.7, 1.1, -0.4], dtype=D)
    reference = _gauge_reference if eps > 0 else _dense_reference
    ref = _grads(lambda x, y: reference(x, y, cost, mask, 0.25, 6, eps), a, b, w)
    csr = wk.csr_from_dense(cost.to(dtype), mask).to(dev)
    x, y, wd = _on(dev, a.to(dtype), b.to(dtype), w.to(dtype))

    def run(backend):
        return _grads(lambda s, t: wk.sparse_sinkhorn(s, t, csr, 0.25, 6, eps=eps, log_domain=False,
                                                      backend=backend).value, x, y, wd)

    got, aten = run("triton"), run("torch")
    if dtype == D:
        for g, r, t in zip(got, ref, aten, strict=True):
            _close(g, r, rtol=1e-10, atol=1e-12)
            _close(g, t, rtol=1e-12, atol=1e-14)
    else:  # float32 rounding: the value to 1e-6, the gradients to 3e-5 of their largest entry (as the torch backend)
        _close(got[0], ref[0], rtol=1e-6)
        _close(got[0], aten[0], rtol=1e-6)
        for g, r, t in zip(got[1:], ref[1:], aten[1:], strict=True):
            _close(g, r, rtol=0, atol=3e-5 * float(r.abs().max()))
            _close(g, t, rtol=0, atol=3e-5 * float(r.abs().max()))
    res = wk.sparse_sinkhorn(x, y, csr, 0.25, 6, eps=eps, log_domain=False, backend="triton")
    res_t = wk.sparse_sinkhorn(x, y, csr, 0.25, 6, eps=eps, log_domain=False, backend="torch")
    assert not res.log_domain
    for u, v in ((res.log_u, res_t.log_u), (res.log_v, res_t.log_v)):
        assert torch.equal(torch.isinf(u), torch.isinf(v))  # -inf exactly off the supports
        fin = torch.isfinite(v)
        _close(u[fin], v[fin], rtol=1e-12 if dtype == D else 1e-5, atol=1e-12 if dtype == D else 1e-5)
    # the op's own autograd over the whole history (the path of torch.compile)
    args = _op_args(dev, dtype=dtype, eps=eps)
    ga, gb = _op_autograd(FWD, args)
    ta, tb = _op_autograd(TORCH_FWD, args)
    scale = 1e-12 if dtype == D else 3e-5
    _close(ga, ta, rtol=0, atol=scale * float(ta.abs().max()))
    _close(gb, tb, rtol=0, atol=scale * float(tb.abs().max()))


def _op_autograd(op, args):
    a, b = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    g = torch.linspace(0.5, 1.5, a.shape[1], dtype=a.dtype, device=a.device)
    value = op(a, b, *args[2:])[0]
    return torch.autograd.grad((value * g).sum(), (a, b))


@pytest.mark.parametrize("int32", [False, True])
def test_block_edges_strided_masses_and_history_equal_torch_twin(dev, monkeypatch, int32):
    """Column blocks of 16 with B = 21 (a full and a partial block), row blocks of 4 with C = 9 (a partial one),
    masses as strided views (a column slice of a wider [C, 2B] tensor, and a transposed view of [B, C] memory), int32
    and int64 indices: the six outputs with and without history and both backward gradients equal the torch twin's,
    layouts included."""
    from wkd_kernels.triton import sparse_sinkhorn as tri

    monkeypatch.setattr(tri, "BLOCK_COLUMNS", 16)
    monkeypatch.setattr(tri, "BLOCK_ROWS", 4)
    args = _op_args(dev, B=21, C=9, seed=5, eps=1e-3, int32=int32)
    a, b = args[0], args[1]
    wide = torch.zeros(a.shape[0], 2 * a.shape[1], dtype=D, device=dev)
    wide[:, 1::2] = a
    strided = (wide[:, 1::2], b.t().contiguous().t())
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    for keep in (True, False):
        ref = TORCH_FWD(a, b, *args[2:-1], keep)
        for masses in ((a, b), strided):
            out = FWD(*masses, *args[2:-1], keep)
            for name, o, r in zip(("value", "u", "v", "hist_r", "hist_s", "y"), out, ref, strict=True):
                assert o.shape == r.shape and o.dtype == r.dtype, name
                assert o.stride() == r.stride() or o.numel() == 0, name
                assert torch.equal(torch.isinf(o), torch.isinf(r)), name
                _close(o.nan_to_num(neginf=0.0), r.nan_to_num(neginf=0.0), rtol=1e-12, atol=1e-15)
    out = FWD(*args[:-1], True)
    g = torch.linspace(0.5, 1.5, a.shape[1], dtype=D, device=dev)
    for eps in (None, 0.0, 1e-3):
        got = BWD(g, *args[:8], *out[3:], 0.3, False, eps)
        ref = TORCH_BWD(g, *args[:8], *out[3:], 0.3, False, eps)
        for x, r in zip(got, ref, strict=True):
            assert x.shape == r.shape and x.stride() == r.stride()
            _close(x, r, rtol=1e-12, atol=1e-14)


def test_envelope_gradient_and_divergence(dev):
    """grad="envelope" and divergence=True (3B rows, gradients w.r.t. both masses) through the public function equal
    the torch backend's."""
    a, b, cost, mask = _problem(B=4, C=8, seed=7)
    csr = wk.csr_from_dense(cost, mask).to(dev)
    x, y, w = _on(dev, a, b, torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=D))
    for grad, div in (("envelope", False), ("exact", True), ("envelope", True)):
        got, ref = (_grads(lambda s, t, be=be, grad=grad, div=div: wk.sparse_sinkhorn(
            s, t, csr, 0.2, 5, eps=1e-6, grad=grad, divergence=div, log_domain=False, backend=be).value, x, y, w)
                    for be in ("triton", "torch"))
        for g, r in zip(got, ref, strict=True):
            _close(g, r, rtol=1e-11, atol=1e-13)


def test_opcheck(dev):
    """Schema, fake kernel and autograd registration of both ops (opcheck): forward with and without history, int32
    and int64 indices; the backward op on the forward's history with eps None, 0 and > 0."""
    for keep, int32 in ((True, False), (False, True)):
        torch.library.opcheck(FWD, _op_args(dev, B=3, C=5, T=2, keep=keep, int32=int32))
    args = _op_args(dev, B=3, C=5, T=2, eps=1e-3)
    out = FWD(*args)
    g = torch.linspace(0.5, 1.5, 3, dtype=D, device=dev)
    for eps in (None, 1e-3):
        torch.library.opcheck(BWD, (g, *args[:8], *out[3:], 0.3, False, eps))


def test_bad_input_is_a_clear_error(dev):
    """log_domain=True (asked for, or chosen by "auto" for a small reg) names `log_domain`; a wrong dtype names the
    argument; backend="auto" never runs the Triton kernel."""
    args = _op_args(dev, B=3, C=5, T=2)
    with pytest.raises(ValueError, match="`log_domain`"):
        FWD(*args[:11], True, True)
    out = TORCH_FWD(*args)
    g = torch.ones(3, dtype=D, device=dev)
    with pytest.raises(ValueError, match="`log_domain`"):
        BWD(g, *args[:8], *out[3:], 0.3, True)
    with pytest.raises(TypeError, match="`a` must be float32 or float64"):
        FWD(args[0].half(), args[1].half(), *args[2:])
    with pytest.raises(TypeError, match="`cost` must have the dtype of `a`"):
        FWD(args[0].float(), args[1].float(), *args[2:])
    a, b, cost, mask = _problem(B=3, C=6, seed=2)
    x, y = _on(dev, a, b)
    csr = wk.csr_from_dense(cost, mask).to(dev)
    with pytest.raises(ValueError, match="`log_domain`"):
        wk.sparse_sinkhorn(x, y, csr, 0.3, 2, log_domain=True, backend="triton")
    with pytest.raises(ValueError, match="`log_domain`"):  # "auto" chooses the log domain at this reg
        wk.sparse_sinkhorn(x, y, csr, 1e-3, 2, backend="triton")
    with pytest.raises(TypeError, match="dtype of `cost`"):
        wk.sparse_sinkhorn(x.float(), y.float(), csr, 0.3, 2, backend="triton")
    with pytest.raises(ValueError, match="no CUDA C\\+\\+ kernel"):
        wk.sparse_sinkhorn(x, y, csr, 0.3, 2, backend="cuda")


def test_auto_never_picks_triton(dev, monkeypatch):
    from wkd_kernels.triton import sparse_sinkhorn as tri

    def fail(*args, **kwargs):
        raise AssertionError("backend='auto' ran the Triton kernel")

    monkeypatch.setattr(tri, "sparse_sinkhorn_forward", fail)
    a, b, cost, mask = _problem(B=3, C=6, seed=3)
    x, y = _on(dev, a.requires_grad_(), b)
    csr = wk.csr_from_dense(cost, mask).to(dev)
    for backend in ("auto", None):
        for grad in ("exact", "envelope"):
            wk.sparse_sinkhorn(x, y, csr, 0.3, 2, grad=grad, log_domain=False, backend=backend).value.sum().backward()
