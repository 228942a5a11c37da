"""Method families: student-only CE, KD, DKD, NKD, FitNet, WKD-L, WKD-F, WKD-L+WKD-F, and BAN self-KD.

:class:`Distiller` wraps the student and the distillation-only modules (projectors of WKD-F / FitNet, held in
``self.losses``: trained, in the optimizer and in checkpoints). The teacher is frozen, in eval mode, runs under
``torch.no_grad`` and is kept out of ``parameters()`` / ``state_dict()`` (it is never checkpointed or wrapped by
DDP). ``forward(images, targets)`` returns ``(logits, terms)``: the student's logits and a dict of named, already
weighted loss terms whose sum is the training loss.

Config section ``distill`` (all weights are the loss factors of the paper's recipes):
    method: ce | kd | dkd | nkd | fitnet | wkd_l | wkd_f | wkd_lf
    ce_weight: factor of the cross-entropy term (default 1.0)
    ban: true for born-again self-KD (teacher = a previous generation of the same architecture; checked)
    kd:     {temperature, weight}
    dkd:    {alpha, beta, temperature, warmup_epochs}            (factor min(epoch / warmup, 1), as DKD)
    nkd:    {temperature, gamma, weight}
    fitnet: {weight, layer, projector}
    wkd_l:  {cost, kappa, temperature, weight, decay_start, reg, num_iters}
    wkd_f:  {weight, mean_cov_ratio, grid, projector, layer, decay_start, covariance, eps}
``decay_start`` is E0 of :func:`wkd_kernels.cosine_weight`, evaluated at the 1-based epoch e = epoch + 1 as in
the published trainer (weight constant while e <= E0, cosine decay to 0 in the last epoch); null or
E0 >= epochs keeps the weight constant. DKD's warm-up factor is min(e / warmup, 1), likewise 1-based.

Feature maps of different spatial sizes (e.g. ViT-S 14x14 tokens vs ResNet18 7x7 at 224): the student map is
brought to the teacher's H x W before the projector (adaptive average pooling when larger, bilinear
interpolation when smaller), so WKD-F's Gaussians and FitNet's MSE compare the same grid cells.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.common.config import check_keys
from wkd_kernels import sharpen
from wkd_kernels.losses import (DKDLoss, FitNetLoss, KDLoss, NKDLoss, WKDFeatureLoss, WKDLogitLoss,
                                cosine_weight)

__all__ = ["Distiller", "METHODS", "TEACHER_METHODS", "load_cost_matrix", "match_spatial", "scheduled_weight"]

METHODS = ("ce", "kd", "dkd", "nkd", "fitnet", "wkd_l", "wkd_f", "wkd_lf")
TEACHER_METHODS = tuple(m for m in METHODS if m != "ce")
_LOGIT_METHODS = ("kd", "dkd", "nkd", "wkd_l", "wkd_lf")
_FEATURE_METHODS = ("fitnet", "wkd_f", "wkd_lf")


_SECTION_KEYS = {
    "kd": {"temperature", "weight"},
    "dkd": {"alpha", "beta", "temperature", "warmup_epochs"},
    "nkd": {"temperature", "gamma", "weight"},
    "fitnet": {"weight", "layer", "projector"},
    "wkd_l": {"cost", "kappa", "temperature", "weight", "decay_start", "reg", "num_iters"},
    "wkd_f": {"weight", "mean_cov_ratio", "grid", "projector", "layer", "decay_start", "covariance", "eps"},
}
_DISTILL_KEYS = {"method", "ce_weight", "ban", *_SECTION_KEYS}


def _section(cfg: dict, name: str) -> dict:
    sec = cfg.get(name)
    if not isinstance(sec, dict):
        raise ValueError(f"distill.{name}: the method needs a `distill.{name}` mapping in the config, got {sec!r}")
    check_keys(sec, {None: _SECTION_KEYS[name]}, "Distiller", prefix=f"distill.{name}")  # e.g. `decay_strat`
    return sec


def _get(sec: dict, key: str, where: str, default=None, required: bool = False):
    if key not in sec or sec[key] is None:
        if required:
            raise ValueError(f"{where}.{key} is required")
        return default
    return sec[key]


def load_cost_matrix(path, kappa: float, num_classes: int) -> Tensor:
    """Load a [C, C] class distance (``torch.save``d tensor, or a dict with key ``distance``) and sharpen it.

    ``path`` may also be the [C, C] distance tensor itself. Returns ``sharpen(d, kappa)`` = 1 - exp(-kappa d),
    float32 [C, C]; errors name the file.
    """
    if isinstance(path, Tensor):
        if path.dim() != 2 or tuple(path.shape) != (num_classes, num_classes):
            raise ValueError(f"distill.wkd_l.cost: the distance tensor is {list(path.shape)}, expected "
                             f"[{num_classes}, {num_classes}]")
        return sharpen(path.float(), float(kappa))
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"distill.wkd_l.cost: cost-matrix file {p} does not exist (build one with "
                                "python -m examples.classification.build_cost_matrix, or copy the paper's released "
                                "one: examples/classification/README.md, 'Teachers and cost matrices')")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "distance" not in obj:
            raise ValueError(f"distill.wkd_l.cost: {p} holds a dict without a `distance` entry")
        obj = obj["distance"]
    if not isinstance(obj, Tensor) or obj.dim() != 2 or obj.shape[0] != obj.shape[1]:
        raise ValueError(f"distill.wkd_l.cost: {p} must hold a square [C, C] tensor, got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}")
    if obj.shape[0] != num_classes:
        raise ValueError(f"distill.wkd_l.cost: {p} is {list(obj.shape)} but the model has {num_classes} classes")
    return sharpen(obj.float(), float(kappa))


def scheduled_weight(base: float, decay_start: Optional[float], epoch: int, total_epochs: int) -> float:
    """``cosine_weight(epoch, base, decay_start, total_epochs)``; constant ``base`` when decay_start is None or
    not below total_epochs (short smoke runs of long recipes)."""
    if decay_start is None or decay_start >= total_epochs:
        return float(base)
    return cosine_weight(float(min(epoch, total_epochs)), float(base), float(decay_start), float(total_epochs))


def match_spatial(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The student map resized to the teacher's H x W (adaptive average pool if larger, bilinear otherwise)."""
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(f_s, (ht, wt))
    return F.interpolate(f_s, size=(ht, wt), mode="bilinear", align_corners=False)


