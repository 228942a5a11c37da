"""LLM distillation with the vocabulary-scale Wasserstein loss (wkd_kernels.VocabOTLoss): a tiny CPU demo."""
