"""Build the host emulation of the CUDA C++ Sinkhorn kernels and compare them with the CPU op and the reference.

    python python_tests/cuda_emulation/check_emulated_kernels.py BUILD_DIR        (WKD_EMU_SMS=1 | 1000)

Compiles emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu with WKD_CUDA_EMULATE) into the library wkd_cuda_emu, whose
ops torch.ops.wkd_cuda_emu.sinkhorn / sinkhorn_backward run the CUDA kernels and their launch code on CPU tensors,
and compares every output with torch.ops.wkd.* (the CPU op of wkd_kernels, imported in the same process) and with
wkd_kernels.reference.sinkhorn_reference (autograd through it for the gradients). WKD_EMU_SMS sets the emulated
multiprocessor count (1: every product takes the 32 x 64 tiles; 1000: the 16 x 32 tiles). The single-launch kernels
for C <= 256 are switched off here (wkd_cuda_emu.configure(small=0)): check_small_c_kernels.py checks them. Prints the
failing cases, or "EMULATION OK"; exits 1 on a failure.
Run by python_tests/test_sinkhorn_cuda.py::test_kernels_under_host_emulation.
"""
import itertools
import sys

import torch

import emulator  # this directory (the script's own) is on sys.path; it puts the repository there too
from conftest import simplex  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402

emu, cpu_ops = emulator.load(sys.argv[1])
# Every shape below has a shared cost with n, m <= 256, which the size rule sends to the single-launch kernels;
# this program checks today's per-half-iteration and per-row kernels, so it turns those off (they are checked by
# check_small_c_kernels.py).
emu.configure(0, 227 * 1024)

F64, F32 = torch.float64, torch.float32
TOL = {F32: 1e-5, F64: 1e-10}
GTOL = {F32: 1e-4, F64: 1e-9}
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")


def rel(x, y, scale=None):
    x, y = x.double(), y.double()
    fin = torch.isfinite(y)
    assert torch.equal(fin, torch.isfinite(x)), "non-finite entries differ"
    if not fin.any():
        return 0.0
    scale = y[fin].abs().max().item() if scale is None else scale
    return ((x[fin] - y[fin]).abs().max() / max(scale, 1e-300)).item()


bad = []
shapes = [(1, 1, 1, 1), (3, 7, 5, 3), (5, 33, 65, 2), (4, 40, 36, 2), (6, 20, 9, 1)]
for (B, n, m, T), dtype, shared, log, eps in itertools.product(shapes, (F64, F32), (True, False), (False, True),
                                                                (0.0, 1e-8)):
    zeros = 2 if n > 3 else 0
    a, b = simplex(B, n, dtype, zeros, 1), simplex(B, m, dtype, min(zeros, m - 1), 2)
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=torch.Generator().manual_seed(3),
                      dtype=F64).to(dtype)
    tag = f"{(B, n, m, T)} {dtype} shared={shared} log={log} eps={eps}"
    for keep in (True, False):
        out = emu.sinkhorn(a, b, cost, 0.1, T, eps, log, keep)
        cpu = cpu_ops.sinkhorn(a, b, cost, 0.1, T, eps, log, keep)
        if len(out) != len(OUTPUTS):
            bad.append(f"{tag} keep={keep}: {len(out)} outputs")
        for name, x, y in zip(OUTPUTS, out, cpu, strict=False):
            if x.shape != y.shape or (x.numel() and rel(x, y) > TOL[dtype]):
                bad.append(f"{tag} keep={keep} {name}")
    out = emu.sinkhorn(a, b, cost, 0.1, T, eps, log, True)
    if rel(out[0], sinkhorn_reference(a, b, cost, 0.1, T, eps=eps, log_domain=log)[0]) > TOL[dtype]:
        bad.append(f"{tag} value vs reference")
    gv = torch.randn(B, generator=torch.Generator().manual_seed(4), dtype=F64).to(dtype)
    got = emu.sinkhorn_backward(gv, a, b, cost, *out[3:], 0.1, log)
    cpu = cpu_ops.sinkhorn_backward(gv, a, b, cost, *out[3:], 0.1, log)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    val = sinkhorn_reference(a64, b64, cost.double(), 0.1, T, eps=eps)[0]
    rg = torch.autograd.grad((val * gv.double()).sum(), (a64, b64))
    for what, want in (("cpu", cpu), ("reference", rg)):
        scale = max(w.abs().max().item() for w in want)
        for name, x, y in zip(("grad_a", "grad_b"), got, want, strict=False):
            if rel(x, y, scale) > GTOL[dtype]:
                bad.append(f"{tag} {name} vs {what}: {rel(x, y, scale):.3g}")
# The emulated ops check their arguments with the messages of the C++ ops, naming their own library.
a, b, cost = simplex(2, 4, F64, 0, 1), simplex(2, 3, F64, 0, 2), torch.rand(4, 3, dtype=F64)
out = emu.sinkhorn(a, b, cost, 0.1, 3, 0.0, False, False)
try:
    emu.sinkhorn_backward(torch.ones(2, dtype=F64), a, b, cost, *out[3:], 0.1, False)
    bad.append("backward without history did not raise")
except ValueError as e:
    if "wkd_cuda_emu.sinkhorn_backward: `hist_r` must be" not in str(e):
        bad.append(f"backward without history: {e}")
# A zero-mass row whose K entry dominates its column (cost gap 50 reg) made the CPU op's shared
# first half-iteration cancel to 0 (NaN); the CUDA kernels compute K^T u0 by a product and must stay finite.
for dtype in (F64, F32):
    n = 16
    c1 = 1 - torch.eye(n, dtype=dtype)
    a1 = torch.full((1, n), 1 / (n - 1), dtype=dtype)
    a1[0, 0] = 0
    for shared, log in itertools.product((True, False), (False, True)):
        c = c1 if shared else c1.expand(1, n, n).contiguous()
        got = emu.sinkhorn(a1, a1.clone(), c, 0.02, 10, 0.0, log, True)[0]
        want = sinkhorn_reference(a1, a1.clone(), c1, 0.02, 10)[0]
        if not torch.isfinite(got).all() or rel(got, want) > TOL[dtype]:
            bad.append(f"dominated zero-mass row {dtype} shared={shared} log={log}: {got} vs {want}")
print("\n".join(bad) if bad else "EMULATION OK")
sys.exit(1 if bad else 0)
