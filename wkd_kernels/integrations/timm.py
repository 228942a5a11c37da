"""WKD-L and WKD-F as timm training tasks (``timm.task``), drop-in for timm's own distillation tasks.

timm's ``LogitDistillationTask`` matches logits with KL divergence only and its ``FeatureDistillationTask`` matches
pooled pre-logits with MSE. The two subclasses here keep their constructor conventions (teacher as a model name,
an ``nn.Module`` or a ``DistillationTeacher``; ``criterion`` / ``criterion_kwargs``; ``task_loss_weight`` /
``distill_loss_weight`` in timm's three weighting modes; ``device`` / ``dtype``), their result dict (``loss``,
``output``, ``task_loss``, ``kd_loss``) and their ``prepare_distributed`` / ``compile`` / checkpoint methods,
and compute the WKD losses of Lv et al., NeurIPS 2024:

    WKDLogitDistillationTask    kd_loss = WKD-L(student logits, teacher logits, target)  (``WKDLogitLoss``)
    WKDFeatureDistillationTask  kd_loss = WKD-F(projector(student forward_features), teacher forward_features)
                                          [+ WKD-L when ``cost`` is given: WKD-L + WKD-F in one task]

    loss = task_loss_weight * task_loss + distill_loss_weight * kd_loss

WKD-F reads the *unpooled* ``forward_features`` of both models: CNN maps [N, C, H, W], ViT / DeiT token sequences
[N, P + H*W, D] (the P = ``model.num_prefix_tokens`` class / distillation / register tokens are left out) and Swin's
channels-last [N, H, W, D] (``model.output_fmt == "NHWC"``) -- all read as maps of positions x channels, so a
CNN <-> transformer pair needs no reshaping by hand. Maps of different sizes (ViT-S 14 x 14 tokens vs ResNet-18
7 x 7 at 224) get the published ConvReg projector (``projector="auto"``).

The WKD-L cost is a class distance d sharpened to 1 - exp(-kappa d): ``cost`` is a [C, C] tensor, a file
(``torch.save``d tensor / dict with key ``distance`` / ``.npy``), ``"classifier"`` (1 - cosine of the teacher's
classifier rows) or ``"cka"`` (linear CKA of the teacher's pre-logits over ``cost_loader``, the paper's choice).
The paper's schedule (``wkd_kernels.cosine_weight``: constant, then cosine decay to 0) is applied by
``task.set_epoch(epoch)`` when ``decay_start_epoch`` and ``total_epochs`` are given.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple, Union

try:
    import timm  # noqa: F401
    from timm.task.distillation import (DistillationTeacher, FeatureDistillationTask,
                                        FeatureDistillationTrainableModule, LogitDistillationTask)
    from timm.utils import unwrap_model
except ImportError as exc:  # timm is an optional dependency
    raise ImportError("wkd_kernels.integrations.timm needs timm with the `timm.task.distillation` API (timm 1.0.x "
                      f"releases that ship it): pip install -U timm ({exc})") from exc

import torch
from torch import Tensor, nn

from ..losses import WKDFeatureLoss, WKDLogitLoss, cosine_weight
from ..ops.feature_layout import as_nchw
from .cost import resolve_wkd_cost

__all__ = ["WKDLogitDistillationTask", "WKDFeatureDistillationTask", "WKDFeatureTrainableModule",
           "feature_layout_of"]

_logger = logging.getLogger(__name__)


def feature_layout_of(model: nn.Module, features: Tensor) -> Tuple[str, int]:
    """(layout, prefix tokens) of a timm model's ``forward_features`` output: 3-D tokens -> ("nlc",
    ``model.num_prefix_tokens``); 4-D -> ("nhwc", 0) when ``model.output_fmt`` is NHWC (Swin), else ("nchw", 0)."""
    model = unwrap_model(model)
    if features.dim() == 3:
        return "nlc", int(getattr(model, "num_prefix_tokens", 0))
    if features.dim() == 4:
        return ("nhwc" if str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC" else "nchw"), 0
    raise ValueError(f"{type(model).__name__}.forward_features returned shape {list(features.shape)}; WKD-F needs "
                     "a map [N, C, H, W] / [N, H, W, C] or tokens [N, L, D]")


def _check_weight_schedule(decay_start_epoch, total_epochs, fn: str):
    if (decay_start_epoch is None) != (total_epochs is None):
        raise ValueError(f"{fn}: give both `decay_start_epoch` and `total_epochs` (the cosine weight schedule) or "
                         "neither (constant weights)")
    if decay_start_epoch is not None:
        cosine_weight(0, 1.0, decay_start_epoch, total_epochs)  # checks the two values
    return decay_start_epoch, total_epochs


def _scheduled(base: float, epoch: float, schedule) -> float:
    start, total = schedule
    if start is None:
        return float(base)
    return cosine_weight(float(min(max(epoch, 0), total)), float(base), float(start), float(total))


def _build_logit_loss(task, cost, kappa, temperature, wkd_weight, reg, sinkhorn_iters, cost_loader,
                      cost_samples_per_class, logit_loss_kwargs, fn: str) -> WKDLogitLoss:
    """WKDLogitLoss with the resolved cost, on the task's device (the cost is a non-persistent buffer)."""
    if temperature is None:
        raise ValueError(f"{fn}: WKD-L needs `temperature` (the paper uses 8 for ResNet32x4 -> ResNet8x4 on "
                         "CIFAR-100, 4 for its cross-architecture pairs)")
    if wkd_weight is None:
        raise ValueError(f"{fn}: WKD-L needs `wkd_weight`, gamma, the factor of its Wasserstein term")
    teacher = task.teacher.model
    num_classes = int(unwrap_model(task._student_model()).num_classes)

    def pre_logits(images: Tensor) -> Tensor:
        x = task.teacher.normalize_input(images, task.student_mean, task.student_std)
        return teacher.forward_head(teacher.forward_features(x), pre_logits=True)

    classifier = None
    if isinstance(cost, str) and cost == "classifier":
        head = unwrap_model(teacher).get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{fn}: `cost='classifier'` needs a linear teacher classifier, "
                             f"{type(unwrap_model(teacher)).__name__}.get_classifier() is a {type(head).__name__}")
        classifier = head.weight
    was_training = teacher.training
    teacher.eval()
    try:
        c = resolve_wkd_cost(cost, kappa, num_classes, classifier_weight=classifier, features_fn=pre_logits,
                             loader=cost_loader, samples_per_class=cost_samples_per_class, device=task.device, fn=fn)
    finally:
        teacher.train(was_training)
    loss = WKDLogitLoss(c, temperature, wkd_weight, reg, sinkhorn_iters, **(logit_loss_kwargs or {}))
    return loss.to(task.device)


