"""Detection distillation: the student's Faster R-CNN run step by step, the teacher's box head on its RoIs.

``DetectionDistiller.forward(images, targets)`` in training mode runs, with unmodified torchvision modules:

    images, targets = student.transform(images, targets)          # one resize (multi-scale pick) for both nets
    feats_s = student.backbone(images.tensors)
    proposals, rpn_losses = student.rpn(images, feats_s, targets)
    rois, _, labels, reg_targets = student.roi_heads.select_training_samples(proposals, targets)
    roi_s  = student.roi_heads.box_roi_pool(feats_s, rois, image_sizes)        # [R, 256, 7, 7]
    logits_s, box_s = student.roi_heads.box_predictor(student.roi_heads.box_head(roi_s))   # [R, K+1], [R, 4(K+1)]
    loss_classifier, loss_box_reg = fastrcnn_loss(...)                         # the student's own losses
    with no_grad:                                                              # teacher on the SAME rois
        feats_t = teacher.backbone(images.tensors)
        roi_t   = teacher.roi_heads.box_roi_pool(feats_t, rois, image_sizes)   # [R, 256, 7, 7]
        logits_t = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(roi_t))[0]   # [R, K+1]

R = the RoIs sampled by the student's box sampler (``box_batch_size_per_image`` per image, GT boxes included),
K+1 classes with background at index 0; the distillation target is each RoI's assigned label (0 = background).
The distillation losses (``DistillLosses``) then compare logits_s / logits_t (KD, DKD, WKD-L) and
projector(roi_s) / roi_t (WKD-F; the projector is linear by default, see ``WKD_F_PROJECTORS``). In eval mode the
wrapper returns ``student(images)`` (torchvision detections).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss

from examples.common.losses import DistillationLosses, build_distillation_losses
from examples.common.methods import get_method
from examples.common.schema import DistillConfig, resolve

__all__ = ["DistillLosses", "DetectionDistiller", "StudentStepOutput", "load_cost", "DET_METHODS",
           "WKD_F_PROJECTORS"]

# the methods of the shared registry (examples.common.methods) that detection runs
DET_METHODS = ("ce", "kd", "dkd", "wkd_l", "wkd_f", "wkd_lf")

# WKD-F projectors (wkd_kernels.losses.make_projector): "conv1x1_linear" (the configs' choice) = 1x1 conv +
# BatchNorm, no ReLU; "conv1x1" / "bottleneck" end in a ReLU, the published ConvReg design for post-ReLU
# classification features. FPN outputs, hence the teacher's RoIAlign features, are signed (no activation after the
# FPN's 3x3 conv), and a non-negative student side could never match their negative entries: OUR CHOICE is the
# linear projector. (Student and teacher RoI features are both [R, 256, 7, 7]: no spatial change.)
WKD_F_PROJECTORS = ("conv1x1_linear", "conv1x1", "bottleneck", None)


def load_cost(path: str, num_classes: int) -> Tensor:
    """Read a class-distance matrix written by ``build_cost_matrix`` (a dict with "distance") or a bare tensor.

    Returns the [C, C] distance (unsharpened), checked against ``num_classes`` (background included).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"`distill.wkd_l.cost`: file {path!r} does not exist; build it with "
                                "`python -m examples.detection.build_cost_matrix`") from None
    d = obj["distance"] if isinstance(obj, Mapping) else obj
    if not isinstance(d, Tensor) or d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"`distill.wkd_l.cost`: {path!r} must hold a square [C, C] tensor (or a dict with "
                         f"'distance'), got {getattr(d, 'shape', type(d).__name__)}")
    if d.shape[0] != num_classes:
        raise ValueError(f"`distill.wkd_l.cost`: {path!r} is {list(d.shape)} but the detector has {num_classes} "
                         f"classes (background included)")
    return d.float()


