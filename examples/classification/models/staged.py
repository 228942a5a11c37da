"""The small protocol shared by the networks defined in this package (CIFAR ResNets, WRNs, ShuffleNetV1, MobileNetV1).

Each such network exposes its stages explicitly, so :class:`~.wrapper.DistillModel` reads the stage features without
hooks. Module and parameter names follow the CRD ("RepDistiller") / mdistiller code, so their published teacher
checkpoints load with ``build_model(..., checkpoint=path)``.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import Tensor, nn

__all__ = ["StagedNet"]


class StagedNet(nn.Module):
    """Base of the package's own networks.

    Subclasses set ``stage_channels`` (channels of each stage output, shallow to deep), ``classifier_name`` (the
    attribute holding the final ``nn.Linear``) and implement :meth:`forward_stages`.
    """

    stage_channels: Tuple[int, ...]
    classifier_name: str

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        """``x`` [N, 3, H, W] -> (stage maps [N, C_k, H_k, W_k] shallow to deep, pooled vector [N, D])."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_stages")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, 3, H, W] -> logits [N, num_classes]."""
        _, pooled = self.forward_stages(x)
        return getattr(self, self.classifier_name)(pooled)
