// The one schema block of the wkd library. The C++ kernels register on the CPU key (csrc/cpu/*.cpp) and the CUDA
// key (csrc/cuda/*.cu) of these ops; the *_triton ops' kernels, the fake kernels and autograd are registered in
// Python (wkd_kernels/ops/<op>.py).
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
  // ---- Sinkhorn. The contract of wkd::sinkhorn, wkd::sinkhorn_backward and their Triton twins (stated here only).
  // Per row of a batch, fixed-iteration entropic OT between a [B, n] and b [B, m] with cost [n, m] (shared by the
  // batch) or [B, n, m]; float32 or float64, one dtype and one device. With K = exp(-cost / reg):
  //   u_0 = 1/|supp a| on supp a, 0 elsewhere;  for t = 1..T (T = num_iters):
  //     s_t = K^T u_{t-1} + eps,  v_t = b / s_t;   r_t = K v_t + eps,  u_t = a / r_t
  //   y = (K∘cost) v_T,  value = sum_i u_T,i y_i = sum_ij u_i K_ij v_j cost_ij      (the transport cost, not the
  //   entropic objective; with eps = 0 each row equals POT's sinkhorn2(..., numItermax=T, stopThr=0))
  // Zero-mass entries of a / b remove their rows / columns exactly (the result is that of the reduced problem).
  // log_domain: the same iteration on log-scalings with log-sum-exp (for small reg, where K underflows).
  // Outputs: value [B]; u [B, n], v [B, m] = u_T, v_T (log u_T, log v_T when log_domain);
  //   with keep_history: hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m] = s_1..s_T, y [B, n] (all as logs when
  //   log_domain: log r_t, log s_t, log y); without: hist_r [0, B, n], hist_s [0, B, m], y [0, n].
  // O(B (n + m) T) memory, never a B x n x m tensor; no host synchronisation on a GPU.
  m.def(
      "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s, Tensor y)");
  // The exact gradient of sum_b grad_value_b value_b w.r.t. a and b through the fixed-iteration loop above, by a
  // reverse sweep over the history of a keep_history=True forward (hist_r [T, B, n], hist_s [T, B, m], y [B, n] as
  // it returned them, T >= 1) with the same reg and log_domain, and eps = the forward's eps. The sweep restores the
  // gauge identity of the exact adjoint of v_t (sum_j b_j dL/dv_t,j v_t,j = an eps-scaled term; 0 for eps = 0),
  // whose rounding residual is otherwise amplified up to exp(max cost / reg) at zero-mass entries of b
  // (docs/design.md section 3); eps=None (the call without eps) skips that correction. r_t and s_t contain eps.
  // No gradient w.r.t. cost. (Without history the autograd formula uses the envelope gradient instead.)
  m.def(
      "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, "
      "Tensor y, float reg, bool log_domain=False, float? eps=None) -> (Tensor grad_a, Tensor grad_b)");
  // Sinkhorn on a precomputed Gibbs kernel: the scaling domain of wkd::sinkhorn for a shared cost, with K [n, m] =
  // exp(-cost / reg) and KC [n, m] = K∘cost given instead of cost and reg (computed once per cost, e.g. by
  // WKDLogitLoss through wkd_kernels.gibbs_kernel, which checks the cost's values and K's range there). The same
  // iteration, outputs and history as wkd::sinkhorn(a, b, cost, reg, num_iters, eps, log_domain=False,
  // keep_history). The CPU kernel checks a and b as wkd::sinkhorn does, and K (finite, >= 0, no row or column
  // entirely 0) in the one pass that sums its columns for the first half-iteration; KC is trusted to be K∘cost.
  // CPU (C++) and the torch backend (wkd::sinkhorn_gibbs_torch, every device type); no Triton or CUDA C++ kernel.
  m.def(
      "sinkhorn_gibbs(Tensor a, Tensor b, Tensor K, Tensor KC, int num_iters, float eps=0.0, "
      "bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)");
  // The exact gradient of wkd::sinkhorn_gibbs: wkd::sinkhorn_backward's reverse sweep (and gauge correction, with
  // eps) on the given K and KC.
  m.def(
      "sinkhorn_gibbs_backward(Tensor grad_value, Tensor a, Tensor b, Tensor K, Tensor KC, Tensor hist_r, "
      "Tensor hist_s, Tensor y, float? eps=None) -> (Tensor grad_a, Tensor grad_b)");
  // Triton kernels of the two ops above (wkd_kernels/triton/sinkhorn/), same contract; registered from Python for
  // every device type (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). precision: the tl.dot input
  // precision for float32, "ieee" | "tf32x3" | "tf32" (float64 ignores it).
  m.def(
      "sinkhorn_triton(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True, str precision=\"ieee\") -> (Tensor value, Tensor u, "
      "Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)");
  m.def(
      "sinkhorn_triton_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, "
      "Tensor y, float reg, bool log_domain=False, str precision=\"ieee\", float? eps=None) -> (Tensor grad_a, "
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
  // Triton kernels of the Gaussian ops above (wkd_kernels/triton/), same arguments, outputs and contracts, registered
  // from Python for every device type (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). precision: the tl.dot
  // input precision for float32, "ieee" | "tf32x3" (float64 ignores it).
  m.def("feature_stats_triton(Tensor x, int grid=1, bool full=False, bool unbiased=True) -> (Tensor mean, Tensor var)");
  m.def(
      "feature_stats_triton_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean, int grid, bool full, "
      "bool unbiased) -> Tensor");
  m.def("sqrtm_triton(Tensor S, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> Tensor");
  m.def(
      "sqrtm_triton_backward(Tensor grad_Y, Tensor Y, str method=\"newton_schulz\", int num_iters=20, "
      "str precision=\"ieee\") -> Tensor");
  m.def("nuclear_norm_triton(Tensor M, int num_iters=20, str precision=\"ieee\") -> (Tensor value, Tensor polar)");
  m.def(
      "bures_wasserstein_triton(Tensor mu1, Tensor S1, Tensor mu2, Tensor S2, str method=\"newton_schulz\", "
      "int num_iters=20, str precision=\"ieee\") -> (Tensor w2, Tensor sqrt_S1, Tensor sqrt_S2, Tensor polar)");
  m.def(
      "bures_wasserstein_triton_backward(Tensor grad_w2, Tensor mu1, Tensor mu2, Tensor sqrt_S1, Tensor sqrt_S2, "
      "Tensor polar, str method=\"newton_schulz\", int num_iters=20, str precision=\"ieee\") -> (Tensor grad_mu1, "
      "Tensor grad_S1, Tensor grad_mu2, Tensor grad_S2)");

  // ==== Sparse (CSR) Sinkhorn: vocabulary-scale OT over one shared sparse cost (docs/vocabulary_ot.md). ====
  // The contract of wkd::sinkhorn above with K = exp(-cost / reg) on the STORED entries of a CSR [C, C] cost and 0
  // elsewhere (excluded couplings), and the masses held as the columns of [C, B] tensors (one column per row of the
  // public [B, C] masses; any strides). The cost comes as CSR arrays in both orientations: crow [C + 1], col [nnz],
  // cost [nnz] (values >= 0, the dtype of a) of the cost, and crow_t, col_t, cost_t of its transpose (the same
  // entries sorted by column; for a symmetric cost the same arrays); int32 or int64 indices, no empty row or column.
  // Outputs: value [B]; u, v [C, B] = log u_T, log v_T in both domains (-inf off the supports); with keep_history:
  //   hist_r [T, C, B] = r_1..r_T, hist_s [T, C, B] = s_1..s_T, y [C, B] = (K∘cost) v_T (logs when log_domain);
  //   without: hist_r, hist_s [0, C, B], y [0, B]. chunk_elements: the largest nnz x columns temporary of the ATen
  //   log domain (None: its default); kernels without such temporaries ignore it.
  // O(nnz + B C T) memory, never C x C.
  m.def(
      "sparse_sinkhorn(Tensor a, Tensor b, Tensor crow, Tensor col, Tensor cost, Tensor crow_t, Tensor col_t, "
      "Tensor cost_t, float reg, int num_iters, float eps=0.0, bool log_domain=False, bool keep_history=True, "
      "int? chunk_elements=None) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)");
  // The exact gradient (grad_a, grad_b [C, B]) of sum_b grad_value_b value_b through that loop: the reverse sweep
  // and gauge correction of wkd::sinkhorn_backward over the history of a keep_history=True forward (T >= 1) with the
  // same cost arrays, reg and log_domain; eps = the forward's eps (None skips the gauge correction). The envelope
  // gradient (no history) is the centred reg * log u, reg * log v of the forward's outputs (autograd formula).
  m.def(
      "sparse_sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor crow, Tensor col, Tensor cost, "
      "Tensor crow_t, Tensor col_t, Tensor cost_t, Tensor hist_r, Tensor hist_s, Tensor y, float reg, "
      "bool log_domain=False, float? eps=None, int? chunk_elements=None) -> (Tensor grad_a, Tensor grad_b)");
  // The Triton kernels of the two ops above, wkd::sparse_sinkhorn_triton / _triton_backward (same schemas renamed,
  // scaling domain only), are defined in Python (wkd_kernels/_schemas.py, PYTHON_TRITON_SCHEMAS): this library has
  // no kernel for them.
}
