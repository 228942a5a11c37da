"""Shared test fixtures.

Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported
(the README's test command does that). GPU tests are marked `gpu` and are deselected without CUDA.
"""
import dataclasses
import importlib
import os
import signal
import sys
import tempfile
from pathlib import Path

# A private Inductor cache per test session: Inductor's on-disk FX graph cache does not key on a custom op's fake
# kernel, so a graph compiled against an older schema of wkd::sinkhorn (e.g. before its outputs changed) would be
# reused from the shared default cache and fail ("expected size 10==11"). Set before torch._inductor is imported.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="wkd_tests_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import capture_cuda_graph  # noqa: E402,F401  (one copy, shared with the benchmarks)
# Real cost matrices released with the paper: ../shared/data next to the checkout, or data/ inside it
# (the GPU suite copies them there), or WKD_DATA_DIR.
_DATA_CANDIDATES = [os.environ.get("WKD_DATA_DIR"), REPO / "data", REPO.parent / "shared" / "data"]

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def data_dir():
    for c in _DATA_CANDIDATES:
        if c and Path(c).is_dir() and any(Path(c).glob("*.pth")):
            return Path(c)
    return None


def load_cost_matrix(name):
    """Load a released [C, C] distance matrix by file name, or skip the test when the data is absent."""
    d = data_dir()
    if d is None or not (d / name).exists():
        pytest.skip(f"real cost matrix {name} not found (../shared/data, data/ or WKD_DATA_DIR)")
    return torch.load(d / name, weights_only=True)


def import_or_skip(module: str):
    """``pytest.importorskip`` that also skips when the module is installed but cannot load with this torch: the
    torchvision wheels on PyPI are built against the CUDA build of torch, so next to a CPU-only torch (e.g. torch
    2.13.0+cpu) ``import torchvision`` (and timm, torchdistill, which import it) raises RuntimeError, not
    ImportError. The skip reason quotes the error."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed ({exc})", allow_module_level=True)
    except Exception as exc:  # noqa: BLE001 (any error while importing a third-party package)
        pytest.skip(f"{module} is installed but does not load with torch {torch.__version__}: "
                    f"{type(exc).__name__}: {str(exc)[:200]}", allow_module_level=True)


def import_pot():
    """POT (``import ot``) for the comparisons with an independent library; skips the calling test with a reason when
    POT is not installed (it is optional: the GPU test machine has none). Only tests that compare with POT call it."""
    return pytest.importorskip("ot", reason="POT is not installed (pip install POT): comparison with POT skipped")


# ------------------------------------------------------------------------------------------ backends
@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation family of the ops, as the tests see it.

    name: the ``backend=`` argument of the public API ("cpu", "triton", "cuda"); device: where its tensors live;
    interpreted: Triton kernels run by the interpreter on CPU tensors (TRITON_INTERPRET=1: slow, keep shapes small).
    """

    name: str
    device: str
    interpreted: bool = False

    def to(self, *tensors):
        """The tensors moved to this backend's device (one tensor: that tensor; several: a tuple)."""
        out = tuple(t.to(self.device) for t in tensors)
        return out[0] if len(out) == 1 else out

    def __str__(self):
        return self.name


def _triton_backend():
    if torch.cuda.is_available() and not TRITON_INTERPRET:
        return Backend("triton", "cuda")
    if not TRITON_INTERPRET:
        return "backend 'triton' needs a CUDA device or TRITON_INTERPRET=1"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "backend 'triton' needs triton installed"
    return Backend("triton", "cpu", interpreted=True)


def _cuda_backend():
    import wkd_kernels as wk

    if not torch.cuda.is_available():
        return "backend 'cuda' (the CUDA C++ kernels) needs a CUDA device"
    if not wk.HAS_CUDA_EXT:
        return f"backend 'cuda': package built without the CUDA C++ kernels: {wk.build_info()}"
    return Backend("cuda", "cuda")


# Every backend of the ops, one line each: (name, a function giving its Backend here, or the reason why it cannot
# run here). The `backend` fixture and the parametrised tests generate cases for the available ones only (no case
# is generated just to be skipped); the missing ones and why are in pytest's header.
def _cpu_backend():
    import wkd_kernels as wk

    if not wk.HAS_C_EXT:
        return f"backend 'cpu': installed without the compiled extension: {wk.build_info()}"
    return Backend("cpu", "cpu")


