"""Build of record for wkd_kernels._C (design.md sections 1-2).

The C++ CPU sources always build. The CUDA sources (csrc/cuda/*.cu) build when torch was built with
CUDA and a CUDA toolkit (nvcc) is found; no GPU is needed to compile them. Overrides:
  WKD_FORCE_CUDA=1   build the CUDA sources (fails loudly if torch or the toolkit cannot)
  WKD_NO_CUDA=1      never build them
  TORCH_CUDA_ARCH_LIST  the GPU architectures, e.g. "9.0" (with no GPU visible we default to "8.0;9.0"
                        rather than every architecture torch knows)
"""
import glob
import os
import sys

from setuptools import setup

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script (e.g. /usr/local/bin/nvcc) makes that guess
# /usr/local, which has no CUDA libraries. Prefer the standard toolkit location when nothing is set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("WKD_NO_CUDA"):
        return False, "WKD_NO_CUDA=1"
    have_torch_cuda = torch.version.cuda is not None
    have_toolkit = CUDA_HOME is not None
    if _flag("WKD_FORCE_CUDA"):
        if not (have_torch_cuda and have_toolkit):
            sys.exit(
                f"WKD_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}: "
                "install a CUDA build of torch and a CUDA toolkit"
            )
        return True, "WKD_FORCE_CUDA=1"
    if not have_torch_cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    if not have_toolkit:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def _extension():
    with_cuda, why = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("WKD_PYTHON_MODULE", None)]
    cxx = ["-O3"]
    if sys.platform != "win32":
        cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    print(f"[wkd_kernels] CUDA sources: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print(f"[wkd_kernels] TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("WKD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        return CUDAExtension(
            "wkd_kernels._C", sources, define_macros=define_macros, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "wkd_kernels._C", sources, define_macros=define_macros, extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
