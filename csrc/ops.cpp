// The one schema block of the wkd library. Backends register kernels in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; fake kernels and autograd are registered in Python (wkd_kernels/ops.py).
#include <torch/library.h>

#ifdef WKD_PYTHON_MODULE
// Built by setup.py as the Python module wkd_kernels._C: importing it runs the registrations below.
// The CMake build leaves this out and produces a plain library for torch.ops.load_library.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "wkd_kernels compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(wkd, m) {
  // Fixed-iteration Sinkhorn per row (design.md section 3). With K = exp(-cost/reg):
  //   u0 = 1/|supp a| on supp a;  repeat num_iters: s = K^T u + eps, v = b/s;  r = K v + eps, u = a/r
  //   value = sum_ij u_i K_ij v_j cost_ij                                   (transport cost, [B])
  // Outputs: value [B]; u [B,n], v [B,m] (log u, log v when log_domain); hist_r [T+1,B,n] = r of every
  // iteration then y = (K∘C) v_T (value = sum_i u_i y_i), hist_s [T,B,m] = s of every iteration (all as
  // logs when log_domain), or [0,B,*] when keep_history is false. The exact backward needs the history; without it the autograd formula
  // falls back to the envelope (dual-potential) gradient.
  m.def(
      "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s)");
  // Exact gradient of value w.r.t. a and b through the fixed-iteration loop, from the forward's history.
  m.def(
      "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s, float reg, float eps=0.0, bool log_domain=False) -> (Tensor grad_a, Tensor grad_b)");
  // The hand-written CUDA C++ kernels of the two ops above, same schemas. wkd::sinkhorn on CUDA tensors
  // routes here or to the Triton kernels (wkd_kernels.set_cuda_backend); these have only a CUDA kernel.
  m.def(
      "sinkhorn_cuda_native(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s)");
  m.def(
      "sinkhorn_backward_cuda_native(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor u, Tensor v, "
      "Tensor hist_r, Tensor hist_s, float reg, float eps=0.0, bool log_domain=False) -> (Tensor grad_a, "
      "Tensor grad_b)");
  // ---- Gaussian ops for WKD-F (design.md section 4) are added below this line. ----
}
