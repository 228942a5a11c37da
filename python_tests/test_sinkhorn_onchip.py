"""Single-launch ("on-chip") Triton Sinkhorn kernels for small C (wkd_kernels/triton/sinkhorn.py, last section;
issue 13 item 1) against the float64 reference, autograd through it, and the CPU op.

    TRITON_INTERPRET=1 python -m pytest python_tests/test_sinkhorn_onchip.py -q

Under the interpreter (or on CUDA): value, u, v vs wkd_kernels.reference.sinkhorn_reference (float64), gradients vs
torch.autograd.grad through it, value and history vs torch.ops.wkd.sinkhorn (its old [T+1, B, n] hist_r layout or
the new hist_r [T, B, n] + y [B, n] one, whichever the op has), at C in {1, 3, 81, 91, 100, 256}, odd B, both domains,
float32 and float64, eps 0 and 1e-8, zero-mass entries, history on and off; the number of kernel launches of
forward + backward (<= 4); and, in a subprocess without TRITON_INTERPRET, the compilation of every variant for sm_80
and sm_90 with the ptxas register / spill report (``python python_tests/test_sinkhorn_onchip.py --compile`` prints
it).
"""
import os
import sys

import pytest
import torch

if __name__ != "__main__":  # the --compile entry point below records launches and must not import the tests' deps
    pytest.importorskip("triton")

    import wkd_kernels  # noqa: F401,E402  (registers torch.ops.wkd.*)
    from conftest import REPO, simplex, triton_device  # noqa: E402
    from wkd_kernels.reference import sinkhorn_reference  # noqa: E402
    from wkd_kernels.triton import sinkhorn as sk  # noqa: E402

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 1e-5}  # relative, vs the float64 reference (float32: float32 rounding of the inputs)
TOL_GRAD = {F64: 1e-11, F32: 2e-5}
TOL_CPU = {F64: 1e-12, F32: 1e-5}  # vs the CPU op in the same dtype


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def dev():
    return triton_device()


def problem(B, n, m, dtype, zeros_a=0, zeros_b=0, seed=0):
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(n, m, generator=g, dtype=F64).to(dtype)
    return a, b, cost


def close(got, want, tol, what, floor=1e-300):
    """Same shape, same non-finite entries, max |got - want| over finite entries <= tol * max(max |want| of the same
    last-dim row, floor) (logs: floor=1, an absolute error in a log is a relative error of its exponential)."""
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
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


def cpu_history(a, b, cost, reg, T, eps, log_domain):
    """(value, u, v, hist_r [T, B, n], hist_s [T, B, m], y [B, n]) of the CPU op, in the new layout whichever layout
    the op has (old: hist_r [T + 1, B, n] with y in the last slot)."""
    out = torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, True)
    if len(out) == 6:
        return tuple(out)
    value, u, v, hr, hs = out
    return value, u, v, hr[:T], hs, hr[T]


def ref_grads(a, b, cost, reg, T, eps, g):
    """Value, u, v and the exact gradient by autograd through the float64 scaling-domain reference (its derivative at
    zero-mass entries is the one the kernels compute; K does not underflow at the tested cost / reg)."""
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    value, u, v = sinkhorn_reference(a64, b64, cost.double(), reg, T, eps, False)
    ga, gb = torch.autograd.grad((value * g.double()).sum(), (a64, b64))
    return value.detach(), u.detach(), v.detach(), ga, gb


