"""WKD-F: Wasserstein distance between Gaussian models of the student's and the teacher's feature maps.

The published WKD-F (per batch; the teacher map carries no gradient, the student map has gone through the
projector, 1x1 conv + BN + ReLU or the 1x1 -> 3x3 -> 1x1 bottleneck, see ``make_projector``):

    for every sample n and every cell (i, j) of a G x G adaptive-pooling grid
        (rows floor(i H / G) .. ceil((i + 1) H / G) - 1, columns likewise; neighbouring cells may overlap):
        mu    = spatial mean of the cell, per channel                                           [C]
        sigma = sqrt(unbiased spatial variance of the cell + eps), per channel                  [C]
    mean_loss = sum (mu_s - mu_t)^2       / (N G^2)
    cov_loss  = sum (sigma_s - sigma_t)^2 / (N G^2)
    loss      = mean_cov_ratio * mean_loss + cov_loss

(``F.mse_loss(..., reduction='sum') / (grid**2 * N)`` in the published code.) This is the squared 2-Wasserstein
distance between Gaussians with *diagonal* covariances, summed over cells and averaged over samples and cells.

Here the statistics come from the fused one-pass op ``wkd_kernels.feature_stats`` (all cells at once, fp32
accumulation for half inputs) instead of a Python loop over cells. ``covariance="full"`` replaces the diagonal
model by full C x C covariances and the per-cell term by the Gaussian (Bures-)Wasserstein distance

    W^2 = |mu_s - mu_t|^2 + tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2

computed by ``wkd_kernels.gaussian_wasserstein`` (nuclear-norm low-rank path when a cell has fewer positions than
channels, docs/design.md section 4), with the same normalisation: mean_loss is the mean term as above and cov_loss the
covariance term (tr S_s + tr S_t - 2 tr (...)^1/2), both summed and divided by N G^2.

Transformer features: a ViT's token sequence [N, P + H*W, D] (``layout="nlc"``; the P prefix tokens -- class,
distillation, register -- are left out) and a Swin stage's channels-last map [N, H, W, D] (``layout="nhwc"``) are
read as the [N, D, H, W] map of their patch tokens: positions = tokens, channels = D
(``wkd_kernels.ops.feature_layout``).
So a CNN <-> transformer pair is the same computation as a CNN pair; maps of different sizes (e.g. ViT-S 14 x 14
tokens vs ResNet-18 7 x 7 at 224) go through ``projector="convreg"``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import settings
from ..ops.checks import HALF, cell_bounds, check_int, check_number, loss_values_check_wanted
from ..ops.feature_layout import as_nchw, resolve_layout
from ..ops.common import resolve_backend
from ..ops.feature_stats import feature_stats_op
from ..ops.gaussian_wasserstein import gaussian_wasserstein_terms, sqrt_zero_subgradient
from .projectors import make_projector

__all__ = ["WKDFeatureLoss", "wkd_feature_loss", "WKDFeatureLossOutput"]

_COVARIANCES = ("diag", "full")


class WKDFeatureLossOutput(NamedTuple):
    """Result of WKD-F: ``loss`` = weight * (mean_cov_ratio * mean_loss + cov_loss), and its two parts.

    All three are scalars in squared feature units, float32 (float64 when both feature maps are float64).
    ``mean_loss`` and ``cov_loss`` are not multiplied by ``weight`` or ``mean_cov_ratio``.
    """
    loss: Tensor
    mean_loss: Tensor
    cov_loss: Tensor


def _check_features(f_s, f_t, fn: str, s_name: str = "student_features", t_name: str = "teacher_features",
                    s_channels: Optional[int] = None, t_channels: Optional[int] = None,
                    same_size: bool = True) -> None:
    for name, t, c in ((s_name, f_s, s_channels), (t_name, f_t, t_channels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor [N, C, H, W], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: `{name}` must be 4-D [N, C, H, W], got shape {list(t.shape)}")
        if not t.is_floating_point() or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{fn}: `{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if c is not None and t.shape[1] != c:
            raise ValueError(f"{fn}: `{name}` must have {c} channels ([N, {c}, H, W]), got shape {list(t.shape)}")
        if min(t.shape) < 1:
            raise ValueError(f"{fn}: `{name}` is empty (shape {list(t.shape)})")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{fn}: `{s_name}` has batch size {f_s.shape[0]} but `{t_name}` has {f_t.shape[0]}")
    if same_size and f_s.shape[2:] != f_t.shape[2:]:
        raise ValueError(f"{fn}: spatial sizes differ: `{s_name}` is {f_s.shape[2]} x {f_s.shape[3]}, `{t_name}` is "
                         f"{f_t.shape[2]} x {f_t.shape[3]} (H x W must match)")
    if f_s.device != f_t.device:
        raise ValueError(f"{fn}: `{t_name}` is on {f_t.device} but `{s_name}` is on {f_s.device}")


def _check_grid(grid, H: int, W: int, fn: str) -> int:
    grid = check_int(grid, "grid", fn)
    if grid > H or grid > W:
        raise ValueError(f"{fn}: `grid` ({grid}) must not exceed the feature map's spatial size H x W = {H} x {W}")
    m_min = min(h1 - h0 for h0, h1 in cell_bounds(H, grid)) * min(w1 - w0 for w0, w1 in cell_bounds(W, grid))
    if m_min < 2:
        raise ValueError(f"{fn}: `grid` = {grid} on a {H} x {W} map gives a cell of {m_min} position; the unbiased "
                         "spatial variance needs at least 2 positions per cell, use a smaller grid")
    return grid


def _check_options(covariance, grid, mean_cov_ratio, eps, weight, method, num_iters, path, fn):
    if covariance not in _COVARIANCES:
        raise ValueError(f"{fn}: `covariance` must be 'diag' or 'full', got {covariance!r}")
    check_int(grid, "grid", fn)
    mean_cov_ratio = check_number(mean_cov_ratio, "mean_cov_ratio", fn, nonneg=True)
    eps = check_number(eps, "eps", fn, nonneg=True)
    weight = check_number(weight, "weight", fn, nonneg=True)
    if method not in ("newton_schulz", "eigh"):
        raise ValueError(f"{fn}: `method` must be 'newton_schulz' or 'eigh', got {method!r}")
    num_iters = None if num_iters is None else check_int(num_iters, "num_iters", fn)
    if path not in ("auto", "low_rank", "dense"):
        raise ValueError(f"{fn}: `path` must be 'auto', 'low_rank' or 'dense', got {path!r}")
    return mean_cov_ratio, eps, weight, num_iters


def _wkd_feature_loss(f_s: Tensor, f_t: Tensor, covariance: str, grid: int, mean_cov_ratio: float, eps: float,
                      weight: float, method: str, num_iters: int, path: str, check_values: Optional[bool],
                      fn: str, s_name: str = "student_features", backend: Optional[str] = None,
                      precision: Optional[str] = None) -> WKDFeatureLossOutput:
    """Core of WKD-F on checked arguments (``f_s`` already projected)."""
    N, C, H, W = f_t.shape
    grid = _check_grid(grid, H, W, fn)
    if loss_values_check_wanted(f_s, check_values, fn):
        for name, t in ((s_name, f_s), ("teacher_features", f_t)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{fn}: `{name}` contains non-finite values (inf or nan)")
    f_t = f_t.detach()
    norm = float(N * grid * grid)
    # The statistics are taken in float32/float64 whatever autocast says (a bf16 cross-Gram or variance would
    # lose most digits of the covariance term).
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        if covariance == "diag":
            # Half inputs are read as they are (fp32 accumulation inside the op); the statistics come back fp32.
            kind = resolve_backend(backend, f_s, fn, has_cuda_cpp=False)
            mu_s, var_s = feature_stats_op(f_s, grid, False, True, kind)  # [N, G*G, C] each
            mu_t, var_t = feature_stats_op(f_t, grid, False, True, kind)
            if mu_s.dtype != mu_t.dtype:  # float64 against float32 / half: compare in float32
                mu_s, var_s, mu_t, var_t = (t.float() for t in (mu_s, var_s, mu_t, var_t))
            mean_loss = (mu_s - mu_t).square().sum() / norm
            cov_loss = (sqrt_zero_subgradient(var_s + eps) - sqrt_zero_subgradient(var_t + eps)).square().sum() / norm
        else:
            if f_s.dtype != f_t.dtype or f_s.dtype in HALF:
                dt = torch.float64 if f_s.dtype == f_t.dtype == torch.float64 else torch.float32
                f_s, f_t = f_s.to(dt), f_t.to(dt)
            # the two terms of W^2 from one pass of the statistics ([N] or [N, G*G] each)
            terms = gaussian_wasserstein_terms(f_s, f_t, "full", grid, eps, unbiased=True, method=method,
                                               num_iters=num_iters, path=path, backend=backend, precision=precision,
                                               check_values=False)
            mean_loss = terms.mean.sum() / norm
            cov_loss = terms.cov.sum() / norm  # tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2
    loss = weight * (mean_cov_ratio * mean_loss + cov_loss)
    return WKDFeatureLossOutput(loss, mean_loss, cov_loss)


def wkd_feature_loss(student_features: Tensor, teacher_features: Tensor, covariance: str = "diag", grid: int = 1,
                     mean_cov_ratio: float = 2.0, eps: float = 1e-5, *, weight: float = 1.0,
                     method: str = "newton_schulz", num_iters: Optional[int] = None, path: str = "auto",
                     backend: Optional[str] = None, precision: Optional[str] = None,
                     check_values: Optional[bool] = None, student_layout: str = "nchw",
                     teacher_layout: str = "nchw", student_prefix_tokens: int = 0,
                     teacher_prefix_tokens: int = 0) -> WKDFeatureLossOutput:
    """WKD-F loss, functional form, on an already projected student map (see :class:`WKDFeatureLoss`).

    Args:
        student_features: [N, C, H, W] student features *after* the projector (float16/bfloat16/float32/float64;
            differentiable), or tokens / a channels-last map, see ``student_layout``.
        teacher_features: [N, C, H, W] teacher features, same N, C, H, W and device (any of those dtypes); treated
            as a constant (detached); or tokens / a channels-last map, see ``teacher_layout``.
        covariance: ``"diag"`` (the published WKD-F) or ``"full"`` (full C x C covariances, Bures-Wasserstein).
        grid: G, cells per side of the adaptive-pooling partition, 1 <= G <= min(H, W), every cell >= 2 positions.
            Default 1 (one Gaussian per channel over the whole map); the published WKD code defaults to 4 (its
            ImageNet recipes and WRN-40-2 -> ShuffleNetV1 use G = 4, ResNet32x4 -> ResNet8x4 uses 1): pass
            ``grid=4`` to reproduce those (G = 4 needs an 8 x 8 map or larger).
        mean_cov_ratio: factor of the mean term (published default 2.0), >= 0.
        eps: >= 0 added to the variances (diag; published 1e-5) or to the covariance diagonal on the dense
            full-covariance path (the low-rank path is exact without it), in squared feature units.
        weight: >= 0 factor of the whole loss (e.g. from ``cosine_weight``); the parts are not scaled by it.
        method, num_iters, path: full covariance only, see ``wkd_kernels.gaussian_wasserstein``.
        backend, precision: which kernels (``"auto"``, ``"cpu"``, ``"triton"``) and the float32 product precision
            of the Triton ones (``"ieee"``, ``"tf32x3"``); None: the settings (``wkd_kernels.settings``).
        check_values: reject non-finite features (always on CPU unless False; on CUDA only when True or the
            ``check_values`` setting says so, as it synchronises). Skipped under torch.compile.
        student_layout, teacher_layout: ``"nchw"`` [N, C, H, W]; ``"nlc"`` tokens [N, P + H*W, C] (P prefix tokens,
            then a square H x W grid of patch tokens in row-major order); ``"nhwc"`` [N, H, W, C] (Swin stages);
            ``"auto"``: 4-D is NCHW, 3-D is tokens. Default ``"nchw"``.
        student_prefix_tokens, teacher_prefix_tokens: P, the leading class / distillation / register tokens left
            out of a token sequence (timm's ``model.num_prefix_tokens``); 0 for the other layouts.

    Returns:
        :class:`WKDFeatureLossOutput` ``(loss, mean_loss, cov_loss)``: scalars, squared feature units, float32
        (float64 when both inputs are float64); loss = weight * (mean_cov_ratio * mean_loss + cov_loss).
    """
    fn = "wkd_feature_loss"
    student_features = as_nchw(student_features, student_layout, student_prefix_tokens, name="student_features",
                               fn=fn)
    teacher_features = as_nchw(teacher_features, teacher_layout, teacher_prefix_tokens, name="teacher_features",
                               fn=fn)
    mean_cov_ratio, eps, weight, num_iters = _check_options(covariance, grid, mean_cov_ratio, eps, weight, method,
                                                            num_iters, path, fn)
    _check_features(student_features, teacher_features, fn)
    if student_features.shape[1] != teacher_features.shape[1]:
        raise ValueError(f"{fn}: `student_features` has {student_features.shape[1]} channels but `teacher_features` "
                         f"has {teacher_features.shape[1]}; project the student map first (or use WKDFeatureLoss)")
    precision = settings.resolve_precision(precision, "gaussian", fn)
    return _wkd_feature_loss(student_features, teacher_features, covariance, grid, mean_cov_ratio, eps, weight,
                             method, num_iters, path, check_values, fn, backend=backend, precision=precision)


class WKDFeatureLoss(nn.Module):
    """WKD-F: projector, then Wasserstein distance between per-cell Gaussians of student and teacher feature maps.

    With ``covariance="diag"`` it equals the published WKD-F (module docstring); ``"full"`` uses full covariances
    and the Bures-Wasserstein distance, same normalisation.

    Args:
        student_channels, teacher_channels: Cs, Ct of the two [N, C, H, W] maps (same N, H, W), or the token
            dimension D of transformer features (``student_layout`` / ``teacher_layout``).
        covariance: ``"diag"`` or ``"full"``.
        grid: G, cells per side (adaptive-pooling cells). Default 1 (one Gaussian per channel over the whole map);
            the published WKD code defaults to 4 (its ImageNet recipes and WRN-40-2 -> ShuffleNetV1 use G = 4,
            ResNet32x4 -> ResNet8x4 uses 1): pass ``grid=4`` to reproduce those. Every cell needs >= 2 positions
            (G = 4 needs an 8 x 8 map or larger); checked against H, W at call time.
        mean_cov_ratio: factor of the mean term (published default 2.0).
        eps: added to the variances / covariance diagonal (published 1e-5), squared feature units.
        projector: ``"bottleneck"`` (default: 1x1 -> 3x3 -> 1x1 conv with ``hidden_channels``, BN, ReLU, the
            published ConvRegBottleNeck), ``"conv1x1"`` (1x1 conv + BN + ReLU), ``"conv1x1_linear"`` (1x1 conv + BN),
            ``"convreg"`` (the published spatial-size-changing ConvReg: needs ``student_size`` and ``teacher_size``),
            an ``nn.Module``, or ``None`` (identity, needs Cs == Ct); see ``make_projector``. Its parameters belong
            to this module: add ``loss.parameters()`` to the optimiser.
        hidden_channels: bottleneck width (default 256, as published).
        student_size, teacher_size: (H, W) of the student and teacher maps, for ``projector="convreg"`` (the maps may
            then differ in size; the projected student map must have the teacher's size). For token sequences they
            are also the token grid (needed when the patch-token count is not a square).
        student_layout, teacher_layout: ``"nchw"`` [N, C, H, W]; ``"nlc"`` transformer tokens [N, P + H*W, D];
            ``"nhwc"`` channels-last [N, H, W, D] (timm Swin stages, ``model.output_fmt == "NHWC"``); ``"auto"``:
            4-D is NCHW, 3-D is tokens. Default ``"nchw"``. Tokens become an [N, D, H, W] map of the patch tokens.
        student_prefix_tokens, teacher_prefix_tokens: P, the leading class / distillation / register tokens left
            out of a token sequence (timm's ``model.num_prefix_tokens``); must be 0 for the other layouts.
        weight: >= 0 factor of the whole loss; a plain attribute (update it per epoch with ``cosine_weight``).
        method, num_iters, path: full covariance only, see ``wkd_kernels.gaussian_wasserstein``.
        backend, precision, check_values: as in :func:`wkd_feature_loss` (None: the settings at call time).

    Shapes:
        forward(student_features [N, Cs, H, W], teacher_features [N, Ct, H, W]) -> WKDFeatureLossOutput of three
        scalars ``(loss, mean_loss, cov_loss)``; tokens [N, P + H*W, C] or channels-last [N, H, W, C] in place of
        either map as the layouts say (a ViT teacher's ``forward_features`` with ``teacher_layout="nlc"`` and
        ``teacher_prefix_tokens=vit.num_prefix_tokens``).
    """

    def __init__(self, student_channels: int, teacher_channels: int, covariance: str = "diag", grid: int = 1,
                 mean_cov_ratio: float = 2.0, eps: float = 1e-5, projector: Optional[str] = "bottleneck", *,
                 hidden_channels: int = 256, student_size=None, teacher_size=None, weight: float = 1.0,
                 method: str = "newton_schulz",
                 num_iters: Optional[int] = None, path: str = "auto", backend: Optional[str] = None,
                 precision: Optional[str] = None, check_values: Optional[bool] = None,
                 student_layout: str = "nchw", teacher_layout: str = "nchw", student_prefix_tokens: int = 0,
                 teacher_prefix_tokens: int = 0):
        super().__init__()
        fn = "WKDFeatureLoss"
        self.mean_cov_ratio, self.eps, _, self.num_iters = _check_options(
            covariance, grid, mean_cov_ratio, eps, weight, method, num_iters, path, fn)
        self.covariance, self.grid, self.method, self.path = covariance, grid, method, path
        self.weight = weight  # checked by the setter
        self.check_values = check_values
        self.backend = backend
        self.precision = None if precision is None else settings.resolve_precision(precision, "gaussian", fn)
        self.projector = make_projector(projector, student_channels, teacher_channels, hidden_channels, fn=fn,
                                        student_size=student_size, teacher_size=teacher_size)
        self.resizes = projector == "convreg" or isinstance(projector, nn.Module)
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        for name, layout, prefix in (("student", student_layout, student_prefix_tokens),
                                     ("teacher", teacher_layout, teacher_prefix_tokens)):
            if not isinstance(layout, str) or layout.lower() not in ("auto", "nchw", "nlc", "nhwc"):
                raise ValueError(f"{fn}: `{name}_layout` must be 'auto', 'nchw', 'nlc' or 'nhwc', got {layout!r}")
            if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
                raise ValueError(f"{fn}: `{name}_prefix_tokens` must be an integer >= 0, got {prefix!r}")
        self.student_layout, self.teacher_layout = student_layout.lower(), teacher_layout.lower()
        self.student_prefix_tokens, self.teacher_prefix_tokens = student_prefix_tokens, teacher_prefix_tokens
        self._token_grids = (student_size, teacher_size)

    def _as_maps(self, student_features: Tensor, teacher_features: Tensor, fn: str):
        """Both inputs as [N, C, H, W] views, by the layouts given at construction."""
        out = []
        for name, x, layout, prefix, size in (
                ("student_features", student_features, self.student_layout, self.student_prefix_tokens,
                 self._token_grids[0]),
                ("teacher_features", teacher_features, self.teacher_layout, self.teacher_prefix_tokens,
                 self._token_grids[1])):
            if layout != "nchw":  # (NCHW maps are passed on as given, to the [N, C, H, W] checks)
                layout = resolve_layout(x, layout, name, fn)
            out.append(as_nchw(x, layout, prefix, size if layout == "nlc" else None, name=name, fn=fn))
        return out

    @property
    def weight(self) -> float:
        """>= 0, the factor of the whole loss (set it per epoch, e.g. with ``cosine_weight``)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_number(value, "weight", "WKDFeatureLoss", nonneg=True)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"covariance={self.covariance!r}, grid={self.grid}, mean_cov_ratio={self.mean_cov_ratio}, "
                f"eps={self.eps}, weight={self.weight}")

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> WKDFeatureLossOutput:
        fn = "WKDFeatureLoss"
        student_features, teacher_features = self._as_maps(student_features, teacher_features, fn)
        _check_features(student_features, teacher_features, fn, s_channels=self.student_channels,
                        t_channels=self.teacher_channels, same_size=not self.resizes)
        _check_grid(self.grid, teacher_features.shape[2], teacher_features.shape[3], fn)
        f_s = self.projector(student_features)
        if f_s.shape[1:] != teacher_features.shape[1:]:
            raise ValueError(f"{fn}: the projected student map is {list(f_s.shape[1:])} but `teacher_features` is "
                             f"{list(teacher_features.shape[1:])} ([C, H, W] must match after the projector)")
        weight = check_number(self.weight, "weight", fn, nonneg=True)
        return _wkd_feature_loss(f_s, teacher_features, self.covariance, self.grid, self.mean_cov_ratio, self.eps,
                                 weight, self.method, self.num_iters, self.path, self.check_values, fn,
                                 s_name="projected student_features", backend=self.backend,
                                 precision=settings.resolve_precision(self.precision, "gaussian", fn))
