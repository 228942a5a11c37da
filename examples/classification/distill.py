"""Method families: student-only CE, KD, DKD, NKD, FitNet, WKD-L, WKD-F, WKD-L+WKD-F, and BAN self-KD.

:class:`Distiller` wraps the student and the distillation-only modules (projectors of WKD-F / FitNet, held in
``self.losses``: trained, in the optimizer and in checkpoints). The teacher is frozen, in eval mode, runs under
``torch.no_grad`` and is kept out of ``parameters()`` / ``state_dict()`` (it is never checkpointed or wrapped by
DDP). ``forward(images, targets)`` returns ``(logits, terms)``: the student's logits and a dict of named, already
weighted loss terms whose sum is the training loss.

Config section ``distill`` (keys, types and defaults: ``examples.common.schema.DistillConfig``; the method names:
``examples.common.methods.METHODS``, all of which classification supports):
    method: ce | kd | dkd | nkd | fitnet | wkd_l | wkd_f | wkd_lf
    ce_weight: factor of the cross-entropy term (default 1.0)
    ban: true for born-again self-KD (teacher = a previous generation of the same architecture; checked)
    kd: {temperature, weight}; dkd: {alpha, beta, temperature, weight, warmup_epochs}; nkd: {temperature, gamma,
    weight}; fitnet: {weight, layer, projector}; wkd_l: {cost, kappa, temperature, weight, decay_start, reg,
    num_iters}; wkd_f: {weight, mean_cov_ratio, grid, projector, layer, decay_start, covariance, eps, ...}
``decay_start`` is E0 of :func:`wkd_kernels.cosine_weight`, evaluated at the 1-based epoch e = epoch + 1 as in
the published trainer (weight constant while e <= E0, cosine decay to 0 in the last epoch); null or
E0 >= epochs keeps the weight constant. DKD's warm-up factor is min(e / warmup, 1), likewise 1-based.

Feature maps of different spatial sizes: ``projector: convreg`` (WKD-F, FitNet) is the published ConvReg
(``wkd_kernels.losses.make_projector``: stride-2 conv when the student map is 2x the teacher's, transposed conv
when half, valid conv otherwise), as the WRN-40-2 -> ShuffleNetV1 configs use (8x8 teacher, 4x4 student). With
another projector (the cross-architecture pairs, e.g. ViT-S 14x14 tokens vs ResNet18 7x7 at 224) the student map
is brought to the teacher's H x W before the projector (adaptive average pooling when larger, bilinear
interpolation when smaller: **our choice**), so WKD-F's Gaussians and FitNet's MSE compare the same grid cells.

Transformer features: a ViT / DeiT "last" feature is its token sequence (``model.feature_layouts``). WKD-F gets a
teacher's tokens as they are (``WKDFeatureLoss(teacher_layout="nlc", teacher_prefix_tokens=P)``: positions = patch
tokens); a student's tokens, which the projector and the resizing above read as a map, and FitNet's inputs are
viewed as [N, D, h, w] by ``wkd_kernels.ops.feature_layout.as_nchw``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.common.checkpoint import read_torch_file
from examples.common.losses import build_distillation_losses, scheduled_weight
from examples.common.methods import METHODS, get_method
from examples.common.schema import DistillConfig, resolve
from wkd_kernels import sharpen
from wkd_kernels.losses import make_projector
from wkd_kernels.ops.feature_layout import as_nchw

__all__ = ["Distiller", "CLS_METHODS", "load_distance", "load_cost_matrix", "match_spatial", "scheduled_weight"]

CLS_METHODS = tuple(METHODS)  # classification runs every method of the shared registry


def _required(sec: dict, key: str, where: str):
    if sec[key] is None:
        raise ValueError(f"{where}.{key} is required")
    return sec[key]


def load_distance(path, num_classes: int) -> Tensor:
    """The [C, C] class distance (unsharpened, float32) in ``path``: a ``torch.save``d tensor or a dict with key
    ``distance``; ``path`` may also be the tensor itself. Errors name the file."""
    if isinstance(path, Tensor):
        if path.dim() != 2 or tuple(path.shape) != (num_classes, num_classes):
            raise ValueError(f"distill.wkd_l.cost: the distance tensor is {list(path.shape)}, expected "
                             f"[{num_classes}, {num_classes}]")
        return path.float()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"distill.wkd_l.cost: cost-matrix file {p} does not exist (build one with "
                                "python -m examples.classification.build_cost_matrix, or copy the paper's released "
                                "one: examples/classification/README.md, 'Teachers and cost matrices')")
    obj = read_torch_file(p)  # weights_only=True; a damaged file is an error naming it
    if isinstance(obj, dict):
        if "distance" not in obj:
            raise ValueError(f"distill.wkd_l.cost: {p} holds a dict without a `distance` entry")
        obj = obj["distance"]
    if not isinstance(obj, Tensor) or obj.dim() != 2 or obj.shape[0] != obj.shape[1]:
        raise ValueError(f"distill.wkd_l.cost: {p} must hold a square [C, C] tensor, got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}")
    if obj.shape[0] != num_classes:
        raise ValueError(f"distill.wkd_l.cost: {p} is {list(obj.shape)} but the model has {num_classes} classes")
    return obj.float()


def load_cost_matrix(path, kappa: float, num_classes: int) -> Tensor:
    """``sharpen(load_distance(path, num_classes), kappa)`` = 1 - exp(-kappa d), float32 [C, C]."""
    return sharpen(load_distance(path, num_classes), float(kappa))


def match_spatial(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The student map resized to the teacher's H x W (adaptive average pool if larger, bilinear otherwise)."""
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(f_s, (ht, wt))
    return F.interpolate(f_s, size=(ht, wt), mode="bilinear", align_corners=False)


