// csrc/cuda/sinkhorn.cu compiled as host C++ against csrc/cuda/cuda_emu.cuh (the cooperative-fiber emulation of
// the CUDA subset it uses). The result defines the library wkd_cuda_emu (wkd_cuda_emu::sinkhorn,
// wkd_cuda_emu::sinkhorn_backward: the schemas of wkd::sinkhorn / wkd::sinkhorn_backward) with the emulated
// kernels as CPU kernels, so it loads in the same process as wkd_kernels._C. Built by check_emulated_kernels.py.
#define WKD_CUDA_EMULATE 1
#include "../../csrc/cuda/sinkhorn.cu"
