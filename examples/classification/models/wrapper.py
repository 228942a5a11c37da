"""The uniform wrapper: any zoo network -> ``DistillModelOutput(logits, features)``.

``DistillModel`` holds the unmodified network as ``self.net`` and reads the stage features with an explicit,
stateless forward over the network's own submodules (no hooks): torchvision ResNet / MobileNetV2 stages are run in
the order of their own ``forward``; timm models go through their ``forward_intermediates`` / ``forward_head`` API;
the package's own networks implement ``forward_stages``. Nothing is stored on the module during forward, so there is
nothing to leak, and the forward is an ordinary function of its input under DDP, ``torch.compile``, channels_last
and autocast.

Feature keys (``model.feature_channels`` gives their channels without running the model):
    "stage1" ... "stageK"  [N, C_k, H_k, W_k]  output of each stage, shallow to deep;
    "last"                 the same tensor as "stageK": the deepest map as the classifier head reads it (for
                           networks with a final per-position norm before pooling -- Swin's LayerNorm, ViT's
                           LayerNorm -- that norm is included; WRNs are the exception: their last stage is the
                           raw block3 output before the final BN-ReLU, as in CRD / mdistiller, whose feature
                           the published WKD-F and FitNet code distil);
    "pooled"               [N, D] the vector fed to ``model.classifier`` (before any head dropout).
ViT / DeiT are the exception to the [N, C, H, W] maps: their last stage ("last") is the token sequence
[N, P + h*w, D] that the head reads, class / distillation tokens included; ``model.feature_layouts`` says so
({"last": ("nlc", P), ...}; a key not in it is NCHW), and WKD-F reads it as the h x w map of patch tokens
(``wkd_kernels.ops.feature_layout``) instead of a reshape here.
``logits == model.classifier(features["pooled"])`` except while a head dropout is active (torchvision MobileNetV2
in train mode).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

from torch import Tensor, nn

from .staged import StagedNet

__all__ = ["DistillModelOutput", "DistillModel", "StagedDistillModel", "TorchvisionResNetDistillModel",
           "TorchvisionMobileNetV2DistillModel", "TimmDistillModel"]


class DistillModelOutput(NamedTuple):
    """``logits`` [N, num_classes]; ``features`` {"stage1".., "last", "pooled"} (empty when features=False)."""

    logits: Tensor
    features: Dict[str, Tensor]


class DistillModel(nn.Module):
    """Base wrapper. Subclasses implement :meth:`forward_stages` for one network family.

    Attributes: ``net`` (the wrapped network), ``name``, ``num_classes``, ``input_size`` (32 for CIFAR models,
    224 for ImageNet / OFA models), ``feature_channels`` (dict key -> channels), ``classifier`` (the final
    ``nn.Linear``, a submodule of ``net``).
    """

    def __init__(self, net: nn.Module, *, name: str, num_classes: int, input_size: int,
                 stage_channels: Sequence[int], classifier_name: str):
        super().__init__()
        self.net = net
        self.name = name
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self._classifier_name = classifier_name
        fc = self.classifier
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"{name}: net.{classifier_name} is a {type(fc).__name__}, expected nn.Linear")
        if fc.out_features != self.num_classes:
            raise ValueError(f"{name}: classifier has {fc.out_features} outputs, expected {self.num_classes}")
        channels = {f"stage{i + 1}": int(c) for i, c in enumerate(stage_channels)}
        channels["last"] = int(stage_channels[-1])
        channels["pooled"] = int(fc.in_features)
        self.feature_channels: Dict[str, int] = channels
        # feature key -> (layout, prefix tokens) for features that are not [N, C, H, W] maps (``as_nchw``)
        self.feature_layouts: Dict[str, Tuple[str, int]] = {}

    @property
    def classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` of ``net`` (not registered twice: it is looked up in ``net``)."""
        return self.net.get_submodule(self._classifier_name)

    @property
    def num_stages(self) -> int:
        return len(self.feature_channels) - 2

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        """``x`` [N, 3, H, W] -> (stage maps shallow to deep, each [N, C_k, H_k, W_k]; pooled [N, D])."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_stages")

    def head(self, pooled: Tensor) -> Tensor:
        """pooled [N, D] -> logits [N, num_classes]; overridden where the network has head dropout."""
        return self.classifier(pooled)

    def forward(self, x: Tensor, features: bool = True) -> DistillModelOutput:
        """``x`` [N, 3, H, W] -> ``DistillModelOutput``. ``features=False`` runs the plain ``net(x)`` and returns
        an empty feature dict (same logits, cheaper when only logits are needed)."""
        if not features:
            return DistillModelOutput(self.net(x), {})
        stages, pooled = self.forward_stages(x)
        feats = {f"stage{i + 1}": s for i, s in enumerate(stages)}
        feats["last"] = stages[-1]
        feats["pooled"] = pooled
        return DistillModelOutput(self.head(pooled), feats)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, input_size={self.input_size}"


class StagedDistillModel(DistillModel):
    """Wrapper of the package's own :class:`~.staged.StagedNet` networks (CIFAR ResNets, WRNs, ShuffleNetV1,
    MobileNetV1)."""

    def __init__(self, net: StagedNet, *, name: str, num_classes: int, input_size: int):
        super().__init__(net, name=name, num_classes=num_classes, input_size=input_size,
                         stage_channels=net.stage_channels, classifier_name=net.classifier_name)

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        return self.net.forward_stages(x)


class TorchvisionResNetDistillModel(DistillModel):
    """torchvision ResNet: stages layer1..layer4 ([N, C, 56|28|14|7, ...] at 224), pooled = flattened avgpool."""

    def __init__(self, net: nn.Module, *, name: str, num_classes: int, input_size: int = 224):
        channels = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            block = layer[-1]
            channels.append(block.conv3.out_channels if hasattr(block, "conv3") else block.conv2.out_channels)
        super().__init__(net, name=name, num_classes=num_classes, input_size=input_size,
                         stage_channels=channels, classifier_name="fc")

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        stages = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            stages.append(x)
        return stages, net.avgpool(x).flatten(1)


class TorchvisionMobileNetV2DistillModel(DistillModel):
    """torchvision MobileNetV2: stages end at features[3], [6], [13], [18] (strides 4, 8, 16, 32; at 224:
    [N, 24, 56, 56], [N, 32, 28, 28], [N, 96, 14, 14], [N, 1280, 7, 7]); pooled [N, 1280] before the dropout of
    ``net.classifier``."""

    STAGE_ENDS = (4, 7, 14, 19)  # exclusive end index in net.features

    def __init__(self, net: nn.Module, *, name: str, num_classes: int, input_size: int = 224):
        channels = [net.features[end - 1].out_channels for end in self.STAGE_ENDS]
        super().__init__(net, name=name, num_classes=num_classes, input_size=input_size,
                         stage_channels=channels, classifier_name="classifier.1")

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        stages, start = [], 0
        for end in self.STAGE_ENDS:
            x = self.net.features[start:end](x)
            stages.append(x)
            start = end
        return stages, nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)

    def head(self, pooled: Tensor) -> Tensor:
        return self.net.classifier(pooled)  # Dropout -> Linear, as net.forward


class TimmDistillModel(DistillModel):
    """timm ViT / DeiT / Swin / ConvNeXt through ``forward_intermediates`` and ``forward_head(pre_logits=True)``.

    ``indices``: which stages (hierarchical models: 0..3) or blocks (ViT: after depth 1/4, 1/2, 3/4 and the end)
    are the stage features. Intermediates come back NCHW (Swin's NHWC stages are permuted by timm, ViT's patch
    tokens reshaped by timm's ``forward_intermediates``).
    ``tokens=True`` (ViT/DeiT): the last stage is the final-normed token sequence [N, P + h*w, C] (what the head
    reads; ``feature_layouts`` marks it "nlc" with P = ``net.num_prefix_tokens`` class / distillation tokens);
    ``tokens=False`` (Swin/ConvNeXt): the final norm is applied to the last stage by timm (``norm=True``).
    """

    def __init__(self, net: nn.Module, *, name: str, num_classes: int, input_size: int, indices: Sequence[int],
                 tokens: bool):
        idx = [int(i) for i in indices]
        channels = [net.feature_info[i]["num_chs"] for i in idx]
        classifier_name = _timm_classifier_name(net)
        super().__init__(net, name=name, num_classes=num_classes, input_size=input_size,
                         stage_channels=channels, classifier_name=classifier_name)
        self.indices = idx
        self.tokens = bool(tokens)
        if self.tokens:
            token_layout = ("nlc", int(net.num_prefix_tokens))
            self.feature_layouts.update({f"stage{len(idx)}": token_layout, "last": token_layout})

    def forward_stages(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        final, stages = self.net.forward_intermediates(x, indices=self.indices, norm=not self.tokens)
        if self.tokens:  # final: [N, prefix + h*w, C] after the last norm, kept as tokens
            stages = list(stages[:-1]) + [final]
        return list(stages), self.net.forward_head(final, pre_logits=True)


def _timm_classifier_name(net: nn.Module) -> str:
    """Dotted name of the nn.Linear returned by ``net.get_classifier()``."""
    fc = net.get_classifier()
    for name, module in net.named_modules():
        if module is fc:
            return name
    raise ValueError(f"{type(net).__name__}: get_classifier() is not a submodule")
