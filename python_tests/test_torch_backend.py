"""The `torch` backend (wkd_kernels/aten/: every op in ATen ops only) beyond what the per-op tests check through the
backend fixtures: it assumes no device (meta tensors), reads no values on the host, bounds its temporaries by the
chunk cap, and the schemas, the auto rule and an installation without the compiled extension.
(Values and gradients against the float64 references, opcheck, compile, bad input, zero mass and underflow: the
per-op test files, where "torch" is one of the `backend` / `gaussian_backend` fixtures.)"""
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wkd_kernels as wk
from wkd_kernels import _schemas, settings
from wkd_kernels.aten import bures_wasserstein as at_bw
from wkd_kernels.aten import feature_stats as at_fs
from wkd_kernels.aten import nuclear_norm as at_nn
from wkd_kernels.aten import sinkhorn as at_sk
from wkd_kernels.aten import sqrtm as at_sq
from wkd_kernels.ops.common import check_dtype_on_device, resolve_backend
from wkd_kernels.reference import sinkhorn_reference

from conftest import assert_close, rand_cost, simplex

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


# ------------------------------------------------------------------------------------------ schemas
def _schemas_of_ops_cpp():
    src = (REPO / "csrc" / "ops.cpp").read_text()
    body = src[src.index("TORCH_LIBRARY(wkd, m)"):]
    out = {}
    for d in re.findall(r"m\.def\((.*?)\);", body, re.S):
        s = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', d)).replace('\\"', '"')
        out[s[:s.index("(")]] = s
    return out


def test_python_schemas_are_those_of_ops_cpp():
    """The schemas Python defines without the extension are csrc/ops.cpp's, character for character, and (with the
    extension) parse to the schemas the library registered."""
    cpp = _schemas_of_ops_cpp()
    assert cpp == _schemas.SCHEMAS
    if wk.HAS_C_EXT:
        for name, s in cpp.items():
            registered = getattr(torch.ops.wkd, name).default._schema
            assert registered == torch._C.parse_schema("wkd::" + s), name


def test_torch_ops_have_the_base_schemas_and_a_kernel_for_every_device_type():
    for base in ("sinkhorn", "sinkhorn_backward", "feature_stats", "feature_stats_backward", "sqrtm",
                 "sqrtm_backward", "nuclear_norm", "bures_wasserstein", "bures_wasserstein_backward"):
        twin = _schemas.torch_twin(base)
        got = getattr(torch.ops.wkd, twin).default._schema
        want = getattr(torch.ops.wkd, base).default._schema
        assert str(got).replace(twin + "(", base + "(", 1) == str(want), twin
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wkd::{twin}", "CompositeExplicitAutograd"), twin
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wkd::{twin}", "Meta"), twin


# ------------------------------------------------------------------------------------------ the auto rule
def test_auto_rule():
    """"auto": the C++ kernels on CPU when built, else torch; torch on every other device type until a fused backend
    is measured there (settings.MEASURED_FUSED)."""
    assert settings.auto_backend("cpu", True) == "cpu"
    assert settings.auto_backend("cpu", False) == "torch"
    for dev in ("cuda", "mps", "xpu", "meta"):
        assert settings.auto_backend(dev, True) == "torch"
    assert settings.MEASURED_FUSED == {}
    meta = torch.empty(2, 3, device="meta")
    assert resolve_backend("auto", meta, "op", has_cuda_cpp=True) == "torch"
    cpu = torch.empty(2, 3)
    assert resolve_backend("auto", cpu, "op", has_cuda_cpp=True) == ("cpu" if wk.HAS_C_EXT else "torch")
    assert resolve_backend("torch", cpu, "op", has_cuda_cpp=True) == "torch"
    with settings.override(backend="torch"):
        assert resolve_backend(None, cpu, "op", has_cuda_cpp=False) == "torch"
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors"):
        resolve_backend("cpu", meta, "op", has_cuda_cpp=True)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors"):
        resolve_backend("triton", meta, "op", has_cuda_cpp=True)


def test_auto_follows_a_measured_fused_backend(monkeypatch):
    monkeypatch.setitem(settings.MEASURED_FUSED, "meta", "triton")
    assert settings.auto_backend("meta", True) == "triton"