BACKENDS = [
    ("cpu", _cpu_backend),
    ("torch", lambda: Backend("torch", "cpu")),  # ATen ops only (wkd_kernels/aten/), run on CPU tensors here
    ("triton", _triton_backend),
    ("cuda", _cuda_backend),
]
GAUSSIAN_BACKENDS = ("cpu", "torch", "triton")  # the backends of the Gaussian ops (no CUDA C++ ones)

_BACKEND_CACHE = {}


def backend_or_reason(name):
    """The Backend of that name usable here, or the reason (a str) why it is not."""
    if name not in _BACKEND_CACHE:
        makers = dict(BACKENDS)
        if name not in makers:
            raise ValueError(f"unknown backend {name!r}")
        _BACKEND_CACHE[name] = makers[name]()
    return _BACKEND_CACHE[name]


def available_backends(names=None):
    """The names (of `names`, default every backend) whose Backend can run here, in BACKENDS order."""
    return [n for n, _ in BACKENDS if (names is None or n in names) and not isinstance(backend_or_reason(n), str)]


def make_backend(name):
    """The Backend of that name usable here, or skip the test (with the reason): for tests of one backend."""
    b = backend_or_reason(name)
    if isinstance(b, str):
        pytest.skip(b)
    return b


def pytest_report_header(config):
    missing = [f"{n} ({backend_or_reason(n)})" for n, _ in BACKENDS if n not in available_backends()]
    return [f"wkd backends generated: {', '.join(available_backends())}"
            + (f"; not generated: {'; '.join(missing)}" if missing else "")]


@pytest.fixture(params=available_backends())
def backend(request):
    """Every backend that can run here (BACKENDS): "cpu" (C++ CPU kernels); "torch" (ATen ops, CPU tensors here);
    "triton" (CUDA tensors with a GPU, else CPU tensors under TRITON_INTERPRET=1); "cuda" (the CUDA C++ kernels: a
    GPU and a build with them). Tests that parametrise it themselves pass backend names with `indirect=["backend"]`.
    Ops without CUDA C++ kernels use the `gaussian_backend` fixture instead."""
    return make_backend(request.param)


@pytest.fixture(params=available_backends(GAUSSIAN_BACKENDS))
def gaussian_backend(request):
    """The backends of the Gaussian ops (feature_stats, sqrtm, nuclear_norm, bures_wasserstein) that can run here."""
    return make_backend(request.param)


# ------------------------------------------------------------------------------------------ comparisons
# The one relative-error measure of the tests (every test file uses it or assert_close). `mode` says relative to what:
#   "max":   max |want| over the whole tensor (default; also what rows that are 0 up to rounding need)
#   "row":   max |want| along `dim` (each row its own scale: scalings and potentials whose rows differ in size)
#   "entry": |want| of each entry (values of a loss / distance per sample)
#   "fro":   per matrix over the last two dims, |got - want|_F / |want|_F (matrix functions)
def _diff_and_scale(got, want, mode, dim, scale, floor):
    x, y = torch.as_tensor(got).detach().double().cpu(), torch.as_tensor(want).detach().double().cpu()
    if x.shape != y.shape and (x.numel() == 1 or y.numel() == 1):
        x, y = torch.broadcast_tensors(x, y)
    assert x.shape == y.shape, f"shape {tuple(x.shape)} != {tuple(y.shape)}"
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    assert torch.equal(fx, fy), "non-finite entries differ"
    assert torch.equal(x[~fx], y[~fy]), "non-finite values differ"
    x0, y0 = torch.where(fx, x, 0.0), torch.where(fy, y, 0.0)
    diff = (x0 - y0).abs()
    if scale is not None:
        return diff, torch.tensor(max(float(scale), floor), dtype=torch.float64), x, y
    if mode == "max":
        s = y0.abs().amax() if y0.numel() else torch.tensor(0.0, dtype=torch.float64)
    elif mode == "row":
        s = y0.abs().amax(dim=dim, keepdim=True)
    elif mode == "entry":
        s = y0.abs()
    elif mode == "fro":
        diff = diff.flatten(-2).norm(dim=-1)
        s = y0.flatten(-2).norm(dim=-1)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return diff, s.clamp_min(floor), x, y


