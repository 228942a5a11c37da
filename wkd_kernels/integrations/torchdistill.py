"""WKD-L and WKD-F as torchdistill mid-level losses, so that a torchdistill YAML can name them.

Importing this module registers (``torchdistill.losses.registry.register_mid_level_loss``)

    key "WKDLogitLoss":   WKD-L on the logits at ``student_module_path`` / ``teacher_module_path`` (``"."``: the
                          models' outputs), with the batch's labels as the target;
    key "WKDFeatureLoss": WKD-F on the feature maps / tokens at two hooked modules.

A config loads it through torchdistill's ``dependencies`` list (``- name: wkd_kernels.integrations.torchdistill``)
and uses it as a ``WeightedSumLoss`` sub-term (``examples/torchdistill/``). Each loss is called as torchdistill's
mid-level losses are, ``loss(student_io_dict, teacher_io_dict, targets)``, reading
``io_dict[module_path][module_io]``.

torchdistill builds its optimiser from the student model (and ``module_wise_configs`` of student / teacher
modules); parameters owned by a loss are not trained. So WKD-F here has no projector by default
(``projector: null``: the two hooked maps must have the same channels and size, e.g. ResNet-34 -> ResNet-18
``layer4``); a trainable projector belongs in the student (torchdistill's auxiliary-module wrappers), whose output
the loss then reads. ``projector`` may still name a kind, for users who add ``loss.parameters()`` to the optimiser.
"""
from __future__ import annotations

from typing import Optional

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as exc:  # torchdistill is an optional dependency
    raise ImportError("wkd_kernels.integrations.torchdistill needs torchdistill (pip install torchdistill; "
                      f"checked with 1.1.5): {exc}") from exc

from torch import Tensor, nn

from ..losses import WKDFeatureLoss, WKDLogitLoss
from .cost import resolve_wkd_cost

__all__ = ["WKDLogitTorchdistillLoss", "WKDFeatureTorchdistillLoss"]


def _io(io_dict: dict, path: str, io: str, who: str, fn: str) -> Tensor:
    try:
        value = io_dict[path][io]
    except KeyError:
        raise KeyError(f"{fn}: the {who} io_dict has no {path!r} / {io!r}; hook that module's {io} in the config "
                       f"(forward_hook) or fix `{who}_module_path` (available: {sorted(io_dict)})") from None
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: the {who} io_dict[{path!r}][{io!r}] is a {type(value).__name__}, expected a tensor "
                        "(a module run on several devices gives a dict: use DistributedDataParallel, not "
                        "DataParallel)")
    return value


@register_mid_level_loss(key="WKDLogitLoss")
class WKDLogitTorchdistillLoss(nn.Module):
    """WKD-L (``wkd_kernels.losses.WKDLogitLoss``) for torchdistill.

    Args:
        cost: the [C, C] class distance: a file path (``torch.save``d tensor or dict with key ``distance``, or
            ``.npy``); sharpened to 1 - exp(-kappa d).
        num_classes: C (checked against the file).
        temperature, weight: tau and gamma of WKD-L.
        kappa: sharpening (default 1; 0: the distance as is).
        reg, num_iters: Sinkhorn's lambda (0.05) and iterations (10).
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: where the logits are in the
            io dicts (default ``"."`` / ``"output"``: the models' outputs).
        Further keyword arguments go to ``WKDLogitLoss`` (``grad``, ``log_domain``, ``backend``, ...).
    """

    def __init__(self, cost, num_classes: int, temperature: float, weight: float, kappa: float = 1.0,
                 reg: float = 0.05, num_iters: int = 10, student_module_path: str = ".",
                 student_module_io: str = "output", teacher_module_path: str = ".", teacher_module_io: str = "output",
                 **kwargs):
        super().__init__()
        fn = "torchdistill WKDLogitLoss"
        c = resolve_wkd_cost(cost, kappa, int(num_classes), fn=fn)
        self.loss = WKDLogitLoss(c, temperature, weight, reg, num_iters, **kwargs)
        self.paths = (student_module_path, student_module_io, teacher_module_path, teacher_module_io)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Optional[Tensor] = None, *args,
                **kwargs) -> Tensor:
        fn = "torchdistill WKDLogitLoss"
        if targets is None:
            raise ValueError(f"{fn}: WKD-L needs the labels (targets); torchdistill passes them to sub-terms")
        sp, sio, tp, tio = self.paths
        s = _io(student_io_dict, sp, sio, "student", fn)
        t = _io(teacher_io_dict, tp, tio, "teacher", fn)
        if self.loss.cost.device != s.device:
            self.loss.to(s.device)
        return self.loss(s, t, targets)


@register_mid_level_loss(key="WKDFeatureLoss")
class WKDFeatureTorchdistillLoss(nn.Module):
    """WKD-F (``wkd_kernels.losses.WKDFeatureLoss``) for torchdistill.

    Args:
        student_channels, teacher_channels: channels (or token dimension) of the two hooked features.
        student_module_path, teacher_module_path: the hooked modules; ``*_module_io``: ``"output"`` (default) or
            ``"input"``.
        weight, covariance, grid, mean_cov_ratio, eps: as in ``WKDFeatureLoss``.
        projector: None (default, see the module docstring) or a ``WKDFeatureLoss`` projector kind.
        student_layout, teacher_layout, student_prefix_tokens, teacher_prefix_tokens: transformer features
            (``"nlc"`` tokens with P prefix tokens, ``"nhwc"`` maps), as in ``WKDFeatureLoss``.
        Further keyword arguments go to ``WKDFeatureLoss``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, student_module_path: str,
                 teacher_module_path: str, weight: float = 1.0, covariance: str = "diag", grid: int = 1,
                 mean_cov_ratio: float = 2.0, eps: float = 1e-5, projector: Optional[str] = None,
                 student_module_io: str = "output", teacher_module_io: str = "output", **kwargs):
        super().__init__()
        self.loss = WKDFeatureLoss(student_channels, teacher_channels, covariance=covariance, grid=grid,
                                   mean_cov_ratio=mean_cov_ratio, eps=eps, projector=projector, weight=weight,
                                   **kwargs)
        self.paths = (student_module_path, student_module_io, teacher_module_path, teacher_module_io)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        fn = "torchdistill WKDFeatureLoss"
        sp, sio, tp, tio = self.paths
        f_s = _io(student_io_dict, sp, sio, "student", fn)
        return self.loss(f_s, _io(teacher_io_dict, tp, tio, "teacher", fn)).loss
