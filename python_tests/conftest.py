"""Shared test fixtures.

Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported
(the README's test command does that). GPU tests are marked `gpu` and skip without CUDA.
"""
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

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


def import_pot():
    """POT (``import ot``) for the comparisons with an independent library; skips the calling test with a reason when
    POT is not installed (it is optional: the GPU test machine has none). Only tests that compare with POT call it."""
    return pytest.importorskip("ot", reason="POT is not installed (pip install POT): comparison with POT skipped")


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