def test_float64_on_a_device_without_it_is_a_clear_error():
    fake = types.SimpleNamespace(dtype=torch.float64, device=torch.device("mps"))
    with pytest.raises(TypeError, match=r"wkd.sinkhorn_torch: dtype torch.float64 is not supported on device mps"):
        check_dtype_on_device(fake, "wkd.sinkhorn_torch")
    check_dtype_on_device(types.SimpleNamespace(dtype=torch.float32, device=torch.device("mps")), "op")
    check_dtype_on_device(torch.empty(1, dtype=F64, device="meta"), "op")


# ------------------------------------------------------------------------------------------ no device assumed
def _sinkhorn_cases():
    for shared in (True, False):
        for log_domain in (False, True):
            for keep in (True, False):
                yield shared, log_domain, keep


@pytest.mark.parametrize("shared,log_domain,keep", list(_sinkhorn_cases()))
def test_sinkhorn_implementation_runs_on_meta_tensors(shared, log_domain, keep):
    """The ATen implementation itself (not the fake kernel) on meta tensors: shapes only, nothing assumes CPU."""
    B, n, m, T = 3, 5, 4, 2
    a, b = torch.empty(B, n, device="meta"), torch.empty(B, m, device="meta")
    cost = torch.empty((n, m) if shared else (B, n, m), device="meta")
    out = at_sk.sinkhorn_forward(a, b, cost, 0.1, T, 1e-8, log_domain, keep)
    shapes = [list(t.shape) for t in out]
    assert shapes == [[B], [B, n], [B, m], [T if keep else 0, B, n], [T if keep else 0, B, m], [B if keep else 0, n]]
    assert all(t.device.type == "meta" for t in out)
    if keep:
        ga, gb = at_sk.sinkhorn_backward(torch.empty(B, device="meta"), a, b, cost, *out[3:], 0.1, log_domain)
        assert list(ga.shape) == [B, n] and list(gb.shape) == [B, m] and ga.device.type == "meta"


def test_gaussian_implementations_run_on_meta_tensors():
    B, n = 2, 4
    S = torch.empty(B, n, n, device="meta")
    mu = torch.empty(B, n, device="meta")
    for method in ("newton_schulz", "eigh"):
        Y = at_sq.sqrtm_forward(S, method, 3)
        assert Y.shape == S.shape and Y.device.type == "meta"
        assert at_sq.sqrtm_backward(S, Y, method, 3).shape == S.shape
        w2, R1, R2, Q = at_bw.bures_wasserstein_forward(mu, S, mu, S, method, 3)
        assert list(w2.shape) == [B] and R1.shape == R2.shape == Q.shape == S.shape
        g = at_bw.bures_wasserstein_backward(torch.empty(B, device="meta"), mu, mu, R1, R2, Q, method, 3)
        assert [list(t.shape) for t in g] == [[B, n], [B, n, n], [B, n], [B, n, n]]
    value, polar = at_nn.nuclear_norm_forward(torch.empty(B, 3, 5, device="meta"), 3)
    assert list(value.shape) == [B] and list(polar.shape) == [B, 3, 5]
    x = torch.empty(2, 3, 5, 6, device="meta", dtype=torch.float16)
    for full in (False, True):
        mean, var = at_fs.feature_stats_forward(x, 2, full, True)
        assert list(mean.shape) == [2, 4, 3] and list(var.shape) == ([2, 4, 3, 3] if full else [2, 4, 3])
        assert mean.dtype == torch.float32
        gx = at_fs.feature_stats_backward(torch.empty_like(mean), torch.empty_like(var), x, mean, 2, full, True)
        assert gx.shape == x.shape and gx.dtype == x.dtype