def rel_error(got, want, mode="max", *, dim=-1, scale=None, floor=1e-300):
    """Worst relative error of ``got`` against ``want`` (``mode`` above; ``scale``: a fixed scale instead), over the
    entries where ``want`` is finite; non-finite entries must be identical in both (else AssertionError)."""
    diff, s, _, _ = _diff_and_scale(got, want, mode, dim, scale, floor)
    return (diff / s).max().item() if diff.numel() else 0.0


def assert_close(got, want, rtol, atol=0.0, what="", mode="max", *, dim=-1, scale=None, floor=1e-300,
                 check_dtype=False):
    """The tests' one tolerance check: same shape (and dtype with ``check_dtype``), same non-finite entries, and
    |got - want| <= atol + rtol * scale on every finite entry (scale per ``mode``, see above; ``mode="fro"``: the
    Frobenius norms per matrix). The failure message gives the worst relative error, the worst entry and its
    values. Tolerance tables in the test files are {dtype: (rtol, atol)}: ``assert_close(x, y, *TOL[dtype])``."""
    what = f"{what}: " if what else ""
    g, w = torch.as_tensor(got), torch.as_tensor(want)
    if check_dtype:
        assert g.dtype == w.dtype, f"{what}dtype {g.dtype} != {w.dtype}"
    try:
        diff, s, x, y = _diff_and_scale(g, w, mode, dim, scale, floor)
    except AssertionError as e:
        raise AssertionError(f"{what}{e}") from None
    if diff.numel() == 0:
        return
    excess = diff - (atol + rtol * s)
    if excess.max().item() > 0:
        rel = (diff / s).max().item()
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)) if excess.dim() else ()
        where = f"worst entry at {idx}" + (f": got {x[idx].item()!r}, want {y[idx].item()!r}" if mode != "fro" else "")
        raise AssertionError(f"{what}worst relative error {rel:.3e} (max abs error {diff.max().item():.3e}) > rtol "
                             f"{rtol:.1e} + atol {atol:.1e}; {where}")


def triton_device():
    """Device on which the Triton kernels can run here: cuda, or cpu under TRITON_INTERPRET=1; else skip."""
    if torch.cuda.is_available() and not TRITON_INTERPRET:
        return "cuda"
    if TRITON_INTERPRET:
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton is not installed")
        return "cpu"
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def dev():
    """The device on which the Triton kernels run here (triton_device): cuda, or cpu under TRITON_INTERPRET=1."""
    return triton_device()