def check(a, b, cost, reg, T, eps, log_domain, dev, precision="ieee", tol=None, grad_tol=None, cpu=True):
    dt = a.dtype
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    ad, bd, cd = a.to(dev), b.to(dev), cost.to(dev)
    out = sk.sinkhorn_forward_onchip(ad, bd, cd, reg, T, eps, log_domain, True, precision)
    value, u, v, hr, hs, y = out
    assert [tuple(t.shape) for t in out] == [(B,), (B, n), (B, m), (T, B, n), (T, B, m), (B, n)]
    assert all(t.dtype == dt and t.device.type == torch.device(dev).type for t in out)
    g = torch.linspace(0.5, 1.5, B, dtype=dt)
    value_ref, u_ref, v_ref, ga_ref, gb_ref = ref_grads(a, b, cost, reg, T, eps, g)
    lf = 1.0 if log_domain else 1e-300
    if log_domain:
        u_ref, v_ref = u_ref.log(), v_ref.log()
    tol = tol or TOL[dt]
    close(value, value_ref, tol, "value vs reference")
    close(u, u_ref, tol * 10, "u vs reference", floor=lf)
    close(v, v_ref, tol * 10, "v vs reference", floor=lf)
    if cpu:
        c = cpu_history(a, b, cost, reg, T, eps, log_domain)
        close(value, c[0], TOL_CPU[dt], "value vs CPU op")
        for name, x, want in zip(("hist_r", "hist_s", "y"), (hr, hs, y), c[3:]):
            close(x, want, TOL_CPU[dt] * 10, f"{name} vs CPU op", floor=lf)
    ga, gb = sk.sinkhorn_backward_onchip(g.to(dev), ad, bd, cd, hr, hs, y, reg, log_domain, precision)
    assert ga.shape == a.shape and gb.shape == b.shape
    gfl = max(ga_ref.abs().max().item(), gb_ref.abs().max().item())
    gt = grad_tol or TOL_GRAD[dt]
    close(ga, ga_ref, gt, "grad_a vs reference", floor=gfl)
    close(gb, gb_ref, gt, "grad_b vs reference", floor=gfl)
    return out, (ga, gb)


def _use_big_tiles(monkeypatch, dev):
    """Under the interpreter, 64-wide tiles for C >= 81 (the default 16 / 32-wide ones run ~10x more interpreted ops;
    they are exercised by the smaller sizes, the rectangular test and test_default_config_c100)."""
    if dev == "cpu":
        monkeypatch.setattr(sk, "ONCHIP_CONFIG", {dt: {"scaling": (16, 64, 64, 4), "log": (8, 64, 64, 4)}
                                                  for dt in (F32, F64)})


@pytest.fixture
def big_tiles(monkeypatch, dev):
    _use_big_tiles(monkeypatch, dev)


# ------------------------------------------------------------------------------------------------ forward + backward
# (C, B, T): odd B; few iterations at the large sizes (the interpreter runs them on the CPU)
SIZES = [(1, 5, 3), (3, 7, 4), (81, 7, 3), (91, 5, 3), (100, 7, 3), (256, 5, 2)]