def test_public_api_on_meta_tensors_selects_torch():
    """backend="auto" on a meta tensor is the torch backend; the public ops return meta results of the right shape."""
    B, n, m = 3, 5, 4
    a = torch.empty(B, n, device="meta", requires_grad=True)
    b = torch.empty(B, m, device="meta")
    res = wk.sinkhorn(a, b, torch.empty(n, m, device="meta"), 0.1, 3)
    assert list(res.value.shape) == [B] and res.value.device.type == "meta"
    res.value.sum().backward()
    assert a.grad.shape == a.shape and a.grad.device.type == "meta"
    S = torch.empty(2, 4, 4, device="meta")
    assert wk.sqrtm(S).shape == S.shape
    assert list(wk.nuclear_norm(S).shape) == [2]
    assert list(wk.bures_wasserstein(torch.empty(2, 4, device="meta"), S, torch.empty(2, 4, device="meta"),
                                     S).shape) == [2]
    mean, var = wk.feature_stats(torch.empty(2, 3, 4, 4, device="meta"))
    assert list(mean.shape) == [2, 3] and list(var.shape) == [2, 3]


# ------------------------------------------------------------------------------------------ no host synchronisation
class _HostReads(TorchDispatchMode):
    """Records the ops that read a value back to the host (item/bool/int) or whose output shape depends on values."""

    SYNC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
            "aten::_unique2", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shared,log_domain", [(True, False), (True, True), (False, False), (False, True)])
def test_sinkhorn_reads_no_value_on_the_host(shared, log_domain):
    B, n, m = 3, 6, 5
    a, b = simplex(B, n, zeros=1), simplex(B, m, seed=2)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    with _HostReads() as mode:
        out = at_sk.sinkhorn_forward(a, b, cost, 0.1, 4, 1e-8, log_domain, True)
        at_sk.sinkhorn_backward(torch.ones(B, dtype=F64), a, b, cost, *out[3:], 0.1, log_domain)
    assert mode.seen == []


def test_gaussian_ops_read_no_value_on_the_host():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 5, generator=g, dtype=F64)
    S = A @ A.mT + torch.eye(5, dtype=F64)
    mu = torch.randn(3, 5, generator=g, dtype=F64)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=F64)
    with _HostReads() as mode:
        for method in ("newton_schulz", "eigh"):
            Y = at_sq.sqrtm_forward(S, method, 30)
            at_sq.sqrtm_backward(S, Y, method, 30)
            w2, R1, R2, Q = at_bw.bures_wasserstein_forward(mu, S, mu * 0.5, S * 2, method, 30)
            at_bw.bures_wasserstein_backward(torch.ones(3, dtype=F64), mu, mu * 0.5, R1, R2, Q, method, 30)
        at_nn.nuclear_norm_forward(A, 50)
        mean, var = at_fs.feature_stats_forward(x, 2, True, True)
        at_fs.feature_stats_backward(mean, var, x, mean, 2, True, True)
    assert mode.seen == []


def test_sinkhorn_implementation_traces_fullgraph():
    """The ATen implementation itself (not only the op, which torch.compile sees through its fake kernel) compiles
    with fullgraph=True: no data-dependent Python control flow, no host reads."""
    B, n, m = 3, 6, 5
    a, b, cost = simplex(B, n, zeros=1), simplex(B, m, seed=2), rand_cost(B, n, m)

    def f(a, b, cost):
        out = at_sk.sinkhorn_forward(a, b, cost, 0.1, 3, 0.0, True, True)
        return out[0], at_sk.sinkhorn_backward(torch.ones(B, dtype=F64), a, b, cost, *out[3:], 0.1, True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b, cost)
    want = f(a, b, cost)
    assert_close(got[0], want[0], 1e-12)
    assert_close(got[1][0], want[1][0], 1e-12)


def test_newton_schulz_masking_traces_fullgraph():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 4, 4, generator=g, dtype=F64)
    S = A @ A.mT

    def f(S):
        Y = at_sq.sqrtm_forward(S, "newton_schulz", 40)
        return Y, at_sq.sqrtm_backward(S, Y, "newton_schulz", 40), at_nn.nuclear_norm_forward(S, 100)[0]

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(S)
    for x, y in zip(got, f(S), strict=False):
        assert_close(x, y, 1e-12)


