"""The single-launch CUDA C++ Sinkhorn kernels (shared cost, C <= 256; docs/design.md section 3) under host emulation.

    python python_tests/cuda_emulation/check_small_c_kernels.py BUILD_DIR

Builds emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu with WKD_CUDA_EMULATE, the library wkd_cuda_emu; the same
build as check_emulated_kernels.py) and checks, on CPU tensors:
  * forward and backward of the single-launch kernels against the CPU op (torch.ops.wkd.*) and the float64
    reference (wkd_kernels.reference.sinkhorn_reference, autograd through it for the gradients) at
    C in {1, 3, 81, 91, 100, 256} (n = m = C, plus n != m), odd B, zero-mass entries in a and b, both domains,
    float32 / float64, eps 0 and 1e-8, history on / off; at C = 81 also with M forced off chip (the build kernel
    + the global-memory passes) and bitwise equal to the on-chip run;
  * the launch count (the emulator counts launches): 1 forward + 1 backward launch when M fits in shared memory,
    2 + 2 with the build kernel otherwise;
  * in the scaling domain, bitwise equality of u, v, hist_r, hist_s, y, grad_a, grad_b with today's
    per-half-iteration kernels (wkd_cuda_emu.configure(small=0)) and the value to rounding.
The launch choices (every tile table entry, the rows per CTA) are checked by check_tuning_ops.py.
Prints the maximum errors and the failing cases, or "SMALL-C EMULATION OK"; exits 1 on a failure.
Run by python_tests/test_sinkhorn_cuda.py::test_single_launch_kernels_under_host_emulation.
"""
import itertools
import os
import sys

import torch

import emulator  # this directory (the script's own) is on sys.path; it puts the repository there too
from conftest import simplex  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402

from emulator import OUTPUTS, SMEM_SM90, rel, same  # noqa: E402

emu, cpu_ops = emulator.load(sys.argv[1])

F64, F32 = torch.float64, torch.float32
TOL = {F32: 1e-5, F64: 1e-10}
GTOL = {F32: 1e-4, F64: 1e-9}
bad = []
worst = {}  # (what, dtype) -> max relative error


def record(what, dtype, err, tol, tag):
    key = (what, str(dtype).replace("torch.", ""))
    worst[key] = max(worst.get(key, 0.0), err)
    if not err <= tol:
        bad.append(f"{tag}: {what} {err:.3g}")


def counted(f, *args):
    c0 = emu.launch_count()
    out = f(*args)
    return out, emu.launch_count() - c0


EMU_SMS = int(os.environ.get("WKD_EMU_SMS", "8"))  # the emulated multiprocessor count (run_emulation_check sets it)


def expected_launches(B, n, m, dtype, smem, sms=EMU_SMS):
    """(forward, backward) launches of the single-launch path: 1 each, +1 (the build kernel) where the kernel
    matrix (row stride m rounded up to odd) does not fit in the shared memory per block next to the state of one
    row (forward 3n + m, backward 3n + 3m values, each rounded up to 4): small_plan in
    csrc/cuda/sinkhorn/small_plan.cuh."""
    def r4(x):
        return (x + 3) // 4 * 4

    mat = r4(n * (m | 1)) * dtype.itemsize
    return tuple(1 if mat + (3 * r4(n) + k * r4(m)) * dtype.itemsize <= smem else 2 for k in (1, 3))


