"""feature_stats in ATen ops only: the ``torch`` backend of ``wkd::feature_stats`` and its backward (contract: the
schema comment in csrc/ops.cpp, docs/design.md section 4) for any device. One slice per adaptive-pooling cell (the
cell bounds are static: they depend on the shape only); half inputs are accumulated in float32."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ..ops.checks import cell_bounds, stats_dtype

__all__ = ["feature_stats_forward", "feature_stats_backward"]


def _cells(x: Tensor, grid: int):
    H, W = x.shape[2], x.shape[3]
    return [(h0, h1, w0, w1) for h0, h1 in cell_bounds(H, grid) for w0, w1 in cell_bounds(W, grid)]


def feature_stats_forward(x: Tensor, grid: int = 1, full: bool = False,
                          unbiased: bool = True) -> Tuple[Tensor, Tensor]:
    """(mean [N, P, C], var [N, P, C] | cov [N, P, C, C]) of x [N, C, H, W] (arguments already checked)."""
    xs = x.to(stats_dtype(x.dtype))
    means, second = [], []
    for h0, h1, w0, w1 in _cells(xs, grid):
        X = xs[:, :, h0:h1, w0:w1].reshape(xs.shape[0], xs.shape[1], -1)  # [N, C, m]
        m = X.shape[-1]
        # centred on the cell's first value (a mean offset costs no digits), then scaled by the power of two
        # r ~ 1/sqrt(den) before the products (their sums stay of the order of the covariance: no overflow at
        # values ~1e18 in float32); the same steps as the CPU and Triton kernels
        first = X[:, :, :1]
        Xs = X - first
        mu_s = Xs.mean(-1, keepdim=True)
        Xc = Xs - mu_s
        den = m - 1 if unbiased else m
        r = 2.0 ** -round(math.log2(max(den, 1)) / 2)
        Xr = Xc * r
        scale = 1.0 / (den * r * r) if den > 0 else float("nan")
        means.append((mu_s + first).squeeze(-1))
        second.append(torch.bmm(Xr, Xr.transpose(1, 2)) * scale if full else Xr.square().sum(-1) * scale)
    return torch.stack(means, 1), torch.stack(second, 1)


def feature_stats_backward(grad_mean: Tensor, grad_var: Tensor, x: Tensor, mean: Tensor, grid: int, full: bool,
                           unbiased: bool) -> Tensor:
    """Gradient w.r.t. x of <grad_mean, mean> + <grad_var, var>: per cell, grad_mean / m + 2 grad_var Xc / den
    (diag) or (G + G^T) Xc / den (full), summed over the (possibly overlapping) cells."""
    xs = x.to(stats_dtype(x.dtype))
    N, C = xs.shape[0], xs.shape[1]
    gx = torch.zeros_like(xs)
    for p, (h0, h1, w0, w1) in enumerate(_cells(xs, grid)):
        X = xs[:, :, h0:h1, w0:w1].reshape(N, C, -1)
        m = X.shape[-1]
        den = m - 1 if unbiased else m
        Xc = X - mean[:, p].unsqueeze(-1)
        gv = grad_var[:, p]
        if full:
            part = torch.bmm(gv + gv.transpose(1, 2), Xc) / den
        else:
            part = (2.0 / den) * gv.unsqueeze(-1) * Xc
        part = part + (grad_mean[:, p] / m).unsqueeze(-1)
        gx[:, :, h0:h1, w0:w1] += part.reshape(N, C, h1 - h0, w1 - w0)
    return gx.to(x.dtype)
