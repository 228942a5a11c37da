"""The tuning ops of the CUDA C++ Sinkhorn kernels (per-call tile and rows-per-CTA choices for benchmarking) under
host emulation.

    python python_tests/cuda_emulation/check_tuning_ops.py BUILD_DIR        (WKD_EMU_SMS=8)

Builds emu_sinkhorn_cuda.cpp (the same build as check_emulated_kernels.py) and checks, on CPU tensors, the library
wkd_cuda_emu_tuning (bench/cuda/sinkhorn_tuning_ops.cu: the ops wkd_tuning::* of a CUDA build with
WKD_BUILD_TUNING_OPS=1, run by the emulated kernels):
  * per-half-iteration kernels, every tile table entry (`tile` = 0 .. num_tiles() - 1) and -1: u, v, hist_r,
    hist_s, y, grad_a, grad_b bitwise equal to the product op (wkd_cuda_emu.sinkhorn, the automatic tile), the
    value to rounding (its partial sums follow the tile width); tile -1 bitwise the product op in every output;
    all against the CPU op (torch.ops.wkd.*) to rounding. At n = m = 300 (the size rule's per-half-iteration
    kernels) and at n = 100, m = 81 with the single-launch kernels switched off (configure(small=0));
  * single-launch kernels, rows per CTA (`rows_per_block` in {1, 2, 3, 4, 8, 16}, and -1): every output, the value
    included, bitwise equal to the product op (each output is one thread's sequential loop whatever R), and
    against the CPU op, at C = 81 and n = 100, m = 81, both domains, float32 / float64, B = 33 (partial last CTA);
  * the plan that runs (small_plan): R = rows_per_block where shared memory allows; lowered (never raised) to fit
    the emulated opt-in shared memory: M off chip (R = the state rows that fit), M on chip (R = the rows that fit
    next to M), the outputs still bitwise the automatic choice's;
  * the automatic rows per CTA at 132 SMs, B x C = 2048 x 100 and 4096 x 81: one wave of CTAs under the emulated
    occupancy (wkd_cuda_emu.resident_ctas_per_sm), and the smallest such R;
  * out-of-range `tile` / `rows_per_block` (and small_plan's arguments) raise ValueError naming the argument and
    the valid range; num_tiles() and tile_table() describe the table (5 integers per entry).
Prints the failing cases, or "TUNING EMULATION OK"; exits 1 on a failure.
Run by python_tests/test_sinkhorn_cuda.py::test_tuning_ops_under_host_emulation.
"""
import itertools
import os
import sys

import torch

import emulator  # this directory (the script's own) is on sys.path; it puts the repository there too
from conftest import simplex  # noqa: E402

from emulator import OUTPUTS, SMEM_SM90, rel, same  # noqa: E402

emu, cpu_ops = emulator.load(sys.argv[1])
tune = torch.ops.wkd_cuda_emu_tuning

F64, F32 = torch.float64, torch.float32
TOL = {F32: 1e-5, F64: 1e-10}
GTOL = {F32: 1e-4, F64: 1e-9}
REG, EPS = 0.1, 1e-8
bad = []


