"""Every Triton kernel variant the launchers produce compiles for sm_80 and sm_90 under the installed Triton, without
a GPU (python_tests/triton_compile_matrix.py records the launches of the real launchers and compiles each variant);
and an unsupported or failing Triton gives one clear error, never a raw CompilationError.

The two compile-matrix tests (minutes each) are marked `compile_matrix` and left out of the test command by
pyproject's addopts; CI runs them as their own step, once per Triton version, under the default Triton and the
oldest supported release and 3.6.0 (`PYTHONPATH=DIR` with `pip install --no-deps --target DIR triton==X`, and
`python -m pytest python_tests/test_triton_compile_matrix.py -m compile_matrix`, see .ci/run)."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

triton = pytest.importorskip("triton")

from wkd_kernels.triton import _support  # noqa: E402


def run_compile_matrix(*args, timeout):
    """python_tests/triton_compile_matrix.py with `args` in a subprocess, TRITON_INTERPRET unset; skips where the
    installed Triton has no NVIDIA backend, is unsupported, or finds no ptxas. Returns the CompletedProcess."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without the NVIDIA backend")
    if not _support.supported():
        pytest.skip(_support.support_message())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "python_tests" / "triton_compile_matrix.py"), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas available")
    return r


@pytest.mark.compile_matrix
def test_compile_matrix_sm80_sm90():
    r = run_compile_matrix("--arch", "80,90", timeout=3000)
    summary = [line for line in r.stdout.splitlines() if line.startswith(("triton ", "recorded ", "compiled: "))]
    sys.stderr.write("\n" + "\n".join(summary) + "\n")  # the counts per dtype, shown with -s or on failure
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    done = [line for line in summary if line.startswith("compiled: ")]
    assert done, r.stdout[-2000:]
    # every family is there: both dtypes, Sinkhorn (dot and row kernels), the sparse Sinkhorn's CSR product and the
    # Gaussian kernels
    assert "float32" in done[0] and "float64" in done[0]
    for kernel in ("sinkhorn_fwd_dot_kernel", "sinkhorn_bwd_rows_kernel", "csr_product_kernel", "_sqrtm_eigh_fwd",
                   "_nuclear_norm_fwd", "_feature_stats_full_bwd"):
        assert kernel in r.stdout, kernel


@pytest.mark.compile_matrix
def test_compile_matrix_padded_dot_kernels_load_16_bytes():
    """At C = 1000 (rows not 16-byte aligned) the padded Sinkhorn tl.dot kernels copy their k-loop
    operands with the same cp.async widths (16-byte in float64, mostly 16-byte in float32) as at C = 1024, compiled
    for sm_90 with a real launch's alignment specialisations. Without the padding the copies are 4 / 8 bytes and
    this fails (checked when the padding was added)."""
    r = run_compile_matrix("--check-load-widths", timeout=1200)
    assert r.returncode == 0 and "load widths: 0 mismatches" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]


def test_unsupported_triton_is_one_clear_error(monkeypatch):
    from wkd_kernels.triton import sinkhorn as sk

    monkeypatch.setattr(_support, "MIN_TRITON", (99, 0))
    a = torch.full((1, 3), 1 / 3)
    with pytest.raises(RuntimeError, match=r"installed Triton is .* support Triton >= 99\.0"):
        sk.sinkhorn_forward(a, a.clone(), torch.rand(3, 3), 0.1, 2)


def test_compilation_error_is_explained():
    from triton.compiler.errors import CompilationError

    @_support.explain_compile_errors("wkd.example (Triton example)")
    def launcher():
        raise CompilationError("x = tl.dot(a, b)", ast.parse("x").body[0], "Unsupported lhs dtype fp64")

    with pytest.raises(RuntimeError) as info:
        launcher()
    msg = str(info.value)
    assert msg.startswith("wkd.example (Triton example): a Triton kernel failed to compile")
    assert triton.__version__ in msg and "support Triton >= " in msg and "Unsupported lhs dtype fp64" in msg
    assert isinstance(info.value.__cause__, CompilationError)
