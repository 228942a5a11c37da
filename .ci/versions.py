"""Print what this environment runs: Python, torch, Triton, numpy, the CPU model and the BLAS torch uses."""
import platform
import re
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    import numpy
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512")
    print(f"[versions] Python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"Triton {triton_version} | numpy {numpy.__version__}")
    print(f"[versions] CPU {cpu_model()} ({isa}, {torch.get_num_threads()} threads) | BLAS "
          f"{blas.group(1) if blas else 'unknown'} ({mkl}, CPU capability {torch.backends.cpu.get_cpu_capability()})")


if __name__ == "__main__":
    main()
