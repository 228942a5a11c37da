"""wkd_kernels.settings: the defaults of backend / precision / check_values (one environment read, a context
manager, process-wide defaults) and how the ops and losses read them."""
import dataclasses
import math
import threading

import pytest
import torch

import wkd_kernels as wk
from conftest import simplex, rand_cost
from wkd_kernels import settings


@pytest.fixture
def restore_defaults():
    """set_defaults changes the process: put the defaults back after the test."""
    saved = settings._DEFAULTS[0]
    yield
    settings.set_defaults(**dataclasses.asdict(saved))
    assert settings.current() == saved


def test_defaults_are_documented_values():
    s = settings.Settings()
    assert (s.backend, s.sinkhorn_precision, s.gaussian_precision, s.check_values) == ("auto", "ieee", "ieee", False)
    assert isinstance(settings.current(), settings.Settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.current().backend = "cpu"


def test_override_nests_and_restores():
    base = settings.current()
    with settings.override(backend="cpu") as s1:
        assert s1 is settings.current() and s1.backend == "cpu"
        assert s1.sinkhorn_precision == base.sinkhorn_precision  # the other fields are inherited
        with settings.override(sinkhorn_precision="tf32", check_values=True) as s2:
            assert (s2.backend, s2.sinkhorn_precision, s2.check_values) == ("cpu", "tf32", True)
            with settings.override(backend="triton"):
                assert settings.current().backend == "triton"
            assert settings.current() == s2
        assert settings.current() == s1
    assert settings.current() == base


def test_override_restores_on_exception():
    base = settings.current()
    with pytest.raises(RuntimeError, match="boom"):
        with settings.override(gaussian_precision="tf32x3"):
            assert settings.current().gaussian_precision == "tf32x3"
            raise RuntimeError("boom")
    assert settings.current() == base


def test_override_is_thread_local():
    seen = {}

    def other():
        seen["backend"] = settings.current().backend

    base = settings.current().backend
    with settings.override(backend="cuda" if base != "cuda" else "cpu") as s:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert settings.current().backend == s.backend
    assert seen["backend"] == base  # the other thread saw the process defaults


def test_unknown_setting_names_the_closest_one():
    with pytest.raises(TypeError, match=r"unknown setting 'backnd'.*did you mean 'backend'\?"):
        with settings.override(backnd="cpu"):
            pass
    with pytest.raises(TypeError, match=r"did you mean 'sinkhorn_precision'\?"):
        settings.set_defaults(sinkhorn_precison="tf32")
    with pytest.raises(TypeError, match=r"unknown setting 'zzz' \(settings: \["):
        with settings.override(zzz=1):
            pass


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        with settings.override(backend="gpu"):
            pass
    with pytest.raises(ValueError, match="`gaussian_precision` must be one of"):
        settings.Settings(gaussian_precision="tf32")  # the Gaussian kernels have no plain TF32
    with pytest.raises(ValueError, match="`sinkhorn_precision` must be one of"):
        settings.set_defaults(sinkhorn_precision="fp16")
    with pytest.raises(TypeError, match="`check_values` must be True or False"):
        settings.Settings(check_values="yes")


def test_set_defaults_changes_the_process_defaults(restore_defaults):
    new = settings.set_defaults(check_values=True, gaussian_precision="tf32x3")
    assert new == settings.current() and new.check_values and new.gaussian_precision == "tf32x3"
    old_backend = new.backend
    with settings.override(check_values=False) as inner:
        assert not settings.current().check_values
        settings.set_defaults(backend="cpu" if old_backend != "cpu" else "auto")
        assert settings.current() is inner and settings.current().backend == old_backend  # the override still wins
    assert settings.current().backend != old_backend and settings.current().check_values


def test_environment_parsing():
    env = settings._from_environment
    assert env({}) == settings.Settings()
    s = env({"WKD_BACKEND": " Triton ", "WKD_SINKHORN_PRECISION": "TF32X3", "WKD_GAUSSIAN_PRECISION": "tf32x3",
             "WKD_CHECK_VALUES": "On"})
    assert s == settings.Settings("triton", "tf32x3", "tf32x3", True)
    for raw, want in (("1", True), ("true", True), ("YES", True), ("0", False), ("off", False), ("", False)):
        assert env({"WKD_CHECK_VALUES": raw}).check_values is want, raw
    with pytest.raises(ValueError, match=r"WKD_BACKEND must be one of .* got 'gpu'"):
        env({"WKD_BACKEND": "gpu"})
    with pytest.raises(ValueError, match="WKD_SINKHORN_PRECISION"):
        env({"WKD_SINKHORN_PRECISION": "bf16"})
    with pytest.raises(ValueError, match="WKD_GAUSSIAN_PRECISION"):
        env({"WKD_GAUSSIAN_PRECISION": "tf32"})
    with pytest.raises(ValueError, match="WKD_CHECK_VALUES must be one of"):
        env({"WKD_CHECK_VALUES": "maybe"})


def test_resolve_precision():
    with settings.override(sinkhorn_precision="tf32", gaussian_precision="tf32x3"):
        assert settings.resolve_precision(None, "sinkhorn", "op") == "tf32"
        assert settings.resolve_precision(None, "gaussian", "op") == "tf32x3"
        assert settings.resolve_precision("ieee", "sinkhorn", "op") == "ieee"
    with pytest.raises(ValueError, match=r"my\.op: `precision` must be one of \('ieee', 'tf32x3'\)"):
        settings.resolve_precision("tf32", "gaussian", "my.op")


# ------------------------------------------------------------------------------------------ the ops read the settings
def _problem():
    return simplex(2, 5), simplex(2, 4, seed=2), rand_cost(5, 4)


def test_backend_setting_is_the_default_of_backend_argument():
    a, b, c = _problem()
    want = wk.sinkhorn(a, b, c, 0.1, 3, backend="torch").value  # the backend every installation has
    with settings.override(backend="torch"):
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3).value, want)
    with settings.override(backend="cuda"):
        with pytest.raises(ValueError, match="backend='cuda'"):
            wk.sinkhorn(a, b, c, 0.1, 3)
        with pytest.raises(ValueError, match="backend='cuda'"):
            wk.sqrtm(torch.eye(3, dtype=torch.float64)[None])
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="torch").value, want)  # the argument wins