@pytest.mark.parametrize("eps", [0.0, 1e-8], ids=["eps0", "eps1e-8"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("C,B,T", SIZES, ids=[f"C{c}" for c, _, _ in SIZES])
def test_forward_backward(dev, monkeypatch, C, B, T, dtype, log_domain, eps):
    if C >= 81:
        _use_big_tiles(monkeypatch, dev)
    # zero mass: one entry of a per row (WKD-L's target class) from C = 3 on, and one of b from C = 81 on
    a, b, cost = problem(B, C, C, dtype, zeros_a=1 if C >= 3 else 0, zeros_b=1 if C >= 81 else 0, seed=C)
    check(a, b, cost, 0.1, T, eps, log_domain, dev)


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_rectangular_multi_program(dev, dtype, log_domain):
    """n != m, m not a multiple of BLOCK_N, B spanning several programs with a ragged last one, several zeros."""
    a, b, cost = problem(19, 45, 23, dtype, zeros_a=3, zeros_b=2, seed=5)
    check(a, b, cost, 0.07, 4, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype,log_domain", [(F32, False), (F64, True)], ids=["f32-scaling", "f64-log"])
def test_default_config_c100(dev, dtype, log_domain):
    """The default ONCHIP_CONFIG tiles at C = 100 (ragged last tiles in both dimensions)."""
    a, b, cost = problem(5, 100, 100, dtype, zeros_a=1, zeros_b=1, seed=11)
    check(a, b, cost, 0.1, 2, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_log_domain_small_reg(dev, big_tiles, dtype):
    """reg small enough that K underflows in float32: the log domain still matches the float64 log reference."""
    a, b, cost = problem(5, 91, 91, dtype, zeros_a=1, seed=9)
    reg, T = 0.004, 3
    value, lu, lv, *_ = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), reg, T, 0.0, True, True,
                                                   "ieee")
    value_ref, lu_ref, lv_ref = sinkhorn_reference(a, b, cost, reg, T, 0.0, True)
    close(value, value_ref, TOL[dtype] * (10 if dtype == F32 else 1), "value vs log reference")
    # log u, log v: absolute errors; |log u| ~ C / reg here, so the float32 bound scales with it
    s = 1.0 if dtype == F64 else 300.0
    close(lu, lu_ref, TOL[dtype] * s, "log u vs log reference", floor=1.0)
    close(lv, lv_ref, TOL[dtype] * s, "log v vs log reference", floor=1.0)
    c = cpu_history(a, b, cost, reg, T, 0.0, True)
    close(value, c[0], TOL_CPU[dtype] * (10 if dtype == F32 else 1), "value vs CPU op")


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_keep_history_false(dev, big_tiles, log_domain):
    a, b, cost = problem(7, 100, 100, F64, zeros_a=1, seed=3)
    on = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, True, "ieee")
    off = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, False, "ieee")
    assert [tuple(t.shape) for t in off[3:]] == [(0, 7, 100), (0, 7, 100), (0, 100)]
    for name, x, y in zip(("value", "u", "v"), off[:3], on[:3]):
        assert torch.equal(x, y), name  # same code path, same rounding


def test_k_buffer_matches_on_the_fly(dev, big_tiles, monkeypatch):
    """ONCHIP_K_BUFFER (K built once by the element-wise kernel) gives the on-the-fly results."""
    a, b, cost = problem(7, 81, 81, F64, zeros_a=1, seed=4)
    want = check(a, b, cost, 0.1, 3, 0.0, False, dev, cpu=False)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F64, True)
    got = check(a, b, cost, 0.1, 3, 0.0, False, dev, cpu=False)
    for x, y in zip(want[0] + want[1], got[0] + got[1]):
        close(x, y, 1e-14, "K buffer vs on the fly")


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_fp32_precisions(dev, big_tiles, precision):
    """The tensor-core precisions run (under the interpreter they compute like ieee); on a GPU tf32 has ~1e-3."""
    a, b, cost = problem(5, 100, 100, F32, zeros_a=1, seed=6)
    loose = 5e-2 if precision == "tf32" and dev == "cuda" else 1e-4
    check(a, b, cost, 0.1, 3, 0.0, False, dev, precision=precision, tol=loose, grad_tol=loose, cpu=False)


def test_empty_batch(dev):
    a, b, cost = problem(1, 10, 10, F64)
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


# ------------------------------------------------------------------------------------------------ launch count
def _count_launches(monkeypatch):
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
def test_launch_count(dev, big_tiles, monkeypatch, C, log_domain, kbuf):
    a, b, cost = problem(5, C, C, F32, zeros_a=1, seed=C)
    ad, bd, cd = a.to(dev), b.to(dev), cost.to(dev)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F32, kbuf)
    T = 4 if C < 256 else 2
    counter = _count_launches(monkeypatch)
    out = sk.sinkhorn_forward_onchip(ad, bd, cd, 0.1, T, 0.0, log_domain, True, "ieee")
    n_fwd = counter["n"]
    sk.sinkhorn_backward_onchip(torch.ones(5, dtype=F32, device=dev), ad, bd, cd, *out[3:], 0.1, log_domain, "ieee")
    n_all = counter["n"]
    sys.stderr.write(f"\nlaunches C={C} {'log' if log_domain else 'scaling'} kbuf={kbuf}: forward {n_fwd}, "
                     f"forward + backward {n_all} ({', '.join(counter['names'])})\n")
    want = 4 if (kbuf and not log_domain) else 2
    assert n_all == want <= 4, counter["names"]
    assert n_fwd == want // 2