def test_newton_schulz_stops_each_matrix_by_masking():
    """A converged matrix keeps its value while the batch runs on: the root of a batch equals the roots of its
    matrices run alone (an easy and a hard matrix converge after different numbers of steps)."""
    easy = torch.eye(4, dtype=F64) * 2.0
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    hard = A @ A.mT + 1e-6 * torch.eye(4, dtype=F64)
    both = at_sq.sqrtm_forward(torch.stack([easy, hard]), "newton_schulz", 100)
    assert torch.equal(both[0], at_sq.sqrtm_forward(easy[None], "newton_schulz", 100)[0])
    assert torch.equal(both[1], at_sq.sqrtm_forward(hard[None], "newton_schulz", 100)[0])


# ------------------------------------------------------------------------------------------ chunking
class _LargestTemporary(TorchDispatchMode):
    """The largest number of elements of a tensor an op (not a view) creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("shared,log_domain", [(True, True), (False, False), (False, True)])
def test_chunked_paths_stay_under_the_cap_and_match_unchunked(monkeypatch, shared, log_domain):
    """The log domain and the per-row cost never create a B x n x m temporary: with a cap of B n 8 elements every
    temporary stays within max(cap, the history); the results equal the unchunked ones (and the C++ kernel's)."""
    B, n, m, T = 4, 30, 41, 3
    a, b = simplex(B, n, zeros=2), simplex(B, m, zeros=1, seed=2)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    g = torch.linspace(0.5, 1.5, B, dtype=F64)
    whole = at_sk.sinkhorn_forward(a, b, cost, 0.1, T, 1e-8, log_domain, True)
    whole_grad = at_sk.sinkhorn_backward(g, a, b, cost, *whole[3:], 0.1, log_domain)
    cap = B * n * 8
    monkeypatch.setattr(at_sk, "CHUNK_ELEMENTS", cap)
    assert len(at_sk._chunks(B, n, m, None)) == 6
    with _LargestTemporary() as mode:
        out = at_sk.sinkhorn_forward(a, b, cost, 0.1, T, 1e-8, log_domain, True)
        grad = at_sk.sinkhorn_backward(g, a, b, cost, *out[3:], 0.1, log_domain)
    assert mode.largest <= max(cap, T * B * max(n, m), n * m if shared else 0) < B * n * m
    for x, y in zip(out + grad, whole + whole_grad, strict=False):
        assert_close(x, y, 1e-13, mode="row")
    if wk.HAS_C_EXT:
        cpp = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, T, 1e-8, log_domain, True)
        for x, y in zip(out, cpp, strict=False):
            assert_close(x, y, 1e-12, mode="row")


def test_chunked_log_domain_with_small_reg_matches_reference():
    """Underflow case: reg = 1e-3 on costs in [0, 1] (K = 0 almost everywhere in float64 scaling form) runs in the log
    domain over chunks and matches the float64 log-domain reference; the gradient is finite."""
    B, n, m = 3, 12, 10
    a, b, cost = simplex(B, n, zeros=1), simplex(B, m, seed=3), rand_cost(B, n, m)
    ad = a.clone().requires_grad_()
    got = wk.sinkhorn(ad, b, cost, 1e-3, 20, log_domain=True, backend="torch")
    want = sinkhorn_reference(a, b, cost, 1e-3, 20, log_domain=True)[0]
    assert_close(got.value, want, 1e-10, mode="entry")
    got.value.sum().backward()
    assert torch.isfinite(ad.grad).all()


@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("given_kernel", [False, True])
def test_gradient_of_a_alone_skips_b_and_equals_the_full_sweep(eps, T, given_kernel):
    """When only `a` needs a gradient, the torch backend's autograd runs the sweep without grad_b (one product fewer):
    grad_a is the full sweep's, bit for bit, through the public function (a Gibbs kernel formed per call or given)
    and the backward op; zero-mass entries included."""
    a, b, cost = simplex(3, 7, zeros=2), simplex(3, 6, seed=4, zeros=1), rand_cost(7, 6)
    kernel = wk.gibbs_kernel(cost, 0.1) if given_kernel else None
    g = torch.tensor([0.5, 1.0, 2.0], dtype=a.dtype)
    grads = []
    for both in (False, True):
        x, yb = a.clone().requires_grad_(), b.clone().requires_grad_(both)
        val = wk.sinkhorn(x, yb, cost, 0.1, T, eps=eps, backend="torch", kernel=kernel).value
        grads.append(torch.autograd.grad(val, (x, yb) if both else (x,), g))
    out = torch.ops.wkd.sinkhorn_torch(a, b, cost, 0.1, T, eps, False, True)
    ga_op, gb_op = torch.ops.wkd.sinkhorn_torch_backward(g, a, b, cost, *out[3:], 0.1, False, eps)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][0], ga_op)
    assert torch.equal(grads[1][1], gb_op)
    ga_only, gb_none = at_sk.sinkhorn_backward(g, a, b, cost, *out[3:], 0.1, False, eps, need_b=False)
    assert gb_none is None and torch.equal(ga_only, ga_op)