class WKDLogitDistillationTask(LogitDistillationTask):
    """WKD-L as a timm task: timm's ``LogitDistillationTask`` with the KL term replaced by ``WKDLogitLoss``.

    Args (timm's, in timm's order): ``student_model``, ``teacher_model``, ``criterion``, ``criterion_kwargs``,
    ``teacher_pretrained_path``, ``teacher_pretrained_cfg_overlay``, ``loss_type`` (``"wkd"``),
    ``distill_loss_weight``, ``task_loss_weight``, ``temperature`` (tau of WKD-L's non-target softmaxes; required),
    ``device``, ``dtype``, ``verbose``. Keyword-only, WKD-L's:
        cost: the class distance: [C, C] tensor, file path, ``"classifier"`` (default) or ``"cka"`` (module
            docstring); C must be the student's ``num_classes``.
        kappa: sharpening of the distance, cost = 1 - exp(-kappa d) (0: the distance as is). Default 1.
        wkd_weight: gamma, the factor of the Wasserstein term inside WKD-L (required; the paper: 600 on CIFAR-100
            ResNet32x4 -> ResNet8x4).
        reg, sinkhorn_iters: Sinkhorn's lambda (0.05) and iterations (10), as published.
        cost_loader, cost_samples_per_class: for ``cost="cka"``: a loader of (images, targets) and n per class.
        decay_start_epoch, total_epochs: the cosine schedule of ``wkd_weight`` (``set_epoch``); None: constant.
        logit_loss_kwargs: further ``WKDLogitLoss`` arguments (``grad``, ``log_domain``, ``backend``, ...).

    ``forward(input, target)`` returns ``{"loss", "output", "task_loss", "kd_loss"}`` as timm's task does;
    ``target`` may be class indices [B] or (mixup) label rows [B, C], whose argmax WKD-L uses.
    """

    def __init__(self, student_model: nn.Module, teacher_model: Union[str, nn.Module, DistillationTeacher],
                 criterion: Optional[nn.Module] = None, criterion_kwargs: Optional[Dict[str, Any]] = None,
                 teacher_pretrained_path: Optional[str] = None,
                 teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, loss_type: str = "wkd",
                 distill_loss_weight: Optional[float] = None, task_loss_weight: Optional[float] = None,
                 temperature: Optional[float] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, verbose: bool = True, *, cost="classifier", kappa: float = 1.0,
                 wkd_weight: Optional[float] = None, reg: float = 0.05, sinkhorn_iters: int = 10,
                 cost_loader=None, cost_samples_per_class: int = 50, decay_start_epoch: Optional[float] = None,
                 total_epochs: Optional[float] = None, logit_loss_kwargs: Optional[Dict[str, Any]] = None):
        fn = "WKDLogitDistillationTask"
        if loss_type != "wkd":
            raise ValueError(f"{fn}: `loss_type` must be 'wkd', got {loss_type!r} (timm's LogitDistillationTask "
                             "computes 'kl')")
        self_schedule = _check_weight_schedule(decay_start_epoch, total_epochs, fn)
        super().__init__(student_model, teacher_model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         teacher_pretrained_path=teacher_pretrained_path,
                         teacher_pretrained_cfg_overlay=teacher_pretrained_cfg_overlay, loss_type="kl",
                         distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight,
                         temperature=1.0 if temperature is None else temperature, device=device, dtype=dtype,
                         verbose=verbose)
        self.loss_type = "wkd"
        self._schedule = self_schedule
        self.wkd_loss = _build_logit_loss(self, cost, kappa, temperature, wkd_weight, reg, sinkhorn_iters,
                                          cost_loader, cost_samples_per_class, logit_loss_kwargs, fn)
        self.temperature = self.wkd_loss.temperature
        self.base_wkd_weight = float(self.wkd_loss.weight)
        if self.verbose:
            _logger.info(f"{fn}: {self.wkd_loss.extra_repr()}, kappa={kappa}")

    def _student_model(self) -> nn.Module:
        return self.trainable_module

    def set_epoch(self, epoch: float) -> None:
        """Set WKD-L's gamma for ``epoch`` by the cosine schedule (constant without ``decay_start_epoch``)."""
        self.wkd_loss.weight = _scheduled(self.base_wkd_weight, epoch, self._schedule)

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_logits = self.teacher(input_kd.detach(), return_features=False)
        kd_loss = self.wkd_loss(student_logits, teacher_logits, target)
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {"loss": total_loss, "output": student_logits, "task_loss": task_loss, "kd_loss": kd_loss}


