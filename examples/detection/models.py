"""Faster R-CNN + FPN students and teachers built from unmodified torchvision parts.

Architectures (``ARCHS``), all with a 256-channel FPN, four feature levels at strides 4/8/16/32 named
"0".."3" plus the max-pooled level "pool" (stride 64), the standard FPN anchors (32, 64, 128, 256, 512) x aspect
ratios (0.5, 1, 2), and RoIAlign 7 x 7 on "0".."3" (``MultiScaleRoIAlign``), so every student and teacher produces
RoI features of the same shape [R, 256, 7, 7]:

    resnet18_fpn, resnet50_fpn, resnet101_fpn   torchvision ``resnet_fpn_backbone`` (layer1..layer4)
    mobilenet_v2_fpn                            MobileNetV2 ``features`` tapped after blocks 3 / 6 / 13 / 17
                                                (channels 24 / 32 / 96 / 320 at strides 4 / 8 / 16 / 32)

torchvision's own ``fasterrcnn_mobilenet_v3_large_fpn``-style extractor keeps only the two deepest stages (both at
stride 32); the paper's MobileNetV2 baseline (the DKD / ReviewKD Detectron2 code) uses four levels, as here. The
last tap is block 17 (320 channels) and the final 1x1 conv to 1280 channels (``features[18]``) is dropped, as in
those Detectron2 MobileNetV2 backbones.

Normalisation: with an ImageNet backbone checkpoint the backbone uses ``FrozenBatchNorm2d`` and only the last
``trainable_backbone_layers`` stages train (torchvision reference behaviour); from scratch (no checkpoint, the
tests) it uses ``BatchNorm2d`` and everything trains. Teachers are always built with ``FrozenBatchNorm2d``.

No weights are ever downloaded: ImageNet backbones and detection teachers come from local checkpoint paths.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from examples.common.checkpoint import read_torch_file

__all__ = ["ARCHS", "build_backbone", "build_detector", "build_teacher", "load_detector_weights",
           "MOBILENET_V2_TAPS", "feature_strides"]

ARCHS = ("resnet18_fpn", "resnet50_fpn", "resnet101_fpn", "mobilenet_v2_fpn")
FPN_CHANNELS = 256

# features index -> (FPN level name, channels, stride); the last block of each resolution
MOBILENET_V2_TAPS = OrderedDict([("3", ("0", 24, 4)), ("6", ("1", 32, 8)), ("13", ("2", 96, 16)),
                                 ("17", ("3", 320, 32))])
# first features index of each of the five MobileNetV2 stages (strides 2, 4, 8, 16, 32)
_MOBILENET_V2_STAGE_START = (0, 2, 4, 7, 14)


def _load_state(path: str, what: str, trusted: bool = False) -> dict:
    """The state dict in ``path``, read with ``weights_only=True`` (unless ``trusted``: the user's opt-in for this
    file) and verified (``examples.common.checkpoint.read_torch_file``: errors name the file)."""
    try:
        obj = read_torch_file(path, trusted=trusted)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: checkpoint file {path!r} does not exist") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # our training checkpoints (out/last.pth) or torchvision reference checkpoints
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: {path!r} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def _mobilenet_v2_fpn(norm_layer) -> BackboneWithFPN:
    features = mobilenet_v2(weights=None, norm_layer=norm_layer).features
    return BackboneWithFPN(features, {k: v[0] for k, v in MOBILENET_V2_TAPS.items()},
                           [v[1] for v in MOBILENET_V2_TAPS.values()], FPN_CHANNELS, extra_blocks=LastLevelMaxPool())


def _freeze_mobilenet(backbone: BackboneWithFPN, trainable_layers: int) -> None:
    """Train the last ``trainable_layers`` of the five stages (0 = none, 5 = all), as torchvision for ResNets."""
    first_trainable = _MOBILENET_V2_STAGE_START[5 - trainable_layers] if trainable_layers < 5 else 0
    if trainable_layers == 0:
        first_trainable = 10 ** 6
    for name, p in backbone.body.named_parameters():
        if int(name.split(".")[0]) < first_trainable:
            p.requires_grad_(False)


def build_backbone(arch: str, backbone_checkpoint: Optional[str] = None, trainable_backbone_layers: int = 3,
                   frozen_bn: Optional[bool] = None, trusted: bool = False) -> BackboneWithFPN:
    """FPN backbone; output dict "0".."3", "pool" of [N, 256, H/s, W/s] maps (s = 4, 8, 16, 32, 64).

    Args:
        arch: one of ``ARCHS``.
        backbone_checkpoint: optional path of an ImageNet classification state dict of the plain torchvision network
            (``resnet18`` / ``resnet50`` / ``resnet101`` / ``mobilenet_v2`` keys; the classifier is ignored).
        trainable_backbone_layers: 0..5 stages that train when a checkpoint is given (otherwise all train).
        frozen_bn: FrozenBatchNorm2d in the backbone (default: True iff a checkpoint is given).
    """
    if arch not in ARCHS:
        raise ValueError(f"`arch` must be one of {ARCHS}, got {arch!r}")
    if isinstance(trainable_backbone_layers, bool) or not isinstance(trainable_backbone_layers, int) \
            or not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"`trainable_backbone_layers` must be an integer in [0, 5], got {trainable_backbone_layers!r}")
    pretrained = backbone_checkpoint is not None
    if frozen_bn is None:
        frozen_bn = pretrained
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    layers = trainable_backbone_layers if pretrained else 5
    if arch == "mobilenet_v2_fpn":
        bb = _mobilenet_v2_fpn(norm)
        body_prefix = "features."
    else:
        bb = resnet_fpn_backbone(backbone_name=arch[: -len("_fpn")], weights=None, norm_layer=norm,
                                 trainable_layers=layers)
        body_prefix = ""
    if pretrained:
        state = _load_state(backbone_checkpoint, f"backbone_checkpoint of {arch}", trusted)
        body_keys = set(bb.body.state_dict().keys())
        sub = {}
        for k, v in state.items():
            k2 = k[len(body_prefix):] if body_prefix and k.startswith(body_prefix) else k
            if k2 in body_keys:
                sub[k2] = v
        missing = [k for k in body_keys if k not in sub and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"backbone_checkpoint {backbone_checkpoint!r} does not fit {arch}: missing "
                             f"{len(missing)} keys, e.g. {missing[:3]}")
        bb.body.load_state_dict(sub, strict=False)
    if arch == "mobilenet_v2_fpn":
        _freeze_mobilenet(bb, layers)
    return bb


def _check_rcnn_kwargs(rcnn_kwargs: Mapping[str, Any]) -> dict:
    allowed = set(inspect.signature(FasterRCNN.__init__).parameters) - {"self", "backbone", "num_classes",
                                                                       "min_size", "max_size", "kwargs"}
    bad = sorted(set(rcnn_kwargs) - allowed)
    if bad:
        raise ValueError(f"`model.rcnn_kwargs` has unknown FasterRCNN arguments {bad}; allowed: {sorted(allowed)}")
    return dict(rcnn_kwargs)


def build_detector(arch: str, num_classes: int, min_size: Sequence[int] | int = 800, max_size: int = 1333, *,
                   backbone_checkpoint: Optional[str] = None, trainable_backbone_layers: int = 3,
                   frozen_bn: Optional[bool] = None, rcnn_kwargs: Optional[Mapping[str, Any]] = None,
                   box_head_dim: int = 1024, trusted: bool = False) -> FasterRCNN:
    """torchvision ``FasterRCNN`` on ``build_backbone(arch)`` (``trusted``: full unpickling of the backbone file).

    Args:
        num_classes: classes of the box predictor including background (index 0), e.g. 81 for COCO.
        min_size: shorter side(s) of the internal resize; in training torchvision's transform picks one of them at
            random for each image (multi-scale), evaluation uses the last entry.
        max_size: cap on the longer side.
        rcnn_kwargs: further ``FasterRCNN`` keyword arguments (RPN/box sampler sizes, thresholds, ...).
        box_head_dim: width of the two-layer MLP box head (torchvision: 1024; smaller only for tests).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2 (background included), got {num_classes!r}")
    bb = build_backbone(arch, backbone_checkpoint, trainable_backbone_layers, frozen_bn, trusted)
    sizes = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    kw = _check_rcnn_kwargs(rcnn_kwargs or {})
    if box_head_dim != 1024:  # torchvision's default head is TwoMLPHead(256 * 7 * 7, 1024)
        if isinstance(box_head_dim, bool) or not isinstance(box_head_dim, int) or box_head_dim < 1:
            raise ValueError(f"`model.box_head_dim` must be an integer >= 1, got {box_head_dim!r}")
        kw["box_head"] = TwoMLPHead(FPN_CHANNELS * 7 * 7, box_head_dim)
        kw["box_predictor"] = FastRCNNPredictor(box_head_dim, num_classes)
        num_classes = None  # FasterRCNN wants num_classes only without a box_predictor
    return FasterRCNN(bb, num_classes=num_classes, min_size=sizes, max_size=max_size, **kw)