# ------------------------------------------------------------------------------------------ without the extension
_NO_EXT_SCRIPT = textwrap.dedent("""
    import sys
    # an editable install of the package elsewhere resolves wkd_kernels._C through its own finder: not this copy's
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import torch, wkd_kernels as wk
    from wkd_kernels.reference import sinkhorn_reference, sqrtm_reference
    info = wk.build_info()
    assert not wk.HAS_C_EXT and not info["c_ext_built"] and info["backends"][0] == "torch", info
    assert "cpu" not in info["backends"], info
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1).requires_grad_()
    b = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    cost = torch.rand(6, 5, dtype=torch.float64)
    res = wk.sinkhorn(a, b, cost, 0.1, 10)
    ref = sinkhorn_reference(a, b, cost, 0.1, 10)[0]
    assert torch.allclose(res.value, ref, rtol=1e-12), (res.value, ref)
    (g,) = torch.autograd.grad(res.value.sum(), a)
    (gr,) = torch.autograd.grad(ref.sum(), a)
    assert torch.allclose(g, gr, rtol=1e-10, atol=1e-14)
    # the base ops exist and run on CPU tensors (their CPU kernel is the torch one)
    out = torch.ops.wkd.sinkhorn(a.detach(), b, cost, 0.1, 10, 0.0, False, True)
    assert torch.allclose(out[0], ref.detach(), rtol=1e-12)
    S = torch.eye(3, dtype=torch.float64) * 4
    assert torch.allclose(wk.sqrtm(S[None]), sqrtm_reference(S[None]))
    assert torch.allclose(torch.ops.wkd.sqrtm(S[None], "eigh", 10), sqrtm_reference(S[None]))
    f = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.isfinite(wk.gaussian_wasserstein(f, f * 0.5)).all()
    crit = wk.WKDLogitLoss(torch.rand(5, 5).fill_diagonal_(0), temperature=2.0, weight=1.0)
    s = torch.randn(3, 5, requires_grad=True)
    loss = crit(s, torch.randn(3, 5), torch.tensor([0, 2, 4]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    print("ok", info["backends"])
""")


def test_installation_without_the_extension(tmp_path):
    """A copy of the package without the compiled library (what `WKD_NO_EXT=1 pip install .` installs): it imports
    without a warning, build_info says the torch backend serves, the ops and torch.ops.wkd.* exist and run."""
    pkg = tmp_path / "wkd_kernels"
    src = REPO / "wkd_kernels"
    for p in src.rglob("*"):
        if p.is_file() and p.suffix in (".py",):
            dst = pkg / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("WKD_KERNELS_LIBRARY", "WKD_BACKEND")}
    env["PYTHONPATH"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-W", "error::UserWarning:wkd_kernels._build", "-c", _NO_EXT_SCRIPT],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok ['torch'"), r.stdout


def test_setup_builds_without_an_extension_when_asked(tmp_path):
    """WKD_NO_EXT=1: setup.py declares no extension (so no compiler is needed) and says so in one line."""
    env = dict(os.environ, WKD_NO_EXT="1")
    r = subprocess.run([sys.executable, "-c", "import runpy, setuptools; setuptools.setup = lambda **kw: "
                        "print('EXT', kw['ext_modules']); runpy.run_path('setup.py', run_name='__main__')"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "EXT []" in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if "without the compiled extension" in ln]
    assert len(lines) == 1 and "WKD_NO_EXT=1" in lines[0] and "torch" in lines[0]
