"""What the emulation check programs share: the import paths (the repository and python_tests/) and the build of
emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu compiled as host C++ against csrc/cuda/cuda_emu.cuh) into the library
wkd_cuda_emu, loaded next to wkd_kernels._C."""
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
    """Build (or reuse, ninja) the emulated kernels in ``build_dir``; returns (torch.ops.wkd_cuda_emu, torch.ops.wkd)."""
    os.makedirs(build_dir, exist_ok=True)
    ce.load(name="wkd_cuda_emu", sources=[str(HERE / "emu_sinkhorn_cuda.cpp")], build_directory=build_dir,
            extra_cflags=["-O1", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, with_cuda=False)
    return torch.ops.wkd_cuda_emu, torch.ops.wkd