def remap_coco91_predictor(state: dict, coco_category_ids: Sequence[int], num_classes: int) -> dict:
    """Select the rows of a 91-way torchvision COCO box predictor for contiguous labels.

    torchvision's COCO detection weights index classes by the raw COCO category id (91 outputs, 11 unused);
    our datasets use contiguous labels 1..K (label k = k-th sorted category id, background 0). Row 0 stays
    background, row k takes torchvision's row ``coco_category_ids[k - 1]``.
    """
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if w is None or w.shape[0] == num_classes:
        return state
    if len(coco_category_ids) + 1 != num_classes:
        raise ValueError(f"cannot remap the teacher's {w.shape[0]}-way predictor: {len(coco_category_ids)} category "
                         f"ids for num_classes = {num_classes}")
    if max(coco_category_ids) >= w.shape[0]:
        raise ValueError(f"teacher predictor has {w.shape[0]} classes but the dataset has category id "
                         f"{max(coco_category_ids)}: it is neither {num_classes}-way nor indexed by category id")
    rows = torch.tensor([0] + list(coco_category_ids))
    box_rows = (rows[:, None] * 4 + torch.arange(4)).flatten()
    state = dict(state)
    for name, idx in (("cls_score", rows), ("bbox_pred", box_rows)):
        for p in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{p}"
            state[key] = state[key][idx]
    return state


