"""Build of record for wkd_kernels._C (layout and dispatch: docs/design.md sections 1-2).

The C++ CPU sources always build. The CUDA C++ sources (csrc/cuda/*.cu, csrc/cuda/*/*.cu) build when torch was
built with CUDA, a CUDA toolkit (nvcc) is found, and there is something to compile for: a visible GPU or an
architecture asked for.
With no GPU visible and no architecture asked for they are skipped (the Triton kernels need no build). Overrides:
  TORCH_CUDA_ARCH_LIST  the GPU architectures, e.g. "9.0"; setting it also asks for the CUDA sources on a machine
                        without a GPU (a login node)
  WKD_FORCE_CUDA=1   build the CUDA sources (fails loudly if torch or the toolkit cannot); with no GPU visible and
                     no TORCH_CUDA_ARCH_LIST, for "8.0;9.0"
  WKD_NO_CUDA=1      never build them
  WKD_BUILD_TUNING_OPS=1  also compile bench/cuda/sinkhorn_tuning_ops.cu into the extension, with the CUDA sources:
                     the benchmark-only ops torch.ops.wkd_tuning.* that bench/tune_sinkhorn.py sweeps (the launch
                     choices as per-call arguments; bench/gpu_suite.sh --tuning-ops sets it). Off by default: the
                     product build has no wkd_tuning library
  WKD_NO_EXT=1       build no extension at all (no C++ compiler needed): every op runs on the `torch` backend
                     (ATen ops, wkd_kernels/aten/); the same happens, with one line saying so, when no C++ compiler is
                     found
  WKD_DEBUG=1        keep debug information (release builds are compiled with -g0 and linked with --strip-debug)
  WKD_BUILD_TEMP     where the object files are kept (default build/temp in the checkout)

Objects are kept in build/temp between builds (`pip install -e .` would otherwise compile in a fresh temporary
directory every time): ninja recompiles only the sources whose text, included headers or command line changed.
Run pip with -v to see this script's [wkd_kernels] lines and ninja's [k/N] compile lines.
"""
import glob
import os
import shutil
import sys
import sysconfig
import time

from setuptools import setup

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script (e.g. /usr/local/bin/nvcc) makes that guess
# /usr/local, which has no CUDA libraries. Prefer the standard toolkit location when nothing is set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The benchmark-only CUDA ops (torch.ops.wkd_tuning.*), compiled only with WKD_BUILD_TUNING_OPS=1.
TUNING_OPS_SOURCE = "bench/cuda/sinkhorn_tuning_ops.cu"
BUILD_TEMP = os.path.abspath(os.environ.get("WKD_BUILD_TEMP") or os.path.join(HERE, "build", "temp"))


def _say(msg):
    print(f"[wkd_kernels] {msg}", flush=True)


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda():
    """(build the CUDA sources?, why)."""
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
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, toolkit at {CUDA_HOME}"
    if torch.cuda.is_available():
        return True, f"a GPU is visible ({torch.cuda.get_device_name()}), toolkit at {CUDA_HOME}"
    return False, ("no GPU visible and no TORCH_CUDA_ARCH_LIST: skipped (set TORCH_CUDA_ARCH_LIST, e.g. \"9.0\", "
                   "or WKD_FORCE_CUDA=1 to compile them here for another machine)")


NO_EXT_LOSS = ("the C++ CPU kernels and the CUDA C++ kernels are not built; every op runs on the `torch` backend "
               "(ATen ops; backend='auto' picks it), the Triton kernels stay available")


def _cxx_compiler():
    """The C++ compiler the build would use (CXX, else the one Python was built with, else c++/g++/clang++), or None."""
    candidates = [os.environ.get("CXX"), (sysconfig.get_config_var("CXX") or "").split(" ")[0], "c++", "g++",
                  "clang++"]
    for c in candidates:
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _want_extension():
    """(build the extension?, why not)."""
    if _flag("WKD_NO_EXT"):
        return False, "WKD_NO_EXT=1"
    if sys.platform != "win32" and _cxx_compiler() is None:
        return False, "no C++ compiler found (CXX, c++, g++, clang++)"
    return True, ""


def _extension():
    with_cuda, why = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("WKD_PYTHON_MODULE", None)]
    cxx = ["-O3"]
    link = ["-fopenmp"]
    if sys.platform != "win32":
        cxx += ["-fopenmp"]
        if not _flag("WKD_DEBUG"):  # release: no debug information (-g from Python's CFLAGS is overridden by -g0)
            cxx += ["-g0"]
            link += ["-Wl,--strip-debug"]
    extra = {"cxx": cxx}
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), C++ compiler flags {' '.join(cxx)} "
         "(needs a C++17 compiler with OpenMP)")
    _say(f"CPU C++ sources: {' '.join(sources)}")
    _say(f"CUDA C++ sources: {'yes' if with_cuda else 'no'} ({why})")
    if _flag("WKD_BUILD_TUNING_OPS") and not with_cuda:
        _say("WKD_BUILD_TUNING_OPS=1 ignored: the tuning ops are CUDA C++ and the CUDA sources are not built")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*/*.cu"))
        if _flag("WKD_BUILD_TUNING_OPS"):
            cu.append(TUNING_OPS_SOURCE)
            _say(f"benchmark-only tuning ops: yes (WKD_BUILD_TUNING_OPS=1: {TUNING_OPS_SOURCE}, torch.ops.wkd_tuning)")
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' architectures"
        _say(f"CUDA sources {' '.join(cu)} for TORCH_CUDA_ARCH_LIST={arch} (each architecture is one more nvcc pass)")
        sources += cu
        define_macros.append(("WKD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        return CUDAExtension(
            "wkd_kernels._C", sources, define_macros=define_macros, extra_compile_args=extra,
            extra_link_args=link,
        )
    return CppExtension(
        "wkd_kernels._C", sources, define_macros=define_macros, extra_compile_args=extra,
        extra_link_args=link,
    )


class PersistentBuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with the object files kept in BUILD_TEMP across builds, and a line on what it does."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = BUILD_TEMP  # editable installs would otherwise get a new temporary directory each time

    def run(self):
        n_obj = len(glob.glob(os.path.join(BUILD_TEMP, "**", "*.o"), recursive=True))
        _say(f"object files kept in {BUILD_TEMP} ({n_obj} there now"
             + ("; ninja recompiles only what changed)" if n_obj else "; first build compiles everything)"))
        _say("ninja's [k/N] lines below name each source it compiles; 'no work to do' means every object is current")
        t0 = time.perf_counter()
        super().run()
        _say(f"extension built in {time.perf_counter() - t0:.0f} s")


_BUILD_EXT, _WHY_NOT = _want_extension()
if not _BUILD_EXT:
    # one line, also visible without pip -v (stderr)
    print(f"[wkd_kernels] building without the compiled extension ({_WHY_NOT}): {NO_EXT_LOSS}", file=sys.stderr,
          flush=True)

setup(
    ext_modules=[_extension()] if _BUILD_EXT else [],
    cmdclass={"build_ext": PersistentBuildExt} if _BUILD_EXT else {},
)