def test_precision_setting_reaches_the_triton_kernels(dev):
    a, b, c = (t.float().to(dev) for t in _problem())
    tf32 = torch.ops.wkd.sinkhorn_triton(a, b, c, 0.1, 3, 0.0, False, False, "tf32")[0]
    with settings.override(sinkhorn_precision="tf32"):
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="triton").value, tf32)
    S = (torch.eye(4) * 2.0).expand(2, 4, 4).contiguous().to(dev)
    x3 = torch.ops.wkd.sqrtm_triton(S, "newton_schulz", 10, "tf32x3")
    with settings.override(gaussian_precision="tf32x3"):
        assert torch.equal(wk.sqrtm(S, num_iters=10, backend="triton"), x3)


def test_check_values_setting_for_the_gpu_kernels(dev):
    """The GPU kernels read no values: check_values (argument or setting) runs the Python checks before them; the
    CPU kernels always check."""
    a, b, c = _problem()
    a[0, 1] = math.nan
    a, b, c = a.to(dev), b.to(dev), c.to(dev)
    with pytest.raises(ValueError, match="`a` contains non-finite"):
        wk.sinkhorn(a, b, c, 0.1, 3, backend="triton", check_values=True)
    with settings.override(check_values=True):
        with pytest.raises(ValueError, match="`a` contains non-finite"):
            wk.sinkhorn(a, b, c, 0.1, 3, backend="triton")
        assert not torch.isfinite(wk.sinkhorn(a, b, c, 0.1, 3, backend="triton", check_values=False).value).all()
    with settings.override(check_values=False):
        assert not torch.isfinite(wk.sinkhorn(a, b, c, 0.1, 3, backend="triton").value).all()
    with pytest.raises(ValueError, match="`a` contains non-finite"):
        wk.sinkhorn(a.cpu(), b.cpu(), c.cpu(), 0.1, 3, check_values=False)  # CPU: always checked


def test_override_exited_out_of_order_restores_the_defaults():
    base = settings.current()
    outer, inner = settings.override(backend="cpu"), settings.override(check_values=True)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block first: its own change goes, the inner one stays in effect
    assert settings.current().check_values is True
    inner.__exit__(None, None, None)
    assert settings.current() == base


def test_compiled_function_reads_the_settings_at_trace_time():
    """Dynamo cannot trace a ContextVar on every supported torch: the settings are constants of the traced graph."""
    seen = []

    def backend_in_effect(x):
        seen.append(settings.current().backend)
        return x + 1

    torch._dynamo.reset()
    with settings.override(backend="cpu"):
        compiled = torch.compile(backend_in_effect, fullgraph=True, backend="eager")
        assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
    assert seen == ["cpu"]


@pytest.mark.parametrize("checks", [False, True])
def test_sinkhorn_compiles_inside_an_override(checks):
    a, b = simplex(3, 6, seed=0), simplex(3, 5, seed=1)
    cost = rand_cost(6, 5)
    a.requires_grad_()

    def value(a):
        return wk.sinkhorn(a, b, cost, 0.1, 5).value.sum()

    torch._dynamo.reset()
    with settings.override(check_values=checks):
        got = torch.compile(value, fullgraph=True, backend="eager")(a)
        (grad,) = torch.autograd.grad(got, a)
    want = value(a)
    (want_grad,) = torch.autograd.grad(want, a)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_sinkhorn_auto_log_domain_compiles_to_the_log_domain():
    """A compiled graph cannot read max(cost) on the host: log_domain="auto" takes the log domain there."""
    a, b, cost = simplex(2, 4, seed=0), simplex(2, 4, seed=1), rand_cost(4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: wk.sinkhorn(a, b, cost, 0.1, 3, log_domain="auto"), fullgraph=True,
                             backend="eager")
    got = compiled(a)
    want = wk.sinkhorn(a, b, cost, 0.1, 3, log_domain=True)
    torch.testing.assert_close(got.value, want.value)
    torch.testing.assert_close(got.log_u, want.log_u)