def load_detector_weights(model: FasterRCNN, path: str, coco_category_ids: Optional[Sequence[int]] = None,
                          what: str = "teacher.checkpoint", trusted: bool = False) -> None:
    """Load a full detector state dict (torchvision format, or our ``last.pth``/``final.pth``) strictly.

    A 91-way torchvision COCO predictor is remapped to the model's contiguous classes (``remap_coco91_predictor``).
    """
    state = _load_state(path, what, trusted)
    num_classes = model.roi_heads.box_predictor.cls_score.out_features
    if coco_category_ids is not None:
        state = remap_coco91_predictor(state, coco_category_ids, num_classes)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")
             or k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{what} {path!r} does not fit the model: missing {missing[:5]} (of {len(missing)}), "
                         f"unexpected {unexpected[:5]} (of {len(unexpected)})")


def build_teacher(arch: str, num_classes: int, checkpoint: Optional[str], *, min_size=800, max_size: int = 1333,
                  coco_category_ids: Optional[Sequence[int]] = None,
                  rcnn_kwargs: Optional[Mapping[str, Any]] = None, box_head_dim: int = 1024,
                  trusted: bool = False) -> FasterRCNN:
    """Frozen teacher detector in eval mode (FrozenBatchNorm2d, no gradients).

    Args:
        checkpoint: detector state dict path (torchvision ``fasterrcnn_resnet50_fpn`` COCO weights, or a
            ``last.pth``/``final.pth`` of ``examples.detection.train``). ``None`` keeps the random initialisation
            (tests and benchmarks only).
    """
    model = build_detector(arch, num_classes, min_size, max_size, frozen_bn=True, rcnn_kwargs=rcnn_kwargs,
                           box_head_dim=box_head_dim)
    if checkpoint is not None:
        load_detector_weights(model, checkpoint, coco_category_ids, trusted=trusted)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def feature_strides(backbone: nn.Module, size: int = 128) -> dict[str, int]:
    """Stride of each output level of an FPN backbone, measured on a size x size input."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, size, size))
    backbone.train(was_training)
    return {k: size // v.shape[-1] for k, v in out.items()}
