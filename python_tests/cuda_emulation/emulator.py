"""What the emulation check programs share: the import paths (the repository and python_tests/) and the build of
emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu, csrc/cuda/sinkhorn/ and bench/cuda/sinkhorn_tuning_ops.cu compiled
as host C++ against csrc/cuda/cuda_emu.cuh) into the libraries wkd_cuda_emu and wkd_cuda_emu_tuning, loaded next
to wkd_kernels._C."""
import os
import sys
from pathlib import Path

import torch
import torch.utils.cpp_extension as ce

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO / "python_tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
import wkd_kernels  # noqa: E402,F401  (torch.ops.wkd.*: the CPU op the emulated kernels are compared with)


def load(build_dir: str):
    """Build (or reuse, ninja) the emulated kernels in ``build_dir``; returns (torch.ops.wkd_cuda_emu,
    torch.ops.wkd)."""
    os.makedirs(build_dir, exist_ok=True)
    ce.load(name="wkd_cuda_emu", sources=[str(HERE / "emu_sinkhorn_cuda.cpp")], build_directory=build_dir,
            extra_cflags=["-O1", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, with_cuda=False)
    return torch.ops.wkd_cuda_emu, torch.ops.wkd


# Shared by the checks of the single-launch kernels and the tuning ops.
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")  # the outputs of wkd::sinkhorn, in order
SMEM_SM90 = 227 * 1024  # opt-in shared memory per block on sm_90 (bytes)


def rel(x, y, scale=None):
    """max |x - y| / scale over the finite entries of y (scale: max |y| there by default); inf when x and y are not
    finite at the same places, 0 when nothing is finite."""
    x, y = x.double(), y.double()
    fin = torch.isfinite(y)
    if not torch.equal(fin, torch.isfinite(x)):
        return float("inf")
    if not fin.any():
        return 0.0
    scale = y[fin].abs().max().item() if scale is None else scale
    return ((x[fin] - y[fin]).abs().max() / max(scale, 1e-300)).item()


def same(x, y):
    """Same shape and bitwise equal (NaN equal to NaN)."""
    return x.shape == y.shape and torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0))