class DistillLosses(DistillationLosses):
    """The configured distillation terms on the student's sampled RoIs (``examples.common.losses``, which also
    applies every weight, WKD-F's included, once).

    Args:
        cfg: the ``distill`` section (``examples.common.schema.DistillConfig``): ``method`` (one of
            ``DET_METHODS``) and the sections of its terms; each term's ``weight`` is its factor in the total loss
            (WKD-L: the loss's own gamma), the other keys the options of its loss class. ``wkd_l.cost`` is a path
            (see ``load_cost``) or a tensor. Detection keeps the weights constant (no ``decay_start`` schedule).
        num_classes: K + 1, background included.
        roi_channels: channels of the RoIAlign features (256 for FPN students and teachers).

    forward(logits_s [R, K+1], logits_t [R, K+1], labels [R], roi_s [R, 256, 7, 7], roi_t [R, 256, 7, 7],
            iteration) -> dict of scalar losses "loss_kd", "loss_dkd", "loss_wkd_l", "loss_wkd_f" (the method's,
            already multiplied by their weights).
    """

    def __init__(self, cfg: Optional[Mapping[str, Any]], num_classes: int, roi_channels: int = 256):
        cfg = resolve(DistillConfig, dict(cfg or {}), "distill", prefix="distill.")
        method = get_method(cfg["method"], DET_METHODS)
        if cfg["ce_weight"] != 1.0 or cfg["ban"]:
            raise ValueError("`distill.ce_weight` / `distill.ban` are classification options (detection trains the "
                             "student's own Faster R-CNN losses unweighted)")
        terms = method.terms
        if "dkd" in terms and cfg["dkd"]["warmup_epochs"]:
            raise ValueError("`distill.dkd.warmup_epochs`: detection warms DKD up over iterations "
                             "(distill.dkd.warmup_iters)")
        cost = None
        if "wkd_l" in terms:
            c = cfg["wkd_l"]["cost"]
            if c is None:
                raise ValueError("`distill.wkd_l.cost` is required: a [C, C] class-distance file from "
                                 "`python -m examples.detection.build_cost_matrix`")
            cost = c.float() if isinstance(c, Tensor) else load_cost(str(c), num_classes)
        features = None
        if "wkd_f" in terms:
            if cfg["wkd_f"]["projector"] not in WKD_F_PROJECTORS:
                raise ValueError(f"`distill.wkd_f.projector` must be one of {list(WKD_F_PROJECTORS)}, got "
                                 f"{cfg['wkd_f']['projector']!r}")
            features = dict(student_channels=roi_channels, teacher_channels=roi_channels,
                            projector=cfg["wkd_f"]["projector"])
        built = build_distillation_losses(cfg, supported=DET_METHODS, num_classes=num_classes, cost=cost,
                                          features=features)
        super().__init__(built.method, built.cfg, dict(built.items()))
        self.dkd_warmup_iters = int(cfg["dkd"]["warmup_iters"]) if "dkd" in terms else 0

    @property
    def enabled(self) -> tuple[str, ...]:
        return self.method.terms

    def forward(self, logits_s: Tensor, logits_t: Tensor, labels: Tensor, roi_s: Tensor, roi_t: Tensor,
                iteration: int = 0) -> dict[str, Tensor]:
        raw: dict[str, Tensor] = {}
        if "kd" in self.terms:
            raw["kd"] = self["kd"](logits_s, logits_t)
        if "dkd" in self.terms:
            raw["dkd"] = self["dkd"](logits_s, logits_t, labels)
        if "wkd_l" in self.terms:
            raw["wkd_l"] = self["wkd_l"](logits_s, logits_t, labels)
        if "wkd_f" in self.terms:
            raw["wkd_f"] = self["wkd_f"](roi_s, roi_t).loss
        ramp = (min(1.0, (iteration + 1) / self.dkd_warmup_iters) if self.dkd_warmup_iters > 0 else 1.0)
        return {f"loss_{k}": v for k, v in self.combine(raw, dkd_warmup=ramp).items()}


