"""Launch configuration of the Triton Sinkhorn kernels: tile sizes per kernel family, dtype and precision, the size
rule of the single-launch kernels, and the accurate-math switch.

The public tables (FP32_PRECISIONS, DOT_CONFIG, DOT_CONFIG_CANDIDATES, ROWS_CONFIG, ONCHIP_MAX_C, ONCHIP_CONFIG,
ONCHIP_CONFIG_CANDIDATES, ONCHIP_K_BUFFER) are re-exported by ``wkd_kernels.triton.sinkhorn``, whose dispatch reads
them from its own namespace at every call and hands them to the launchers: rebind or mutate them there
(``sk.ONCHIP_MAX_C = 0``, ``sk.DOT_CONFIG[key] = ...``), not here.
"""
import torch

from ...settings import TRITON_INTERPRET

# libdevice exp/log/log1p (accurate float32) are used outside the hot inner loops; the interpreter has no libdevice.
ACCURATE = not TRITON_INTERPRET

# The tl.dot input precisions the launchers accept for float32 (`precision`).
FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")

# tl.dot kernels (shared cost, scaling domain, n or m > ONCHIP_MAX_C): (BLOCK_B, BLOCK_N, BLOCK_K, num_warps) per
# (dtype, precision). B=256, n=m=1000 float32 gives 8 x 16 = 128 programs per half-iteration (one wave on an
# H100/H200). Chosen from ptxas register reports for sm_90 (no spills, except 8 bytes in the tf32x3 first backward
# step), NOT from timings: no GPU has run them. bench/tune_sinkhorn.py --sweep-tiles times the candidates below
# (64 x 32 x 32 / 4 warps lowers to wgmma for tf32 / tf32x3 on sm_90); the first GPU run picks the defaults here.
# Every block must be a power of two >= 16 (tl.dot).
DOT_CONFIG = {
    (torch.float32, "ieee"): (32, 64, 16, 8),
    (torch.float32, "tf32x3"): (32, 64, 16, 8),
    (torch.float32, "tf32"): (32, 64, 16, 8),
    (torch.float64, "ieee"): (16, 64, 16, 4),
}
DOT_CONFIG_CANDIDATES = ((32, 64, 16, 8), (64, 32, 32, 4), (32, 32, 32, 4), (16, 64, 32, 4))
# Row-wise kernels (log domain, per-row cost): (BLOCK_N, BLOCK_K, num_warps) per dtype (no spills on sm_90).
ROWS_CONFIG = {torch.float32: (64, 32, 4), torch.float64: (64, 32, 4)}
# Element-wise kernels (kernel matrix, backward initialisation): elements per program.
ELEM_BLOCK = 1024
# Rows per program and column tile of the backward's gauge-correction kernel (an O(B (n + m)) pass per iteration).
GAUGE_BLOCK_B, GAUGE_BLOCK_N = 4, 128
INIT_BLOCK = 256

# Single-launch kernels (onchip_kernels.py): the dispatch runs them for a shared cost with n, m <= ONCHIP_MAX_C (the
# tests and the compile matrix set it to 0 to drive the per-half-iteration kernels).
ONCHIP_MAX_C = 256

# Launch configuration per dtype and domain: (BLOCK_B, BLOCK_N, BLOCK_K, num_warps). UNTUNED: sized from the sm_90
# ptxas register / spill reports only (measured when these kernels were written; with
# these values, sm_90: forward 96-230 registers, backward 128-234, spills 0-32 bytes, over all 36 variants); no GPU
# has timed these kernels yet -- tune here. Scaling domain: BLOCK_B >= 16 multiplies with tl.dot (powers of two
# >= 16), BLOCK_B < 16 with a broadcast multiply-sum over a [BLOCK_B, BLOCK_K, BLOCK_N] register tile (_onchip_mac;
# float32 FMA accuracy, the precision argument then has no effect); log domain: powers of two (register tile
# BLOCK_B x BLOCK_K x BLOCK_N). Occupancy: a grid of B / BLOCK_B programs, so BLOCK_B = 16 gives 16 programs at
# B = 256, a fraction of an H100/H200's 132 SMs; BLOCK_B = 2 gives 128. Which wins (fewer, denser programs or more,
# sparser ones) is for the GPU run to measure: bench/tune_sinkhorn.py --sweep-onchip times ONCHIP_CONFIG_CANDIDATES.
ONCHIP_CONFIG = {
    torch.float32: {"scaling": (16, 32, 16, 4), "log": (4, 32, 16, 4)},
    torch.float64: {"scaling": (16, 32, 16, 4), "log": (4, 32, 16, 4)},
}
# The scaling-domain configurations the sweep times (tl.dot for BLOCK_B >= 16, broadcast products below); every one
# compiles for sm_80 / sm_90 (the compile matrix drives each) and is tested against the reference
# (python_tests/test_sinkhorn_triton_onchip.py).
ONCHIP_CONFIG_CANDIDATES = ((16, 32, 16, 4), (16, 64, 16, 4), (32, 32, 16, 4), (8, 32, 16, 4), (4, 32, 16, 4),
                            (2, 64, 16, 4), (1, 128, 16, 4))
# Scaling domain: read K from a buffer built once per call (True, one extra launch per direction) instead of
# exp(-cost/reg) per tile (False). Untuned as well.
ONCHIP_K_BUFFER = {torch.float32: False, torch.float64: False}