def run_case(B, n, m, T, dtype, log, eps, reg=0.1, smem=SMEM_SM90, seed=0):
    emu.configure(-1, smem)
    zn, zm = (0 if n < 3 else max(1, n // 10)), (0 if m < 3 else max(1, m // 10))
    a, b = simplex(B, n, dtype, zn, 1 + seed), simplex(B, m, dtype, zm, 2 + seed)
    if n >= 3:
        a[0] = 0
        a[0, :2] = torch.tensor([0.25, 0.75], dtype=dtype)  # a row with only two support points
    cost = torch.rand(n, m, generator=torch.Generator().manual_seed(3 + seed), dtype=F64).to(dtype)
    tag = f"B={B} n={n} m={m} T={T} {dtype} log={log} eps={eps} reg={reg} smem={smem}"
    fwd_launches, bwd_launches = expected_launches(B, n, m, dtype, smem)
    outs = {}
    for keep in (True, False):
        out, launches = counted(emu.sinkhorn, a, b, cost, reg, T, eps, log, keep)
        outs[keep] = out
        cpu = cpu_ops.sinkhorn(a, b, cost, reg, T, eps, log, keep)
        if launches != fwd_launches:
            bad.append(f"{tag} keep={keep}: forward took {launches} launches, expected {fwd_launches}")
        for name, x, y in zip(OUTPUTS, out, cpu, strict=False):
            if x.shape != y.shape:
                bad.append(f"{tag} keep={keep} {name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            elif x.numel():
                record(f"fwd {name} vs cpu", dtype, rel(x, y), TOL[dtype], f"{tag} keep={keep}")
    out = outs[True]
    for name, x, y in zip(OUTPUTS[:3], outs[False][:3], out[:3], strict=False):
        if not same(x, y):
            bad.append(f"{tag}: {name} differs with / without history")
    ref = sinkhorn_reference(a, b, cost, reg, T, eps=eps, log_domain=log)
    record("value vs reference", dtype, rel(out[0], ref[0]), TOL[dtype], tag)
    gv = torch.randn(B, generator=torch.Generator().manual_seed(4), dtype=F64).to(dtype)
    got, launches = counted(emu.sinkhorn_backward, gv, a, b, cost, *out[3:], reg, log)
    if launches != bwd_launches:
        bad.append(f"{tag}: backward took {launches} launches, expected {bwd_launches}")
    cpu = cpu_ops.sinkhorn_backward(gv, a, b, cost, *out[3:], reg, log)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    # the scaling-domain reference in both domains: the log-domain one's autograd gives 0 at zero-mass entries
    # (its torch.where masks them), where the op's gradient is the derivative of the same function
    val = sinkhorn_reference(a64, b64, cost.double(), reg, T, eps=eps)[0]
    rg = torch.autograd.grad((val * gv.double()).sum(), (a64, b64))
    for what, want in (("cpu", cpu), ("reference", rg)):
        scale = max(w.abs().max().item() for w in want)
        for name, x, y in zip(("grad_a", "grad_b"), got, want, strict=False):
            record(f"bwd {name} vs {what}", dtype, rel(x, y, scale), GTOL[dtype], tag)
    return a, b, cost, gv, out, got


# ---- sizes, dtypes, domains, eps, history
t0 = os.times()[4]
for C, dtype, log, eps in itertools.product((1, 3, 81, 91, 100, 256), (F64, F32), (False, True), (0.0, 1e-8)):
    B = {1: 7, 3: 5, 81: 5, 91: 3, 100: 5, 256: 3}[C]
    T = 5 if C <= 3 else (3 if C < 256 else 2)
    run_case(B, C, C, T, dtype, log, eps)
for (n, m), dtype, log in itertools.product(((7, 5), (5, 33), (100, 91), (256, 17)), (F64, F32), (False, True)):
    run_case(3, n, m, 3, dtype, log, 1e-8 if log else 0.0)
# small reg in the log domain (K underflows in float32; L does not)
for dtype in (F64, F32):
    run_case(3, 91, 91, 4, dtype, True, 0.0, reg=0.004)
# B over several CTAs of several rows, the last one partial: with 1 emulated SM, one wave of 33 rows needs several
# rows per CTA (the automatic rows per CTA: small_plan)
sms_env = os.environ.get("WKD_EMU_SMS")
os.environ["WKD_EMU_SMS"] = "1"
for dtype, log in itertools.product((F64, F32), (False, True)):
    R = torch.ops.wkd_cuda_emu_tuning.small_plan(33, 81, 81, dtype, log, False)[0]
    if not 1 < R < 33 or 33 % R == 0:
        bad.append(f"B=33 C=81 {dtype} log={log} on 1 SM: the plan runs R={R}, not several rows with a partial CTA")
    run_case(33, 81, 81, 2, dtype, log, 0.0)
if sms_env is None:
    del os.environ["WKD_EMU_SMS"]
else:
    os.environ["WKD_EMU_SMS"] = sms_env

# ---- M off chip (build kernel + global passes) gives bitwise the on-chip numbers
for dtype, log in itertools.product((F64, F32), (False, True)):
    on = run_case(5, 81, 81, 3, dtype, log, 1e-8)
    off = run_case(5, 81, 81, 3, dtype, log, 1e-8, smem=4096)
    for name, x, y in zip(OUTPUTS + ("grad_a", "grad_b"), on[4] + on[5], off[4] + off[5], strict=False):
        if not same(x, y):
            bad.append(f"81x81 {dtype} log={log}: {name} differs between M on chip and off chip")
    emu.configure(-1, 4096)
    _, launches = counted(emu.sinkhorn, on[0], on[1], on[2], 0.1, 3, 1e-8, log, True)
    if launches != 2:
        bad.append(f"81x81 {dtype} log={log} off chip: forward took {launches} launches, expected 2")
emu.configure(-1, SMEM_SM90)

# ---- scaling domain: bitwise today's per-half-iteration kernels (value to rounding)
for C, dtype in itertools.product((3, 81, 100), (F64, F32)):
    a, b, cost, gv, out, got = run_case(5, C, C, 3, dtype, False, 1e-8)
    emu.configure(0, SMEM_SM90)
    old, launches = counted(emu.sinkhorn, a, b, cost, 0.1, 3, 1e-8, False, True)
    if launches != 1 + 2 * 3:
        bad.append(f"C={C} {dtype}: today's kernels took {launches} launches, expected 7")
    old_g = emu.sinkhorn_backward(gv, a, b, cost, *old[3:], 0.1, False)
    emu.configure(-1, SMEM_SM90)
    for name, x, y in zip(OUTPUTS[1:] + ("grad_a", "grad_b"), out[1:] + got, old[1:] + old_g, strict=False):
        if not same(x, y):
            bad.append(f"C={C} {dtype}: {name} not bitwise today's kernels ({rel(x, y):.3g})")
    record("value vs today's kernels", dtype, rel(out[0], old[0]), TOL[dtype] / 10, f"C={C}")

# ---- a zero-mass row whose K entry dominates its column stays finite
for dtype, log in itertools.product((F64, F32), (False, True)):
    n = 16
    c1 = 1 - torch.eye(n, dtype=dtype)
    a1 = torch.full((1, n), 1 / (n - 1), dtype=dtype)
    a1[0, 0] = 0
    got = emu.sinkhorn(a1, a1.clone(), c1, 0.02, 10, 0.0, log, True)[0]
    want = sinkhorn_reference(a1, a1.clone(), c1, 0.02, 10)[0]
    if not torch.isfinite(got).all() or rel(got, want) > TOL[dtype]:
        bad.append(f"dominated zero-mass row {dtype} log={log}: {got} vs {want}")

for (what, dt), err in sorted(worst.items()):
    print(f"max rel error {dt:8s} {what:28s} {err:.3g}")
print(f"emulation time {os.times()[4] - t0:.0f} s")
print("\n".join(bad) if bad else "SMALL-C EMULATION OK")
sys.exit(1 if bad else 0)
