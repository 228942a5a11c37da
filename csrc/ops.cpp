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
  // Fixed-iteration Sinkhorn per row (docs/design.md section 3). With K = exp(-cost/reg):
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
  // ---- Gaussian ops for WKD-F (docs/design.md section 4) are added below this line. ----
  // Per-sample, per-cell, per-channel statistics of a feature map x [N, C, H, W] over the spatial positions of each
  // of the G x G adaptive-pooling cells (start = floor(i H / G), end = ceil((i + 1) H / G); cells may overlap),
  // P = G * G cells in row-major order. mean [N, P, C]; var [N, P, C] (full=False) or cov [N, P, C, C] (full=True),
  // divided by m_p - 1 (unbiased) or m_p. float32 outputs (and accumulation) for float16/bfloat16 x.
  m.def("feature_stats(Tensor x, int grid=1, bool full=False, bool unbiased=True) -> (Tensor mean, Tensor var)");
  // Gradient w.r.t. x of <grad_mean, mean> + <grad_var, var> (grad_var is [N, P, C, C] when full).
  m.def(
      "feature_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean, int grid, bool full, "
      "bool unbiased) -> Tensor");
  // Principal square root of a batch of symmetric PSD matrices S [B, n, n] (read as (S + S^T) / 2).
  // method "newton_schulz": coupled Newton-Schulz with trace pre-normalisation, num_iters steps;
  // "eigh": eigendecomposition (negative eigenvalues clamped to 0).
  m.def("sqrtm(Tensor S, str method=\"newton_schulz\", int num_iters=20) -> Tensor");
  // dL/dS from dL/dY for Y = sqrtm(S): the symmetric X with Y X + X Y = (grad_Y + grad_Y^T) / 2.
  m.def("sqrtm_backward(Tensor grad_Y, Tensor Y, str method=\"newton_schulz\", int num_iters=20) -> Tensor");
  // Nuclear norm of M [B, p, q] by the Newton-Schulz polar iteration: value [B] = <polar, M>, polar [B, p, q] is the
  // orthogonal polar factor U V^T (the gradient of the nuclear norm; saved for the backward).
  m.def("nuclear_norm(Tensor M, int num_iters=20) -> (Tensor value, Tensor polar)");
  // Squared 2-Wasserstein (Bures) distance between N(mu1, S1) and N(mu2, S2): mu [B, n], S [B, n, n] symmetric PSD.
  // The cross term tr (S1^1/2 S2 S1^1/2)^1/2 is computed as the nuclear norm of S2^1/2 S1^1/2. Outputs: w2 [B];
  // sqrt_S1, sqrt_S2 and polar = the orthogonal polar factor of sqrt_S2 sqrt_S1 (saved for the backward).
  m.def(
      "bures_wasserstein(Tensor mu1, Tensor S1, Tensor mu2, Tensor S2, str method=\"newton_schulz\", "
      "int num_iters=20) -> (Tensor w2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar)");
  m.def(
      "bures_wasserstein_backward(Tensor grad_w2, Tensor mu1, Tensor mu2, Tensor sqrt_S1, Tensor sqrt_S2, "
      "Tensor polar, str method=\"newton_schulz\", int num_iters=20) -> (Tensor grad_mu1, Tensor grad_S1, "
      "Tensor grad_mu2, Tensor grad_S2)");
}