class WKDFeatureTrainableModule(FeatureDistillationTrainableModule):
    """Student + WKD-F loss (its projector is the trainable ``projection``), so that DDP wraps and
    ``torch.compile`` compiles every trainable computation in one ``forward``.

    ``forward(input)`` -> (student logits, student ``forward_features``); ``forward(input, teacher_features)`` ->
    (student logits, ``WKDFeatureLossOutput`` at weight 1: the task applies the scheduled WKD-F weight).
    """

    def __init__(self, student_model: nn.Module, feature_loss: WKDFeatureLoss):
        super().__init__(student_model, projection=feature_loss)

    def forward(self, input: Tensor, teacher_features: Optional[Tensor] = None):
        feature_map = self.student.forward_features(input)
        student_logits = self.student.forward_head(feature_map)
        if teacher_features is None:
            return student_logits, feature_map
        return student_logits, self.projection(feature_map, teacher_features)


class WKDFeatureDistillationTask(FeatureDistillationTask):
    """WKD-F (and optionally WKD-L) as a timm task: timm's ``FeatureDistillationTask`` with the pooled-feature MSE
    replaced by WKD-F on the unpooled ``forward_features`` of student and teacher (module docstring).

    Args (timm's, in timm's order): ``student_model``, ``teacher_model``, ``criterion``, ``criterion_kwargs``,
    ``teacher_pretrained_path``, ``teacher_pretrained_cfg_overlay``, ``distill_loss_weight``, ``task_loss_weight``,
    ``device``, ``dtype``, ``verbose``. Keyword-only, WKD-F's (see ``WKDFeatureLoss``):
        wkd_f_weight: factor of WKD-F inside kd_loss (the paper's WKD-F weight, e.g. 0.02 on CIFAR-100). Default 1.
        covariance ("diag", published, or "full"), grid (G cells per side; default 1), mean_cov_ratio (2),
        eps (1e-5), hidden_channels (256): as in ``WKDFeatureLoss``.
        projector: ``"auto"`` (default: the published bottleneck when both maps have the same H x W, the published
            ConvReg, which changes the size, when not), or any ``WKDFeatureLoss`` projector kind / module.
        student_layout, teacher_layout, student_prefix_tokens, teacher_prefix_tokens: None (default) reads them
            from the models (``feature_layout_of``); or as in ``WKDFeatureLoss``.
        input_size: (C, H, W) of the probe forward that finds the feature shapes; None: the student's
            ``pretrained_cfg["input_size"]``.
        feature_loss_kwargs: further ``WKDFeatureLoss`` arguments (``method``, ``num_iters``, ``backend``, ...).
    WKD-L (WKD-L + WKD-F in one task), active when ``cost`` is given (see ``WKDLogitDistillationTask``):
        cost, kappa, temperature, wkd_weight, reg, sinkhorn_iters, cost_loader, cost_samples_per_class,
        logit_loss_kwargs.
    Both: decay_start_epoch, total_epochs: the cosine schedule of ``wkd_f_weight`` and ``wkd_weight``
    (``set_epoch``); None: constant.

    ``forward(input, target)`` returns ``{"loss", "output", "task_loss", "kd_loss"}`` with kd_loss = the weighted
    WKD-F (+ WKD-L), and ``"wkd_f_loss"`` / ``"wkd_l_loss"``, the two parts, when WKD-L is on.
    """

    def __init__(self, student_model: nn.Module, teacher_model: Union[str, nn.Module, DistillationTeacher],
                 criterion: Optional[nn.Module] = None, criterion_kwargs: Optional[Dict[str, Any]] = None,
                 teacher_pretrained_path: Optional[str] = None,
                 teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
                 distill_loss_weight: Optional[float] = None, task_loss_weight: Optional[float] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, verbose: bool = True, *,
                 wkd_f_weight: float = 1.0, covariance: str = "diag", grid: int = 1, mean_cov_ratio: float = 2.0,
                 eps: float = 1e-5, projector="auto", hidden_channels: int = 256,
                 student_layout: Optional[str] = None, teacher_layout: Optional[str] = None,
                 student_prefix_tokens: Optional[int] = None, teacher_prefix_tokens: Optional[int] = None,
                 input_size: Optional[Tuple[int, int, int]] = None,
                 feature_loss_kwargs: Optional[Dict[str, Any]] = None,
                 cost=None, kappa: float = 1.0, temperature: Optional[float] = None,
                 wkd_weight: Optional[float] = None, reg: float = 0.05, sinkhorn_iters: int = 10, cost_loader=None,
                 cost_samples_per_class: int = 50, logit_loss_kwargs: Optional[Dict[str, Any]] = None,
                 decay_start_epoch: Optional[float] = None, total_epochs: Optional[float] = None):
        fn = "WKDFeatureDistillationTask"
        schedule = _check_weight_schedule(decay_start_epoch, total_epochs, fn)
        # timm's constructor resolves the teacher, criterion, weights and normalisation buffers; the equal dummy
        # feature dims keep it from building its Linear projection, replaced below by the WKD-F module.
        super().__init__(student_model, teacher_model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         teacher_pretrained_path=teacher_pretrained_path,
                         teacher_pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
                         distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight,
                         student_feature_dim=1, teacher_feature_dim=1, device=device, dtype=dtype, verbose=False)
        self.verbose = verbose
        self._schedule = schedule
        self.base_wkd_f_weight = self.wkd_f_weight = float(wkd_f_weight)

        s_map, t_map, layouts = self._probe(student_model, input_size, student_layout, teacher_layout,
                                            student_prefix_tokens, teacher_prefix_tokens, fn)
        (s_layout, s_prefix, s_grid), (t_layout, t_prefix, t_grid) = layouts
        cs, ct = s_map.shape[1], t_map.shape[1]
        s_size, t_size = tuple(s_map.shape[2:]), tuple(t_map.shape[2:])
        if projector == "auto":
            projector = "bottleneck" if s_size == t_size else "convreg"
        feature_loss = WKDFeatureLoss(
            cs, ct, covariance=covariance, grid=grid, mean_cov_ratio=mean_cov_ratio, eps=eps, projector=projector,
            hidden_channels=hidden_channels, student_size=s_size, teacher_size=t_size, weight=1.0,
            student_layout=s_layout, teacher_layout=t_layout, student_prefix_tokens=s_prefix,
            teacher_prefix_tokens=t_prefix, **(feature_loss_kwargs or {}))
        if projector != "convreg" and not isinstance(projector, nn.Module) and s_size != t_size:
            raise ValueError(f"{fn}: the student map is {s_size[0]} x {s_size[1]} and the teacher's "
                             f"{t_size[0]} x {t_size[1]}; projector {projector!r} keeps the size: use "
                             "projector='auto' or 'convreg'")
        self.trainable_module = WKDFeatureTrainableModule(student_model, feature_loss.to(self.device, self.dtype))
        self._teacher_fn = None
        self.wkd_l_loss = None
        self.base_wkd_weight = None
        if cost is not None:
            self.wkd_l_loss = _build_logit_loss(self, cost, kappa, temperature, wkd_weight, reg, sinkhorn_iters,
                                                cost_loader, cost_samples_per_class, logit_loss_kwargs, fn)
            self.base_wkd_weight = float(self.wkd_l_loss.weight)
        if self.verbose:
            _logger.info(f"{fn}: student {cs} x {s_size} ({s_layout}), teacher {ct} x {t_size} ({t_layout}), "
                         f"projector={projector!r}, {feature_loss.extra_repr()}, WKD-L "
                         f"{'off' if self.wkd_l_loss is None else self.wkd_l_loss.extra_repr()}")

    @property
    def feature_loss(self) -> WKDFeatureLoss:
        """The WKD-F loss module (its projector is trained with the student)."""
        return unwrap_model(self.trainable_module).projection

    def _student_model(self) -> nn.Module:
        return unwrap_model(self.trainable_module).student

    @torch.no_grad()
    def _probe(self, student, input_size, student_layout, teacher_layout, student_prefix, teacher_prefix, fn):
        """One eval forward of both models on zeros: their feature maps as [N, C, H, W] and their layouts."""
        s_net, t_net = unwrap_model(student), unwrap_model(self.teacher.model)
        if input_size is None:
            input_size = s_net.pretrained_cfg.get("input_size") if hasattr(s_net, "pretrained_cfg") else None
            if input_size is None:
                raise ValueError(f"{fn}: give `input_size` (C, H, W): the student has no pretrained_cfg input size")
        param = next(s_net.parameters())
        x = torch.zeros(2, *input_size, device=param.device, dtype=param.dtype)
        out, layouts = [], []
        for who, net, layout, prefix in (("student", s_net, student_layout, student_prefix),
                                         ("teacher", t_net, teacher_layout, teacher_prefix)):
            was = net.training
            net.eval()
            try:
                xi = x.to(next(net.parameters()).device, next(net.parameters()).dtype)
                f = net.forward_features(xi)
            finally:
                net.train(was)
            auto_layout, auto_prefix = feature_layout_of(net, f)
            layout = auto_layout if layout is None else layout
            prefix = (auto_prefix if layout == "nlc" else 0) if prefix is None else prefix
            token_grid = None
            if layout == "nlc" and hasattr(net, "patch_embed") and hasattr(net.patch_embed, "dynamic_feat_size"):
                token_grid = tuple(net.patch_embed.dynamic_feat_size(tuple(input_size[1:])))
            out.append(as_nchw(f, layout, prefix, token_grid, name=f"{who} forward_features", fn=fn))
            layouts.append((layout, prefix, token_grid))
        return out[0], out[1], layouts

    def set_epoch(self, epoch: float) -> None:
        """Set the WKD-F weight (and WKD-L's gamma) for ``epoch`` by the cosine schedule."""
        self.wkd_f_weight = _scheduled(self.base_wkd_f_weight, epoch, self._schedule)
        if self.wkd_l_loss is not None:
            self.wkd_l_loss.weight = _scheduled(self.base_wkd_weight, epoch, self._schedule)

    def _teacher_outputs(self, input_kd: Tensor):
        model = self.teacher.model
        features = model.forward_features(input_kd)
        logits = model.forward_head(features) if self.wkd_l_loss is not None else None
        return features, logits

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (eval), the student + WKD-F module (train) and the teacher's feature forward."""
        eval_model = torch.compile(self.trainable_module.student, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = eval_model
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self._teacher_fn = torch.compile(self._teacher_outputs, backend=backend, mode=mode, **compile_kwargs)
        return eval_model

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_fn = self._teacher_fn if self._teacher_fn is not None else self._teacher_outputs
            teacher_features, teacher_logits = teacher_fn(input_kd.detach())
        student_logits, wkd_f = self.trainable_module(input, teacher_features)
        task_loss = self.criterion(student_logits, target)
        wkd_f_loss = self.wkd_f_weight * wkd_f.loss
        out = {"output": student_logits, "task_loss": task_loss}
        if self.wkd_l_loss is None:
            kd_loss = wkd_f_loss
        else:
            wkd_l_loss = self.wkd_l_loss(student_logits, teacher_logits, target)
            kd_loss = wkd_f_loss + wkd_l_loss
            out.update(wkd_f_loss=wkd_f_loss, wkd_l_loss=wkd_l_loss)
        out["kd_loss"] = kd_loss
        out["loss"] = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return out