class Distiller(nn.Module):
    """Student + distillation modules; see the module docstring.

    Args:
        student: a model from ``build_model``: ``model(x, features=bool)`` returns ``.logits`` and ``.features``.
        teacher: the frozen teacher (same output type), or None for method ``ce``.
        distill_cfg: the ``distill`` config section.
        total_epochs: training epochs (for the cosine weight schedules and DKD's warm-up).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], distill_cfg: dict, total_epochs: int):
        super().__init__()
        method = distill_cfg.get("method")
        check_keys(distill_cfg, {None: _DISTILL_KEYS}, "Distiller", prefix="distill")
        if method not in METHODS:
            raise ValueError(f"distill.method must be one of {METHODS}, got {method!r}")
        if method in TEACHER_METHODS and teacher is None:
            raise ValueError(f"distill.method={method!r} needs a teacher (model.teacher)")
        self.method, self.cfg, self.total_epochs = method, distill_cfg, int(total_epochs)
        self.ce_weight = float(distill_cfg.get("ce_weight", 1.0))
        self.student = student
        self.losses = nn.ModuleDict()
        self._teacher = [teacher] if teacher is not None else []  # a list: not a submodule, not in state_dict
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if distill_cfg.get("ban"):
                if type(teacher) is not type(student) or \
                        sum(p.numel() for p in teacher.parameters()) != sum(p.numel() for p in student.parameters()):
                    raise ValueError("distill.ban: born-again training needs a teacher of the student's architecture")
        num_classes = student.classifier.out_features
        self._epoch = 0
        if method == "kd":
            sec = _section(distill_cfg, "kd")
            self.losses["kd"] = KDLoss(float(_get(sec, "temperature", "distill.kd", 4.0)))
        elif method == "dkd":
            sec = _section(distill_cfg, "dkd")
            self.losses["dkd"] = DKDLoss(float(_get(sec, "alpha", "distill.dkd", 1.0)),
                                         float(_get(sec, "beta", "distill.dkd", 8.0)),
                                         float(_get(sec, "temperature", "distill.dkd", 4.0)))
        elif method == "nkd":
            sec = _section(distill_cfg, "nkd")
            self.losses["nkd"] = NKDLoss(float(_get(sec, "temperature", "distill.nkd", 1.0)),
                                         float(_get(sec, "gamma", "distill.nkd", 1.5)))
        if method in ("wkd_l", "wkd_lf"):
            sec = _section(distill_cfg, "wkd_l")
            cost = load_cost_matrix(_get(sec, "cost", "distill.wkd_l", required=True),
                                    float(_get(sec, "kappa", "distill.wkd_l", 1.0)), num_classes)
            self.losses["wkd_l"] = WKDLogitLoss(cost, float(_get(sec, "temperature", "distill.wkd_l", required=True)),
                                                float(_get(sec, "weight", "distill.wkd_l", required=True)),
                                                reg=float(_get(sec, "reg", "distill.wkd_l", 0.05)),
                                                num_iters=int(_get(sec, "num_iters", "distill.wkd_l", 10)))
        if method in ("wkd_f", "wkd_lf", "fitnet"):
            name = "fitnet" if method == "fitnet" else "wkd_f"
            sec = _section(distill_cfg, name)
            layer = _get(sec, "layer", f"distill.{name}", "last")
            for model, who in ((student, "student"), (teacher, "teacher")):
                if layer not in model.feature_channels:
                    raise ValueError(f"distill.{name}.layer={layer!r} is not a feature of the {who}; choose from "
                                     f"{sorted(model.feature_channels)}")
            cs, ct = student.feature_channels[layer], teacher.feature_channels[layer]
            self.feature_layer = layer
            if name == "fitnet":
                self.losses["fitnet"] = FitNetLoss(cs, ct, projector=_get(sec, "projector", "distill.fitnet",
                                                                          "conv1x1"))
            else:
                self.losses["wkd_f"] = WKDFeatureLoss(
                    cs, ct, covariance=_get(sec, "covariance", "distill.wkd_f", "diag"),
                    grid=int(_get(sec, "grid", "distill.wkd_f", 1)),
                    mean_cov_ratio=float(_get(sec, "mean_cov_ratio", "distill.wkd_f", 2.0)),
                    eps=float(_get(sec, "eps", "distill.wkd_f", 1e-5)),
                    projector=_get(sec, "projector", "distill.wkd_f", "bottleneck"),
                    weight=float(_get(sec, "weight", "distill.wkd_f", required=True)))
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
        weights = {}
        for name in ("wkd_l", "wkd_f"):
            if name in self.losses:
                sec = self.cfg[name]
                # 1-based epoch, as the published (mdistiller) trainer passes it: the weight reaches 0 in the last
                w = scheduled_weight(float(sec["weight"]), sec.get("decay_start"), self._epoch + 1,
                                     self.total_epochs)
                self.losses[name].weight = w
                weights[f"w_{name}"] = w
        return weights

    def _dkd_factor(self) -> float:
        warm = float(self.cfg["dkd"].get("warmup_epochs") or 0)
        return 1.0 if warm <= 0 else min((self._epoch + 1) / warm, 1.0)

    def forward(self, images: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        need_features = self.method in _FEATURE_METHODS  # logit-only methods run the plain networks
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
        m, cfg = self.method, self.cfg
        if m == "kd":
            terms["kd"] = float(cfg["kd"].get("weight", 1.0)) * self.losses["kd"](s32, t)
        elif m == "dkd":
            terms["dkd"] = self._dkd_factor() * self.losses["dkd"](s32, t, targets)
        elif m == "nkd":
            terms["nkd"] = float(cfg["nkd"].get("weight", 1.0)) * self.losses["nkd"](s32, t, targets)
        if m in ("wkd_l", "wkd_lf"):
            terms["wkd_l"] = self.losses["wkd_l"](s32, t, targets)
        if m in _FEATURE_METHODS:
            f_t = out_t.features[self.feature_layer].float()
            f_s = match_spatial(out_s.features[self.feature_layer], f_t)
            if m == "fitnet":
                terms["fitnet"] = float(cfg["fitnet"].get("weight", 1.0)) * self.losses["fitnet"](f_s, f_t)
            else:
                terms["wkd_f"] = self.losses["wkd_f"](f_s, f_t).loss
        return s, terms
