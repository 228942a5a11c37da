"""The gauge correction of the CUDA C++ backward (docs/design.md section 3), emulated, against the extended-precision
ground truth: one-hot b at reg 0.02 (where the plain sweep is off by up to 1e3 at zero-mass entries), both domains,
the three backward paths -- single-launch kernels (shared cost, C <= 256), per-half-iteration products (shared
cost, single-launch kernels off) and per-row kernels (cost [B, n, m]) -- eps 0 and 1e-3, float64.

    python python_tests/cuda_emulation/check_gauge_correction.py BUILD_DIR

Prints the failing cases, or "GAUGE EMULATION OK"; exits 1 on a failure. Run by
python_tests/test_sinkhorn_gradient_stability.py::test_cuda_gauge_correction_under_host_emulation.
"""
import sys

import emulator  # this directory (the script's own) is on sys.path; it puts the repository there too
import torch
from conftest import simplex
from sinkhorn_ground_truth import sinkhorn_mp

emu, cpu_ops = emulator.load(sys.argv[1])
F64 = torch.float64
bad = []
B, n, m, T, reg = 11, 9, 11, 6, 0.02
a = simplex(1, n, F64, 0, 5).expand(B, n).contiguous()
b = torch.zeros(B, m, dtype=F64)
b[torch.arange(B), torch.arange(B) % m] = 1.0
g = torch.linspace(0.5, 1.5, B, dtype=F64)
gen = torch.Generator().manual_seed(3)
costs = {"shared": torch.rand(n, m, generator=gen, dtype=F64), "per_row": torch.rand(B, n, m, generator=gen, dtype=F64)}
for layout, small in (("shared", 1), ("shared", 0), ("per_row", 0)):
    cost = costs[layout]
    emu.configure(small, emulator.SMEM_SM90)
    for eps in (0.0, 1e-3):
        _, wa, wb = sinkhorn_mp(a, b, cost, reg, T, eps, g)
        scale = torch.maximum(wa.abs().amax(1, keepdim=True), wb.abs().amax(1, keepdim=True))
        for log in (False, True):
            out = emu.sinkhorn(a, b, cost, reg, T, eps, log, True)
            ga, gb = emu.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log, eps)
            cga, cgb = cpu_ops.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log, eps)
            for name, x, w in (("grad a", ga, wa), ("grad b", gb, wb), ("cpu grad b", cgb, wb)):
                err = ((x - w).abs() / (w.abs() + 1e-4 * scale)).max().item()
                if not err < 1e-9:
                    bad.append(f"{layout} small={small} eps={eps} log={log}: {name} error {err:.2e}")
            plain = emu.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log)[1]
            if eps == 0.0 and not ((plain - wb).abs() / (wb.abs() + 1e-4 * scale)).max().item() > 1e-3:
                bad.append(f"{layout} small={small} log={log}: the uncorrected sweep is not off here (premise)")
print("\n".join(bad) if bad else "GAUGE EMULATION OK")
sys.exit(1 if bad else 0)
