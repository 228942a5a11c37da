"""Training examples built on wkd_kernels (classification, detection)."""
