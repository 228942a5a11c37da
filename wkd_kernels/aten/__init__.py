"""The ``torch`` backend: every op of wkd-kernels in ATen ops only (one module per op), for tensors of any device
type (docs/design.md section 1). No ``.item()``, no host synchronisation and no data-dependent Python control flow,
so they can be captured in a CUDA graph; registered as ``wkd::<op>_torch`` by wkd_kernels/ops/<op>.py."""