class StudentStepOutput(dict):
    """Losses of one training forward plus, for inspection, the tensors the distillation saw (detached).

    Keys: the loss names (scalars); attributes ``rois`` (list of [R_i, 4] per image), ``labels`` [R],
    ``logits_s`` / ``logits_t`` [R, K+1], ``roi_s`` / ``roi_t`` [R, 256, 7, 7] (None without teacher).
    """
    rois: list
    labels: Tensor
    logits_s: Tensor
    logits_t: Optional[Tensor]
    roi_s: Tensor
    roi_t: Optional[Tensor]


class DetectionDistiller(nn.Module):
    """Student Faster R-CNN + optional frozen teacher + distillation losses (see the module docstring).

    Args:
        student, teacher: torchvision ``FasterRCNN``; the teacher (or None for the plain baseline) must have the
            same number of classes and stays in eval mode without gradients.
        losses: ``DistillLosses`` (its projector parameters train with the student).
        train_min_size: shorter-side choices in training (multi-scale); ``test_min_size``: the one for evaluation.
            ``train()`` / ``eval()`` switch ``student.transform.min_size`` between them.
        keep_tensors: attach the distillation inputs to the returned losses (``StudentStepOutput``), for tests.
    """

    def __init__(self, student: FasterRCNN, teacher: Optional[FasterRCNN], losses: DistillLosses,
                 train_min_size: Sequence[int], test_min_size: int, keep_tensors: bool = False):
        super().__init__()
        if losses.needs_teacher and teacher is None:
            raise ValueError(f"distillation methods {list(losses.enabled)} need a teacher (`teacher` section)")
        k_s = student.roi_heads.box_predictor.cls_score.out_features
        if teacher is not None:
            k_t = teacher.roi_heads.box_predictor.cls_score.out_features
            if k_s != k_t:
                raise ValueError(f"student has {k_s} classes but teacher has {k_t} (background included)")
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.student, self.losses = student, losses
        # a plain attribute keeps the teacher out of state_dict(), parameters() and DDP; moved by .to() below
        self._teacher = [teacher] if teacher is not None else []
        self.train_min_size = tuple(int(s) for s in train_min_size)
        self.test_min_size = int(test_min_size)
        self.keep_tensors = keep_tensors
        self.iteration = 0  # set by the training loop (DKD warm-up)
        self.train(self.training)

    @property
    def teacher(self) -> Optional[FasterRCNN]:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._teacher:
            self._teacher[0]._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.transform.min_size = self.train_min_size if mode else (self.test_min_size,)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if not self.training:
            return self.student(images)
        if targets is None:
            raise ValueError("DetectionDistiller: `targets` are required in training mode")
        s = self.student
        images_t, targets = s.transform(images, targets)
        feats_s = s.backbone(images_t.tensors)
        proposals, rpn_losses = s.rpn(images_t, feats_s, targets)
        rh = s.roi_heads
        rois, _, labels, reg_targets = rh.select_training_samples(proposals, targets)
        roi_s = rh.box_roi_pool(feats_s, rois, images_t.image_sizes)
        logits_s, box_s = rh.box_predictor(rh.box_head(roi_s))
        loss_cls, loss_box = fastrcnn_loss(logits_s, box_s, labels, reg_targets)
        out = StudentStepOutput(loss_classifier=loss_cls, loss_box_reg=loss_box, **rpn_losses)
        labels_cat = torch.cat(labels)
        logits_t = roi_t = None
        t = self.teacher
        if t is not None:
            with torch.no_grad():
                feats_t = t.backbone(images_t.tensors)
                roi_t = t.roi_heads.box_roi_pool(feats_t, rois, images_t.image_sizes)
                logits_t = t.roi_heads.box_predictor(t.roi_heads.box_head(roi_t))[0]
            out.update(self.losses(logits_s, logits_t, labels_cat, roi_s, roi_t, self.iteration))
        if self.keep_tensors:
            out.rois = [r.detach() for r in rois]
            out.labels = labels_cat
            out.logits_s, out.roi_s = logits_s.detach(), roi_s.detach()
            out.logits_t = logits_t
            out.roi_t = roi_t
        return out
