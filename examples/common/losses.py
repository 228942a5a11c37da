"""The distillation loss terms of a method and their weights, shared by the classification and detection trainers.

``build_distillation_losses(distill_cfg, supported=..., num_classes=..., cost=..., features=...)`` reads the
``distill`` config section (``schema.DistillConfig``) and returns a :class:`DistillationLosses`: a
``nn.ModuleDict`` with one loss module per term of the method (``kd``, ``dkd``, ``nkd``, ``fitnet``, ``wkd_l``,
``wkd_f``; their parameters, e.g. projectors, train with the student), plus

* ``set_epoch(epoch, total_epochs)``: the scheduled weights of WKD-L and WKD-F (``wkd_kernels.cosine_weight``,
  1-based epoch, see :func:`scheduled_weight`); returns them for logging;
* ``combine(raw)``: the weighted terms from the unweighted ones (``raw[term]`` = the term's loss module output).

Where each weight is applied (once): WKD-L's gamma and WKD-F's weight are attributes of their loss modules
(``WKDLogitLoss.weight``: gamma multiplies only the Wasserstein part, L_t + gamma WD; ``WKDFeatureLoss.weight``
multiplies the whole loss), set here at construction and by ``set_epoch``, so ``combine`` passes those two terms
through unchanged. KD, DKD (times its warm-up factor), NKD and FitNet are multiplied by their ``weight`` in
``combine``.
"""
from __future__ import annotations

from typing import Any, Collection, Dict, Mapping, Optional

from torch import Tensor, nn

from examples.common.methods import Method, get_method
from examples.common.schema import DistillConfig, resolve
from wkd_kernels.interrelations import sharpen
from wkd_kernels.losses import DKDLoss, FitNetLoss, KDLoss, NKDLoss, WKDFeatureLoss, WKDLogitLoss, cosine_weight

__all__ = ["DistillationLosses", "build_distillation_losses", "scheduled_weight", "SCHEDULED_TERMS"]

SCHEDULED_TERMS = ("wkd_l", "wkd_f")  # terms whose weight follows cosine_weight (distill.<term>.decay_start)


def scheduled_weight(base: float, decay_start: Optional[float], epoch: int, total_epochs: int) -> float:
    """``cosine_weight(epoch, base, decay_start, total_epochs)``; constant ``base`` when decay_start is None or
    not below total_epochs (short smoke runs of long recipes)."""
    if decay_start is None or decay_start >= total_epochs:
        return float(base)
    return cosine_weight(float(min(epoch, total_epochs)), float(base), float(decay_start), float(total_epochs))


def _required(cfg: Mapping[str, Any], term: str, key: str):
    if cfg[term][key] is None:
        raise ValueError(f"`distill.{term}.{key}` is required")
    return cfg[term][key]


class DistillationLosses(nn.ModuleDict):
    """The loss modules of one method (keys: its terms, plus any projector a task adds) and their weights.

    Build it with :func:`build_distillation_losses`. ``method`` is the registry entry
    (``examples.common.methods``), ``terms`` its terms, ``cfg`` the resolved ``distill`` section.
    """

    def __init__(self, method: Method, cfg: Mapping[str, Any], modules: Mapping[str, nn.Module]):
        super().__init__(modules)
        # plain attributes, set after ModuleDict.__init__ (not modules: kept out of state_dict)
        self.method, self.terms, self.cfg = method, method.terms, dict(cfg)

    @property
    def needs_teacher(self) -> bool:
        return self.method.needs_teacher

    def base_weight(self, term: str) -> float:
        """``distill.<term>.weight`` of the config (before any schedule)."""
        return float(_required(self.cfg, term, "weight"))

    @property
    def weights(self) -> Dict[str, float]:
        """The current factor of every term (WKD-L: gamma of its Wasserstein part)."""
        return {t: (float(self[t].weight) if t in SCHEDULED_TERMS else self.base_weight(t)) for t in self.terms}

    def set_epoch(self, epoch: int, total_epochs: int) -> Dict[str, float]:
        """Set the scheduled WKD-L / WKD-F weights for the 1-based ``epoch`` (as the published trainer counts);
        returns ``{"w_wkd_l": ..., "w_wkd_f": ...}`` for the terms the method has."""
        out = {}
        for term in SCHEDULED_TERMS:
            if term in self.terms:
                w = scheduled_weight(self.base_weight(term), self.cfg[term]["decay_start"], int(epoch),
                                     int(total_epochs))
                self[term].weight = w
                out[f"w_{term}"] = w
        return out

    def combine(self, raw: Mapping[str, Tensor], dkd_warmup: float = 1.0) -> Dict[str, Tensor]:
        """The weighted terms: ``raw`` maps each term to its loss module's scalar output (WKD-F: ``.loss``).

        ``dkd_warmup`` is DKD's warm-up factor (the task's: 1-based epoch in classification, iteration in
        detection). Every term of the method must be in ``raw``.
        """
        missing = [t for t in self.terms if t not in raw]
        if missing:
            raise ValueError(f"DistillationLosses.combine: `raw` lacks the terms {missing} of method "
                             f"{self.method.name!r}")
        out: Dict[str, Tensor] = {}
        for t in self.terms:
            if t in SCHEDULED_TERMS:  # weighted inside the module (set_epoch)
                out[t] = raw[t]
            elif t == "dkd":
                out[t] = (self.base_weight(t) * float(dkd_warmup)) * raw[t]
            else:
                out[t] = self.base_weight(t) * raw[t]
        return out


