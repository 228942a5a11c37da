"""Test helper: synchronised BatchNorm on the CPU (gloo), and an entry point running the trainer with it.

``nn.SyncBatchNorm`` (what ``train.sync_bn`` uses) only runs on GPUs; :class:`GlooSyncBatchNorm` does the same on
the CPU: batch statistics are summed over all processes with the differentiable
``torch.distributed.nn.functional.all_reduce``, so a world of w processes with batch b normalises exactly like one
process with batch w * b (up to float rounding), which is what the DDP-equivalence test relies on. Not part of
the product: ``python -m examples.classification.tests.gloo_sync_bn ARGS`` runs ``examples.classification.train``
with the trainer's ``convert_sync_batchnorm`` replaced by :func:`convert_sync_batchnorm` below.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import sys

from examples.common.distributed import is_distributed

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm"]


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the whole process group (plain BN otherwise)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        C = x.shape[1]
        xf = x.float()
        n_local = torch.tensor([x.numel() / C], dtype=torch.float32, device=x.device)
        packed = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n_local]))
        n = packed[-1]
        mean = packed[:C] / n
        var = (packed[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` on CUDA; on other devices every ``BatchNorm2d`` becomes a
    :class:`GlooSyncBatchNorm` with the same parameters and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


def main(argv=None):
    import examples.common.trainer as trainer
    from examples.classification import train
    trainer.convert_sync_batchnorm = convert_sync_batchnorm
    return train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