def _layout(model: nn.Module, key: str):
    """(layout, prefix tokens) of feature ``key`` of a zoo model (NCHW unless ``model.feature_layouts`` says)."""
    return getattr(model, "feature_layouts", {}).get(key, ("nchw", 0))


def _feature_sizes(student: nn.Module, teacher: nn.Module, layer: str, input_size: int):
    """(H, W) of ``layer`` in the student and the teacher at ``input_size`` (one no-grad eval forward)."""
    sizes = []
    for net in (student, teacher):
        p = next(net.parameters())
        x = torch.zeros(2, 3, input_size, input_size, dtype=p.dtype, device=p.device)
        was = net.training
        net.eval()
        with torch.no_grad():
            f = net(x).features[layer]
            sizes.append(tuple(as_nchw(f, *_layout(net, layer)).shape[-2:]))
        net.train(was)
    return sizes


class Distiller(nn.Module):
    """Student + distillation modules; see the module docstring.

    Args:
        student: a model from ``build_model``: ``model(x, features=bool)`` returns ``.logits`` and ``.features``.
        teacher: the frozen teacher (same output type), or None for method ``ce``.
        distill_cfg: the ``distill`` config section.
        total_epochs: training epochs (for the cosine weight schedules and DKD's warm-up).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], distill_cfg: dict, total_epochs: int,
                 input_size: Optional[int] = None):
        super().__init__()
        # defaults, unknown keys (`decay_strat`)
        distill_cfg = resolve(DistillConfig, distill_cfg, "distill", prefix="distill.")
        spec = get_method(distill_cfg["method"], CLS_METHODS)
        method = spec.name
        if spec.needs_teacher and teacher is None:
            raise ValueError(f"distill.method={method!r} needs a teacher (model.teacher)")
        self.method, self.terms, self.cfg, self.total_epochs = method, spec.terms, distill_cfg, int(total_epochs)
        self.ce_weight = float(distill_cfg["ce_weight"])
        self.student = student
        self._teacher = [teacher] if teacher is not None else []  # a list: not a submodule, not in state_dict
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if distill_cfg["ban"]:
                if type(teacher) is not type(student) or \
                        sum(p.numel() for p in teacher.parameters()) != sum(p.numel() for p in student.parameters()):
                    raise ValueError("distill.ban: born-again training needs a teacher of the student's architecture")
        num_classes = student.classifier.out_features
        self._epoch = 0
        c = distill_cfg
        cost = None
        if "wkd_l" in spec.terms:
            cost = load_distance(_required(c["wkd_l"], "cost", "distill.wkd_l"), num_classes)
        features, projectors = None, {}
        self.feature_term = next((t for t in spec.terms if t in ("fitnet", "wkd_f")), None)
        if self.feature_term is not None:
            name = self.feature_term
            sec = c[name]
            layer = sec["layer"]
            for model, who in ((student, "student"), (teacher, "teacher")):
                if layer not in model.feature_channels:
                    raise ValueError(f"distill.{name}.layer={layer!r} is not a feature of the {who}; choose from "
                                     f"{sorted(model.feature_channels)}")
            cs, ct = student.feature_channels[layer], teacher.feature_channels[layer]
            self.feature_layer = layer
            self.feature_layouts = (_layout(student, layer), _layout(teacher, layer))
            self.spatial_projector = sec["projector"] == "convreg"
            proj = sec["projector"]
            if self.spatial_projector:  # the published ConvReg needs both maps' sizes: one probe forward
                if input_size is None:
                    raise ValueError(f"distill.{name}.projector=convreg needs the input size (data.input_size)")
                s_size, t_size = _feature_sizes(student, teacher, layer, int(input_size))
                projectors[f"{name}_projector"] = make_projector(
                    "convreg", cs, ct, fn=f"distill.{name}.projector", student_size=s_size, teacher_size=t_size)
                cs, proj = ct, None  # the loss sees the projected map
            features = dict(student_channels=cs, teacher_channels=ct, projector=proj)
            if name == "wkd_f":  # WKD-F reads the teacher's tokens itself; FitNet's MSE gets [N, C, H, W] views
                t_layout, t_prefix = self.feature_layouts[1]
                features.update(teacher_layout=t_layout, teacher_prefix_tokens=t_prefix)
        # the loss modules and every weight (WKD-F's included, applied once): examples.common.losses
        self.losses = build_distillation_losses(c, supported=CLS_METHODS, num_classes=num_classes, cost=cost,
                                                features=features, projectors=projectors)
        self.set_epoch(0)

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0] if self._teacher else None

    def to(self, *args, **kwargs):  # the teacher is not a submodule: move it too
        super().to(*args, **kwargs)
        if self._teacher:
            self._teacher[0].to(*args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()
        return self

    def set_epoch(self, epoch: int) -> Dict[str, float]:
        """Update the scheduled loss weights for 0-based ``epoch``; returns them (for logging)."""
        self._epoch = int(epoch)
        # 1-based epoch, as the published (mdistiller) trainer passes it: the weight reaches 0 in the last
        return self.losses.set_epoch(self._epoch + 1, self.total_epochs)

    def _dkd_factor(self) -> float:
        warm = float(self.cfg["dkd"]["warmup_epochs"])
        return 1.0 if warm <= 0 else min((self._epoch + 1) / warm, 1.0)

    def forward(self, images: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        need_features = self.feature_term is not None  # logit-only methods run the plain networks
        out_s = self.student(images, features=need_features)
        s = out_s.logits
        terms: Dict[str, Tensor] = {}
        if self.ce_weight > 0 or self.method == "ce":
            terms["ce"] = self.ce_weight * F.cross_entropy(s, targets)
        if self.method == "ce":
            return s, terms
        with torch.no_grad():
            out_t = self.teacher(images, features=need_features)
        t = out_t.logits.float()
        s32 = s.float()
        raw: Dict[str, Tensor] = {}
        for name in ("kd", "dkd", "nkd"):
            if name in self.terms:
                raw[name] = self.losses[name](s32, t) if name == "kd" else self.losses[name](s32, t, targets)
        if "wkd_l" in self.terms:
            raw["wkd_l"] = self.losses["wkd_l"](s32, t, targets)
        if self.feature_term is not None:
            name = self.feature_term
            f_t = out_t.features[self.feature_layer].float()
            (s_layout, s_prefix), (t_layout, t_prefix) = self.feature_layouts
            f_s = as_nchw(out_s.features[self.feature_layer], s_layout, s_prefix)  # a view; tokens -> patch map
            t_map = as_nchw(f_t, t_layout, t_prefix)
            if name == "fitnet":
                f_t = t_map
            if self.spatial_projector:  # the published ConvReg changes the spatial size itself
                f_s = self.losses[f"{name}_projector"](f_s)
            else:
                f_s = match_spatial(f_s, t_map)
            raw[name] = self.losses[name](f_s, f_t) if name == "fitnet" else self.losses[name](f_s, f_t).loss
        terms.update(self.losses.combine(raw, dkd_warmup=self._dkd_factor() if "dkd" in self.terms else 1.0))
        return s, terms