def build_distillation_losses(distill_cfg: Mapping[str, Any], *, supported: Collection[str],
                              num_classes: Optional[int] = None, cost: Optional[Tensor] = None,
                              features: Optional[Mapping[str, Any]] = None,
                              projectors: Optional[Mapping[str, nn.Module]] = None) -> DistillationLosses:
    """The loss modules of ``distill.method`` with their configured weights.

    Args:
        distill_cfg: the ``distill`` section (checked against ``schema.DistillConfig``, defaults filled in).
        supported: the method names the calling task runs (others are an error naming the closest).
        num_classes: classes of the logits (detection: background included); checks WKD-L's cost.
        cost: WKD-L's [C, C] class distance, unsharpened (the task reads the file: ``distill.wkd_l.cost``);
            sharpened here with ``distill.wkd_l.kappa``. Required by methods with WKD-L.
        features: for FitNet / WKD-F: ``student_channels`` and ``teacher_channels`` (after any projector the task
            applies itself), ``projector`` (a ``make_projector`` name or None) and optional extra keyword arguments
            of ``WKDFeatureLoss`` (``teacher_layout``, ``teacher_prefix_tokens``).
        projectors: modules the task applies to the student's features itself (e.g. ``{"wkd_f_projector":
            ConvReg}``), stored under these keys (before the feature terms) so they train and are checkpointed.

    Returns:
        :class:`DistillationLosses` with WKD-L / WKD-F weights at their base values (call ``set_epoch`` for the
        schedule).
    """
    cfg = resolve(DistillConfig, dict(distill_cfg or {}), "distill", prefix="distill.")
    method = get_method(cfg["method"], supported)
    terms = method.terms
    modules: Dict[str, nn.Module] = {}
    if "kd" in terms:
        modules["kd"] = KDLoss(cfg["kd"]["temperature"])
    if "dkd" in terms:
        modules["dkd"] = DKDLoss(cfg["dkd"]["alpha"], cfg["dkd"]["beta"], cfg["dkd"]["temperature"])
    if "nkd" in terms:
        modules["nkd"] = NKDLoss(cfg["nkd"]["temperature"], cfg["nkd"]["gamma"])
    if "wkd_l" in terms:
        c = cfg["wkd_l"]
        if cost is None:
            raise ValueError("`distill.wkd_l.cost` is required: a [C, C] class-distance matrix")
        if cost.dim() != 2 or (num_classes is not None and tuple(cost.shape) != (num_classes, num_classes)):
            raise ValueError(f"`distill.wkd_l.cost` is {list(cost.shape)}, expected [{num_classes}, {num_classes}]")
        modules["wkd_l"] = WKDLogitLoss(sharpen(cost.float(), float(c["kappa"])),
                                        float(_required(cfg, "wkd_l", "temperature")),
                                        float(_required(cfg, "wkd_l", "weight")), reg=c["reg"],
                                        num_iters=c["num_iters"], log_domain=c["log_domain"])
    for key, module in (projectors or {}).items():
        if key in terms:
            raise ValueError(f"build_distillation_losses: projector key {key!r} is a term name")
        modules[key] = module
    if any(t in ("fitnet", "wkd_f") for t in terms):
        if features is None:
            raise ValueError(f"distill.method={method.name!r}: the feature channels are required (`features`)")
        f = dict(features)
        cs, ct, proj = int(f.pop("student_channels")), int(f.pop("teacher_channels")), f.pop("projector", None)
        if "fitnet" in terms:
            modules["fitnet"] = FitNetLoss(cs, ct, projector=proj)
        if "wkd_f" in terms:
            c = cfg["wkd_f"]
            modules["wkd_f"] = WKDFeatureLoss(
                cs, ct, covariance=c["covariance"], grid=c["grid"], mean_cov_ratio=c["mean_cov_ratio"], eps=c["eps"],
                projector=proj, hidden_channels=c["hidden_channels"],
                weight=float(_required(cfg, "wkd_f", "weight")), method=c["method"], num_iters=c["num_iters"],
                path=c["path"], **f)
    return DistillationLosses(method, cfg, modules)