class _FactoryBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of zero-filled tensors created through the dispatcher (what autograd's materialisation uses)."""

    OPS = {"zeros_like", "zeros", "new_zeros", "full_like", "full", "zero_", "fill_"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS and isinstance(out, torch.Tensor):
            self.bytes += out.numel() * out.element_size()
        return out


def backward_zero_bytes(fn, inputs):
    """Bytes of zero-filled tensors that the backward of ``fn(*inputs).sum()`` creates (a backward that materialises
    zero gradients for non-differentiable outputs shows here)."""
    out = fn(*inputs)
    with _FactoryBytes() as mode:
        out.sum().backward()
    return mode.bytes


def simplex(B, n, dtype=torch.float64, zeros=0, seed=0):
    """[B, n] random probability rows (seeded), with `zeros` entries per row set to exactly zero mass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.05
    for i in range(B):
        if zeros:
            x[i, torch.randperm(n, generator=g)[:zeros]] = 0
    return (x / x.sum(1, keepdim=True)).to(dtype)


def rand_cost(*shape, dtype=torch.float64, seed=1):
    """Seeded uniform [0, 1) cost of the given shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)


_TEST_TIMEOUT_S = int(os.environ.get("WKD_TEST_TIMEOUT_S", "0") or 0)


@pytest.fixture(autouse=True)
def _per_test_timeout(request):
    """With WKD_TEST_TIMEOUT_S=N (bench/gpu_suite.sh sets it; the GPU machine has no pytest-timeout), a test that runs
    longer than N seconds fails with a TimeoutError instead of eating the whole suite's time (SIGALRM, main thread,
    POSIX only; a kernel already launched finishes first)."""
    if _TEST_TIMEOUT_S <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} ran longer than WKD_TEST_TIMEOUT_S={_TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(_TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Opt-in tests, deselected (not generated to be skipped) unless their environment variable is 1: marker -> variable
OPT_IN = {"cuda_emulation": "WKD_TEST_CUDA_EMULATION", "e2e": "WKD_TEST_E2E"}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_emulation: builds csrc/cuda/sinkhorn.cu as host C++ and runs it under "
                                       "the host emulation, minutes (opt-in: WKD_TEST_CUDA_EMULATION=1)")


def pytest_collection_modifyitems(config, items):
    """Deselected (not generated to be skipped), the terminal summary says how many: without a CUDA device the tests
    marked ``gpu``; the opt-in tests (OPT_IN) without their environment variable set to 1; where the Triton kernels
    cannot run (no CUDA device and no TRITON_INTERPRET=1, or no triton), the tests of the Triton kernels themselves
    (those that take the ``dev`` fixture)."""
    rules = []  # (predicate on an item, what the summary says)
    if not torch.cuda.is_available():
        rules.append((lambda item: "gpu" in item.keywords,
                      "marked gpu deselected: no CUDA device (bench/gpu_suite.sh runs them)"))
    for marker, var in OPT_IN.items():
        if os.environ.get(var, "0") != "1":
            rules.append((lambda item, m=marker: m in item.keywords, f"marked {marker} deselected: opt-in ({var}=1)"))
    triton_here = backend_or_reason("triton")
    if isinstance(triton_here, str):
        rules.append((lambda item: "dev" in getattr(item, "fixturenames", ()),
                      f"of the Triton kernels deselected: {triton_here}"))
    counts = {}
    for keep_out, why in rules:
        dropped = [item for item in items if keep_out(item)]
        if dropped:
            items[:] = [item for item in items if not keep_out(item)]
            config.hook.pytest_deselected(items=dropped)
            counts[why] = len(dropped)
    config.stash[_DESELECTED] = counts


_DESELECTED = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for why, n in config.stash.get(_DESELECTED, {}).items():
        terminalreporter.write_line(f"{n} tests {why}")


def assert_interruptible(calls: dict, within_s: float = 5.0) -> None:
    """``calls``: name -> (setup, long_call), each ``long_call`` a statement (a C++ kernel call of a minute or more).
    One fresh Python process runs them in turn, each after its ``setup``; a second into each call it gets SIGINT
    (Ctrl-C), and the call must end with KeyboardInterrupt within ``within_s`` seconds of the signal (the CPU
    kernels poll for signals between iterations). One process for all: torch is imported once."""
    import subprocess
    import textwrap
    import time

    lines = [
        "import signal, sys, time",
        # A process started in the background by a non-interactive shell (as CI runners do) inherits SIGINT ignored,
        # and Python then keeps ignoring it: install Python's own handler, so the test checks the kernel's polling.
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        "import torch",
        "import wkd_kernels as wk",
    ]
    for name, (setup, long_call) in calls.items():
        lines += [
            textwrap.dedent(setup),
            f"print('READY {name}', flush=True)",
            "t0 = time.monotonic()",
            "try:",
            f"    {long_call}",
            f"    print(f'FINISHED {name} after {{time.monotonic() - t0:.1f}} s', flush=True)",
            "    sys.exit(1)",
            "except KeyboardInterrupt:",
            f"    print('INTERRUPTED {name}', flush=True)",
        ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.Popen([sys.executable, "-c", "\n".join(lines)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    late = []
    try:
        for name in calls:
            line = proc.stdout.readline()
            assert line.strip() == f"READY {name}", f"{name}: the child did not start it: {line!r} " + (
                proc.stderr.read()[-2000:] if proc.poll() is not None else "")
            time.sleep(1.0)
            t_signal = time.monotonic()
            proc.send_signal(signal.SIGINT)
            line = proc.stdout.readline()  # blocks until the call ends (or the child dies: "")
            elapsed = time.monotonic() - t_signal
            assert line.strip() == f"INTERRUPTED {name}", f"{name}: the call was not interrupted: {line!r} " + (
                proc.stderr.read()[-2000:] if proc.poll() is not None else "")
            if elapsed >= within_s:
                late.append(f"{name} ended {elapsed:.1f} s after SIGINT")
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not late, f"more than {within_s} s: " + "; ".join(late)