# ------------------------------------------------------------------------------------------------ sm_80 / sm_90
def test_compile_sm80_sm90_register_report():
    """Every variant of the on-chip kernels (fp32 ieee / tf32x3 / tf32, fp64, both domains, history on and off, the
    K buffer on and off, n = 100 and 256) compiles for sm_80 and sm_90; prints ptxas's registers and spills."""
    import subprocess

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without the NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, __file__, "--compile"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=3000)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas available")
    sys.stderr.write("\n" + r.stdout + "\n")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "compiled: " in r.stdout and "failed: 0" in r.stdout, r.stdout[-3000:]
    for kernel in ("_sinkhorn_fwd_onchip_kernel", "_sinkhorn_bwd_onchip_kernel"):
        assert kernel in r.stdout


# ------------------------------------------------------------------------------------------------ compile report
def _ptxas_report(ptx: str, arch: int):
    """(registers, spill stores, spill loads) of the first kernel of `ptx` from ``ptxas -v`` (Triton's bundled one)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).split(",")[0]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1,
            int(spill.group(2)) if spill else -1)


def _compile_one(args):
    index, arch = args
    import triton
    from triton.backends.compiler import GPUTarget

    import triton_compile_matrix as tcm

    v = _VARIANTS[index]
    try:
        k = triton.compile(tcm._ast_source(v), target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    except Exception as exc:  # noqa: BLE001
        return index, arch, None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-3:]}"
    return index, arch, _ptxas_report(k.asm["ptx"], arch), None


_VARIANTS: list = []


def compile_report(archs=(80, 90), jobs=2) -> int:
    """Record the on-chip launchers' variants (triton_compile_matrix's recorder and driver), compile each for every
    arch, print one line per variant with the ptxas registers / spills per arch; return the number of failures."""
    import concurrent.futures
    import multiprocessing
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton

    import triton_compile_matrix as tcm

    t0 = time.time()
    rec = tcm.Recorder()
    with rec:
        tcm.drive_sinkhorn_onchip()
    _VARIANTS[:] = sorted(rec.variants.values(), key=lambda v: (v.name, repr(v.key())))
    work = [(i, a) for i in range(len(_VARIANTS)) for a in archs]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, work))
    table, failures = {}, []
    for index, arch, rep, err in results:
        if err is not None:
            failures.append((index, arch, err))
        table[(index, arch)] = rep
    print(f"triton {triton.__version__}: {rec.launches} launches -> {len(_VARIANTS)} variants x "
          f"{', '.join(f'sm_{a}' for a in archs)}; registers / spill stores / spill loads (bytes) per arch")
    keys = ("LOG", "FROM_COST", "HAS_EPS", "STORE_HIST", "PREC", "BLOCK_B", "BLOCK_N", "BLOCK_K")
    for i, v in enumerate(_VARIANTS):
        c = dict(v.constexprs)
        desc = " ".join(f"{k}={c[k]}" for k in keys if k in c) + f" warps={dict(v.options).get('num_warps', 4)}"
        cols = "  ".join(f"sm_{a}: " + ("FAILED" if table[(i, a)] is None else "%d regs %d/%d" % table[(i, a)])
                         for a in archs)
        print(f"  {v.name} [{v.dtype}] {desc}: {cols}")
    for index, arch, err in failures:
        print(f"FAILED sm_{arch} {_VARIANTS[index].name}: {err}")
    print(f"compiled: {len(work) - len(failures)} of {len(work)}, failed: {len(failures)} in {time.time() - t0:.0f} s")
    return len(failures)


if __name__ == "__main__":
    if "--compile" in sys.argv:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            sys.exit("unset TRITON_INTERPRET for --compile")
        sys.exit(1 if compile_report() else 0)
    sys.exit("usage: python python_tests/test_sinkhorn_onchip.py --compile   (tests: run pytest on this file)")
