"""Without a GPU, compile the Gaussian-op Triton kernels to sm_90 machine code (Triton + its bundled ptxas), in the
variants the launchers use for the issue's shapes (49 x 49 and 64 x 64 matrices -> BLOCK 64, float32 and float64):
catches what the interpreter cannot (types, tl.gather and tl.dot layouts, while-loop carried values)."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from wkd_kernels.triton import sqrtm as sq, nuclear_norm as nn_, feature_stats as fs

    FLOATS = {"TINY", "LIMIT", "DEV_MAX", "TOL", "PINV_REL", "KEEP_REL", "INV_EPS"}

    def compile_variant(kernel, dt, consts, num_warps):
        sig = {}
        for p in kernel.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                sig[p.name] = "*" + dt
            elif p.name in FLOATS:
                sig[p.name] = dt
            else:
                sig[p.name] = "i32"
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    for dt, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        mat = dict(ACC=acc, BLOCK=64, PREC="ieee")
        compile_variant(sq._sqrtm_ns_fwd, dt, mat, 8)
        compile_variant(sq._lyap_ns_bwd, dt, mat, 8)
        compile_variant(sq._sqrtm_eigh_fwd, dt, dict(mat, WRITE_Z=True, MAX_SWEEPS=12), 8)
        compile_variant(sq._lyap_eigh_bwd, dt, dict(mat, MAX_SWEEPS=12), 8)
        compile_variant(nn_._nuclear_norm_fwd, dt, dict(ACC=acc, BLOCK_P=64, BLOCK_Q=64, PREC="ieee"), 8)
        compile_variant(fs._feature_stats_diag_fwd, dt, dict(ACC=acc, BLOCK_C=16, BLOCK_M=16), 4)
        compile_variant(fs._feature_stats_full_fwd, dt, dict(ACC=acc, BLOCK_I=32, BLOCK_J=32, BLOCK_K=16), 8)
        compile_variant(fs._feature_stats_diag_bwd, dt, dict(ACC=acc, BLOCK_C=16, BLOCK_Q=64), 4)
        compile_variant(fs._feature_stats_full_bwd, dt, dict(ACC=acc, BLOCK_I=32, BLOCK_J=16, BLOCK_Q=64), 4)
    compile_variant(sq._sqrtm_ns_fwd, "fp32", dict(ACC=tl.float32, BLOCK=64, PREC="tf32x3"), 8)
    print("compiled")
""")


def test_gaussian_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without the NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas available")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