def problem(B, n, m, dtype, seed=0):
    a, b = simplex(B, n, dtype, max(1, n // 10), 1 + seed), simplex(B, m, dtype, max(1, m // 10), 2 + seed)
    cost = torch.rand(n, m, generator=torch.Generator().manual_seed(3 + seed), dtype=F64).to(dtype)
    gv = torch.randn(B, generator=torch.Generator().manual_seed(4 + seed), dtype=F64).to(dtype)
    return a, b, cost, gv


def fwd_bwd(ops, a, b, cost, gv, T, log, **choice):
    """(forward outputs, (grad_a, grad_b)) of ops.sinkhorn / ops.sinkhorn_backward with the history."""
    out = ops.sinkhorn(a, b, cost, REG, T, EPS, log, True, **choice)
    return tuple(out), tuple(ops.sinkhorn_backward(gv, a, b, cost, *out[3:], REG, log, **choice))


def launched(fn):
    """(fn(), the emulated launches it made: a list of (grid x, grid y, grid z, threads, dynamic smem bytes))."""
    c0 = emu.launch_count()
    out = fn()
    k = emu.launch_count() - c0
    flat = list(emu.last_launches(k))
    return out, [tuple(flat[5 * i:5 * i + 5]) for i in range(k)]


def tuned_fwd_bwd(a, b, cost, gv, T, log, **choice):
    """fwd_bwd through the tuning ops; also the forward's and the backward's launches."""
    out, fwd = launched(lambda: tune.sinkhorn(a, b, cost, REG, T, EPS, log, True, **choice))
    grads, bwd = launched(lambda: tune.sinkhorn_backward(gv, a, b, cost, *out[3:], REG, log, **choice))
    return (tuple(out), tuple(grads)), fwd, bwd


def compare(tag, got, auto, cpu, dtype, value_bitwise):
    """got / auto / cpu: (forward outputs, grads). Bitwise vs auto (the value too when value_bitwise), to rounding
    vs the CPU op."""
    names = OUTPUTS + ("grad_a", "grad_b")
    g_all, a_all, c_all = got[0] + got[1], auto[0] + auto[1], cpu[0] + cpu[1]
    for name, x, y in zip(names, g_all, a_all, strict=False):
        if name == "value" and not value_bitwise:
            if not rel(x, y) <= TOL[dtype] / 10:
                bad.append(f"{tag}: value vs the automatic choice {rel(x, y):.3g}")
        elif not same(x, y):
            bad.append(f"{tag}: {name} not bitwise the automatic choice's ({rel(x, y):.3g})")
    gscale = max(t.abs().max().item() for t in cpu[1])
    for name, x, y in zip(names, g_all, c_all, strict=False):
        err = rel(x, y, gscale if name.startswith("grad") else None)
        tol = GTOL[dtype] if name.startswith("grad") else TOL[dtype]
        if not err <= tol:
            bad.append(f"{tag}: {name} vs the CPU op {err:.3g} > {tol:g}")


def expect_value_error(tag, fn, *words):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        if missing:
            bad.append(f"{tag}: the error does not say {missing}: {msg.splitlines()[0]}")
        return
    except Exception as e:  # noqa: BLE001 - the wrong kind of error is a failure too
        bad.append(f"{tag}: raised {type(e).__name__} instead of ValueError: {e}")
        return
    bad.append(f"{tag}: no error")


t0 = os.times()[4]
num_tiles = int(tune.num_tiles())

# ---- the table's description
table = list(tune.tile_table())
if num_tiles < 1 or len(table) != 5 * num_tiles:
    bad.append(f"tile_table(): {len(table)} integers for {num_tiles} entries (expected 5 per entry)")
for k in range(num_tiles):
    bm, bn, tm, tn, min_blocks = table[5 * k:5 * k + 5]
    if not (bm % tm == 0 and bn % tn == 0 and bm >= 16 and bn >= 32 and min_blocks >= 1):
        bad.append(f"tile_table() entry {k}: {table[5 * k:5 * k + 5]} is not a valid (BM, BN, TM, TN, min CTAs)")
if table[:5] != [32, 64, 4, 4, 1]:
    bad.append(f"tile_table() entry 0 is {table[:5]}, the comment of csrc/cuda/sinkhorn/gemm_kernels.cuh says "
               "32 x 64, 4 x 4, 1")

# ---- per-half-iteration kernels: every tile entry
for (B, n, m, small), dtype in itertools.product(((5, 300, 300, -1), (9, 100, 81, 0)), (F64, F32)):
    emu.configure(small, SMEM_SM90)
    a, b, cost, gv = problem(B, n, m, dtype)
    T = 2 if n > 256 else 3
    auto = fwd_bwd(emu, a, b, cost, gv, T, False)
    c0 = emu.launch_count()
    fwd_bwd(emu, a, b, cost, gv, T, False)
    if emu.launch_count() - c0 != 1 + 2 * T + 2 * T:
        bad.append(f"{B}x{n}x{m} {dtype}: {emu.launch_count() - c0} launches, not the per-half-iteration kernels' "
                   f"{1 + 4 * T}")
    cpu = fwd_bwd(cpu_ops, a, b, cost, gv, T, False)
    for tile in [-1] + list(range(num_tiles)):
        tag = f"tile {tile} B={B} n={n} m={m} {dtype}"
        got, fwd, bwd = tuned_fwd_bwd(a, b, cost, gv, T, False, tile=tile)
        compare(tag, got, auto, cpu, dtype, value_bitwise=tile == -1)
        if tile >= 0:  # every product (the launches after each direction's prep launch) ran this entry's tiles
            bm, bn, tm, tn, _ = table[5 * tile:5 * tile + 5]
            want = ((bm // tm) * (bn // tn), -(-B // bm))
            ran = {(threads, gy) for _, gy, _, threads, _ in fwd[1:] + bwd[1:]}
            if ran != {want}:
                bad.append(f"{tag}: the products ran (threads, row blocks) {sorted(ran)}, expected {want}")
    # rows_per_block does not reach the per-half-iteration kernels
    compare(f"rows_per_block 16 B={B} n={n} m={m} {dtype}", fwd_bwd(tune, a, b, cost, gv, T, False, rows_per_block=16),
            auto, cpu, dtype, value_bitwise=True)
emu.configure(-1, SMEM_SM90)

# ---- single-launch kernels: rows per CTA
B = 33
for (n, m), dtype, log in itertools.product(((81, 81), (100, 81)), (F64, F32), (False, True)):
    a, b, cost, gv = problem(B, n, m, dtype, seed=5)
    T = 2
    auto = fwd_bwd(emu, a, b, cost, gv, T, log)
    cpu = fwd_bwd(cpu_ops, a, b, cost, gv, T, log)
    for rpb in (-1, 1, 2, 3, 4, 8, 16):
        tag = f"rows_per_block {rpb} B={B} n={n} m={m} {dtype} log={log}"
        for backward in (False, True):
            R = tune.small_plan(B, n, m, dtype, log, backward, rpb)[0]
            if rpb != -1 and R != rpb:
                bad.append(f"{tag} backward={backward}: the plan runs R={R} with 227 KiB of shared memory")
        got, fwd, bwd = tuned_fwd_bwd(a, b, cost, gv, T, log, rows_per_block=rpb)
        for backward, launches in ((False, fwd), (True, bwd)):
            R, ctas, threads, on_chip, dyn = tune.small_plan(B, n, m, dtype, log, backward, rpb)
            if launches != [(ctas, 1, 1, threads, dyn)]:  # one launch (M on chip here), the plan's shape
                bad.append(f"{tag} backward={backward}: launches {launches}, the plan says {(ctas, threads, dyn)}")
        compare(tag, got, auto, cpu, dtype, value_bitwise=True)
    # the tile does not reach the single-launch kernels
    compare(f"tile {num_tiles - 1} n={n} m={m} {dtype} log={log}",
            fwd_bwd(tune, a, b, cost, gv, T, log, tile=num_tiles - 1), auto, cpu, dtype, value_bitwise=True)


# ---- rows_per_block lowered by the shared-memory plan (csrc/cuda/sinkhorn/small_plan.cuh small_plan)
def r4(x):
    return (x + 3) // 4 * 4


for dtype, log, backward in itertools.product((F64, F32), (False, True), (False, True)):
    n = m = 81
    arrays_m = 3 if backward else 1
    state = (3 * r4(n) + arrays_m * r4(m)) * dtype.itemsize  # bytes of one row's state
    mat = r4(n * (m | 1)) * dtype.itemsize  # bytes of M in shared memory
    a, b, cost, gv = problem(B, n, m, dtype, seed=6)
    auto = fwd_bwd(emu, a, b, cost, gv, 2, log)
    # M off chip (it does not fit next to one row): R = the rows whose state fits; M on chip: the rows next to M
    for smem, want_R, want_on in ((5 * state + 8, 5, 0), (mat + 3 * state + 8, 3, 1)):
        emu.configure(-1, smem)
        tag = f"rows_per_block 16, smem {smem} B, {dtype} log={log} backward={backward}"
        R, ctas, threads, on_chip, dyn = tune.small_plan(B, n, m, dtype, log, backward, 16)
        if (R, on_chip, ctas) != (want_R, want_on, -(-B // want_R)) or dyn > smem:
            bad.append(f"{tag}: plan (R={R}, M on chip {on_chip}, {ctas} CTAs, {dyn} B), expected R={want_R}, "
                       f"M on chip {want_on}")
        R2 = tune.small_plan(B, n, m, dtype, log, backward, 2)[0]
        if R2 != 2:
            bad.append(f"{tag}: rows_per_block 2 (fits) ran R={R2}")
        got, fwd, bwd = tuned_fwd_bwd(a, b, cost, gv, 2, log, rows_per_block=16)
        kernel_launch = (bwd if backward else fwd)[-1]  # (after the build launch when M is off chip)
        if kernel_launch != (ctas, 1, 1, threads, dyn):
            bad.append(f"{tag}: the kernel ran {kernel_launch}, the plan says {(ctas, threads, dyn)}")
        compare(tag, got, auto, fwd_bwd(cpu_ops, a, b, cost, gv, 2, log), dtype, value_bitwise=True)
emu.configure(-1, SMEM_SM90)

# ---- the automatic rows per CTA: one wave of CTAs, with the most CTAs that allows. 132 SMs (H100 SXM) at
# B x C = 2048 x 100 and 4096 x 81, where the former rule clamp(B / (2 SMs), 1, 16) asked for 293 / 274 CTAs:
# more than the SMs hold at once. The plan's CTAs fit in one wave of the emulated occupancy (resident_ctas_per_sm of
# the plan's launch shape, times the SMs), and one row fewer per CTA would not fit (or shared memory caps R).
ONE_WAVE_SMS = 132
sms_env = os.environ.get("WKD_EMU_SMS")
os.environ["WKD_EMU_SMS"] = str(ONE_WAVE_SMS)  # the emulated sm_count reads it at every plan
for regs in (None, 128, 96):  # the default registers per thread, and two more CTA-per-SM regimes
    if regs is None:
        emu.configure(-1, SMEM_SM90)
    else:
        emu.configure(-1, SMEM_SM90, regs)
    for (B, c), dtype, log, backward in itertools.product(((2048, 100), (4096, 81)), (F32, F64), (False, True),
                                                          (False, True)):
        tag = f"automatic plan B={B} C={c} {dtype} log={log} backward={backward} regs={regs} {ONE_WAVE_SMS} SMs"
        R, ctas, threads, on_chip, dyn = tune.small_plan(B, c, c, dtype, log, backward)
        wave = emu.resident_ctas_per_sm(threads, dyn) * ONE_WAVE_SMS
        if ctas != -(-B // R) or (ctas > wave and R < 16):
            bad.append(f"{tag}: R={R}, {ctas} CTAs of {threads} threads, {dyn} B: not one wave ({wave} resident)")
        if R > 1:
            R1, ctas1, threads1, _, dyn1 = tune.small_plan(B, c, c, dtype, log, backward, R - 1)
            if R1 == R - 1 and ctas1 <= emu.resident_ctas_per_sm(threads1, dyn1) * ONE_WAVE_SMS:
                bad.append(f"{tag}: R={R}, but R={R - 1} ({ctas1} CTAs) also fits in one wave")
# 128 registers per thread: two 256-thread CTAs per SM, 264 at once; 4096 x 81 then needs 16 rows per CTA
emu.configure(-1, SMEM_SM90, 128)
plan = tuple(tune.small_plan(4096, 81, 81, F32, False, False))
if plan[:3] != (16, 256, 256):
    bad.append(f"automatic plan 4096 x 81 float32, 128 registers: {plan}, expected R=16, 256 CTAs of 256 threads")
emu.configure(-1, SMEM_SM90)
if sms_env is None:
    del os.environ["WKD_EMU_SMS"]
else:
    os.environ["WKD_EMU_SMS"] = sms_env

# ---- clear errors for out-of-range choices
a, b, cost, gv = problem(3, 20, 20, F32)
out = tune.sinkhorn(a, b, cost, REG, 2)
for tile in (-2, num_tiles, 100):
    expect_value_error(f"sinkhorn tile={tile}", lambda tile=tile: tune.sinkhorn(a, b, cost, REG, 2, tile=tile),
                       "wkd_cuda_emu_tuning.sinkhorn", "`tile`", f"[0, {num_tiles - 1}]", str(tile))
    expect_value_error(f"sinkhorn_backward tile={tile}",
                       lambda tile=tile: tune.sinkhorn_backward(gv, a, b, cost, *out[3:], REG, tile=tile),
                       "wkd_cuda_emu_tuning.sinkhorn_backward", "`tile`", f"[0, {num_tiles - 1}]")
for rpb in (-2, 0, 17):
    expect_value_error(f"sinkhorn rows_per_block={rpb}",
                       lambda rpb=rpb: tune.sinkhorn(a, b, cost, REG, 2, rows_per_block=rpb),
                       "`rows_per_block`", "[1, 16]", str(rpb))
    expect_value_error(f"sinkhorn_backward rows_per_block={rpb}",
                       lambda rpb=rpb: tune.sinkhorn_backward(gv, a, b, cost, *out[3:], REG, rows_per_block=rpb),
                       "`rows_per_block`", "[1, 16]")
    expect_value_error(f"small_plan rows_per_block={rpb}",
                       lambda rpb=rpb: tune.small_plan(8, 20, 20, F32, False, False, rpb),
                       "`rows_per_block`", "[1, 16]")
expect_value_error("small_plan n=300", lambda: tune.small_plan(8, 300, 20, F32), "<= 256", "n=300")
expect_value_error("small_plan B=0", lambda: tune.small_plan(0, 20, 20, F32), ">= 1")
expect_value_error("small_plan float16", lambda: tune.small_plan(8, 20, 20, torch.float16), "`dtype`")

print(f"emulation time {os.times()[4] - t0:.0f} s")
print("\n".join(bad) if bad else "TUNING EMULATION OK")
sys.exit(1 if bad else 0)
