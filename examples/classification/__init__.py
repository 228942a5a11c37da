"""Image-classification distillation examples (CIFAR-100, ImageNet, the OFA cross-architecture setting)."""
